"""Device mesh, logical-axis rules and multi-process start-up.

The mesh has axes (data, fsdp, tensor). Parameters carry logical axis names
(model.py); `RULES` maps them to mesh axes: FSDP shards weights and AdamW
state along `fsdp`, tensor parallelism splits heads and the MLP hidden width
along `tensor`, and the batch is split over data x fsdp.
"""

from __future__ import annotations

import os

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from nanodo_sam.config import UsageError

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
RULES = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("kv", None),
    ("norm", None),
)


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, int, int]:
  """(data, fsdp, tensor) with at most one -1 filled from the device count."""
  sizes = [int(mesh_cfg[a]) for a in AXES]
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise UsageError(f"mesh {dict(zip(AXES, sizes))}: sizes must be positive,"
                     " with at most one -1 (fill the rest)")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if num_devices % known:
      raise UsageError(f"mesh {dict(zip(AXES, sizes))} cannot fill "
                       f"{num_devices} devices; make the fixed axes divide it")
    sizes[sizes.index(-1)] = num_devices // known
  if int(np.prod(sizes)) != num_devices:
    raise UsageError(f"mesh {dict(zip(AXES, sizes))} multiplies to "
                     f"{int(np.prod(sizes))}, but there are {num_devices} "
                     "devices; set --config.mesh.* so the product matches")
  return tuple(sizes)


def validate(cfg, num_devices: int) -> None:
  data, fsdp, tensor = mesh_shape(cfg.mesh, num_devices)
  per_step = data * fsdp * cfg.grad_accumulation_steps
  if cfg.data.batch_size % per_step:
    raise UsageError(
        f"data.batch_size={cfg.data.batch_size} is not divisible by "
        f"data x fsdp x grad_accumulation_steps = {data}x{fsdp}x"
        f"{cfg.grad_accumulation_steps}; choose a multiple of {per_step}")
  if cfg.data.eval_batch_size % (data * fsdp):
    raise UsageError(f"data.eval_batch_size={cfg.data.eval_batch_size} is "
                     f"not divisible by data x fsdp = {data * fsdp}")
  if cfg.model.H % tensor:
    raise UsageError(f"model.H={cfg.model.H} heads are not divisible by "
                     f"mesh.tensor={tensor}")
  if cfg.model.F % tensor:
    raise UsageError(f"model.F={cfg.model.F} is not divisible by "
                     f"mesh.tensor={tensor}")


def make_mesh(mesh_cfg, devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(mesh_cfg, len(devices))
  try:
    grid = mesh_utils.create_device_mesh(shape, devices=devices)
  except (AssertionError, NotImplementedError, ValueError):
    grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, AXES)


def logical_to_sharding(logical_tree, mesh: Mesh):
  """Tree of logical PartitionSpecs (or boxed values) -> NamedShardings."""
  specs = nn.get_partition_spec(logical_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, RULES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch(host_batch: dict, mesh: Mesh) -> dict:
  """This process's slice of the batch -> globally sharded jax.Arrays."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v)
          for k, v in host_batch.items()}


def maybe_initialize_distributed(coordinator_address: str = "",
                                 num_processes: int = 0,
                                 process_id: int = -1) -> None:
  """Starts jax.distributed for multi-process runs.

  Explicit flags win; otherwise SLURM (several tasks), TPU VM pods and
  clusters that set JAX_COORDINATOR_ADDRESS are detected by JAX itself.
  """
  if coordinator_address:
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes,
                               process_id=process_id)
    return
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1 or os.environ.get(
      "JAX_COORDINATOR_ADDRESS") or os.environ.get("TPU_WORKER_HOSTNAMES",
                                                   "").count(",") > 0:
    jax.distributed.initialize()
