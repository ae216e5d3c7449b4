"""tree_math.py: tree inner product, norm and the scanned weighted sum."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from nanodo_sam import tree_math


def test_vdot_and_norm_run_in_float32_over_every_leaf():
  a = {"x": jnp.full((300,), 1.01, jnp.bfloat16), "y": jnp.array([3.0, 4.0])}
  b = {"x": jnp.ones((300,), jnp.bfloat16), "y": jnp.array([1.0, -1.0])}
  x = float(jnp.asarray(1.01, jnp.bfloat16))
  assert tree_math.vdot(a, b).dtype == jnp.float32
  np.testing.assert_allclose(tree_math.vdot(a, b), 300 * x - 1.0, rtol=1e-6)
  np.testing.assert_allclose(
      tree_math.norm(a), np.sqrt(300 * x * x + 25.0), rtol=1e-6
  )
  assert float(tree_math.norm({})) == 0.0 and float(tree_math.vdot({}, {})) == 0


def test_scan_sum_is_the_weighted_sum_over_the_leading_axis():
  xs_KxN = jnp.arange(12.0).reshape(4, 3)
  w_K = jnp.array([0.1, 0.2, 0.3, 0.4])
  fn = lambda x: {"sq": x * x, "total": jnp.sum(x)}
  out = tree_math.scan_sum(fn, xs_KxN, w_K)
  np.testing.assert_allclose(
      out["sq"], (w_K[:, None] * xs_KxN**2).sum(0), rtol=1e-6
  )
  np.testing.assert_allclose(
      out["total"], (w_K * xs_KxN.sum(1)).sum(), rtol=1e-6
  )
  np.testing.assert_allclose(
      tree_math.scan_sum(jnp.sum, xs_KxN), float(xs_KxN.sum())
  )
  # A [K, G] weight scales axis 0 (the groups) of each step's output.
  xs_KxGxN = xs_KxN.reshape(4, 3, 1) * jnp.ones((1, 1, 2))
  w_KxG = jnp.arange(12.0).reshape(4, 3)
  np.testing.assert_allclose(
      tree_math.scan_sum(lambda x: x, xs_KxGxN, w_KxG),
      (w_KxG[:, :, None] * xs_KxGxN).sum(0),
      rtol=1e-6,
  )
