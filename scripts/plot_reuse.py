"""The cheap variants: eval loss against cost for every_k with and without reuse.

    python scripts/plot_reuse.py RUN_DIR [RUN_DIR ...] [--bench=bench.json] \
        [--out=reuse.png] [--table]

Each RUN_DIR (or a folder of them; read with nanodo_sam/runs.py) is a
finished run (config.json, results.json), e.g. of configs/sweeps/reuse.py. Runs are grouped by (method, sam.every_k, sam.reuse)
and averaged over seeds. Cost is the compute per step relative to AdamW's
(`flops.method_flops_factor`: a full SAM-family step 2, a plain or reuse step
1, so every_k = k costs 1 + 1/k) and, with --bench, the step time relative to
AdamW that `nanodo-sam bench` measured for the same variant (its name, e.g.
`precond_functional_sam:k=5:reuse`). Prints one row per variant, as Markdown
with --table, and writes eval loss against cost as a PNG (default:
COMMON_PARENT/figures/reuse.png).
"""

from __future__ import annotations

import argparse
import json
import math
import sys

from nanodo_sam import figures
from nanodo_sam import runs as runs_lib
from nanodo_sam.flops import method_flops_factor


def load_run(run: runs_lib.RunRecord) -> dict:
  method = run.method
  k = int(run.get("sam.every_k", 1)) if runs_lib.perturbs(method) else 1
  reuse = bool(run.get("sam.reuse", False)) and k > 1
  name = method + (f":k={k}" if k > 1 else "") + (":reuse" if reuse else "")
  return {
      "name": name,
      "method": method,
      "k": k,
      "reuse": reuse,
      "seed": run.seed,
      "status": run.status,
      "final_eval_loss": run.final_eval_loss,
      "cost": method_flops_factor(method, k),
  }


def variants(runs: list[dict], bench: dict[str, float]) -> list[dict]:
  """One row per variant: seeds' final eval losses, their mean, the cost."""
  out = {}
  for r in runs:
    v = out.setdefault(r["name"], {**r, "losses": {}})
    v["losses"][r["seed"]] = r["final_eval_loss"]
  rows = sorted(
      out.values(), key=lambda v: (v["method"] != "adamw", v["k"], v["reuse"])
  )
  base = next((v for v in rows if v["method"] == "adamw"), None)
  for v in rows:
    v["mean"] = sum(v["losses"].values()) / len(v["losses"])
    v["delta"] = v["mean"] - base["mean"] if base else math.nan
    v["time_vs_adamw"] = bench.get(v["name"], math.nan)
  return rows


def read_bench(path: str) -> dict[str, float]:
  if not path:
    return {}
  with open(path) as f:
    return {r["method"]: r["time_vs_adamw"] for r in json.load(f)["rows"]}


def table(rows: list[dict]) -> str:
  seeds = sorted({s for v in rows for s in v["losses"]})
  head = (
      ["variant", "k", "reuse", "compute x AdamW", "time x AdamW"]
      + [f"eval loss seed {s}" for s in seeds]
      + ["mean", "mean - AdamW"]
  )
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  fmt = lambda x, f: "" if x is None or math.isnan(x) else format(x, f)
  for v in rows:
    cells = [
        v["name"],
        str(v["k"]),
        "yes" if v["reuse"] else "",
        fmt(v["cost"], ".2f"),
        fmt(v["time_vs_adamw"], ".2f"),
    ]
    cells += [fmt(v["losses"].get(s, math.nan), ".4f") for s in seeds]
    cells += [fmt(v["mean"], ".4f"), fmt(v["delta"], "+.4f")]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def plot(rows: list[dict], out: str) -> None:
  plt = figures.pyplot()
  fig, ax = plt.subplots(figsize=(5.5, 4))
  full = [v for v in rows if v["method"] != "adamw" and v["k"] == 1]
  for reuse, label, style in (
      (False, "every_k (plain steps between)", "o-"),
      (True, "every_k + reuse", "s-"),
  ):
    line = sorted(
        full + [v for v in rows if v["k"] > 1 and v["reuse"] == reuse],
        key=lambda v: v["cost"],
    )
    if len(line) > len(full):
      ax.plot(
          [v["cost"] for v in line],
          [v["mean"] for v in line],
          style,
          label=label,
          ms=4,
      )
      for v in line:
        ax.annotate(
            f"k={v['k']}",
            (v["cost"], v["mean"]),
            fontsize=7,
            textcoords="offset points",
            xytext=(3, 3),
        )
  for v in rows:
    if v["method"] == "adamw":
      ax.plot([v["cost"]], [v["mean"]], "k*", ms=9, label="AdamW")
  ax.set_xlabel("compute per step (x AdamW)")
  ax.set_ylabel("final eval loss (nats, mean over seeds)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  figures.save(fig, out)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("run_dirs", nargs="+")
  p.add_argument(
      "--bench",
      default="",
      help="bench JSON with the same variants (step-time ratios)",
  )
  p.add_argument(
      "--out", default="", help="default: COMMON_PARENT/figures/reuse.png"
  )
  p.add_argument("--table", action="store_true", help="print Markdown")
  args = p.parse_args(argv)
  runs = [
      load_run(r)
      for r in runs_lib.load_runs(
          args.run_dirs, warn=lambda m: print(m, file=sys.stderr), finished=True
      )
      if r.config
  ]
  runs = [r for r in runs if r["status"] == "completed"]
  if not runs:
    print(
        "plot_reuse: error: no finished runs (config.json + results.json) "
        f"in {', '.join(args.run_dirs)}",
        file=sys.stderr,
    )
    return 2
  rows = variants(runs, read_bench(args.bench))
  if args.table:
    print(table(rows))
  else:
    for v in rows:
      print(
          f"{v['name']:40s} cost {v['cost']:.2f}  eval loss {v['mean']:.4f}"
          f" ({len(v['losses'])} seeds)"
      )
  plot(rows, args.out or figures.default_out(args.run_dirs, "reuse.png"))
  return 0


if __name__ == "__main__":
  sys.exit(main())
