"""optimizer.py: AdamW's preconditioner and first moment read from its state."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from nanodo_sam import optimizer as optimizer_lib


def _one_update(optimizer: str):
  cfg = tiny_config(**{"opt.optimizer": optimizer})
  tx = optimizer_lib.make_optimizer(cfg.opt)
  params = {"w": jnp.arange(1.0, 5.0), "b": jnp.array([0.5, -2.0])}
  grads = {"w": jnp.array([0.3, -0.1, 2.0, 0.0]), "b": jnp.array([-1.0, 4.0])}
  state0 = tx.init(params)
  _, state1 = tx.update(grads, state0, params)
  return cfg, grads, state0, state1


def test_adam_precond_is_ones_then_bias_corrected_sqrt_nu_plus_eps():
  cfg, grads, state0, state1 = _one_update("adamw")
  o = cfg.opt
  before = optimizer_lib.adam_precond(state0, o)
  after = optimizer_lib.adam_precond(state1, o)
  for k, g in grads.items():
    np.testing.assert_array_equal(before[k], np.ones_like(g))
    # One update: nu = (1 - b2) g^2, nu_hat = nu / (1 - b2) = g^2.
    np.testing.assert_allclose(after[k], np.abs(g) + o.eps, rtol=1e-5)


def test_first_moment_is_the_gradient_ema():
  cfg, grads, state0, state1 = _one_update("adamw")
  for k, g in grads.items():
    np.testing.assert_array_equal(optimizer_lib.first_moment(state0)[k], 0.0)
    np.testing.assert_allclose(
        optimizer_lib.first_moment(state1)[k],
        (1 - cfg.opt.b1) * np.asarray(g),
        rtol=1e-6,
    )


def test_without_adamw_there_is_no_precond_and_no_moment():
  cfg, _, _, state1 = _one_update("sgd")
  assert optimizer_lib.adam_precond(state1, cfg.opt) is None
  with pytest.raises(ValueError, match="exactly one first moment"):
    optimizer_lib.first_moment(state1)
