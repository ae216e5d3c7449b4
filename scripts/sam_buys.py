"""What SAM buys at equal compute, in miniature: measure, plot, report.

    python scripts/sam_buys.py runs/sam_buys [--doc=docs/sam_buys.md]
        [--figures=docs]

For each finished pretraining run of configs/sweeps/sam_buys.py it runs what
`nanodo-sam eval --workdir=RUN --quantize=int8` (and int4) does
(`commands.eval_run`), keeping the output in the run directory
(quantized_int8.json) so a second call repeats nothing; then it draws three
figures (eval loss against training FLOPs, the forgetting curves, the
quantization losses) and writes the report (nanodo_sam/sam_buys.py). A study
not finished yet gives a partial report.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import numpy as np

from nanodo_sam import commands
from nanodo_sam import equal_compute
from nanodo_sam import figures
from nanodo_sam import runs as runs_lib
from nanodo_sam import sam_buys as study

DOCS = os.path.normpath(
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs")
)


def ensure_quantized(found: list) -> None:
  """quantized_int{8,4}.json for each run that lacks them."""
  for m in found:
    for bits in study.WIDTHS:
      path = study.quant_path(m.workdir, bits)
      if os.path.isfile(path):
        continue
      print(f"nanodo-sam eval --workdir={m.workdir} --quantize=int{bits}")
      out = commands.eval_run(m.workdir, quantize=f"int{bits}")
      with open(path, "w") as f:
        json.dump(out, f, indent=1)


def _mean_curve(curves: list[list]) -> tuple[np.ndarray, np.ndarray]:
  """Pointwise mean of curves [(x, y)] over their common length."""
  n = min(len(c) for c in curves)
  xs = np.array([[p[0] for p in c[:n]] for c in curves]).mean(0)
  ys = np.array([[p[1] for p in c[:n]] for c in curves]).mean(0)
  return xs, ys


def _plot_curves(found: list, curve, out: str, xlabel: str, log_x: bool):
  """One line per arm: the mean over its seeds of `curve(m)` ([(x, y)];
  None or empty leaves the run out)."""
  plt = figures.pyplot()
  fig, ax = plt.subplots(figsize=(6, 4))
  for arm in study.ARMS:
    curves = [c for m in found if m.arm == arm and (c := curve(m))]
    if curves:
      ax.plot(*_mean_curve(curves), marker=".", label=study.LABEL[arm])
  ax.set(xlabel=xlabel, ylabel="C4 eval loss (mean of seeds)")
  if log_x:
    ax.set_xscale("log")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  figures.save(fig, out)


def plot_flops(found: list, out: str) -> None:
  history = lambda m: equal_compute.flops_history(runs_lib.read_run(m.workdir))
  _plot_curves(found, history, out, "training FLOPs", log_x=True)


def plot_forgetting(found: list, out: str) -> None:
  curve = lambda m: m.forget_curve and [(0, m.loss)] + list(m.forget_curve)
  _plot_curves(
      found, curve, out, "steps trained on tiny_shakespeare", log_x=False
  )


def plot_quantization(found: list, out: str) -> None:
  plt = figures.pyplot()
  fig, ax = plt.subplots(figsize=(6, 4))
  arms = [a for a in study.ARMS if any(m.arm == a for m in found)]
  for i, bits in enumerate(study.WIDTHS):
    values = [
        [
            m.quant[bits]
            for m in found
            if m.arm == a and np.isfinite(m.quant[bits])
        ]
        for a in arms
    ]
    means = [np.mean(v) if v else math.nan for v in values]
    stds = [np.std(v) if v else math.nan for v in values]
    x = np.arange(len(arms)) + 0.4 * i
    ax.bar(x, means, 0.4, yerr=stds, label=f"int{bits}")
  ax.set_xticks(np.arange(len(arms)) + 0.2)
  ax.set_xticklabels([study.LABEL[a] for a in arms], rotation=20, fontsize=8)
  ax.set(ylabel="C4 eval-loss increase when quantized")
  ax.grid(alpha=0.3, axis="y")
  ax.legend(fontsize=8)
  figures.save(fig, out)


def times_line(found: list, out_dir: str) -> str:
  """The study's CPU time, from every run's results.json."""
  cpu = [
      r.results.get("cpu_seconds") or 0.0
      for r in runs_lib.load_runs([out_dir], finished=True, warn=lambda _: 0)
  ]
  return (
      f"Measured on a 2-core CPU machine: {len(cpu)} training runs, "
      f"{sum(cpu) / 3600:.2f} h of CPU time in all."
  )


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("out", help="the sweep's output folder (runs/sam_buys)")
  p.add_argument("--doc", default=os.path.join(DOCS, "sam_buys.md"))
  p.add_argument("--figures", default=DOCS, help="folder of the figures")
  return p


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  if not os.path.isdir(args.out):
    print(f"no study in {args.out!r}; run the sweep first", file=sys.stderr)
    return 2
  found = study.measure_all(args.out)
  ensure_quantized(found)
  found = study.measure_all(args.out)
  for name, plot in zip(
      study.FIGURES, (plot_flops, plot_forgetting, plot_quantization)
  ):
    if found:
      plot(found, os.path.join(args.figures, f"sam_buys_{name}.png"))
  rho = study.best_momentum_rho(args.out)
  text = study.render(found, args.out, rho, times_line(found, args.out))
  with open(args.doc, "w") as f:
    f.write(text)
  print(f"wrote {args.doc}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
