"""What SAM buys at equal compute, in miniature (docs/sam_buys.md).

On the miniature setting (configs/miniature.py) and the miniature study's
evaluation seeds 1-3 (nanodo_sam/sam_buys.py has the design):
  1. pretraining: AdamW, SAM (rho 0.1) and Precond Func-SAM (rho 1), the
     rhos the miniature study chose; AdamW for SAM's compute
     ("compute_matched": twice the steps, the schedule stretched); the
     Momentum-SAM rho grid at the tuning seed 0, then Momentum-SAM at the
     best of it;
  2. once a pretraining run has finished: the same run trained further on
     tiny_shakespeare (configs/continued.py, init_from), its C4 eval loss
     logged as eval_c4/loss.

The local launcher expands the sweep again after each pass, so one command
runs every stage (and resumes after a kill):

  nanodo-sam sweep configs/sweeps/sam_buys.py --backend=local
  python scripts/sam_buys.py runs/sam_buys     # -> docs/sam_buys.md
"""

from nanodo_sam import sam_buys as study
from nanodo_sam.sweep_spec import SweepSpec


def get_sweep(out: str | None = None) -> SweepSpec:
  """Every run whose inputs exist in `out` (the sweep's output folder)."""
  grid = [
      study.arm_overrides("momentum_sam", study.TUNING_SEED, rho)
      for rho in study.MOMENTUM_GRID
  ]
  pretrained = [o for _, o in study.pretrained_runs(out)]
  continued = [
      study.continued_overrides(out, o)
      for o in pretrained
      if out and study.completed(study.results(out, o))
  ]
  return SweepSpec(
      name="sam_buys",
      config=study.CONFIG,
      runs=grid + pretrained + continued,
  )
