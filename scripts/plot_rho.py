"""Figure 3: eval loss vs rho per method, AdamW as the dashed reference.

    python scripts/plot_rho.py SWEEP_DIR [SWEEP_DIR ...] [--relative]
        [--out=FILE.png]

One panel per (schedule, size, nonlinearity); one line per method over its rho
values (mean over seeds, error bars = std; at each rho the best learning
rate). --relative plots loss minus the best Precond Functional SAM loss, as
the paper's Figure 3 does. Diverged settings are left out and counted in the
legend. Runs are read with nanodo_sam/runs.py. Default output:
COMMON_PARENT/figures/rho.png.
"""

from __future__ import annotations

import argparse
import math
import sys

from nanodo_sam import figures
from nanodo_sam import runs as runs_lib


def rho_curve(runs):
  """[(rho, mean, std)] with the best lr at each rho; and #diverged rhos."""
  by_rho = {}
  for (rho, _, _), rs in runs_lib.group_by(runs, *runs_lib.SETTING).items():
    mean, std = runs_lib.mean_std(r.loss for r in rs)
    best = by_rho.get(rho)
    if best is None or (
        math.isfinite(mean) and not (math.isfinite(best[0]) and best[0] <= mean)
    ):
      by_rho[rho] = (mean, std)
  points = [
      (rho, m, s) for rho, (m, s) in sorted(by_rho.items()) if math.isfinite(m)
  ]
  return points, sum(1 for m, _ in by_rho.values() if not math.isfinite(m))


MARKERS = {
    "sam": "s",
    "precond_functional_sam": "o",
    "precond_sam": "^",
    "functional_sam": "D",
}


def draw_panel(ax, panel: tuple, groups: dict, relative: bool) -> None:
  """One panel: each method's eval loss against rho (the plain step as a
  line at rho = 0), less the best Precond Func-SAM's with `relative`."""
  ref = 0.0
  if relative:
    pfs = runs_lib.best(groups.get(panel + ("precond_functional_sam",), []))
    ref = pfs.mean if math.isfinite(pfs.mean) else 0.0
  for g in sorted(g for g in groups if g[:3] == panel):
    label = runs_lib.method_label(g[3])
    if not runs_lib.perturbs(g[3]):
      cell = runs_lib.best(groups[g])
      if math.isfinite(cell.mean):
        ax.axhline(
            cell.mean - ref, color="k", ls="--", lw=1, label=f"{label} (ρ=0)"
        )
      continue
    points, diverged = rho_curve(groups[g])
    if diverged:
      label += f" ({diverged} ρ diverged)"
    if points:
      xs, ms, ss = zip(*points)
      ax.errorbar(
          xs,
          [m - ref for m in ms],
          yerr=ss,
          marker=MARKERS.get(g[3], "."),
          capsize=3,
          label=label,
      )
  ax.set_xscale("log")
  ax.set_title(" / ".join(panel))
  ax.set_xlabel("ρ")
  ax.set_ylabel("eval loss" + (" − best Precond Func-SAM" if relative else ""))
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("dirs", nargs="+", metavar="SWEEP_DIR")
  p.add_argument("--relative", action="store_true")
  p.add_argument("--out", default="")
  args = p.parse_args(argv)
  warn = lambda m: print(m, file=sys.stderr)
  runs = runs_lib.unique(
      runs_lib.load_runs(args.dirs, warn=warn, finished=True), warn
  )
  if not runs:
    print("plot_rho: error: no runs with results.json", file=sys.stderr)
    return 2
  plt = figures.pyplot()

  groups = runs_lib.group_by(runs, *runs_lib.GROUP)
  panels = sorted({g[:3] for g in groups})
  fig, axes = plt.subplots(
      1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False
  )
  for ax, panel in zip(axes[0], panels):
    draw_panel(ax, panel, groups, args.relative)
  out = args.out or figures.default_out(args.dirs, "rho.png")
  figures.save(fig, out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
