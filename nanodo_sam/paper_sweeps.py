"""Shared pieces of the paper's sweeps: sizes, methods, rho grids, seeds.

rho grids are centred on the paper's best values where it gives them: 0.1 for
SAM at every size (section 5.4: "the smallest nonzero perturbation radius
considered"), and 0.5, 0.5, 0.4, 0.4 for Precond Functional-SAM at 23.9M,
42.5M, 117.9M, 1208M. Methods/sizes without a published value get the wide
grid WIDE_RHOS. At 1208M (the paper tuned rho "at a much coarser level" there)
only the centre is run, to keep the cost down. The learning rate is the
paper's globally tuned 1e-3; widen LEARNING_RATES to sweep it too. The
sweep files of the paper's tables (configs/sweeps/table*.py) are built from
these.
"""

from nanodo_sam import paper
from nanodo_sam.sweep_spec import around, method_runs

FIXED_LENGTH = "configs/c4_fixed_length.py"
CHINCHILLA = "configs/c4_chinchilla.py"
# Tables 2 and 3's sizes and methods, in the paper's order (paper.json).
SIZES = paper.column("table2", "size")
TABLE_METHODS = paper.column("table2", "method")
LEARNING_RATES = (1e-3,)
WIDE_RHOS = (0.05, 0.1, 0.2, 0.4, 0.8)
COARSE_SIZES = ("1208M",)

PAPER_BEST_RHO = {
    "sam": {"2M": 0.1, "23.9M": 0.1, "42.5M": 0.1, "117.9M": 0.1, "1208M": 0.1},
    "precond_functional_sam": {
        "23.9M": 0.5,
        "42.5M": 0.5,
        "117.9M": 0.4,
        "1208M": 0.4,
    },
}
# Our choice where the paper gives no value (coarse sizes only).
COARSE_DEFAULT_RHO = {
    "precond_sam": 0.2,
    "functional_sam": 0.2,
    "precond_functional_sam": 0.4,
}


def rho_grid(method: str, size: str) -> list[float]:
  """The rho values swept for `method` at `size` (none for AdamW)."""
  if method == "adamw":
    return []
  center = PAPER_BEST_RHO.get(method, {}).get(size)
  if size in COARSE_SIZES:
    return [center if center is not None else COARSE_DEFAULT_RHO[method]]
  if center is None:
    return list(WIDE_RHOS)
  return around(center, (0.5, 1.0, 2.0))


def size_runs(config: str, seeds=(0,)) -> list[dict]:
  """Tables 2 and 3's grid: every size x method x rho x learning rate x
  seed, each run on `config` at its size."""
  runs = []
  for size in SIZES:
    runs += method_runs(
        TABLE_METHODS,
        {m: rho_grid(m, size) for m in TABLE_METHODS},
        learning_rates=LEARNING_RATES,
        seeds=seeds,
        fixed={"config": f"{config}:{size}"},
    )
  return runs
