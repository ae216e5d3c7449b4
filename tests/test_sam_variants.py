"""ASAM, GSAM, Momentum-SAM and their combinations against formulas written
independently here (docs/sam_variants.md), and plain SAM against optax's.

The problems are test_sam.py's: a tiny Nanodo Transformer and a pure-jnp
tanh MLP, float32, and the MLP in float64 where an identity should hold to
rounding.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.contrib
import pytest
from jax.flatten_util import ravel_pytree

from nanodo_sam import config as config_lib
from nanodo_sam import distribute
from nanodo_sam import optimizer as optimizer_lib
from nanodo_sam import sam
from nanodo_sam import sam_schedule
from nanodo_sam import validation

# The small problems and the float64 fixture of the paper's methods' tests.
from test_sam import _batch, _mlp, _passes
from test_sam import problem, x64  # pylint: disable=unused-import

RHO = 0.05


# ------------------------------------------------------------ references


def _loss(flat, unravel, batch, logits_fn):
  logits = logits_fn(unravel(flat), batch["inputs"])
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
  w = batch["weights"]
  return jnp.sum(nll * w) / jnp.maximum(jnp.sum(w), 1.0)


def _grad_at(params, batch, logits_fn):
  """flat theta -> flat grad L(theta), with the unravel of `params`."""
  flat, unravel = ravel_pytree(params)
  return flat, unravel, jax.grad(lambda f: _loss(f, unravel, batch, logits_fn))


def _ref_asam(params, batch, logits_fn, rho, eta):
  theta, unravel, grad = _grad_at(params, batch, logits_fn)
  g = grad(theta)
  t = jnp.abs(theta) + eta
  eps = rho * t * t * g / jnp.linalg.norm(t * g)
  return grad(theta + eps)


def _ref_gsam(params, batch, logits_fn, rho, alpha):
  theta, unravel, grad = _grad_at(params, batch, logits_fn)
  g = grad(theta)
  g_p = grad(theta + rho * g / jnp.linalg.norm(g))
  g_orth = g - (jnp.dot(g, g_p) / jnp.dot(g_p, g_p)) * g_p
  return g_p - alpha * g_orth


def _ref_msam(params, batch, logits_fn, rho, m):
  theta, unravel, grad = _grad_at(params, batch, logits_fn)
  m = ravel_pytree(m)[0]
  point = theta - rho * m / jnp.linalg.norm(m)
  return _loss(point, unravel, batch, logits_fn), grad(point)


def _momentum(params, seed=3):
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), params
  )


def _flat(tree):
  return ravel_pytree(tree)[0]


def _close(a, b, rtol=1e-5, atol=1e-7):
  a, b = _flat(a) if not isinstance(a, jax.Array) else a, (
      _flat(b) if not isinstance(b, jax.Array) else b
  )
  err = jnp.linalg.norm(a - b) / jnp.linalg.norm(b)
  assert err <= rtol or jnp.abs(a - b).max() <= atol, float(err)


def _step(method, params, batch, logits_fn, rho=RHO, **kw):
  return sam.gradient(method, params, batch, logits_fn=logits_fn, rho=rho, **kw)


# -------------------------------------------------- each method's formula


@pytest.mark.parametrize("eta", [0.01, 0.5])
def test_adaptive_sam_is_its_formula(problem, eta):
  params, logits_fn, batch = problem
  _, grads, metrics = _step(
      "adaptive_sam", params, batch, logits_fn, adaptive_eta=eta
  )
  _close(grads, _ref_asam(params, batch, logits_fn, RHO, eta))
  # ||eps|| is not rho: the step is rho in theta / T's coordinates.
  assert abs(float(metrics["perturbation_norm"]) - RHO) > 1e-4


def test_adaptive_sam_default_eta_is_the_official_one(problem):
  params, logits_fn, batch = problem
  _close(
      _step("adaptive_sam", params, batch, logits_fn)[1],
      _ref_asam(params, batch, logits_fn, RHO, 0.01),
  )


@pytest.mark.parametrize("alpha", [0.3, 1.0])
def test_gsam_is_its_formula(problem, alpha):
  params, logits_fn, batch = problem
  _, grads, _ = _step("gsam", params, batch, logits_fn, alpha=alpha)
  _close(grads, _ref_gsam(params, batch, logits_fn, RHO, alpha))
  sam_grads = _step("sam", params, batch, logits_fn)[1]
  assert jnp.abs(_flat(grads) - _flat(sam_grads)).max() > 1e-6


def test_momentum_sam_is_its_formula(problem):
  params, logits_fn, batch = problem
  m = _momentum(params)
  loss, grads, metrics = _step(
      "momentum_sam", params, batch, logits_fn, momentum=m
  )
  ref_loss, ref_grads = _ref_msam(params, batch, logits_fn, RHO, m)
  _close(grads, ref_grads)
  # Its one pass is at theta + eps: the loss it reports is there.
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  np.testing.assert_allclose(metrics["perturbation_norm"], RHO, rtol=1e-5)


# ------------------------------------------------------- combinations


def _ref_functional(params, batch, logits_fn, eps_flat):
  """J(theta + eps)^T dL/dF(theta), eps flat."""
  theta, unravel = ravel_pytree(params)
  logits = lambda f: logits_fn(unravel(f), batch["inputs"])

  def loss_of_logits(z):
    logp = jax.nn.log_softmax(z.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
    w = batch["weights"]
    return jnp.sum(nll * w) / jnp.maximum(jnp.sum(w), 1.0)

  dlogits = jax.grad(loss_of_logits)(logits(theta))
  _, pull = jax.vjp(logits, theta + eps_flat)
  return pull(dlogits.astype(logits(theta).dtype))[0]


def test_functional_adaptive_sam_is_its_formula(problem):
  params, logits_fn, batch = problem
  theta, _, grad = _grad_at(params, batch, logits_fn)
  g = grad(theta)
  t = jnp.abs(theta) + 0.1
  eps = RHO * t * t * g / jnp.linalg.norm(t * g)
  _, grads, _ = _step(
      "functional_adaptive_sam", params, batch, logits_fn, adaptive_eta=0.1
  )
  _close(grads, _ref_functional(params, batch, logits_fn, eps))


def test_functional_momentum_sam_is_its_formula(problem):
  params, logits_fn, batch = problem
  m = _momentum(params)
  m_flat = _flat(m)
  eps = -RHO * m_flat / jnp.linalg.norm(m_flat)
  loss, grads, _ = _step(
      "functional_momentum_sam", params, batch, logits_fn, momentum=m
  )
  _close(grads, _ref_functional(params, batch, logits_fn, eps))
  theta, unravel, _ = _grad_at(params, batch, logits_fn)
  # Unlike momentum_sam, its clean pass (and loss) is at theta.
  np.testing.assert_allclose(
      loss, _loss(theta, unravel, batch, logits_fn), rtol=1e-5
  )


def test_precond_gsam_is_its_formula(problem):
  params, logits_fn, batch = problem
  rng = np.random.default_rng(7)
  P = jax.tree.map(
      lambda x: jnp.asarray(np.exp(rng.normal(size=x.shape)), x.dtype), params
  )
  theta, _, grad = _grad_at(params, batch, logits_fn)
  g, p = grad(theta), _flat(P)
  g_p = grad(theta + RHO * (g / p) / jnp.linalg.norm(g / p))
  ref = g_p - 0.3 * (g - (jnp.dot(g, g_p) / jnp.dot(g_p, g_p)) * g_p)
  _, grads, _ = _step(
      "precond_gsam", params, batch, logits_fn, alpha=0.3, precond=P
  )
  _close(grads, ref)
  plain = _step("gsam", params, batch, logits_fn, alpha=0.3)[1]
  assert jnp.abs(_flat(grads) - _flat(plain)).max() > 1e-6


# ---------------------------------------------------- limits and identities


@pytest.mark.parametrize(
    "method,kw",
    [
        ("adaptive_sam", {}),
        ("gsam", {"alpha": 0.5}),
        ("momentum_sam", {"momentum": "m"}),
    ],
)
def test_rho_zero_gives_g(problem, method, kw):
  params, logits_fn, batch = problem
  kw = {k: (_momentum(params) if v == "m" else v) for k, v in kw.items()}
  _, grads, _ = _step(method, params, batch, logits_fn, rho=0.0, **kw)
  _close(grads, _grad_at(params, batch, logits_fn)[2](_flat(params)))


def test_gsam_alpha_zero_is_sam(x64):
  params, logits_fn = _mlp(np.float64)
  batch = _batch(dtype=np.float64)
  gsam = _step("gsam", params, batch, logits_fn, alpha=0.0)[1]
  _close(gsam, _step("sam", params, batch, logits_fn)[1], rtol=1e-12)


def test_asam_eta_zero_at_theta_one_is_sam(x64):
  params, logits_fn = _mlp(np.float64)
  params = jax.tree.map(jnp.ones_like, params)
  batch = _batch(dtype=np.float64)
  asam = _step("adaptive_sam", params, batch, logits_fn, adaptive_eta=0.0)
  _close(asam[1], _step("sam", params, batch, logits_fn)[1], rtol=1e-12)


def test_msam_with_zero_or_no_momentum_is_g(problem):
  params, logits_fn, batch = problem
  g = _grad_at(params, batch, logits_fn)[2](_flat(params))
  for m in (None, jax.tree.map(jnp.zeros_like, params)):
    loss, grads, metrics = _step(
        "momentum_sam", params, batch, logits_fn, momentum=m
    )
    _close(grads, g)
    assert metrics["perturbation_norm"] == 0


def test_passes():
  """The registry's costs (bench's FLOPs), counted in the eager step
  (test_sam.py's counter; it gives GSAM alpha 0.3)."""
  for method, cost in (
      ("adaptive_sam", (2, 2)),
      ("gsam", (2, 2)),
      ("momentum_sam", (1, 1)),
      ("functional_adaptive_sam", (2, 2)),
      ("functional_momentum_sam", (2, 2)),
      ("precond_gsam", (2, 2)),
  ):
    entry = sam.METHODS[method]
    assert _passes(method) == cost == (entry.forwards, entry.backwards)


@pytest.mark.parametrize(
    "method,kw",
    [
        ("gsam", {"alpha": 0.4}),
        ("adaptive_sam", {}),
        ("momentum_sam", {"momentum": "m"}),
    ],
)
def test_accumulation_equals_one_full_batch_step(method, kw):
  """Global scope: microbatches give the whole batch's step, GSAM's
  projection included (applied once to the summed gradients)."""
  params, logits_fn = _mlp()
  batch = dict(_batch(), weights=jnp.ones((3, 4), jnp.float32))
  kw = {k: (_momentum(params) if v == "m" else v) for k, v in kw.items()}
  full = _step(method, params, batch, logits_fn, **kw)
  acc = distribute.accumulated_gradient(
      method,
      params,
      batch,
      logits_fn=logits_fn,
      rho=RHO,
      num_microbatches=3,
      **kw,
  )
  _close(acc.grads, full[1])
  np.testing.assert_allclose(acc.loss, full[0], rtol=1e-6)


# ------------------------------------------- plain SAM against optax's


def test_sam_with_adamw_matches_optax_contrib_sam(x64):
  """Two full updates of SAM + AdamW: sam.gradient then optax.adamw against
  optax.contrib.sam(adamw, normalize + sgd(rho), opaque_mode=True), an
  implementation this project did not write."""
  params, logits_fn = _mlp(np.float64)
  batches = [_batch(s, np.float64) for s in (0, 1)]
  rho, lr = 0.05, 1e-2
  adamw = lambda: optax.adamw(lr, b1=0.9, b2=0.98, eps=1e-9, weight_decay=0.1)
  ref_tx = optax.contrib.sam(
      adamw(),
      optax.chain(optax.contrib.normalize(), optax.sgd(rho)),
      sync_period=2,
      opaque_mode=True,
  )
  tx = adamw()
  loss_fn = lambda p, b: _loss(_flat(p), ravel_pytree(p)[1], b, logits_fn)
  ours, theirs = params, params
  ours_state, theirs_state = tx.init(params), ref_tx.init(params)
  for batch in batches:
    _, grads, _ = _step("sam", ours, batch, logits_fn, rho=rho)
    updates, ours_state = tx.update(grads, ours_state, ours)
    ours = optax.apply_updates(ours, updates)
    grad_fn = jax.grad(lambda p, _, b=batch: loss_fn(p, b))
    updates, theirs_state = ref_tx.update(
        grad_fn(theirs, 0), theirs_state, theirs, grad_fn=grad_fn
    )
    theirs = optax.apply_updates(theirs, updates)
  moved = jnp.linalg.norm(_flat(theirs) - _flat(params))
  assert moved > 1e-3
  # Relative to the distance moved (the loss is taken in float32).
  err = jnp.linalg.norm(_flat(ours) - _flat(theirs)) / moved
  assert err < 1e-5, float(err)


# ---------------------------------------------------- rho follows lr


def test_rho_follows_the_learning_rate():
  """GSAM's rho_t = rho_min + (rho - rho_min)(lr_t - lr_min)/(lr_max -
  lr_min): warmup 1e-3 -> 1e-2 over 10 steps, cosine to 1e-3 at 110."""
  cfg = config_lib.load_config_file("configs/base.py")
  cfg.opt.update(
      num_train_steps=110,
      warmup_steps=10,
      peak_learning_rate=1e-2,
      decay_type="cosine",
  )
  cfg.sam.update(
      method="gsam", rho=0.2, alpha=0.1, rho_schedule="lr", rho_min=0.05
  )
  validation.validate(cfg)
  rho = lambda s: float(sam_schedule.rho_at(cfg.sam, s, cfg.opt))
  expected = {
      0: 0.05,
      5: 0.05 + 0.15 * 0.5,
      10: 0.2,
      60: 0.05 + 0.15 * 0.5,
      110: 0.05,
  }
  for step, want in expected.items():
    np.testing.assert_allclose(rho(step), want, rtol=1e-5, err_msg=step)
  cfg.sam.rho_min = None  # Unset: 0 at the lowest rate.
  np.testing.assert_allclose(rho(60), 0.1, rtol=1e-5)
  cfg.sam.rho_schedule = "constant"
  assert rho(60) == pytest.approx(0.2)


# ------------------------------------------------------------ validation


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(method="gsam", rho=0.1), "needs sam.alpha \\(GSAM's"),
        (dict(method="sam", rho=0.1, alpha=0.2), "sam.alpha=0.2 is ignored"),
        (
            dict(method="sam", rho=0.1, adaptive_eta=0.1),
            "adaptive_eta=0.1 is ignored.*adaptive_sam",
        ),
        (dict(method="gsam", rho=0.1, alpha=-0.5), "alpha=-0.5 must be >= 0"),
        (
            dict(method="adaptive_sam", rho=0.1, adaptive_eta=-1.0),
            "adaptive_eta=-1.0 must be >= 0",
        ),
        (
            dict(method="momentum_sam", rho=0.1, optimizer="sgd"),
            "first moment.*'adamw' or 'momentum'",
        ),
    ],
)
def test_validate_raises(kwargs, match):
  with pytest.raises(ValueError, match=match) as info:
    sam.validate(**kwargs)
  assert "\n" not in str(info.value)


def test_validate_accepts():
  sam.validate("momentum_sam", 0.1, optimizer="momentum")
  sam.validate("adaptive_sam", 0.1, adaptive_eta=0.0)
  sam.validate("gsam", 0.1, alpha=0.0)


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"sam.method": "sam", "sam.alpha": 0.1}, "sam.alpha=0.1 is ignored"),
        (
            {"sam.method": "momentum_sam", "opt.optimizer": "sgd"},
            "first moment",
        ),
        ({"sam.rho_min": 0.01}, "rho_min=0.01 is ignored by sam.rho_schedule"),
        ({"sam.rho_schedule": "cosine"}, "rho_schedule='cosine' is unknown"),
        ({"sam.rho_schedule": "lr", "sam.rho_min": 0.5}, "exceeds sam.rho"),
        ({"sam.method": "gsam", "sam.alpha": -1.0}, "sam.alpha=-1.0 must be"),
    ],
)
def test_config_validation_is_one_line(overrides, match):
  from conftest import tiny_config

  cfg = tiny_config(**{"sam.method": "sam", "sam.rho": 0.1, **overrides})
  with pytest.raises(config_lib.UsageError, match=match) as info:
    validation.validate(cfg)
  assert "\n" not in str(info.value)


# --------------------------------------------- the optimizer's first moment


@pytest.mark.parametrize("name", ["adamw", "momentum"])
def test_first_moment_is_the_optimizers(name):
  from conftest import tiny_config

  cfg = tiny_config(**{"opt.optimizer": name, "opt.weight_decay": 0.0})
  tx = optimizer_lib.make_optimizer(cfg.opt)
  params, _ = _mlp()
  state = tx.init(params)
  assert all(
      bool(jnp.all(x == 0))
      for x in jax.tree.leaves(optimizer_lib.first_moment(state))
  )
  g = _momentum(params, seed=5)
  _, state = tx.update(g, state, params)
  m = optimizer_lib.first_moment(state)
  # After one update: AdamW's mu = (1 - b1) g; SGD-momentum's trace = g.
  scale = (1 - cfg.opt.b1) if name == "adamw" else 1.0
  _close(m, jax.tree.map(lambda x: scale * x, g), rtol=1e-6)
  with pytest.raises(ValueError, match="first moment"):
    optimizer_lib.first_moment(optax.sgd(0.1).init(params))


@pytest.mark.slow  # The real train step over several steps, ~18 s.
def test_train_step_hands_momentum_sam_adamws_first_moment():
  """The jitted train step: no first moment at step 0 (the plain step), then
  eps = -rho mu/||mu|| with AdamW's mu from the state it is given."""
  from conftest import tiny_config
  from nanodo_sam import state as state_lib
  from nanodo_sam import step as step_lib

  cfg = tiny_config(
      **{
          "sam.method": "momentum_sam",
          "sam.rho": 0.1,
          "model.L": 8,
          "data.batch_size": 2,
      }
  )
  s = state_lib.setup(cfg)
  state = state_lib.init_state(s, 0)
  rng = np.random.default_rng(0)
  batch = {
      "inputs": rng.integers(0, 259, (2, 8)).astype(np.int32),
      "targets": rng.integers(0, 259, (2, 8)).astype(np.int32),
      "weights": np.ones((2, 8), np.float32),
  }
  run = step_lib.jit_train_step(s, "momentum_sam")
  state, metrics = run(state, batch)
  assert metrics["perturbation_norm"] == 0
  params = jax.device_get(state.params)
  mu = jax.device_get(optimizer_lib.first_moment(state.opt_state))
  want_loss, want_g = _ref_msam(params, batch, s.logits_fn, 0.1, mu)
  _, metrics = run(state, batch)
  np.testing.assert_allclose(metrics["perturbation_norm"], 0.1, rtol=1e-5)
  np.testing.assert_allclose(metrics["loss"], want_loss, rtol=1e-5)
  np.testing.assert_allclose(
      metrics["grad_norm"], jnp.linalg.norm(want_g), rtol=1e-5
  )


# ------------------------------------------------ sweeps and benchmarks


def test_every_method_in_the_rho_sweep_gets_a_valid_config(monkeypatch):
  """configs/sweeps/rho_sweep.py over all of sam.METHODS: each run's config
  passes validation (the options a method needs are filled in)."""
  from configs.sweeps import rho_sweep
  from nanodo_sam import bench

  monkeypatch.setattr(rho_sweep, "METHODS", tuple(sam.METHODS))
  runs = rho_sweep.get_sweep().runs
  assert {r["sam.method"] for r in runs} == set(sam.METHODS)
  base = config_lib.load_config_file(rho_sweep.get_sweep().config)
  for run in runs:
    cfg = base.copy_and_resolve_references()
    cfg.update_from_flattened_dict(dict(run))
    validation.validate(cfg)
  # nanodo-sam bench --methods=all reads the same registry.
  assert set(sam.METHODS) <= {v.name for v in bench.parse_methods("all")}


def test_variants_table_pairs_seeds_with_adamw(tmp_path):
  from conftest import fake_run
  from scripts import variants_table

  for seed, adamw, gsam in ((0, 7.0, 6.9), (1, 7.2, 7.0)):
    fake_run(
        tmp_path,
        f"adamw-{seed}",
        method="adamw",
        rho=0.0,
        seed=seed,
        loss=adamw,
    )
    fake_run(
        tmp_path, f"gsam-{seed}", method="gsam", rho=0.1, seed=seed, loss=gsam
    )
  fake_run(tmp_path, "gsam-2", method="gsam", rho=0.2, seed=0, loss=7.3)
  from nanodo_sam import runs as runs_lib

  rows = {
      r["label"]: r
      for r in variants_table.rows(
          runs_lib.load_runs(
              [str(tmp_path)], finished=True, warn=lambda _: None
          )
      )
  }
  assert set(rows) == {"AdamW", "GSAM ρ=0.1", "GSAM ρ=0.2"}
  assert rows["GSAM ρ=0.1"]["seeds"] == [0, 1]
  np.testing.assert_allclose(rows["GSAM ρ=0.1"]["loss"], 6.95)
  np.testing.assert_allclose(rows["GSAM ρ=0.1"]["vs_adamw"], -0.15)
  np.testing.assert_allclose(rows["GSAM ρ=0.2"]["vs_adamw"], 0.3)
  assert variants_table.table(str(tmp_path)).startswith("5 of ? runs")


# ------------------------------------------- per-replica perturbations

REPLICA_CASES = (
    ("sam", {}),
    ("gsam", {"alpha": 0.3}),
    ("adaptive_sam", {}),
    ("momentum_sam", {"momentum": "m"}),
    ("functional_sam", {}),
)


def _replica_errors() -> dict:
  """On 8 simulated devices (mesh data 4 x fsdp 2): perturbation_scope=
  replica against a loop over the 8 shards of rows computed on one device,
  each with its own step, averaged by the shards' loss weights. Also how far
  the global scope's result is (the check is not vacuous)."""
  from jax.sharding import NamedSharding, PartitionSpec as P

  params, _ = _mlp()
  from test_sam import _mlp_logits

  mesh = jax.make_mesh((4, 2, 1), ("data", "fsdp", "tensor"))
  rows = NamedSharding(mesh, P(("data", "fsdp")))
  groups = distribute.Groups(rows, NamedSharding(mesh, P()), _mlp_logits)
  rng = np.random.default_rng(0)
  batch = {
      "inputs": rng.integers(0, 11, (16, 4)).astype(np.int32),
      "targets": rng.integers(0, 11, (16, 4)).astype(np.int32),
      "weights": (rng.uniform(size=(16, 4)) > 0.3).astype(np.float32),
  }
  sharded = jax.device_put(batch, rows)
  out = {}
  for method, kw in REPLICA_CASES:
    kw = {k: (_momentum(params) if v == "m" else v) for k, v in kw.items()}
    shards = [
        jax.tree.map(lambda x, j=j: x[2 * j : 2 * j + 2], batch)
        for j in range(8)
    ]
    w = np.array([s["weights"].sum() for s in shards])
    steps = [_step(method, params, s, _mlp_logits, **kw) for s in shards]
    ref = sum(wj * _flat(st[1]) for wj, st in zip(w, steps)) / w.sum()
    ref_loss = sum(wj * st[0] for wj, st in zip(w, steps)) / w.sum()
    whole = _flat(_step(method, params, batch, _mlp_logits, **kw)[1])
    for k in (1, 2):
      run = jax.jit(
          lambda p, b, k=k, kw=kw: distribute.accumulated_gradient(
              method,
              p,
              b,
              logits_fn=_mlp_logits,
              rho=RHO,
              num_microbatches=k,
              perturbation_scope="replica",
              groups=groups,
              **kw,
          )
      )
      res = run(params, sharded)
      got = _flat(res.grads)
      out[f"{method}/k{k}"] = {
          "err": float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref)),
          "loss_err": float(abs(res.loss - ref_loss) / abs(ref_loss)),
          "vs_global": float(
              jnp.linalg.norm(got - whole) / jnp.linalg.norm(ref)
          ),
      }
  out.update(_replica_train_step_errors())
  return out


def _replica_train_step_errors() -> dict:
  """The jitted train step with sam.perturbation_scope=replica (GSAM, SGD at
  learning rate 1, so the update is the gradient) against the loop over
  the 8 shards of rows with the model's own logits function."""
  from conftest import tiny_config
  from nanodo_sam import model as model_lib
  from nanodo_sam import sharding
  from nanodo_sam import state as state_lib
  from nanodo_sam import step as step_lib

  rng = np.random.default_rng(1)
  batch = {
      "inputs": rng.integers(3, 259, (16, 8)).astype(np.int32),
      "targets": rng.integers(3, 259, (16, 8)).astype(np.int32),
      "weights": (rng.uniform(size=(16, 8)) > 0.2).astype(np.float32),
  }
  out = {}
  for k in (1, 2):
    cfg = tiny_config(
        **{
            "sam.method": "gsam",
            "sam.alpha": 0.3,
            "sam.rho": RHO,
            "sam.perturbation_scope": "replica",
            "grad_accumulation_steps": k,
            "model.L": 8,
            "data.batch_size": 16,
            "mesh.data": 4,
            "mesh.fsdp": 2,
            "opt.optimizer": "sgd",
            "opt.peak_learning_rate": 1.0,
            "opt.weight_decay": 0.0,
            "opt.warmup_steps": 0,
            "opt.decay_type": "constant",
        }
    )
    s = state_lib.setup(cfg)
    state = state_lib.init_state(s, 0)
    params = jax.device_get(state.params)
    new, metrics = step_lib.jit_train_step(s, "gsam")(
        state, sharding.global_batch(batch, s.mesh)
    )
    got = _flat(params) - _flat(jax.device_get(new.params))
    logits_fn = model_lib.make_logits_fn(s.model)
    shards = [
        jax.tree.map(lambda x, j=j: x[2 * j : 2 * j + 2], batch)
        for j in range(8)
    ]
    w = np.array([b["weights"].sum() for b in shards])
    ref = (
        sum(
            wj * _flat(_step("gsam", params, b, logits_fn, alpha=0.3)[1])
            for wj, b in zip(w, shards)
        )
        / w.sum()
    )
    whole = _flat(_step("gsam", params, batch, logits_fn, alpha=0.3)[1])
    out[f"train_step/k{k}"] = {
        "err": float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref)),
        "loss_err": float(
            abs(metrics["loss"] - _step("adamw", params, batch, logits_fn)[0])
        ),
        "vs_global": float(jnp.linalg.norm(got - whole) / jnp.linalg.norm(ref)),
    }
  return out


@pytest.mark.slow  # ~1 min: 8 simulated devices in a subprocess.
def test_replica_scope_is_each_shards_own_step(tmp_path):
  import json
  import os
  import subprocess
  import sys

  here = os.path.dirname(os.path.abspath(__file__))
  root = os.path.dirname(here)
  env = dict(
      os.environ,
      JAX_PLATFORMS="cpu",
      XLA_FLAGS="--xla_force_host_platform_device_count=8",
      PYTHONPATH=os.pathsep.join([root, here]),
  )
  path = tmp_path / "replica.json"
  subprocess.run(
      [sys.executable, __file__, str(path)],
      env=env,
      cwd=root,
      check=True,
      timeout=900,
  )
  errors = json.loads(path.read_text())
  assert len(errors) == 2 * len(REPLICA_CASES) + 2
  for name, e in errors.items():
    assert e["err"] < 1e-5 and e["loss_err"] < 1e-5, (name, e)
    if not name.startswith("momentum_sam"):  # Its eps is the batch's m.
      assert e["vs_global"] > 1e-3, (name, e)


if __name__ == "__main__":
  import json
  import sys

  assert jax.device_count() == 8, jax.devices()
  with open(sys.argv[1], "w") as f:
    json.dump(_replica_errors(), f)
