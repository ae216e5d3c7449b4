"""nanodo_sam/runs.py: reading real run directories (the `tiny_sweep` of
tests/conftest.py, trained through `nanodo-sam sweep`; sharpness.json and tau
scalars in tests/test_cli.py) against their files and TensorBoard's own
reader, and the statistics (best setting by mean over seeds, paired
differences by seed, grouping) against values computed here."""

import json
import math
import os
import shutil

import numpy as np
import pytest

from conftest import TINY_RUNS, fake_run
from nanodo_sam import runs


def _json(path):
  return json.loads(path.read_text())


@pytest.mark.slow  # A real sweep (tiny_sweep).
def test_load_runs_reads_every_file_of_a_real_run(tiny_sweep):
  found = runs.load_runs([str(tiny_sweep)])
  assert [r.name for r in found] == list(TINY_RUNS)
  adamw, pfs = found
  for r in found:
    d = tiny_sweep / r.name
    res = _json(d / "results.json")
    assert r.config == _json(d / "config.json") and r.results == res
    assert r.status == "completed" and r.steps == 10
    assert r.seed == 0 and r.lr == 3e-3 and r.size == "tiny"
    assert r.final_eval_loss == r.loss == res["final_eval_loss"]
    assert r.eval_history == [tuple(x) for x in res["eval_history"]]
    assert [s for s, _ in r.eval_history] == [5, 10]
    assert r.best_eval_loss == min(l for _, l in r.eval_history)
    assert r.wall_seconds == res["wall_seconds"] > 0
  assert (adamw.method, adamw.rho, adamw.label) == ("adamw", 0.0, "AdamW")
  assert (pfs.method, pfs.rho) == ("precond_functional_sam", 0.1)
  assert pfs.label == "Precond Func-SAM ρ=0.1"
  assert adamw.prune is None and adamw.sharpness is None
  prune = _json(tiny_sweep / TINY_RUNS[1] / "prune.json")
  assert pfs.prune == prune
  assert [row["fraction"] for row in pfs.prune["results"]] == [0.0, 0.5]
  # One run directory, or one of its files, reads the same run.
  one = runs.load_runs([str(tiny_sweep / TINY_RUNS[1] / "prune.json")])
  assert [r.workdir for r in one] == [pfs.workdir]
  assert runs.read_run(pfs.workdir).results == pfs.results


@pytest.mark.slow  # A real sweep (tiny_sweep).
def test_scalars_match_tensorboard_and_results(tiny_sweep):
  from tensorboard.backend.event_processing import event_accumulator as ea
  from tensorboard.util import tensor_util

  found = runs.load_runs([str(tiny_sweep)])
  assert [r.name for r in found] == list(TINY_RUNS)
  for r in found:
    acc = ea.EventAccumulator(r.workdir, size_guidance={ea.TENSORS: 0})
    acc.Reload()
    reference = {}
    for tag in acc.Tags()["tensors"]:
      values = [
          (e.step, tensor_util.make_ndarray(e.tensor_proto))
          for e in acc.Tensors(tag)
      ]
      if all(v.size == 1 and v.dtype.kind == "f" for _, v in values):
        reference[tag] = [(s, float(v)) for s, v in values]
    scalars = r.scalars()
    assert set(scalars) == set(reference)
    for tag, points in reference.items():
      assert [s for s, _ in scalars[tag]] == [s for s, _ in points], tag
      np.testing.assert_allclose(
          [v for _, v in scalars[tag]], [v for _, v in points], rtol=1e-6
      )
    # The loop logs each evaluation to TensorBoard and results.json alike.
    np.testing.assert_allclose(
        [v for _, v in scalars["eval/loss"]],
        [l for _, l in r.eval_history],
        rtol=1e-6,
    )
    assert [s for s, _ in scalars["eval/loss"]] == [5, 10]
    assert {"train/loss", "train/grad_norm"} <= set(scalars)
    assert set(r.scalars(prefix="train/")) == {
        t for t in scalars if t.startswith("train/")
    }
    assert r.scalars(["eval/loss"]) == {"eval/loss": scalars["eval/loss"]}


@pytest.mark.slow  # A real sweep (tiny_sweep).
def test_grouping_and_paired_differences_on_real_runs(tiny_sweep, tmp_path):
  found = runs.load_runs([str(tiny_sweep)])
  assert runs.varying_keys(found) == ["sam.method", "sam.rho"]
  groups = runs.group_by(found, "method", "sam.rho", "seed")
  assert list(groups) == [("adamw", 0.0, 0), ("precond_functional_sam", 0.1, 0)]
  adamw, pfs = (_json(tiny_sweep / n / "results.json") for n in TINY_RUNS)
  diff = runs.paired_differences(
      groups[list(groups)[1]], groups[list(groups)[0]]
  )
  assert diff == {0: pfs["final_eval_loss"] - adamw["final_eval_loss"]}
  cell = runs.best(found, by=("method",))
  assert cell.settings == 2 and cell.n == 1
  assert cell.mean == min(adamw["final_eval_loss"], pfs["final_eval_loss"])
  # An unfinished run (killed before results.json) is listed, not finished.
  part = tmp_path / "part"
  shutil.copytree(
      tiny_sweep / TINY_RUNS[0],
      part,
      ignore=shutil.ignore_patterns("results.json"),
  )
  (rec,) = runs.load_runs([str(part)])
  assert rec.status == "unfinished" and math.isnan(rec.loss)
  assert runs.load_runs([str(part)], finished=True) == []


def test_best_setting_by_mean_over_seeds_and_paired_differences(tmp_path):
  losses = {
      0.1: (3.95, 3.97, 3.93),
      0.5: (3.87, 3.85, 3.86),
      1.0: (3.80, float("nan"), 3.81),
  }  # rho=1 diverged for seed 1.
  for rho, seeds in losses.items():
    for seed, loss in enumerate(seeds):
      fake_run(
          tmp_path,
          f"p{rho}-{seed}",
          method="precond_functional_sam",
          rho=rho,
          seed=seed,
          loss=loss,
          status="diverged" if math.isnan(loss) else "completed",
      )
  for seed, loss in enumerate((3.90, 3.92, 3.91)):
    fake_run(
        tmp_path, f"a-{seed}", method="adamw", rho=0.0, seed=seed, loss=loss
    )
  found = runs.load_runs([str(tmp_path)])
  pfs = [r for r in found if r.method == "precond_functional_sam"]
  cell = runs.best(pfs, by=("rho",))
  assert cell.setting == (0.5,) and cell.rho == 0.5 and cell.n == 3
  assert cell.settings == 3
  assert cell.mean == pytest.approx(3.86)
  assert cell.std == pytest.approx(np.std([3.87, 3.85, 3.86], ddof=1))
  assert math.isnan(runs.best([r for r in pfs if r.rho == 1.0]).mean)
  adamw = [r for r in found if r.method == "adamw"]
  diff = runs.paired_differences(cell.runs, adamw)
  assert diff == pytest.approx({0: 3.87 - 3.90, 1: 3.85 - 3.92, 2: 3.86 - 3.91})
  assert runs.paired_differences(cell.runs, adamw[:2]).keys() == {0, 1}
  with pytest.raises(ValueError, match="one run per seed"):
    runs.paired_differences(pfs, adamw)
  by = runs.group_by(found, "method", "rho")
  assert {k: len(v) for k, v in by.items()} == {
      ("precond_functional_sam", 0.1): 3,
      ("precond_functional_sam", 0.5): 3,
      ("precond_functional_sam", 1.0): 3,
      ("adamw", 0.0): 3,
  }
  assert runs.varying_keys(found) == ["sam.method", "sam.rho"]
  assert runs.mean_std([1.0, 3.0]) == (2.0, math.sqrt(2.0))
  for xs in ([], [1.0, float("nan")]):
    assert all(math.isnan(x) for x in runs.mean_std(xs))


def test_variant_reads_the_defaults_of_configs_base():
  from nanodo_sam import config as config_lib

  base = config_lib.load_config_file("configs/base.py")
  cfg = config_lib.to_dict(base)
  assert runs.RunRecord("r", cfg).variant == ""
  cfg["sam"]["rho_warmup_steps"] = 1000
  cfg["opt"]["weight_decay"] = 0.0
  assert (
      runs.RunRecord("r", cfg).variant
      == "rho_warmup_steps=1000,weight_decay=0.0"
  )
  assert runs.RunRecord("r", {"sam": {"every_k": 5}}).variant == "every_k=5"


def test_best_ranks_by_the_chosen_metric_in_its_direction(tmp_path):
  """Accuracy: the highest mean wins; bits per byte: the lowest;
  `nanodo-sam tables --metric` takes any of runs.METRICS."""
  acc = {0.1: (0.30, 0.32), 0.5: (0.36, 0.34), 1.0: (0.31, 0.33)}
  bpb = {0.1: (3.1, 3.3), 0.5: (3.4, 3.2), 1.0: (2.9, 3.0)}
  for rho in acc:
    for seed in (0, 1):
      d = tmp_path / f"sam-{rho}-{seed}"
      fake_run(tmp_path, d.name, method="sam", rho=rho, seed=seed, loss=3.0)
      res = _json(d / "results.json")
      res.update(
          final_eval_accuracy=acc[rho][seed],
          final_eval_bits_per_byte=bpb[rho][seed],
      )
      (d / "results.json").write_text(json.dumps(res))
  for metric, rho in (
      ("final_eval_accuracy", 0.5),
      ("final_eval_bits_per_byte", 1.0),
  ):
    cell = runs.best(runs.load_runs([str(tmp_path)], metric), by=("rho",))
    assert cell.setting == (rho,)
  assert cell.mean == pytest.approx(2.95)
  from nanodo_sam import tables as make_tables

  assert set(runs.METRICS) >= {
      "final_eval_perplexity",
      "final_eval_accuracy",
      "final_eval_bits_per_byte",
  }
  for metric in runs.METRICS:
    assert (
        make_tables.main(
            [
                str(tmp_path),
                f"--metric={metric}",
                f"--out={tmp_path / 'tables'}",
            ]
        )
        == 0
    )
  text = (tmp_path / "tables" / "tables.md").read_text()
  assert "ours = final_eval_bits_per_byte" in text and "2.9500" in text


def test_runs_continued_from_different_sources_are_not_repeats(tmp_path):
  for name in ("a", "b", "copy_of_a"):
    fake_run(tmp_path, name, method="adamw", rho=0.0, seed=0, loss=3.9)
  for name, source in (("a", "/r/x"), ("b", "/r/y"), ("copy_of_a", "/r/x")):
    path = tmp_path / name / "config.json"
    cfg = json.loads(path.read_text())
    path.write_text(json.dumps({**cfg, "init_from": source}))
  notes = []
  kept = runs.unique(runs.load_runs([str(tmp_path)]), notes.append)
  assert sorted(os.path.basename(r.workdir) for r in kept) == ["a", "b"]
  assert len(notes) == 1 and "copy_of_a repeats an earlier run" in notes[0]
