"""The paper in miniature (docs/miniature.md): every run of the study.

The model and data are configs/miniature.py's (Nanodo's defaults, D64 N2 on
the C4 subset shipped with the package). Two stages, both in this one file:

  1. Needs nothing:
     - AdamW, C4 SentencePiece vocabulary, seeds 0-3, the logit/functional
       split of the sharpness gradient (tau_logit, tau_func, tau_cross along
       g and along AdamW's P^-1 g) every 20 steps (configs/miniature.py:taus):
       Figures 2 and 4, appendix B;
     - the same with the byte vocabulary (V = 259), seeds 0-3: does
       tau_logit's dominance depend on the number of outputs?
     - the rho grid at seed 0 (the tuning seed; Figure 3 at equal compute):
       GRID, centred on the paper's best values (SAM 0.1, Precond Func-SAM
       0.5; Precond SAM and Func-SAM, for which the paper gives none, on
       nanodo_sam/paper_sweeps.py's default 0.2), x {0.5, 1, 2}, wider for
       SAM and Precond Func-SAM.
  2. Once every grid run has finished: each SAM-family method at the rho
     with the lowest final eval loss at seed 0, on seeds 1-3 (Table 1's
     paired comparison with AdamW on the same seeds; the tuning seed is not
     one of them, so choosing the rho does not bias the comparison).

The local launcher expands a sweep again after each pass, so one command runs
both stages (and resumes either after a kill):

  nanodo-sam sweep configs/sweeps/miniature.py --backend=local \\
      --env=JAX_COMPILATION_CACHE_DIR=$PWD/runs/jax_cache
  python scripts/miniature.py runs/miniature     # -> docs/miniature.md
"""

import json
import math
import os

from nanodo_sam.sweep_spec import SweepSpec

CONFIG = "configs/miniature.py"
METHODS = ("sam", "precond_sam", "functional_sam", "precond_functional_sam")
GRID = {
    "sam": (0.05, 0.1, 0.2, 0.4),
    "precond_sam": (0.1, 0.2, 0.4),
    "functional_sam": (0.1, 0.2, 0.4),
    "precond_functional_sam": (0.25, 0.5, 1.0, 2.0),
}
TUNING_SEED = 0
EVAL_SEEDS = (1, 2, 3)


def _results(out: str) -> list[tuple[dict, dict]]:
  """(config, results) of every finished run under `out`."""
  found = []
  if not os.path.isdir(out):
    return found
  for name in sorted(os.listdir(out)):
    cfg_path = os.path.join(out, name, "config.json")
    res_path = os.path.join(out, name, "results.json")
    if os.path.isfile(cfg_path) and os.path.isfile(res_path):
      with open(cfg_path) as f, open(res_path) as g:
        found.append((json.load(f), json.load(g)))
  return found


def best_rhos(out: str) -> dict[str, float]:
  """{method: rho with the lowest final eval loss at the tuning seed}, for
  the methods whose whole grid has finished (a diverged run counts as +inf)."""
  losses = {m: {} for m in METHODS}
  for cfg, res in _results(out):
    method, rho = cfg["sam"]["method"], cfg["sam"]["rho"]
    if (method in losses and cfg["seed"] == TUNING_SEED
        and cfg["model"]["V"] > 259 and rho in GRID[method]):
      loss = res.get("final_eval_loss")
      ok = isinstance(loss, (int, float)) and math.isfinite(loss)
      losses[method][rho] = loss if ok else math.inf
  return {m: min(GRID[m], key=lambda r, m=m: losses[m][r])
          for m in METHODS if set(losses[m]) == set(GRID[m])}


def get_sweep(out: str | None = None) -> SweepSpec:
  """Stage 1, plus stage 2 for each method whose grid has finished in `out`
  (the launcher passes the sweep's output folder)."""
  runs = []
  for seed in (TUNING_SEED,) + EVAL_SEEDS:
    for options in ("taus", "byte+taus"):
      runs.append({"config": f"{CONFIG}:{options}", "sam.method": "adamw",
                   "seed": seed})
  for method in METHODS:
    for rho in GRID[method]:
      runs.append({"sam.method": method, "sam.rho": rho,
                   "seed": TUNING_SEED})
  for method, rho in (best_rhos(out) if out else {}).items():
    for seed in EVAL_SEEDS:
      runs.append({"sam.method": method, "sam.rho": rho, "seed": seed})
  return SweepSpec(name="miniature", config=CONFIG, runs=runs)
