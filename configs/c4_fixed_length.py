"""Fixed-length training on C4 (paper section 5.1(a), Tables 1, 2 and 5).

Every size trains 10K steps of 256 sequences x 512 tokens (131,072 tokens per
step, ~1.31B tokens), AdamW with peak learning rate 1e-3 and weight decay
1e-4 per step at the peak (the paper's "decoupled weight decay 1e-4"; 0.1 in
optax's convention at lr 1e-3, the paper's other statement), on C4
`c4/en:3.1.0` with the T5 SentencePiece vocabulary; evaluation on C4
validation, one document per row (Nanodo's evaluator).

The size is the config argument (default 2M; names in nanodo_sam/sizes.py):
  nanodo-sam train --config=configs/c4_fixed_length.py:23.9M --workdir=DIR

Not stated in the paper, Nanodo's defaults (configs/base.py, docs/fidelity.md):
bfloat16 compute with a float32 residual stream, xavier_uniform kernels, AdamW b2 0.98
and eps 1e-9, warmup from and cosine decay to peak / 10, documents framed
BOS + ids + EOS, no gradient clipping. Our choices: linear warmup over the
first 10% of the steps (at most 1000) and an evaluation set of 64 x 64
validation documents every 500 steps.
"""

from nanodo_sam import keys
from nanodo_sam import sizes

SCHEDULE_NAME = "fixed_length"
NUM_TRAIN_STEPS = 10_000


def c4_config(size: str = sizes.DEFAULT):
  """The settings both C4 schedules share, at model size `size`."""
  c = sizes.apply(keys.defaults(), size or sizes.DEFAULT)
  c.data.tfds_name = "c4/en:3.1.0"
  c.data.train_split = "train"
  c.data.eval_split = "validation"
  # c.data.vocab: the T5 C4 SentencePiece model (base default path).
  c.model.L = 512
  c.model.V = 32101
  # Nanodo's default config computes in bfloat16 (embeddings, residual stream
  # and output layer stay float32; the diagnostics always run in float32).
  c.model.dtype = "bfloat16"
  c.data.batch_size = 256
  # Auto: the fewest microbatches whose compiled step fits a device's memory
  # (state.setup picks and logs it; the result equals the whole batch's).
  c.grad_accumulation_steps = 0
  c.data.eval_batch_size = 64
  c.data.eval_steps = 64
  c.opt.optimizer = "adamw"
  c.opt.peak_learning_rate = 1e-3
  c.opt.weight_decay = 1e-4  # Per step at the peak learning rate.
  c.opt.independent_weight_decay = True
  c.opt.decay_type = "cosine"
  c.checkpoint_every_steps = 1000
  c.log_every_steps = 50
  return c


def get_config(size: str = sizes.DEFAULT):
  c = c4_config(size)
  c.schedule_name = SCHEDULE_NAME
  c.opt.num_train_steps = NUM_TRAIN_STEPS
  c.opt.warmup_steps = sizes.warmup_steps(NUM_TRAIN_STEPS)
  c.eval_every_steps = 500
  return c
