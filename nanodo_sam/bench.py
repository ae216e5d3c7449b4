"""`nanodo-sam bench`: cost of every gradient method, side by side.

For each model size and method this compiles the real train step
(`state.setup` / `state.init_state` / `train.jit_step`, the state donated,
the model's output head passed to the gradient step), feeds it
one synthetic random-token batch of the config's shape (no data pipeline), and
after warm-up measures:

- step time: median, p10 and p90 over timed steps (one host sync per step, so
  it is latency as the train loop sees it at steady state); for `every_k`
  variants one sample is one whole k-step cycle divided by k;
- tokens/s = batch_size * L / median step time;
- model FLOPs per token, the method's factor (its passes) and MFU against
  the device's dense bf16 peak, as `nanodo_sam/flops.py` defines them (the
  training log's progress line uses the same functions); MFU is n/a on CPU;
- compile time (lower + compile of every step kind the variant uses);
- memory: XLA's buffer assignment for the compiled step,
  `argument + output - alias + temp` bytes from `compiled.memory_analysis()`
  (works on every backend, is deterministic, and is the figure to compare
  methods by), plus `device.memory_stats()['peak_bytes_in_use']` where the
  backend has it (a process-wide high-water mark: it only grows across rows);
- ratios of step time (wall clock, and this process's CPU time, which is
  steadier on a machine whose cores are shared) and memory to AdamW's,
  measured in the same run (interleaved on CPU: see `bench_size`).

`--methods=all` is every method in `sam.METHODS` plus `CHEAP_VARIANTS`. A
method spec is `METHOD[:k=K][:reuse]`: `functional_sam:k=5` takes the
Functional-SAM gradient every 5th step and the plain gradient in between
(`sam.every_k`); `:reuse` adds the LookSAM-style correction of the steps in
between (`sam.reuse`).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import platform
import time

import jax
import numpy as np

from nanodo_sam import flops as flops_lib
from nanodo_sam.hlo_cost import memory_bytes  # noqa: F401 (bench.memory_bytes)
from nanodo_sam.flops import method_flops_factor, model_flops_per_token
from nanodo_sam.flops import peak_flops
from nanodo_sam import model as model_lib
from nanodo_sam import sam as sam_lib
from nanodo_sam import sam_schedule
from nanodo_sam import sharding
from nanodo_sam import sizes as sizes_lib
from nanodo_sam import state as state_lib
from nanodo_sam import validation
from nanodo_sam import train as train_lib
from nanodo_sam.errors import UsageError

SIZES = sizes_lib.SIZES

RHO = 0.05  # A method's own options: its registry entry's examples.
CHEAP_VARIANTS = (
    "precond_functional_sam:k=2",
    "precond_functional_sam:k=5",
    "precond_functional_sam:k=5:reuse",
)
WARMUP_STEPS = 2


@dataclasses.dataclass(frozen=True)
class Variant:
  """One benchmarked row: a gradient method and how often it is taken."""

  method: str
  every_k: int = 1
  reuse: bool = False

  @property
  def name(self) -> str:
    return (
        self.method
        + (f":k={self.every_k}" if self.every_k > 1 else "")
        + (":reuse" if self.reuse else "")
    )


def parse_variant(spec: str) -> Variant:
  method, *opts = spec.strip().split(":")
  if method not in sam_lib.METHODS:
    raise UsageError(
        f"--methods: unknown method {method!r}; use 'all' or "
        f"METHOD[:k=K][:reuse] with METHOD in "
        f"{', '.join(sam_lib.METHODS)}"
    )
  every_k, reuse = 1, False
  for opt in opts:
    if opt.startswith("k=") and opt[2:].isdigit() and int(opt[2:]) >= 1:
      every_k = int(opt[2:])
    elif opt == "reuse":
      reuse = True
    else:
      raise UsageError(
          f"--methods: bad option {opt!r} in {spec!r}; use "
          "METHOD[:k=K][:reuse], e.g. functional_sam:k=5:reuse"
      )
  if sam_lib.is_plain(method) and (every_k > 1 or reuse):
    raise UsageError(
        f"--methods: {spec!r}: {method} is the plain gradient; "
        "it takes no :k= or :reuse"
    )
  if reuse and every_k == 1:
    raise UsageError(
        f"--methods: {spec!r}: :reuse needs :k=K with K > 1, "
        "e.g. functional_sam:k=5:reuse"
    )
  return Variant(method, every_k, reuse)


def parse_methods(methods) -> list[Variant]:
  if isinstance(methods, str):
    methods = [m for m in methods.split(",") if m.strip()]
  out = []
  for m in methods or ["all"]:
    if m.strip() == "all":
      out += [Variant(x) for x in sam_lib.METHODS]
      out += [parse_variant(x) for x in CHEAP_VARIANTS]
    else:
      out.append(parse_variant(m))
  seen = set()
  return [v for v in out if not (v in seen or seen.add(v))]


def parse_sizes(sizes) -> list[str]:
  if isinstance(sizes, str):
    sizes = [s.strip() for s in sizes.split(",") if s.strip()]
  for s in sizes:
    if s not in SIZES:
      raise UsageError(
          f"--sizes: unknown size {s!r}; use some of "
          f"{', '.join(SIZES)} (or none for the config's model)"
      )
  return list(sizes)


def _variant_config(cfg, size: str | None, v: Variant):
  c = cfg.copy_and_resolve_references()
  with c.unlocked():
    if size is not None:
      c.model.update(**SIZES[size])
      if "size_name" in c.model:
        c.model.size_name = size
    entry = sam_lib.METHODS[v.method]
    c.sam.method = v.method
    c.sam.rho = RHO if entry.perturbs else 0.0
    for option in sam_lib.all_options().values():
      if option not in entry.options:  # Unset: another method's option.
        c.sam[option.name] = option.default
      elif option.required:
        c.sam[option.name] = option.example
    c.sam.every_k = v.every_k
    c.sam.start_step = 0
    c.sam.end_step = -1
    c.sam.rho_warmup_steps = 0
    c.diagnostics.every_steps = 0
    c.sam.reuse = v.reuse
  return c


def _step_kinds(cfg, k: int) -> list:
  """The step functions' keys for steps 0..k-1 of the schedule."""
  return [sam_schedule.step_kind(cfg.sam, i) for i in range(k)]


def synthetic_batch(cfg, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  B, L, V = cfg.data.batch_size, cfg.model.L, cfg.model.V
  return {
      "inputs": rng.integers(0, V, (B, L), dtype=np.int32),
      "targets": rng.integers(0, V, (B, L), dtype=np.int32),
      "weights": np.ones((B, L), np.float32),
  }


def _device_peak_bytes(device) -> int | None:
  try:
    stats = device.memory_stats()
  except Exception:  # pylint: disable=broad-except
    return None
  return (stats or {}).get("peak_bytes_in_use")


class _Runner:
  """One (size, method) row: its compiled step kinds, state and timings."""

  def __init__(self, cfg, size: str | None, v: Variant):
    self.v, self.size = v, size
    self.cfg = c = _variant_config(cfg, size, v)
    s = state_lib.setup(c)
    self.state = state_lib.init_state(s, c.seed)
    self.batch = sharding.global_batch(synthetic_batch(c), s.mesh)
    self.kinds = _step_kinds(c, v.every_k)
    self.compiled, mems, self.compile_s = {}, [], 0.0
    for kind in dict.fromkeys(self.kinds):
      t0 = time.perf_counter()
      self.compiled[kind] = (
          train_lib.jit_step(s, kind).lower(self.state, self.batch).compile()
      )
      self.compile_s += time.perf_counter() - t0
      mems.append(memory_bytes(self.compiled[kind]))
    self.memory = max(mems, key=lambda m: m.get("total", 0))
    self.times: list[float] = []
    self.cpu_times: list[float] = []
    self.metrics = None

  def cycle(self) -> None:
    """Runs one k-step cycle to completion; records seconds per step (wall
    clock, and this process's CPU time: steadier when others share the
    cores)."""
    t0, c0 = time.perf_counter(), time.process_time()
    for kind in self.kinds:
      self.state, self.metrics = self.compiled[kind](self.state, self.batch)
    jax.block_until_ready((self.state, self.metrics))
    self.times.append((time.perf_counter() - t0) / len(self.kinds))
    self.cpu_times.append((time.process_time() - c0) / len(self.kinds))

  def warm_up(self) -> None:
    for _ in range(WARMUP_STEPS):
      self.cycle()
    self.times, self.cpu_times = [], []

  def samples(self, steps: int) -> int:
    return max(3, math.ceil(steps / self.v.every_k))

  def row(self) -> dict:
    c, m, times = self.cfg, self.cfg.model, self.times
    device = jax.devices()[0]
    median = float(np.median(times))
    tok_s = c.data.batch_size * m.L / median
    flops_tok = model_flops_per_token(m.D, m.N, m.F, m.L, m.V)
    factor = method_flops_factor(self.v.method, self.v.every_k)
    peak = peak_flops(device)
    return {
        "size": self.size or f"D{m.D}-N{m.N}",
        "method": self.v.name,
        "optimizer": c.opt.optimizer,
        "D": m.D,
        "H": m.H,
        "N": m.N,
        "F": m.F,
        "L": m.L,
        "V": m.V,
        "batch_size": c.data.batch_size,
        "dtype": m.dtype,
        "non_embedding_params": model_lib.non_embedding_params(m),
        "step_s_median": median,
        "step_s_p10": float(np.percentile(times, 10)),
        "step_s_p90": float(np.percentile(times, 90)),
        "timed_samples": len(times),
        "cpu_s_median": float(np.median(self.cpu_times)),
        "tokens_per_s": tok_s,
        "model_flops_per_token": flops_tok,
        "method_flops_factor": factor,
        "mfu": flops_lib.mfu(flops_tok * factor, tok_s, 1, peak),
        "compile_s": self.compile_s,
        "memory_bytes": self.memory,
        "device_peak_bytes_in_use": _device_peak_bytes(device),
        "final_loss": float(jax.device_get(self.metrics["loss"])),
    }


def bench_size(
    cfg, size: str | None, variants: list[Variant], steps: int, interleave: bool
) -> list[dict]:
  """Rows for one size. Interleaved (the default on CPU, where other load
  comes and goes): every variant is compiled and warmed up first and the timed
  cycles then go round-robin over the variants, so a slow patch hits all of
  them alike and the ratios stay fair. Otherwise one variant at a time (on an
  accelerator, where holding every variant's state at once may not fit)."""
  rows = []
  if not interleave:
    for v in variants:
      r = _Runner(cfg, size, v)
      r.warm_up()
      for _ in range(r.samples(steps)):
        r.cycle()
      rows.append(r.row())
      print(format_row(rows[-1]), flush=True)
      del r
    return rows
  runners = []
  for v in variants:
    runners.append(_Runner(cfg, size, v))
    runners[-1].warm_up()
  for i in range(max(r.samples(steps) for r in runners)):
    for r in runners:
      if i < r.samples(steps):
        r.cycle()
  for r in runners:
    rows.append(r.row())
    print(format_row(rows[-1]), flush=True)
  return rows


def run(
    cfg,
    sizes,
    methods,
    steps: int = 10,
    out: str | None = "bench.json",
    interleave: bool | None = None,
) -> dict:
  """Benchmarks every (size, method); prints a table, writes JSON to `out`.

  `sizes`: names from `SIZES` (empty: the config's own model); `methods`:
  'all' or specs `METHOD[:k=K][:reuse]` (list or comma-separated string);
  `steps`: timed steps per row; `interleave`: see `bench_size` (default: on
  CPU only).
  """
  sizes = parse_sizes(sizes) or [None]
  variants = parse_methods(methods)
  if steps < 1:
    raise UsageError(f"--steps={steps} must be >= 1")
  for size in sizes:  # Validate every row before any work.
    for v in variants:
      validation.validate(
          _variant_config(cfg, size, v), num_devices=jax.device_count()
      )
  device = jax.devices()[0]
  if interleave is None:
    interleave = device.platform == "cpu"
  rows = []
  for size in sizes:
    rows += bench_size(cfg, size, variants, steps, interleave)
  _add_ratios(rows)
  result = {
      "date": datetime.date.today().isoformat(),
      "hardware": _hardware(device),
      "versions": {"jax": jax.__version__, "python": platform.python_version()},
      "steps": steps,
      "warmup_steps": WARMUP_STEPS,
      "interleaved": interleave,
      "rho": RHO,
      "options": {
          k: v
          for m in sam_lib.METHODS
          for k, v in sam_lib.example_options(m).items()
      },
      "flops_formula": "model_flops_per_token = 6*N_nonembed + 6*V*D + "
      "12*n_layers*L*D; method FLOPs = model FLOPs * "
      "(2*forwards + 4*backwards)/6",
      "memory_formula": "argument + output - alias + temp bytes of "
      "jit(step).lower(state, batch).compile()."
      "memory_analysis()",
      "rows": rows,
  }
  print()
  print(format_table(rows))
  if out:
    with open(out, "w") as f:
      json.dump(result, f, indent=2)
  return result


def _hardware(device) -> dict:
  """The machine a benchmark ran on: platform, device kind and count, CPU
  model, peak FLOP/s."""
  return {
      "platform": device.platform,
      "device_kind": device.device_kind,
      "device_count": jax.device_count(),
      "cpu": _cpu_model(),
      "peak_flops": peak_flops(device),
  }


def _add_ratios(rows: list[dict]) -> None:
  base = {
      r["size"]: r
      for r in rows
      if r["method"] in sam_lib.METHODS and sam_lib.is_plain(r["method"])
  }
  for r in rows:
    b = base.get(r["size"])
    r["time_vs_adamw"] = r["step_s_median"] / b["step_s_median"] if b else None
    r["cpu_time_vs_adamw"] = (
        r["cpu_s_median"] / b["cpu_s_median"] if b else None
    )
    r["memory_vs_adamw"] = (
        r["memory_bytes"].get("total", 0) / b["memory_bytes"]["total"]
        if b and b["memory_bytes"].get("total")
        else None
    )


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor()


def columns(optimizer: str = "adamw") -> tuple[str, ...]:
  """The table's header. The ratios ("x AdamW") are to the plain step of
  the same size, named by its optimizer (`sam.label`)."""
  x = "x " + sam_lib.label(sam_lib.PLAIN, optimizer)
  return (
      "size",
      "method",
      "step ms",
      "p10-p90 ms",
      x,
      "CPU " + x,
      "tokens/s",
      "GFLOP/tok",
      "MFU",
      "compile s",
      "memory MB",
      x,
  )


RATIO_COLUMNS = (4, 5, 11)  # the indices of the ratios in `columns()`


def _cells(r: dict) -> list[str]:
  fmt_ratio = lambda x: "" if x is None else f"{x:.2f}"
  return [
      r["size"],
      r["method"],
      f"{1e3 * r['step_s_median']:.1f}",
      f"{1e3 * r['step_s_p10']:.1f}-{1e3 * r['step_s_p90']:.1f}",
      fmt_ratio(r.get("time_vs_adamw")),
      fmt_ratio(r.get("cpu_time_vs_adamw")),
      f"{r['tokens_per_s']:,.0f}",
      f"{r['model_flops_per_token'] * r['method_flops_factor'] / 1e9:.4f}",
      "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%",
      f"{r['compile_s']:.1f}",
      f"{r['memory_bytes'].get('total', 0) / 2**20:,.1f}",
      fmt_ratio(r.get("memory_vs_adamw")),
  ]


def format_row(r: dict) -> str:
  """One row as `column=value` pairs, without the ratios (not known yet)."""
  cols = columns(r.get("optimizer", "adamw"))
  return "  ".join(
      f"{k}={v}"
      for i, (k, v) in enumerate(zip(cols, _cells(r)))
      if i not in RATIO_COLUMNS
  )


def format_table(rows: list[dict]) -> str:
  """A GitHub markdown table."""
  cols = columns(rows[0].get("optimizer", "adamw") if rows else "adamw")
  lines = [
      "| " + " | ".join(cols) + " |",
      "|" + "|".join("---" for _ in cols) + "|",
  ]
  lines += ["| " + " | ".join(_cells(r)) + " |" for r in rows]
  return "\n".join(lines)
