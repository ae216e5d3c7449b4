"""Optimizers and learning-rate schedules (optax), chosen by name.

The schedule is Nanodo's: linear warmup from `init_learning_rate` to
`peak_learning_rate`, then cosine, linear or constant decay to
`final_learning_rate` at `num_train_steps`; an unset (None) end is
peak / 10, as in Nanodo's default config, so it follows the peak through a
learning-rate sweep. Weight decay follows optax's convention (AdamW multiplies
it by the learning rate: 0.1 at lr 1e-3 is a decoupled per-step decay of
1e-4), or with `independent_weight_decay` Nanodo's: the coefficient passed to
optax is weight_decay / peak_learning_rate, so `weight_decay` is the per-step
decay at the peak and stays fixed when the peak changes (the paper's
"decoupled weight decay 1e-4"). `weight_decay_exclusions` (comma-separated
name fragments, Nanodo's `weight_decay_exclusion_names`) leaves the matching
parameters undecayed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from nanodo_sam import keys
from nanodo_sam.errors import UsageError

# An unset init/final learning rate is this fraction of the peak (Nanodo's
# default config: peak 1.6e-3, init and final 1.6e-4).
DEFAULT_END_FRACTION = 0.1


def _end(value, peak: float) -> float:
  return peak * DEFAULT_END_FRACTION if value is None else value


def init_learning_rate(opt_cfg) -> float:
  return _end(opt_cfg.get("init_learning_rate"), opt_cfg.peak_learning_rate)


def final_learning_rate(opt_cfg) -> float:
  return _end(opt_cfg.get("final_learning_rate"), opt_cfg.peak_learning_rate)


def learning_rate_schedule(opt_cfg) -> optax.Schedule:
  warmup = opt_cfg.warmup_steps
  decay_steps = max(opt_cfg.num_train_steps - warmup, 1)
  peak, final = opt_cfg.peak_learning_rate, final_learning_rate(opt_cfg)
  decays = {
      "cosine": lambda: optax.cosine_decay_schedule(
          peak, decay_steps, alpha=final / peak if peak else 0.0
      ),
      "linear": lambda: optax.linear_schedule(peak, final, decay_steps),
      "constant": lambda: optax.constant_schedule(peak),
  }
  decay = decays[opt_cfg.decay_type]()
  if warmup == 0:
    return decay
  return optax.join_schedules(
      [optax.linear_schedule(init_learning_rate(opt_cfg), peak, warmup), decay],
      [warmup],
  )


def decay_coefficient(opt_cfg) -> float:
  """The weight decay handed to optax (which multiplies it by the rate)."""
  wd = opt_cfg.weight_decay
  if keys.of(opt_cfg, "opt.independent_weight_decay"):
    return wd / opt_cfg.peak_learning_rate if wd else 0.0
  return wd


def exclusion_names(opt_cfg) -> tuple[str, ...]:
  names = keys.of(opt_cfg, "opt.weight_decay_exclusions") or ""
  return tuple(n.strip() for n in names.split(",") if n.strip())


def _path_name(path) -> str:
  """ "block_0/attn/query/kernel": the dict keys of a parameter's path."""
  return "/".join(str(k.key) for k in path if hasattr(k, "key"))


def decay_mask(opt_cfg):
  """None (decay everything), or params -> tree of bools (True = decay)."""
  names = exclusion_names(opt_cfg)
  if not names:
    return None
  return lambda params: jax.tree_util.tree_map_with_path(
      lambda path, _: not any(n in _path_name(path) for n in names), params
  )


def _adamw(c, lr):
  return optax.adamw(
      lr,
      b1=c.b1,
      b2=c.b2,
      eps=c.eps,
      weight_decay=decay_coefficient(c),
      mask=decay_mask(c),
  )


def _sgd(c, lr):
  return optax.chain(
      optax.add_decayed_weights(decay_coefficient(c), mask=decay_mask(c)),
      optax.sgd(lr),
  )


def _momentum(c, lr):
  return optax.chain(
      optax.add_decayed_weights(decay_coefficient(c), mask=decay_mask(c)),
      optax.sgd(lr, momentum=c.b1),
  )


OPTIMIZERS = {"adamw": _adamw, "sgd": _sgd, "momentum": _momentum}


def make_optimizer(opt_cfg) -> optax.GradientTransformation:
  """Optional global-norm clipping, then the named optimizer."""
  tx = OPTIMIZERS[opt_cfg.optimizer](opt_cfg, learning_rate_schedule(opt_cfg))
  if opt_cfg.clip_by_global_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(opt_cfg.clip_by_global_norm), tx)
  return tx


def _adam_state(opt_state) -> optax.ScaleByAdamState:
  """The one AdamW moment state inside `opt_state`; ValueError otherwise."""
  is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)
  adam = [x for x in jax.tree.leaves(opt_state, is_leaf=is_adam) if is_adam(x)]
  if len(adam) != 1:
    raise ValueError(
        "AdamW's moments are read from exactly one AdamW state "
        "in the optimizer; use opt.optimizer='adamw'"
    )
  return adam[0]


def first_moment(opt_state):
  """The optimizer's first moment, a tree like the params (Momentum-SAM's
  direction): AdamW's mu (before bias correction; only its direction is
  used) or SGD with momentum's trace; zeros before the first update."""
  kinds = (optax.ScaleByAdamState, optax.TraceState)
  is_state = lambda x: isinstance(x, kinds)
  found = [
      x for x in jax.tree.leaves(opt_state, is_leaf=is_state) if is_state(x)
  ]
  if len(found) != 1:
    raise ValueError(
        "the momentum methods need exactly one first moment in "
        "the optimizer; use opt.optimizer='adamw' or 'momentum'"
    )
  state = found[0]
  return (
      state.mu if isinstance(state, optax.ScaleByAdamState) else (state.trace)
  )


def adam_preconditioner(opt_state, *, b2: float, eps: float):
  """AdamW's own P = sqrt(nu_hat) + eps (eq. 12), read from its state.

  Returns (P, has_second_moment). Before the first update (count 0) there is
  no second moment yet and P is all ones (the unpreconditioned step).
  """
  adam = _adam_state(opt_state)
  nu, count = adam.nu, adam.count
  has_moment = count > 0
  bias = 1.0 - jnp.asarray(b2, jnp.float32) ** jnp.maximum(count, 1)
  precond = jax.tree.map(
      lambda n: jnp.where(has_moment, jnp.sqrt(n / bias) + eps, 1.0), nu
  )
  return precond, has_moment


def adam_precond(opt_state, opt_cfg):
  """P of `adam_preconditioner` for the config's opt.b2 and opt.eps (all ones
  before the first update), or None when opt.optimizer is not AdamW."""
  if opt_cfg.optimizer != "adamw":
    return None
  return adam_preconditioner(opt_state, b2=opt_cfg.b2, eps=opt_cfg.eps)[0]


def validate(opt_cfg) -> None:
  """The opt.* keys fit together; UsageError (one line) otherwise."""
  if opt_cfg.warmup_steps > opt_cfg.num_train_steps:
    raise UsageError(
        f"opt.warmup_steps={opt_cfg.warmup_steps} must lie in "
        f"[0, opt.num_train_steps={opt_cfg.num_train_steps}]"
    )
  if (
      opt_cfg.independent_weight_decay
      and opt_cfg.weight_decay
      and not opt_cfg.peak_learning_rate > 0
  ):
    raise UsageError(
        "opt.independent_weight_decay divides opt.weight_decay by "
        "opt.peak_learning_rate, which is 0; set a positive peak or "
        "--config.opt.independent_weight_decay=False"
    )
