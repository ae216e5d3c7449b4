"""Late-phase SAM (Zhou et al., ICLR 2025) on a small C4 model.

Zhou, Wang, Mao, Li and Yan, "Sharpness-Aware Minimization Efficiently
Selects Flatter Minima Late in Training" (ICLR 2025).

Their finding (on CIFAR with SGD): switching from the plain optimizer to SAM
only for the last few epochs reaches nearly the flat minima and the test
accuracy of SAM run throughout, at a fraction of SAM's cost. Here the same
question for a language model: AdamW for the first `sam.start_step` steps,
then a SAM-family gradient (sam or precond_functional_sam) until the end; the
optimizer state carries across the switch, and a step before the switch costs
exactly one AdamW step (nanodo_sam.sam_schedule.uses_sam_step picks the compiled
plain step on the host).

The model is tiny (D64 H2 N2 F256, 98,624 non-embedding parameters, rows of
64 tokens) on the C4 subset shipped with the package (c4/en:3.1.0, 1,000
train documents) with the T5 SentencePiece vocabulary (V = 32,101); 200
steps of 8 x 64 tokens, AdamW at peak learning rate 3e-3 with 20 warmup steps and cosine decay to 0,
weight decay 0.1 (optax convention), b2 = 0.95: the project's settings from
before its defaults became Nanodo's (`rundir.LEGACY_DEFAULTS`), with which the
results in docs/experiments.md and docs/benchmarks.md were measured. The switch point is the config
argument, as a fraction of the run (default 1.0: AdamW throughout):

  nanodo-sam train --config=configs/late_phase.py:0.75 --workdir=runs/lp \
      --config.sam.method=sam --config.sam.rho=0.1
  nanodo-sam analyze --workdir=runs/lp     # lambda_max, tr(H), eval loss

The sweep over switch points {0, 0.5, 0.75, 0.9, 1.0} x {sam,
precond_functional_sam} is configs/sweeps/late_phase.py; plot it with
scripts/plot_late_phase.py. Compute in AdamW-step equivalents: a step before
the switch counts 1, one after it 2 (both SAM-family methods take 2 forward
and 2 backward passes; nanodo_sam.sam_schedule.adamw_step_equivalents).
"""

from nanodo_sam import keys
from nanodo_sam import rundir

NUM_TRAIN_STEPS = 200


def switch_step(fraction: float, num_train_steps: int = NUM_TRAIN_STEPS) -> int:
  """sam.start_step for a switch at `fraction` of the run."""
  if not 0.0 <= fraction <= 1.0:
    raise ValueError(
        f"switch fraction {fraction!r} must lie in [0, 1]; use "
        "e.g. configs/late_phase.py:0.75"
    )
  return int(round(fraction * num_train_steps))


def get_config(arg: str = ""):
  try:
    fraction = float(arg) if arg else 1.0
  except ValueError:
    raise ValueError(
        f"config argument {arg!r} is not a switch fraction; use "
        "e.g. configs/late_phase.py:0.75"
    ) from None
  c = rundir.legacy_defaults(keys.defaults())
  c.schedule_name = "late_phase"
  c.model.update(D=64, H=2, N=2, F=256, L=64, V=32101)
  c.model.size_name = "late_phase"
  c.data.tfds_name = "c4/en:3.1.0"
  c.data.use_shipped = True  # The C4 subset shipped with the package.
  c.data.batch_size = 8
  c.data.eval_batch_size = 16
  c.data.eval_steps = 8  # 128 validation rows (8,192 tokens).
  c.opt.optimizer = "adamw"
  c.opt.num_train_steps = NUM_TRAIN_STEPS
  c.opt.warmup_steps = NUM_TRAIN_STEPS // 10
  c.opt.peak_learning_rate = 3e-3
  c.opt.decay_type = "cosine"
  c.opt.weight_decay = 0.1
  c.sam.method = "sam"
  c.sam.rho = 0.1  # The paper's best for SAM.
  c.sam.start_step = switch_step(fraction, NUM_TRAIN_STEPS)
  c.eval_every_steps = 50
  c.checkpoint_every_steps = 0  # Only the final one (for analyze).
  c.log_every_steps = 20
  # `nanodo-sam analyze` reads these: one fixed batch of 8 validation rows
  # (the same rows and, by the seed, the same Hutchinson probes in every run).
  c.diagnostics.num_batches = 1
  c.diagnostics.batch_size = 8
  c.diagnostics.num_iters = 16
  c.diagnostics.num_probes = 8
  return c
