"""Performance contracts: the chunked output layer equals the plain one and
holds no [B, L, V] tensor, the train step compiles once per kind and donates
its state, bfloat16 compute works for every method, the reuse step's maths,
and the benchmark itself."""

import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from nanodo_sam import bench
from nanodo_sam import config as config_lib
from nanodo_sam import distribute
from nanodo_sam import flops
from nanodo_sam import head as head_lib
from nanodo_sam import model as model_lib
from nanodo_sam import sam
from nanodo_sam import sam_schedule
from nanodo_sam import sharding
from nanodo_sam import state as state_lib
from nanodo_sam import step as step_lib
from nanodo_sam import train as train_lib
from nanodo_sam import writers

ALL = sorted(sam.METHODS)
B, L, V = 3, 8, 23


def _phi(method):
  return 0.7 if method in sam.PHI_METHODS else None


def _alpha(method):
  return 0.3 if method in sam.ALPHA_METHODS else None


def _batch(B=B, L=L, V=V, seed=0):
  rng = np.random.default_rng(seed)
  weights = (rng.uniform(size=(B, L)) > 0.25).astype(np.float32)
  weights[0, 0] = 1.0
  return {
      "inputs": jnp.asarray(rng.integers(0, V, (B, L)), jnp.int32),
      "targets": jnp.asarray(rng.integers(0, V, (B, L)), jnp.int32),
      "weights": jnp.asarray(weights),
  }


@functools.cache
def _model(dtype="float32", D=16, V=V, L=L):
  m = model_lib.TransformerDo(
      model_lib.DoConfig(D=D, H=2, N=1, F=2 * D, L=L, V=V, dtype=dtype)
  )
  return m, model_lib.init_params(m, jax.random.key(0))


def _flat(tree):
  return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


# --------------------------------------------------- the chunked output layer


def test_output_head_reproduces_the_logits():
  m, params = _model()
  logits_fn = model_lib.make_logits_fn(m)
  head = model_lib.output_head(m)
  tokens = _batch()["inputs"]
  h = head.features(params, tokens)
  np.testing.assert_array_equal(
      head.apply(head.select(params), h), logits_fn(params, tokens)
  )


@pytest.mark.slow  # The train step compiled with and without its head, ~20 s.
def test_chunked_head_equals_plain_logits_fn(monkeypatch):
  """Every method: the fused output layer + loss + cotangent, in 4 chunks of
  the sequence, gives the unfused result (the logits_fn without its head,
  the plain vjp path) to float32 tolerance."""
  m, params = _model()
  logits_fn = model_lib.make_logits_fn(m)
  model_head = model_lib.output_head(m)._replace(chunk_tokens=B * (L // 4))
  batch = _batch()
  head, chunked = head_lib.resolve_head(logits_fn, model_head)
  assert (
      chunked
      and head_lib._head_chunks(
          head,
          chunked,
          head_lib.point(
              params, batch["inputs"], logits_fn, model_head
          ).h_BxLxD,
      )
      == 4
  )
  assert not head_lib.resolve_head(logits_fn)[1]
  rng = np.random.default_rng(3)
  precond = jax.tree.map(
      lambda x: jnp.asarray(np.exp(rng.normal(size=x.shape)), x.dtype), params
  )

  @jax.jit  # One compilation for every method, fused and plain.
  def every_method(params, batch, precond):
    return {
        (method, name): sam.gradient(
            method,
            params,
            batch,
            logits_fn=logits_fn,
            rho=0.1,
            phi=_phi(method),
            alpha=_alpha(method),
            precond=precond,
            head=h,
        )
        for method in ALL
        for name, h in (("fused", model_head), ("plain", None))
    }

  out = every_method(params, batch, precond)
  for method in ALL:
    (l1, g1, m1), (l2, g2, m2) = out[method, "fused"], out[method, "plain"]
    np.testing.assert_allclose(l1, l2, rtol=2e-6, err_msg=method)
    np.testing.assert_allclose(
        _flat(g1), _flat(g2), rtol=1e-4, atol=1e-6, err_msg=method
    )
    for k in m2:
      np.testing.assert_allclose(
          m1[k], m2[k], rtol=1e-5, atol=1e-7, err_msg=f"{method} {k}"
      )


def _temp_bytes(method, logits_fn, params, batch, head=None):
  fn = jax.jit(
      functools.partial(
          sam.gradient,
          method,
          logits_fn=logits_fn,
          rho=0.1,
          phi=_phi(method),
          alpha=_alpha(method),
          head=head,
      )
  )
  m = fn.lower(params, batch).compile().memory_analysis()
  return m.temp_size_in_bytes


def _wrappers(params):
  """(logits_fn, head) -> the same pair seen through a wrapper: a python
  closure, jax.jit, and the trainer's sharding pin (one-device mesh)."""
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("fsdp",))
  pinned = jax.tree.map(
      lambda _: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()),
      params,
  )
  return {
      "closure": lambda f, h: (lambda p, x: f(p, x), h),
      "jit": lambda f, h: (jax.jit(f), h),
      "pin": lambda f, h: (
          sharding.pin_params(f, pinned),
          sharding.pin_head(h, pinned),
      ),
  }


@pytest.mark.slow  # Compiles several train steps (minutes on 2 cores).
def test_no_step_holds_a_logits_sized_tensor(monkeypatch):
  """V = 4096 >> D: one f32 [B, L, V] is far bigger than everything else. In
  8 chunks no method's temporaries reach even one of them (the plain path
  holds two), and functional_sam grows no faster than sam. A wrapped
  logits_fn (closure, jit, sharding pin) with the head handed over
  explicitly chunks the same."""
  Bm, Lm, Vm = 4, 64, 4096
  m, params = _model(D=16, V=Vm, L=Lm)
  logits_fn = model_lib.make_logits_fn(m)
  head = model_lib.output_head(m)._replace(chunk_tokens=Bm * (Lm // 8))
  batch = _batch(Bm, Lm, Vm)
  logits_bytes = Bm * Lm * Vm * 4
  temp = {
      k: _temp_bytes(k, logits_fn, params, batch, head)
      for k in ("adamw", "sam", "functional_sam", "logit_sam", "angle_sam")
  }
  assert (
      _temp_bytes("functional_sam", logits_fn, params, batch) > 2 * logits_bytes
  )
  for k, t in temp.items():
    assert t < logits_bytes, (k, t, logits_bytes)
  assert temp["functional_sam"] <= temp["sam"] + logits_bytes // 8, temp
  for name, wrap in _wrappers(params).items():
    wrapped_fn, wrapped_head = wrap(logits_fn, head)
    assert (
        _temp_bytes("functional_sam", wrapped_fn, params, batch)
        > 2 * logits_bytes
    ), name  # The wrapper alone: the plain path.
    for k in ("sam", "functional_sam"):
      t = _temp_bytes(k, wrapped_fn, params, batch, wrapped_head)
      assert t < logits_bytes, (name, k, t, logits_bytes)


# ------------------------------------------ compilation, syncs and donation


def _train_setup(method="adamw", **overrides):
  cfg = tiny_config(
      **{
          "sam.method": method,
          "sam.rho": 0.0 if method == "adamw" else 0.05,
          "sam.phi": _phi(method),
          "sam.alpha": _alpha(method),
          **overrides,
      }
  )
  s = state_lib.setup(cfg)
  batch = sharding.global_batch(bench.synthetic_batch(cfg), s.mesh)
  return cfg, s, batch


class _CompileCounter:
  """Counts XLA backend compilations through jax.monitoring."""

  def __init__(self):
    self.count = 0
    jax.monitoring.register_event_duration_secs_listener(self._on_event)

  def _on_event(self, event, duration, **kwargs):
    if event == "/jax/core/compile/backend_compile_duration":
      self.count += 1

  def close(self):
    jax.monitoring.unregister_event_duration_listener(self._on_event)


@pytest.fixture
def compiles():
  counter = _CompileCounter()
  yield counter
  counter.close()


def test_no_recompilation_after_the_first_step_of_each_kind(compiles):
  """adamw, a SAM method every step, and sam.every_k=2 switching between the
  plain and the SAM step: after the first step of each kind nothing compiles
  and every jitted step holds exactly one executable; the steps run with
  implicit host transfers disallowed (nothing in them syncs the host); the
  state passed in is donated (deleted) by every step."""
  for method, every_k in (
      ("adamw", 1),
      ("functional_sam", 1),
      ("precond_sam", 2),
  ):
    cfg, s, batch = _train_setup(method, **{"sam.every_k": every_k})
    state = state_lib.init_state(s, cfg.seed)
    fns = {}
    seen = set()
    for step in range(6):
      kind = (
          cfg.sam.method
          if sam_schedule.uses_sam_step(cfg.sam, step)
          else "adamw"
      )
      fn = fns.setdefault(kind, train_lib.jit_train_step(s, kind))
      before = compiles.count
      old = state
      with jax.transfer_guard("disallow"):
        state, metrics = fn(state, batch)
      donated = jax.tree.leaves((old.params, old.opt_state))
      assert donated and all(x.is_deleted() for x in donated), (method, step)
      if kind in seen:
        assert compiles.count == before, (method, every_k, step, kind)
      else:  # The counter does see compilations.
        assert compiles.count > before, (method, every_k, step, kind)
      seen.add(kind)
    jax.block_until_ready(state)
    assert set(fns) == ({"adamw", method} if every_k > 1 else {method})
    assert all(f._cache_size() == 1 for f in fns.values())
    assert int(state.step) == 6 and np.isfinite(float(metrics["loss"]))


def test_train_loop_reads_metrics_one_step_late(tmp_path, monkeypatch):
  """The loop dispatches step N before it fetches step N-1's metrics, so the
  host never waits for the step it just dispatched."""
  cfg = tiny_config(
      **{
          "opt.num_train_steps": 6,
          "eval_every_steps": 0,
          "checkpoint_every_steps": 0,
          "log_every_steps": 1,
      }
  )
  events = []
  real_jit, real_get = train_lib.jit_train_step, jax.device_get

  def jit_train_step(*args, **kwargs):
    fn = real_jit(*args, **kwargs)

    def dispatch(state, batch):
      events.append("dispatch")
      return fn(state, batch)

    return dispatch

  def device_get(x):
    events.append("get")
    return real_get(x)

  monkeypatch.setattr(step_lib, "jit_train_step", jit_train_step)
  monkeypatch.setattr(jax, "device_get", device_get)
  assert train_lib.train(cfg, str(tmp_path))["status"] == "completed"
  gets = [i for i, e in enumerate(events) if e == "get"]
  assert events.count("dispatch") == 6
  for n, i in enumerate(gets[:5]):  # Step n's metrics: after step n+1 left.
    assert events[:i].count("dispatch") == n + 2, events


# ------------------------------------------------------------ bfloat16


@pytest.mark.parametrize("method", ALL)
@pytest.mark.slow  # Compiles several train steps (minutes on 2 cores).
def test_bfloat16_compute_every_method(method):
  """One train step in bfloat16 compute: float32 logits, loss, gradients,
  parameters and optimizer state; everything finite."""
  cfg, s, batch = _train_setup(method, **{"model.dtype": "bfloat16"})
  state = state_lib.init_state(s, cfg.seed)
  logits = s.logits_fn(state.params, batch["inputs"])
  assert logits.dtype == jnp.float32
  h = s.head.features(state.params, batch["inputs"])
  assert h.dtype == jnp.bfloat16
  state, metrics = train_lib.jit_train_step(s, method)(state, batch)
  for name, x in [("params", state.params), ("opt_state", state.opt_state)]:
    for leaf in jax.tree.leaves(x):
      if jnp.issubdtype(leaf.dtype, jnp.floating):
        assert leaf.dtype == jnp.float32, (name, leaf.dtype)
      assert bool(jnp.all(jnp.isfinite(leaf))), name
  assert metrics["loss"].dtype == jnp.float32
  for k, v in metrics.items():
    assert np.isfinite(float(v)), k
  assert 0 < float(metrics["loss"]) < 2 * math.log(cfg.model.V)


# ------------------------------------------------------------ reuse


def test_reuse_correction_maths():
  rng = np.random.default_rng(0)
  tree = lambda: {
      "a": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
      "b": jnp.asarray(rng.normal(size=(5,)), jnp.float32),
  }
  g_m, g_method = tree(), tree()
  delta = jax.tree.map(jnp.subtract, g_method, g_m)
  norm_m = jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree.leaves(g_m)))
  # At the measured step itself: the full method's gradient back.
  np.testing.assert_allclose(
      _flat(sam.reuse_correction(g_m, delta, norm_m)),
      _flat(g_method),
      rtol=1e-6,
  )
  # Scaled with the current gradient norm: g + (||g|| / ||g_m||) delta.
  g = tree()
  norm_g = jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree.leaves(g)))
  ref = jax.tree.map(lambda x, d: x + norm_g / norm_m * d, g, delta)
  np.testing.assert_allclose(
      _flat(sam.reuse_correction(g, delta, norm_m)), _flat(ref), rtol=1e-6
  )
  # Nothing measured yet (reuse_init): g unchanged, finite.
  init = sam.reuse_init(g)
  out = sam.reuse_correction(g, init.delta, init.grad_norm)
  np.testing.assert_array_equal(_flat(out), _flat(g))


def test_return_reuse_carries_method_minus_plain_gradient():
  m, params = _model()
  logits_fn = model_lib.make_logits_fn(m)
  batch = _batch()
  for accum in (3,):  # accum=1: test_reuse_in_the_train_step.
    loss, grads, metrics, reuse = jax.jit(
        functools.partial(
            distribute.accumulated_gradient,
            "functional_sam",
            logits_fn=logits_fn,
            head=model_lib.output_head(m),
            rho=0.1,
            num_microbatches=accum,
            return_reuse=True,
        )
    )(params, batch)
    _, g, _ = sam.gradient("adamw", params, batch, logits_fn=logits_fn, rho=0.0)
    np.testing.assert_allclose(
        _flat(reuse.delta), _flat(grads) - _flat(g), rtol=1e-4, atol=1e-6
    )
    np.testing.assert_allclose(
        reuse.grad_norm, np.linalg.norm(_flat(g)), rtol=1e-5
    )
    np.testing.assert_allclose(reuse.grad_norm, metrics["grad_norm"], rtol=1e-5)


def test_reuse_in_the_train_step():
  """sam.reuse with every_k=3: steps go sam, reuse, reuse, sam, ...; the sam
  step stores (F-SAM gradient - g, ||g||) at its parameters; the reuse step
  updates with g + ||g|| / ||g_m|| * delta (checked against optax applied by
  hand), costs one forward and one backward, and leaves the carried
  difference alone."""
  cfg, s, batch = _train_setup(
      "functional_sam", **{"sam.every_k": 3, "sam.reuse": True}
  )
  assert [sam_schedule.step_kind(cfg.sam, i) for i in range(7)] == [
      "sam",
      "reuse",
      "reuse",
      "sam",
      "reuse",
      "reuse",
      "sam",
  ]
  fns = {
      "sam": train_lib.jit_train_step(s, "functional_sam"),
      "reuse": train_lib.jit_train_step(s, "adamw", correct=True),
  }
  state = state_lib.init_state(s, cfg.seed)
  assert float(state.reuse.grad_norm) == 0.0
  grad = jax.jit(
      lambda method, params: sam.gradient(
          method, params, batch, logits_fn=s.logits_fn, rho=cfg.sam.rho
      )[1],
      static_argnums=0,
  )
  params0 = jax.device_get(state.params)
  g_fsam, g0 = grad("functional_sam", params0), grad("adamw", params0)
  state, _ = fns["sam"](state, batch)
  np.testing.assert_allclose(
      _flat(state.reuse.delta), _flat(g_fsam) - _flat(g0), rtol=1e-4, atol=1e-7
  )
  np.testing.assert_allclose(
      state.reuse.grad_norm, np.linalg.norm(_flat(g0)), rtol=1e-5
  )
  assert np.abs(_flat(state.reuse.delta)).max() > 0
  before = jax.device_get(state)
  state, metrics = fns["reuse"](state, batch)
  g1 = grad("adamw", before.params)
  scale = np.linalg.norm(_flat(g1)) / float(before.reuse.grad_norm)
  expected = jax.tree.map(lambda g, d: g + scale * d, g1, before.reuse.delta)
  updates, _ = s.tx.update(expected, before.opt_state, before.params)
  np.testing.assert_allclose(
      _flat(state.params),
      _flat(jax.tree.map(jnp.add, before.params, updates)),
      rtol=1e-4,
      atol=1e-6,
  )
  np.testing.assert_array_equal(
      _flat(state.reuse.delta), _flat(before.reuse.delta)
  )
  assert 0 < float(metrics["cosine"]) < 1
  # The reuse step is a plain step's cost: one forward, one backward.
  count = lambda step: str(jax.make_jaxpr(step)(before, batch)).count(
      "dot_general"
  )
  assert count(train_lib.make_train_step(s, "adamw", correct=True)) == count(
      train_lib.make_train_step(s, "adamw")
  )
  assert count(train_lib.make_train_step(s, "functional_sam")) > count(
      train_lib.make_train_step(s, "adamw")
  )


# ------------------------------------------------------------ the benchmark


def test_flops_formula():
  # 2M at L=512, V=32101: 6 N + 6 V D + 12 n_layers L D.
  n = 2_361_088
  assert flops.model_flops_per_token(256, 3, 1024, 512, 32101) == (
      6 * n + 6 * 32101 * 256 + 12 * 3 * 512 * 256
  )
  assert flops.method_flops_factor("adamw") == 1
  assert flops.method_flops_factor("sam") == 2
  assert flops.method_flops_factor("angle_sam") == pytest.approx(16 / 6)
  assert flops.method_flops_factor("sam", every_k=4) == pytest.approx(5 / 4)


class _Device:

  def __init__(self, kind):
    self.device_kind = kind


def test_peaks_mfu_and_the_progress_line_rates_by_hand(monkeypatch):
  for kind, peak in [
      ("NVIDIA H100 80GB HBM3", 989e12),
      ("NVIDIA H200", 989e12),
      ("NVIDIA A100-SXM4-40GB", 312e12),
      ("NVIDIA B200", 2250e12),
      ("TPU v4", 275e12),
      ("TPU v5 lite", 197e12),
      ("TPU v5", 459e12),
      ("TPU v6 lite", 918e12),
      ("cpu", None),
      ("NVIDIA GeForce RTX 3090", None),
  ]:
    assert flops.peak_flops(_Device(kind)) == peak, kind
  # SAM at the 2M shape, 256 x 512 tokens per step, 8 H100s, 1.5 steps/s.
  cfg = config_lib.load_config_file("configs/c4_fixed_length.py:2M")
  cfg.sam.method = "sam"
  per_token = flops.step_flops_per_token(cfg)
  n = 2_361_088
  assert per_token == 2 * (6 * n + 6 * 32101 * 256 + 12 * 3 * 512 * 256)
  written = []

  class Writer:

    def write_scalars(self, step, scalars):
      written.append((step, scalars))

  progress = writers.Progress(
      0,
      100,
      256 * 512,
      Writer(),
      flops_per_token=per_token,
      num_devices=8,
      peak_per_device=989e12,
  )
  rates = progress.rates(1.5)
  tokens = 1.5 * 256 * 512
  assert rates["perf/tokens_per_sec"] == tokens
  assert rates["perf/tflops_per_device"] == pytest.approx(
      per_token * tokens / 8 / 1e12
  )
  assert rates["perf/mfu"] == pytest.approx(per_token * tokens / (8 * 989e12))
  # Without a known peak (CPU): throughput and TFLOP/s, no MFU.
  cpu = writers.Progress(0, 100, 256 * 512, Writer(), per_token, 1, None)
  assert "perf/mfu" not in cpu.rates(1.5)
  # Step 0 at t = 1000 s, step 4 at t = 1002 s on the progress line's clock
  # (not the machine's: the rate is what the code computes from them).
  cpu.last_time = 1000.0
  monkeypatch.setattr(writers.time, "time", lambda: 1002.0)
  cpu.log(4, {"loss": 3.0, "grad_norm": 1.0})
  ((step, scalars),) = written
  assert step == 4 and scalars["perf/steps_per_sec"] == 2.0
  assert scalars["perf/tokens_per_sec"] == 2.0 * 256 * 512
  assert (cpu.last_step, cpu.last_time) == (4, 1002.0)
  assert scalars["perf/tflops_per_device"] == pytest.approx(
      per_token * scalars["perf/tokens_per_sec"] / 1e12
  )


def test_parse_methods():
  assert [v.name for v in bench.parse_methods("adamw,functional_sam:k=5")] == [
      "adamw",
      "functional_sam:k=5",
  ]
  names = [v.name for v in bench.parse_methods("all")]
  assert names[: len(sam.METHODS)] == list(sam.METHODS)
  assert "precond_functional_sam:k=5:reuse" in names
  for bad in ("samm", "sam:k=0", "adamw:k=2", "sam:fast", "sam:reuse"):
    with pytest.raises(ValueError):
      bench.parse_methods(bad)
  with pytest.raises(ValueError, match="unknown size"):
    bench.parse_sizes("3M")


def test_bench_ratios_are_to_the_plain_step_named_by_its_optimizer():
  assert bench.columns()[4:6] == ("x AdamW", "CPU x AdamW")
  cols = bench.columns("sgd")
  assert [cols[i] for i in bench.RATIO_COLUMNS] == [
      "x SGD",
      "CPU x SGD",
      "x SGD",
  ]


@pytest.mark.slow  # Compiles several train steps (minutes on 2 cores).
def test_bench_runs_and_writes_json(tmp_path):
  cfg = tiny_config()
  out = tmp_path / "bench.json"
  res = bench.run(cfg, [], "adamw,sam:k=2:reuse", steps=2, out=str(out))
  rows = res["rows"]
  assert [r["method"] for r in rows] == ["adamw", "sam:k=2:reuse"]
  assert rows[0]["time_vs_adamw"] == 1.0 and rows[0]["memory_vs_adamw"] == 1.0
  for r in rows:
    assert r["step_s_p10"] <= r["step_s_median"] <= r["step_s_p90"]
    assert r["tokens_per_s"] > 0 and r["compile_s"] > 0
    assert r["memory_bytes"]["total"] > 0
    assert r["mfu"] is None or 0 < r["mfu"] < 1
    assert np.isfinite(r["final_loss"])
  assert json.load(open(out))["rows"][1]["method"] == "sam:k=2:reuse"
