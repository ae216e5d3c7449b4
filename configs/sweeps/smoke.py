"""A small end-to-end demonstration on CPU (19m51s measured on 2 CPU cores
shared with other jobs, load average ~8; less on an idle machine).

A tiny Nanodo (D64 H2 N2, 98,624 non-embedding parameters, V = 32,101 T5
SentencePiece vocabulary) on the C4 subset shipped with the package, 200 steps of 8 x 64
tokens; SAM and Precond Functional SAM x rho in {0.1, 0.5} x one seed, with
sharpness diagnostics (tau decomposition) every 50 steps.

  nanodo-sam sweep configs/sweeps/smoke.py --backend=local --parallel=1
  nanodo-sam tables runs/smoke
  python scripts/plot_eval_curves.py runs/smoke
  python scripts/plot_rho.py runs/smoke
  python scripts/plot_taus.py runs/smoke/*
"""

from nanodo_sam.sweep_spec import SweepSpec, method_runs

COMMON = {
    "schedule_name": "smoke",
    "model.size_name": "smoke",
    "model.D": 64,
    "model.H": 2,
    "model.N": 2,
    "model.F": 256,
    "model.L": 64,
    "model.dtype": "float32",  # CPU: bfloat16 (the C4 configs') is emulated.
    "data.use_shipped": True,  # The shipped C4 subset (the config: full C4).
    "data.batch_size": 8,
    "data.eval_batch_size": 8,
    "data.eval_steps": 4,
    "opt.num_train_steps": 200,
    "opt.warmup_steps": 20,
    "eval_every_steps": 50,
    "checkpoint_every_steps": 200,
    "log_every_steps": 25,
    "diagnostics.every_steps": 50,
    "diagnostics.batch_size": 4,
    "diagnostics.num_iters": 4,
    "diagnostics.num_probes": 1,
}


def get_sweep():
  return SweepSpec(
      name="smoke",
      config="configs/c4_fixed_length.py:2M",
      overrides=COMMON,
      runs=method_runs(
          ("sam", "precond_functional_sam"),
          (0.1, 0.5),
          learning_rates=(3e-3,),
          seeds=(0,),
      ),
  )
