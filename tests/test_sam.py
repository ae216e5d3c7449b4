"""The gradient-step family against formulas written independently here.

Two logits functions: a tiny Nanodo Transformer (float32) and a pure-jnp tanh
MLP (float64 where precision matters, small enough for a dense Hessian), so
the step is shown never to assume the Nanodo model.
"""

import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from nanodo_sam import distribute
from nanodo_sam import model as model_lib
from nanodo_sam import sam
from nanodo_sam.loss import cross_entropy

B, L, V = 3, 4, 11
ALL = sorted(sam.METHODS)
PHI = {"angle_sam": 0.7}
ALPHA = {
    "gsam": 0.3,
    "precond_gsam": 0.3,
}  # GSAM's needed option (tests/test_sam_variants.py)


def _phi(method):
  return PHI.get(method)


def _batch(seed=0, dtype=np.float32):
  rng = np.random.default_rng(seed)
  weights = (rng.uniform(size=(B, L)) > 0.25).astype(dtype)
  weights[0, 0] = 1.0
  return {
      "inputs": jnp.asarray(rng.integers(0, V, (B, L)), jnp.int32),
      "targets": jnp.asarray(rng.integers(0, V, (B, L)), jnp.int32),
      "weights": jnp.asarray(weights),
  }


@functools.cache
def _transformer():
  cfg = model_lib.DoConfig(D=8, H=2, N=1, F=16, L=L, V=V)
  m = model_lib.TransformerDo(cfg)
  init = jax.jit(functools.partial(model_lib.init_params, m))
  # Jitting the logits function keeps the eager steps below cheap: its forward
  # and backward compile once and are shared by every method.
  return init(jax.random.key(0)), jax.jit(model_lib.make_logits_fn(m))


def _mlp_logits(params, inputs_BxL):
  """Per-token tanh MLP: embed -> tanh(x W1 + b1) -> W2. Not Nanodo."""
  x_BxLxD = params["embed"][inputs_BxL]
  h_BxLxD = jnp.tanh(x_BxLxD @ params["w1"] + params["b1"])
  return h_BxLxD @ params["w2"]


@functools.cache
def _mlp(dtype=np.float32, D=5):
  rng = np.random.default_rng(1)
  params = {
      "embed": rng.normal(size=(V, D)),
      "w1": rng.normal(size=(D, D)) / math.sqrt(D),
      "b1": 0.1 * rng.normal(size=(D,)),
      "w2": rng.normal(size=(D, V)),
  }
  return (
      {k: jnp.asarray(x.astype(dtype)) for k, x in params.items()},
      jax.jit(_mlp_logits),
  )


@pytest.fixture(params=["transformer", "mlp"])
def problem(request):
  make = _transformer if request.param == "transformer" else _mlp
  params, logits_fn = make()
  return params, logits_fn, _batch()


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


# ------------------------------------------------------------ references


def _loss(params, batch, logits_fn):
  return cross_entropy(logits_fn(params, batch["inputs"]), batch)


_grad = jax.grad(_loss)


def _flat(tree):
  return ravel_pytree(tree)[0]


def _add(a, b):
  return jax.tree.map(jnp.add, a, b)


def _ref_eps(g, rho, P=None, normalize="after"):
  g, unravel = ravel_pytree(g)
  P = jnp.ones_like(g) if P is None else _flat(P)
  if normalize == "after":
    d = g / P
    return unravel(rho * d / jnp.linalg.norm(d))
  return unravel(rho * (g / jnp.linalg.norm(g)) / P)


def _ref_dlogits(params, batch, logits_fn):
  return jax.grad(cross_entropy)(logits_fn(params, batch["inputs"]), batch)


def _ref_jt(params, batch, logits_fn, cotangent):
  """J(params)^T cotangent."""
  _, f = jax.vjp(lambda p: logits_fn(p, batch["inputs"]), params)
  return f(cotangent)[0]


def _ref(method, params, batch, logits_fn, rho, eps=None):
  """Direct formulas from the paper, written without sam.py."""
  g = _grad(params, batch, logits_fn)
  eps = _ref_eps(g, rho) if eps is None else eps
  params_eps = _add(params, eps)
  if method == "sam":
    return jax.grad(_loss)(params_eps, batch, logits_fn)
  if method == "functional_sam":
    return _ref_jt(
        params_eps, batch, logits_fn, _ref_dlogits(params, batch, logits_fn)
    )
  if method == "logit_sam":
    return _ref_jt(
        params, batch, logits_fn, _ref_dlogits(params_eps, batch, logits_fn)
    )
  raise NotImplementedError(method)


def _close(a, b, rtol, atol=0.0):
  flat_a = _flat(a)
  assert flat_a.size > 0  # Two empty trees would agree vacuously.
  np.testing.assert_allclose(flat_a, _flat(b), rtol=rtol, atol=atol)


def _step(method, params, batch, logits_fn, rho, **kw):
  """sam.gradient run eagerly: op-level caches are shared across tests, which
  on CPU is much cheaper than compiling every method (test_jit covers jit)."""
  kw.setdefault("phi", _phi(method))
  kw.setdefault("alpha", ALPHA.get(method))
  return sam.gradient(method, params, batch, logits_fn=logits_fn, rho=rho, **kw)


# ----------------------------------------------------------------- tests


def test_registry():
  assert set(sam.METHODS) == {
      "adamw",
      "sam",
      "functional_sam",
      "logit_sam",
      "angle_sam",
      "precond_sam",
      "precond_functional_sam",
      "adaptive_sam",
      "gsam",
      "momentum_sam",
      "functional_adaptive_sam",
      "functional_momentum_sam",
      "precond_gsam",
  }
  assert set(sam.PRECOND_METHODS) == {
      "precond_sam",
      "precond_functional_sam",
      "precond_gsam",
  }
  assert set(sam.PHI_METHODS) == {"angle_sam"}
  assert set(ALPHA) == set(sam.ALPHA_METHODS)


def test_the_plain_step_is_known_from_the_registry_and_named_by_its_optimizer():
  # Exactly one method takes the plain step: the trainer runs `sam.PLAIN`
  # for every plain or reuse step.
  assert [m for m in sam.METHODS if sam.is_plain(m)] == [sam.PLAIN]
  assert [sam.label(sam.PLAIN, o) for o in ("adamw", "sgd", "momentum")] == [
      "AdamW",
      "SGD",
      "Momentum",
  ]
  assert sam.label("functional_sam", "sgd") == "Func-SAM"
  assert sam.label("precond_sam") == "Precond SAM"


def test_adamw_is_plain_gradient(problem):
  params, logits_fn, batch = problem
  loss, grads, metrics = _step("adamw", params, batch, logits_fn, 0.1)
  ref_loss, ref_g = jax.value_and_grad(_loss)(params, batch, logits_fn)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  _close(grads, ref_g, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(
      metrics["grad_norm"], jnp.linalg.norm(_flat(ref_g)), rtol=1e-5
  )
  assert metrics["perturbation_norm"] == 0
  np.testing.assert_allclose(metrics["cosine"], 1.0, rtol=1e-5)
  assert jax.tree.structure(grads) == jax.tree.structure(params)


@pytest.mark.parametrize("method", ["sam", "functional_sam", "logit_sam"])
def test_matches_direct_formula(problem, method):
  params, logits_fn, batch = problem
  rho = 0.05
  loss, grads, metrics = _step(method, params, batch, logits_fn, rho)
  ref = _ref(method, params, batch, logits_fn, rho)
  _close(grads, ref, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(loss, _loss(params, batch, logits_fn), rtol=1e-6)
  np.testing.assert_allclose(metrics["perturbation_norm"], rho, rtol=1e-5)
  np.testing.assert_allclose(metrics["rho"], rho, rtol=1e-6)
  cos = jnp.vdot(_flat(ref), _flat(_grad(params, batch, logits_fn)))
  cos /= jnp.linalg.norm(_flat(ref)) * metrics["grad_norm"]
  np.testing.assert_allclose(metrics["cosine"], cos, rtol=1e-4)
  # The perturbation did something: not just the clean gradient.
  assert metrics["cosine"] < 1 - 1e-6


def _delta(method, params, batch, logits_fn, rho):
  """method - g, flattened."""
  _, grads, _ = _step(method, params, batch, logits_fn, rho)
  g = _grad(params, batch, logits_fn)
  return _flat(grads) - _flat(g)


def test_logit_plus_functional_is_sam_to_first_order(problem):
  """Eq. 10: (logit - g) + (func - g) = (sam - g) + O(rho^2)."""
  params, logits_fn, batch = problem
  errs = []
  for rho in (0.04, 0.02, 0.01):
    d = {
        m: _delta(m, params, batch, logits_fn, rho)
        for m in ("sam", "functional_sam", "logit_sam")
    }
    errs.append(
        jnp.linalg.norm(d["logit_sam"] + d["functional_sam"] - d["sam"])
    )
    # The first-order terms themselves are O(rho), far larger.
    assert errs[-1] < 0.1 * jnp.linalg.norm(d["sam"])
  for big, small in zip(errs, errs[1:]):
    assert 3.5 < big / small < 4.5, errs


@functools.partial(jax.jit, static_argnums=2)
def _hessian_pieces(params, batch, logits_fn):
  """g and dense H, H_G = J^T (weighted softmax-CE Hessian) J, H_F = H - H_G."""
  flat, unravel = ravel_pytree(params)
  loss = lambda f: _loss(unravel(f), batch, logits_fn)
  g = jax.grad(loss)(flat)
  H = jax.hessian(loss)(flat)
  logits_fn_flat = lambda f: logits_fn(unravel(f), batch["inputs"])
  J_NxVxP = jax.jacobian(logits_fn_flat)(flat).reshape(B * L, V, -1)
  p_NxV = jax.nn.softmax(logits_fn_flat(flat).reshape(B * L, V), axis=-1)
  w_N = batch["weights"].reshape(-1) / jnp.maximum(batch["weights"].sum(), 1.0)
  S_NxVxV = w_N[:, None, None] * (
      jax.vmap(jnp.diag)(p_NxV) - p_NxV[:, :, None] * p_NxV[:, None, :]
  )
  H_G = jnp.einsum("nvp,nvw,nwq->pq", J_NxVxP, S_NxVxV, J_NxVxP)
  return g, H, H_G, H - H_G


def test_paths_are_hessian_pieces(x64):
  """(func - g)/rho -> H_F e and (logit - g)/rho -> H_G e as rho -> 0."""
  params, logits_fn = _mlp(np.float64)
  batch = _batch(dtype=np.float64)
  g, H, H_G, H_F = _hessian_pieces(params, batch, logits_fn)
  e = g / jnp.linalg.norm(g)
  step = jax.jit(sam.gradient, static_argnums=0, static_argnames="logits_fn")
  # Sanity: the decomposition is not degenerate.
  assert jnp.linalg.norm(H_F @ e) > 0.05 * jnp.linalg.norm(H @ e)
  assert jnp.linalg.norm(H_G @ e) > 0.05 * jnp.linalg.norm(H @ e)
  for method, target in (
      ("functional_sam", H_F @ e),
      ("logit_sam", H_G @ e),
      ("sam", H @ e),
  ):
    errs = []
    for rho in (1e-2, 1e-3):
      grads = step(method, params, batch, logits_fn=logits_fn, rho=rho)[1]
      approx = (_flat(grads) - g) / rho
      errs.append(jnp.linalg.norm(approx - target) / jnp.linalg.norm(target))
    assert errs[1] < 3e-3, (method, errs)
    assert errs[1] < 0.2 * errs[0], (method, errs)  # O(rho) convergence


def test_angle_sam_endpoints_and_formula(problem):
  params, logits_fn, batch = problem
  rho = 0.1
  f = _step("functional_sam", params, batch, logits_fn, rho)[1]
  lg = _step("logit_sam", params, batch, logits_fn, rho)[1]
  _close(
      _step("angle_sam", params, batch, logits_fn, rho, phi=0.0)[1],
      f,
      rtol=1e-6,
      atol=1e-7,
  )
  _close(
      _step("angle_sam", params, batch, logits_fn, rho, phi=math.pi / 2)[1],
      lg,
      rtol=1e-6,
      atol=1e-7,
  )
  g = _grad(params, batch, logits_fn)
  phi = 0.7
  ref = jax.tree.map(
      lambda g0, a, b: g0 + math.sin(phi) * (a - g0) + math.cos(phi) * (b - g0),
      g,
      lg,
      f,
  )
  _close(
      _step("angle_sam", params, batch, logits_fn, rho, phi=phi)[1],
      ref,
      rtol=1e-5,
      atol=1e-7,
  )


@pytest.mark.parametrize("method", ALL)
def test_rho_zero_is_plain_gradient(problem, method):
  params, logits_fn, batch = problem
  _, grads, metrics = _step(method, params, batch, logits_fn, 0.0)
  _close(grads, _grad(params, batch, logits_fn), rtol=1e-5, atol=1e-7)
  assert metrics["perturbation_norm"] == 0


@pytest.mark.parametrize("normalize", ["after", "before"])
@pytest.mark.parametrize("method", ["sam", "functional_sam"])
def test_precond_with_unit_p_is_unpreconditioned(problem, method, normalize):
  params, logits_fn, batch = problem
  ones = jax.tree.map(jnp.ones_like, params)
  plain = _step(method, params, batch, logits_fn, 0.1)[1]
  for precond in (ones, None):  # None: no Adam state yet, P = 1
    pre = _step(
        "precond_" + method,
        params,
        batch,
        logits_fn,
        0.1,
        precond=precond,
        precond_normalize=normalize,
    )[1]
    _close(pre, plain, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("normalize", ["after", "before"])
@pytest.mark.parametrize("method", ["sam", "functional_sam"])
def test_precond_formulas(problem, method, normalize):
  params, logits_fn, batch = problem
  rng = np.random.default_rng(7)
  P = jax.tree.map(
      lambda x: jnp.asarray(np.exp(rng.normal(size=x.shape)), x.dtype), params
  )
  rho = 0.05
  _, grads, metrics = _step(
      "precond_" + method,
      params,
      batch,
      logits_fn,
      rho,
      precond=P,
      precond_normalize=normalize,
  )
  g = _grad(params, batch, logits_fn)
  eps = _ref_eps(g, rho, P, normalize)
  _close(
      grads,
      _ref(method, params, batch, logits_fn, rho, eps=eps),
      rtol=1e-4,
      atol=1e-6,
  )
  np.testing.assert_allclose(
      metrics["perturbation_norm"], jnp.linalg.norm(_flat(eps)), rtol=1e-5
  )
  if normalize == "after":
    np.testing.assert_allclose(metrics["perturbation_norm"], rho, rtol=1e-5)
  # A non-trivial P changes the result.
  plain = _step(method, params, batch, logits_fn, rho)[1]
  assert jnp.abs(_flat(grads) - _flat(plain)).max() > 1e-5


@pytest.mark.parametrize("method", ALL)
def test_zero_gradient_stays_finite(method):
  params, logits_fn = _mlp()
  batch = dict(_batch(), weights=jnp.zeros((B, L), jnp.float32))
  kw = (
      {"precond": jax.tree.map(jnp.ones_like, params)}
      if (method in sam.PRECOND_METHODS)
      else {}
  )
  loss, grads, metrics = _step(method, params, batch, logits_fn, 0.1, **kw)
  assert loss == 0
  assert jax.tree.structure(grads) == jax.tree.structure(params)
  assert all(bool(jnp.all(x == 0)) for x in jax.tree.leaves(grads))
  for name, value in metrics.items():
    assert jnp.isfinite(value), name
  assert metrics["perturbation_norm"] == 0 and metrics["cosine"] == 0


@pytest.mark.parametrize("method", ["sam", "angle_sam", "precond_sam"])
def test_jit_with_traced_rho(method):
  params, logits_fn = _mlp()
  batch = _batch()
  P = jax.tree.map(lambda x: 1.0 + jnp.abs(x), params)
  step = jax.jit(
      functools.partial(
          sam.gradient, method, logits_fn=logits_fn, phi=_phi(method)
      )
  )
  for rho in (0.05, 0.1):
    loss, grads, metrics = step(params, batch, rho=jnp.float32(rho), precond=P)
    ref = _step(method, params, batch, logits_fn, rho, precond=P)
    assert bool(jnp.all(jnp.isfinite(_flat(grads))))
    np.testing.assert_allclose(loss, ref[0], rtol=1e-6)
    _close(grads, ref[1], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(metrics["rho"], rho, rtol=1e-6)


def _passes(method):
  """(forwards, backwards) through logits_fn in one eager step, counted."""
  params, _ = _mlp()
  base = _mlp_logits
  counts = {"fwd": 0, "bwd": 0}

  def logits_fn(params, inputs):
    @jax.custom_vjp
    def f(p):
      counts["fwd"] += 1
      return base(p, inputs)

    def f_fwd(p):
      counts["fwd"] += 1
      return base(p, inputs), p

    def f_bwd(p, ct):
      counts["bwd"] += 1
      return jax.vjp(lambda q: base(q, inputs), p)[1](ct)

    f.defvjp(f_fwd, f_bwd)
    return f(params)

  _step(method, params, _batch(), logits_fn, 0.1)
  return counts["fwd"], counts["bwd"]


def _matmuls(method):
  """Matmuls in the traced step on the MLP: 2 per forward (x W1, h W2) and
  4 per backward (each one's two cotangents)."""
  params, _ = _mlp()
  step = lambda p, b: sam.gradient(
      method,
      p,
      b,
      logits_fn=_mlp_logits,
      rho=0.1,
      phi=_phi(method),
      alpha=ALPHA.get(method),
  )
  return str(jax.make_jaxpr(step)(params, _batch())).count("dot_general")


@pytest.mark.parametrize("method", ALL)
def test_cost(method):
  """The passes in a method's registry entry (which bench's FLOPs use) are
  the step's: counted through logits_fn, and as matmuls of the traced step."""
  entry = sam.METHODS[method]
  assert _passes(method) == (entry.forwards, entry.backwards)
  assert _matmuls(method) == 2 * entry.forwards + 4 * entry.backwards


def test_a_runs_compute_counts_each_method_at_its_registry_cost():
  """adamw_step_equivalents and bench's FLOPs read `Method.cost`, (2
  forwards + 4 backwards) / 6: Angle-SAM's third backward counts, and
  Momentum-SAM's one pass costs a plain step."""
  from nanodo_sam import flops
  from nanodo_sam import sam_schedule

  eq = sam_schedule.adamw_step_equivalents
  assert sam.METHODS["sam"].cost == 2 and sam.METHODS["adamw"].cost == 1
  assert eq(300, 0, "angle_sam") == pytest.approx(300 * 16 / 6)
  assert eq(300, 100, "momentum_sam") == 300
  assert eq(300, 100, "functional_sam") == 100 + 2 * 200
  for method, entry in sam.METHODS.items():
    assert flops.method_flops_factor(method) == entry.cost
    assert eq(10, 0, method) == pytest.approx(10 * entry.cost)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(method="samm", rho=0.1, phi=None), "unknown.*functional_sam"),
        (dict(method="sam", rho=-0.1, phi=None), "rho"),
        (dict(method="sam", rho=0.1, phi=0.3), "phi.*ignored"),
        (dict(method="adamw", rho=0.0, phi=0.3), "phi.*ignored"),
        (dict(method="angle_sam", rho=0.1, phi=None), "needs.*phi"),
        (
            dict(method="precond_sam", rho=0.1, phi=None, optimizer="sgd"),
            "adamw",
        ),
        (
            dict(
                method="precond_functional_sam",
                rho=0.1,
                phi=None,
                optimizer="momentum",
            ),
            "adamw",
        ),
        (
            dict(method="sam", rho=0.1, phi=None, precond_normalize="middle"),
            "precond_normalize",
        ),
        (
            dict(method="precond_sam", rho=0.1, precond_normalize="middle"),
            "precond_normalize.*after, before",
        ),
        (dict(method="gsam", rho=0.1, alpha=-1.0), "alpha.*>= 0"),
    ],
)
def test_validate_raises(kwargs, match):
  with pytest.raises(ValueError, match=match) as info:
    sam.validate(**kwargs)
  assert "\n" not in str(info.value)


def test_an_unknown_perturbation_scope_is_refused():
  """Where the step is perturbed is distribute.py's: its one check."""
  with pytest.raises(ValueError, match="perturbation_scope.*microbatch") as e:
    distribute.validate_scope("local")
  assert "\n" not in str(e.value)


def test_validate_accepts_good_and_gradient_checks():
  sam.validate("angle_sam", 0.1, phi=0.5)
  sam.validate("precond_sam", 0.0, optimizer="adamw")
  sam.validate("sam", 0.1, optimizer="sgd")
  params, logits_fn = _mlp()
  batch = _batch()
  with pytest.raises(ValueError, match="needs.*phi"):
    sam.gradient("angle_sam", params, batch, logits_fn=logits_fn, rho=0.1)
  with pytest.raises(ValueError, match="unknown"):
    sam.gradient("nope", params, batch, logits_fn=logits_fn, rho=0.1)


# ------------------------------------------- adding a method: one place


def _half_sam(step):
  """(g + grad L(theta + eps)) / 2: a method made up for this test."""
  eps = step.perturbed()
  return jax.tree.map(
      lambda g, s: (g + s) / 2, step.clean.grads, step.jt(eps, eps)
  )


def test_a_new_method_is_one_function_and_one_registry_line(
    monkeypatch, tmp_path, capsys
):
  """Registered in sam.METHODS and nowhere else, a method takes gradient
  steps, passes config validation (a typo does not), runs in `nanodo-sam
  bench` through the compiled train step and is labelled in the tables."""
  from conftest import fake_run, tiny_config
  from nanodo_sam import bench
  from nanodo_sam import config as config_lib
  from nanodo_sam import tables as make_tables
  from nanodo_sam import validation

  monkeypatch.setitem(
      sam.METHODS, "half_sam", sam.Method(_half_sam, "Half-SAM")
  )
  params, logits_fn = _mlp()
  batch = _batch()
  _, grads, _ = _step("half_sam", params, batch, logits_fn, 0.1)
  g = _grad(params, batch, logits_fn)
  ref = jax.tree.map(
      lambda a, b: (a + b) / 2, g, _ref("sam", params, batch, logits_fn, 0.1)
  )
  _close(grads, ref, rtol=1e-4, atol=1e-6)
  assert _passes("half_sam") == (2, 2) and _matmuls("half_sam") == 12

  validation.validate(tiny_config(**{"sam.method": "half_sam", "sam.rho": 0.1}))
  with pytest.raises(config_lib.UsageError, match="'half_samm' is unknown"):
    validation.validate(tiny_config(**{"sam.method": "half_samm"}))

  assert "half_sam" in [v.name for v in bench.parse_methods("all")]
  (row,) = bench.run(tiny_config(), [], "half_sam", steps=1, out=None)["rows"]
  assert row["method"] == "half_sam" and row["method_flops_factor"] == 2
  assert row["timed_samples"] == 3 and np.isfinite(row["final_loss"])

  fake_run(tmp_path, "half", method="half_sam", rho=0.1, seed=0, loss=3.9)
  capsys.readouterr()
  assert make_tables.main([str(tmp_path)]) == 0
  assert (
      "| fixed_length | 2M | gelu | Half-SAM | 3.9000 | 0.1 |"
      in capsys.readouterr().out
  )


BETA = sam.Option(
    "beta",
    "The weight of the perturbed gradient (made up for a test).",
    example=0.3,
    least=0.0,
)


def _beta_sam(step):
  """g + beta (grad L(theta + eps) - g): a method with an option of its own,
  made up for this test."""
  eps, beta = step.perturbed(), step.option(BETA)
  return jax.tree.map(
      lambda g, s: g + beta * (s - g), step.clean.grads, step.jt(eps, eps)
  )


def test_a_method_declares_its_own_option_in_its_registry_entry(
    monkeypatch, tmp_path, capsys
):
  """A method registered here with an option of its own (sam.beta, declared
  only in its entry) takes it in `sam.gradient`, finds it in --config.sam.*
  with its range checked in one validation line, runs in `nanodo-sam bench`
  at the option's example, gets it in a sweep and shows it in the tables."""
  from conftest import QUICKSTART, fake_run, tiny_config
  from nanodo_sam import bench
  from nanodo_sam import cli
  from nanodo_sam import keys
  from nanodo_sam import runs
  from nanodo_sam import sweep_spec
  from nanodo_sam import tables as make_tables
  from nanodo_sam import validation

  monkeypatch.setitem(
      sam.METHODS,
      "beta_sam",
      sam.Method(_beta_sam, "Beta-SAM", options=(BETA,)),
  )
  params, logits_fn = _mlp()
  batch = _batch()
  _, grads, _ = _step("beta_sam", params, batch, logits_fn, 0.1, beta=0.3)
  g = _grad(params, batch, logits_fn)
  ref = jax.tree.map(
      lambda a, b: a + 0.3 * (b - a),
      g,
      _ref("sam", params, batch, logits_fn, 0.1),
  )
  _close(grads, ref, rtol=1e-4, atol=1e-6)

  # The key table: its default, range and meaning, from the entry.
  key = keys.BY_NAME["sam.beta"]
  assert key.default is None and "Beta-SAM" not in key.meaning
  assert "made up" in key.meaning and "beta_sam" in key.meaning
  assert keys.defaults().sam.beta is None

  # --config.sam.beta: out of range, unset and set for another method are
  # each one line on stderr (exit 2); set for beta_sam, it validates.
  def error(*overrides):
    with pytest.raises(SystemExit) as e:
      cli.main(
          [
              "train",
              f"--config={QUICKSTART}",
              f"--workdir={tmp_path / 'never'}",
              *overrides,
          ]
      )
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1, err
    return err[0]

  assert "sam.beta=-1.0 must be >= 0" in error(
      "--config.sam.method=beta_sam", "--config.sam.beta=-1.0"
  )
  assert "sam.method='beta_sam' needs sam.beta" in error(
      "--config.sam.method=beta_sam"
  )
  assert "sam.beta=0.3 is ignored by sam.method='sam'" in error(
      "--config.sam.method=sam", "--config.sam.beta=0.3"
  )
  assert not (tmp_path / "never").exists()
  validation.validate(
      tiny_config(**{"sam.method": "beta_sam", "sam.rho": 0.1, "sam.beta": 0.5})
  )

  # bench sets the option's example; a sweep gets it too.
  (row,) = bench.run(tiny_config(), [], "beta_sam", steps=1, out=None)["rows"]
  assert row["method"] == "beta_sam" and np.isfinite(row["final_loss"])
  (run,) = sweep_spec.method_runs(["beta_sam"], [0.1])
  assert run["sam.beta"] == BETA.example == 0.3

  # The tables: a run's own beta is what sets it apart from the others.
  assert "sam.beta" in runs.variant_keys()
  fake_run(tmp_path, "beta", method="beta_sam", rho=0.1, seed=0, loss=3.9)
  cfg_path = tmp_path / "beta" / "config.json"
  cfg = json.loads(cfg_path.read_text())
  cfg["sam"]["beta"] = 0.3
  cfg_path.write_text(json.dumps(cfg))
  capsys.readouterr()
  assert make_tables.main([str(tmp_path)]) == 0
  assert (
      "| Beta-SAM | 3.9000 | 0.1 | 0.001 | beta=0.3 |"
      in capsys.readouterr().out
  )


def test_register_shares_an_option_or_refuses_a_different_one(monkeypatch):
  """A method reusing an option name must reuse its Option (one default,
  range and meaning per key); `register` adds it to METHODS otherwise."""
  monkeypatch.setattr(sam, "METHODS", dict(sam.METHODS))
  sam.register(
      "angle_sam_2",
      sam.Method(
          sam.METHODS["angle_sam"].fn, "Angle-SAM 2", options=(sam.PHI,)
      ),
  )
  assert sam.methods_with("phi") == {"angle_sam", "angle_sam_2"}
  other_phi = sam.Option("phi", "Another angle.", least=0.0)
  with pytest.raises(ValueError, match="sam.phi of method 'x'.*differs"):
    sam.register("x", sam.Method(_beta_sam, "X", options=(other_phi,)))
  assert "x" not in sam.METHODS


@pytest.mark.parametrize("num_microbatches", [1, 3])
def test_accumulated_gradient_returns_one_shape(num_microbatches):
  """A GradientResult (loss, grads, metrics, reuse) whatever the options;
  reuse is filled only on request, and asking for it changes nothing else.
  On one microbatch it is `gradient`'s result."""
  params, logits_fn = _mlp()
  batch = dict(_batch(), weights=jnp.ones((B, L), jnp.float32))
  step = functools.partial(
      distribute.accumulated_gradient,
      "functional_sam",
      params,
      batch,
      logits_fn=logits_fn,
      rho=0.1,
      num_microbatches=num_microbatches,
  )
  plain, with_reuse = step(), step(return_reuse=True)
  for out in (plain, with_reuse):
    assert isinstance(out, distribute.GradientResult) and len(out) == 4
  assert plain.reuse is None and isinstance(with_reuse.reuse, sam.Reuse)
  np.testing.assert_array_equal(plain.loss, with_reuse.loss)
  _close(plain.grads, with_reuse.grads, rtol=0)
  if num_microbatches == 1:
    loss, grads, metrics = _step(
        "functional_sam", params, batch, logits_fn, 0.1
    )
    np.testing.assert_array_equal(plain.loss, loss)
    _close(plain.grads, grads, rtol=0)
    assert set(plain.metrics) == set(metrics)
  with pytest.raises(ValueError, match="perturbation_scope"):
    step(perturbation_scope="local")
