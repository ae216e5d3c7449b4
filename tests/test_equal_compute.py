"""Equal compute (nanodo_sam/equal_compute.py): compute-matched runs found
from their own config.json and results.json, the equal-compute table of
`nanodo-sam tables` beside the equal-steps one, and scripts/plot_flops.py's
eval loss against training FLOPs; on run directories written by hand."""

import csv
import json
import math

import pytest

from conftest import tiny_config
from nanodo_sam import equal_compute
from nanodo_sam import runs as runs_lib
from nanodo_sam import tables as mt
from nanodo_sam.config import to_dict

# The tiny model's plain step (tests/test_train_flops.py): 111,744 FLOPs per
# token x 256 tokens. A SAM step costs two, a Momentum-SAM step one.
PLAIN = 111_744 * 256


def write_run(
    root,
    name,
    *,
    method,
    seed,
    loss,
    steps=10,
    flops_steps=None,
    lr=1e-3,
    rho=0.1,
    history=None,
    status="completed",
    done=None,
    **sam,
):
  """A run directory written by hand: the tiny config (full, as the trainer
  writes it) with these keys, and results.json with train_flops =
  `flops_steps` plain steps (None: no train_flops, an older run)."""
  cfg = tiny_config(
      **{
          "schedule_name": "fixed_length",
          "model.size_name": "tiny",
          "seed": seed,
          "sam.method": method,
          "sam.rho": rho,
          "opt.num_train_steps": steps,
          "opt.peak_learning_rate": lr,
          **{f"sam.{k}": v for k, v in sam.items()},
      }
  )
  d = root / name
  d.mkdir(parents=True)
  (d / "config.json").write_text(json.dumps(to_dict(cfg)))
  results = {
      "final_eval_loss": None if status == "diverged" else loss,
      "steps": steps if done is None else done,
      "method": method,
      "rho": rho,
      "peak_learning_rate": lr,
      "model_size_name": "tiny",
      "status": status,
      "eval_history": history or [[steps, loss]],
  }
  if flops_steps is not None:
    results["train_flops"] = flops_steps * PLAIN
  (d / "results.json").write_text(json.dumps(results))
  return d


def matched_sweep(root):
  """AdamW and SAM at 10 steps, Momentum-SAM (one pass: AdamW's compute),
  and AdamW at 20 steps for SAM's compute, at two learning rates."""
  for seed, (adamw, sam, worse, msam, cm, cm_lr) in enumerate(
      [
          (4.00, 3.90, 3.99, 3.95, 3.80, 3.85),
          (4.10, 3.96, 4.05, 4.01, 3.88, 3.95),
      ]
  ):
    write_run(root, f"a{seed}", method="adamw", seed=seed, loss=adamw,
              flops_steps=10)  # fmt: skip
    write_run(root, f"s{seed}", method="sam", seed=seed, loss=sam,
              flops_steps=20)  # fmt: skip
    write_run(root, f"s2-{seed}", method="sam", rho=0.2, seed=seed,
              loss=worse, flops_steps=20)  # fmt: skip
    write_run(root, f"m{seed}", method="momentum_sam", seed=seed, loss=msam,
              flops_steps=10)  # fmt: skip
    write_run(root, f"cm{seed}", method="adamw", seed=seed, loss=cm,
              steps=20, flops_steps=20)  # fmt: skip
    write_run(root, f"cm-lr{seed}", method="adamw", seed=seed, loss=cm_lr,
              steps=20, flops_steps=20, lr=3e-3)  # fmt: skip


def test_same_flops_is_within_one_percent():
  assert equal_compute.same_flops(100.0, 100.9)
  assert equal_compute.same_flops(100.9, 100.0)
  assert not equal_compute.same_flops(100.0, 102.0)
  assert not equal_compute.same_flops(math.nan, math.nan)
  assert not equal_compute.same_flops(0.0, 0.0)


def test_compute_matched_runs_are_found_from_their_records(tmp_path):
  matched_sweep(tmp_path)
  runs = mt.load_runs([str(tmp_path)], warn=lambda m: None)
  assert len(runs) == 12
  equal_steps, matched = equal_compute.split(runs)
  assert sorted(r.name for r in matched) == ["cm-lr0", "cm-lr1", "cm0", "cm1"]
  assert len(equal_steps) == 8


def test_the_equal_compute_table(tmp_path, capsys):
  matched_sweep(tmp_path)
  assert mt.main([str(tmp_path)]) == 0
  text = capsys.readouterr().out
  flops = f"{20 * PLAIN:.3g}"
  # SAM's best rho (0.1: 3.93 < 4.02); AdamW at 10 steps 4.05, at 20 steps
  # its best lr (1e-3: 3.84 < 3.90). Paired by seed: 3.90 - 4.00 = -0.10,
  # 3.96 - 4.10 = -0.14; 3.90 - 3.80 = 0.10, 3.96 - 3.88 = 0.08.
  assert (
      f"| fixed_length | tiny | gelu | SAM | 10 | {flops} | 3.9300 ± 0.0424"
      " (ρ=0.1) | 4.0500 ± 0.0707 | -0.1200 ± 0.0283 | 3.8400 ± 0.0566 |"
      " 20 | +0.0900 ± 0.0141 |"
  ) in text
  # Momentum-SAM costs AdamW's step: both baselines are AdamW at 10 steps
  # (3.95 - 4.00 = -0.05, 4.01 - 4.10 = -0.09).
  assert (
      f"| Momentum-SAM | 10 | {10 * PLAIN:.3g} | 3.9800 ± 0.0424 (ρ=0.1) |"
      " 4.0500 ± 0.0707 | -0.0700 ± 0.0283 | 4.0500 ± 0.0707 | 10 |"
      " -0.0700 ± 0.0283 |"
  ) in text
  # The equal-steps tables leave the 20-step runs out: 2 seeds, not 4.
  assert "| fixed_length | tiny | gelu | AdamW | 4.0500 ± 0.0707 |" in text
  assert "equal_compute: 4 compute-matched runs" in text
  with open(tmp_path / "tables" / "equal_compute.csv") as f:
    rows = {r["method"]: r for r in csv.DictReader(f)}
  sam = rows["sam"]
  assert float(sam["train_flops"]) == 20 * PLAIN
  assert int(sam["compute_baseline_steps"]) == 20
  assert float(sam["compute_baseline_lr"]) == 1e-3
  assert float(sam["compute_delta_mean"]) == pytest.approx(0.09)
  assert float(sam["steps_delta_mean"]) == pytest.approx(-0.12)
  assert int(sam["compute_delta_seeds"]) == 2


def test_without_compute_matched_runs_the_table_is_skipped(tmp_path, capsys):
  for seed in (0, 1):
    write_run(tmp_path, f"a{seed}", method="adamw", seed=seed, loss=4.0,
              flops_steps=10)  # fmt: skip
    write_run(tmp_path, f"s{seed}", method="sam", seed=seed, loss=3.9,
              flops_steps=20)  # fmt: skip
  # A longer pair of runs is an equal-steps comparison, not a matched one.
  write_run(tmp_path, "a-long", method="adamw", seed=0, loss=3.8, steps=20,
            flops_steps=20)  # fmt: skip
  write_run(tmp_path, "s-long", method="sam", seed=0, loss=3.7, steps=20,
            flops_steps=40)  # fmt: skip
  runs = mt.load_runs([str(tmp_path)], warn=lambda m: None)
  assert equal_compute.split(runs)[1] == []
  assert equal_compute.comparisons(runs) == []
  assert mt.main([str(tmp_path)]) == 0
  text = capsys.readouterr().out
  assert "equal_compute: no compute-matched runs" in text
  assert "Equal compute:" not in text
  assert not (tmp_path / "tables" / "equal_compute.csv").exists()


def test_a_diverged_matched_run_counts_its_planned_flops(tmp_path):
  """results.json's train_flops counts the steps done (7 of 20); the
  planned compute is the trainer's count for the whole config."""
  write_run(tmp_path, "s", method="sam", seed=0, loss=3.9, flops_steps=20)
  write_run(tmp_path, "a", method="adamw", seed=0, loss=4.0, flops_steps=10)
  write_run(tmp_path, "cm", method="adamw", seed=0, loss=math.nan, steps=20,
            done=7, flops_steps=7, status="diverged")  # fmt: skip
  runs = mt.load_runs([str(tmp_path)], warn=lambda m: None)
  cm = next(r for r in runs if r.name == "cm")
  assert equal_compute.planned_flops(cm) == pytest.approx(20 * PLAIN)
  assert [r.name for r in equal_compute.split(runs)[1]] == ["cm"]
  (c,) = equal_compute.comparisons(runs)
  assert math.isnan(c.equal_compute.mean) and c.equal_steps.mean == 4.0


def test_flops_history_is_the_trainers_count(tmp_path):
  """Late-phase SAM from step 4: plain steps cost 1, SAM steps 2."""
  d = write_run(tmp_path, "late", method="sam", seed=0, loss=3.9,
                flops_steps=16, start_step=4,
                history=[[2, 5.0], [6, 4.5], [10, 3.9]])  # fmt: skip
  (run,) = runs_lib.load_runs([str(d)])
  assert equal_compute.flops_history(run) == [
      (pytest.approx(2 * PLAIN), 5.0),
      (pytest.approx((4 + 2 * 2) * PLAIN), 4.5),
      (pytest.approx((4 + 6 * 2) * PLAIN), 3.9),
  ]


def test_plot_flops_writes_the_figure_and_table(tmp_path, capsys):
  from scripts import plot_flops

  for seed, shift in enumerate((0.0, 0.1)):
    write_run(tmp_path, f"s{seed}", method="sam", seed=seed, loss=3.9 + shift,
              flops_steps=20, history=[[5, 4.4 + shift], [10, 3.9 + shift]])  # fmt: skip
    write_run(tmp_path, f"a{seed}", method="adamw", seed=seed,
              loss=4.0 + shift, flops_steps=10,
              history=[[5, 4.5 + shift], [10, 4.0 + shift]])  # fmt: skip
    write_run(tmp_path, f"cm{seed}", method="adamw", seed=seed, steps=20,
              loss=3.8 + shift, flops_steps=20,
              history=[[10, 4.0 + shift], [20, 3.8 + shift]])  # fmt: skip
  write_run(tmp_path, "old", method="adamw", seed=5, loss=1.0)
  out = tmp_path / "flops.png"
  assert plot_flops.main([str(tmp_path), f"--out={out}"]) == 0
  captured = capsys.readouterr()
  assert out.stat().st_size > 1000
  assert "no train_flops" in captured.err and "old" in captured.err
  # The panel's budget is AdamW's 10 steps: SAM's 5th step, AdamW's 10th.
  budget = f"{10 * PLAIN:.3g}"
  rows = [l for l in captured.out.splitlines() if l.startswith("| fixed")]
  assert rows == [
      f"| fixed_length / tiny / gelu | AdamW, 10 steps | 2 | {budget} |"
      f" 4.0500 | {budget} | 4.0500 |",
      f"| fixed_length / tiny / gelu | AdamW, 20 steps | 2 |"
      f" {20 * PLAIN:.3g} | 3.8500 | {budget} | 4.0500 |",
      f"| fixed_length / tiny / gelu | SAM ρ=0.1, 10 steps | 2 |"
      f" {20 * PLAIN:.3g} | 3.9500 | {budget} | 4.4500 |",
  ]


def test_plot_flops_bad_input(tmp_path, capsys):
  from scripts import plot_flops

  assert plot_flops.main([str(tmp_path)]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("plot_flops: error: no finished")
  assert plot_flops.main([str(tmp_path / "missing")]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "is not a directory" in err[0]
  with pytest.raises(SystemExit) as e:
    plot_flops.main([str(tmp_path), "--nope"])
  err = capsys.readouterr().err.strip().splitlines()
  assert e.value.code == 2 and len(err) == 1
