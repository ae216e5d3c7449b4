"""Long & Bartlett's (2024) tiny_shakespeare grid: SAM with SGD at every
learning rate eta in {0.01, 0.02, 0.05, 0.1, 0.2, 0.5} x rho in {0, 0.1, 0.3,
1.0} (rho = 0 is plain SGD), one seed; 24 runs of configs/edge_of_stability.py
(6 layers, width 128, batch 128, 20K steps, lambda_max every 100 steps).

  nanodo-sam sweep configs/sweeps/edge_of_stability.py --backend=local
  python scripts/plot_edge_of_stability.py runs/edge_of_stability/* \
      --out=runs/edge_of_stability/eos.png

The CPU-sized version is configs/sweeps/edge_of_stability_reduced.py.
"""

from nanodo_sam.sweep_spec import SweepSpec, method_runs

LEARNING_RATES = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5)
RHOS = (0.0, 0.1, 0.3, 1.0)


def get_sweep():
  return SweepSpec(
      name="edge_of_stability",
      config="configs/edge_of_stability.py",
      runs=method_runs(
          ("sam",), RHOS, learning_rates=LEARNING_RATES, seeds=(0,)
      ),
  )
