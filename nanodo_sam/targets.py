"""The machines `nanodo-sam plan` compiles for, and the active target.

A target is a real accelerator system whose compiler runs on a CPU-only
host: XLA's TPU compiler in libtpu (the `tpu` extra) for a TPU topology, and
XLA's GPU compiler in the CUDA plugin (the `gpu` extra) for NVIDIA GPUs
described by a GpuTargetConfig (data_files/gpu_specs/, from OpenXLA). Both
come through `jax.experimental.topologies.get_topology_desc`, whose devices
a mesh is made of; jitting on that mesh compiles for the target without any
accelerator present. `cpu-sim-N` is N simulated CPU devices of this host
(`--xla_force_host_platform_device_count`), the mesh the project measured on
before.

`active(target)` makes a target the one that the decisions of a run follow
(`devices`, `platform`, `memory_bytes`): the mesh (`sharding.make_mesh`),
the device count the config is validated against, `model.attention=auto`
(cuDNN on a GPU target), the memory budget and the microbatch fit
(`state.memory_budget`). Without one they follow this host.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import importlib.resources
import importlib.util
import os
import re

from nanodo_sam.errors import UsageError

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Target:
  """One machine: `chips` accelerators over `hosts` hosts."""

  name: str
  platform: str  # "cuda", "tpu" or "cpu"
  chips: int
  hosts: int
  device_kind: str  # What jax.Device.device_kind says on it (flops peaks).
  memory_gib: float  # Per chip (GPUs: read from the spec file instead).
  topology: str = ""  # get_topology_desc's topology (name).
  chip_config: str = ""  # TPU v4: "megacore" (one device a chip, as run).
  gpu_spec: str = ""  # data_files/gpu_specs/ file of a GPU target.
  compute_capability: tuple[int, int] = (0, 0)  # NVIDIA GPUs.
  # The share of a chip's memory XLA gets: JAX preallocates 75% on a GPU
  # (XLA_PYTHON_CLIENT_MEM_FRACTION), and gives XLA the whole HBM on a TPU.
  mem_fraction: float = 1.0
  about: str = ""

  @property
  def extra(self) -> str:
    return {"cuda": "gpu", "tpu": "tpu"}.get(self.platform, "")

  @property
  def memory_bytes(self) -> int:
    """One chip's memory in bytes (a GPU's: its spec's device_memory_size)."""
    if self.gpu_spec:
      m = re.search(r"device_memory_size:\s*(\d+)", gpu_spec_text(self))
      return int(m.group(1))
    return int(self.memory_gib * GiB)


def _gpu(name, chips, hosts, spec, kind, cc, about) -> Target:
  # JAX preallocates 75% of a GPU's memory for XLA by default.
  return Target(
      name,
      "cuda",
      chips,
      hosts,
      kind,
      memory_gib=0,
      topology=f"1x{hosts}x{chips // hosts}",
      gpu_spec=spec,
      compute_capability=cc,
      mem_fraction=0.75,
      about=about,
  )


def _tpu(
    name, chips, hosts, kind, gib, topology, about, chip_config=""
) -> Target:
  return Target(
      name,
      "tpu",
      chips,
      hosts,
      kind,
      gib,
      topology=topology,
      chip_config=chip_config,
      about=about,
  )


_H100, _A100 = "NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB"
# The table: chips, hosts, memory per chip (a GPU's from its spec file) and,
# through device_kind, the dense bf16 peak of `flops.PEAK_FLOPS`. Cloud TPU
# names count TensorCores for v4 and v5p (2 a chip), chips for v5e.
# fmt: off
TARGETS = {t.name: t for t in (
    _gpu("h100x1", 1, 1, "h100_sxm.txtpb", _H100, (9, 0), "one H100 SXM"),
    _gpu("h100x8", 8, 1, "h100_sxm.txtpb", _H100, (9, 0),
         "one host of 8 H100 SXM"),
    _gpu("h100x16", 16, 2, "h100_sxm.txtpb", _H100, (9, 0),
         "two hosts of 8 H100 SXM"),
    _gpu("a100x1", 1, 1, "a100_sxm_80.txtpb", _A100, (8, 0),
         "one A100 SXM 80GB"),
    _gpu("a100x8", 8, 1, "a100_sxm_80.txtpb", _A100, (8, 0),
         "one host of 8 A100 SXM 80GB"),
    _tpu("tpu-v5p-8", 4, 1, "TPU v5p", 95, "v5p:2x2x1", "v5p-8: 4 chips"),
    _tpu("tpu-v5p-16", 8, 2, "TPU v5p", 95, "v5p:2x2x2", "v5p-16: 8 chips"),
    _tpu("tpu-v5p-64", 32, 8, "TPU v5p", 95, "v5p:4x4x2", "v5p-64: 32 chips"),
    _tpu("tpu-v4-32", 16, 4, "TPU v4", 32, "v4:2x2x4", "v4-32: 16 chips",
         chip_config="megacore"),
    _tpu("tpu-v5e-16", 16, 4, "TPU v5 lite", 16, "v5e:4x4",
         "v5litepod-16: 16 chips"),
)}
# fmt: on
_CPU_SIM = re.compile(r"cpu-sim-([1-9][0-9]*)$")


def get(name: str) -> Target:
  """The target called `name` (`cpu-sim-N` for any N); UsageError listing
  the known ones otherwise."""
  if name in TARGETS:
    return TARGETS[name]
  m = _CPU_SIM.match(name)
  if m:
    return Target(
        name,
        "cpu",
        chips=int(m.group(1)),
        hosts=1,
        device_kind="cpu",
        memory_gib=0,
        about=f"{m.group(1)} simulated CPU devices of this host",
    )
  raise UsageError(
      f"unknown target {name!r}; known targets: "
      f"{', '.join(TARGETS)}, cpu-sim-N (e.g. cpu-sim-8)"
  )


def gpu_spec_text(t: Target) -> str:
  """The GpuTargetConfig text of a GPU target (data_files/gpu_specs/)."""
  path = (
      importlib.resources.files("nanodo_sam")
      / "data_files"
      / "gpu_specs"
      / t.gpu_spec
  )
  return path.read_text()


def check_installed(t: Target) -> None:
  """UsageError naming the extra to install when `t`'s compiler is not."""
  module = {"cuda": "jax_plugins.xla_cuda12", "tpu": "libtpu"}.get(t.platform)
  if module is None:
    return
  try:
    found = importlib.util.find_spec(module) is not None
  except ModuleNotFoundError:
    found = False
  if not found:
    raise UsageError(
        f"target {t.name} needs the {t.platform.upper()} compiler, which is "
        f"not installed; pip install -e '.[{t.extra}]' (then JAX_PLATFORMS="
        "cpu keeps ordinary runs on the CPU)"
    )


@functools.lru_cache(maxsize=None)
def _topology_devices(name: str) -> tuple:
  """The devices of `name`'s topology (compile-only: nothing runs on them)."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top

  t = get(name)
  if t.platform == "tpu":
    # Without a TPU VM around, libtpu looks for one (its metadata server,
    # worker names) and writes warnings; these say there is none.
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", t.name[len("tpu-") :])
    # Only compiling: no chip to guard, so two plans (or a plan and the
    # tests) may load libtpu at once, which its lockfile would refuse.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    kw = {"chip_config_name": t.chip_config} if t.chip_config else {}
    desc = topologies.get_topology_desc(
        topology_name=t.topology, platform="tpu", **kw
    )
  else:
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
    desc = topologies.get_topology_desc(
        platform="cuda", topology=t.topology, target_config=gpu_spec_text(t)
    )
  devices = tuple(desc.devices)
  if len(devices) != t.chips:
    raise RuntimeError(
        f"topology {t.topology} of {name} has {len(devices)} "
        f"devices, not {t.chips}"
    )
  return devices


_ACTIVE: contextvars.ContextVar[Target | None] = contextvars.ContextVar(
    "nanodo_sam_target", default=None
)


@contextlib.contextmanager
def active(t: Target | None):
  """Within it, a run's decisions follow `t` (None: this host)."""
  token = _ACTIVE.set(t)
  try:
    yield t
  finally:
    _ACTIVE.reset(token)


def current() -> Target | None:
  """The active target, or None (decisions follow this host)."""
  return _ACTIVE.get()


def devices() -> list:
  """The devices a mesh is made of: the active target's (its topology's,
  or this host's first N CPUs for cpu-sim-N), else `jax.devices()`."""
  import jax  # pylint: disable=g-import-not-at-top

  t = current()
  if t is None:
    return jax.devices()
  if t.platform == "cpu":
    cpus = jax.devices("cpu")
    if len(cpus) < t.chips:
      raise UsageError(
          f"target {t.name} needs {t.chips} CPU devices, this process has "
          f"{len(cpus)}; set XLA_FLAGS=--xla_force_host_platform_device_"
          f"count={t.chips} before JAX starts (`nanodo-sam plan` does)"
      )
    return cpus[: t.chips]
  return list(_topology_devices(t.name))


def platform() -> str:
  """'gpu', 'tpu' or 'cpu': the active target's, else JAX's backend."""
  import jax  # pylint: disable=g-import-not-at-top

  t = current()
  if t is None:
    return jax.default_backend()
  return "gpu" if t.platform == "cuda" else t.platform


def compute_capability() -> tuple[int, int] | None:
  """The active GPU target's compute capability (None: no GPU target)."""
  t = current()
  return (
      t.compute_capability if t is not None and t.platform == "cuda" else None
  )


def memory_bytes() -> int | None:
  """One chip's memory on the active target (None: no target, or cpu-sim,
  whose devices share this host's memory)."""
  t = current()
  return None if t is None or t.platform == "cpu" else t.memory_bytes
