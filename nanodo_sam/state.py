"""The train state, and everything a config builds to make and place it.

`setup(cfg)` validates the config and builds the model, its logits function
and output head, the optimizer, the mesh and the state's shardings;
`init_state` makes the first state. Both go through one function
(`_init_fn`) that builds a TrainState: traced abstractly with its logical
axes for the shardings, run for real for the values. A state that cannot fit
in a device's memory is refused before anything is allocated; with
grad_accumulation_steps=0 (auto) `setup` compiles the train step on abstract
inputs and picks the fewest microbatches whose step fits (`memory_budget`),
so `train.jit_step(setup(cfg), kind)` is exactly the step the run takes.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from nanodo_sam import keys
from nanodo_sam import model as model_lib
from nanodo_sam import optimizer as optimizer_lib
from nanodo_sam import sam as sam_lib
from nanodo_sam import sharding
from nanodo_sam import step as step_lib
from nanodo_sam import targets
from nanodo_sam import validation
from nanodo_sam.errors import UsageError
from nanodo_sam.loss import LogitsFn, OutputHead


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array
  # sam_lib.Reuse carried between full SAM-family steps when sam.reuse is
  # on (checkpointed with the rest); None otherwise.
  reuse: Any = None


@dataclasses.dataclass
class Setup:
  """Everything derived from a config that the loop, bench and CLI share."""

  cfg: Any
  model: model_lib.TransformerDo
  logits_fn: LogitsFn  # pinned to the parameters' sharding
  head: OutputHead  # the model's output layer, pinned the same way
  # logits_fn with attention="xla", whatever model.attention says: the
  # sharpness diagnostics differentiate it forward-over-reverse, and cuDNN's
  # attention kernel has no forward-mode derivative.
  diagnostics_logits_fn: LogitsFn
  # The output layer of that model, with the mesh's batch sharding: the
  # diagnostics run each product on every device's own rows and chunk it.
  diagnostics_head: OutputHead
  tx: optax.GradientTransformation
  mesh: jax.sharding.Mesh
  state_sharding: Any
  abstract_state: Any
  # Jitted train steps by step kind that `setup` compiled already (fitting
  # the microbatches); `train.jit_step` hands them out.
  steps: dict = dataclasses.field(default_factory=dict)


def _xla_model(model):
  """`model` with XLA's attention, for what must run on every backend: init
  (the same parameters) and the diagnostics (cuDNN's kernel has no
  forward-mode derivative)."""
  return model_lib.TransformerDo(
      dataclasses.replace(model.cfg, attention="xla")
  )


def _init_fn(cfg, model, tx):
  """rng -> the first TrainState, its parameters boxed with logical axes."""

  def init(rng):
    init_rng, state_rng = jax.random.split(rng)
    params = model.init(init_rng, jnp.zeros((1, cfg.model.L), jnp.int32))[
        "params"
    ]
    reuse = (
        sam_lib.reuse_init(params) if keys.of(cfg.sam, "sam.reuse") else None
    )
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        rng=state_rng,
        reuse=reuse,
    )

  return init


def setup(cfg, before_compile: Callable[[], None] | None = None) -> Setup:
  """Validates the config and builds model, optimizer, mesh and shardings.
  `before_compile`: a further check run after validation and before any
  compile (the trainer's: is the data there), so its one line comes fast."""
  validation.validate(cfg, num_devices=len(targets.devices()))
  if before_compile is not None:
    before_compile()
  model = model_lib.TransformerDo(model_lib.from_config(cfg))
  tx = optimizer_lib.make_optimizer(cfg.opt)
  mesh = sharding.make_mesh(cfg.mesh)
  exact = _xla_model(model)
  boxed = jax.eval_shape(_init_fn(cfg, exact, tx), jax.random.key(0))
  state_sharding = sharding.logical_to_sharding(boxed, mesh)
  abstract_state = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      nn.unbox(boxed),
      state_sharding,
  )
  check_memory(cfg, abstract_state)
  cast = model_lib.compute_params(model.cfg)  # FSDP gathers in bf16.
  logits_fn = sharding.pin_params(
      model_lib.make_logits_fn(model), state_sharding.params, cast
  )
  chunk = keys.of(cfg.model, "model.head_chunk_tokens")
  head = sharding.pin_head(
      model_lib.output_head(model)._replace(chunk_tokens=chunk),
      state_sharding.params,
      sharding.batch_sharding(mesh),
      cast,
  )
  diagnostics_logits_fn = sharding.pin_params(
      model_lib.make_logits_fn(exact), state_sharding.params
  )
  diagnostics_head = model_lib.output_head(exact)._replace(
      batch_sharding=sharding.batch_sharding(mesh)
  )
  s = Setup(
      cfg,
      model,
      logits_fn,
      head,
      diagnostics_logits_fn,
      diagnostics_head,
      tx,
      mesh,
      state_sharding,
      abstract_state,
  )
  if cfg.grad_accumulation_steps == 0:
    s = fit_microbatches(s)
  return s


log = logging.getLogger("nanodo_sam")
GiB = 2**30
# The share of a device's memory JAX gives XLA on a GPU by default (its
# XLA_PYTHON_CLIENT_MEM_FRACTION); what mesh.device_memory_gb is scaled by.
DEFAULT_MEM_FRACTION = 0.75


def memory_budget(cfg) -> int:
  """Bytes a compiled step may use on one device: mesh.device_memory_gb GiB
  x XLA_PYTHON_CLIENT_MEM_FRACTION (default 0.75) when set (> 0), else what
  the device itself reports (`device_memory`). With a target active
  (`targets.active`): its chip's memory x its share for XLA (0.75 on a GPU,
  the whole HBM on a TPU), unless mesh.device_memory_gb is set."""
  gb = float(keys.of(cfg.mesh, "mesh.device_memory_gb") or 0.0)
  if gb > 0:
    fraction = float(
        os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", DEFAULT_MEM_FRACTION)
    )
    return int(gb * GiB * fraction)
  if targets.memory_bytes() is not None:
    return int(targets.memory_bytes() * targets.current().mem_fraction)
  return device_memory()


def abstract_batch(s: Setup, rows: int | None = None) -> dict:
  """A batch of `rows` (default data.batch_size) rows as ShapeDtypeStructs
  split like the real one: what the step is compiled for before any data."""
  rows = s.cfg.data.batch_size if rows is None else rows
  bs = sharding.batch_sharding(s.mesh)
  tokens = jax.ShapeDtypeStruct((rows, s.cfg.model.L), jnp.int32, sharding=bs)
  return {
      "inputs": tokens,
      "targets": tokens,
      "weights": jax.ShapeDtypeStruct(tokens.shape, jnp.float32, sharding=bs),
  }


def step_bytes(compiled) -> int:
  """Per-device bytes of a compiled step (XLA's buffer assignment):
  arguments + outputs - donated + temporaries."""
  m = compiled.memory_analysis()
  if m is None:
    return 0
  return (
      m.argument_size_in_bytes
      + m.output_size_in_bytes
      - m.alias_size_in_bytes
      + m.temp_size_in_bytes
  )


def compile_step(s: Setup, fn) -> Any:
  """`fn` (a jitted train step) compiled for `s`'s state and batch shapes
  (nothing is allocated; JAX reuses it when `fn` is called on them)."""
  return fn.lower(s.abstract_state, abstract_batch(s)).compile()


def _with_microbatches(s: Setup, k: int) -> Setup:
  cfg = s.cfg.copy_and_resolve_references()
  with cfg.unlocked():
    cfg.grad_accumulation_steps = k
  return dataclasses.replace(s, cfg=cfg, steps={})


def _microbatch_choices(cfg) -> list[int]:
  """Microbatch counts that split each device's rows evenly, ascending."""
  data, fsdp, _ = sharding.mesh_shape(cfg.mesh, len(targets.devices()))
  rows = cfg.data.batch_size // (data * fsdp)
  return [k for k in range(1, rows + 1) if rows % k == 0]


def fit_microbatches(s: Setup) -> Setup:
  """`s` with grad_accumulation_steps resolved from 0 (auto): the fewest
  microbatches whose compiled step (the largest step kind the run takes)
  fits `memory_budget`; UsageError when even one row per microbatch does not.

  Tries 1 microbatch, then the next count each compile's temporaries
  suggest (they shrink about as 1/k), until one fits."""
  cfg, kind = s.cfg, step_lib.largest_kind(s.cfg)
  budget = memory_budget(cfg)
  choices = _microbatch_choices(cfg)
  tried, k = {}, choices[0]
  while True:
    s_k = _with_microbatches(s, k)
    fn = step_lib.jit_step(s_k, kind)
    compiled = compile_step(s_k, fn)
    need = tried[k] = step_bytes(compiled)
    if need <= budget:
      s_k.steps[kind] = fn
      log.info(
          "grad_accumulation_steps=0 (auto): %d microbatch(es) of %d "
          "rows; the %s step needs %.1f GiB per device of a %.1f GiB "
          "budget (tried %s)",
          k,
          cfg.data.batch_size // k,
          kind,
          need / GiB,
          budget / GiB,
          ", ".join(f"{i}: {b / GiB:.1f} GiB" for i, b in tried.items()),
      )
      return s_k
    bigger = [c for c in choices if c > k]
    if not bigger:
      raise UsageError(
          f"the train step does not fit a device even in {k} microbatches "
          f"(one row each): it needs {need / GiB:.1f} GiB per device, the "
          f"budget is {budget / GiB:.1f} GiB; set model.remat=True, lower "
          "model.L or data.batch_size, or use more devices"
      )
    m = compiled.memory_analysis()
    fixed = need - m.temp_size_in_bytes
    want = k * m.temp_size_in_bytes / max(budget - fixed, 1)
    k = next((c for c in bigger if c >= want), bigger[-1])


def check_step_memory(s: Setup, compiled, kind: str) -> None:
  """UsageError (one line: what, how much, what to change) if a compiled
  step needs more than `memory_budget` per device."""
  need, budget = step_bytes(compiled), memory_budget(s.cfg)
  if need <= budget:
    return
  m, k = s.cfg.model, s.cfg.grad_accumulation_steps
  where = (
      f"mesh.device_memory_gb={s.cfg.mesh.device_memory_gb:g} x "
      f"{budget / (s.cfg.mesh.device_memory_gb * GiB):.2f}"
      if keys.of(s.cfg.mesh, "mesh.device_memory_gb")
      else "a device's memory"
  )
  raise UsageError(
      f"the {kind} train step (D={m.D}, N={m.N}, L={m.L}, batch "
      f"{s.cfg.data.batch_size} in {k} microbatch(es), remat={m.remat}) "
      f"needs {need / GiB:.2f} GiB per device, more than the "
      f"{budget / GiB:.2f} GiB budget ({where}); set "
      "--config.grad_accumulation_steps=0 (auto) or more microbatches, "
      "--config.model.remat=True, or lower model.L or data.batch_size"
  )


def init_state(s: Setup, seed: int) -> TrainState:
  """The first state, placed with `s.state_sharding`."""
  init = _init_fn(s.cfg, _xla_model(s.model), s.tx)
  return jax.jit(
      lambda rng: nn.unbox(init(rng)), out_shardings=s.state_sharding
  )(jax.random.key(seed))


def _bytes_per_device(tree) -> int:
  return sum(
      math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
      for x in jax.tree.leaves(tree)
  )


def device_memory() -> int:
  """Bytes of memory of one local device (CPU: the host's, shared by the
  local devices); the active target's chip's (`targets.active`)."""
  if targets.memory_bytes() is not None:
    return targets.memory_bytes()
  stats = jax.local_devices()[0].memory_stats() or {}
  if "bytes_limit" in stats:
    return int(stats["bytes_limit"])
  host = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
  return host // jax.local_device_count()


def check_memory(cfg, abstract_state) -> None:
  """UsageError if the train state and one gradient (a lower bound on what
  a step holds) exceed a device's memory, saying how much they need."""
  need = _bytes_per_device(abstract_state) + _bytes_per_device(
      abstract_state.params
  )
  have = device_memory()
  if need > have:
    n = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_state.params))
    m = cfg.model
    raise UsageError(
        f"the model (D={m.D}, N={m.N}, L={m.L}, V={m.V}: {n:,} parameters) "
        f"needs at least {need / 2**30:.1f} GiB per device for its "
        f"parameters, gradient and optimizer state, more than the "
        f"{have / 2**30:.1f} GiB a device has; lower model.L, model.D or "
        "model.V, or shard the parameters over more devices (mesh.fsdp)"
    )
