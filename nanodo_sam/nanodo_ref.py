"""Nanodo's own model beside this one: for the fidelity checks.

Nanodo (google-deepmind/nanodo) is the code the paper's numbers came out of.
Given a checkout of it, `load` imports its modules (without touching
sys.path), `model` and `init` build and initialise its Transformer, and
`to_project` maps its parameter tree onto this package's layout (the same
arrays), so both models can run on the same parameters
(tests/test_fidelity.py, scripts/compare_nanodo.py).
"""

from __future__ import annotations

import importlib
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from nanodo_sam import config as config_lib
from nanodo_sam import model as model_lib


def load(src: str, module: str):
  """Nanodo's module `nanodo.<module>` from the checkout `src`."""
  config_lib.import_package_of(
      os.path.join(os.path.abspath(src), "nanodo", "__init__.py")
  )
  return importlib.import_module(f"nanodo.{module}")


def model(src: str, D, H, N, F, L, V, dtype=jnp.float32):
  """Nanodo's TransformerDo of that shape."""
  nm = load(src, "model")
  return nm.TransformerDo(
      nm.DoConfig(D=D, H=H, L=L, N=N, V=V, F=F, dtype=dtype)
  )


def init(m, L, seed=0):
  """Nanodo's initial parameters (unboxed) for rows of L tokens."""
  return nn.unbox(
      m.init(jax.random.key(seed), jnp.zeros((1, L), jnp.int32))["params"]
  )


def project_model(D, H, N, F, L, V, **kw):
  """This package's model of the same shape (`kw`: other DoConfig fields)."""
  return model_lib.TransformerDo(
      model_lib.DoConfig(D=D, H=H, N=N, F=F, L=L, V=V, **kw)
  )


def to_project(p, N: int):
  """Nanodo's parameter tree in this project's layout (same arrays)."""
  out = {
      "embed": p["embed"],
      "pos_embed": p["pos_embed"],
      "out_ln": p["out_ln"],
  }
  for i in range(N):
    b = p[f"blocks_{i}"]
    attn = b["CausalAttn_0"]
    out[f"block_{i}"] = {
        "ln_attn": b["LayerNorm_0"],
        "ln_mlp": b["LayerNorm_1"],
        "attn": {
            "query": attn["query"],
            "key": attn["key"],
            "value": attn["value"],
            "attn_out": attn["attn_out_proj"],
        },
        "mlp": {"fc1": b["Mlp_0"]["Dense_0"], "fc2": b["Mlp_0"]["Dense_1"]},
    }
  return out


def kernels(params) -> dict[str, np.ndarray]:
  """{path: array} of every kernel in a parameter tree."""
  return {
      jax.tree_util.keystr(path): np.asarray(x)
      for path, x in jax.tree_util.tree_leaves_with_path(params)
      if "kernel" in jax.tree_util.keystr(path)
  }
