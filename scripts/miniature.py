"""The paper in miniature: analyse the study's runs, write docs/miniature.md.

    python scripts/miniature.py runs/miniature [--doc=docs/miniature.md]
        [--figures=docs] [--no-analyze]

For the Table 1 runs (AdamW and each method at its chosen rho, on the
evaluation seeds) it runs what `nanodo-sam analyze` and `nanodo-sam
prune-eval` do (`commands.analyze_run`, `commands.prune_eval_run`), keeping
their outputs in the run directories so a second call repeats nothing; then
the report is nanodo_sam/miniature.py's (`miniature.write_report`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from nanodo_sam import commands
from nanodo_sam import miniature

# The repository's docs folder, beside this script's folder.
DOCS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs")


def ensure_analysis(runs: list, log=print) -> dict[str, float]:
  """sharpness.json and prune.json for each run that lacks them; returns the
  seconds spent per run directory now."""
  fractions = ",".join(f"{f:g}" for f in miniature.PRUNE_FRACTIONS)
  spent = {}
  for r in runs:
    todo = []
    if r.sharpness is None:
      todo.append(
          (
              "analyze",
              lambda r=r: commands.analyze_run(r.workdir, **miniature.ANALYZE),
          )
      )
    if r.prune is None:
      todo.append(
          (
              "prune-eval",
              lambda r=r: commands.prune_eval_run(r.workdir, fractions),
          )
      )
    for name, run in todo:
      t0 = time.time()
      log(f"nanodo-sam {name} --workdir={r.workdir}")
      run()
      spent[r.workdir] = spent.get(r.workdir, 0.0) + time.time() - t0
  return spent


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("out", help="the sweep's output folder (runs/miniature)")
  p.add_argument("--doc", default=os.path.join(DOCS, "miniature.md"))
  p.add_argument(
      "--figures",
      default="",
      help="folder for the PNGs (default: the doc's folder)",
  )
  p.add_argument(
      "--no-analyze",
      action="store_true",
      help="do not run analyze / prune-eval on missing runs",
  )
  return p


def _read_memo(out: str) -> tuple[str, dict]:
  """(path, what the report measured before: analysis seconds per run, the
  training split's token count), so a second call repeats nothing."""
  path = os.path.join(out, "miniature_report.json")
  memo = {"analysis_seconds": {}, "train_tokens": None}
  if os.path.isfile(path):
    with open(path) as f:
      memo.update(json.load(f))
  return path, memo


def _save_memo(path: str, memo: dict) -> None:
  with open(path + ".tmp", "w") as f:
    json.dump(memo, f, indent=2)
  os.replace(path + ".tmp", path)


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  if not os.path.isdir(args.out):
    print(
        f"miniature: error: {args.out!r} is not a directory; pass the "
        "sweep's output folder, e.g. runs/miniature",
        file=sys.stderr,
    )
    return 2
  memo_path, memo = _read_memo(args.out)
  spent = memo["analysis_seconds"]
  if not args.no_analyze:
    runs = miniature.load_runs(args.out)
    best = miniature.best_rhos(args.out)
    todo = [r for rs in miniature.table_runs(runs, best).values() for r in rs]
    for path, s in ensure_analysis(todo).items():
      spent[path] = spent.get(path, 0.0) + s
      _save_memo(memo_path, memo)
  t5_cfg = miniature.t5_config(args.out)
  if t5_cfg and memo["train_tokens"] is None:
    memo["train_tokens"] = miniature.train_tokens(t5_cfg)
    _save_memo(memo_path, memo)
  fig_dir = args.figures or os.path.dirname(os.path.abspath(args.doc))
  claims = miniature.write_report(
      args.out, args.doc, fig_dir, spent, memo["train_tokens"]
  )
  print(f"wrote {args.doc}")
  for c in claims:
    print(f"- {c.title}: {c.verdict}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
