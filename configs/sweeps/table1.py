"""Table 1: direct vs indirect paths at 2M, fixed-length (10K steps).

AdamW, SAM, Precond SAM, Functional SAM and Precond Functional SAM (the rows
of Table 1 in nanodo_sam/paper.json), each over its rho grid
(nanodo_sam/paper_sweeps.py) x learning rate x 3 seeds (the paper quotes seed
standard deviations in the fourth decimal).
  nanodo-sam sweep configs/sweeps/table1.py --backend=local --dry-run
"""

from nanodo_sam import paper
from nanodo_sam import paper_sweeps as common
from nanodo_sam.sweep_spec import SweepSpec, method_runs

METHODS = paper.column("table1", "method")
SEEDS = (0, 1, 2)


def get_sweep():
  return SweepSpec(
      name="table1",
      config=common.FIXED_LENGTH + ":2M",
      runs=method_runs(
          METHODS,
          {m: common.rho_grid(m, "2M") for m in METHODS},
          learning_rates=common.LEARNING_RATES,
          seeds=SEEDS,
      ),
  )
