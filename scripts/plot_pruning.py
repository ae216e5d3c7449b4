"""Figure 5: eval loss vs pruned fraction (one-shot global magnitude pruning).

    python scripts/plot_pruning.py PATH [PATH ...] [--out=FILE.png]

PATH is a run directory or a directory of runs; reads every prune.json that
`nanodo-sam prune-eval --workdir=RUN --fractions=...` wrote. One line per run,
x = the fraction of non-embedding weights set to zero. Default output:
COMMON_PARENT/figures/pruning.png.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from scripts import figures  # pylint: disable=g-import-not-at-top


def find(paths) -> list[str]:
  files = set()
  for p in paths:
    if os.path.isfile(p) and p.endswith("prune.json"):
      files.add(os.path.abspath(p))
    files.update(os.path.abspath(f) for f in glob.glob(
        os.path.join(p, "**", "prune.json"), recursive=True))
  return sorted(files)


def label(data: dict, path: str) -> str:
  method = data.get("method")
  if not method:
    return os.path.basename(os.path.dirname(path))
  text = method if method == "adamw" else f"{method} ρ={data.get('rho', 0):g}"
  size = data.get("model_size_name")
  return f"{text} ({size})" if size else text


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("paths", nargs="+", metavar="PATH")
  p.add_argument("--out", default="")
  args = p.parse_args(argv)
  files = find(args.paths)
  if not files:
    print("plot_pruning: error: no prune.json under "
          f"{', '.join(args.paths)}; run `nanodo-sam prune-eval "
          "--workdir=RUN` first", file=sys.stderr)
    return 2
  plt = figures.pyplot()
  fig, ax = plt.subplots(figsize=(5.5, 4))
  for path in files:
    with open(path) as f:
      data = json.load(f)
    rows = sorted((r["fraction"], r["eval_loss"]) for r in data["results"])
    xs, ys = zip(*rows)
    ax.plot(xs, ys, marker="o", label=label(data, path))
  ax.set_xlabel("fraction of non-embedding weights pruned")
  ax.set_ylabel("eval loss")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  out = args.out or figures.default_out(args.paths, "pruning.png")
  figures.save(fig, out, note=f" ({len(files)} runs)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
