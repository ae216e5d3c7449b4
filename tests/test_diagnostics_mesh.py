"""The sharpness diagnostics on a mesh of 8 fake CPU devices equal the
unchunked single-device computation, keep every device on its own rows of
the batch and chunk the logits (`diagnostics.exact_head`).

Fake devices must be configured before JAX starts, so the checks run this
file as a script in one subprocess (`python tests/test_diagnostics_mesh.py
OUT`, XLA_FLAGS=--xla_force_host_platform_device_count=8) that writes one
JSON file the tests assert on.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys

import numpy as np
import pytest

from conftest import run_worker, tiny_config

# One 8-device worker computes every case (~90 s on 2 cores): CI runs it
# with the slow tests; tests/test_sharpness.py checks the chunked products
# against dense Hessians in the default set.
pytestmark = pytest.mark.slow

B, L = 8, 32  # One row per device; 4 chunks of 8 tokens with CHUNK = 8.
CHUNK = 8
KEYS = (
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
    "tau_logit_precond",
    "tau_func_precond",
    "tau_cross_precond",
)


def _config():
  return tiny_config(
      **{
          "mesh.data": 1,
          "mesh.fsdp": -1,
          "mesh.tensor": 1,
          "diagnostics.num_iters": 6,
          "diagnostics.num_probes": 3,
          # Lanczos runs all 6 iterations on both sides (the residual of a
          # 6-step Krylov space of thousands of parameters stays far above it).
          "diagnostics.tol": 1e-12,
      }
  )


def _batch():
  rng = np.random.default_rng(0)
  weights = (rng.uniform(size=(B, L)) > 0.2).astype(np.float32)
  weights[:, 0] = 1.0
  return {
      "inputs": rng.integers(3, 259, (B, L)).astype(np.int32),
      "targets": rng.integers(3, 259, (B, L)).astype(np.int32),
      "weights": weights,
  }


def _gathers_of_whole_batch(hlo: str) -> int:
  """All-gathers whose result has the whole batch's [B, L] leading axes:
  an activation, logit or tangent of every device's rows on each device."""
  return len(re.findall(rf"= \w+\[{B},{L}(,\d+)*\]\S* all-gather\(", hlo))


def worker(out_path: str) -> None:
  import jax
  from jax.sharding import SingleDeviceSharding
  from nanodo_sam import diagnostics
  from nanodo_sam import model as model_lib
  from nanodo_sam import optimizer as optimizer_lib
  from nanodo_sam import sharding
  from nanodo_sam import sharpness
  from nanodo_sam import state as state_lib

  assert jax.device_count() == 8, jax.devices()
  cfg = _config()
  s = state_lib.setup(cfg)
  state = state_lib.init_state(s, seed=0)
  batch = _batch()
  gbatch = sharding.global_batch(batch, s.mesh)
  dev0 = SingleDeviceSharding(jax.devices()[0])
  state0 = jax.device_put(jax.device_get(state), dev0)
  batch0 = jax.device_put(batch, dev0)
  exact = model_lib.make_logits_fn(
      model_lib.TransformerDo(dataclasses.replace(s.model.cfg, attention="xla"))
  )
  head = diagnostics.exact_head(s)
  d = cfg.diagnostics
  precond = jax.tree.map(lambda p: 1.0 + abs(p), state.params)
  precond0 = jax.device_put(jax.device_get(precond), dev0)
  args = dict(
      lr=1e-3,
      rho=0.1,
      num_iters=d.num_iters,
      num_probes=d.num_probes,
      tol=d.tol,
      rng=jax.random.key(0),
  )
  res = {}

  # One device, the whole logits: the reference.
  one = jax.jit(
      lambda p, b, q: sharpness.measure(
          p, b, logits_fn=exact, precond=q, **args
      )
  )
  res["one_device"] = diagnostics.to_scalars(
      one(state0.params, batch0, precond0)
  )

  # The mesh: chunked (4 chunks a row) and each device on its own rows.
  ps, bs = s.state_sharding.params, sharding.batch_sharding(s.mesh)

  def on_mesh(head, chunk_tokens):
    return (
        jax.jit(
            lambda p, b, q: sharpness.measure(
                p,
                b,
                logits_fn=s.diagnostics_logits_fn,
                precond=q,
                params_sharding=ps,
                head=head,
                chunk_tokens=chunk_tokens,
                **args,
            ),
            in_shardings=(ps, bs, ps),
        )
        .lower(state.params, gbatch, precond)
        .compile()
    )

  temp = lambda c: c.memory_analysis().temp_size_in_bytes
  chunked = on_mesh(head, CHUNK)
  res["mesh_chunked"] = diagnostics.to_scalars(
      chunked(state.params, gbatch, precond)
  )
  whole = on_mesh(None, CHUNK)  # Through logits_fn: XLA places the rows.
  res["mesh_whole"] = diagnostics.to_scalars(
      whole(state.params, gbatch, precond)
  )
  res["temp_bytes"] = {"chunked": temp(chunked), "whole": temp(whole)}
  res["whole_batch_gathers"] = {
      "chunked": _gathers_of_whole_batch(chunked.as_text()),
      "whole": _gathers_of_whole_batch(whole.as_text()),
  }

  # The run's own function (`nanodo-sam analyze`, the training loop).
  fn = diagnostics.sharpness_fn(cfg, s)
  run = jax.jit(
      lambda st, b: fn(st, b, 1e-3, 0.1, jax.random.key(0)),
      in_shardings=(s.state_sharding, bs),
  )
  run0 = jax.jit(
      lambda st, b: sharpness.measure(
          st.params,
          b,
          logits_fn=exact,
          precond=optimizer_lib.adam_precond(st.opt_state, cfg.opt),
          **args,
      )
  )
  res["sharpness_fn"] = {
      "mesh": diagnostics.to_scalars(run(state, gbatch)),
      "one_device": diagnostics.to_scalars(run0(state0, batch0)),
  }

  # The products themselves, parameter-shaped, split like the parameters.
  v = jax.tree.map(lambda p: jax.numpy.cos(7.0 * p) + 0.1, state.params)
  v0 = jax.device_put(jax.device_get(v), dev0)
  products = {}
  for name in ("hvp", "ggn_vp", "functional_hessian_vp"):
    f = getattr(sharpness, name)
    got = jax.jit(
        lambda p, b, u, f=f: f(
            p,
            b,
            u,
            logits_fn=s.diagnostics_logits_fn,
            head=head,
            chunk_tokens=CHUNK,
        ),
        in_shardings=(ps, bs, ps),
    )(state.params, gbatch, v)
    want = jax.jit(lambda p, b, u, f=f: f(p, b, u, logits_fn=exact))(
        state0.params, batch0, v0
    )
    diff = max(
        float(
            np.max(
                np.abs(np.asarray(a, np.float64) - np.asarray(w, np.float64))
            )
        )
        for a, w in zip(jax.tree.leaves(got), jax.tree.leaves(want))
    )
    scale = max(
        float(np.max(np.abs(np.asarray(w)))) for w in jax.tree.leaves(want)
    )
    products[name] = {"max_abs_diff": diff, "max_abs": scale}
  res["products"] = products

  # A (2, 2, 2) mesh: rows over data x fsdp, heads and MLP over tensor; the
  # product comes out reduce-scattered and sliced into the parameters'
  # layout (`params_sharding`).
  s2 = state_lib.setup(
      tiny_config(**{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2})
  )
  ps2 = s2.state_sharding.params
  params2 = jax.device_put(jax.device_get(state.params), ps2)
  got = jax.jit(
      lambda p, b, u: sharpness.hvp(
          p,
          b,
          u,
          logits_fn=exact,
          head=diagnostics.exact_head(s2),
          chunk_tokens=CHUNK,
          params_sharding=ps2,
      ),
      in_shardings=(ps2, None, ps2),
  )(
      params2,
      sharding.global_batch(batch, s2.mesh),
      jax.device_put(jax.device_get(v), ps2),
  )
  want = jax.jit(lambda p, b, u: sharpness.hvp(p, b, u, logits_fn=exact))(
      state0.params, batch0, v0
  )
  res["tensor_mesh_hvp"] = {
      "max_abs_diff": max(
          float(
              np.max(
                  np.abs(np.asarray(a, np.float64) - np.asarray(w, np.float64))
              )
          )
          for a, w in zip(jax.tree.leaves(got), jax.tree.leaves(want))
      ),
      "max_abs": max(
          float(np.max(np.abs(np.asarray(w)))) for w in jax.tree.leaves(want)
      ),
      "keeps_sharding": len(jax.tree.leaves(got))
      == len(jax.tree.leaves(ps2))
      > 0
      and all(
          g.sharding.is_equivalent_to(w, g.ndim)
          for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(ps2))
      ),
      "tensor_split": sum(
          "tensor" in str(w.spec) for w in jax.tree.leaves(ps2)
      ),
  }
  with open(out_path, "w") as f:
    json.dump(res, f, indent=2)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
  root = tmp_path_factory.mktemp("diagnostics_mesh")
  return run_worker(__file__, [], 8, root, timeout=1200)


# Float32 throughout (unit roundoff 6e-8); the mesh sums the same terms in
# another order (8 devices' shares, 4 chunks a row, psum), so each number
# moves by a few roundoffs times the number of terms summed in sequence
# (hundreds to thousands here): 1e-5 relative; Lanczos' eigenvalue moves no
# more than H's entries (Weyl), the taus are ratios of such sums. rtol=1e-4
# leaves a margin of 10; atol=1e-6 covers the taus near 0 (they are O(1)
# fractions).
RTOL, ATOL = 1e-4, 1e-6


@pytest.mark.parametrize("run", ["mesh_chunked", "mesh_whole"])
def test_diagnostics_on_a_mesh_equal_one_device_unchunked(results, run):
  want = results["one_device"]
  assert set(KEYS) <= set(want)
  for k in KEYS:
    assert results[run][k] == pytest.approx(want[k], rel=RTOL, abs=ATOL), k


def test_sharpness_fn_on_a_mesh_equals_one_device(results):
  r = results["sharpness_fn"]
  assert set(KEYS) <= set(r["one_device"])
  for k in KEYS:
    assert r["mesh"][k] == pytest.approx(
        r["one_device"][k], rel=RTOL, abs=ATOL
    ), k


@pytest.mark.parametrize("name", ["hvp", "ggn_vp", "functional_hessian_vp"])
def test_products_on_a_mesh_equal_one_device(results, name):
  """Every entry of H v, H_G v, H_F v within 1e-5 of the largest (the same
  float32 argument as RTOL, entrywise)."""
  r = results["products"][name]
  assert r["max_abs"] > 0
  assert r["max_abs_diff"] <= 1e-5 * r["max_abs"]


def test_hvp_on_a_tensor_parallel_mesh_equals_one_device(results):
  """On (2, 2, 2) the product is reduce-scattered over the row axes and
  sliced over `tensor` into the parameters' own layout; same 1e-5 bound."""
  r = results["tensor_mesh_hvp"]
  assert r["tensor_split"] > 0 and r["keeps_sharding"]
  assert r["max_abs_diff"] <= 1e-5 * r["max_abs"]


def test_each_device_keeps_its_rows_and_needs_less(results):
  """Through logits_fn XLA gathers whole-batch activations on every device
  (the failure this guards against shows up there); the chunked products
  on each device's rows gather none and hold fewer temporaries."""
  g = results["whole_batch_gathers"]
  assert g["whole"] > 0
  assert g["chunked"] == 0
  t = results["temp_bytes"]
  assert t["chunked"] < t["whole"]


if __name__ == "__main__":
  worker(sys.argv[1])
