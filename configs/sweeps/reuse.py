"""What the cheap variants buy: every_k and LookSAM-style reuse.

Precond Functional SAM (rho 0.5) taken every k-th step, k in {1, 2, 5, 10},
the steps in between either plain AdamW steps (`sam.every_k` alone) or plain
steps corrected by the last measured (method gradient - g), rescaled to the
current ||g|| (`sam.reuse=True`); next to AdamW. The model and data are
configs/late_phase.py's (D64 H2 N2, V = 32,101, the C4 subset shipped with the package,
8 x 64 tokens per step) at a switch of 0 (the method from step 0), trained
for 800 steps (about 0.8 epochs of the subset's ~0.5M tokens). Cost is in
AdamW-step equivalents (a full step 2, a plain or reuse step 1) and in the
step times `nanodo-sam bench` measures side by side (the command is in
docs/benchmarks.md, with the results; 63 minutes on 2 CPU cores):

  nanodo-sam sweep configs/sweeps/reuse.py --backend=local \
      --env=JAX_COMPILATION_CACHE_DIR=$PWD/runs/jax_cache
  python scripts/plot_reuse.py runs/reuse/*/ --bench=bench_reuse.json --table
"""

from nanodo_sam.sweep_spec import SweepSpec

CONFIG = "configs/late_phase.py:0.0"
METHOD, RHO = "precond_functional_sam", 0.5
KS = (2, 5, 10)
SEEDS = (0, 1)
COMMON = {
    "opt.num_train_steps": 800,
    "opt.warmup_steps": 80,
    "eval_every_steps": 200,
    "log_every_steps": 100,
}


def get_sweep():
  runs = []
  for seed in SEEDS:
    runs.append({"sam.method": "adamw", "sam.rho": 0.0, "seed": seed})
    runs.append({"sam.method": METHOD, "sam.rho": RHO, "seed": seed})
    for k in KS:
      for reuse in (False, True):
        runs.append(
            {
                "sam.method": METHOD,
                "sam.rho": RHO,
                "sam.every_k": k,
                "sam.reuse": reuse,
                "seed": seed,
            }
        )
  return SweepSpec(name="reuse", config=CONFIG, overrides=COMMON, runs=runs)
