"""The token loss."""

import jax
import jax.numpy as jnp
import numpy as np

from nanodo_sam.loss import cross_entropy


def test_cross_entropy_is_weighted_mean_nats():
  logits = jax.random.normal(jax.random.key(0), (2, 3, 5))
  targets = jnp.array([[0, 1, 2], [3, 4, 0]])
  weights = jnp.array([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
  logp = jax.nn.log_softmax(logits)
  nll = -np.take_along_axis(
      np.asarray(logp), np.asarray(targets)[..., None], -1
  )[..., 0]
  expected = (nll * weights).sum() / weights.sum()
  got = cross_entropy(logits, {"targets": targets, "weights": weights})
  np.testing.assert_allclose(got, expected, rtol=1e-6)
  # Uniform logits give log V nats.
  flat = cross_entropy(
      jnp.zeros((1, 3, 5)),
      {"targets": jnp.zeros((1, 3), jnp.int32), "weights": jnp.ones((1, 3))},
  )
  np.testing.assert_allclose(flat, np.log(5), rtol=1e-6)
