"""The train step at scale, measured by compiling on 8 simulated devices:
the chunked output head moves only scalars inside its loop, FSDP's traffic per
step stays near the ideal (collective bytes, loop-weighted, against the f32
parameter bytes), and the loop-weighted counters in nanodo_sam/hlo_cost.py
count what they should.

The 8-device checks run this file as a script in a subprocess
(`python tests/test_scale.py mesh OUT`; fake CPU devices must be configured
before JAX starts), started once for the module.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


from conftest import WIDE, run_worker, step_config, tiny_config

METHODS = ("adamw", "sam", "precond_functional_sam")
# The bounds: collective bytes per step <= this x f32 parameter bytes.
RATIO_BOUND = {"adamw": 3.0, "sam": 5.0, "precond_functional_sam": 5.0}


def worker_mesh(out_path: str) -> None:
  import jax
  import jax.numpy as jnp
  from nanodo_sam import hlo_cost
  from nanodo_sam import sharding
  from nanodo_sam import state as state_lib
  from nanodo_sam import train

  assert jax.device_count() == 8, jax.devices()
  res = {}
  # conftest's WIDE model: 2 rows x 64 positions per device, chunked 32
  # tokens at a time: 4 chunks.
  for method in METHODS:
    s = state_lib.setup(
        step_config((1, 8, 1), **WIDE, **{"sam.method": method})
    )
    tokens = jax.ShapeDtypeStruct(
        (16, 64), jnp.int32, sharding=sharding.batch_sharding(s.mesh)
    )
    batch = {
        "inputs": tokens,
        "targets": tokens,
        "weights": jax.ShapeDtypeStruct(
            (16, 64), jnp.float32, sharding=tokens.sharding
        ),
    }
    kind = "plain" if method == "adamw" else "sam"
    compiled = train.jit_step(s, kind).lower(s.abstract_state, batch).compile()
    text = compiled.as_text()
    coll = hlo_cost.collective_bytes(text)
    prog = hlo_cost.Program(text)
    res[method] = {
        "bytes": coll["total"],
        "in_loops": coll["in_loops"],
        "unknown_loops": coll["unknown_loops"],
        "param_bytes": sum(
            x.size * 4 for x in jax.tree.leaves(s.abstract_state.params)
        ),
        "trip_counts": sorted(
            int(w)
            for c, w in prog.weight.items()
            if c in prog.in_loop and w > 1
        ),
    }
  res["accumulated"] = _accumulated_on_mesh()
  with open(out_path, "w") as f:
    json.dump(res, f, indent=2)


def _accumulated_on_mesh() -> dict:
  """2 microbatches on (1, 8, 1) and (2, 4, 1) meshes (weights gathered once
  per step, each group's gradient accumulated on its devices) against one
  unaccumulated step on one device; float32, so equal to rounding."""
  import dataclasses
  import jax
  from jax.sharding import SingleDeviceSharding
  from nanodo_sam import hlo_cost
  from nanodo_sam import model as model_lib
  from nanodo_sam import sharding
  from nanodo_sam import state as state_lib
  from nanodo_sam import train
  from test_sharding import _max_abs, _max_abs_one, synthetic_batch

  over = {"model.V": 512, "data.batch_size": 32, "model.head_chunk_tokens": 16}
  batch = synthetic_batch(0, 32)
  dev0 = SingleDeviceSharding(jax.devices()[0])
  out = {}
  for method in METHODS:
    kind = "plain" if method == "adamw" else "sam"
    s1 = state_lib.setup(
        step_config((8, 1, 1), **over, **{"sam.method": method})
    )
    s1 = dataclasses.replace(
        s1,
        logits_fn=model_lib.make_logits_fn(s1.model),
        head=model_lib.output_head(s1.model),
    )
    state0 = jax.device_put(state_lib.init_state(s1, 0), dev0)
    ref, ref_m = jax.jit(train.make_train_step(s1, method))(
        state0, jax.device_put(batch, dev0)
    )
    ref_params = jax.device_get(ref.params)
    for mesh in ((1, 8, 1), (2, 4, 1)):
      s = state_lib.setup(
          step_config(
              mesh,
              **over,
              **{"sam.method": method, "grad_accumulation_steps": 2},
          )
      )
      state = state_lib.init_state(s, 0)
      gb = sharding.global_batch(batch, s.mesh)
      fn = train.jit_step(s, kind)
      coll = hlo_cost.collective_bytes(fn.lower(state, gb).compile().as_text())
      new, m = fn(state, gb)
      out[f"{method} {mesh}"] = {
          "loss": float(m["loss"]),
          "ref_loss": float(ref_m["loss"]),
          "params_diff": _max_abs(jax.device_get(new.params), ref_params),
          "params_change": _max_abs(ref_params, jax.device_get(state0.params)),
          "ratio": coll["total"]
          / sum(x.size * 4 for x in jax.tree.leaves(state.params)),
          "in_loops": coll["in_loops"],
          "groups": s.mesh.shape["data"] * s.mesh.shape["fsdp"],
          "max_param": _max_abs_one(ref_params),
      }
  return out


@pytest.fixture(scope="module")
def mesh_results(tmp_path_factory):
  return run_worker(__file__, ["mesh"], 8, tmp_path_factory.mktemp("scale"))


@pytest.mark.slow  # 8 simulated devices, ~50 s to compile (test_plan: the real compilers)
@pytest.mark.parametrize("method", METHODS)
def test_chunk_loop_moves_only_scalars(mesh_results, method):
  """The head runs in 4 chunks (a loop of trip count 4 is there) and no
  collective in any loop moves more than scalars."""
  r = mesh_results[method]
  assert r["unknown_loops"] == 0
  assert 4 in r["trip_counts"], r["trip_counts"]
  assert r["in_loops"] == 0, r


@pytest.mark.slow  # 8 simulated devices, ~50 s to compile (test_plan: the real compilers)
@pytest.mark.parametrize("method", METHODS)
def test_fsdp_traffic_is_near_ideal(mesh_results, method):
  r = mesh_results[method]
  ratio = r["bytes"] / r["param_bytes"]
  assert 0.5 < ratio <= RATIO_BOUND[method], (method, ratio)


@pytest.mark.slow  # 8 simulated devices, ~50 s to compile (test_plan: the real compilers)
@pytest.mark.parametrize("method", METHODS)
def test_accumulated_step_on_a_mesh_equals_one_device(mesh_results, method):
  """With 2 microbatches each group of devices accumulates its own gradient
  and reduces it once: the step equals one device's unaccumulated step,
  no collective beyond scalars runs in any loop, and the traffic stays
  within the bound."""
  for mesh in ("(1, 8, 1)", "(2, 4, 1)"):
    r = mesh_results["accumulated"][f"{method} {mesh}"]
    assert r["loss"] == pytest.approx(r["ref_loss"], rel=1e-5)
    assert r["params_change"] > 1e-4  # The step moved the parameters ...
    assert r["params_diff"] <= 1e-6 * max(1.0, r["max_param"])  # ... alike.
    assert r["in_loops"] == 0, r
    assert 0.5 < r["ratio"] <= RATIO_BOUND[method], r


# ------------------------------------------- fitting a device's memory


def _bytes_with(s, k):
  from nanodo_sam import state as state_lib
  from nanodo_sam import step as step_lib

  s_k = state_lib._with_microbatches(s, k)
  return state_lib.step_bytes(
      state_lib.compile_step(s_k, step_lib.jit_step(s_k, "sam"))
  )


def test_auto_microbatches_are_the_fewest_that_fit():
  """grad_accumulation_steps=0: with a budget between what 1 and 2
  microbatches need, setup picks 2, and train.jit_step hands out the very
  step it compiled; with room for 1, it picks 1."""
  from nanodo_sam import state as state_lib
  from nanodo_sam import train

  over = {
      "sam.method": "sam",
      "sam.rho": 0.05,
      "data.batch_size": 8,
      "model.head_chunk_tokens": 0,
  }
  s1 = state_lib.setup(tiny_config(**over))
  need1, need2 = _bytes_with(s1, 1), _bytes_with(s1, 2)
  assert need2 < need1
  fraction = state_lib.DEFAULT_MEM_FRACTION
  for budget, want in (((need1 + need2) / 2, 2), (need1 * 1.01, 1)):
    gb = budget / fraction / 2**30
    s = state_lib.setup(
        tiny_config(
            **over,
            **{"grad_accumulation_steps": 0, "mesh.device_memory_gb": gb},
        )
    )
    assert s.cfg.grad_accumulation_steps == want, (budget, need1, need2)
    fn = train.jit_step(s, "sam")
    assert fn is s.steps["sam"]
    assert state_lib.step_bytes(state_lib.compile_step(s, fn)) <= budget


def test_the_checked_step_is_the_step_the_loop_runs():
  """The memory check compiles the step on abstract inputs; calling the
  same jitted step on the real state and batch compiles nothing more."""
  import jax
  from nanodo_sam import bench
  from nanodo_sam import sharding
  from nanodo_sam import state as state_lib
  from nanodo_sam import train

  cfg = tiny_config()
  s = state_lib.setup(cfg)
  train._check_step_memory(s)
  fn = s.steps["plain"]
  assert train.jit_step(s, "plain") is fn
  state = state_lib.init_state(s, 0)
  batch = sharding.global_batch(bench.synthetic_batch(cfg), s.mesh)
  compiles = []
  listener = (
      lambda event, *a, **k: compiles.append(event)
      if (event == "/jax/core/compile/backend_compile_duration")
      else None
  )
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    jax.block_until_ready(fn(state, batch))
    after_step = len(compiles)
    jax.block_until_ready(jax.jit(lambda x: x * 3 + 1)(2.0))  # Counted.
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert after_step == 0 and len(compiles) >= 1
  assert fn._cache_size() == 1


def test_auto_microbatches_refuse_what_never_fits():
  from nanodo_sam import state as state_lib
  from nanodo_sam.config import UsageError

  with pytest.raises(
      UsageError, match="does not fit a device even in 8 " "microbatches"
  ):
    state_lib.setup(
        tiny_config(
            **{
                "grad_accumulation_steps": 0,
                "data.batch_size": 8,
                "mesh.device_memory_gb": 1e-6,
            }
        )
    )


def test_a_step_that_cannot_fit_is_refused_before_the_disk(tmp_path):
  """In a fresh process: one line first on stderr (what, how much, what to
  change), exit 2, and no workdir."""
  from test_cli import QUICK, ROOT, TINY

  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run(
      [
          sys.executable,
          "-m",
          "nanodo_sam.cli",
          "train",
          f"--config={QUICK}",
          f"--workdir={tmp_path}/run",
          *TINY,
          "--config.mesh.device_memory_gb=" "0.0001",
      ],
      capture_output=True,
      text=True,
      cwd=ROOT,
      env=env,
      timeout=300,
  )
  assert proc.returncode == 2, proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1, proc.stderr
  assert lines[0].startswith("nanodo-sam: error: the plain train step"), lines
  for words in (
      "GiB per device, more than the",
      "grad_accumulation_steps",
      "model.remat=True",
      "mesh.device_memory_gb=0.0001",
  ):
    assert words in lines[0], lines[0]
  assert not (tmp_path / "run").exists()


# ------------------------------------------------------ the HLO counters


HLO = """HloModule m

%body (p: (s32[], f32[8,8])) -> (s32[], f32[8,8]) {
  %p = (s32[], f32[8,8]{1,0}) parameter(0)
  %x = f32[8,8]{1,0} get-tuple-element(%p), index=1
  %ar = f32[8,8]{1,0} all-reduce(%x), replica_groups={}, to_apply=%add
  %s = f32[] constant(0)
  %ars = f32[] all-reduce(%s), replica_groups={}, to_apply=%add
  %d = f32[8,8]{1,0} dot(%x, %ar), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  ROOT %t = (s32[], f32[8,8]{1,0}) tuple(%i, %d)
}

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %c = f32[] add(%a, %b)
}

ENTRY %main (x: f32[8,8]) -> f32[8,8] {
  %x = f32[8,8]{1,0} parameter(0)
  %g = f32[64,8]{1,0} all-gather(%x), dimensions={0}
  %rs = f32[8,8]{1,0} reduce-scatter(%g), dimensions={0}, to_apply=%add
  %w = (s32[], f32[8,8]{1,0}) while(%t0), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"5"}}
  ROOT %r = f32[8,8]{1,0} get-tuple-element(%w), index=1
}
"""


def test_collectives_and_flops_are_weighted_by_trip_counts():
  from nanodo_sam import hlo_cost

  c = hlo_cost.collective_bytes(HLO)
  assert c["all-gather"] == 64 * 8 * 4  # The gathered result.
  assert c["reduce-scatter"] == 64 * 8 * 4  # The scattered operand.
  assert c["all-reduce"] == 5 * (8 * 8 * 4 + 4)
  assert c["in_loops"] == 5 * 8 * 8 * 4  # Not the scalar one.
  assert c["count"]["all-reduce"] == 10
  assert hlo_cost.matmul_flops(HLO) == 5 * 2 * 8 * 8 * 8


if __name__ == "__main__":
  if sys.argv[1] == "mesh":
    worker_mesh(sys.argv[2])
  else:
    raise SystemExit(f"unknown worker {sys.argv[1]!r}")
