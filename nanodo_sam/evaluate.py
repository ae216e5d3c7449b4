"""Evaluation: the token-weighted mean loss of a logits function over the
fixed eval batches (the loop's eval hook, `nanodo-sam eval`, `prune-eval`)."""

from __future__ import annotations

from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from nanodo_sam.loss import cross_entropy


def make_eval_step(logits_fn: Callable, params_sharding=None,
                   batch_sharding=None):
  """Jitted (params, batch) -> (sum of token losses, sum of weights)."""

  def eval_step(params, batch):
    logits_BxLxV = logits_fn(params, batch["inputs"])
    w = jnp.sum(batch["weights"])
    return cross_entropy(logits_BxLxV, batch) * w, w

  if params_sharding is None:
    return jax.jit(eval_step)
  return jax.jit(eval_step, in_shardings=(params_sharding, batch_sharding))


def eval_loss(eval_step, params, batches: Iterable, put_batch=lambda b: b):
  """Token-weighted mean loss over `batches` (one host sync at the end)."""
  sums = [eval_step(params, put_batch(b)) for b in batches]
  total, weight = np.sum(np.asarray(jax.device_get(sums)), axis=0)
  return float(total / max(weight, 1.0))
