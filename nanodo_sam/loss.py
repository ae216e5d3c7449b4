"""The token loss and the output-layer contract, shared by every module that
takes a logits function (head.py, sam.py, sharpness.py, evaluate.py) without
knowing the model behind it. head.py runs the contract in chunks.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

# Tokens per device in one chunk of the chunked output head (head.py): the
# default of config key model.head_chunk_tokens (keys.py reads it here);
# docs/benchmarks.md, "Chunk size of the output head", has the measurement
# behind it.
HEAD_CHUNK_TOKENS = 4096
LogitsFn = Callable[[Any, jax.Array], jax.Array]  # (params, inputs) -> logits


def token_nll(logits_xV: jax.Array, targets_x: jax.Array) -> jax.Array:
  """-log softmax(logits)[target] per token, in at least float32."""
  logits_xV = logits_xV.astype(jnp.promote_types(logits_xV.dtype, jnp.float32))
  logz_x = jax.nn.logsumexp(logits_xV, axis=-1)
  target_logit_x = jnp.take_along_axis(
      logits_xV, targets_x[..., None], axis=-1
  )[..., 0]
  return logz_x - target_logit_x


def weighted_nll(
    logits_xV: jax.Array, targets_x: jax.Array, scale_x: jax.Array
) -> jax.Array:
  """sum_t scale_t nll_t: with scale = w / sum(w) of the whole batch, a
  chunk's share of `cross_entropy`."""
  nll_x = token_nll(logits_xV, targets_x)
  return jnp.sum(nll_x * scale_x.astype(nll_x.dtype))


def cross_entropy(logits_BxLxV: jax.Array, batch: dict[str, Any]) -> jax.Array:
  """Weighted mean token cross-entropy in nats (0 weight on padding)."""
  nll_BxL = token_nll(logits_BxLxV, batch["targets"])
  weights_BxL = batch["weights"].astype(nll_BxL.dtype)
  total = jnp.sum(nll_BxL * weights_BxL)
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
  # the sequence (`head.head_vjp`); 0 keeps the logits whole.
  chunk_tokens: int = HEAD_CHUNK_TOKENS
