"""The token loss and the output-layer contract, shared by every module that
takes a logits function (sam.py, sharpness.py, evaluate.py) without knowing
the model behind it.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

# Tokens per device in one chunk of the chunked output head: the default of
# config key model.head_chunk_tokens.
from nanodo_sam.keys import HEAD_CHUNK_TOKENS

LogitsFn = Callable[[Any, jax.Array], jax.Array]  # (params, inputs) -> logits


def cross_entropy(logits_BxLxV: jax.Array, batch: dict[str, Any]) -> jax.Array:
  """Weighted mean token cross-entropy in nats (0 weight on padding)."""
  dtype = jnp.promote_types(logits_BxLxV.dtype, jnp.float32)
  logits_BxLxV = logits_BxLxV.astype(dtype)
  logz_BxL = jax.nn.logsumexp(logits_BxLxV, axis=-1)
  target_logit_BxL = jnp.take_along_axis(
      logits_BxLxV, batch["targets"][..., None], axis=-1
  )[..., 0]
  weights_BxL = batch["weights"].astype(dtype)
  total = jnp.sum((logz_BxL - target_logit_BxL) * weights_BxL)
  return total / jnp.maximum(jnp.sum(weights_BxL), 1.0)


class OutputHead(NamedTuple):
  """How a logits function splits at its output layer:

      logits_fn(p, x) == apply(select(p), features(p, x))

  A model hands it to the gradient step next to its logits function
  (`sam.gradient(..., head=...)`). `apply` acts on each position
  independently, so the step can run the output layer, the loss and its
  cotangent over chunks of the sequence and never hold [B, L, V] logits (most
  of a small model's memory at V = 32101).
  """

  features: Callable[[Any, jax.Array], jax.Array]  # (params, inputs) -> h
  select: Callable[[Any], Any]  # params -> the output layer's own params
  apply: Callable[[Any, jax.Array], jax.Array]  # (those, h_xD) -> logits_xV
  # Where a [B, ...] array's rows live on the mesh (a NamedSharding splitting
  # axis 0; `sharding.pin_head` sets it), so the chunked step keeps every
  # chunk split by rows; None: one device, or let XLA choose.
  batch_sharding: Any = None
  # At most this many tokens (rows x positions) per device in one chunk of
  # the sequence (`sam.head_vjp`); 0 keeps the logits whole.
  chunk_tokens: int = HEAD_CHUNK_TOKENS
