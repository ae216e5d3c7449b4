"""Figure 3: eval loss vs rho for SAM and Precond Functional SAM at equal
compute (23.9M, fixed-length 10K steps), with AdamW as the rho = 0 reference.
Plot with scripts/plot_rho.py. METHODS may name any of sam.METHODS (e.g. the
variants of docs/sam_variants.md: gsam gets sam.alpha, angle_sam sam.phi at
the sweeps' defaults, `sweep_spec.method_options`)."""

from nanodo_sam import paper_sweeps as common
from nanodo_sam.sweep_spec import SweepSpec, method_runs

RHOS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0)
SEEDS = (0,)
METHODS = ("adamw", "sam", "precond_functional_sam")


def get_sweep():
  return SweepSpec(
      name="rho_sweep",
      config=common.FIXED_LENGTH + ":23.9M",
      runs=method_runs(
          METHODS, RHOS, learning_rates=common.LEARNING_RATES, seeds=SEEDS
      ),
  )
