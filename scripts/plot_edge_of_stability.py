"""lambda_max against the SAM edge and 2/eta over training, one panel per run.

    python scripts/plot_edge_of_stability.py RUN_DIR [RUN_DIR ...] \
        [--out=eos.png] [--settle=0.5] [--table]

Each RUN_DIR (or a folder of them) is a run trained with
`diagnostics.on_train_batch=True` (e.g. configs/edge_of_stability.py): its
TensorBoard event files (read with nanodo_sam/runs.py) hold, every
`diagnostics.every_steps` steps and on that step's training minibatch,
eos/lambda_max (the largest-magnitude Hessian eigenvalue), eos/sam_edge
(Long & Bartlett's 4 / (eta (1 + sqrt(1 + 8 rho / (eta ||g||))))) and
eos/two_over_lr. Panels are laid out with one row per learning rate and one
column per rho. The summary (printed; `--table` as Markdown) gives, over the
last `--settle` fraction of the logged points, the median of lambda_max, of
the SAM edge and their ratio, and the ratio to 2/eta. Default output:
COMMON_PARENT/figures/edge_of_stability.png.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from nanodo_sam import figures  # pylint: disable=g-import-not-at-top
from nanodo_sam import runs as runs_lib  # pylint: disable=g-import-not-at-top

plt = figures.pyplot()
import numpy as np  # pylint: disable=g-import-not-at-top

TAGS = ("eos/lambda_max", "eos/sam_edge", "eos/two_over_lr", "eos/grad_norm")


def load_run(run: runs_lib.RunRecord) -> dict:
  scalars = {
      tag: tuple(np.asarray(x) for x in zip(*points))
      for tag, points in run.scalars(prefix="eos/").items()
  }
  missing = [t for t in TAGS[:3] if t not in scalars]
  if missing:
    raise SystemExit(
        f"plot_edge_of_stability: {run.workdir!r} has no {missing[0]}; train "
        "with --config.diagnostics.every_steps=N "
        "--config.diagnostics.on_train_batch=True"
    )
  return {
      "dir": run.workdir,
      "lr": run.lr,
      "rho": run.rho,
      "method": run.method,
      "scalars": scalars,
      "results": run.results or {},
  }


def summary(run: dict, settle: float) -> dict:
  s = run["scalars"]
  steps, lam = s["eos/lambda_max"]
  _, edge = s["eos/sam_edge"]
  n = len(steps)
  k = min(n - 1, int(math.floor(n * (1.0 - settle))))
  lam_med = float(np.median(lam[k:]))
  edge_med = float(np.median(edge[k:]))
  two = 2.0 / run["lr"]
  return {
      "lr": run["lr"],
      "rho": run["rho"],
      "from_step": int(steps[k]),
      "points": n - k,
      "lambda_max": lam_med,
      "sam_edge": edge_med,
      "two_over_lr": two,
      "lambda_over_edge": lam_med / edge_med,
      "lambda_over_two_over_lr": lam_med / two,
      "final_eval_loss": run["results"].get("final_eval_loss", float("nan")),
      "status": run["results"].get("status", "?"),
  }


def plot(runs: list[dict], out: str, settle: float) -> None:
  lrs = sorted({r["lr"] for r in runs})
  rhos = sorted({r["rho"] for r in runs})
  fig, axes = plt.subplots(
      len(lrs),
      len(rhos),
      squeeze=False,
      figsize=(3.2 * len(rhos), 2.6 * len(lrs)),
      sharex=True,
  )
  for ax in axes.flat:
    ax.set_visible(False)
  for run in runs:
    ax = axes[lrs.index(run["lr"])][rhos.index(run["rho"])]
    ax.set_visible(True)
    s = run["scalars"]
    steps, lam = s["eos/lambda_max"]
    ax.plot(
        steps,
        lam,
        ".-",
        color="C0",
        ms=3,
        lw=1,
        label=r"$\lambda_{max}$ (minibatch)",
    )
    ax.plot(*s["eos/sam_edge"], "-", color="C3", lw=1.2, label="SAM edge")
    ax.axhline(2.0 / run["lr"], color="k", ls="--", lw=1, label=r"$2/\eta$")
    st = summary(run, settle)
    ax.axvline(st["from_step"], color="0.7", lw=0.8, ls=":")
    top = max(2.5 * 2.0 / run["lr"], float(np.nanpercentile(lam, 95)) * 1.1)
    # lambda_max is the largest-magnitude eigenvalue: at initialisation it is
    # often a large negative one, drawn off scale (clipped at -0.1 top).
    ax.set_ylim(max(min(0.0, float(np.nanmin(lam))), -0.1 * top), top)
    ax.set_title(
        rf"$\eta$={run['lr']:g}, $\rho$={run['rho']:g}: "
        rf"$\lambda$/edge={st['lambda_over_edge']:.2f}",
        fontsize=9,
    )
    ax.tick_params(labelsize=8)
  for ax in axes[-1]:
    ax.set_xlabel("step", fontsize=8)
  for row in axes:
    row[0].set_ylabel("curvature", fontsize=8)
  first = next(ax for ax in axes.flat if ax.get_visible())
  first.legend(fontsize=7, loc="best")
  fig.suptitle(
      r"$\lambda_{max}$ of the training-minibatch Hessian vs the SAM "
      r"edge and $2/\eta$"
      if len(rhos) > 1
      else r"$\lambda_{max}$ vs SAM edge, $2/\eta$",
      fontsize=10,
  )
  figures.save(fig, out, dpi=90)


COLUMNS = (
    "lr",
    "rho",
    "from_step",
    "points",
    "lambda_max",
    "sam_edge",
    "two_over_lr",
    "lambda_over_edge",
    "lambda_over_two_over_lr",
    "final_eval_loss",
    "status",
)


def print_summary(rows: list[dict], table: bool) -> None:
  """One line per run (COLUMNS as key=value), or a Markdown table."""
  if table:
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
  for row in rows:
    cells = [
        f"{row[c]:.4g}" if isinstance(row[c], float) else str(row[c])
        for c in COLUMNS
    ]
    print(
        ("| " + " | ".join(cells) + " |")
        if table
        else "  ".join(f"{c}={v}" for c, v in zip(COLUMNS, cells))
    )


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("run_dirs", nargs="+")
  p.add_argument(
      "--out",
      default="",
      help="default: COMMON_PARENT/figures/edge_of_stability.png",
  )
  p.add_argument(
      "--settle",
      type=float,
      default=0.5,
      help="summary over this last fraction of logged points",
  )
  p.add_argument(
      "--table",
      action="store_true",
      help="print the summary as a Markdown table",
  )
  args = p.parse_args(argv)
  if not 0 < args.settle <= 1:
    p.error("--settle must lie in (0, 1]")
  runs = [
      load_run(r)
      for r in runs_lib.load_runs(
          args.run_dirs, warn=lambda m: print(m, file=sys.stderr)
      )
      if r.config
  ]
  if not runs:
    p.error("no run directories (with config.json) given")
  runs.sort(key=lambda r: (r["lr"], r["rho"]))
  plot(
      runs,
      args.out or figures.default_out(args.run_dirs, "edge_of_stability.png"),
      args.settle,
  )
  print_summary([summary(r, args.settle) for r in runs], args.table)
  return 0


if __name__ == "__main__":
  sys.exit(main())
