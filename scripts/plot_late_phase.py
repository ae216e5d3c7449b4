"""Late-phase SAM: eval loss, lambda_max, tr(H) and compute per switch point.

    python scripts/plot_late_phase.py RUN_DIR [RUN_DIR ...] \
        [--out=late_phase.png] [--table]

Each RUN_DIR (or a folder of them; read with nanodo_sam/runs.py) is a
finished run (config.json, results.json) of the sweep
configs/sweeps/late_phase.py, analysed with `nanodo-sam analyze
--workdir=RUN_DIR` (sharpness.json: lambda_max, hessian_trace, ...; runs
without it get blank sharpness cells). The switch point is sam.start_step as
a fraction of opt.num_train_steps; an AdamW run is the 100% point of every
method. Compute is in AdamW-step equivalents: plain steps count 1, SAM-family
steps 2 (nanodo_sam.sam_schedule.adamw_step_equivalents). Prints one row per
(method, switch point), as Markdown with --table, and writes a 4-panel PNG
(default: COMMON_PARENT/figures/late_phase.png).
"""

from __future__ import annotations

import argparse
import math
import sys

from nanodo_sam import figures
from nanodo_sam import runs as runs_lib
from nanodo_sam.sam_schedule import adamw_step_equivalents

plt = figures.pyplot()

NAN = float("nan")


def load_run(run: runs_lib.RunRecord) -> dict:
  total = int(run.get("opt.num_train_steps"))
  method = run.method
  start = (
      total
      if not runs_lib.perturbs(method)
      else min(int(run.get("sam.start_step", 0)), total)
  )
  if run.get("sam.end_step", -1) >= 0 or run.get("sam.every_k", 1) != 1:
    print(
        f"warning: {run.workdir} uses sam.end_step/every_k; its compute "
        "here assumes SAM from start_step to the end on every step",
        file=sys.stderr,
    )
  sharp = run.sharpness or {}
  return {
      "dir": run.workdir,
      "name": run.name,
      "method": method,
      "rho": run.rho,
      "start_step": start,
      "total": total,
      "switch": start / total,
      "compute": adamw_step_equivalents(total, start, method),
      "final_eval_loss": run.final_eval_loss,
      "status": run.status,
      "wall_seconds": run.wall_seconds,
      "lambda_max": sharp.get("lambda_max", NAN),
      "hessian_trace": sharp.get("hessian_trace", NAN),
      "hessian_trace_stderr": sharp.get("hessian_trace_stderr", NAN),
      "ggn_trace": sharp.get("ggn_trace", NAN),
      "analyze_step": sharp.get("step"),
  }


def series(runs: list[dict]) -> dict[str, list[dict]]:
  """Per SAM-family method, its runs by switch point, AdamW appended as 1.0."""
  adamw = [r for r in runs if r["method"] == "adamw"]
  out = {}
  for m in sorted({r["method"] for r in runs} - {"adamw"}):
    out[m] = sorted(
        [r for r in runs if r["method"] == m] + adamw, key=lambda r: r["switch"]
    )
  if not out and adamw:
    out["adamw"] = adamw
  return out


def plot(runs: list[dict], out: str) -> None:
  panels = (
      ("final_eval_loss", "final eval loss (nats)"),
      ("lambda_max", r"$\lambda_{max}(H)$"),
      ("hessian_trace", "tr(H) (Hutchinson)"),
  )
  fig, axes = plt.subplots(1, 4, figsize=(15, 3.4))
  for i, (m, rs) in enumerate(series(runs).items()):
    color, label = f"C{i}", runs_lib.method_label(m)
    x = [100 * r["switch"] for r in rs]
    for ax, (key, ylabel) in zip(axes, panels):
      y = [r[key] for r in rs]
      if key == "hessian_trace":
        ax.errorbar(
            x,
            y,
            yerr=[r["hessian_trace_stderr"] for r in rs],
            fmt="o-",
            color=color,
            label=label,
            capsize=3,
            ms=4,
        )
      else:
        ax.plot(x, y, "o-", color=color, label=label, ms=4)
      ax.set_xlabel("switch to SAM at (% of training)")
      ax.set_ylabel(ylabel)
    axes[3].plot(
        [r["compute"] for r in rs],
        [r["final_eval_loss"] for r in rs],
        "o-",
        color=color,
        label=label,
        ms=4,
    )
    for r in rs:
      axes[3].annotate(
          f"{100 * r['switch']:g}%",
          (r["compute"], r["final_eval_loss"]),
          fontsize=7,
          textcoords="offset points",
          xytext=(3, 3),
      )
  axes[3].set_xlabel("compute (AdamW-step equivalents)")
  axes[3].set_ylabel("final eval loss (nats)")
  axes[0].legend(fontsize=8)
  for ax in axes:
    ax.grid(alpha=0.3)
    ax.tick_params(labelsize=8)
  fig.suptitle(
      "Late-phase SAM: AdamW, then the SAM-family step from the "
      "switch point to the end (100% = AdamW throughout)",
      fontsize=10,
  )
  figures.save(fig, out, dpi=80)


COLUMNS = (
    ("method", "method"),
    ("rho", "rho"),
    ("switch", "switch"),
    ("start_step", "start_step"),
    ("compute", "AdamW-step equiv."),
    ("final_eval_loss", "final eval loss"),
    ("lambda_max", "lambda_max"),
    ("hessian_trace", "tr(H)"),
    ("hessian_trace_stderr", "tr(H) s.e."),
    ("ggn_trace", "tr(G)"),
    ("status", "status"),
)


def _cell(v) -> str:
  if isinstance(v, float):
    return "" if math.isnan(v) else f"{v:.4g}"
  return str(v)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("run_dirs", nargs="+")
  p.add_argument(
      "--out", default="", help="default: COMMON_PARENT/figures/late_phase.png"
  )
  p.add_argument(
      "--table", action="store_true", help="print the table as Markdown"
  )
  args = p.parse_args(argv)
  runs = [
      load_run(r)
      for r in runs_lib.load_runs(
          args.run_dirs, warn=lambda m: print(m, file=sys.stderr)
      )
      if r.config
  ]
  if not runs:
    p.error("no run directories (with config.json) given")
  rows = sorted(
      runs,
      key=lambda r: (
          not runs_lib.perturbs(r["method"]),
          runs_lib.method_order(r["method"]),
          r["switch"],
      ),
  )
  if args.table:
    print("| " + " | ".join(h for _, h in COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
  for r in rows:
    r = dict(
        r,
        method=runs_lib.method_label(r["method"]),
        switch=f"{100 * r['switch']:g}%",
    )
    cells = [_cell(r[k]) for k, _ in COLUMNS]
    print(
        ("| " + " | ".join(cells) + " |")
        if args.table
        else "  ".join(f"{h}={c}" for (_, h), c in zip(COLUMNS, cells))
    )
  plot(runs, args.out or figures.default_out(args.run_dirs, "late_phase.png"))
  return 0


if __name__ == "__main__":
  sys.exit(main())
