"""`nanodo-sam plan`: a run's own steps compiled for a target machine by its
real compiler (`targets`), read back per chip, before any accelerator is
booked.

`plan(cfg, target)` builds the run exactly as training would
(`state.setup`, the target active: the mesh of its devices, attention
`auto` resolved for its platform, the memory budget and the microbatch fit
from its memory), compiles every step kind the run takes
(`sam_schedule.step_kind` over its steps) and, when the run's diagnostics
are on, the function `analyze` jits, and reports per chip:

- memory: XLA's buffer assignment against the budget and the chip's memory;
- the microbatches grad_accumulation_steps=0 resolved to for the target;
- collective bytes per step by kind and dtype, weighted by loop trip counts
  (`hlo_cost`), and their ratio to the float32 parameter bytes;
- the attention kernel (cuDNN or XLA, and why), and the cuDNN attention
  calls found in the compiled program;
- matmul FLOPs with loop trip counts (`hlo_cost.matmul_flops`);
- an estimated step time where the compiler gives one: the TPU cost
  analysis's `optimal_seconds`, which counts a loop body once, scaled by
  the ratio of the loop-weighted matmul FLOPs to the FLOPs the cost
  analysis counted; and the MFU it implies (`flops.step_flops_per_token`).
  An estimate from the compiler's model, not a measurement.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from nanodo_sam import diagnostics
from nanodo_sam import flops as flops_lib
from nanodo_sam import hlo_cost
from nanodo_sam import model as model_lib
from nanodo_sam import sam_schedule
from nanodo_sam import state as state_lib
from nanodo_sam import step as step_lib
from nanodo_sam import targets
from nanodo_sam.errors import UsageError

GiB = 2**30
# The cuDNN fused attention custom calls (forward and backward).
CUDNN_ATTENTION = "__cudnn$fmha"


def step_kinds(cfg) -> list[str]:
  """The step kinds (`sam_schedule.step_kind`) a run takes over its steps,
  in the order they first come."""
  kinds = []
  for step in range(int(cfg.opt.num_train_steps)):
    kind = sam_schedule.step_kind(cfg.sam, step)
    if kind not in kinds:
      kinds.append(kind)
      if len(kinds) == 3:
        break
  return kinds or [step_lib.largest_kind(cfg)]


def param_bytes_f32(s) -> int:
  return sum(x.size * 4 for x in jax.tree.leaves(s.abstract_state.params))


def read_compiled(compiled, pb: int, t: targets.Target) -> dict:
  """What a compiled program costs per chip: memory, loop-weighted
  collectives (by kind and by dtype) and matmul FLOPs, cuDNN attention
  calls, and the compiler's time estimate where it gives one."""
  text = compiled.as_text()
  out = hlo_cost.summary(compiled)
  out["collective_bytes_by_dtype"] = hlo_cost.collective_bytes_by_dtype(text)
  out["collective_ratio"] = out["collective_bytes"]["total"] / pb
  out["cudnn_attention_calls"] = text.count(
      f'custom_call_target="{CUDNN_ATTENTION}'
  )
  out["matmul_flops_counted_once"] = hlo_cost.matmul_flops(
      text, loop_weighted=False
  )
  out["cost_analysis"] = _cost_analysis(compiled)
  out["estimate"] = estimate_seconds(out, t)
  return out


def _cost_analysis(compiled) -> dict:
  """The compiler's own cost figures (TPU: optimal_seconds), or {} where
  the backend has none (some raise rather than return nothing)."""
  try:
    ca = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return {}
  if isinstance(ca, (list, tuple)):
    ca = ca[0] if ca else {}
  keep = ("flops", "bytes accessed", "optimal_seconds", "utilization")
  return {
      k: float(v)
      for k, v in (ca or {}).items()
      if k in keep and isinstance(v, (int, float))
  }


def estimate_seconds(out: dict, t: targets.Target) -> dict:
  """The step time the compiler's cost model gives (TPU:
  `optimal_seconds`), corrected for loops: its cost analysis counts a loop
  body once, so it is scaled by the matmul FLOPs weighted by the loops'
  trip counts over the same FLOPs counted once (`loop_scale`). Also the time
  the matmuls alone take at the chip's peak (a lower bound). Estimates."""
  est = {}
  peak = flops_lib.peak_flops(t)
  if peak:
    est["matmul_at_peak_s"] = out["matmul_flops"] / peak
  optimal = out["cost_analysis"].get("optimal_seconds", 0)
  if optimal > 0 and out["matmul_flops_counted_once"] > 0:
    scale = out["matmul_flops"] / out["matmul_flops_counted_once"]
    est.update(
        compiler_optimal_s=optimal, loop_scale=scale, step_s=optimal * scale
    )
  return est


def attention_choice(s) -> dict:
  """The attention kernel the run's model uses on the active target, and
  why (cuDNN flash attention's conditions, `model.cudnn_unsupported`)."""
  cfg = s.model.cfg
  impl = model_lib.attention_implementation(cfg)
  why = model_lib.cudnn_unsupported(cfg)
  return {
      "setting": cfg.attention,
      "kernel": impl,
      "why": (
          why or "cuDNN flash attention can run it"
          if cfg.attention != "xla"
          else "model.attention=xla"
      ),
  }


def _compile_kind(s, kind: str, t, pb: int) -> dict:
  t0 = time.time()
  compiled = state_lib.compile_step(s, step_lib.jit_step(s, kind))
  return {
      "what": f"{kind} step",
      **read_compiled(compiled, pb, t),
      "compile_s": round(time.time() - t0, 1),
  }


def _compile_analyze(s, t, pb: int) -> dict:
  """The function `nanodo-sam analyze` and the diagnostics hook jit."""
  cfg = s.cfg
  t0 = time.time()
  rows = cfg.diagnostics.batch_size * cfg.diagnostics.num_batches
  scalar = jax.ShapeDtypeStruct((), jnp.float32)
  compiled = (
      jax.jit(diagnostics.sharpness_fn(cfg, s))
      .lower(
          s.abstract_state,
          state_lib.abstract_batch(s, rows),
          scalar,
          scalar,
          jax.random.key(0),
      )
      .compile()
  )
  return {
      "what": "analyze",
      **read_compiled(compiled, pb, t),
      "compile_s": round(time.time() - t0, 1),
  }


def plan(cfg, t: targets.Target) -> dict:
  """The report of `nanodo-sam plan` for config `cfg` on target `t`.
  UsageError when the run cannot fit the target (what to change)."""
  targets.check_installed(t)
  t0 = time.time()
  with targets.active(t):
    s = state_lib.setup(cfg)
    pb = param_bytes_f32(s)
    programs = [_compile_kind(s, k, t, pb) for k in step_kinds(s.cfg)]
    if s.cfg.diagnostics.every_steps:
      programs.append(_compile_analyze(s, t, pb))
    budget = state_lib.memory_budget(s.cfg)
    for p in programs:  # The diagnostics must fit as well as the steps.
      _check_fits(s, p, budget)
    attention = attention_choice(s)
  m = s.cfg.model
  tokens = s.cfg.data.batch_size * m.L
  return {
      "target": _target_row(t),
      "config": _config_row(s.cfg),
      "microbatches": s.cfg.grad_accumulation_steps,
      "budget_bytes": budget,
      "param_bytes_f32": pb,
      "attention": attention,
      "tokens_per_step": tokens,
      "model_flops_per_step": flops_lib.step_flops_per_token(s.cfg) * tokens,
      "programs": [_with_mfu(p, s.cfg, t, tokens) for p in programs],
      "plan_s": round(time.time() - t0, 1),
  }


def _check_fits(s, program: dict, budget: int) -> None:
  need = program["memory_bytes"].get("total", 0)
  if need > budget:
    raise UsageError(
        f"the {program['what']} does not fit the target: it needs "
        f"{_size(need)} per chip, more than the {_size(budget)} budget; set "
        "--config.grad_accumulation_steps=0 (auto), --config.model.remat="
        "True, lower model.L or data.batch_size, or pick a larger target"
    )


def _size(b: float) -> str:
  return f"{b / GiB:.2f} GiB" if b >= GiB / 10 else f"{b / 2**20:.1f} MiB"


def _with_mfu(p: dict, cfg, t, tokens: int) -> dict:
  """`p` with the MFU its estimated step time implies (steps only)."""
  step_s = p["estimate"].get("step_s")
  peak = flops_lib.peak_flops(t)
  if step_s and peak and p["what"].endswith("step"):
    kind = p["what"].split()[0]
    method = step_lib.kind_args(cfg, kind)[0]
    per_token = flops_lib.model_flops_per_token(
        cfg.model.D, cfg.model.N, cfg.model.F, cfg.model.L, cfg.model.V
    ) * flops_lib.method_flops_factor(method)
    p["estimate"]["mfu"] = per_token * tokens / (t.chips * peak * step_s)
  return p


def _target_row(t: targets.Target) -> dict:
  return {
      "name": t.name,
      "platform": t.platform,
      "chips": t.chips,
      "hosts": t.hosts,
      "device_kind": t.device_kind,
      "memory_bytes": (None if t.platform == "cpu" else t.memory_bytes),
      "peak_flops": flops_lib.peak_flops(t),
      "about": t.about,
  }


def _config_row(cfg) -> dict:
  m = cfg.model
  return {
      "D": m.D,
      "N": m.N,
      "H": m.H,
      "F": m.F,
      "L": m.L,
      "V": m.V,
      "dtype": m.dtype,
      "remat": bool(m.remat),
      "batch_size": cfg.data.batch_size,
      "method": cfg.sam.method,
      "mesh": {k: cfg.mesh[k] for k in ("data", "fsdp", "tensor")},
  }


def _collective_line(p: dict) -> str:
  """'all-gather 1.20 GiB (bf16 1.18 GiB, f32 20.0 MiB); ...' of a
  program."""
  parts = []
  for kind, by in sorted(p["collective_bytes_by_dtype"].items()):
    dtypes = ", ".join(
        f"{d} {_size(b)}" for d, b in sorted(by.items(), key=lambda kv: -kv[1])
    )
    parts.append(f"{kind} {_size(sum(by.values()))} ({dtypes})")
  return "; ".join(parts) or "none"


def _estimate_line(p: dict) -> str:
  est = p["estimate"]
  if "step_s" in est:
    mfu = f", MFU {est['mfu']:.0%}" if "mfu" in est else ""
    return (
        f"{est['step_s'] * 1e3:.1f} ms (estimate: the TPU compiler's "
        f"optimal_seconds {est['compiler_optimal_s'] * 1e3:.1f} ms x "
        f"loop scale {est['loop_scale']:.2f}){mfu}"
    )
  if "matmul_at_peak_s" in est:
    return (
        f"no compiler estimate on this platform; the matmuls alone take "
        f"{est['matmul_at_peak_s'] * 1e3:.1f} ms at the chip's peak "
        "(a lower bound)"
    )
  return "no estimate (no peak FLOP/s known for this target)"


def format_report(r: dict) -> str:
  """The plan as text, per chip."""
  t, c, a = r["target"], r["config"], r["attention"]
  mem = t["memory_bytes"]
  lines = [
      f"target {t['name']}: {t['about']} ({t['chips']} chips, {t['hosts']} "
      f"host(s), {t['device_kind']}"
      + (f", {_size(mem)} each" if mem else "")
      + ")",
      f"run: D={c['D']} N={c['N']} L={c['L']} V={c['V']} {c['dtype']}, "
      f"{c['method']}, batch {c['batch_size']} in {r['microbatches']} "
      f"microbatch(es), remat={c['remat']}; parameters "
      f"{_size(r['param_bytes_f32'])} in float32",
      f"attention: {a['kernel']} (model.attention={a['setting']}: "
      f"{a['why']})",
      f"memory budget per chip: {_size(r['budget_bytes'])}",
  ]
  for p in r["programs"]:
    m = p["memory_bytes"]
    lines += [
        f"{p['what']} (compiled in {p['compile_s']:.0f} s):",
        f"  memory per chip {_size(m['total'])} (arguments "
        f"{_size(m['argument'])}, temporaries {_size(m['temp'])})"
        + (f", {m['total'] / mem:.0%} of the chip" if mem else ""),
        f"  collectives per step {_size(p['collective_bytes']['total'])} = "
        f"{p['collective_ratio']:.2f} x float32 parameters: "
        f"{_collective_line(p)}",
        f"  matmul {p['matmul_flops'] / 1e12:.2f} TFLOP per chip (loops "
        f"weighted); cuDNN attention calls: {p['cudnn_attention_calls']}",
        f"  step time: {_estimate_line(p)}",
    ]
  return "\n".join(lines)
