"""Table 5: GeLU vs ReLU at 2M, fixed-length, for Precond Functional SAM,
Precond SAM and AdamW (3 seeds): the rows of Table 5 in
nanodo_sam/paper.json."""

from nanodo_sam import paper
from nanodo_sam import paper_sweeps as common
from nanodo_sam.sweep_spec import SweepSpec, method_runs

METHODS = paper.column("table5", "method")
SEEDS = (0, 1, 2)


def get_sweep():
  runs = []
  for nonlinearity in paper.column("table5", "nonlinearity"):
    runs += method_runs(
        METHODS,
        {m: common.rho_grid(m, "2M") for m in METHODS},
        learning_rates=common.LEARNING_RATES,
        seeds=SEEDS,
        fixed={"model.nonlinearity": nonlinearity},
    )
  return SweepSpec(name="table5", config=common.FIXED_LENGTH + ":2M", runs=runs)
