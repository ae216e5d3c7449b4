"""Pytree arithmetic shared by the step (`sam`) and the diagnostics
(`sharpness`): inner product, norm and a scanned weighted sum.

Products and sums run in at least float32 whatever the leaves' dtype, and
element-wise (no flattening), so a sharded leaf is reduced where it lies.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

PyTree = Any


def _up(x: jax.Array) -> jax.Array:
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def vdot(a: PyTree, b: PyTree) -> jax.Array:
  """sum over leaves of <a, b>, in at least float32 (0 for empty trees)."""
  return sum(
      (
          jnp.sum(_up(x) * _up(y))
          for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
      ),
      jnp.zeros((), jnp.float32),
  )


def norm(tree: PyTree) -> jax.Array:
  """Global L2 norm, accumulated in at least float32."""
  return jnp.sqrt(
      sum(
          (jnp.sum(jnp.square(_up(x))) for x in jax.tree.leaves(tree)),
          jnp.zeros((), jnp.float32),
      )
  )


def scan_sum(
    fn: Callable[[PyTree], PyTree],
    xs: PyTree,
    weights: jax.Array | None = None,
    like: PyTree | None = None,
    constrain: Callable[[PyTree], PyTree] | None = None,
) -> PyTree:
  """sum_i w_i * fn(xs_i) over the leading axis of xs, one slice live at a
  time (`lax.scan`), accumulated in at least float32.

  `weights` [K] or [K, G] (default all ones): a [G] row scales axis 0 of
  every output of its step. `like`: fn's output (arrays or shapes; default
  traced from xs[0]). `constrain` (optional, e.g. a sharding constraint) is
  applied to each step's (slice, weight) and to the running sum.
  """
  if like is None:
    like = jax.eval_shape(
        fn,
        jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), xs),
    )
  keep = constrain or (lambda t: t)

  def scale(w, o):
    return jnp.reshape(w, jnp.shape(w) + (1,) * (o.ndim - jnp.ndim(w))) * o

  def body(acc, step_xs):
    x, w = keep(step_xs)
    out = fn(x)
    if w is None:
      acc = jax.tree.map(lambda a, o: a + o.astype(a.dtype), acc, out)
    else:
      acc = jax.tree.map(lambda a, o: a + scale(w, o.astype(a.dtype)), acc, out)
    return keep(acc), None

  zeros = keep(
      jax.tree.map(
          lambda x: jnp.zeros(x.shape, jnp.promote_types(x.dtype, jnp.float32)),
          like,
      )
  )
  acc, _ = jax.lax.scan(body, zeros, (xs, weights))
  return acc
