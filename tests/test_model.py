"""The Nanodo Transformer: causality, exact parameter counts, dtypes, loss."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nanodo_sam import model as model_lib

PAPER_SIZES = {  # (D, H, N) -> non-embedding parameters (appendix A.1)
    (256, 4, 3): 2_361_088,
    (576, 9, 6): 23_895_360,
    (768, 12, 6): 42_477_312,
    (1280, 20, 6): 117_981_440,
    (4096, 64, 6): 1_208_012_800,
}


def _tiny(**kw):
  cfg = model_lib.DoConfig(**{**dict(D=16, H=2, N=2, F=32, L=8, V=23), **kw})
  m = model_lib.TransformerDo(cfg)
  return m, model_lib.init_params(m, jax.random.key(0))


@pytest.mark.parametrize("dhn,expected", PAPER_SIZES.items())
def test_paper_sizes_have_exact_non_embedding_counts(dhn, expected):
  D, H, N = dhn
  cfg = model_lib.DoConfig(D=D, H=H, N=N, F=4 * D, L=512, V=32101)
  shapes = nn.unbox(model_lib.abstract_params(model_lib.TransformerDo(cfg)))
  leaves = jax.tree_util.tree_leaves_with_path(shapes)
  counted = sum(
      int(np.prod(x.shape))
      for path, x in leaves
      if "embed" not in jax.tree_util.keystr(path)
  )
  assert counted == expected == model_lib.non_embedding_params(cfg)
  total = sum(int(np.prod(x.shape)) for _, x in leaves)
  assert total == expected + cfg.V * D + cfg.L * D  # tied output layer
  assert model_lib.embedding_params(cfg) == total - expected
  assert model_lib.total_params(cfg) == total


def test_no_biases_and_logical_axes_on_every_param():
  cfg = model_lib.DoConfig(D=16, H=2, N=1, F=32, L=8, V=23)
  boxed = model_lib.abstract_params(model_lib.TransformerDo(cfg))
  for path, leaf in jax.tree_util.tree_leaves_with_path(
      boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned)
  ):
    assert "bias" not in jax.tree_util.keystr(path)
    assert isinstance(leaf, nn.LogicallyPartitioned)
    assert len(leaf.names) == leaf.value.ndim


def test_changing_a_future_token_never_changes_an_earlier_logit():
  m, params = _tiny()
  tokens = jax.random.randint(jax.random.key(1), (2, 8), 0, 23)
  base = m.apply({"params": params}, tokens)
  for t in range(8):
    changed = tokens.at[:, t].set((tokens[:, t] + 5) % 23)
    out = m.apply({"params": params}, changed)
    np.testing.assert_array_equal(out[:, :t], base[:, :t])
    assert not np.allclose(out[:, t], base[:, t])


@pytest.mark.parametrize("nonlinearity", ["gelu", "relu"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_logits_are_float32_for_every_compute_dtype(dtype, nonlinearity):
  m, params = _tiny(dtype=dtype, nonlinearity=nonlinearity)
  tokens = jnp.zeros((2, 8), jnp.int32)
  logits = m.apply({"params": params}, tokens)
  assert logits.dtype == jnp.float32 and logits.shape == (2, 8, 23)
  assert jax.tree.leaves(params)[0].dtype == jnp.float32
  ref = _tiny(nonlinearity=nonlinearity)[0].apply({"params": params}, tokens)
  np.testing.assert_allclose(
      logits, ref, atol=0.1 if dtype == "bfloat16" else 1e-6
  )


def test_remat_gives_the_same_logits_and_gradients():
  m, params = _tiny()
  mr, _ = _tiny(remat=True)
  tokens = jax.random.randint(jax.random.key(1), (2, 8), 0, 23)
  f = lambda mod: jax.grad(
      lambda p: jnp.sum(mod.apply({"params": p}, tokens) ** 2)
  )(params)
  for a, b in zip(jax.tree.leaves(f(m)), jax.tree.leaves(f(mr))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_bad_model_config_is_rejected():
  with pytest.raises(ValueError, match="divisible"):
    model_lib.DoConfig(D=10, H=3, N=1, F=4, L=4, V=5)
  with pytest.raises(ValueError, match="nonlinearity"):
    model_lib.DoConfig(D=8, H=2, N=1, F=4, L=4, V=5, nonlinearity="tanh")
