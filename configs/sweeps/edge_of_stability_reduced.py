"""The edge-of-stability study at CPU size: 2 learning rates x 3 rhos.

configs/edge_of_stability.py:reduced (2 layers, width 64, batch 32, 300 SGD
steps, lambda_max of the minibatch Hessian every 15 steps); eta in {0.2, 0.5}
(2/eta = 10 and 4), rho in {0, 0.3, 1.0}. 6 runs took 14 CPU-minutes on 2
cores; results in docs/experiments.md:

  nanodo-sam sweep configs/sweeps/edge_of_stability_reduced.py \
      --backend=local --env=JAX_COMPILATION_CACHE_DIR=runs/jax_cache
  python scripts/plot_edge_of_stability.py runs/edge_of_stability_reduced/* \
      --out=docs/edge_of_stability_reduced.png
"""

from nanodo_sam.sweep_spec import SweepSpec, method_runs

LEARNING_RATES = (0.2, 0.5)
RHOS = (0.0, 0.3, 1.0)


def get_sweep():
  return SweepSpec(
      name="edge_of_stability_reduced",
      config="configs/edge_of_stability.py:reduced",
      runs=method_runs(
          ("sam",), RHOS, learning_rates=LEARNING_RATES, seeds=(0,)
      ),
  )
