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

The methods, rho grid and seeds are nanodo_sam/miniature.py's (the report
reads them too).
"""

from nanodo_sam import miniature as study
from nanodo_sam.sweep_spec import SweepSpec

CONFIG = "configs/miniature.py"


def get_sweep(out: str | None = None) -> SweepSpec:
  """Stage 1, plus stage 2 for each method whose grid has finished in `out`
  (the launcher passes the sweep's output folder)."""
  runs = []
  for seed in (study.TUNING_SEED,) + study.EVAL_SEEDS:
    for options in ("taus", "byte+taus"):
      runs.append(
          {"config": f"{CONFIG}:{options}", "sam.method": "adamw", "seed": seed}
      )
  for method in study.METHODS:
    for rho in study.GRID[method]:
      runs.append(
          {"sam.method": method, "sam.rho": rho, "seed": study.TUNING_SEED}
      )
  for method, rho in (study.best_rhos(out) if out else {}).items():
    for seed in study.EVAL_SEEDS:
      runs.append({"sam.method": method, "sam.rho": rho, "seed": seed})
  return SweepSpec(name="miniature", config=CONFIG, runs=runs)
