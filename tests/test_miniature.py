"""The miniature study's path from runs to report, on tiny real runs.

Trains the study's runs shrunk to seconds (a smaller rho grid, one evaluation
seed, a 16-wide model, 6 steps), then runs the report (nanodo_sam/miniature.py,
scripts/miniature.py) on them: it
must analyse the Table 1 runs, write every claim with the numbers the runs
produced, draw the figures, and not repeat the analysis when run again.
"""

import json
import os

import pytest

# The study's runs and report end to end (minutes on 2 cores).
pytestmark = pytest.mark.slow


TINY = {
    "model.D": 16,
    "model.N": 1,
    "model.H": 1,
    "model.F": 32,
    "model.L": 16,
    "data.batch_size": 4,
    "data.eval_batch_size": 4,
    "data.eval_steps": 1,
    "opt.num_train_steps": 4,
    "opt.warmup_steps": 1,
    "eval_every_steps": 2,
    "log_every_steps": 2,
    "diagnostics.batch_size": 2,
}


def _config(options: str, **overrides):
  from configs import miniature

  c = miniature.get_config(options)
  for key, value in {**TINY, **overrides}.items():
    section, _, name = key.rpartition(".")
    (c[section] if section else c)[name] = value
  if c.diagnostics.every_steps:
    c.diagnostics.every_steps = 2
  return c


@pytest.fixture(scope="module")
def study(tmp_path_factory):
  from nanodo_sam import miniature as sweep  # The study's grid and seeds.
  from nanodo_sam import train as train_lib

  mp = pytest.MonkeyPatch()
  mp.setattr(sweep, "METHODS", ("sam", "precond_functional_sam"))
  mp.setattr(
      sweep, "GRID", {"sam": (0.05, 0.2), "precond_functional_sam": (0.5,)}
  )
  mp.setattr(sweep, "EVAL_SEEDS", (1,))
  from nanodo_sam import miniature

  mp.setattr(miniature, "ANALYZE", {"num_iters": 3, "num_probes": 2})
  out = tmp_path_factory.mktemp("miniature")
  runs = {}

  def train(name, options, **overrides):
    cfg = _config(options, **overrides)
    runs[name] = train_lib.train(cfg, str(out / name))

  for seed in (0, 1):
    train(f"taus-adamw-seed{seed}", "taus", seed=seed)
  train("byte-adamw-seed0", "byte+taus", seed=0)
  for method, rhos in sweep.GRID.items():
    for rho in rhos:
      train(
          f"{method}-rho{rho}-seed0",
          "",
          **{"sam.method": method, "sam.rho": rho, "seed": 0},
      )
  best = sweep.best_rhos(str(out))
  assert set(best) == {"sam", "precond_functional_sam"}
  for method, rho in best.items():
    train(
        f"{method}-rho{rho}-seed1",
        "",
        **{"sam.method": method, "sam.rho": rho, "seed": 1},
    )
  yield out, runs, best, sweep
  mp.undo()


def test_report_from_runs(study, tmp_path):
  from scripts import miniature  # The study's report, on top of the commands.

  out, runs, best, _ = study
  doc = tmp_path / "miniature.md"
  assert miniature.main([str(out), f"--doc={doc}"]) == 0
  text = doc.read_text()
  for title in (
      "Figures 2, 4",
      "Why: the number of outputs",
      "Appendix B",
      "Table 1",
      "Figure 3",
      "Table 4",
      "Figure 5",
  ):
    assert f"## {title}" in text
  assert text.count("**Verdict: ") == 7
  # The Table 1 rows hold the runs' own final eval losses.
  for name in ("taus-adamw-seed1",) + tuple(
      f"{m}-rho{r}-seed1" for m, r in best.items()
  ):
    assert f"{runs[name]['final_eval_loss']:.4f}" in text
    sharp = json.loads((out / name / "sharpness.json").read_text())
    assert {"lambda_max", "hessian_trace", "tau_func_precond"} <= set(sharp)
    assert (out / name / "prune.json").is_file()
  # The grid runs at seed 0 are Figure 3's points.
  sam = runs["sam-rho0.2-seed0"]["final_eval_loss"]
  base = runs["taus-adamw-seed0"]["final_eval_loss"]
  assert f"rho 0.2: {sam - base:+.4f}" in text
  for fig in (
      "miniature_taus.png",
      "miniature_rho.png",
      "miniature_pruning.png",
  ):
    assert (tmp_path / fig).stat().st_size > 1000
  # A second call reuses the analysis it already ran.
  memo = json.loads((out / "miniature_report.json").read_text())
  assert memo["train_tokens"] > 0 and len(memo["analysis_seconds"]) == 3
  mtime = os.path.getmtime(out / "taus-adamw-seed1" / "sharpness.json")
  assert miniature.main([str(out), f"--doc={doc}"]) == 0
  assert json.loads((out / "miniature_report.json").read_text()) == memo
  assert os.path.getmtime(out / "taus-adamw-seed1" / "sharpness.json") == mtime


def test_best_rho_is_chosen_on_the_tuning_seed_only(study):
  out, runs, best, sweep = study
  for method, rho in best.items():
    losses = {
        r: runs[f"{method}-rho{r}-seed0"]["final_eval_loss"]
        for r in sweep.GRID[method]
    }
    assert rho == min(losses, key=losses.get)
