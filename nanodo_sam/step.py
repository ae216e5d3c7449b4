"""The jitted train step: a pure `(state, batch) -> (state, metrics)` per
gradient kind (`sam_schedule.step_kind`: plain, SAM-family, reuse), with
explicit shardings and the state donated.

Its own module so that `state.setup` can compile it (to fit the microbatches
to a device's memory) without importing the training loop; `train` re-exports
`make_train_step`, `jit_train_step` and `jit_step`.
"""

from __future__ import annotations

import math

import jax
import optax

from nanodo_sam import distribute
from nanodo_sam import keys
from nanodo_sam import model as model_lib
from nanodo_sam import optimizer as optimizer_lib
from nanodo_sam import sam as sam_lib
from nanodo_sam import sam_schedule
from nanodo_sam import sharding
from nanodo_sam import tree_math
from nanodo_sam.errors import UsageError


def make_train_step(s, method: str, correct: bool = False):
  """The pure step for one gradient method (jitted by `jit_train_step`).

  With sam.reuse on, a SAM-family step also stores `Reuse(g_method - g,
  ||g||)` in the state, and `correct=True` (the plain method) builds the cheap
  step in between: the plain gradient plus that difference rescaled to the
  current ||g|| (`sam.reuse_correction`), one forward and one backward.
  """
  cfg = s.cfg
  sam_cfg = cfg.sam
  schedule = optimizer_lib.learning_rate_schedule(cfg.opt)
  store = _check_reuse(sam_cfg, method, correct)
  groups = device_groups(s)
  gradient = distribute.strategy(
      method,
      logits_fn=s.logits_fn,
      head=s.head,
      perturbation_scope=sam_cfg.perturbation_scope,
      num_microbatches=cfg.grad_accumulation_steps,
      groups=groups,
  )
  options = sam_lib.config_options(sam_cfg, method)
  sam_lib.validate(method, sam_cfg.rho, **options)

  def step_fn(state, batch):
    rho = sam_schedule.rho_at(sam_cfg, state.step, cfg.opt)
    precond = (
        optimizer_lib.adam_precond(state.opt_state, cfg.opt)
        if method in sam_lib.PRECOND_METHODS
        else None
    )
    momentum = (
        optimizer_lib.first_moment(state.opt_state)
        if method in sam_lib.MOMENTUM_METHODS
        else None
    )
    out = gradient(
        state.params,
        batch,
        rho=rho,
        opts=sam_lib.Options(options, precond, momentum),
        return_reuse=store,
    )
    grads, metrics = out.grads, out.metrics
    reuse = out.reuse if store else state.reuse
    if correct:
      grads = sam_lib.reuse_correction(out.grads, reuse.delta, reuse.grad_norm)
      metrics = dict(metrics, cosine=sam_lib.cosine(grads, out.grads), rho=rho)
    metrics = dict(metrics, loss=out.loss, learning_rate=schedule(state.step))
    return _update(s.tx, state, grads, metrics, reuse)

  return step_fn


def _check_reuse(sam_cfg, method: str, correct: bool) -> bool:
  """Whether the step stores `sam.Reuse` (sam.reuse on, a SAM-family
  method); ValueError if `correct` is asked of any step but the plain one
  with sam.reuse on."""
  reuse_on = bool(keys.of(sam_cfg, "sam.reuse"))
  if correct and not (sam_lib.is_plain(method) and reuse_on):
    raise ValueError(
        f"correct=True is the sam.reuse step: method "
        f"{sam_lib.PLAIN!r} with sam.reuse on"
    )
  return reuse_on and not sam_lib.is_plain(method)


def _update(tx, state, grads, metrics: dict, reuse):
  """(the next TrainState: the optimizer's update of `grads` applied, step
  + 1, `reuse` carried; `metrics` with the update's norm)."""
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  return (
      state.replace(
          step=state.step + 1, params=params, opt_state=opt_state, reuse=reuse
      ),
      dict(metrics, update_norm=tree_math.norm(updates)),
  )


def device_groups(s) -> distribute.Groups | None:
  """With several microbatches on a mesh that splits the batch (global
  perturbation scope): how `distribute.strategy` gathers the weights
  once per step and reduces the gradient once per pass, each group of
  devices accumulating its own part over the microbatches. None otherwise
  (one microbatch, one group, or sam.perturbation_scope=microbatch, whose
  per-microbatch eps needs the whole microbatch's gradient). With
  sam.perturbation_scope=replica, always on such a mesh: the shards' own
  steps run their unconstrained model (`distribute._replica_gradient`)."""
  cfg = s.cfg
  bs = sharding.batch_sharding(s.mesh)
  G = math.prod(s.mesh.shape[a] for a in sharding.BATCH_AXES)
  scope = cfg.sam.perturbation_scope
  if (
      G <= 1
      or scope == "microbatch"
      or (scope == "global" and cfg.grad_accumulation_steps <= 1)
  ):
    return None
  cast = model_lib.compute_params(s.model.cfg)
  head = model_lib.output_head(s.model)
  head = head._replace(
      features=sharding.pin_params(head.features, None, cast),
      chunk_tokens=s.head.chunk_tokens,
  )
  return distribute.Groups(
      bs,
      s.state_sharding.params,
      sharding.pin_params(model_lib.make_logits_fn(s.model), None, cast),
      head,
      cast,
  )


def jit_train_step(s, method: str, correct: bool = False):
  return jax.jit(
      make_train_step(s, method, correct),
      in_shardings=(s.state_sharding, sharding.batch_sharding(s.mesh)),
      out_shardings=(s.state_sharding, sharding.replicated(s.mesh)),
      donate_argnums=0,
  )


def kind_args(cfg, kind: str) -> tuple[str, bool]:
  """(method, correct) of `jit_train_step` for a `sam_schedule.step_kind`."""
  if kind == "reuse":
    return sam_lib.PLAIN, True
  return (cfg.sam.method if kind == "sam" else sam_lib.PLAIN), False


def largest_kind(cfg) -> str:
  """The step kind that holds the most memory: the SAM-family step when the
  method perturbs, else the plain one."""
  return "plain" if sam_lib.is_plain(cfg.sam.method) else "sam"


def jit_step(s, kind: str):
  """The jitted step for a `sam_schedule.step_kind` (the one `s` already
  compiled, if any: `Setup.steps`)."""
  if kind in s.steps:
    return s.steps[kind]
  return jit_train_step(s, *kind_args(s.cfg, kind))


def validate(cfg) -> None:
  """The batch splits into grad_accumulation_steps microbatches."""
  k = max(cfg.grad_accumulation_steps, 1)
  if cfg.data.batch_size % k:
    raise UsageError(
        f"data.batch_size={cfg.data.batch_size} is not "
        "divisible by grad_accumulation_steps="
        f"{cfg.grad_accumulation_steps}"
    )
