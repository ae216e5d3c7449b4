"""Table 2: four sizes x four methods, fixed-length training (10K steps).

Sizes 23.9M, 42.5M, 117.9M, 1208M; Precond Functional SAM, Precond SAM, SAM,
AdamW; rho grids from nanodo_sam/paper_sweeps.py (centred on the paper's best
values); one seed (raise SEEDS for error bars).
"""

from nanodo_sam import paper_sweeps as common
from nanodo_sam.sweep_spec import SweepSpec

SEEDS = (0,)


def get_sweep():
  return SweepSpec(
      name="table2",
      config=common.FIXED_LENGTH,
      runs=common.size_runs(common.FIXED_LENGTH, SEEDS),
  )
