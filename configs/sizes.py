"""The paper's five model sizes (appendix A.1), selectable by name.

Sizes are named by their non-embedding parameter count
N*(4D^2 + 2DF + 2D) + D (attention, MLP and LayerNorm scales; DESIGN.md):

    name     D     H   N   F       non-embedding   + embeddings (V=32101, L=512)
    2M       256   4   3   1024        2,361,088        10,710,016
    23.9M    576   9   6   2304       23,895,360        42,680,448
    42.5M    768   12  6   3072       42,477,312        67,524,096
    117.9M   1280  20  6   5120      117,981,440       159,726,080
    1208M    4096  64  6   16384   1,208,012,800     1,341,595,648

23.9M..1208M have depth 6 and width D = 64 H (head dim 64), F = 4D; the 2M
prototyping model has depth 3, 4 heads, D = 256, F = 1024.

Use as a config (base config + that size):
  nanodo-sam params --config=configs/sizes.py:23.9M
or from another config file: `sizes.apply(c, "23.9M")`.
"""

from __future__ import annotations

import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:  # `from configs import ...` from any directory.
  sys.path.insert(0, _ROOT)

from nanodo_sam import keys  # pylint: disable=g-import-not-at-top
from nanodo_sam.config import PAPER_SIZES as SIZES  # pylint: disable=g-import-not-at-top
DEFAULT = "2M"


def resolve(name: str) -> str:
  """The canonical size name ('23.9m', '23.9M ' -> '23.9M'); ValueError if
  unknown."""
  key = str(name).strip()
  for k in SIZES:
    if k.lower() == key.lower():
      return k
  raise ValueError(f"unknown model size {name!r}; use one of "
                   f"{', '.join(SIZES)} (configs/sizes.py)")


def non_embedding_params(name: str) -> int:
  s = SIZES[resolve(name)]
  return s["N"] * (4 * s["D"]**2 + 2 * s["D"] * s["F"] + 2 * s["D"]) + s["D"]


def embedding_params(name: str, V: int = 32101, L: int = 512) -> int:
  """Token embedding (tied with the output layer) + learned positions."""
  return (V + L) * SIZES[resolve(name)]["D"]


def total_params(name: str, V: int = 32101, L: int = 512) -> int:
  return non_embedding_params(name) + embedding_params(name, V, L)


def apply(c, name: str):
  """Sets c.model.{D,H,N,F,size_name} to the paper size `name`; returns c."""
  name = resolve(name)
  c.model.update(SIZES[name])
  c.model.size_name = name
  return c


def get_config(size: str = DEFAULT):
  """The base config (configs/base.py) at model size `size`."""
  return apply(keys.defaults(), size or DEFAULT)
