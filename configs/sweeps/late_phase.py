"""Late-phase SAM (Zhou et al. 2025) on a small C4 model: the switch points.

AdamW until sam.start_step, then SAM (rho 0.1) or Precond Functional SAM
(rho 0.5) until the end, for a switch at 0%, 50%, 75% and 90% of the 200
steps of configs/late_phase.py; the 100% point is AdamW throughout (the same
run for both methods, so it is trained once). 9 runs and their analyses took
21 CPU-minutes on 2 cores (with the JAX compilation cache); results in
docs/experiments.md:

  nanodo-sam sweep configs/sweeps/late_phase.py --backend=local \
      --env=JAX_COMPILATION_CACHE_DIR=$PWD/runs/jax_cache
  for run in runs/late_phase/*/; do nanodo-sam analyze --workdir=$run; done
  python scripts/plot_late_phase.py runs/late_phase/* --out=late_phase.png

Run names start with the switch fraction (`0.75-sam-rho0.1`).
"""

from nanodo_sam.sweep_spec import SweepSpec

CONFIG = "configs/late_phase.py"
METHODS = ("sam", "precond_functional_sam")
RHO = {"sam": 0.1, "precond_functional_sam": 0.5}  # The paper's best values.
FRACTIONS = (0.0, 0.5, 0.75, 0.9)  # And 1.0: AdamW throughout.


def get_sweep():
  runs = [
      {"config": f"{CONFIG}:{f}", "sam.method": m, "sam.rho": RHO[m]}
      for m in METHODS
      for f in FRACTIONS
  ]
  runs.append(
      {"config": f"{CONFIG}:1.0", "sam.method": "adamw", "sam.rho": 0.0}
  )
  return SweepSpec(name="late_phase", config=CONFIG, runs=runs)
