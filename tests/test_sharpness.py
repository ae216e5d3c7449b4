"""Sharpness diagnostics against dense Hessians of tiny models."""

import functools

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
import numpy as np
import pytest

from nanodo_sam import head as head_lib
from nanodo_sam import sharpness
from nanodo_sam.loss import cross_entropy
from nanodo_sam.model import (
    DoConfig,
    TransformerDo,
    init_params,
    make_logits_fn,
)

V = 11


def _batch(seed, B=2, L=4):
  k1, k2 = jax.random.split(jax.random.key(seed))
  weights_BxL = jnp.ones((B, L)).at[0, -1].set(0.0).at[1, -2:].set(0.0)
  return {
      "inputs": jax.random.randint(k1, (B, L), 0, V, jnp.int32),
      "targets": jax.random.randint(k2, (B, L), 0, V, jnp.int32),
      "weights": weights_BxL,
  }


def _mlp_logits(params, inputs_BxL):
  """A pure-jnp embedding -> tanh -> vocab model (134 params)."""
  h_BxLxH = jnp.tanh(params["embed"][inputs_BxL] @ params["w1"])
  return h_BxLxH @ params["w2"]


def _mlp():
  k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
  params = {
      "embed": jax.random.normal(k1, (V, 4)),
      "w1": 1.5 * jax.random.normal(k2, (4, 6)),
      "w2": jax.random.normal(k3, (6, V)),
  }
  return params, _mlp_logits


def _transformer(dtype="float32"):
  model = TransformerDo(DoConfig(D=8, H=2, N=1, F=16, L=4, V=V, dtype=dtype))
  init = jax.jit(functools.partial(init_params, model))  # one compile, not
  return init(jax.random.key(0)), make_logits_fn(model)  # one per flax op


MODELS = {"mlp": _mlp, "transformer": _transformer}


@functools.lru_cache(maxsize=None)
def _dense(name):
  """Model, batch and dense H, H_G, H_F, gradient in flattened coordinates.

  For the MLP, H_F is the dense sum_k r_k d^2 f_k (r = dL/dlogits held
  fixed), independent of H and H_G; for the Transformer (to save time) it is
  H - H_G, the definition.
  """
  params, logits_fn = MODELS[name]()
  batch = _batch(0)
  flat, unravel = ravel_pytree(params)

  @jax.jit
  def dense(x):
    f = lambda y: logits_fn(unravel(y), batch["inputs"])
    loss = lambda y: cross_entropy(f(y), batch)
    logits_BxLxV, jac_BxLxVxP = f(x), jax.jacrev(f)(x)
    p_BxLxV = jax.nn.softmax(logits_BxLxV)
    scale_BxL = batch["weights"] / batch["weights"].sum()
    m_BxLxVxV = scale_BxL[..., None, None] * (
        jax.vmap(jax.vmap(jnp.diag))(p_BxLxV)
        - p_BxLxV[..., :, None] * p_BxLxV[..., None, :]
    )
    ggn = jnp.einsum("blvp,blvw,blwq->pq", jac_BxLxVxP, m_BxLxVxV, jac_BxLxVxP)
    hess = jax.hessian(loss)(x)
    r_BxLxV = jax.grad(cross_entropy)(logits_BxLxV, batch)
    func = (
        jax.hessian(lambda y: jnp.sum(r_BxLxV * f(y)))(x)
        if name == "mlp"
        else hess - ggn
    )
    return hess, ggn, func, jax.grad(loss)(x)

  hess, ggn, func, grad = dense(flat)
  return dict(
      params=params,
      logits_fn=logits_fn,
      batch=batch,
      flat=flat,
      unravel=unravel,
      H=hess,
      HG=ggn,
      HF=func,
      grad=grad,
  )


def _all_products(params, batch, v, *, logits_fn):
  return {
      "H": sharpness.hvp(params, batch, v, logits_fn=logits_fn),
      "HG": sharpness.ggn_vp(params, batch, v, logits_fn=logits_fn),
      "HF": sharpness.functional_hessian_vp(
          params, batch, v, logits_fn=logits_fn
      ),
  }


@functools.lru_cache(maxsize=None)
def _jit(fn, logits_fn, **static):
  """One compiled function per (fn, model, static args), shared by tests."""
  return jax.jit(functools.partial(fn, logits_fn=logits_fn, **static))


def _flat(tree):
  return ravel_pytree(tree)[0]


def _rel(a, b):
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


@pytest.mark.parametrize("name", ["mlp", "transformer"])
def test_products_match_dense_hessians(name):
  d = _dense(name)
  fn = _jit(_all_products, d["logits_fn"])
  for seed in range(2):
    v = jax.random.normal(jax.random.key(seed + 10), d["flat"].shape)
    got = fn(d["params"], d["batch"], d["unravel"](v))
    for key in ("H", "HG", "HF"):
      assert _rel(_flat(got[key]), d[key] @ v) < 1e-5, key
    assert _rel(_flat(got["H"]), _flat(got["HG"]) + _flat(got["HF"])) < 1e-5


def test_gauss_newton_split_of_dense_hessian():
  d = _dense("mlp")
  assert _rel(d["HG"] + d["HF"], d["H"]) < 1e-4
  assert jnp.linalg.eigvalsh(d["HF"]).min() < 0  # H_F is not PSD ...


@pytest.mark.parametrize("name", ["mlp", "transformer"])
def test_gauss_newton_part_is_psd(name):
  evals = jnp.linalg.eigvalsh(_dense(name)["HG"])
  assert evals.min() >= -1e-5 * evals.max()  # ... H_G is


def test_logit_hessian_matches_autodiff_of_the_loss():
  """Same per-token weighting as cross_entropy, padding included."""
  batch = _batch(3)

  @jax.jit
  def both(logits_BxLxV, u_BxLxV):
    want = jax.jvp(
        lambda z: jax.grad(cross_entropy)(z, batch), (logits_BxLxV,), (u_BxLxV,)
    )[1]
    return want, sharpness._logit_hessian_vp(
        logits_BxLxV, u_BxLxV, batch["weights"]
    )

  want, got = both(
      3.0 * jax.random.normal(jax.random.key(4), (2, 4, V)),
      jax.random.normal(jax.random.key(5), (2, 4, V)),
  )
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, atol=1e-6)


@pytest.mark.parametrize("given_direction", [False, True])
def test_decomposition_taus_match_dense(given_direction):
  d = _dense("mlp")
  e = (
      jax.random.normal(jax.random.key(7), d["flat"].shape)
      if given_direction
      else d["grad"]
  )
  direction = d["unravel"](3.0 * e) if given_direction else None
  e = e / jnp.linalg.norm(e)
  d_logit, d_func = d["HG"] @ e, d["HF"] @ e
  delta_sq = jnp.sum((d_logit + d_func) ** 2)
  want = {
      "tau_logit": d_logit @ d_logit / delta_sq,
      "tau_func": d_func @ d_func / delta_sq,
      "tau_cross": 2 * d_logit @ d_func / delta_sq,
      "delta_norm": jnp.linalg.norm(d["H"] @ e),
      "delta_logit_norm": jnp.linalg.norm(d_logit),
      "delta_func_norm": jnp.linalg.norm(d_func),
      "grad_norm": jnp.linalg.norm(d["grad"]),
      "loss": cross_entropy(
          d["logits_fn"](d["params"], d["batch"]["inputs"]), d["batch"]
      ),
  }
  fn = _jit(sharpness.decomposition, d["logits_fn"])
  got = fn(d["params"], d["batch"], direction=direction)
  assert set(got) == set(want)
  for key in want:
    np.testing.assert_allclose(
        got[key], want[key], rtol=1e-4, atol=1e-5, err_msg=key
    )
  total = got["tau_logit"] + got["tau_func"] + got["tau_cross"]
  np.testing.assert_allclose(total, 1.0, atol=1e-5)


def test_preconditioned_decomposition_matches_dense():
  """Appendix B's direction e = P^-1 g / ||P^-1 g|| against dense H_G, H_F,
  in `decomposition(precond=P)` and in `diagnostics(precond=P)`."""
  d = _dense("mlp")
  p_flat = 0.5 + jax.random.uniform(jax.random.key(3), d["flat"].shape)
  e = d["grad"] / p_flat
  e = e / jnp.linalg.norm(e)
  d_logit, d_func = d["HG"] @ e, d["HF"] @ e
  delta_sq = jnp.sum((d_logit + d_func) ** 2)
  want = {
      "tau_logit": d_logit @ d_logit / delta_sq,
      "tau_func": d_func @ d_func / delta_sq,
      "tau_cross": 2 * d_logit @ d_func / delta_sq,
  }
  precond = d["unravel"](p_flat)
  got = _jit(sharpness.decomposition, d["logits_fn"])(
      d["params"], d["batch"], precond=precond
  )
  diag = jax.jit(
      functools.partial(
          sharpness.measure, logits_fn=d["logits_fn"], num_iters=4, num_probes=2
      )
  )(
      d["params"],
      d["batch"],
      lr=0.1,
      rho=0.1,
      rng=jax.random.key(0),
      precond=precond,
  )
  for key in want:
    np.testing.assert_allclose(
        got[key], want[key], rtol=1e-4, atol=1e-5, err_msg=key
    )
    np.testing.assert_allclose(
        diag[key + "_precond"], want[key], rtol=1e-4, atol=1e-5, err_msg=key
    )
  # P = 1 is the unpreconditioned split.
  ones = jax.tree.map(jnp.ones_like, d["params"])
  plain = _jit(sharpness.decomposition, d["logits_fn"])(d["params"], d["batch"])
  with_ones = _jit(sharpness.decomposition, d["logits_fn"])(
      d["params"], d["batch"], precond=ones
  )
  for key in want:
    np.testing.assert_allclose(with_ones[key], plain[key], rtol=1e-6)


@pytest.mark.parametrize("name", ["mlp", "transformer"])
def test_lambda_max_matches_dense_top_eigenvalue(name):
  d = _dense(name)
  evals = jnp.linalg.eigvalsh(d["H"])
  top = evals[jnp.argmax(jnp.abs(evals))]
  fn = _jit(sharpness.lambda_max, d["logits_fn"], num_iters=40)
  lam, vec, iters = fn(d["params"], d["batch"], rng=jax.random.key(2))
  assert abs(lam - top) <= 1e-3 * abs(top)
  assert 1 <= int(iters) < 40  # stopped at tol, not at num_iters
  y = _flat(vec)
  np.testing.assert_allclose(jnp.linalg.norm(y), 1.0, rtol=1e-5)
  assert jnp.linalg.norm(d["H"] @ y - lam * y) <= 2e-3 * abs(lam)


def test_hutchinson_traces_within_three_standard_errors():
  d = _dense("mlp")
  for fn, dense in (
      (sharpness.hessian_trace, d["H"]),
      (sharpness.ggn_trace, d["HG"]),
  ):
    n = 200
    fn = _jit(fn, d["logits_fn"], num_probes=n)
    trace, stderr = fn(d["params"], d["batch"], rng=jax.random.key(3))
    assert abs(trace - jnp.trace(dense)) < 3 * stderr
    # Rademacher probes: Var(z^T A z) = 2 sum_{i != j} A_ij^2.
    off_diag = dense - jnp.diag(jnp.diag(dense))
    want_stderr = jnp.sqrt(2 * jnp.sum(off_diag**2) / n)
    np.testing.assert_allclose(stderr, want_stderr, rtol=0.3)


def test_sam_edge_root_and_limits():
  lr, g = 0.1, 0.7
  np.testing.assert_allclose(sharpness.sam_edge(lr, 0.0, g), 2 / lr, rtol=1e-12)
  assert jnp.isfinite(sharpness.sam_edge(lr, 0.0, 0.0))  # 0/0 avoided
  assert sharpness.sam_edge(lr, 0.1, 0.0) == 0.0  # lambda -> 0 as g -> 0
  np.testing.assert_allclose(sharpness.sam_edge(lr, 1e-9, g), 2 / lr, rtol=1e-7)
  rho = jnp.array([1e-6, 1e-3, 0.05, 0.3, 1.0, 10.0])
  lam = sharpness.sam_edge(lr, rho, g)
  np.testing.assert_allclose(lr * lam * (1 + rho * lam / g), 2.0, rtol=1e-5)
  assert jnp.all(jnp.diff(lam) < 0) and jnp.all(lam < 2 / lr)
  direct = (g / (2 * rho)) * (jnp.sqrt(1 + 8 * rho / (lr * g)) - 1)
  np.testing.assert_allclose(lam[2:], direct[2:], rtol=1e-5)


def _traces(params, batch, rng, *, logits_fn):
  kw = dict(logits_fn=logits_fn, num_probes=4, rng=rng)
  return (
      sharpness.hessian_trace(params, batch, **kw)[0],
      sharpness.ggn_trace(params, batch, **kw)[0],
  )


def test_stacked_batches_average_per_batch_quantities():
  d = _dense("mlp")
  params, logits_fn = d["params"], d["logits_fn"]
  batches = [_batch(s) for s in (11, 12, 13)]
  stacked = jax.tree.map(lambda *x: jnp.stack(x), *batches)
  mean = lambda trees: jax.tree.map(lambda *x: sum(x) / len(x), *trees)
  v = jax.tree.map(jnp.cos, params)
  rng = jax.random.key(5)
  for fn, args in (
      (_all_products, (v,)),
      (sharpness.loss_and_grad, ()),
      (_traces, (rng,)),
  ):
    fn = _jit(fn, logits_fn)
    got = _flat(fn(params, stacked, *args))
    want = _flat(mean([fn(params, b, *args) for b in batches]))
    assert _rel(got, want) < 1e-5, fn  # traces: same probes, so exact


def test_bfloat16_model_products_are_float32():
  model = TransformerDo(
      DoConfig(D=8, H=2, N=1, F=16, L=4, V=V, dtype="bfloat16")
  )
  params = jax.eval_shape(
      functools.partial(init_params, model), jax.random.key(0)
  )
  v = jax.tree.map(
      lambda p: jax.ShapeDtypeStruct(p.shape, jnp.bfloat16), params
  )
  out = jax.eval_shape(
      functools.partial(_all_products, logits_fn=make_logits_fn(model)),
      params,
      _batch(0),
      v,
  )
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(out))


def test_diagnostics_is_jittable_and_consistent():
  params, logits_fn = _mlp()
  batch = _batch(0)
  fn = jax.jit(
      functools.partial(
          sharpness.measure, logits_fn=logits_fn, num_iters=40, num_probes=8
      )
  )
  out = fn(params, batch, lr=0.05, rho=0.1, rng=jax.random.key(0))
  assert set(out) == {
      "loss",
      "grad_norm",
      "tau_logit",
      "tau_func",
      "tau_cross",
      "lambda_max",
      "hessian_trace",
      "hessian_trace_stderr",
      "ggn_trace",
      "ggn_trace_stderr",
      "sam_edge",
      "two_over_lr",
  }
  assert all(jnp.shape(x) == () and jnp.isfinite(x) for x in out.values())
  np.testing.assert_allclose(
      out["tau_logit"] + out["tau_func"] + out["tau_cross"], 1.0, atol=1e-5
  )
  np.testing.assert_allclose(out["two_over_lr"], 40.0)
  np.testing.assert_allclose(
      out["sam_edge"],
      sharpness.sam_edge(0.05, 0.1, out["grad_norm"]),
      rtol=1e-6,
  )
  d = _dense("mlp")
  evals = jnp.linalg.eigvalsh(d["H"])
  top = evals[jnp.argmax(jnp.abs(evals))]
  assert abs(out["lambda_max"] - top) <= 1e-3 * abs(top)


def test_diagnostics_with_zero_iterations_and_probes_gives_the_taus_alone():
  params, logits_fn = _mlp()
  batch = _batch(0)
  full = sharpness.measure(
      params,
      batch,
      logits_fn=logits_fn,
      lr=0.1,
      rho=0.05,
      num_iters=5,
      num_probes=2,
      rng=jax.random.key(0),
  )
  taus = sharpness.measure(
      params,
      batch,
      logits_fn=logits_fn,
      lr=0.1,
      rho=0.05,
      num_iters=0,
      num_probes=0,
      rng=jax.random.key(0),
  )
  left_out = {
      "lambda_max",
      "hessian_trace",
      "hessian_trace_stderr",
      "ggn_trace",
      "ggn_trace_stderr",
  }
  assert set(taus) == set(full) - left_out
  for k in taus:
    np.testing.assert_allclose(taus[k], full[k], rtol=1e-6, err_msg=k)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_iters=-1), "num_iters"),
        (dict(num_iters=2.5), "num_iters"),
        (dict(num_probes=-1), "num_probes"),
        (dict(lr=0.0), "lr"),
        (dict(rho=-0.1), "rho"),
    ],
)
def test_diagnostics_rejects_bad_arguments(kwargs, match):
  params, logits_fn = _mlp()
  args = dict(
      logits_fn=logits_fn,
      lr=0.1,
      rho=0.05,
      num_iters=5,
      num_probes=2,
      rng=jax.random.key(0),
  )
  with pytest.raises(ValueError, match=match):
    sharpness.measure(params, _batch(0), **{**args, **kwargs})


def test_bad_arguments_raise_value_error():
  params, logits_fn = _mlp()
  batch, rng = _batch(0), jax.random.key(0)
  with pytest.raises(ValueError, match="num_iters"):
    sharpness.lambda_max(
        params, batch, logits_fn=logits_fn, num_iters=0, rng=rng
    )
  for fn in (sharpness.hessian_trace, sharpness.ggn_trace):
    with pytest.raises(ValueError, match="num_probes"):
      fn(params, batch, logits_fn=logits_fn, num_probes=0, rng=rng)
  flat_batch = jax.tree.map(lambda x: x.reshape(-1), batch)
  with pytest.raises(ValueError, match=r"\[K, B, L\]"):
    sharpness.hvp(params, flat_batch, params, logits_fn=logits_fn)


def _transformer_head():
  """The Transformer of `_transformer` split at its output layer."""
  from nanodo_sam.model import output_head

  model = TransformerDo(DoConfig(D=8, H=2, N=1, F=16, L=4, V=V))
  return output_head(model)


def _chunked_products(params, batch, v, *, logits_fn, head, chunk_tokens):
  kw = dict(logits_fn=logits_fn, head=head, chunk_tokens=chunk_tokens)
  z = jax.tree.map(jnp.sign, v)
  return {
      "H": sharpness.hvp(params, batch, v, **kw),
      "HG": sharpness.ggn_vp(params, batch, v, **kw),
      "HF": sharpness.functional_hessian_vp(params, batch, v, **kw),
      "grad": sharpness.loss_and_grad(params, batch, **kw)[1],
      "zHGz": sharpness._ops(logits_fn, head, chunk_tokens)["ggn_quad"](
          params, batch, z, logits_fn
      ),
  }


@pytest.mark.parametrize("chunk_tokens", [1, 4, 8])
def test_chunked_output_layer_matches_dense_hessians(chunk_tokens):
  """With the output head, the products run over 4, 2 and 1 chunks of the
  L=4 sequence (B=2 rows: 1, 2 and 4 tokens a row per chunk) and still equal
  the dense H, H_G, H_F (the same 1e-5 as the whole-logits products: float32
  rounding of sums over a few hundred terms), and the gradient and
  z^T H_G z too."""
  d = _dense("transformer")
  fn = jax.jit(
      functools.partial(
          _chunked_products,
          logits_fn=d["logits_fn"],
          head=_transformer_head(),
          chunk_tokens=chunk_tokens,
      )
  )
  assert (
      head_lib.num_chunks(2, 4, chunk_tokens)
      == {1: 4, 4: 2, 8: 1}[chunk_tokens]
  )
  v = jax.random.normal(jax.random.key(10), d["flat"].shape)
  got = fn(d["params"], d["batch"], d["unravel"](v))
  for key in ("H", "HG", "HF"):
    assert _rel(_flat(got[key]), d[key] @ v) < 1e-5, key
  assert _rel(_flat(got["grad"]), d["grad"]) < 1e-5
  z = jnp.sign(v)
  assert abs(float(got["zHGz"]) - float(z @ d["HG"] @ z)) < 1e-5 * float(
      jnp.abs(z) @ jnp.abs(d["HG"]) @ jnp.abs(z)
  )


@pytest.mark.slow  # ~40 s; the chunked products are checked in the default set
def test_chunked_diagnostics_equal_the_whole_logits():
  """Every number of `diagnostics` (Lanczos, traces, both tau splits) is the
  same through the chunked output head as through the whole logits: the
  same probes and start vector, sums in another order (float32 rounding,
  relative 1e-5; Lanczos at tol=0 runs all its iterations either way)."""
  params, logits_fn = _transformer()
  batch = _batch(0)
  precond = jax.tree.map(lambda p: 1.0 + jnp.abs(p), params)
  kw = dict(
      logits_fn=logits_fn,
      lr=1e-2,
      rho=0.1,
      num_iters=4,
      num_probes=3,
      tol=0.0,
      precond=precond,
  )
  whole = jax.jit(
      lambda p, b: sharpness.measure(p, b, rng=jax.random.key(0), **kw)
  )(params, batch)
  chunked = jax.jit(
      lambda p, b: sharpness.measure(
          p,
          b,
          rng=jax.random.key(0),
          head=_transformer_head(),
          chunk_tokens=2,
          **kw,
      )
  )(params, batch)
  assert whole.keys() == chunked.keys() and "tau_func_precond" in whole
  for k in whole:
    np.testing.assert_allclose(
        chunked[k], whole[k], rtol=1e-5, atol=1e-7, err_msg=k
    )
