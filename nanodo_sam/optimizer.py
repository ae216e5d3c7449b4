"""Optimizers and learning-rate schedules (optax), chosen by name.

The schedule is Nanodo's: linear warmup from `init_learning_rate` to
`peak_learning_rate`, then cosine, linear or constant decay to
`final_learning_rate` at `num_train_steps`. Weight decay follows optax's
convention (AdamW multiplies it by the learning rate: 0.1 at lr 1e-3 is a
decoupled per-step decay of 1e-4, the paper's setting).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def learning_rate_schedule(opt_cfg) -> optax.Schedule:
  warmup = opt_cfg.warmup_steps
  decay_steps = max(opt_cfg.num_train_steps - warmup, 1)
  peak, final = opt_cfg.peak_learning_rate, opt_cfg.final_learning_rate
  decays = {
      "cosine": lambda: optax.cosine_decay_schedule(
          peak, decay_steps, alpha=final / peak if peak else 0.0),
      "linear": lambda: optax.linear_schedule(peak, final, decay_steps),
      "constant": lambda: optax.constant_schedule(peak),
  }
  decay = decays[opt_cfg.decay_type]()
  if warmup == 0:
    return decay
  return optax.join_schedules(
      [optax.linear_schedule(opt_cfg.init_learning_rate, peak, warmup), decay],
      [warmup])


def _adamw(c, lr):
  return optax.adamw(lr, b1=c.b1, b2=c.b2, eps=c.eps,
                     weight_decay=c.weight_decay)


def _sgd(c, lr):
  return optax.chain(optax.add_decayed_weights(c.weight_decay),
                     optax.sgd(lr))


def _momentum(c, lr):
  return optax.chain(optax.add_decayed_weights(c.weight_decay),
                     optax.sgd(lr, momentum=c.b1))


OPTIMIZERS = {"adamw": _adamw, "sgd": _sgd, "momentum": _momentum}


def make_optimizer(opt_cfg) -> optax.GradientTransformation:
  """Optional global-norm clipping, then the named optimizer."""
  tx = OPTIMIZERS[opt_cfg.optimizer](opt_cfg,
                                     learning_rate_schedule(opt_cfg))
  if opt_cfg.clip_by_global_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(opt_cfg.clip_by_global_norm),
                     tx)
  return tx


def adam_preconditioner(opt_state, *, b2: float, eps: float):
  """AdamW's own P = sqrt(nu_hat) + eps (eq. 12), read from its state.

  Returns (P, has_second_moment). Before the first update (count 0) there is
  no second moment yet and P is all ones (the unpreconditioned step).
  """
  is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)
  adam = [x for x in jax.tree.leaves(opt_state, is_leaf=is_adam)
          if is_adam(x)]
  if len(adam) != 1:
    raise ValueError("the preconditioned methods need exactly one AdamW "
                     "state in the optimizer; use opt.optimizer='adamw'")
  nu, count = adam[0].nu, adam[0].count
  has_moment = count > 0
  bias = 1.0 - jnp.asarray(b2, jnp.float32) ** jnp.maximum(count, 1)
  precond = jax.tree.map(
      lambda n: jnp.where(has_moment, jnp.sqrt(n / bias) + eps, 1.0), nu)
  return precond, has_moment
