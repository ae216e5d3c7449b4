"""Figures 2 and 4: tau_logit, tau_func, tau_cross over training.

    python scripts/plot_taus.py PATH [PATH ...] [--out=FILE.png] [--no-cross]

PATH is a run directory or a directory of runs. Reads the scalars
`sharpness/tau_logit`, `sharpness/tau_func`, `sharpness/tau_cross` from the
TensorBoard event files a run writes when diagnostics.every_steps > 0
(`runs.read_scalars`); one panel per tau, one line per run. --no-cross
gives Figure 2 (tau_logit, tau_func only). Default output:
COMMON_PARENT/figures/taus.png.
"""

from __future__ import annotations

import argparse
import sys

from nanodo_sam import figures
from nanodo_sam import runs as runs_lib

TAUS = ("tau_logit", "tau_func", "tau_cross")
LABELS = {"tau_logit": "τ_logit", "tau_func": "τ_func", "tau_cross": "τ_cross"}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("paths", nargs="+", metavar="PATH")
  p.add_argument("--out", default="")
  p.add_argument(
      "--no-cross",
      action="store_true",
      help="only tau_logit and tau_func (Figure 2)",
  )
  args = p.parse_args(argv)
  taus = TAUS[:2] if args.no_cross else TAUS
  series = []
  for run in runs_lib.load_runs(
      args.paths, warn=lambda m: print(m, file=sys.stderr)
  ):
    data = run.scalars([f"sharpness/{t}" for t in taus])
    if data:
      series.append((run.label if run.config else run.name, data))
  if not series:
    print(
        "plot_taus: error: no sharpness/tau_* scalars in event files under "
        f"{', '.join(args.paths)}; train with --config.diagnostics."
        "every_steps=N",
        file=sys.stderr,
    )
    return 2
  plt = figures.pyplot()
  fig, axes = plt.subplots(
      1, len(taus), figsize=(4.5 * len(taus), 3.8), squeeze=False
  )
  for ax, tau in zip(axes[0], taus):
    for label, data in series:
      pts = data.get(f"sharpness/{tau}", [])
      if pts:
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker="o", ms=3, label=label)
    ax.axhline(0.0, color="k", lw=0.6)
    ax.set_title(LABELS[tau])
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  axes[0][0].legend(fontsize=7)
  out = args.out or figures.default_out(args.paths, "taus.png")
  figures.save(fig, out, note=f" ({len(series)} runs)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
