"""Figure 1: eval loss over training, per method (best rho per method).

    python scripts/plot_eval_curves.py SWEEP_DIR [SWEEP_DIR ...]
        [--methods=adamw,sam] [--all] [--out=FILE.png]

Reads eval_history from each run's results.json (nanodo_sam/runs.py). For
every (schedule, size, nonlinearity) found (one panel each) and every method,
draws the curve of the best (rho, lr) setting (`runs.best`, `nanodo-sam tables`'
choice), averaged over seeds; --all draws every run instead. Default output:
COMMON_PARENT/figures/eval_curves.png.
"""

from __future__ import annotations

import argparse
import sys

from nanodo_sam import figures
from nanodo_sam import runs as runs_lib


def mean_curve(runs) -> tuple[list[int], list[float]]:
  """Mean over runs at the steps every run evaluated."""
  hists = [dict(r.eval_history) for r in runs]
  hists = [h for h in hists if h]
  if not hists:
    return [], []
  steps = sorted(set.intersection(*(set(h) for h in hists)))
  return steps, [sum(h[s] for h in hists) / len(hists) for s in steps]


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("dirs", nargs="+", metavar="SWEEP_DIR")
  p.add_argument("--methods", default="", help="comma list (default: all)")
  p.add_argument("--all", action="store_true", help="one line per run")
  p.add_argument("--out", default="")
  args = p.parse_args(argv)
  warn = lambda m: print(m, file=sys.stderr)
  runs = runs_lib.unique(
      runs_lib.load_runs(args.dirs, warn=warn, finished=True), warn
  )
  methods = [m for m in args.methods.split(",") if m]
  runs = [r for r in runs if not methods or r.method in methods]
  if not runs:
    print(
        "plot_eval_curves: error: no matching runs with results.json",
        file=sys.stderr,
    )
    return 2
  plt = figures.pyplot()

  panels = sorted({r.group[:3] for r in runs})
  fig, axes = plt.subplots(
      1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False
  )
  for ax, panel in zip(axes[0], panels):
    groups = {
        g: rs
        for g, rs in runs_lib.group_by(runs, *runs_lib.GROUP).items()
        if g[:3] == panel
    }
    for g in sorted(groups, key=lambda g: runs_lib.method_order(g[3])):
      label = runs_lib.method_label(g[3])
      if args.all:
        for r in groups[g]:
          steps, losses = mean_curve([r])
          ax.plot(steps, losses, marker=".", label=f"{r.label} s{r.seed}")
        continue
      cell = runs_lib.best(groups[g])
      steps, losses = mean_curve(cell.runs)
      if runs_lib.perturbs(g[3]):
        label += f" (ρ={cell.rho:g})"
      ax.plot(steps, losses, marker=".", label=label)
    ax.set_title(" / ".join(panel))
    ax.set_xlabel("step")
    ax.set_ylabel("eval loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  out = args.out or figures.default_out(args.dirs, "eval_curves.png")
  figures.save(fig, out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
