"""Table 2: four sizes x four methods, fixed-length training (10K steps).

Sizes 23.9M, 42.5M, 117.9M, 1208M; Precond Functional SAM, Precond SAM, SAM,
AdamW; rho grids from configs/sweeps/common.py (centred on the paper's best
values); one seed (raise SEEDS for error bars).
"""

from configs.sweeps import common
from configs.sweeps.authoring import SweepSpec, method_runs

SEEDS = (0,)


def size_runs(config: str, seeds=SEEDS) -> list[dict]:
  runs = []
  for size in common.SIZES:
    runs += method_runs(
        common.TABLE_METHODS,
        {m: common.rho_grid(m, size) for m in common.TABLE_METHODS},
        learning_rates=common.LEARNING_RATES, seeds=seeds,
        fixed={"config": f"{config}:{size}"})
  return runs


def get_sweep():
  return SweepSpec(name="table2", config=common.FIXED_LENGTH,
                   runs=size_runs(common.FIXED_LENGTH))
