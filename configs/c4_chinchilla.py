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

Everything else is configs/c4_fixed_length.py (AdamW lr 1e-3, wd 0.1, batch
256 x 512, C4 with the T5 vocabulary); warmup is 10% of the steps (<= 1000).
"""

import math
import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:  # `from configs import ...` from any directory.
  sys.path.insert(0, _ROOT)

from configs import c4_fixed_length  # pylint: disable=g-import-not-at-top
from configs import sizes  # pylint: disable=g-import-not-at-top

SCHEDULE_NAME = "chinchilla"
TOKENS_PER_PARAM = 20
PARAM_COUNTS = ("non_embedding", "total")


def param_count(size: str, which: str = "non_embedding", V: int = 32101,
                L: int = 512) -> int:
  if which not in PARAM_COUNTS:
    raise ValueError(f"chinchilla_params={which!r} is unknown; use one of "
                     f"{', '.join(PARAM_COUNTS)} (e.g. "
                     "--config=configs/c4_chinchilla.py:23.9M,total)")
  if which == "total":
    return sizes.total_params(size, V, L)
  return sizes.non_embedding_params(size)


def chinchilla_steps(size: str, which: str = "non_embedding",
                     tokens_per_step: int = 256 * 512) -> int:
  """ceil(20 * P / tokens_per_step)."""
  return math.ceil(TOKENS_PER_PARAM * param_count(size, which) /
                   tokens_per_step)


def get_config(arg: str = sizes.DEFAULT):
  """arg: 'SIZE' or 'SIZE,non_embedding' or 'SIZE,total'."""
  size, _, which = (arg or sizes.DEFAULT).partition(",")
  which = which.strip() or "non_embedding"
  c = c4_fixed_length.c4_config(size)
  c.schedule_name = SCHEDULE_NAME
  c.chinchilla_params = which
  steps = chinchilla_steps(c.model.size_name, which,
                           c.data.batch_size * c.model.L)
  c.opt.num_train_steps = steps
  c.opt.warmup_steps = c4_fixed_length.warmup_steps(steps)
  c.eval_every_steps = max(steps // 20, 1)
  return c
