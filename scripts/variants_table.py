"""The SAM variants' comparison (configs/sweeps/variants.py) as a table.

Per method and rho, over the finished seeds: the mean final eval loss, its
difference from AdamW's on the same seeds (paired), and the median step time
(1 / the median of perf/steps_per_sec, the first logged window, which holds
compilation, left out) against AdamW's.

  python scripts/variants_table.py runs/variants
"""

from __future__ import annotations

import json
import os
import statistics
import sys

from nanodo_sam import runs as runs_lib


def step_seconds(run) -> float:
  """The median seconds per step over the logged windows after the first."""
  rates = [
      v
      for _, v in run.scalars(["perf/steps_per_sec"]).get(
          "perf/steps_per_sec", []
      )[1:]
      if v > 0
  ]
  return 1.0 / statistics.median(rates) if rates else float("nan")


def rows(records) -> list[dict]:
  """One row per (method, rho, variant), AdamW's first."""
  adamw = {r.seed: r for r in records if r.method == "adamw"}
  adamw_step = statistics.median(
      [step_seconds(r) for r in adamw.values()] or [float("nan")]
  )
  groups = {}
  for r in records:
    groups.setdefault((r.method, r.rho, r.variant), []).append(r)
  out = []
  for (method, rho, variant), group in sorted(
      groups.items(),
      key=lambda kv: (runs_lib.method_order(kv[0][0]), kv[0][1], kv[0][2]),
  ):
    losses = [r.final_eval_loss for r in group]
    paired = [
        r.final_eval_loss - adamw[r.seed].final_eval_loss
        for r in group
        if r.seed in adamw
    ]
    step = statistics.median(step_seconds(r) for r in group)
    out.append(
        {
            "label": group[0].label + (f" {variant}" if variant else ""),
            "seeds": sorted(r.seed for r in group),
            "loss": statistics.mean(losses),
            "vs_adamw": statistics.mean(paired) if paired else float("nan"),
            "step_s": step,
            "step_ratio": step / adamw_step,
        }
    )
  return out


def table(root: str) -> str:
  records = runs_lib.load_runs([root], finished=True, warn=lambda _: None)
  planned = "?"
  manifest = os.path.join(root, "sweep.json")
  if os.path.isfile(manifest):
    with open(manifest) as f:
      planned = len(json.load(f)["runs"])
  lines = [
      f"{len(records)} of {planned} runs finished.",
      "",
      "| method | seeds | mean eval loss | - AdamW (paired) | "
      "s / step | x AdamW |",
      "|---|---|---|---|---|---|",
  ]
  for row in rows(records):
    lines.append(
        f"| {row['label']} | {','.join(map(str, row['seeds']))} | "
        f"{row['loss']:.4f} | {row['vs_adamw']:+.4f} | {row['step_s']:.3f} | "
        f"{row['step_ratio']:.2f} |"
    )
  return "\n".join(lines)


def main(argv: list[str]) -> int:
  if len(argv) != 1 or not os.path.isdir(argv[0]):
    print(
        "usage: python scripts/variants_table.py RUNS_DIR (e.g. "
        "runs/variants, the sweep's --out)",
        file=sys.stderr,
    )
    return 2
  print(table(argv[0]))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
