"""Figure 5: eval loss vs pruned fraction (one-shot global magnitude pruning).

    python scripts/plot_pruning.py PATH [PATH ...] [--out=FILE.png]

PATH is a run directory or a directory of runs; reads every prune.json that
`nanodo-sam prune-eval --workdir=RUN --fractions=...` wrote
(nanodo_sam/runs.py). One line per run,
x = the fraction of non-embedding weights set to zero. Default output:
COMMON_PARENT/figures/pruning.png.
"""

from __future__ import annotations

import argparse
import sys

from nanodo_sam import figures
from nanodo_sam import runs as runs_lib


def label(run: runs_lib.RunRecord) -> str:
  size = run.size if run.size != "?" else ""
  return f"{run.label} ({size})" if size else run.label


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("paths", nargs="+", metavar="PATH")
  p.add_argument("--out", default="")
  args = p.parse_args(argv)
  runs = [
      r
      for r in runs_lib.load_runs(
          args.paths, warn=lambda m: print(m, file=sys.stderr)
      )
      if r.prune
  ]
  if not runs:
    print(
        "plot_pruning: error: no prune.json under "
        f"{', '.join(args.paths)}; run `nanodo-sam prune-eval "
        "--workdir=RUN` first",
        file=sys.stderr,
    )
    return 2
  plt = figures.pyplot()
  fig, ax = plt.subplots(figsize=(5.5, 4))
  for run in runs:
    rows = sorted((r["fraction"], r["eval_loss"]) for r in run.prune["results"])
    xs, ys = zip(*rows)
    ax.plot(xs, ys, marker="o", label=label(run))
  ax.set_xlabel("fraction of non-embedding weights pruned")
  ax.set_ylabel("eval loss")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  out = args.out or figures.default_out(args.paths, "pruning.png")
  figures.save(fig, out, note=f" ({len(runs)} runs)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
