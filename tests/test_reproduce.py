"""Reproduction pipeline: `nanodo-sam sweep` (local) -> training -> tables ->
figures, end to end on a tiny model (the `tiny_sweep` fixture of
tests/conftest.py); the table logic on synthetic runs; and
one-shot magnitude pruning (nanodo_sam/prune.py, Figure 5)."""

import json
import math
import os

import numpy as np
import pytest

from conftest import TINY_RUNS, fake_run
from nanodo_sam import runs as runs_lib
from nanodo_sam import sweep as sw
from nanodo_sam import tables as mt


@pytest.mark.slow  # A real sweep (tiny_sweep).
def test_sweep_to_tables_to_figures(tiny_sweep, capsys):
  out = tiny_sweep  # `nanodo-sam sweep` trained these (tests/conftest.py).
  names = list(TINY_RUNS)
  for name in names:
    res = json.loads((out / name / "results.json").read_text())
    assert res["status"] == "completed" and res["steps"] == 10
    assert [s for s, _ in res["eval_history"]] == [5, 10]
  capsys.readouterr()

  assert mt.main([str(out)]) == 0
  text = capsys.readouterr().out
  assert "| tiny | gelu | AdamW |" in text
  assert "| tiny | gelu | Precond Func-SAM |" in text
  assert "table1: no matching runs, skipped" in text
  assert (out / "tables" / "tables.md").exists()
  rows = (out / "tables" / "runs.csv").read_text().splitlines()
  assert len(rows) == 3

  from scripts import plot_eval_curves

  assert plot_eval_curves.main([str(out)]) == 0
  assert (out / "figures" / "eval_curves.png").stat().st_size > 1000


def _crc32c(data: bytes) -> int:
  crc = 0xFFFFFFFF
  for byte in data:
    crc ^= byte
    for _ in range(8):
      crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
  return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
  crc = _crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def write_tau_events(logdir, points):
  """An event file of TF2-style scalar tensor summaries (what clu's writer
  records), written as TFRecords from tensorboard's protos: no TensorFlow."""
  import struct
  from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2
  from tensorboard.compat.proto import tensor_shape_pb2, types_pb2

  meta = summary_pb2.SummaryMetadata(
      plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars")
  )
  events = [event_pb2.Event(wall_time=0.0, file_version="brain.Event:2")]
  for step, values in points:
    events.append(
        event_pb2.Event(
            step=step,
            wall_time=float(step),
            summary=summary_pb2.Summary(
                value=[
                    summary_pb2.Summary.Value(
                        tag=f"sharpness/{k}",
                        metadata=meta,
                        tensor=tensor_pb2.TensorProto(
                            dtype=types_pb2.DT_FLOAT,
                            float_val=[v],
                            tensor_shape=tensor_shape_pb2.TensorShapeProto(),
                        ),
                    )
                    for k, v in values.items()
                ]
            ),
        )
    )
  with open(logdir / "events.out.tfevents.0.test.v2", "wb") as f:
    for event in events:
      data = event.SerializeToString()
      header = struct.pack("<Q", len(data))
      f.write(
          header
          + struct.pack("<I", _masked_crc(header))
          + data
          + struct.pack("<I", _masked_crc(data))
      )


def test_plot_taus_reads_tensor_summaries(tmp_path):
  from scripts import plot_taus

  run = tmp_path / "run_a"
  run.mkdir()
  (run / "config.json").write_text(
      json.dumps({"sam": {"method": "sam", "rho": 0.1}})
  )
  points = [
      (0, {"tau_logit": 2.5, "tau_func": 3.9, "tau_cross": -5.4}),
      (50, {"tau_logit": 0.9, "tau_func": 0.2, "tau_cross": -0.1}),
  ]
  write_tau_events(run, points)
  data = runs_lib.read_scalars(
      str(run), ["sharpness/tau_logit", "sharpness/tau_cross"]
  )
  assert data["sharpness/tau_logit"] == [(0, 2.5), (50, pytest.approx(0.9))]
  assert data["sharpness/tau_cross"][0] == (0, pytest.approx(-5.4))
  assert plot_taus.main([str(tmp_path)]) == 0
  assert (tmp_path / "figures" / "taus.png").stat().st_size > 1000
  assert plot_taus.main([str(tmp_path / "figures")]) == 2


# ------------------------------------------------- tables on synthetic runs


def test_tables_best_rho_mean_std_nan_and_paper(tmp_path, capsys):
  fake_run(tmp_path, "a0", method="adamw", rho=0.0, seed=0, loss=3.90)
  fake_run(tmp_path, "a1", method="adamw", rho=0.0, seed=1, loss=3.92)
  for seed, (l1, l2) in enumerate([(3.95, 3.87), (3.97, 3.85)]):
    fake_run(
        tmp_path,
        f"p1-{seed}",
        method="precond_functional_sam",
        rho=0.1,
        seed=seed,
        loss=l1,
    )
    fake_run(
        tmp_path,
        f"p5-{seed}",
        method="precond_functional_sam",
        rho=0.5,
        seed=seed,
        loss=l2,
    )
  fake_run(tmp_path, "s1", method="sam", rho=0.1, seed=0, loss=3.91)
  fake_run(
      tmp_path,
      "s2",
      method="sam",
      rho=0.2,
      seed=0,
      loss=float("nan"),
      status="diverged",
  )
  # Table 2: a size where SAM only diverged (the paper's 1208M NaN), and a
  # sharpness.json for Table 4.
  fake_run(
      tmp_path,
      "big-s",
      method="sam",
      rho=0.1,
      seed=0,
      loss=9.0,
      size="1208M",
      status="diverged",
  )
  fake_run(
      tmp_path,
      "big-a",
      method="adamw",
      rho=0.0,
      seed=0,
      loss=3.08,
      size="1208M",
  )
  fake_run(
      tmp_path,
      "c-a",
      method="adamw",
      rho=0.0,
      seed=0,
      loss=3.70,
      size="23.9M",
      schedule="chinchilla",
      sharpness={
          "eval_loss": 3.7,
          "lambda_max": 10.0,
          "hessian_trace": 4900.0,
          "ggn_trace": 4700.0,
      },
  )
  fake_run(
      tmp_path,
      "r-a",
      method="adamw",
      rho=0.0,
      seed=0,
      loss=3.95,
      nonlinearity="relu",
  )

  assert mt.main([str(tmp_path)]) == 0
  text = capsys.readouterr().out
  # Best rho chosen on the seed mean (0.5: 3.86 < 3.96), mean ± std (ddof 1).
  assert "| Precond Func-SAM | 3.8600 ± 0.0141 (ρ=0.5) | 3.86 | 2 |" in text
  assert "| AdamW | 3.9100 ± 0.0141 | 3.90 | 2 |" in text
  # A diverged setting is NaN and loses to a finite one.
  assert "| SAM | 3.9100 (ρ=0.1) | 3.91 | 1 |" in text
  assert "| Func-SAM | — | 3.88 | 0 |" in text
  assert (
      "| 1208M | — | 3.05 | — | NaN | NaN (ρ=0.1) | NaN | 3.0800 | 3.08 |"
      in text
  )
  assert "| AdamW | 3.7000 | 3.690 | 10.00 | 10.61 | 4900.0 | 4897.5 |" in text
  assert "| ReLU | AdamW | 3.9500 | 3.9145 |" in text
  assert "| 23.9M | — | 3.63 | — | 3.66 | — | 3.71 | 3.7000 | 3.69 |" in text
  assert "table6: no matching runs, skipped" in text
  for name in ("table1", "table2", "table4", "table5", "summary"):
    assert (tmp_path / "tables" / f"{name}.csv").exists()

  runs = mt.load_runs([str(tmp_path)])
  cell = runs_lib.best(
      [r for r in runs if r.group == ("fixed_length", "2M", "gelu", "sam")]
  )
  assert cell.rho == 0.1 and cell.settings == 2
  assert math.isnan(
      runs_lib.best(
          [r for r in runs if r.size == "1208M" and r.method == "sam"]
      ).mean
  )

  from scripts import plot_rho

  assert plot_rho.main([str(tmp_path), "--relative"]) == 0
  assert (tmp_path / "figures" / "rho.png").exists()


def test_rho_warmup_is_its_own_setting(tmp_path):
  fake_run(
      tmp_path,
      "s",
      method="sam",
      rho=0.1,
      seed=0,
      loss=float("nan"),
      size="1208M",
      status="diverged",
  )
  fake_run(
      tmp_path,
      "sw",
      method="sam",
      rho=0.1,
      seed=0,
      loss=3.08,
      size="1208M",
      rho_warmup_steps=1000,
  )
  runs = mt.load_runs([str(tmp_path)], warn=lambda m: None)
  assert len(runs) == 2
  cell = runs_lib.best(runs)
  assert cell.mean == 3.08 and cell.variant == "rho_warmup_steps=1000"
  assert mt.fmt_loss(cell) == "3.0800 (ρ=0.1, rho_warmup_steps=1000)"


def test_make_tables_bad_input(tmp_path, capsys):
  assert mt.main([str(tmp_path / "missing")]) == 2
  assert mt.main([str(tmp_path)]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert (
      len(err) == 2
      and "not a directory" in err[0]
      and "no results.json" in err[1]
  )
  with pytest.raises(SystemExit) as e:  # argparse's error: one line too.
    mt.main([str(tmp_path), "--metric=nope"])
  err = capsys.readouterr().err.strip().splitlines()
  assert e.value.code == 2 and len(err) == 1
  assert err[0].startswith("nanodo-sam tables: error: argument --metric")


# ----------------------------------------------------------------- pruning


@pytest.fixture(scope="module")
def tiny_model():
  import jax
  from nanodo_sam import model as model_lib

  cfg = model_lib.DoConfig(D=16, H=2, N=2, F=32, L=8, V=50)
  model = model_lib.TransformerDo(cfg)
  params = model_lib.init_params(model, jax.random.key(0))
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, cfg.V, (4, cfg.L + 1)).astype(np.int32)
  batch = {
      "inputs": tokens[:, :-1],
      "targets": tokens[:, 1:],
      "weights": np.ones((4, cfg.L), np.float32),
  }
  logits_fn = model_lib.make_logits_fn(model)
  from nanodo_sam.loss import cross_entropy

  loss = jax.jit(lambda p: cross_entropy(logits_fn(p, batch["inputs"]), batch))
  return cfg, params, loss


def _split(params):
  import jax
  from nanodo_sam import prune

  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  kept = [np.asarray(x) for p, x in leaves if prune.is_prunable(p)]
  emb = [np.asarray(x) for p, x in leaves if not prune.is_prunable(p)]
  return kept, emb


def test_prune_exact_fraction_smallest_weights_embeddings_untouched(tiny_model):
  from nanodo_sam import model as model_lib
  from nanodo_sam import prune

  cfg, params, _ = tiny_model
  n = model_lib.non_embedding_params(cfg)
  assert prune.prunable_count(params) == n
  before, emb_before = _split(params)
  for fraction in (0.1, 0.37, 0.9):
    pruned = prune.prune(params, fraction)
    after, emb_after = _split(pruned)
    zeros = sum(int(np.sum(a == 0)) for a in after)
    assert zeros == round(fraction * n)
    assert prune.zero_fraction(pruned) == pytest.approx(round(fraction * n) / n)
    for a, b in zip(emb_before, emb_after):
      np.testing.assert_array_equal(a, b)
    # Global magnitude: every zeroed weight is no larger than every kept one.
    flat_b = np.concatenate([x.ravel() for x in before])
    flat_a = np.concatenate([x.ravel() for x in after])
    dropped = np.abs(flat_b[(flat_a == 0) & (flat_b != 0)])
    kept = np.abs(flat_b[flat_a != 0])
    assert dropped.max() <= kept.min()
    np.testing.assert_array_equal(flat_a[flat_a != 0], flat_b[flat_a != 0])


def test_prune_eval_fraction_zero_is_unchanged(tiny_model):
  from nanodo_sam import prune

  _, params, loss = tiny_model
  rows = prune.prune_eval(params, [0.0, 0.3, 0.8], lambda p: float(loss(p)))
  assert rows[0] == (0.0, float(loss(params)), 0.0)
  assert rows[1][2] == pytest.approx(0.3, abs=1e-3)
  assert rows[2][1] != rows[0][1]
  table = prune.format_table(rows)
  assert "0.300" in table and "delta" in table


def test_parse_fractions():
  from nanodo_sam import prune
  from nanodo_sam.config import UsageError

  assert prune.parse_fractions("0, 0.1,0.5") == [0.0, 0.1, 0.5]
  for bad, msg in [
      ("1.0", "outside [0, 1)"),
      ("-0.1", "outside [0, 1)"),
      ("0.1,abc", "not a number"),
      ("", "empty"),
      ("nan", "outside [0, 1)"),
  ]:
    with pytest.raises(
        UsageError, match=msg.replace("[", r"\[").replace(")", r"\)")
    ):
      prune.parse_fractions(bad)


def test_plot_pruning(tmp_path):
  from scripts import plot_pruning

  for method, slope in (("adamw", 2.0), ("precond_functional_sam", 1.0)):
    d = tmp_path / method
    d.mkdir()
    (d / "prune.json").write_text(
        json.dumps(
            {
                "step": 10,
                "method": method,
                "rho": 0.5,
                "model_size_name": "2M",
                "results": [
                    {
                        "fraction": f,
                        "eval_loss": 3.9 + slope * f**2,
                        "actual_fraction": f,
                    }
                    for f in (0, 0.1, 0.3, 0.5)
                ],
            }
        )
    )
  assert plot_pruning.main([str(tmp_path)]) == 0
  assert (tmp_path / "figures" / "pruning.png").stat().st_size > 1000
  assert plot_pruning.main([str(tmp_path / "adamw" / "nothing")]) == 2


def test_reuse_sweep_and_its_table(tmp_path, capsys):
  """configs/sweeps/reuse.py expands to AdamW, full Precond F-SAM and
  k in {2, 5, 10} with and without reuse, every config valid; plot_reuse
  groups runs by variant, averages seeds, prices every_k=k at 1 + 1/k and
  reads the measured step-time ratio from a bench JSON."""
  from nanodo_sam import config as config_lib
  from nanodo_sam import validation
  from scripts import plot_reuse

  s = sw.load_sweep(
      os.path.join(sw.REPO_ROOT, "configs", "sweeps", "reuse.py"),
      out=str(tmp_path / "runs"),
  )
  assert len(s.runs) == 16
  for run in s.runs:
    cfg = config_lib.load_config_file(run.config, sw.REPO_ROOT)
    for key, value in {**run.common, **run.overrides}.items():
      node = cfg
      *path, last = key.split(".")
      for part in path:
        node = node[part]
      node[last] = value
    validation.validate(cfg)
  names = {r.name for r in s.runs}
  assert "precond_functional_sam-rho0.5-k5-reusetrue-seed1" in names
  losses = {
      ("adamw", 1, False): 6.70,
      ("precond_functional_sam", 1, False): 6.69,
      ("precond_functional_sam", 5, True): 6.695,
  }
  for seed in (0, 1):
    for (method, k, reuse), loss in losses.items():
      d = tmp_path / f"{method}-{k}-{reuse}-{seed}"
      d.mkdir()
      (d / "config.json").write_text(
          json.dumps(
              {
                  "seed": seed,
                  "sam": {"method": method, "every_k": k, "reuse": reuse},
              }
          )
      )
      (d / "results.json").write_text(
          json.dumps(
              {"status": "completed", "final_eval_loss": loss + 0.01 * seed}
          )
      )
  bench_json = tmp_path / "bench.json"
  bench_json.write_text(
      json.dumps(
          {
              "rows": [
                  {"method": "adamw", "time_vs_adamw": 1.0},
                  {
                      "method": "precond_functional_sam:k=5:reuse",
                      "time_vs_adamw": 1.3,
                  },
              ]
          }
      )
  )
  dirs = [str(d) for d in sorted(tmp_path.glob("*-*-*-*"))]
  out = tmp_path / "reuse.png"
  assert (
      plot_reuse.main(
          dirs + [f"--bench={bench_json}", f"--out={out}", "--table"]
      )
      == 0
  )
  rows = {
      line.split(" | ")[0].strip("| "): line.split(" | ")
      for line in capsys.readouterr().out.splitlines()
      if line.startswith("| precond") or line.startswith("| adamw")
  }
  assert rows["precond_functional_sam:k=5:reuse"][3:5] == ["1.20", "1.30"]
  assert rows["precond_functional_sam:k=5:reuse"][-2] == "6.7000"
  assert rows["precond_functional_sam"][3] == "2.00"
  assert rows["precond_functional_sam"][-1].strip(" |") == "-0.0100"
  assert out.stat().st_size > 1000
  assert plot_reuse.main([str(tmp_path / "nothing")]) == 2
