"""Evaluation: loss, perplexity, token accuracy and bits per byte of a logits
function over the fixed eval batches (the loop's eval hook, `nanodo-sam
eval`, `analyze`, `prune-eval`).

The token losses and argmax hits come from the chunked output head
(`head.eval_sums`: with the model's output layer, the [B, L, V] logits exist
one chunk of the sequence at a time). Every metric is a ratio of sums over
the scored (weight > 0) target tokens of all batches: loss = sum of token losses (nats) / tokens; perplexity =
exp(loss); accuracy = tokens whose argmax is the target / tokens; bits per
byte = sum of token losses / (ln 2 x bytes), where bytes counts the UTF-8
bytes of the text the scored targets decode to (`data.target_bytes`). Bits
per byte does not depend on the tokenizer, so it compares a byte-level run
with a SentencePiece one.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from nanodo_sam import data as data_lib
from nanodo_sam import head as head_lib
from nanodo_sam import sharding
from nanodo_sam.loss import OutputHead

# The metrics `eval_metrics` returns, in the order they are logged.
METRICS = ("loss", "perplexity", "accuracy", "bits_per_byte")


def make_eval_step(
    logits_fn: Callable,
    params_sharding=None,
    batch_sharding=None,
    target_bytes: Callable | None = None,
    head: OutputHead | None = None,
):
  """Jitted (params, batch) -> the batch's sums over scored tokens: "loss"
  (nats), "weight" (tokens), "correct" (argmax == target) and "bytes"
  (`target_bytes(inputs, targets)` [B, L] bytes per target; 0 without it).
  `head` (optional): logits_fn's output layer, run in chunks."""

  def eval_step(params, batch):
    sums = head_lib.eval_sums(params, batch, logits_fn=logits_fn, head=head)
    num_bytes = (
        0.0
        if target_bytes is None
        else jnp.sum(
            target_bytes(batch["inputs"], batch["targets"]) * batch["weights"]
        )
    )
    return dict(sums, bytes=jnp.asarray(num_bytes, jnp.float32))

  if params_sharding is None:
    return jax.jit(eval_step)
  return jax.jit(eval_step, in_shardings=(params_sharding, batch_sharding))


def eval_step_for(s):
  """The eval step of a `state.Setup`, the one the loop, `eval`, `analyze`
  and `prune-eval` use: its logits function, output head (chunked like the
  train step's) and shardings, with the bytes per target of its vocabulary
  (bits per byte)."""
  cfg = s.cfg
  return make_eval_step(
      s.logits_fn,
      s.state_sharding.params,
      sharding.batch_sharding(s.mesh),
      target_bytes=data_lib.target_bytes(cfg.data.vocab, cfg.model.V),
      head=s.head,
  )


def metrics_from_sums(sums: dict) -> dict:
  """The METRICS (plus "tokens" and "bytes") from summed eval-step outputs.
  bits_per_byte is NaN when no byte was counted."""
  tokens, num_bytes = max(sums["weight"], 1.0), sums["bytes"]
  loss = sums["loss"] / tokens
  with np.errstate(over="ignore"):
    perplexity = float(np.exp(loss))
  return {
      "loss": loss,
      "perplexity": perplexity,
      "accuracy": sums["correct"] / tokens,
      "bits_per_byte": (
          sums["loss"] / (math.log(2) * num_bytes)
          if num_bytes > 0
          else float("nan")
      ),
      "tokens": sums["weight"],
      "bytes": num_bytes,
  }


def eval_metrics(
    eval_step, params, batches: Iterable, put_batch=lambda b: b
) -> dict:
  """`metrics_from_sums` over `batches` (one host sync at the end; sums in
  float64 on the host)."""
  sums = jax.device_get([eval_step(params, put_batch(b)) for b in batches])
  total = {
      k: float(np.sum([s[k] for s in sums], dtype=np.float64))
      for k in ("loss", "weight", "correct", "bytes")
  }
  return metrics_from_sums(total)


def eval_loss(eval_step, params, batches: Iterable, put_batch=lambda b: b):
  """Token-weighted mean loss over `batches`."""
  return eval_metrics(eval_step, params, batches, put_batch)["loss"]
