"""Exact curvature diagnostics of the token loss: Hessian, GGN, functional part.

The loss is L(theta) = cross_entropy(logits_fn(theta, inputs), batch). With
J the Jacobian of the logits and r = dL/dlogits, its Hessian splits as
(Singh et al., eq. 8)

  H = H_G + H_F,   H_G = J^T [d^2 L / dlogits^2] J,   H_F = sum_k r_k d^2 f_k,

the Gauss-Newton (logit path) and functional Hessian (functional path). All
products are exact autodiff products (no finite differences), jit-able, and
run in at least float32 whatever the model's activation dtype.

Fixed evaluation batches: every function also accepts a stacked batch whose
arrays are [K, B, L]. Its loss is the mean over the K per-batch losses, so
every product is the mean of the per-batch products; `_over_batches` visits
the K batches one at a time with `lax.scan` (memory of one batch).

Large models: with `head` (the model's output layer, a loss.OutputHead) every
product runs the output layer, the loss and their derivatives over chunks of
the sequence (at most `chunk_tokens` tokens per device each), so no
[B, L, V] logits or logit tangents are ever alive; with the head's
`batch_sharding` (a mesh) each device computes its own rows' share under
`shard_map` (`_chunked`). The chunk loop is head.py's (`head.over_chunks`). `head.features` must then be the plain model
(no sharding constraints of its own). The same numbers as through
`logits_fn` (up to float rounding).
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable

import jax
from jax import lax
import jax.numpy as jnp

from nanodo_sam import head as head_lib
from nanodo_sam import tree_math
from nanodo_sam.loss import LogitsFn, OutputHead, cross_entropy, weighted_nll

Batch = dict[str, Any]

# Tokens per device in one chunk of the output layer when a `head` is given:
# the key table's model.head_chunk_tokens default, as for the train step
# (head.py). Per chunk about 8 [tokens, V] float32 buffers are alive
# (logits, softmax, tangent, products), 526 MB each at 4096 tokens and
# V = 32101; pass a smaller chunk_tokens where memory is short.
CHUNK_TOKENS = head_lib.CHUNK_TOKENS


# ----------------------------------------------------------------- helpers --


def _over_batches(fn: Callable[[Batch], Any], batch: Batch) -> Any:
  """fn(one [B, L] batch) -> pytree; for a [K, B, L] batch, the mean over K."""
  ndim = batch["inputs"].ndim
  if ndim == 2:
    return fn(batch)
  if ndim != 3:
    raise ValueError(
        f"batch['inputs'] has shape {batch['inputs'].shape}; pass [B, L] or a "
        "stack of K evaluation batches [K, B, L]"
    )
  K = batch["inputs"].shape[0]
  total = tree_math.scan_sum(fn, batch)
  return jax.tree.map(lambda t: t / K, total)


def _compute_dtype(dtype) -> jnp.dtype:
  return jnp.promote_types(dtype, jnp.float32)


def _upcast(params):
  """Parameters in (at least) float32, so every product runs in float32."""
  return jax.tree.map(lambda p: p.astype(_compute_dtype(p.dtype)), params)


def _like(v, params):
  return jax.tree.map(lambda x, p: jnp.asarray(x, p.dtype), v, params)


def _random_like(rng: jax.Array, params, sample):
  """A tree like params, leaf i drawn as sample(key_i, shape, dtype)."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(rng, len(leaves))
  return treedef.unflatten(
      [sample(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
  )


def _keep(tree, params_sharding, stacked: bool = False):
  """tree (stacked: each leaf [K, ...]) split over the mesh like the
  parameters (`params_sharding`, a tree of NamedShardings like params);
  unchanged without one."""
  if params_sharding is None:
    return tree

  def one(x, s):
    spec = (None,) + tuple(s.spec) if stacked else tuple(s.spec)
    return lax.with_sharding_constraint(
        x, jax.sharding.NamedSharding(s.mesh, jax.sharding.PartitionSpec(*spec))
    )

  return jax.tree.map(one, tree, params_sharding)


def _after(x, *deps):
  """x, but only once `deps` are computed: orders independent products so
  that each one's parameter-sized buffers (gathered weights, tangents) are
  freed before the next one's are made. Identity on values.

  Besides the optimization barrier (which XLA's CPU compiler drops before
  scheduling), x's floating leaves get an exact zero computed from `deps`
  (0 * a finite sum of one leaf), so nothing of x (e.g. the gather of the
  whole parameters inside a product) can be scheduled or hoisted before
  `deps` exist."""
  x = lax.optimization_barrier((x, deps))[0]
  floats = [
      d
      for d in jax.tree.leaves(deps)
      if jnp.issubdtype(jnp.result_type(d), jnp.floating)
  ]
  if not floats:
    return x
  s = jnp.sum(min(floats, key=jnp.size)).astype(jnp.float32)
  zero = jnp.where(jnp.isfinite(s), s, 0.0) * 0.0

  def tie(a):
    if not jnp.issubdtype(a.dtype, jnp.floating):
      return a
    return a + zero.astype(a.dtype)

  return jax.tree.map(tie, x)


def _check_count(name: str, value, allow_zero: bool = False) -> None:
  least = 0 if allow_zero else 1
  if (
      not isinstance(value, numbers.Integral)
      or isinstance(value, bool)
      or value < least
  ):
    raise ValueError(
        f"{name}={value!r} must be a Python int >= {least}; "
        f"pass e.g. {name}=20"
    )


def _loss(params, batch: Batch, logits_fn: LogitsFn) -> jax.Array:
  return cross_entropy(logits_fn(params, batch["inputs"]), batch)


def _token_scale(weights_BxL: jax.Array, dtype) -> jax.Array:
  """w_t / sum(w), exactly the per-token weighting of `cross_entropy`."""
  weights_BxL = weights_BxL.astype(dtype)
  return weights_BxL / jnp.maximum(jnp.sum(weights_BxL), 1.0)


def _logit_hessian_vp(logits_BxLxV, u_BxLxV, weights_BxL) -> jax.Array:
  """d^2 L / dlogits^2 times u: per token (w_t/sum w) (p*u - p <p, u>).

  diag(p) - p p^T is never materialised, so memory stays O(B L V).
  """
  dtype = _compute_dtype(logits_BxLxV.dtype)
  return _scaled_logit_hessian_vp(
      logits_BxLxV, u_BxLxV, _token_scale(weights_BxL, dtype)
  )


def _scaled_logit_hessian_vp(logits_BxLxV, u_BxLxV, scale_BxL) -> jax.Array:
  """`_logit_hessian_vp` with the per-token scale w_t / sum(w) given (a chunk
  of the sequence needs the whole batch's sum)."""
  dtype = _compute_dtype(logits_BxLxV.dtype)
  p_BxLxV = jax.nn.softmax(logits_BxLxV.astype(dtype), axis=-1)
  pu_BxLxV = p_BxLxV * u_BxLxV.astype(dtype)
  hu_BxLxV = pu_BxLxV - p_BxLxV * jnp.sum(pu_BxLxV, axis=-1, keepdims=True)
  return hu_BxLxV * scale_BxL.astype(dtype)[..., None]


# ------------------------------------------------- single-batch products --


def _hvp_one(params, batch, v, logits_fn):
  grad_fn = jax.grad(_loss)
  return jax.jvp(lambda p: grad_fn(p, batch, logits_fn), (params,), (v,))[1]


def _ggn_vp_one(params, batch, v, logits_fn):
  logits_BxLxV, jvp_fn = jax.linearize(
      lambda p: logits_fn(p, batch["inputs"]), params
  )
  hu_BxLxV = _logit_hessian_vp(logits_BxLxV, jvp_fn(v), batch["weights"])
  (out,) = jax.linear_transpose(jvp_fn, params)(
      hu_BxLxV.astype(logits_BxLxV.dtype)
  )
  return out


def _functional_vp_one(params, batch, v, logits_fn):
  """H_F v = d/dt J(theta + t v)^T r at t=0, with r = dL/dlogits held fixed.

  Computed directly rather than as H v - H_G v: when the functional path is
  small (the language-model case) the difference would lose its digits.
  """

  def jacobian_t_r(p):
    logits_BxLxV, vjp_fn = jax.vjp(lambda q: logits_fn(q, batch["inputs"]), p)
    r_BxLxV = lax.stop_gradient(jax.grad(cross_entropy)(logits_BxLxV, batch))
    return vjp_fn(r_BxLxV)[0]

  return jax.jvp(jacobian_t_r, (params,), (v,))[1]


def _ggn_quad_one(params, batch, v, logits_fn):
  """v^T H_G v = (J v)^T [d^2 L/dlogits^2] (J v): one forward-mode pass."""
  logits_BxLxV, u_BxLxV = jax.jvp(
      lambda p: logits_fn(p, batch["inputs"]), (params,), (v,)
  )
  hu_BxLxV = _logit_hessian_vp(logits_BxLxV, u_BxLxV, batch["weights"])
  return jnp.sum(hu_BxLxV * u_BxLxV.astype(hu_BxLxV.dtype))


def _product(one_fn, params, batch, v, logits_fn):
  params = _upcast(params)
  v = _like(v, params)
  return _over_batches(lambda b: one_fn(params, b, v, logits_fn), batch)


# ----------------------------------- the same products, output layer chunked --


class _Rows:
  """The rows of a batch one device holds, the output layer that runs on
  them, and how to sum over every device's rows (`axes`: the mesh axes the
  rows are split over; none on one device)."""

  def __init__(
      self,
      head: OutputHead,
      batch: Batch,
      chunk_tokens: int,
      axes: tuple[str, ...] = (),
  ):
    self.head, self.batch, self.axes = head, batch, axes
    B, L = batch["inputs"].shape
    self.n = head_lib.num_chunks(B, L, chunk_tokens)
    w_BxL = batch["weights"].astype(jnp.float32)
    # cross_entropy's w_t / max(sum w, 1), the sum over every device's rows.
    self.scale_BxL = w_BxL / jnp.maximum(self.sum(jnp.sum(w_BxL)), 1.0)

  def sum(self, tree):
    return lax.psum(tree, self.axes) if self.axes else tree

  def features(self, p):
    """(the output layer's parameters, features h [B, L, D])."""
    return self.head.select(p), self.head.features(p, self.batch["inputs"])


def _pullback(params, rows: _Rows, fixed_r: bool):
  """This device's (L, J^T r), r = dL/dlogits, chunk by chunk: the
  gradient, or with `fixed_r` J^T r with r held constant under
  differentiation (H_F's integrand, see `_functional_vp_one`)."""
  (hp, h_BxLxD), vjp_fn = jax.vjp(rows.features, params)
  apply = rows.head.apply

  def chunk(h_c, targets_c, scale_c):
    logits_c, pull = jax.vjp(apply, hp, h_c)
    loss_c, r_c = jax.value_and_grad(weighted_nll)(logits_c, targets_c, scale_c)
    if fixed_r:
      r_c = lax.stop_gradient(r_c)
    d_hp, dh_c = pull(r_c.astype(logits_c.dtype))
    return (loss_c, d_hp), dh_c

  (loss, d_hp), dh_BxLxD = head_lib.over_chunks(
      chunk, rows.n, h_BxLxD, rows.batch["targets"], rows.scale_BxL
  )
  (grads,) = vjp_fn((d_hp, dh_BxLxD.astype(h_BxLxD.dtype)))
  return loss, grads


def _local_ops(rows: _Rows):
  """The one-batch products on this device's rows (before the sum over
  devices): {name: (params, v) -> value}."""
  apply = rows.head.apply

  def hvp_one(params, v):
    return jax.jvp(lambda p: _pullback(p, rows, False)[1], (params,), (v,))[1]

  def functional_one(params, v):
    return jax.jvp(lambda p: _pullback(p, rows, True)[1], (params,), (v,))[1]

  def ggn_vp_one(params, v):
    (hp, h_BxLxD), lin = jax.linearize(rows.features, params)
    dhp, dh_BxLxD = lin(v)

    def chunk(h_c, dh_c, scale_c):
      logits_c, u_c = jax.jvp(apply, (hp, h_c), (dhp, dh_c))
      hu_c = _scaled_logit_hessian_vp(logits_c, u_c, scale_c)
      d_hp, dh_out_c = jax.vjp(apply, hp, h_c)[1](hu_c.astype(logits_c.dtype))
      return d_hp, dh_out_c

    d_hp, dh_out = head_lib.over_chunks(
        chunk, rows.n, h_BxLxD, dh_BxLxD, rows.scale_BxL
    )
    (out,) = jax.linear_transpose(lin, params)(
        (d_hp, dh_out.astype(h_BxLxD.dtype))
    )
    return out

  def ggn_quad_one(params, v):
    (hp, h_BxLxD), (dhp, dh_BxLxD) = jax.jvp(rows.features, (params,), (v,))

    def chunk(h_c, dh_c, scale_c):
      logits_c, u_c = jax.jvp(apply, (hp, h_c), (dhp, dh_c))
      hu_c = _scaled_logit_hessian_vp(logits_c, u_c, scale_c)
      return jnp.sum(hu_c * u_c.astype(hu_c.dtype)), None

    return head_lib.over_chunks(
        chunk, rows.n, h_BxLxD, dh_BxLxD, rows.scale_BxL
    )[0]

  return {
      "hvp": hvp_one,
      "ggn_vp": ggn_vp_one,
      "func": functional_one,
      "ggn_quad": ggn_quad_one,
      "loss_grad": lambda params, v: _pullback(params, rows, False),
  }


def _reduce_leaf(x, axes: tuple[str, ...], spec, mesh) -> jax.Array:
  """Inside shard_map: this device's share x of a parameter-shaped sum ->
  its slice of the sum over the devices in `axes`, laid out as `spec` (the
  parameter's PartitionSpec): reduce-scattered along the dimensions split
  over row axes, psum over the other row axes, sliced along the dimensions
  split over other mesh axes (their devices hold the same sum)."""
  summed = []
  for d, entry in enumerate(tuple(spec)):
    names = (
        ()
        if entry is None
        else ((entry,) if isinstance(entry, str) else tuple(entry))
    )
    if names and all(n in axes for n in names):
      x = lax.psum_scatter(x, names, scatter_dimension=d, tiled=True)
      summed += names
    elif names:
      rows_here = tuple(n for n in names if n in axes)
      if rows_here:
        x = lax.psum(x, rows_here)
        summed += rows_here
      index = 0
      for n in names:
        index = index * mesh.shape[n] + lax.axis_index(n)
      size = x.shape[d] // math.prod(mesh.shape[n] for n in names)
      x = lax.dynamic_slice_in_dim(x, index * size, size, d)
  rest = tuple(a for a in axes if a not in summed)
  return lax.psum(x, rest) if rest else x


def _sum_params(tree, axes, pspecs, mesh):
  """`tree` (a parameter-shaped share of the rows on `axes`) summed over the
  devices: reduce-scattered into `pspecs`, or psum to every device."""
  if pspecs is None:
    return jax.tree.map(lambda x: lax.psum(x, axes), tree)
  return jax.tree.map(
      lambda x, sp: _reduce_leaf(x, axes, sp, mesh), tree, pspecs
  )


def _out_specs(name: str, pspecs):
  """The shard_map out_specs of the product `name`: a replicated scalar for
  ggn_quad, (scalar, parameters) for loss_grad, the parameters otherwise."""
  spec = jax.sharding.PartitionSpec
  params_out = spec() if pspecs is None else pspecs
  return {"ggn_quad": spec(), "loss_grad": (spec(), params_out)}.get(
      name, params_out
  )


def _chunked(
    name: str, head: OutputHead, chunk_tokens: int, params_sharding=None
):
  """The one-batch product `name` through the output head, chunked.

  With `head.batch_sharding` it runs under `shard_map`: each device takes
  its rows of the batch and the whole parameters (gathered once per
  product), computes its rows' share, and the shares are summed over the
  devices, reduce-scattered straight into the parameters' layout
  (`params_sharding`; without it, psum to every device). No activation,
  logit or tangent of another device's rows is ever gathered: XLA's
  partitioner, left alone, gathers whole-batch activations on every device
  inside the forward-over-reverse products.
  """
  axes = head_lib.row_axes(head)
  local = head._replace(batch_sharding=None)
  spec = jax.sharding.PartitionSpec
  pspecs = (
      None
      if params_sharding is None
      else jax.tree.map(lambda s: s.spec, params_sharding)
  )
  sum_params = lambda tree, mesh: _sum_params(tree, axes, pspecs, mesh)
  out_specs = _out_specs(name, pspecs)

  def run(params, batch, v):
    rows = _Rows(local, batch, chunk_tokens)
    return _local_ops(rows)[name](params, v)

  def run_on_rows(params, batch, v, mesh):
    rows = _Rows(local, batch, chunk_tokens, axes)
    out = _local_ops(rows)[name](params, v)
    if name == "ggn_quad":
      return lax.psum(out, axes)
    if name == "loss_grad":
      return lax.psum(out[0], axes), sum_params(out[1], mesh)
    return sum_params(out, mesh)

  def one(params, batch, v=(), logits_fn=None):
    del logits_fn
    B = batch["inputs"].shape[0]
    mesh = head.batch_sharding.mesh if axes else None
    shards = math.prod(mesh.shape[a] for a in axes) if axes else 1
    if shards == 1 or B % shards:
      return run(params, batch, v)
    return jax.shard_map(
        lambda p, b, u: run_on_rows(p, b, u, mesh),
        mesh=mesh,
        in_specs=(spec(), spec(axes), spec()),
        out_specs=out_specs,
        check_vma=False,
    )(params, batch, v)

  return one


def _chunked_ops(head: OutputHead, chunk_tokens: int, params_sharding=None):
  """The one-batch products of the section above, output layer chunked."""
  ops = {
      k: _chunked(k, head, chunk_tokens, params_sharding)
      for k in ("hvp", "ggn_vp", "func", "ggn_quad")
  }
  loss_grad = _chunked("loss_grad", head, chunk_tokens, params_sharding)
  ops["loss_grad"] = lambda params, batch: loss_grad(params, batch)
  return ops


def _ops(
    logits_fn: LogitsFn,
    head: OutputHead | None,
    chunk_tokens: int = CHUNK_TOKENS,
    params_sharding=None,
):
  """The one-batch products {hvp, ggn_vp, func, ggn_quad: (params, batch,
  v, logits_fn) -> ...; loss_grad: (params, batch) -> (L, g)}: through
  `logits_fn` whole, or with `head` chunked over the sequence."""
  if head is not None:
    _check_count("chunk_tokens", chunk_tokens)
    return _chunked_ops(head, chunk_tokens, params_sharding)
  return {
      "hvp": _hvp_one,
      "ggn_vp": _ggn_vp_one,
      "func": _functional_vp_one,
      "ggn_quad": _ggn_quad_one,
      "loss_grad": lambda p, b: jax.value_and_grad(_loss)(p, b, logits_fn),
  }


# ------------------------------------------------------------ public API --


def hvp(
    params,
    batch: Batch,
    v,
    *,
    logits_fn: LogitsFn,
    head: OutputHead | None = None,
    chunk_tokens: int = CHUNK_TOKENS,
    params_sharding=None,
):
  """H v, exact, forward-over-reverse (jvp of grad). With `head` (the
  model's output layer) the logits run in chunks of `chunk_tokens` tokens
  per device (module docstring), and on a mesh the product comes out laid
  out as `params_sharding` (the parameters' NamedShardings) where given; so
  for every function below."""
  return _product(
      _ops(logits_fn, head, chunk_tokens, params_sharding)["hvp"],
      params,
      batch,
      v,
      logits_fn,
  )


def ggn_vp(
    params,
    batch: Batch,
    v,
    *,
    logits_fn: LogitsFn,
    head: OutputHead | None = None,
    chunk_tokens: int = CHUNK_TOKENS,
    params_sharding=None,
):
  """H_G v = J^T [d^2 L/dlogits^2] J v: jvp, softmax-CE Hessian, vjp."""
  return _product(
      _ops(logits_fn, head, chunk_tokens, params_sharding)["ggn_vp"],
      params,
      batch,
      v,
      logits_fn,
  )


def functional_hessian_vp(
    params,
    batch: Batch,
    v,
    *,
    logits_fn: LogitsFn,
    head: OutputHead | None = None,
    chunk_tokens: int = CHUNK_TOKENS,
    params_sharding=None,
):
  """H_F v = H v - H_G v (computed directly, see `_functional_vp_one`)."""
  return _product(
      _ops(logits_fn, head, chunk_tokens, params_sharding)["func"],
      params,
      batch,
      v,
      logits_fn,
  )


def loss_and_grad(
    params,
    batch: Batch,
    *,
    logits_fn: LogitsFn,
    head: OutputHead | None = None,
    chunk_tokens: int = CHUNK_TOKENS,
    params_sharding=None,
):
  """(L, dL/dtheta); on a [K, B, L] batch the mean over the K batches."""
  params = _upcast(params)
  loss_grad = _ops(logits_fn, head, chunk_tokens, params_sharding)["loss_grad"]
  return _over_batches(lambda b: loss_grad(params, b), batch)


def _split(
    params, batch: Batch, e, logits_fn: LogitsFn, ops, params_sharding=None
) -> dict[str, jax.Array]:
  """tau_logit, tau_func, tau_cross (eq. 9) of H e for a direction e."""
  e_norm = tree_math.norm(e)
  e = jax.tree.map(lambda x: x / jnp.where(e_norm > 0, e_norm, 1.0), e)
  d_logit = _product(ops["ggn_vp"], params, batch, e, logits_fn)
  params, e = (_keep(t, params_sharding) for t in _after((params, e), d_logit))
  d_func = _product(ops["func"], params, batch, e, logits_fn)
  delta = jax.tree.map(jnp.add, d_logit, d_func)  # = H e
  logit_sq = tree_math.vdot(d_logit, d_logit)
  func_sq = tree_math.vdot(d_func, d_func)
  cross = 2.0 * tree_math.vdot(d_logit, d_func)
  delta_sq = tree_math.vdot(delta, delta)
  return {
      "tau_logit": logit_sq / delta_sq,
      "tau_func": func_sq / delta_sq,
      "tau_cross": cross / delta_sq,
      "delta_logit_norm": jnp.sqrt(logit_sq),
      "delta_func_norm": jnp.sqrt(func_sq),
      "delta_norm": jnp.sqrt(delta_sq),
  }


def preconditioned(grads, precond):
  """P^-1 g: the direction of the preconditioned SAM perturbation (eq. 12)."""
  return jax.tree.map(lambda g, p: g / p.astype(g.dtype), grads, precond)


def decomposition(
    params,
    batch: Batch,
    *,
    logits_fn: LogitsFn,
    direction=None,
    precond=None,
    head: OutputHead | None = None,
    chunk_tokens: int = CHUNK_TOKENS,
    params_sharding=None,
) -> dict[str, jax.Array]:
  """Logit / functional split of the sharpness gradient H e (eqs. 6, 7, 9).

  e = g/||g|| (the SAM direction) unless `direction` is given (normalised
  here); with `precond` (P, same tree as params, e.g. AdamW's sqrt(nu_hat) +
  eps) e = P^-1 g / ||P^-1 g||, the preconditioned methods' direction.
  delta_logit = H_G e, delta_func = H_F e, delta = H e; the taus
  tau_logit + tau_func + tau_cross = 1 (NaN if H e = 0). Returns scalars:
  loss, grad_norm, tau_logit, tau_func, tau_cross, delta_logit_norm,
  delta_func_norm, delta_norm.
  """
  params = _upcast(params)
  ops = _ops(logits_fn, head, chunk_tokens, params_sharding)
  loss, grad = loss_and_grad(
      params,
      batch,
      logits_fn=logits_fn,
      head=head,
      chunk_tokens=chunk_tokens,
      params_sharding=params_sharding,
  )
  e = grad if direction is None else _like(direction, params)
  if precond is not None:
    e = preconditioned(e, _like(precond, params))
  params = _keep(_after(params, e), params_sharding)
  return {
      "loss": loss,
      "grad_norm": tree_math.norm(grad),
      **_split(params, batch, e, logits_fn, ops, params_sharding),
  }


def _coefficients(basis_K, w) -> jax.Array:
  """[K]: <q_i, w> for every vector q_i of a stacked basis (leaves [K, ...])."""
  return sum(
      jnp.tensordot(b, x, axes=x.ndim, precision=lax.Precision.HIGHEST)
      for b, x in zip(jax.tree.leaves(basis_K), jax.tree.leaves(w))
  )


def _combination(basis_K, c_K):
  """sum_i c_i q_i over a stacked basis, parameter-shaped."""
  return jax.tree.map(
      lambda b: jnp.tensordot(
          c_K.astype(b.dtype), b, axes=1, precision=lax.Precision.HIGHEST
      ),
      basis_K,
  )


def _ritz(alpha_K, beta_K, b, j, tol):
  """(theta, s_K, done): the largest-magnitude eigenpair of the Lanczos
  tridiagonal after step j (diagonal alpha_K, off-diagonal beta_K; b the new
  residual's norm), and whether its residual |b s_j| <= tol |theta|."""
  off_K = beta_K[:-1]  # beta_K[j] is not yet set: T is the leading j+1 block
  t_KxK = jnp.diag(alpha_K) + jnp.diag(off_K, 1) + jnp.diag(off_K, -1)
  evals_K, evecs_KxK = jnp.linalg.eigh(t_KxK)
  i = jnp.argmax(jnp.abs(evals_K))
  theta, s_K = evals_K[i], evecs_KxK[:, i]
  tiny = jnp.finfo(alpha_K.dtype).tiny
  done = (jnp.abs(b * s_K[j]) <= tol * jnp.abs(theta)) | (b <= tiny)
  return theta, s_K, done


def _lanczos_init(params, rng, k: int, keep, keep_basis, dtype):
  """Lanczos's first state (j, basis, alpha, beta, theta, s, done): the
  [k, ...] basis stacks hold a random unit vector first, zeros after."""
  q0 = keep(_random_like(rng, params, jax.random.normal))
  q0 = jax.tree.map(lambda x: x / tree_math.norm(q0), q0)
  basis_K = keep_basis(
      jax.tree.map(
          lambda q: jnp.zeros((k,) + q.shape, q.dtype).at[0].set(q), q0
      )
  )
  zeros_K = jnp.zeros((k,), dtype)
  zero, done = jnp.zeros((), dtype), jnp.array(False)
  return jnp.int32(0), basis_K, zeros_K, zeros_K, zero, zeros_K, done


def _orthogonalize(basis_K, w, keep):
  """`w` less its projection on the basis: classical Gram-Schmidt twice
  (unused rows of the basis are zero)."""
  for _ in range(2):
    w = jax.tree.map(
        jnp.subtract,
        w,
        keep(_combination(basis_K, _coefficients(basis_K, w))),
    )
  return w


def _lanczos_body(matvec, keep, keep_basis, tol: float, dtype):
  """One Lanczos iteration (`lambda_max`'s while-loop body): the product
  with the j-th basis vector, reorthogonalised; alpha_j, beta_j, the next
  basis vector and the Ritz pair so far."""

  def body(state):
    j, basis_K, alpha_K, beta_K, _, _, _ = state
    q = keep(jax.tree.map(lambda b: b[j], basis_K))
    w = keep(matvec(q))
    alpha_K = alpha_K.at[j].set(tree_math.vdot(q, w))
    w = _orthogonalize(basis_K, w, keep)
    b = tree_math.norm(w)
    theta, s_K, done = _ritz(alpha_K, beta_K, b, j, tol)
    tiny = jnp.finfo(dtype).tiny
    basis_K = keep_basis(
        jax.tree.map(
            lambda B, x: B.at[j + 1].set(x / jnp.maximum(b, tiny), mode="drop"),
            basis_K,
            w,
        )
    )
    return j + 1, basis_K, alpha_K, beta_K.at[j].set(b), theta, s_K, done

  return body


def lambda_max(
    params,
    batch: Batch,
    *,
    logits_fn: LogitsFn,
    num_iters: int = 20,
    tol: float = 1e-3,
    rng: jax.Array,
    params_sharding=None,
    head: OutputHead | None = None,
    chunk_tokens: int = CHUNK_TOKENS,
):
  """Largest-magnitude eigenvalue of H by Lanczos with full reorthogonalisation.

  At most `num_iters` Hessian-vector products; stops once the Ritz residual
  ||H y - theta y|| <= tol |theta|, which bounds the relative distance of
  theta to an eigenvalue of H by tol. Memory: the Krylov basis, num_iters
  copies of the parameters, kept parameter-shaped (one [num_iters, ...] stack
  per parameter); with `params_sharding` (the parameters' NamedShardings)
  each stack is split over the mesh like its parameter, so the basis spreads
  over the devices as the model does (at 1208M, 20 float32 copies are 107 GB
  on one device). Returns (eigenvalue, unit eigenvector as a params tree,
  iterations used); the eigenvalue is signed (away from a minimum it may be
  negative).
  """
  _check_count("num_iters", num_iters)
  params = _upcast(params)
  dtype = jnp.result_type(*jax.tree.leaves(params))
  k = min(num_iters, sum(x.size for x in jax.tree.leaves(params)))
  keep = lambda t: _keep(t, params_sharding)
  keep_basis = lambda t: _keep(t, params_sharding, stacked=True)

  init = _lanczos_init(params, rng, k, keep, keep_basis, dtype)

  def cond(state):
    j, _, _, _, _, _, done = state
    return (j < k) & ~done

  def matvec(q):
    # params tied to this iteration: else XLA hoists the product's gather of
    # the whole parameters out of the loop and holds it across every step.
    return hvp(
        keep(_after(params, q)),
        batch,
        q,
        logits_fn=logits_fn,
        head=head,
        chunk_tokens=chunk_tokens,
        params_sharding=params_sharding,
    )

  body = _lanczos_body(matvec, keep, keep_basis, tol, dtype)
  iters, basis_K, _, _, theta, s_K, _ = lax.while_loop(cond, body, init)
  y = keep(_combination(basis_K, s_K))
  y_norm = tree_math.norm(y)
  return theta, jax.tree.map(lambda x: x / y_norm, y), iters


def _hutchinson(
    quad_one, params, batch, logits_fn, num_probes, rng, params_sharding=None
):
  """Mean and standard error of z^T A z over Rademacher probes z (one
  parameter-shaped probe alive at a time, split like the parameters)."""
  _check_count("num_probes", num_probes)
  params = _upcast(params)

  def probe(key):
    z = _keep(_random_like(key, params, jax.random.rademacher), params_sharding)
    # gathered per probe, not hoisted (`lambda_max`)
    p = _keep(_after(params, z), params_sharding)
    return _over_batches(lambda b: quad_one(p, b, z, logits_fn), batch)

  values_N = lax.map(probe, jax.random.split(rng, num_probes))
  stderr = (
      jnp.std(values_N, ddof=1) / math.sqrt(num_probes)
      if num_probes > 1
      else jnp.full((), jnp.nan, values_N.dtype)
  )
  return jnp.mean(values_N), stderr


def hessian_trace(
    params,
    batch: Batch,
    *,
    logits_fn: LogitsFn,
    num_probes: int,
    rng: jax.Array,
    params_sharding=None,
    head: OutputHead | None = None,
    chunk_tokens: int = CHUNK_TOKENS,
):
  """Hutchinson tr(H): returns (estimate, standard error; NaN for 1 probe).
  `params_sharding`: as in `lambda_max`, for the probes."""
  hvp_one = _ops(logits_fn, head, chunk_tokens, params_sharding)["hvp"]

  def quad_one(p, b, z, f):
    return tree_math.vdot(z, hvp_one(p, b, z, f))

  return _hutchinson(
      quad_one, params, batch, logits_fn, num_probes, rng, params_sharding
  )


def ggn_trace(
    params,
    batch: Batch,
    *,
    logits_fn: LogitsFn,
    num_probes: int,
    rng: jax.Array,
    params_sharding=None,
    head: OutputHead | None = None,
    chunk_tokens: int = CHUNK_TOKENS,
):
  """Hutchinson tr(H_G) with forward-mode z^T H_G z: (estimate, stderr)."""
  return _hutchinson(
      _ops(logits_fn, head, chunk_tokens, params_sharding)["ggn_quad"],
      params,
      batch,
      logits_fn,
      num_probes,
      rng,
      params_sharding,
  )


def sam_edge(lr, rho, grad_norm) -> jax.Array:
  """Long & Bartlett's SAM edge of stability: the lambda > 0 solving

  lr * lambda * (1 + rho * lambda / ||g||) = 2, written in the rationalised
  form 4 / (lr (1 + sqrt(1 + 8 rho / (lr ||g||)))): exactly 2/lr at rho = 0,
  stable for small rho, and 0 (not NaN) when ||g|| = 0 < rho.
  """
  lr, rho, grad_norm = (
      jnp.asarray(x, jnp.result_type(float)) for x in (lr, rho, grad_norm)
  )
  denom = lr * grad_norm
  ratio = jnp.where(rho == 0, 0.0, rho / jnp.where(rho == 0, 1.0, denom))
  return 4.0 / (lr * (1.0 + jnp.sqrt(1.0 + 8.0 * ratio)))


def _check_lr_rho(lr, rho) -> None:
  """ValueError on a concrete lr <= 0 or rho < 0 (traced values pass)."""
  if isinstance(lr, (int, float)) and not lr > 0:
    raise ValueError(f"lr={lr!r} must be > 0; pass the step's learning rate")
  if isinstance(rho, (int, float)) and not rho >= 0:
    raise ValueError(
        f"rho={rho!r} must be >= 0; pass the SAM radius (0 " "for no SAM)"
    )


def measure(
    params,
    batch: Batch,
    *,
    logits_fn: LogitsFn,
    lr,
    rho,
    num_iters: int,
    num_probes: int,
    rng: jax.Array,
    direction=None,
    tol: float = 1e-3,
    precond=None,
    params_sharding=None,
    head: OutputHead | None = None,
    chunk_tokens: int = CHUNK_TOKENS,
) -> dict[str, jax.Array]:
  """Every sharpness number the training loop and `nanodo-sam analyze` log.

  Keys: loss, grad_norm, tau_logit, tau_func, tau_cross, lambda_max,
  hessian_trace, hessian_trace_stderr, ggn_trace, ggn_trace_stderr,
  sam_edge (at this grad_norm), two_over_lr. Both traces use the same probes,
  so their difference tr(H_F) has the smaller common-probe variance.
  num_iters=0 leaves out lambda_max, num_probes=0 the traces (the taus alone
  cost a few passes: Figures 2 and 4 along a whole run). With
  `precond` (AdamW's P) also tau_logit_precond, tau_func_precond,
  tau_cross_precond: the split along e = P^-1 g / ||P^-1 g|| at the same
  parameters (paper, appendix B: preconditioning shifts it towards the
  functional path). `params_sharding` (the parameters' NamedShardings)
  splits the Lanczos basis and the probes like the parameters; `head`
  (the model's output layer, its `batch_sharding` set on a mesh) chunks the
  logits by `chunk_tokens` tokens per device and keeps them split by rows.
  """
  _check_count("num_iters", num_iters, allow_zero=True)
  _check_count("num_probes", num_probes, allow_zero=True)
  _check_lr_rho(lr, rho)
  eig_rng, trace_rng = jax.random.split(rng)
  common = dict(
      logits_fn=logits_fn,
      params_sharding=params_sharding,
      head=head,
      chunk_tokens=chunk_tokens,
  )
  dec = decomposition(params, batch, direction=direction, **common)
  names = ("loss", "grad_norm", "tau_logit", "tau_func", "tau_cross")
  out = {k: dec[k] for k in names}
  if num_iters:
    params = _keep(_after(params, out), params_sharding)
    out["lambda_max"], _, _ = lambda_max(
        params, batch, num_iters=num_iters, tol=tol, rng=eig_rng, **common
    )
  if num_probes:
    traces = dict(num_probes=num_probes, rng=trace_rng, **common)
    params = _traces_into(out, params, batch, traces)
  out["sam_edge"] = sam_edge(lr, rho, dec["grad_norm"])
  out["two_over_lr"] = 2.0 / jnp.asarray(lr, jnp.result_type(float))
  if precond is not None:
    out.update(_precond_taus(_after(params, out), batch, precond, **common))
  return out


def _traces_into(out: dict, params, batch: Batch, traces: dict):
  """Adds the Hessian and GGN traces (and their standard errors) to `out`,
  each pass tied to the one before it; returns the parameters so tied."""
  params_sharding = traces["params_sharding"]
  params = _keep(_after(params, out), params_sharding)
  out["hessian_trace"], out["hessian_trace_stderr"] = hessian_trace(
      params, batch, **traces
  )
  params = _keep(_after(params, out), params_sharding)
  out["ggn_trace"], out["ggn_trace_stderr"] = ggn_trace(params, batch, **traces)
  return params


def _precond_taus(
    params, batch, precond, *, logits_fn, params_sharding, head, chunk_tokens
) -> dict:
  """tau_{logit,func,cross}_precond: the split along e = P^-1 g / ||P^-1 g||
  at float32 parameters."""
  params32 = _keep(_upcast(params), params_sharding)
  _, grad = loss_and_grad(
      params32,
      batch,
      logits_fn=logits_fn,
      params_sharding=params_sharding,
      head=head,
      chunk_tokens=chunk_tokens,
  )
  params32 = _keep(_after(params32, grad), params_sharding)
  split = _split(
      params32,
      batch,
      preconditioned(grad, _like(precond, params32)),
      logits_fn,
      _ops(logits_fn, head, chunk_tokens, params_sharding),
      params_sharding,
  )
  return {
      f"{k}_precond": split[k] for k in ("tau_logit", "tau_func", "tau_cross")
  }


def edge_of_stability(
    params,
    batch: Batch,
    sam_grads,
    *,
    logits_fn: LogitsFn,
    lr,
    rho,
    num_iters: int,
    rng: jax.Array,
    tol: float = 1e-3,
    params_sharding=None,
    head: OutputHead | None = None,
    chunk_tokens: int = CHUNK_TOKENS,
) -> dict[str, jax.Array]:
  """Long & Bartlett's quantities on one (training) minibatch.

  lambda_max of H on `batch`, ||g||, SAM-edge and 2/lr, and how much of g and
  of the SAM-family gradient `sam_grads` lies along the top eigenvector
  (|cos| with it). `params_sharding`, `head`, `chunk_tokens`: as in
  `measure`.
  """
  chunked = dict(head=head, chunk_tokens=chunk_tokens)
  lam, vec, iters = lambda_max(
      params,
      batch,
      logits_fn=logits_fn,
      num_iters=num_iters,
      tol=tol,
      rng=rng,
      params_sharding=params_sharding,
      **chunked,
  )
  _, g = loss_and_grad(
      params,
      batch,
      logits_fn=logits_fn,
      params_sharding=params_sharding,
      **chunked,
  )
  g, sam_grads = _upcast(g), _upcast(sam_grads)
  g_norm = tree_math.norm(g)
  tiny = jnp.finfo(g_norm.dtype).tiny
  return {
      "lambda_max": lam,
      "lanczos_iters": iters,
      "grad_norm": g_norm,
      "sam_edge": sam_edge(lr, rho, g_norm),
      "two_over_lr": 2.0 / jnp.asarray(lr, jnp.result_type(float)),
      "grad_alignment": (
          jnp.abs(tree_math.vdot(g, vec)) / jnp.maximum(g_norm, tiny)
      ),
      "sam_grad_alignment": (
          jnp.abs(tree_math.vdot(sam_grads, vec))
          / jnp.maximum(tree_math.norm(sam_grads), tiny)
      ),
  }
