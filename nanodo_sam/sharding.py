"""Device mesh, logical-axis rules and multi-process start-up.

The mesh has axes (data, fsdp, tensor). Parameters carry logical axis names
(model.py); `RULES` maps them to mesh axes: FSDP shards weights and AdamW
state along `fsdp`, tensor parallelism splits heads and the MLP hidden width
along `tensor`, and the batch is split over data x fsdp.
"""

from __future__ import annotations

import logging
import os

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from nanodo_sam import targets
from nanodo_sam.errors import UsageError

log = logging.getLogger("nanodo_sam")

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
    raise UsageError(
        f"mesh {dict(zip(AXES, sizes))}: sizes must be positive,"
        " with at most one -1 (fill the rest)"
    )
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if num_devices % known:
      raise UsageError(
          f"mesh {dict(zip(AXES, sizes))} cannot fill "
          f"{num_devices} devices; make the fixed axes divide it"
      )
    sizes[sizes.index(-1)] = num_devices // known
  if int(np.prod(sizes)) != num_devices:
    raise UsageError(
        f"mesh {dict(zip(AXES, sizes))} multiplies to "
        f"{int(np.prod(sizes))}, but there are {num_devices} "
        "devices; set --config.mesh.* so the product matches"
    )
  return tuple(sizes)


def validate(cfg, num_devices: int, num_processes: int | None = None) -> None:
  """Mesh, batch and model shapes fit together (UsageError otherwise)."""
  data, fsdp, tensor = mesh_shape(cfg.mesh, num_devices)
  num_processes = (
      jax.process_count() if num_processes is None else num_processes
  )
  if (data * fsdp) % num_processes:
    raise UsageError(
        f"mesh data x fsdp = {data}x{fsdp} is not a multiple of the "
        f"{num_processes} processes; each process feeds its own rows of the "
        "batch, so put the cross-process axes in mesh.data or mesh.fsdp"
    )
  micro = max(cfg.grad_accumulation_steps, 1)  # 0: auto (state.setup).
  per_step = data * fsdp * micro
  if cfg.data.batch_size % per_step:
    raise UsageError(
        f"data.batch_size={cfg.data.batch_size} is not divisible by "
        f"data x fsdp x grad_accumulation_steps = {data}x{fsdp}x"
        f"{micro}; choose a multiple of {per_step}"
    )
  if cfg.data.eval_batch_size % (data * fsdp):
    raise UsageError(
        f"data.eval_batch_size={cfg.data.eval_batch_size} is "
        f"not divisible by data x fsdp = {data * fsdp}"
    )
  if cfg.model.H % tensor:
    raise UsageError(
        f"model.H={cfg.model.H} heads are not divisible by "
        f"mesh.tensor={tensor}"
    )
  if cfg.model.F % tensor:
    raise UsageError(
        f"model.F={cfg.model.F} is not divisible by " f"mesh.tensor={tensor}"
    )


def make_mesh(mesh_cfg, devices=None) -> Mesh:
  """The (data, fsdp, tensor) mesh over `devices` (default: the active
  target's, `targets.devices`, else this host's)."""
  devices = targets.devices() if devices is None else devices
  shape = mesh_shape(mesh_cfg, len(devices))
  try:
    grid = mesh_utils.create_device_mesh(shape, devices=devices)
  except (AssertionError, NotImplementedError, ValueError):
    grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, AXES)


def fit_spec(spec: P, shape, mesh: Mesh) -> P:
  """`spec` without the mesh axes that do not divide their array dimension.

  A dimension split over mesh axes (a, b, ...) keeps the longest prefix whose
  sizes multiply to a divisor of it; the rest of it is replicated. So an odd
  vocabulary (V=32101) stays whole along `tensor` while still split along
  `fsdp` by its embedding dimension.
  """
  out = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    if axes is None:
      out.append(None)
      continue
    names = (axes,) if isinstance(axes, str) else tuple(axes)
    kept, size = [], 1
    for name in names:
      if dim % (size * mesh.shape[name]):
        break
      kept.append(name)
      size *= mesh.shape[name]
    if len(kept) == len(names):
      out.append(axes)
    else:
      out.append(tuple(kept) if len(kept) > 1 else (kept[0] if kept else None))
  while out and out[-1] is None:
    out.pop()
  return P(*out)


def logical_to_sharding(boxed_tree, mesh: Mesh):
  """Tree of boxed (nn.LogicallyPartitioned) abstract values -> NamedShardings.

  Logical names go through `RULES`; a mesh axis that does not divide its
  dimension is dropped for that array (see `fit_spec`). Unboxed leaves (step,
  rng, optimizer counts) are replicated.
  """

  def one(x):
    if isinstance(x, nn.meta.AxisMetadata):
      spec = nn.logical_to_mesh_axes(x.get_partition_spec(), RULES)
      shape = nn.meta.unbox(x).shape
      fitted = fit_spec(spec, shape, mesh)
      if fitted != fit_spec(spec, (0,) * len(shape), mesh):
        log.info(
            "%s %s: not every mesh axis divides it; sharded as %s "
            "instead of %s",
            x.names,
            shape,
            fitted,
            spec,
        )
      return NamedSharding(mesh, fitted)
    return NamedSharding(mesh, P())

  return jax.tree.map(
      one, boxed_tree, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata)
  )


def pin_params(fn, params_sharding, cast=None):
  """`fn(params, *args)` whose parameters (and, by transposition, their
  gradients) are constrained to `params_sharding`.

  XLA's propagation alone returns some gradients replicated (weights whose
  fsdp dimension is the output one: attn_out, fc2, pos_embed), and with them
  the SAM perturbation eps and theta + eps: a full copy per device that
  defeats FSDP. Pinned here, every gradient the step family takes (clean,
  perturbed, functional, logit) is reduce-scattered into the parameters'
  layout and theta + eps stays sharded like theta.

  `cast` (optional, params -> params): the casts to the compute dtype the
  model applies anyway (`model.compute_params`), done here on each device's
  shard, so FSDP gathers the weights in the compute dtype (bf16: half the
  bytes of float32) and their gradients leave in it; the values are those
  the model computes with either way. params_sharding=None: only the cast.
  """

  pin = (
      (lambda p: p)
      if params_sharding is None
      else (lambda p: jax.lax.with_sharding_constraint(p, params_sharding))
  )

  def pinned(params, *args):
    params = pin(params)
    if cast is not None:
      params = pin(cast(params))
    return fn(params, *args)

  return pinned


def pin_head(head, params_sharding, batch_sharding=None, cast=None):
  """An output head (loss.OutputHead) whose `features` and `select` see the
  parameters pinned like `pin_params`'s (`features` cast by `cast` too), so
  the chunked step keeps them too; with `batch_sharding`
  (`batch_sharding(mesh)`) the step also keeps each chunk of the sequence
  split by rows over the mesh (`sam.head_vjp`)."""
  return head._replace(
      features=pin_params(head.features, params_sharding, cast),
      select=pin_params(head.select, params_sharding),
      batch_sharding=batch_sharding,
  )


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch(host_batch: dict, mesh: Mesh) -> dict:
  """This process's slice of the batch -> globally sharded jax.Arrays."""
  sharding = batch_sharding(mesh)
  return {
      k: jax.make_array_from_process_local_data(sharding, v)
      for k, v in host_batch.items()
  }


def _cluster_detected() -> bool:
  """Whether JAX's own cluster detection should start jax.distributed: SLURM
  with several tasks, a Cloud TPU VM (a pod slice's workers find each other
  through the metadata server), GKE TPU pods, or an explicit
  JAX_COORDINATOR_ADDRESS."""
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
    return True
  if os.environ.get("JAX_COORDINATOR_ADDRESS"):
    return True
  if any(
      os.environ.get(k, "").count(",") > 0
      for k in ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES")
  ):
    return True
  try:
    from jax._src import cloud_tpu_init  # Set when `import jax` found a TPU.
  except ImportError:
    return False
  return bool(getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False))


def maybe_initialize_distributed(
    coordinator_address: str = "", num_processes: int = 0, process_id: int = -1
) -> None:
  """Starts jax.distributed for multi-process runs (call before any JAX work).

  Explicit flags win; otherwise JAX detects the cluster itself
  (`_cluster_detected`). Under SLURM, JAX gives each task one local device
  (SLURM_LOCALID): launch one task per GPU. A second call is a no-op. CPU
  processes talk through gloo.
  """
  if coordinator_address and (
      num_processes < 1 or not 0 <= process_id < num_processes
  ):
    raise UsageError(
        f"--coordinator_address={coordinator_address} needs --num_processes="
        f"N >= 1 and --process_id in [0, N) (got {num_processes}, "
        f"{process_id})"
    )
  initialized = getattr(jax.distributed, "is_initialized", lambda: False)()
  if initialized or not (coordinator_address or _cluster_detected()):
    return
  if jax.config.jax_cpu_collectives_implementation is None:
    # Older JAX had no CPU collectives by default; multi-process CPU runs
    # (tests, debugging) need them. Newer JAX defaults to gloo already.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if coordinator_address:
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
    )
  else:
    jax.distributed.initialize()
  log.info(
      "jax.distributed: process %d of %d, %d local / %d global devices",
      jax.process_index(),
      jax.process_count(),
      jax.local_device_count(),
      jax.device_count(),
  )
