"""Chinchilla-style training on C4 (paper section 5.1(b), Tables 3, 4, 6).

The run length follows the Chinchilla 20x rule with the fixed-depth,
globally tuned learning-rate scheme of Everett et al. (2024):

    steps = ceil(20 * P / 131,072),   131,072 = 256 sequences x 512 tokens

where P is the non-embedding parameter count (the paper names its sizes by
it). The resulting step counts (tokens = 131,072 x steps):

    size     P (non-embedding)   steps     tokens
    2M           2,361,088          361      47.3M
    23.9M       23,895,360        3,647     478.0M
    42.5M       42,477,312        6,482     849.6M
    117.9M     117,981,440       18,003       2.36B
    1208M    1,208,012,800      184,329      24.16B

The parameter count is a config choice, given after the size:
`--config=configs/c4_chinchilla.py:23.9M,total` counts embeddings too
(P = non-embedding + (V + L) x D), giving 1,635 / 6,513 / 10,304 / 24,373 /
204,712 steps. `c.chinchilla_params` records which was used. Overriding
data.batch_size or model.* on the command line does not recompute the steps:
pass --config.opt.num_train_steps too.

Everything else is configs/c4_fixed_length.py's (AdamW lr 1e-3, wd 0.1, batch
256 x 512, C4 with the T5 vocabulary); warmup is 10% of the steps (<= 1000).
"""

import os

from nanodo_sam import config as config_lib
from nanodo_sam import sizes

SCHEDULE_NAME = "chinchilla"
FIXED_LENGTH = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "c4_fixed_length.py"
)


def get_config(arg: str = sizes.DEFAULT):
  """arg: 'SIZE' or 'SIZE,non_embedding' or 'SIZE,total'."""
  size, _, which = (arg or sizes.DEFAULT).partition(",")
  which = which.strip() or "non_embedding"
  sizes.param_count(size, which)  # A bad SIZE or count: its own error.
  c = config_lib.load_config_file(f"{FIXED_LENGTH}:{sizes.resolve(size)}")
  c.schedule_name = SCHEDULE_NAME
  c.chinchilla_params = which
  steps = sizes.chinchilla_steps(
      c.model.size_name, which, c.data.batch_size * c.model.L
  )
  c.opt.num_train_steps = steps
  c.opt.warmup_steps = sizes.warmup_steps(steps)
  c.eval_every_steps = max(steps // 20, 1)
  return c
