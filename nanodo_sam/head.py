"""The output head run in chunks of the sequence.

A logits function splits at its output layer (`loss.OutputHead`):
logits = apply(select(params), features(params, inputs)). The train step,
evaluation and the sharpness diagnostics get their logits through this
module, which, given the output layer, runs it over chunks of the sequence
(`lax.scan`, at most `chunk_tokens` tokens per device each; config
model.head_chunk_tokens, default loss.HEAD_CHUNK_TOKENS) and so never holds
the [B, L, V] logits whole:

  head_vjp           the loss, its logit cotangent dL/dF and J^T dL/dF (the
                     train step, sam.py; dL/dF at one point, J at another)
  token_log_probs    log p(target) and argmax == target per token, [B, L]
                     (evaluation, the lm-eval harness)
  eval_sums          summed token losses, weights and argmax hits (evaluate)
  over_chunks        the chunk loop itself (sharpness.py's products)

Without a head the logits are the features and the output layer is the
identity (`resolve_head`). On a mesh (`head.batch_sharding`) every chunk
stays split by rows like the batch (`keep_rows`).
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from nanodo_sam.loss import (
    HEAD_CHUNK_TOKENS,
    LogitsFn,
    OutputHead,
    cross_entropy,
    token_nll,
)

PyTree = Any
CHUNK_TOKENS = HEAD_CHUNK_TOKENS  # the key table's model.head_chunk_tokens


# ------------------------------------------------------------ the mesh


def row_axes(head: OutputHead) -> tuple[str, ...]:
  """The mesh axes a batch's rows are split over (`head.batch_sharding`)."""
  s = head.batch_sharding
  if s is None or not len(s.spec) or s.spec[0] is None:
    return ()
  return (s.spec[0],) if isinstance(s.spec[0], str) else tuple(s.spec[0])


def batch_shards(head: OutputHead) -> int:
  """How many ways a batch's rows are split (`head.batch_sharding`)."""
  axes = row_axes(head)
  return math.prod(head.batch_sharding.mesh.shape[a] for a in axes)


def keep_rows(head: OutputHead, x: jax.Array, axis: int = 0) -> jax.Array:
  """x with its `axis` split like the batch's rows (`head.batch_sharding`);
  unchanged without one."""
  s = head.batch_sharding
  if s is None:
    return x
  spec = PartitionSpec(*((None,) * axis + tuple(s.spec[:1])))
  return jax.lax.with_sharding_constraint(x, NamedSharding(s.mesh, spec))


def replicated(head: OutputHead, tree: PyTree) -> PyTree:
  """`tree` whole on every device (one all-gather, outside any loop)."""
  s = head.batch_sharding
  rep = NamedSharding(s.mesh, PartitionSpec())
  return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, rep), tree)


# ------------------------------------------------------- the chunk loop


def num_chunks(rows: int, L: int, chunk_tokens: int) -> int:
  """The fewest chunks of the sequence (a divisor of L) holding at most
  `chunk_tokens` tokens over `rows` rows; 1 (whole) with chunk_tokens <= 0."""
  if chunk_tokens <= 0:
    return 1
  for n in range(1, L + 1):
    if L % n == 0 and rows * (L // n) <= chunk_tokens:
      return n
  return L


def _f32_zeros(tree: PyTree) -> PyTree:
  return jax.tree.map(
      lambda x: jnp.zeros(x.shape, jnp.promote_types(x.dtype, jnp.float32)),
      tree,
  )


def over_chunks(fn, n: int, *xs_BxL, keep: Callable | None = None):
  """fn(*chunks of xs) -> (tree summed over chunks, [B, Lc, ...] per-token
  array concatenated over chunks, or None): the sequence axis (1) of every
  x cut into n chunks visited one at a time by `lax.scan`. Sums accumulate
  in at least float32 and come back in fn's dtypes. `keep(x, axis)`
  (optional, e.g. `keep_rows`) constrains the stacked chunks' rows (axis 1)
  and the concatenated output's (axis 0)."""
  if n == 1:
    return fn(*xs_BxL)
  keep = keep or (lambda x, axis=0: x)

  def split(x):
    x = x.reshape((x.shape[0], n, x.shape[1] // n) + x.shape[2:])
    return keep(jnp.moveaxis(x, 1, 0), 1)

  def body(total, chunk):
    summed, per_token = fn(*chunk)
    total = jax.tree.map(lambda t, x: t + x.astype(t.dtype), total, summed)
    return total, per_token

  summed_shapes = jax.eval_shape(
      lambda *c: fn(*c)[0],
      *(
          jax.ShapeDtypeStruct(
              (x.shape[0], x.shape[1] // n) + x.shape[2:], x.dtype
          )
          for x in xs_BxL
      ),
  )
  total, per_token = jax.lax.scan(
      body, _f32_zeros(summed_shapes), tuple(split(x) for x in xs_BxL)
  )
  total = jax.tree.map(lambda t, s: t.astype(s.dtype), total, summed_shapes)
  if per_token is not None:
    per_token = jax.tree.map(
        lambda p: keep(
            jnp.moveaxis(p, 0, 1).reshape((p.shape[1], -1) + p.shape[3:])
        ),
        per_token,
    )
  return total, per_token


# ------------------------------------------------ a point of the network


class Point(NamedTuple):
  """theta or theta + eps seen through logits_fn, up to its output layer.

  `head_params` and `h_BxLxD` are the output layer's parameters and input
  features (without a `head`: no parameters and the logits themselves);
  `vjp_fn` maps their cotangents to the parameters'.
  """

  head_params: PyTree
  h_BxLxD: jax.Array
  vjp_fn: Callable[[tuple[PyTree, jax.Array]], tuple[PyTree]]


def _identity_head(logits_fn: LogitsFn) -> OutputHead:
  return OutputHead(
      features=logits_fn,
      select=lambda params: (),
      apply=lambda head_params, logits: logits,
  )


def resolve_head(
    logits_fn: LogitsFn, head: OutputHead | None = None
) -> tuple[OutputHead, bool]:
  """(the OutputHead to run, whether it is a real output layer to chunk):
  `head` when given, else logits_fn itself after an identity layer."""
  if head is None:
    return _identity_head(logits_fn), False
  return head, True


def point(
    params: PyTree,
    inputs_BxL: jax.Array,
    logits_fn: LogitsFn,
    head: OutputHead | None = None,
) -> Point:
  """1 forward up to the output layer, keeping its J^T for backwards."""
  head, _ = resolve_head(logits_fn, head)
  (head_params, h_BxLxD), vjp_fn = jax.vjp(
      lambda p: (head.select(p), head.features(p, inputs_BxL)), params
  )
  return Point(head_params, h_BxLxD, vjp_fn)


def _head_chunks(head: OutputHead, chunked: bool, h_BxLxD) -> int:
  """`num_chunks` for this head on one device's rows; 1 (the logits whole)
  without a real output layer."""
  if not chunked:
    return 1
  B, L = h_BxLxD.shape[:2]
  rows = max(B // batch_shards(head), 1)
  return num_chunks(rows, L, getattr(head, "chunk_tokens", 0))


# ------------------------------------------------- loss and its pullback


def head_vjp(
    a: Point,
    b: Point,
    batch: dict[str, Any],
    logits_fn: LogitsFn,
    head: OutputHead | None = None,
) -> tuple[jax.Array, PyTree]:
  """(L(b), J(a)^T dL/dF(b)): the loss at point b and its logit cotangent
  pulled back through the network at point a (a is b for the plain gradient).

  With a `head` the logits are computed, turned into the loss and its
  cotangent dL/dF = w (softmax - onehot) and pulled back through the output
  layer one chunk of the sequence at a time, so no [B, L, V] tensor is ever
  alive; dL/dF(b) is recomputed from b's features when a is not b rather than
  stored. Without a head, the logits are the features and this is a plain
  vjp.

  On a mesh (`head.batch_sharding` splits the rows G ways) the rows are
  grouped [G, B/G, ...] along the devices and the output layer is gathered
  once, before the loop; each group accumulates its own part of the output
  layer's gradient ([G, V, D], one [V, D] per device), and the groups are
  summed once after the loop (a reduce-scatter into the parameters' layout).
  Inside the loop only scalars (the loss) cross devices.
  """
  head, chunked = resolve_head(logits_fn, head)
  n = _head_chunks(head, chunked, b.h_BxLxD)
  weights_BxL = batch["weights"]
  scale_BxL = weights_BxL / jnp.maximum(jnp.sum(weights_BxL), 1.0)
  xs = (a.h_BxLxD, b.h_BxLxD, batch["targets"], scale_BxL)
  if n > 1 and batch_shards(head) > 1:
    loss, d_head, dh_BxLxD = _grouped_chunks(a, b, xs, n, head)
  else:
    loss, d_head, dh_BxLxD = _chunks(a, b, xs, n, head)
  (grads,) = a.vjp_fn((d_head, dh_BxLxD.astype(a.h_BxLxD.dtype)))
  return loss, grads


def _chunk_fn(head: OutputHead, same: bool):
  """(a's head params, b's, h_a, h_b, targets, scale) of one chunk ->
  (its share of the loss, d head params, dh)."""

  def one(w_a, w_b, h_a, h_b, targets, scale):
    # cross_entropy divides by max(sum(scale), 1): with the weights divided
    # by the batch's total (`head_vjp`), the chunk's share of the batch mean.
    loss_fn = lambda z: cross_entropy(z, {"targets": targets, "weights": scale})
    if same:
      logits, pull = jax.vjp(head.apply, w_a, h_a)
    else:
      logits = head.apply(w_b, h_b)
      pull = jax.vjp(head.apply, w_a, h_a)[1]
    loss, dlogits = jax.value_and_grad(loss_fn)(logits)
    d_head, dh = pull(dlogits.astype(logits.dtype))
    return loss, d_head, dh

  return one


def _chunks(a: Point, b: Point, xs, n: int, head: OutputHead):
  """The head over n chunks of the sequence, every chunk split by rows like
  the batch (without the constraint XLA's partitioner replicates the chunks
  inside the scan)."""
  one = _chunk_fn(head, a is b)

  def kept(h_a, h_b, targets, scale):
    h_a, h_b, targets, scale = (
        keep_rows(head, x) for x in (h_a, h_b, targets, scale)
    )
    loss, d_head, dh = one(
        a.head_params, b.head_params, h_a, h_b, targets, scale
    )
    return (loss, d_head), keep_rows(head, dh)

  keep = lambda x, axis=0: keep_rows(head, x, axis)
  (loss, d_head), dh_BxLxD = over_chunks(kept, n, *xs, keep=keep)
  return loss, d_head, dh_BxLxD


def _grouped_chunks(a: Point, b: Point, xs, n: int, head: OutputHead):
  """`_chunks` on a mesh without a collective in the loop beyond scalars:
  rows grouped [G, B/G] along the devices, the output layer gathered once,
  its gradient accumulated per group and summed over the groups once."""
  G = batch_shards(head)
  one = _chunk_fn(head, a is b)
  w_a = replicated(head, a.head_params)
  w_b = w_a if a is b else replicated(head, b.head_params)
  # One copy of a's output layer per group: its cotangent is the group's own
  # part of the gradient, kept on the group's devices.
  w_a_G = jax.tree.map(
      lambda x: keep_rows(head, jnp.broadcast_to(x, (G,) + x.shape)), w_a
  )

  def split(x):  # [B, L, ...] -> [n, G, B/G, L/n, ...], G along the devices.
    B, L = x.shape[:2]
    x = x.reshape((G, B // G, n, L // n) + x.shape[2:])
    return keep_rows(head, jnp.moveaxis(x, 2, 0), 1)

  grouped = jax.vmap(one, in_axes=(0, None, 0, 0, 0, 0))

  def body(acc, chunk):
    chunk = tuple(keep_rows(head, x) for x in chunk)
    loss_G, d_head_G, dh = grouped(w_a_G, w_b, *chunk)
    acc = jax.tree.map(
        lambda s, x: s + x.astype(s.dtype), acc, (jnp.sum(loss_G), d_head_G)
    )
    return acc, keep_rows(head, dh)

  zeros = _f32_zeros((jnp.zeros(()), w_a_G))
  zeros = (zeros[0], jax.tree.map(lambda z: keep_rows(head, z), zeros[1]))
  (loss, d_head_G), dh_nxGxbxLcxD = jax.lax.scan(
      body, zeros, tuple(split(x) for x in xs)
  )
  d_head = jax.tree.map(
      lambda d, p: jnp.sum(d, axis=0).astype(p.dtype), d_head_G, a.head_params
  )
  dh = jnp.moveaxis(dh_nxGxbxLcxD, 0, 2)  # [G, B/G, n, L/n, D]
  dh_BxLxD = keep_rows(head, dh.reshape(a.h_BxLxD.shape))
  return loss, d_head, dh_BxLxD


# ------------------------------------------- per-token values, no gradient


def token_log_probs(
    params: PyTree,
    inputs_BxL: jax.Array,
    targets_BxL: jax.Array,
    *,
    logits_fn: LogitsFn,
    head: OutputHead | None = None,
) -> tuple[jax.Array, jax.Array]:
  """(log softmax(logits)[target] [B, L] float32, argmax == target [B, L]
  bool): each target's log-likelihood given its row's inputs up to it, and
  whether it is the greedy choice (evaluation, the lm-eval harness). With
  `head` the [B, L, V] logits exist only one chunk at a time."""
  head, chunked = resolve_head(logits_fn, head)
  head_params = head.select(params)
  h_BxLxD = head.features(params, inputs_BxL)
  n = _head_chunks(head, chunked, h_BxLxD)

  def chunk(h_c, targets_c):
    h_c, targets_c = keep_rows(head, h_c), keep_rows(head, targets_c)
    logits_c = head.apply(head_params, h_c)
    hit_c = jnp.argmax(logits_c, axis=-1) == targets_c
    return (), (-token_nll(logits_c, targets_c), hit_c)

  keep = lambda x, axis=0: keep_rows(head, x, axis)
  return over_chunks(chunk, n, h_BxLxD, targets_BxL, keep=keep)[1]


def eval_sums(
    params: PyTree,
    batch: dict[str, Any],
    *,
    logits_fn: LogitsFn,
    head: OutputHead | None = None,
) -> dict[str, jax.Array]:
  """A batch's sums over its weighted tokens: "loss" (nats), "weight"
  (tokens) and "correct" (argmax == target)."""
  logp_BxL, hit_BxL = token_log_probs(
      params,
      batch["inputs"],
      batch["targets"],
      logits_fn=logits_fn,
      head=head,
  )
  w_BxL = batch["weights"].astype(jnp.float32)
  return {
      "loss": -jnp.sum(logp_BxL * w_BxL),
      "weight": jnp.sum(w_BxL),
      "correct": jnp.sum(hit_BxL * w_BxL),
  }
