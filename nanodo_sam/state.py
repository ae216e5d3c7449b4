"""The train state, and everything a config builds to make and place it.

`setup(cfg)` validates the config and builds the model, its logits function
and output head, the optimizer, the mesh and the state's shardings;
`init_state` makes the first state. Both go through one function
(`_init_fn`) that builds a TrainState: traced abstractly with its logical
axes for the shardings, run for real for the values. A state that cannot fit
in a device's memory is refused before anything is allocated.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from nanodo_sam import config as config_lib
from nanodo_sam import model as model_lib
from nanodo_sam import optimizer as optimizer_lib
from nanodo_sam import sam as sam_lib
from nanodo_sam import sharding
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
  tx: optax.GradientTransformation
  mesh: jax.sharding.Mesh
  state_sharding: Any
  abstract_state: Any


def _xla_model(model):
  """`model` with XLA's attention, for what must run on every backend: init
  (the same parameters) and the diagnostics (cuDNN's kernel has no
  forward-mode derivative)."""
  return model_lib.TransformerDo(dataclasses.replace(model.cfg,
                                                     attention="xla"))


def _init_fn(cfg, model, tx):
  """rng -> the first TrainState, its parameters boxed with logical axes."""

  def init(rng):
    init_rng, state_rng = jax.random.split(rng)
    params = model.init(init_rng, jnp.zeros((1, cfg.model.L), jnp.int32))[
        "params"]
    reuse = (sam_lib.reuse_init(params) if cfg.sam.get("reuse", False)
             else None)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=tx.init(params), rng=state_rng, reuse=reuse)

  return init


def setup(cfg) -> Setup:
  """Validates the config and builds model, optimizer, mesh and shardings."""
  config_lib.validate(cfg, num_devices=jax.device_count())
  model = model_lib.TransformerDo(config_lib.model_config(cfg))
  tx = optimizer_lib.make_optimizer(cfg.opt)
  mesh = sharding.make_mesh(cfg.mesh)
  exact = _xla_model(model)
  boxed = jax.eval_shape(_init_fn(cfg, exact, tx), jax.random.key(0))
  state_sharding = sharding.logical_to_sharding(boxed, mesh)
  abstract_state = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      nn.unbox(boxed), state_sharding)
  check_memory(cfg, abstract_state)
  logits_fn = sharding.pin_params(model_lib.make_logits_fn(model),
                                  state_sharding.params)
  head = sharding.pin_head(model_lib.output_head(model),
                           state_sharding.params,
                           sharding.batch_sharding(mesh))
  diagnostics_logits_fn = sharding.pin_params(model_lib.make_logits_fn(exact),
                                              state_sharding.params)
  return Setup(cfg, model, logits_fn, head, diagnostics_logits_fn, tx, mesh,
               state_sharding, abstract_state)


def init_state(s: Setup, seed: int) -> TrainState:
  """The first state, placed with `s.state_sharding`."""
  init = _init_fn(s.cfg, _xla_model(s.model), s.tx)
  return jax.jit(lambda rng: nn.unbox(init(rng)),
                 out_shardings=s.state_sharding)(jax.random.key(seed))


def _bytes_per_device(tree) -> int:
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
             for x in jax.tree.leaves(tree))


def device_memory() -> int:
  """Bytes of memory of one local device (CPU: the host's, shared by the
  local devices)."""
  stats = jax.local_devices()[0].memory_stats() or {}
  if "bytes_limit" in stats:
    return int(stats["bytes_limit"])
  host = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
  return host // jax.local_device_count()


def check_memory(cfg, abstract_state) -> None:
  """UsageError if the train state and one gradient (a lower bound on what
  a step holds) exceed a device's memory, saying how much they need."""
  need = (_bytes_per_device(abstract_state)
          + _bytes_per_device(abstract_state.params))
  have = device_memory()
  if need > have:
    n = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_state.params))
    m = cfg.model
    raise config_lib.UsageError(
        f"the model (D={m.D}, N={m.N}, L={m.L}, V={m.V}: {n:,} parameters) "
        f"needs at least {need / 2**30:.1f} GiB per device for its "
        f"parameters, gradient and optimizer state, more than the "
        f"{have / 2**30:.1f} GiB a device has; lower model.L, model.D or "
        "model.V, or shard the parameters over more devices (mesh.fsdp)")
