"""Weight-only post-training quantization of a checkpoint's parameters
(`nanodo-sam eval --quantize=int8|int4`): how much a model loses when its
weights are stored in 8 or 4 bits.

Round to nearest, symmetric: each weight w becomes q * scale with q an
integer in [-(2^(b-1) - 1), 2^(b-1) - 1] and scale = max |w| / (2^(b-1) - 1)
over the weights that share it: one scale per output channel (all of its
inputs), or per group of `group_size` consecutive inputs of an output channel
(group_size > 0; it must divide the input dimension). The result is
dequantized back to float (fake quantization), so the model runs as before
and only the rounding error is measured. The attention and MLP kernels are
quantized; LayerNorm scales stay in float, and so do the token and position
embeddings (the token embedding is also the tied output layer) unless
`embeddings=True`, which quantizes each embedding row over the model width
(the input dimension of the tied output layer).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from nanodo_sam.errors import UsageError

# --quantize values -> bits.
WIDTHS = {"int8": 8, "int4": 4}
# Kernels whose leading axes are inputs: attn_out contracts (heads, head dim).
INPUT_AXES = {"attn_out": 2}


def parse_width(spec: str) -> int:
  """ "int8" | "int4" (or "8" | "4") -> bits; UsageError otherwise."""
  bits = WIDTHS.get(spec, WIDTHS.get(f"int{spec}"))
  if bits is None:
    raise UsageError(
        f"--quantize={spec!r} is unknown; use int8 or int4 "
        "(weight-only round-to-nearest)"
    )
  return bits


def quantize_dequantize(w_IxO: jax.Array, bits: int, group_size: int = 0):
  """(dequantized w_IxO, its scales [groups, 1, O]): `w_IxO` (inputs on axis
  0) rounded to the symmetric `bits`-bit grid, one scale per output channel
  and group of `group_size` inputs (0: all inputs)."""
  num_in, num_out = w_IxO.shape
  g = group_size or num_in
  qmax = 2 ** (bits - 1) - 1
  w_GxgxO = w_IxO.astype(jnp.float32).reshape(num_in // g, g, num_out)
  scale_Gx1xO = jnp.max(jnp.abs(w_GxgxO), axis=1, keepdims=True) / qmax
  scale_Gx1xO = jnp.where(scale_Gx1xO > 0, scale_Gx1xO, 1.0)
  q_GxgxO = jnp.clip(jnp.round(w_GxgxO / scale_Gx1xO), -qmax, qmax)
  w_hat = (q_GxgxO * scale_Gx1xO).reshape(num_in, num_out)
  return w_hat.astype(w_IxO.dtype), scale_Gx1xO


def _layout(path, x, embeddings: bool) -> tuple[int, bool] | None:
  """(leading input axes, transposed) of a quantized leaf; None: kept in
  float. Embedding tables [rows, D] are quantized per row, over D."""
  names = [str(getattr(k, "key", k)) for k in path]
  if names[-1] == "kernel":
    return INPUT_AXES.get(names[-2], 1), False
  if names[-1] == "embedding" and embeddings:
    return 1, True
  return None


def _apply(w, n_in: int, transposed: bool, bits: int, group_size: int):
  if transposed:
    return _apply(w.T, n_in, False, bits, group_size).T
  shape = w.shape
  num_in = math.prod(shape[:n_in])
  w_hat, _ = quantize_dequantize(w.reshape(num_in, -1), bits, group_size)
  return w_hat.reshape(shape)


def input_dims(params, embeddings: bool = False) -> dict:
  """{"a/b/kernel": input dimension} of each leaf that would be quantized
  (`params` may be ShapeDtypeStructs)."""
  out = {}
  for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
    layout = _layout(path, x, embeddings)
    if layout is not None:
      n_in, transposed = layout
      shape = x.shape[::-1] if transposed else x.shape
      out["/".join(str(getattr(k, "key", k)) for k in path)] = math.prod(
          shape[:n_in]
      )
  return out


def check_group_size(params, group_size: int, embeddings: bool) -> None:
  """UsageError (one line) unless group_size is 0 or divides the input
  dimension of every quantized weight."""
  if group_size < 0:
    raise UsageError(
        f"--group_size={group_size} must be >= 0 (0: one "
        "scale per output channel)"
    )
  if group_size == 0:
    return
  for name, num_in in input_dims(params, embeddings).items():
    if num_in % group_size:
      raise UsageError(
          f"--group_size={group_size} does not divide the input dimension "
          f"{num_in} of {name}; use a divisor of every input dimension "
          f"({sorted(set(input_dims(params, embeddings).values()))}) or 0"
      )


def quantize_params(
    params, bits: int | None, group_size: int = 0, embeddings: bool = False
):
  """`params` with each quantized weight rounded to the `bits` grid and
  dequantized; bits None returns `params` itself (float)."""
  if bits is None:
    return params

  def one(path, x):
    layout = _layout(path, x, embeddings)
    if layout is None:
      return x
    return _apply(x, *layout, bits, group_size)

  return jax.tree_util.tree_map_with_path(one, params)
