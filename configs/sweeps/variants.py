"""ASAM, GSAM and Momentum-SAM beside AdamW, SAM and Precond Func-SAM in the
miniature setting (configs/miniature.py; docs/sam_variants.md).

Each new method at three rhos of the miniature study's grids (docs/miniature.md)
and the baselines at the miniature study's best rho at seed 0 (SAM 0.1,
Precond Func-SAM 1.0), all on seeds 0 and 1:

  adaptive_sam  0.5, 1, 2      ASAM's rho is in theta / T's coordinates, so
                               ||eps|| ~ rho |theta|: Kwon et al. use about
                               10x SAM's rho
  gsam          0.05, 0.1, 0.2 SAM's grid; alpha 0.2, rho following the
                               learning rate down to 0 (GSAM's schedule)
  momentum_sam  0.1, 0.2, 0.4  SAM's grid, shifted up one step

Runs are ordered so that whatever has finished is a comparison: seed 0 of
every setting first, baselines first.

  nanodo-sam sweep configs/sweeps/variants.py --backend=local \\
      --out=runs/variants --env=JAX_COMPILATION_CACHE_DIR=$PWD/runs/jax_cache
  python scripts/variants_table.py runs/variants
"""

from nanodo_sam.sweep_spec import SweepSpec

CONFIG = "configs/miniature.py"
GSAM_ALPHA = 0.2
BASELINES = (("adamw", 0.0), ("sam", 0.1), ("precond_functional_sam", 1.0))
GRID = {
    "adaptive_sam": (1.0, 0.5, 2.0),
    "gsam": (0.1, 0.05, 0.2),
    "momentum_sam": (0.2, 0.1, 0.4),
}
SEEDS = (0, 1)
EXTRA = {"gsam": {"sam.alpha": GSAM_ALPHA, "sam.rho_schedule": "lr"}}


def get_sweep() -> SweepSpec:
  runs = []
  for seed in SEEDS:
    for method, rho in BASELINES:
      runs.append({"sam.method": method, "sam.rho": rho, "seed": seed})
    for i in range(3):  # The middle rho of every method first.
      for method, rhos in GRID.items():
        runs.append(
            {
                "sam.method": method,
                "sam.rho": rhos[i],
                "seed": seed,
                **EXTRA.get(method, {}),
            }
        )
  return SweepSpec(name="variants", config=CONFIG, runs=runs)
