"""Scale-out: sharded steps equal one device, FSDP and tensor parallelism
really shard, gradient accumulation equals the full batch, a real two-process
run equals a one-process run, checkpoints move between meshes, and bad mesh
input stops with one line.

Multi-device checks need fake CPU devices, which must be configured before
JAX starts, so they run this file as a script in subprocesses
(`python tests/test_sharding.py mesh OUT`) with
XLA_FLAGS=--xla_force_host_platform_device_count=N; the script writes one
JSON file the tests assert on. All subprocesses start together in the
background when the first test of this module runs, so they overlap with each
other and with the in-process tests. XLA compilation dominates the cost on
CPU, so each worker compiles as few programs as it can: one jitted program per
mesh runs every method.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
import socket
import sys
import time

import numpy as np
import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)

from conftest import FAST_COMPILE, JOB_TIMEOUT, Job  # noqa: E402
from conftest import step_config, worker_env  # noqa: E402

MESHES = [(8, 1, 1), (2, 4, 1), (2, 2, 2)]
METHODS = ["adamw", "sam", "functional_sam", "precond_functional_sam"]
# C++ log lines that TF/XLA print on import regardless of TF_CPP_MIN_LOG_LEVEL;
# they are not the CLI's output.
RUNTIME_NOISE = re.compile(
    r"^(WARNING: All log messages before absl::InitializeLog|"
    r"[IWEF]\d{4} [\d:.]+\s+\d+ \S+:\d+\])"
)


# ------------------------------------------------------------- shared helpers


def synthetic_batch(
    seed: int, batch_size: int, seq_len: int = 32, vocab: int = 259
) -> dict[str, np.ndarray]:
  """Random tokens with some padding (weights 0), unequal across rows."""
  rng = np.random.default_rng(seed)
  weights = (rng.uniform(size=(batch_size, seq_len)) > 0.2).astype(np.float32)
  weights[:, 0] = 1.0
  weights[0, seq_len // 2 :] = 0.0
  return {
      "inputs": rng.integers(3, vocab, (batch_size, seq_len)).astype(np.int32),
      "targets": rng.integers(3, vocab, (batch_size, seq_len)).astype(np.int32),
      "weights": weights,
  }


def _max_abs(tree_a, tree_b) -> float:
  import jax

  a_leaves, b_leaves = jax.tree.leaves(tree_a), jax.tree.leaves(tree_b)
  assert len(a_leaves) == len(b_leaves), (len(a_leaves), len(b_leaves))
  return max(
      float(
          np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)))
      )
      for a, b in zip(a_leaves, b_leaves)
  )


def _keeps_sharding(tree, want) -> bool:
  """Whether every array of `tree` is laid out as its counterpart in `want`
  (a tree of shardings); False for no arrays or a different count."""
  import jax

  xs, ws = jax.tree.leaves(tree), jax.tree.leaves(want)
  return (
      bool(xs)
      and len(xs) == len(ws)
      and all(x.sharding.is_equivalent_to(w, x.ndim) for x, w in zip(xs, ws))
  )


def _max_abs_one(tree) -> float:
  import jax

  return max(
      float(np.max(np.abs(np.asarray(x)))) for x in jax.tree.leaves(tree)
  )


def _wait_all(jobs: list[Job], timeout: float = JOB_TIMEOUT) -> list[tuple]:
  """Waits for jobs that depend on each other (the processes of one run):
  when one fails, the others would wait on it forever, so they are stopped."""
  deadline = time.time() + timeout
  while any(j.proc.poll() is None for j in jobs) and time.time() < deadline:
    if any(j.proc.poll() not in (None, 0) for j in jobs):
      break
    time.sleep(0.5)
  for j in jobs:
    j.kill()
  return [j.wait(timeout=1) for j in jobs]


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


# ------------------------------------------------------------ the 8-device worker


def _all_methods_fn(s):
  """(state, batch) -> per method: its loss and the state after its step.

  Uses train.make_train_step, the function `jit_train_step` jits. Precond
  methods take a second step so AdamW's second moment exists; their first step
  (no moment yet: P = 1) is functional_sam's, so they start from its result.
  The gradient each step applied is read back from AdamW's first moment
  (`_applied_gradient`), which keeps this one program small.
  """
  from nanodo_sam import sam as sam_lib
  from nanodo_sam import train

  steps = {m: train.make_train_step(s, m) for m in METHODS}

  def fn(state, batch):
    out = {}
    for m in METHODS:
      before = state
      if m in sam_lib.PRECOND_METHODS:
        before = out[m.replace("precond_", "")]["state"]
      st, metrics = steps[m](before, batch)
      out[m] = {"loss": metrics["loss"], "state": st, "before": before}
    return out

  return fn


def _applied_gradient(before, after, b1: float):
  """g from AdamW's first moment: mu' = b1 mu + (1 - b1) g (no clipping)."""
  import jax
  import optax

  mu0, mu1 = (
      optax.tree_utils.tree_get(x.opt_state, "mu") for x in (before, after)
  )
  return jax.tree.map(
      lambda a, b: (np.asarray(b, np.float64) - b1 * np.asarray(a, np.float64))
      / (1 - b1),
      mu0,
      mu1,
  )


def _adam_params(before, after, opt_cfg):
  """AdamW's parameters after one step, in float64, from the step's own
  inputs: before's params and after's moments (optax.adamw: p - lr (mu_hat
  / (sqrt(nu_hat) + eps) + wd p), constant lr)."""
  import jax
  import optax
  from nanodo_sam import optimizer as optimizer_lib

  is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)
  (adam,) = [
      x for x in jax.tree.leaves(after.opt_state, is_leaf=is_adam) if is_adam(x)
  ]
  t = int(adam.count)
  lr, wd = opt_cfg.peak_learning_rate, optimizer_lib.decay_coefficient(opt_cfg)
  f64 = lambda x: np.asarray(x, np.float64)

  def one(p, mu, nu):
    u = (f64(mu) / (1 - opt_cfg.b1**t)) / (
        np.sqrt(f64(nu) / (1 - opt_cfg.b2**t)) + opt_cfg.eps
    )
    return f64(p) - lr * (u + wd * f64(p))

  return jax.tree.map(one, before.params, adam.mu, adam.nu)


def _params_beyond_adam(before, after, ref_before, ref_after, opt_cfg):
  """The largest amount by which |params - reference params| exceeds what
  AdamW's update makes of the two steps' own inputs (`_adam_params`), less
  each run's float32 rounding: 1 ulp of p, and 16 float32 ulps (2^-24
  relative each) of its update |p_before - p|. <= 0 for a correct program,
  whatever its inputs differ by (grads_diff and nu_diff bound those)."""
  import jax

  leaves = lambda t: [np.asarray(x, np.float64) for x in jax.tree.leaves(t)]
  worst = -np.inf
  for p, q, pp, qp, pb, qb in zip(
      leaves(after.params),
      leaves(ref_after.params),
      leaves(_adam_params(before, after, opt_cfg)),
      leaves(_adam_params(ref_before, ref_after, opt_cfg)),
      leaves(before.params),
      leaves(ref_before.params),
  ):
    rounding = sum(
        np.spacing(np.abs(x).astype(np.float32))
        + 16 * 2.0**-24 * np.abs(xb - x)
        for x, xb in ((p, pb), (q, qb))
    )
    excess = np.abs(p - q) - np.abs(pp - qp) - rounding
    worst = max(worst, float(excess.max()))
  return worst


def _spec(x) -> list:
  """A sharding's PartitionSpec as JSON (tuples -> lists)."""
  return [list(a) if isinstance(a, tuple) else a for a in x.sharding.spec]


def worker_mesh(out_path: str) -> None:
  """Checks on 8 CPU devices; writes one JSON file."""
  import jax
  import optax
  import orbax.checkpoint as ocp
  from jax.sharding import SingleDeviceSharding
  from nanodo_sam import checkpoint
  from nanodo_sam import model as model_lib
  from nanodo_sam import optimizer as optimizer_lib
  from nanodo_sam import distribute
  from nanodo_sam import sam as sam_lib
  from nanodo_sam import sharding
  from nanodo_sam import state as state_lib

  assert jax.device_count() == 8, jax.devices()
  t0 = time.time()
  res = {"meshes": {}, "timings": {}}
  batch = synthetic_batch(0, 8)
  setups = {m: state_lib.setup(step_config(m)) for m in MESHES}

  # The one-device reference: the same pure step, jitted without shardings on
  # device 0 (a Setup's model, optimizer and config do not depend on the mesh).
  s_first = setups[MESHES[0]]
  dev0 = SingleDeviceSharding(jax.devices()[0])
  init = state_lib.init_state(s_first, seed=0)
  ref_state = jax.device_put(init, dev0)
  s_ref = dataclasses.replace(  # Without the pin to the 8-device layout.
      s_first,
      logits_fn=model_lib.make_logits_fn(s_first.model),
      head=model_lib.output_head(s_first.model),
  )
  ref = jax.device_get(
      jax.jit(_all_methods_fn(s_ref))(ref_state, jax.device_put(batch, dev0))
  )
  b1 = s_first.cfg.opt.b1
  for m in METHODS:
    ref[m]["grads"] = _applied_gradient(ref[m]["before"], ref[m]["state"], b1)
  res["timings"]["reference"] = time.time() - t0
  res["reference"] = {
      m: {
          "loss": float(ref[m]["loss"]),
          "grads_max": _max_abs_one(ref[m]["grads"]),
      }
      for m in METHODS
  }

  saved = None
  for shape in MESHES:
    t = time.time()
    s = setups[shape]
    r = res["meshes"][str(shape)] = {}
    state = state_lib.init_state(s, seed=0)
    r["init_max_diff"] = _max_abs(state.params, jax.device_get(init.params))
    fn = jax.jit(
        _all_methods_fn(s),
        in_shardings=(s.state_sharding, sharding.batch_sharding(s.mesh)),
    )
    lowered = fn.lower(state, sharding.global_batch(batch, s.mesh))
    compiled = lowered.compile()
    hlo = compiled.as_text()
    r["collectives"] = {
        op: len(re.findall(rf"= \S+ {op}(-start)?\(", hlo))
        for op in (
            "all-gather",
            "all-reduce",
            "reduce-scatter",
            "all-to-all",
            "collective-permute",
        )
    }
    out = compiled(state, sharding.global_batch(batch, s.mesh))
    r["methods"] = {}
    for m in METHODS:
      o = out[m]
      grads = _applied_gradient(
          jax.device_get(o["before"]), jax.device_get(o["state"]), b1
      )
      r["methods"][m] = {
          "loss": float(o["loss"]),
          "loss_diff": abs(float(o["loss"]) - float(ref[m]["loss"])),
          "grads_diff": _max_abs(grads, ref[m]["grads"]),
          "params_diff": _max_abs(o["state"].params, ref[m]["state"].params),
          "params_beyond_adam": _params_beyond_adam(
              jax.device_get(o["before"]),
              jax.device_get(o["state"]),
              ref[m]["before"],
              ref[m]["state"],
              s.cfg.opt,
          ),
          "params_change": _max_abs(o["state"].params, ref_state.params),
          "nu_diff": _max_abs(
              optax.tree_utils.tree_get(o["state"].opt_state, "nu"),
              optax.tree_utils.tree_get(ref[m]["state"].opt_state, "nu"),
          ),
      }

    # Where the parameters and AdamW's moments actually live.
    kernel = lambda tree: tree["block_0"]["mlp"]["fc1"]["kernel"]
    mu = optax.tree_utils.tree_get(state.opt_state, "mu")
    nu = optax.tree_utils.tree_get(state.opt_state, "nu")
    leaves = jax.tree.leaves(state.params)
    r["fc1"] = {
        "spec": _spec(kernel(state.params)),
        "mu_spec": _spec(kernel(mu)),
        "nu_spec": _spec(kernel(nu)),
        "bytes": kernel(state.params).nbytes,
        "device_bytes": kernel(state.params).addressable_shards[0].data.nbytes,
    }
    same = _keeps_sharding
    r["outputs_keep_sharding"] = {
        m: {
            "params": same(out[m]["state"].params, s.state_sharding.params),
            "opt_state": same(
                out[m]["state"].opt_state, s.state_sharding.opt_state
            ),
        }
        for m in METHODS
    }

    r["embed_spec"] = _spec(state.params["embed"]["embedding"])
    r["param_bytes"] = sum(x.nbytes for x in leaves)
    r["param_device_bytes"] = sum(
        x.addressable_shards[0].data.nbytes for x in leaves
    )
    r["state_matches_declared"] = same(state, s.state_sharding)

    # The SAM perturbation, perturbed parameters and preconditioner inherit
    # the parameters' sharding (no out_shardings given: XLA's choice).
    ps = s.state_sharding.params
    perturbed = jax.jit(
        lambda p, g: sam_lib.shift(p, sam_lib.perturbation(g, 0.1)),
        in_shardings=(ps, ps),
    )(state.params, state.params)
    precond = jax.jit(
        lambda o: optimizer_lib.adam_preconditioner(o, b2=0.95, eps=1e-8)[0],
        in_shardings=(s.state_sharding.opt_state,),
    )(out["adamw"]["state"].opt_state)
    r["perturbed_keeps_sharding"] = same(perturbed, ps)
    # The gradient, unpinned on the way out: the pin inside logits_fn and
    # head (sharding.pin_params / pin_head) must put it where the parameters
    # are, so that eps and theta + eps, computed from it inside the step, are
    # too.
    r["grads_keep_sharding"] = same(
        jax.jit(
            lambda p, b: sam_lib.gradient(
                "adamw", p, b, logits_fn=s.logits_fn, head=s.head, rho=0.0
            )[1],
            in_shardings=(ps, sharding.batch_sharding(s.mesh)),
        )(state.params, sharding.global_batch(batch, s.mesh)),
        ps,
    )
    r["precond_keeps_sharding"] = same(precond, ps)

    # Microbatches for gradient accumulation must each span every device.
    mb = jax.jit(
        lambda b: distribute._microbatches(b, 4)[0]["inputs"],
        in_shardings=(sharding.batch_sharding(s.mesh),),
    )(sharding.global_batch(synthetic_batch(1, 32), s.mesh))
    r["microbatch_shard_shape"] = list(mb.addressable_shards[0].data.shape)

    if saved is None:  # Checkpoint on the first mesh; restore on the others.
      ckpt_dir = os.path.join(os.path.dirname(out_path), "ckpt")
      mngr = checkpoint.checkpoint_manager(ckpt_dir)
      saved = out["adamw"]["state"]
      mngr.save(1, args=ocp.args.StandardSave(saved))
      mngr.wait_until_finished()
      saved_host = jax.device_get((saved.params, saved.opt_state))
    else:
      restored = checkpoint.restore_state(mngr, s, 1)
      r["restore"] = {
          "max_diff": _max_abs(
              (restored.params, restored.opt_state), saved_host
          ),
          "step": int(restored.step),
          "fc1_spec": _spec(kernel(restored.params)),
          "matches_declared": same(restored, s.state_sharding),
      }
    res["timings"][str(shape)] = time.time() - t
  res["timings"]["total"] = time.time() - t0
  with open(out_path, "w") as f:
    json.dump(res, f)


# ---------------------------------------------------------- background jobs


DOC = b"To be, or not to be: that is th"  # 31 bytes + EOS = L tokens: one
# row in Nanodo's layout (data.packing=nanodo).


def _cli_overrides(files: str) -> list[str]:
  """The tiny model on documents that are each exactly one packed row."""
  o = {
      "model.D": 32,
      "model.H": 2,
      "model.N": 1,
      "model.F": 64,
      "model.L": 32,
      "model.V": 259,
      "data.train_files": files,
      "data.eval_files": files,
      "data.batch_size": 8,
      "data.eval_batch_size": 8,
      "data.eval_steps": 1,
      "data.shuffle_buffer": 8,
      "opt.num_train_steps": 6,
      "opt.warmup_steps": 1,
      "opt.peak_learning_rate": 1e-2,
      "eval_every_steps": 0,
      "checkpoint_every_steps": 3,
      "log_every_steps": 1,
      "sam.method": "sam",
      "sam.rho": 0.05,
      "mesh.data": 1,
      "mesh.fsdp": -1,
      "mesh.tensor": 1,
  }
  return [f"--config.{k}={v}" for k, v in o.items()]


ERROR_CASES = {
    "mesh": (
        ["--config.mesh.data=3"],
        "multiplies to 3, but there are 8 devices",
    ),
    "batch": (
        [
            "--config.mesh.data=4",
            "--config.mesh.fsdp=2",
            "--config.grad_accumulation_steps=2",
            "--config.data.batch_size=8",
        ],
        "data.batch_size=8 is not divisible by data x fsdp x "
        "grad_accumulation_steps = 4x2x2",
    ),
    "heads": (
        ["--config.mesh.data=2", "--config.mesh.tensor=4"],
        "model.H=2 heads are not divisible by mesh.tensor=4",
    ),
}


def _cli(*args) -> list[str]:
  return [
      sys.executable,
      "-m",
      "nanodo_sam.cli",
      "train",
      f"--config={os.path.join(ROOT, 'configs', 'quickstart.py')}",
      *args,
  ]


@pytest.fixture(scope="module", autouse=True)
def jobs(request, tmp_path_factory):
  """Starts every subprocess the selected tests need, all at once, before
  the first test of this module (the in-process test overlaps them)."""
  wanted = {
      f
      for item in request.session.items
      if item.module is request.module
      for f in item.fixturenames
  }
  root = tmp_path_factory.mktemp("sharding")
  started = {}
  if "mesh_results" in wanted:
    started["mesh"] = Job(
        "mesh",
        [sys.executable, __file__, "mesh", str(root / "mesh" / "results.json")],
        worker_env(8),
        str(root / "mesh"),
    )
  if "scale_results" in wanted:
    started["scale"] = Job(
        "scale",
        [
            sys.executable,
            __file__,
            "scale",
            str(root / "scale" / "results.json"),
        ],
        worker_env(8),
        str(root / "scale"),
    )
  if "dist_runs" in wanted:
    assert len(DOC) + 1 == 32
    docs = root / "docs"
    docs.mkdir()
    for i in range(4):
      (docs / f"doc{i}.txt").write_bytes(DOC)
    flags = _cli_overrides(str(docs / "*.txt"))
    port = _free_port()
    for i in range(2):
      started[f"proc{i}"] = Job(
          f"proc{i}",
          _cli(
              f"--workdir={root / 'two_process'}",
              *flags,
              f"--coordinator_address=localhost:{port}",
              "--num_processes=2",
              f"--process_id={i}",
          ),
          worker_env(1),
          str(root / "logs"),
      )
    started["single"] = Job(
        "single",
        _cli(f"--workdir={root / 'one_process'}", *flags),
        worker_env(2),
        str(root / "logs"),
    )
  if "error_runs" in wanted:
    for name, (flags, _) in ERROR_CASES.items():
      started[f"error_{name}"] = Job(
          f"error_{name}",
          _cli(
              f"--workdir={root / ('err_' + name)}",
              "--config.model.D=32",
              "--config.model.H=2",
              "--config.model.F=64",
              "--config.model.L=32",
              "--config.data.batch_size=8",
              "--config.data.eval_batch_size=8",
              *flags,
          ),
          worker_env(8),
          str(root / "logs"),
      )
  yield root, started
  for job in started.values():
    job.kill()


# ------------------------------------------------ mesh and rules, no devices


class _FakeMesh:
  shape = {"data": 2, "fsdp": 4, "tensor": 2}


def test_fit_spec_keeps_only_axes_that_divide_the_dimension():
  from jax.sharding import PartitionSpec as P
  from nanodo_sam.sharding import fit_spec

  m = _FakeMesh()
  assert fit_spec(P("tensor", "fsdp"), (259, 32), m) == P(None, "fsdp")
  assert fit_spec(P("fsdp", "tensor"), (32, 64), m) == P("fsdp", "tensor")
  assert fit_spec(P(("data", "fsdp")), (8, 5), m) == P(("data", "fsdp"))
  assert fit_spec(P(("data", "fsdp")), (6, 5), m) == P("data")
  assert fit_spec(P("fsdp", "tensor"), (6, 3), m) == P()


def test_mesh_shape_fills_minus_one_and_rejects_what_cannot_fit():
  from nanodo_sam.config import UsageError
  from nanodo_sam.sharding import mesh_shape

  mesh = lambda d, f, t: {"data": d, "fsdp": f, "tensor": t}
  assert mesh_shape(mesh(-1, 1, 1), 8) == (8, 1, 1)
  assert mesh_shape(mesh(2, -1, 2), 8) == (2, 2, 2)
  for bad, msg in [
      ((3, 1, 1), "multiplies to 3"),
      ((-1, -1, 1), "at most one"),
      ((3, -1, 1), "cannot fill 8"),
      ((0, 8, 1), "positive"),
  ]:
    with pytest.raises(UsageError, match=msg):
      mesh_shape(mesh(*bad), 8)


def test_validate_needs_each_process_to_own_rows_of_the_batch():
  from nanodo_sam.config import UsageError
  from nanodo_sam.sharding import validate

  cfg = step_config((1, 1, 2))
  with pytest.raises(UsageError, match="not a multiple of the 2 processes"):
    validate(cfg, num_devices=2, num_processes=2)
  validate(step_config((1, 2, 1)), num_devices=2, num_processes=2)


def test_distributed_flags_must_come_together():
  from nanodo_sam.config import UsageError
  from nanodo_sam.sharding import maybe_initialize_distributed

  with pytest.raises(UsageError, match="needs --num_processes"):
    maybe_initialize_distributed("localhost:1234", 0, -1)
  with pytest.raises(UsageError, match="process_id in"):
    maybe_initialize_distributed("localhost:1234", 2, 2)


# -------------------------------- 3. accumulation == one full-batch step


@pytest.mark.slow  # Six accumulation variants compiled, ~25 s.
def test_accumulated_microbatches_equal_the_full_batch():
  """One jitted program runs train steps for six (method, microbatches,
  perturbation scope) variants from the same state. SGD at learning rate 1
  without weight decay makes each step's update its gradient: g = p - p'."""
  import jax
  from nanodo_sam import sharding, train
  from nanodo_sam import state as state_lib

  n = jax.device_count()
  batch_size = 8 * n  # 4 microbatches x 2 rows per device.
  variants = [
      ("adamw", 1, "global"),
      ("adamw", 4, "global"),
      ("adamw", 4, "microbatch"),
      ("sam", 1, "global"),
      ("sam", 4, "global"),
      ("sam", 4, "microbatch"),
  ]
  setups = {
      v: state_lib.setup(
          step_config(
              (-1, 1, 1),
              **{
                  "sam.method": v[0],
                  "grad_accumulation_steps": v[1],
                  "sam.perturbation_scope": v[2],
                  "sam.rho": 0.1,
                  "data.batch_size": batch_size,
                  "opt.optimizer": "sgd",
                  "opt.peak_learning_rate": 1.0,
                  "opt.weight_decay": 0.0,
              },
          )
      )
      for v in variants
  }
  steps = {v: train.make_train_step(setups[v], v[0]) for v in variants}

  def all_variants(state, batch):
    return {v: step(state, batch) for v, step in steps.items()}

  state = state_lib.init_state(setups[variants[0]], seed=0)
  batch = sharding.global_batch(
      synthetic_batch(2, batch_size), setups[variants[0]].mesh
  )
  compiled = (
      jax.jit(all_variants)
      .lower(state, batch)
      .compile(compiler_options=FAST_COMPILE)
  )
  out = jax.device_get(compiled(state, batch))
  params = jax.device_get(state.params)
  loss = {v: float(m["loss"]) for v, (_, m) in out.items()}
  grads = {
      v: jax.tree.map(
          lambda a, b: np.asarray(a, np.float64) - b, params, st.params
      )
      for v, (st, _) in out.items()
  }

  def assert_same(a, b):
    assert abs(loss[a] - loss[b]) <= 1e-6 * abs(loss[b]), (a, b, loss)
    assert _max_abs(grads[a], grads[b]) <= 1e-5 * _max_abs_one(grads[b]), (a, b)

  assert_same(("adamw", 4, "global"), ("adamw", 1, "global"))
  assert_same(("adamw", 4, "microbatch"), ("adamw", 1, "global"))
  assert_same(("sam", 4, "global"), ("sam", 1, "global"))
  # m-sharpness: each microbatch perturbed by its own gradient gives another
  # gradient (the loss, taken before perturbing, is the same) ...
  mb, full, plain = (
      ("sam", 4, "microbatch"),
      ("sam", 1, "global"),
      ("adamw", 1, "global"),
  )
  assert abs(loss[mb] - loss[full]) <= 1e-6 * abs(loss[full])
  # (Seen: 3-10% of the largest entry, 1000x the tolerance above.)
  assert _max_abs(grads[mb], grads[full]) > 0.01 * _max_abs_one(grads[full])
  # ... and SAM is not the plain gradient at this rho.
  assert _max_abs(grads[full], grads[plain]) > 0.01 * _max_abs_one(grads[plain])


# ------------------------------------------ 1. sharded step == one device


@pytest.fixture(scope="module")
def mesh_results(jobs):
  root, started = jobs
  rc, out, err = started["mesh"].wait()
  assert rc == 0, f"mesh worker failed ({rc}):\n{err[-4000:]}"
  with open(root / "mesh" / "results.json") as f:
    return json.load(f)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("mesh", MESHES, ids=lambda m: "x".join(map(str, m)))
def test_sharded_step_equals_one_device(mesh_results, mesh, method):
  """Same loss, gradient, parameters and AdamW nu as one device (float32).

  A sharded step sums in a different order, so entries differ by float32
  rounding (~1e-7 of the largest gradient entry). Adam's first steps divide
  by |g| + eps, which turns that rounding into larger changes for entries
  whose gradient is itself near zero; precond methods also perturb along
  g / (|g| + eps). The gradient and nu tolerances are set from that, 10x
  above what is seen. The parameters are held to the arithmetic instead:
  per entry, they differ from the reference by no more than AdamW's update
  makes of the two steps' own inputs, plus float32 rounding
  (`_params_beyond_adam`); a gradient near its rounding level (AdamW divides
  it by its own scale, so one bit of it can move p by up to 2 lr) is allowed
  exactly the change it causes, and no other entry anything more.
  """
  r = mesh_results["meshes"][str(mesh)]["methods"][method]
  ref = mesh_results["reference"][method]
  precond = method.startswith("precond_")
  assert r["loss_diff"] <= 5e-6 * abs(ref["loss"]), r
  assert r["grads_diff"] <= (2e-3 if precond else 1e-5) * ref["grads_max"], (
      r,
      ref,
  )
  # Each Adam step moves parameters by up to lr = 1e-3.
  assert r["params_change"] > 5e-4, r
  assert r["params_beyond_adam"] <= 0.0, r
  assert r["nu_diff"] <= 1e-4 * ref["grads_max"] ** 2, r


@pytest.mark.parametrize("mesh", MESHES, ids=lambda m: "x".join(map(str, m)))
def test_init_does_not_depend_on_the_mesh(mesh_results, mesh):
  assert mesh_results["meshes"][str(mesh)]["init_max_diff"] == 0.0


# ------------------------------------ 2. parameters and AdamW state are sharded


def test_fsdp_and_tensor_axes_really_shard_params_and_adam_state(mesh_results):
  m = {shape: mesh_results["meshes"][str(shape)] for shape in MESHES}
  for shape, r in m.items():
    assert r["state_matches_declared"], shape
    # fc1 kernel [D, F]: D (embed) over fsdp, F (mlp) over tensor, and
    # AdamW's mu and nu follow the parameter.
    for key in ("spec", "mu_spec", "nu_spec"):
      assert r["fc1"][key] == ["fsdp", "tensor"], (shape, key, r["fc1"])
    _, fsdp, tensor = shape
    assert r["fc1"]["device_bytes"] * fsdp * tensor == r["fc1"]["bytes"]
  # The vocabulary (259, odd) cannot split over tensor=2: it stays whole
  # there while the embedding dimension still splits over fsdp.
  assert m[(2, 2, 2)]["embed_spec"] == [None, "fsdp"]
  assert m[(2, 4, 1)]["embed_spec"] == ["tensor", "fsdp"]
  # Per-device parameter memory drops with the fsdp size (only the tiny
  # LayerNorm scales stay replicated).
  full = m[(8, 1, 1)]["param_device_bytes"]
  assert full == m[(8, 1, 1)]["param_bytes"]
  assert m[(2, 4, 1)]["param_device_bytes"] < 0.27 * full
  assert m[(2, 2, 2)]["param_device_bytes"] < 0.55 * full


def test_perturbation_and_preconditioner_keep_the_param_sharding(mesh_results):
  """Nothing pins these inside the step; XLA's propagation must keep them
  where the parameters are (no replicated copy of theta + eps or of P)."""
  for shape in MESHES:
    r = mesh_results["meshes"][str(shape)]
    assert r["perturbed_keeps_sharding"], shape
    assert r["precond_keeps_sharding"], shape
    assert r["grads_keep_sharding"], shape
    for m in METHODS:  # Unpinned outputs: new params and AdamW state.
      assert r["outputs_keep_sharding"][m] == {
          "params": True,
          "opt_state": True,
      }, (shape, m, r)
  # Pure data parallelism gathers nothing: the only collectives are the
  # gradient (and metric) all-reduces.
  assert (
      mesh_results["meshes"][str((8, 1, 1))]["collectives"]["all-gather"] == 0
  )


def test_microbatches_each_span_every_device(mesh_results):
  # 32 rows on 8 devices, 4 microbatches: each device must hold 1 row of every
  # microbatch, not 4 rows of one (which makes XLA gather the batch and
  # compute each microbatch on 2 of the 8 devices). Needs distribute._microbatches
  # to take rows i, i+k, i+2k, ... as microbatch i.
  r = mesh_results["meshes"][str((8, 1, 1))]
  assert r["microbatch_shard_shape"] == [4, 1, 32], (
      "distribute._microbatches splits the batch into contiguous blocks; use "
      "x.reshape((B // k, k) + rest).swapaxes(0, 1)"
  )


# ---------------------------------------------------- 4. two processes


def _losses(stderr: str) -> list[float]:
  return [
      float(x) for x in re.findall(r"step \d+/\d+: loss ([0-9.eE+-]+)", stderr)
  ]


@pytest.fixture(scope="module")
def dist_runs(jobs):
  root, started = jobs
  names = ("proc0", "proc1", "single")
  runs = dict(zip(names, _wait_all([started[n] for n in names])))
  for name, (rc, out, err) in runs.items():
    assert rc == 0, f"{name} failed ({rc}):\n{err[-4000:]}"
  return root, runs


@pytest.mark.slow  # Three CLI runs, two of them one two-process run.
def test_two_process_run_equals_one_process_run(dist_runs):
  """2 processes x 1 CPU device (jax.distributed, gloo) against 1 process x 2
  devices, both on mesh fsdp=2 through `nanodo-sam train`.

  Each process reads its own shard of the documents (seqio ShardInfo), so a
  general corpus gives the two runs different batches. Here every document
  is exactly one packed row, so every batch is the same whichever process
  reads it, and the runs must agree step by step.
  """
  root, runs = dist_runs
  two, one = root / "two_process", root / "one_process"
  r0, r1, r_one = (
      json.loads(runs[n][1][runs[n][1].index("{") :])
      for n in ("proc0", "proc1", "single")
  )
  assert r0["status"] == r1["status"] == r_one["status"] == "completed"
  assert r0["steps"] == r_one["steps"] == 6
  np.testing.assert_allclose(
      r0["final_eval_loss"], r_one["final_eval_loss"], rtol=1e-5
  )
  np.testing.assert_allclose(
      r1["final_eval_loss"], r0["final_eval_loss"], rtol=1e-6
  )
  l_two, l_one = _losses(runs["proc0"][2]), _losses(runs["single"][2])
  assert len(l_two) == len(l_one) == 6
  np.testing.assert_allclose(l_two, l_one, atol=2e-4)  # Logged as %.4f.
  assert l_two[-1] < l_two[0] - 0.5, l_two  # It trains.
  # Only process 0 writes run files; every process saves its data position
  # and its part of the checkpoint.
  with open(two / "results.json") as f:
    assert json.load(f)["final_eval_loss"] == r0["final_eval_loss"]
  assert len(glob.glob(str(two / "events.out.tfevents.*"))) == 1
  assert sorted(os.listdir(two / "data_state" / "6")) == [
      "process_0.data-00000-of-00001",
      "process_0.index",
      "process_1.data-00000-of-00001",
      "process_1.index",
  ]
  assert sorted(
      int(s) for s in os.listdir(two / "checkpoints") if s.isdigit()
  ) == [3, 6]
  # The final parameters agree.
  a, b = (
      _restore_on_one_device(d / "checkpoints" / "6" / "default")
      for d in (two, one)
  )
  assert _max_abs(a["params"], b["params"]) <= 1e-5


def _restore_on_one_device(path) -> dict:
  """A checkpoint written on any mesh, read onto this process's device 0."""
  import jax
  import orbax.checkpoint as ocp

  ckptr = ocp.StandardCheckpointer()
  path = os.path.abspath(path)
  dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=dev),
      ckptr.metadata(path).item_metadata.tree,
  )
  return ckptr.restore(path, target)


# ------------------------------------------------------ 6. bad mesh input


@pytest.fixture(scope="module")
def error_runs(jobs):
  root, started = jobs
  return root, {name: started[f"error_{name}"].wait() for name in ERROR_CASES}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_bad_mesh_input_is_one_line_and_exit_2(error_runs, case):
  root, runs = error_runs
  rc, _, err = runs[case]
  lines = [l for l in err.splitlines() if l and not RUNTIME_NOISE.match(l)]
  assert rc == 2, err[-3000:]
  assert len(lines) == 1 and lines[0].startswith("nanodo-sam: error: "), err
  assert ERROR_CASES[case][1] in lines[0]
  assert not os.path.exists(root / f"err_{case}")


# ---------------------------------------------------- 5. checkpoint reshard


def test_checkpoint_from_one_mesh_restores_on_another(mesh_results):
  for shape in MESHES[1:]:
    r = mesh_results["meshes"][str(shape)]["restore"]
    assert r["max_diff"] == 0.0 and r["step"] == 1, (shape, r)
    assert r["matches_declared"], shape
    _, fsdp, tensor = shape
    assert r["fc1_spec"] == ["fsdp", "tensor"]


def worker_scale(out_path: str) -> None:
  """The diagnostics and the chunked output head on a (2, 4, 1) mesh of 8 CPU
  devices, against one device; per-device temp memory from XLA's buffer
  assignment (compiled.memory_analysis()). Writes one JSON file."""
  import jax
  from jax.sharding import SingleDeviceSharding
  from nanodo_sam import model as model_lib
  from nanodo_sam import sam as sam_lib
  from nanodo_sam import sharding
  from nanodo_sam import sharpness
  from nanodo_sam import state as state_lib

  assert jax.device_count() == 8, jax.devices()
  res = {}
  s = state_lib.setup(step_config((2, 4, 1), **{"model.V": 4096}))
  state = state_lib.init_state(s, seed=0)
  batch = synthetic_batch(1, 8)
  gbatch = sharding.global_batch(batch, s.mesh)
  ps, bs = s.state_sharding.params, sharding.batch_sharding(s.mesh)
  dev0 = SingleDeviceSharding(jax.devices()[0])
  params0 = jax.device_put(jax.device_get(state.params), dev0)
  batch0 = jax.device_put(batch, dev0)
  exact = model_lib.make_logits_fn(s.model)
  temp = lambda c: c.memory_analysis().temp_size_in_bytes

  # Lanczos: the basis kept like the parameters (params_sharding) or not.
  def lanczos(params_sharding):
    return lambda p, b: sharpness.lambda_max(
        p,
        b,
        logits_fn=exact,
        num_iters=12,
        tol=0.0,
        rng=jax.random.key(0),
        params_sharding=params_sharding,
    )[0]

  ref = float(jax.jit(lanczos(None))(params0, batch0))
  runs = {}
  for name, keep in (("sharded", ps), ("unconstrained", None)):
    c = (
        jax.jit(lanczos(keep), in_shardings=(ps, bs))
        .lower(state.params, gbatch)
        .compile()
    )
    runs[name] = {
        "lambda_max": float(c(state.params, gbatch)),
        "temp_bytes": temp(c),
    }
  res["lanczos"] = {"one_device": ref, **runs}

  # The chunked output head on the mesh: the SAM gradient in chunks of the
  # sequence (rows kept split like the batch) against the whole logits.
  def make_grads(chunk_tokens):
    h = s.head._replace(chunk_tokens=chunk_tokens)
    return lambda p, b: sam_lib.gradient(
        "sam", p, b, logits_fn=s.logits_fn, head=h, rho=0.1
    )[1]

  head = {}
  # 32 rows over 2 x 4 devices: 4 rows per device, 32 tokens per chunk = 4
  # chunks of the 32 positions. (Each device also holds the output layer
  # and its gradient, [V, D] each: the logits must outweigh them.)
  batch = synthetic_batch(2, 32)
  gbatch = sharding.global_batch(batch, s.mesh)
  batch0 = jax.device_put(batch, dev0)
  for name, chunk_tokens in (("whole", 0), ("chunked", 32)):
    grads = make_grads(chunk_tokens)
    c = (
        jax.jit(grads, in_shardings=(ps, bs))
        .lower(state.params, gbatch)
        .compile()
    )
    head[name] = {"grads": c(state.params, gbatch), "temp_bytes": temp(c)}
  ref_grads = jax.jit(
      lambda p, b: sam_lib.gradient("sam", p, b, logits_fn=exact, rho=0.1)[1]
  )(params0, batch0)
  res["head"] = {
      "chunked_vs_whole": _max_abs(
          head["chunked"]["grads"], head["whole"]["grads"]
      ),
      "chunked_vs_one_device": _max_abs(head["chunked"]["grads"], ref_grads),
      "grads_max": _max_abs_one(ref_grads),
      "keeps_sharding": _keeps_sharding(head["chunked"]["grads"], ps),
      "temp_bytes": {k: v["temp_bytes"] for k, v in head.items()},
  }
  with open(out_path, "w") as f:
    json.dump(res, f, indent=2)


@pytest.fixture(scope="module")
def scale_results(jobs):
  root, started = jobs
  rc, _, err = started["scale"].wait()
  assert rc == 0, f"scale worker failed ({rc}):\n{err[-4000:]}"
  with open(root / "scale" / "results.json") as f:
    return json.load(f)


def test_lanczos_on_a_mesh_equals_one_device_with_its_basis_sharded(
    scale_results,
):
  """lambda_max on the (2, 4, 1) mesh equals one device's, and keeping the
  Krylov basis split like the parameters lowers each device's temp memory."""
  r = scale_results["lanczos"]
  for name in ("sharded", "unconstrained"):
    assert r[name]["lambda_max"] == pytest.approx(r["one_device"], rel=1e-4)
  assert r["sharded"]["temp_bytes"] < r["unconstrained"]["temp_bytes"]


def test_chunked_head_on_a_mesh_equals_the_whole_logits_and_uses_less(
    scale_results,
):
  r = scale_results["head"]
  assert r["chunked_vs_whole"] <= 1e-5 * max(1.0, r["grads_max"])
  assert r["chunked_vs_one_device"] <= 1e-5 * max(1.0, r["grads_max"])
  assert r["keeps_sharding"]
  assert r["temp_bytes"]["chunked"] < r["temp_bytes"]["whole"]


if __name__ == "__main__":
  if sys.argv[1] == "mesh":
    worker_mesh(sys.argv[2])
  elif sys.argv[1] == "scale":
    worker_scale(sys.argv[2])
  else:
    raise SystemExit(f"unknown worker {sys.argv[1]!r}")
