"""The paper's five model sizes (appendix A.1) and the run lengths they get.

Sizes are named by their non-embedding parameter count
N*(4D^2 + 2DF + 2D) + D (attention, MLP and LayerNorm scales):

    name     D     H   N   F       non-embedding   + embeddings (V=32101, L=512)
    2M       256   4   3   1024        2,361,088        10,710,016
    23.9M    576   9   6   2304       23,895,360        42,680,448
    42.5M    768   12  6   3072       42,477,312        67,524,096
    117.9M   1280  20  6   5120      117,981,440       159,726,080
    1208M    4096  64  6   16384   1,208,012,800     1,341,595,648

23.9M..1208M have depth 6 and width D = 64 H (head dim 64), F = 4D; the 2M
prototyping model has depth 3, 4 heads, D = 256, F = 1024.

Chinchilla-style training (paper section 5.1(b)) runs
ceil(20 * P / tokens per step) steps, P the non-embedding count (or, as a
config choice, the total); both C4 schedules warm up over 10% of the steps,
at most 1000 (configs/c4_fixed_length.py, configs/c4_chinchilla.py).
"""

from __future__ import annotations

import math
import types

from nanodo_sam import model as model_lib

SIZES = {
    "2M": dict(D=256, H=4, N=3, F=1024),
    "23.9M": dict(D=576, H=9, N=6, F=2304),
    "42.5M": dict(D=768, H=12, N=6, F=3072),
    "117.9M": dict(D=1280, H=20, N=6, F=5120),
    "1208M": dict(D=4096, H=64, N=6, F=16384),
}
DEFAULT = "2M"
TOKENS_PER_PARAM = 20
PARAM_COUNTS = ("non_embedding", "total")


def resolve(name: str) -> str:
  """The canonical size name ('23.9m', '23.9M ' -> '23.9M'); ValueError if
  unknown."""
  key = str(name).strip()
  for k in SIZES:
    if k.lower() == key.lower():
      return k
  raise ValueError(
      f"unknown model size {name!r}; use one of "
      f"{', '.join(SIZES)} (nanodo_sam/sizes.py)"
  )


def non_embedding_params(name: str) -> int:
  return model_lib.non_embedding_params(
      types.SimpleNamespace(**SIZES[resolve(name)])
  )


def embedding_params(name: str, V: int = 32101, L: int = 512) -> int:
  """Token embedding (tied with the output layer) + learned positions."""
  return model_lib.embedding_params(
      types.SimpleNamespace(V=V, L=L, **SIZES[resolve(name)])
  )


def total_params(name: str, V: int = 32101, L: int = 512) -> int:
  return model_lib.total_params(
      types.SimpleNamespace(V=V, L=L, **SIZES[resolve(name)])
  )


def apply(c, name: str):
  """Sets c.model.{D,H,N,F,size_name} to the paper size `name`; returns c."""
  name = resolve(name)
  c.model.update(SIZES[name])
  c.model.size_name = name
  return c


def param_count(
    size: str, which: str = "non_embedding", V: int = 32101, L: int = 512
) -> int:
  """The P of the Chinchilla rule: non-embedding, or total parameters."""
  if which not in PARAM_COUNTS:
    raise ValueError(
        f"chinchilla_params={which!r} is unknown; use one of "
        f"{', '.join(PARAM_COUNTS)} (e.g. "
        "--config=configs/c4_chinchilla.py:23.9M,total)"
    )
  if which == "total":
    return total_params(size, V, L)
  return non_embedding_params(size)


def chinchilla_steps(
    size: str, which: str = "non_embedding", tokens_per_step: int = 256 * 512
) -> int:
  """ceil(20 * P / tokens_per_step)."""
  return math.ceil(
      TOKENS_PER_PARAM * param_count(size, which) / tokens_per_step
  )


def warmup_steps(num_train_steps: int) -> int:
  """10% of the run, capped at 1000 steps (our choice; the paper is silent)."""
  return max(1, min(1000, num_train_steps // 10))
