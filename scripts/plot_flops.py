"""Eval loss against training FLOPs, per method (best setting per method).

    python scripts/plot_flops.py SWEEP_DIR [SWEEP_DIR ...] [--out=FILE.png]

Reads every finished run under the directories (nanodo_sam/runs.py). For
every (schedule, size, nonlinearity) found (one panel each), every method
and every planned step count (a compute-matched AdamW run, trained for a
SAM-family run's FLOPs, has its own curve), draws the best (rho, lr) setting
(`runs.best`, as `nanodo-sam tables` picks it) averaged over seeds, against
the training FLOPs at each eval step: the trainer's own count for the run's
config (`equal_compute.flops_history`, `train_flops.Counter`). Prints one
row per curve: its final FLOPs and eval loss, and its eval loss at the
panel's equal-compute budget (the smallest final FLOPs of its curves: the
last eval at or below it). Runs made before results.json recorded
train_flops are left out with a note. Default output:
COMMON_PARENT/figures/flops.png.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

from nanodo_sam import equal_compute
from nanodo_sam import figures
from nanodo_sam import runs as runs_lib

PROG = "plot_flops"


class _Parser(argparse.ArgumentParser):
  """Bad arguments: one line on stderr, exit code 2."""

  def error(self, message):
    print(f"{PROG}: error: {message}", file=sys.stderr)
    sys.exit(2)


def mean_curve(runs) -> tuple[list[float], list[float]]:
  """(FLOPs, mean eval loss) at the evaluations every run made (the runs of
  one setting share a config but for the seed, so their FLOPs agree)."""
  hists = [dict(equal_compute.flops_history(r)) for r in runs]
  flops_n = sorted(set.intersection(*(set(h) for h in hists)))
  return flops_n, [sum(h[f] for h in hists) / len(hists) for f in flops_n]


def curves(runs) -> list[dict]:
  """One curve per (panel, method, planned steps): the best setting's."""
  groups = {}
  for r in runs:
    key = r.group + (equal_compute.planned_steps(r),)
    groups.setdefault(key, []).append(r)
  out = []
  for key in sorted(
      groups, key=lambda k: k[:3] + runs_lib.method_order(k[3]) + k[4:]
  ):
    cell = runs_lib.best(groups[key])
    flops_n, loss_n = mean_curve(cell.runs)
    if not flops_n:
      continue  # Its seeds share no eval step.
    label = cell.runs[0].label + f", {key[4]} steps"
    out.append(
        dict(
            panel=key[:3],
            label=label,
            steps=key[4],
            seeds=cell.n,
            flops=flops_n,
            loss=loss_n,
        )
    )
  return out


def at_budget(curve: dict, budget: float) -> float:
  """The eval loss of the last eval at or below `budget` FLOPs (within
  equal_compute.FLOPS_TOLERANCE); NaN if none."""
  limit = budget * (1 + equal_compute.FLOPS_TOLERANCE)
  losses = [l for f, l in zip(curve["flops"], curve["loss"]) if f <= limit]
  return losses[-1] if losses else math.nan


def table(found: list[dict]) -> str:
  """Markdown: one row per curve, with its loss at its panel's budget."""
  lines = [
      "| panel | method | seeds | final train FLOPs | final eval loss |"
      " equal-compute budget | eval loss at budget |",
      "|---|---|---|---|---|---|---|",
  ]
  for c in found:
    budget = min(d["flops"][-1] for d in found if d["panel"] == c["panel"])
    lines.append(
        f"| {' / '.join(c['panel'])} | {c['label']} | {c['seeds']} | "
        f"{c['flops'][-1]:.3g} | {c['loss'][-1]:.4f} | {budget:.3g} | "
        f"{at_budget(c, budget):.4f} |"
    )
  return "\n".join(lines)


def plot(found: list[dict], out: str) -> None:
  plt = figures.pyplot()
  panels = sorted({c["panel"] for c in found})
  fig, axes = plt.subplots(
      1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False
  )
  for ax, panel in zip(axes[0], panels):
    for c in found:
      if c["panel"] == panel:
        ax.plot(c["flops"], c["loss"], marker=".", label=c["label"])
    ax.set_title(" / ".join(panel))
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel("eval loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  figures.save(fig, out)


def _load(dirs: list[str]) -> list:
  """The finished runs that recorded train_flops and evaluated."""
  warn = lambda m: print(m, file=sys.stderr)
  out = []
  for r in runs_lib.unique(
      runs_lib.load_runs(dirs, warn=warn, finished=True), warn
  ):
    if r.results.get("train_flops") is None:
      warn(f"note: skipping {r.workdir}: its results.json has no train_flops")
    elif r.eval_history:
      out.append(r)
  return out


def main(argv=None) -> int:
  p = _Parser(prog=PROG, description=__doc__.splitlines()[0])
  p.add_argument("dirs", nargs="+", metavar="SWEEP_DIR")
  p.add_argument(
      "--out", default="", help="default: COMMON_PARENT/figures/flops.png"
  )
  args = p.parse_args(argv)
  for d in args.dirs:
    if not os.path.isdir(d):
      print(f"{PROG}: error: {d!r} is not a directory", file=sys.stderr)
      return 2
  runs = _load(args.dirs)
  if not runs:
    print(
        f"{PROG}: error: no finished runs with train_flops and an eval"
        f" history under {', '.join(args.dirs)}",
        file=sys.stderr,
    )
    return 2
  found = curves(runs)
  print(table(found))
  plot(found, args.out or figures.default_out(args.dirs, "flops.png"))
  return 0


if __name__ == "__main__":
  sys.exit(main())
