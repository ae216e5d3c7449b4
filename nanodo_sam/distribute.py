"""How a step's gradient is accumulated and where it is perturbed.

sam.py has one batch's equations (`sam.method_gradient`); this module runs
them over a batch split into microbatches and over the devices' groups, as
the config asks (`sam.perturbation_scope`, `grad_accumulation_steps`, the
mesh). The strategy is chosen once per compiled step (`strategy`):

  single       one microbatch: the equations on the whole batch
  global       eps from the whole batch's gradient (the paper's semantics):
               one scan for g, a second for the method's gradient at eps
  grouped      global on a mesh: parameters gathered once per step, each
               group of devices accumulating its part (`Groups`)
  microbatch   each microbatch its own eps (m-sharpness); also every method
               without a second pass (the plain step, lookahead methods)
  replica      each data-parallel shard its own eps (`shard_map`)

Microbatches and shards are weighted by their share of the loss weights, so
single, global and grouped give the same step, padding included. It
imports sam.py and head.py, never the model.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from nanodo_sam import head as head_lib
from nanodo_sam import keys
from nanodo_sam import sam as sam_lib
from nanodo_sam import tree_math
from nanodo_sam.loss import LogitsFn, OutputHead
from nanodo_sam.sam import Options, Reuse, Step, cast_like, clean_vjp

PyTree = Any
# The allowed values of sam.perturbation_scope: the key table's.
PERTURBATION_SCOPES = keys.BY_NAME["sam.perturbation_scope"].choices


class GradientResult(NamedTuple):
  """What a strategy returns (unpacks as 4 values)."""

  loss: jax.Array  # at the unperturbed params
  grads: PyTree  # the method's gradient
  metrics: dict[str, jax.Array]
  reuse: Reuse | None = None  # Reuse(grads - g, ||g||) with return_reuse


class Groups(NamedTuple):
  """How a step splits over the devices' groups.

  `batch_sharding` splits a batch's rows G ways (`sharding.batch_sharding`)
  and `params_sharding` is the parameters' layout, where the summed
  gradients go; `logits_fn` and `head` are the model's without sharding
  constraints (they run on one group's rows with whole parameters); `cast`
  (optional) the model's cast to its compute dtype, applied before the
  gather so that it moves compute-dtype weights.
  """

  batch_sharding: Any
  params_sharding: Any
  logits_fn: LogitsFn
  head: OutputHead | None = None
  cast: Callable[[PyTree], PyTree] | None = None


def validate_scope(perturbation_scope: str) -> None:
  """ValueError (one line) unless the scope is one of the key table's."""
  if perturbation_scope not in PERTURBATION_SCOPES:
    raise ValueError(
        f"sam.perturbation_scope={perturbation_scope!r} is "
        "unknown; use 'global' (eps from the whole batch), "
        "'microbatch' (each microbatch its own eps) or "
        "'replica' (each data-parallel shard its own eps)"
    )


def strategy_name(
    method: str,
    perturbation_scope: str = "global",
    num_microbatches: int = 1,
    groups: Groups | None = None,
) -> str:
  """Which strategy of the module docstring runs a step. "replica" needs
  `groups` (else it is "global"); a `lookahead` method's passes are all at
  the same theta + eps, whatever the scope."""
  entry = sam_lib.METHODS[method]
  if perturbation_scope == "replica" and groups is not None:
    return "replica"
  if num_microbatches == 1:
    return "single"
  if groups is not None and perturbation_scope == "global":
    return "grouped"
  if (
      perturbation_scope == "microbatch"
      or not entry.perturbs
      or entry.lookahead
  ):
    return "microbatch"
  return "global"


def strategy(
    method: str,
    *,
    logits_fn: LogitsFn,
    head: OutputHead | None = None,
    perturbation_scope: str = "global",
    num_microbatches: int = 1,
    groups: Groups | None = None,
):
  """The step's gradient, chosen once: a function (params, batch, *, rho,
  opts: sam.Options, return_reuse=False) -> GradientResult.

  return_reuse=True also fills `reuse` with `Reuse(delta = grads - g, ||g||)`,
  what the steps in between carry forward (`sam.reuse_correction`).
  """
  validate_scope(perturbation_scope)
  name = strategy_name(method, perturbation_scope, num_microbatches, groups)
  run = _STRATEGIES[name]
  ctx = dict(
      entry=sam_lib.METHODS[method],
      method=method,
      k=num_microbatches,
      logits_fn=logits_fn,
      head=head,
      groups=groups,
  )

  def gradient(
      params, batch, *, rho, opts: Options, return_reuse: bool = False
  ) -> GradientResult:
    loss, grads, g, metrics = run(
        params, batch, rho=rho, opts=opts, keep_g=return_reuse, **ctx
    )
    return _gradient_result(loss, grads, g, metrics, return_reuse)

  return gradient


def accumulated_gradient(
    method: str,
    params: PyTree,
    batch: dict[str, Any],
    *,
    logits_fn: LogitsFn,
    rho,
    precond=None,
    momentum=None,
    num_microbatches: int = 1,
    perturbation_scope: str = "global",
    return_reuse: bool = False,
    head: OutputHead | None = None,
    groups: Groups | None = None,
    **options,
) -> GradientResult:
  """`sam.gradient` over `num_microbatches` microbatches (lax.scan), each
  perturbed as `perturbation_scope` says (`strategy`): validated, then run
  once. `options`: the method's options by name, as for `sam.gradient`."""
  sam_lib.validate(method, rho, **options)
  run = strategy(
      method,
      logits_fn=logits_fn,
      head=head,
      perturbation_scope=perturbation_scope,
      num_microbatches=num_microbatches,
      groups=groups,
  )
  return run(
      params,
      batch,
      rho=rho,
      opts=Options(options, precond, momentum),
      return_reuse=return_reuse,
  )


def _gradient_result(
    loss, grads, g, metrics, return_reuse: bool
) -> GradientResult:
  """A strategy's result; with `return_reuse` also what the reuse steps
  carry: Reuse(grads - g in float32, ||g||)."""
  if not return_reuse:
    return GradientResult(loss, grads, metrics)
  delta = jax.tree.map(
      lambda a, b: a.astype(jnp.float32) - b.astype(jnp.float32), grads, g
  )
  return GradientResult(loss, grads, metrics, Reuse(delta, tree_math.norm(g)))


# ----------------------------------------------------- one device's batch


def _microbatches(batch: dict[str, Any], k: int):
  """[B, ...] -> [k, B/k, ...] and each microbatch's share of the weights.

  Microbatch i takes rows i, i+k, i+2k, ...: with the batch split over n =
  data x fsdp devices (B divisible by n k), every device holds B/(n k) rows of
  every microbatch, so each scan step runs on all devices without moving the
  batch (contiguous blocks would make XLA gather it).
  """
  micro = jax.tree.map(
      lambda x: x.reshape((x.shape[0] // k, k) + x.shape[1:]).swapaxes(0, 1),
      batch,
  )
  w_k = jnp.sum(
      micro["weights"].astype(jnp.float32),
      axis=tuple(range(1, micro["weights"].ndim)),
  )
  return micro, w_k / jnp.maximum(jnp.sum(w_k), 1.0)


def _single(params, batch, *, entry, rho, opts, logits_fn, head, **_):
  """(loss, grads, g, metrics): the equations on the whole batch."""
  return sam_lib.method_gradient(
      entry, params, batch, logits_fn=logits_fn, rho=rho, opts=opts, head=head
  )


def _per_microbatch(
    params,
    batch,
    *,
    entry,
    k: int,
    keep_g: bool,
    rho,
    opts,
    logits_fn,
    head,
    **_,
):
  """(loss, grads, g or None, metrics): the equations on each of k
  microbatches (its own eps, for a perturbing method), summed by weight."""
  micro, frac_k = _microbatches(batch, k)

  def one(mb):
    loss, grads, g, metrics = sam_lib.method_gradient(
        entry, params, mb, logits_fn=logits_fn, rho=rho, opts=opts, head=head
    )
    return loss, grads, (g if keep_g else None), metrics

  shapes = jax.eval_shape(one, jax.tree.map(lambda x: x[0], micro))
  loss, grads, g, metrics = tree_math.scan_sum(one, micro, frac_k, shapes)
  return loss, cast_like(grads, params), g, metrics


def _global_accumulation(
    params, batch, *, entry, k: int, logits_fn, rho, opts: Options, head, **_
):
  """(loss, grads, g, metrics) with eps from the whole batch's gradient:
  one scan over the k microbatches for g, a second for the method's
  gradient at theta + eps. Costs one extra clean forward per microbatch for
  the methods that need dL/dF(theta) in the second scan (XLA drops what a
  method does not use)."""
  rho = jnp.asarray(rho, jnp.result_type(float))
  micro, frac_k = _microbatches(batch, k)

  def clean(mb):
    c = clean_vjp(params, mb, logits_fn, head)
    return c.loss, c.grads

  shapes = jax.eval_shape(clean, jax.tree.map(lambda x: x[0], micro))
  loss, g = tree_math.scan_sum(clean, micro, frac_k, shapes)
  eps = sam_lib.perturb(entry, params, g, rho, opts)
  params_eps = sam_lib.shift(params, eps)

  def perturbed(mb):
    return entry(
        Step(
            clean_vjp(params, mb, logits_fn, head),
            params_eps,
            mb,
            logits_fn,
            opts,
            head,
        )
    )

  grads = cast_like(tree_math.scan_sum(perturbed, micro, frac_k, g), params)
  grads = sam_lib.combine(entry, grads, cast_like(g, params), opts)
  return loss, grads, g, sam_lib.step_metrics(grads, g, eps, rho)


# ------------------------------------------------- the devices' groups


def _as_head(groups: Groups) -> OutputHead:
  """A head that only carries the groups' batch sharding (head.keep_rows)."""
  return OutputHead(None, None, None, groups.batch_sharding)


def _grouped(groups: Groups, tree: PyTree) -> PyTree:
  """Every leaf's axis 0 (the groups) split like the batch's rows."""
  head = _as_head(groups)
  return jax.tree.map(lambda x: head_lib.keep_rows(head, x), tree)


def _per_group(groups: Groups, params: PyTree) -> PyTree:
  """params (cast to the compute dtype on their shards) gathered once, whole
  on every device, and seen as one copy per group [G, ...], each on its
  group's devices (no data moves)."""
  G = head_lib.batch_shards(_as_head(groups))
  if groups.cast is not None:
    params = jax.lax.with_sharding_constraint(
        groups.cast(params), groups.params_sharding
    )
  whole = head_lib.replicated(_as_head(groups), params)
  return _grouped(
      groups, jax.tree.map(lambda x: jnp.broadcast_to(x, (G,) + x.shape), whole)
  )


def _grouped_sum(fn, params_G, micro_kxG, frac_kxG, like, groups: Groups):
  """sum over microbatches i and groups j of frac_ij * fn(params_j, mb_ij),
  each group accumulating its own sum on its devices ([G, ...] f32); summed
  over the groups once at the end (a reduce-scatter into the parameters'
  layout when the caller constrains it)."""
  run = jax.vmap(fn)
  G = frac_kxG.shape[1]
  like_G = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct((G,) + x.shape, x.dtype), like
  )
  acc = tree_math.scan_sum(
      lambda mb: run(params_G, mb),
      micro_kxG,
      frac_kxG,
      like_G,
      constrain=lambda t: _grouped(groups, t),
  )
  return jax.tree.map(lambda x: jnp.sum(x, axis=0), acc)


def _to_params_layout(groups: Groups, grads: PyTree, params: PyTree):
  """The summed gradient in the parameters' dtype and layout."""
  return jax.lax.with_sharding_constraint(
      cast_like(grads, params), groups.params_sharding
  )


def _group_microbatches(batch, k: int, G: int):
  """[B, ...] -> [k, G, B/(k G), ...] and each piece's share of the weights:
  microbatch i takes rows i, i+k, ... as `_microbatches` does; within it,
  group j the rows on group j's devices."""
  micro, _ = _microbatches(batch, k)
  micro = jax.tree.map(
      lambda x: x.reshape((k, G, x.shape[1] // G) + x.shape[2:]), micro
  )
  w = micro["weights"].astype(jnp.float32)
  w_kxG = jnp.sum(w, axis=tuple(range(2, w.ndim)))
  return micro, w_kxG / jnp.maximum(jnp.sum(w_kxG), 1.0)


def _grouped_accumulation(
    params, batch, *, entry, rho, opts: Options, k: int, groups: Groups, **_
):
  """The global scope's result with one gather of theta (and one of
  theta + eps) per step and one reduction per scan (a lookahead method: one
  gather of theta + eps, its one pass there)."""
  rho = jnp.asarray(rho, jnp.result_type(float))
  G = head_lib.batch_shards(_as_head(groups))
  logits_fn, head = groups.logits_fn, groups.head
  micro, frac = _group_microbatches(batch, k, G)
  ahead = (
      sam_lib.perturb(entry, params, None, rho, opts)
      if entry.lookahead
      else None
  )
  params_G = _per_group(
      groups, params if ahead is None else sam_lib.shift(params, ahead)
  )

  def clean(p, mb):
    c = clean_vjp(p, mb, logits_fn, head)
    return c.loss, c.grads

  one = jax.tree.map(lambda x: x[0, 0], micro)
  like = jax.eval_shape(clean, jax.tree.map(lambda x: x[0], params_G), one)
  loss, g = _grouped_sum(clean, params_G, micro, frac, like, groups)
  g = _to_params_layout(groups, g, params)
  if not entry.perturbs or entry.lookahead:
    return loss, g, g, sam_lib.step_metrics(g, g, ahead, rho)
  eps = sam_lib.perturb(entry, params, g, rho, opts)
  both_G = (params_G, _per_group(groups, sam_lib.shift(params, eps)))

  def perturbed(both, mb):
    p, p_eps = both
    return entry(
        Step(
            clean_vjp(p, mb, logits_fn, head), p_eps, mb, logits_fn, opts, head
        )
    )

  grads = _to_params_layout(
      groups, _grouped_sum(perturbed, both_G, micro, frac, g, groups), params
  )
  grads = sam_lib.combine(entry, grads, g, opts)
  return loss, grads, g, sam_lib.step_metrics(grads, g, eps, rho)


def _replica_gradient(
    params, batch, *, method, rho, opts: Options, k: int, groups: Groups, **_
):
  """perturbation_scope='replica': shard_map over the batch's axes
  (`groups.batch_sharding`); each of the G shards takes the whole method on
  its B/G rows (its own eps from its own gradient: m-sharpness with m = B/G,
  the data-parallel default of Foret et al.'s code and optax.contrib.sam's
  `batch_axis_name`), over k microbatches with the global scope inside the
  shard; the results are averaged with each shard's share of the loss
  weights. The parameters are gathered whole onto every device."""
  axes = head_lib.row_axes(_as_head(groups))
  run = strategy(
      method, logits_fn=groups.logits_fn, head=groups.head, num_microbatches=k
  )

  def local(args, batch):
    params, precond, momentum, rho = args
    res = run(
        params,
        batch,
        rho=rho,
        opts=Options(opts.values, precond, momentum),
        return_reuse=True,
    )
    g = jax.tree.map(
        lambda x, d: x.astype(jnp.float32) - d, res.grads, res.reuse.delta
    )
    w = jnp.sum(batch["weights"].astype(jnp.float32))
    frac = w / jnp.maximum(jax.lax.psum(w, axes), 1.0)
    mean = lambda tree: jax.tree.map(
        lambda x: jax.lax.psum(frac * x.astype(jnp.float32), axes), tree
    )
    return mean((res.loss, res.grads, g, res.metrics))

  args = (params, opts.precond, opts.momentum, jnp.asarray(rho, jnp.float32))
  specs = (
      jax.tree.map(lambda _: PartitionSpec(), args),
      jax.tree.map(lambda _: PartitionSpec(axes), batch),
  )
  loss, grads, g, metrics = jax.shard_map(
      local,
      mesh=groups.batch_sharding.mesh,
      in_specs=specs,
      out_specs=PartitionSpec(),
      check_vma=False,
  )(args, batch)
  return (
      loss,
      _to_params_layout(groups, grads, params),
      _to_params_layout(groups, g, params),
      metrics,
  )


_STRATEGIES = {
    "single": _single,
    "global": _global_accumulation,
    "grouped": _grouped_accumulation,
    "microbatch": _per_microbatch,
    "replica": _replica_gradient,
}
