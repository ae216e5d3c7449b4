"""Tables 1-6 of the paper from run directories, with the paper's numbers.

    nanodo-sam tables SWEEP_DIR [SWEEP_DIR ...] [--out=DIR]
        [--metric=final_eval_loss|best_eval_loss|final_eval_perplexity|
                  final_eval_accuracy|final_eval_bits_per_byte]

Reads every finished run under the directories (nanodo_sam/runs.py: config,
results and `sharpness.json` from `nanodo-sam analyze`), groups runs by
(schedule, model size, nonlinearity, method), picks the best (rho, learning
rate, other tuned keys) per group on the mean of --metric over seeds (the
final eval loss by default; lower is better except for accuracy;
`runs.best`), and prints, as markdown, every table of nanodo_sam/paper.json in
the paper's layout (which sizes, methods and non-linearities, in its order):

  Table 1  2M, fixed-length: AdamW / SAM / Precond SAM / Func-SAM / Precond
           Func-SAM
  Table 2  fixed-length, 23.9M..1208M x 4 methods
  Table 3  Chinchilla, 23.9M..1208M x 4 methods
  Table 4  23.9M Chinchilla: eval loss, lambda_max(H), tr(H), tr(GGN)
  Table 5  2M fixed-length: GeLU vs ReLU
  Table 6  117.9M Chinchilla: as Table 4
  Summary  every group found (whatever its size or schedule)
  Equal compute  each SAM-family group beside AdamW at equal steps and at
           equal training FLOPs (nanodo_sam/equal_compute.py), when the
           runs include compute-matched ones (a sweep's "compute_matched")

Each cell is mean +- std over seeds (std omitted for one seed), with the
chosen rho; the column "paper" beside it is the published number. A run whose
results.json says "diverged" counts as NaN, and a (rho, lr) setting with a
diverged seed is NaN; a group whose settings all diverged shows NaN (as the
paper's Tables 2 and 3 do). Tables without matching runs are skipped with a
note. The paper's tables compare at equal steps: compute-matched runs are left
out of them. Markdown and CSV files go to SWEEP_DIR/tables/ (or --out).
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
from dataclasses import dataclass
from typing import Any

from nanodo_sam import equal_compute
from nanodo_sam import paper
from nanodo_sam import runs as runs_lib
from nanodo_sam.runs import NAN, Cell, RunRecord, best, method_label

PROG = "nanodo-sam tables"

SHARPNESS_KEYS = ("lambda_max", "hessian_trace", "ggn_trace")


# ------------------------------------------------------------ reading runs


def load_runs(
    dirs: list[str], metric: str = "final_eval_loss", warn=print
) -> list[RunRecord]:
  """Every finished run under `dirs`, repeats left out (`runs.unique`)."""
  return runs_lib.unique(
      runs_lib.load_runs(dirs, metric, warn, finished=True), warn
  )


def sharpness_means(cell: Cell) -> dict[str, float]:
  out = {}
  for key in SHARPNESS_KEYS:
    xs = [
        runs_lib.as_float(r.sharpness.get(key))
        for r in cell.runs
        if r.sharpness is not None
    ]
    out[key] = runs_lib.mean_std(xs)[0] if xs else NAN
  return out


# -------------------------------------------------------------- formatting


def fmt_loss(cell: Cell, digits: int = 4, with_rho: bool = True) -> str:
  if not cell.found:
    return "—"
  text = "NaN" if not math.isfinite(cell.mean) else f"{cell.mean:.{digits}f}"
  if math.isfinite(cell.mean) and cell.n > 1:
    text += f" ± {cell.std:.{digits}f}"
  notes = []
  if with_rho and cell.runs and runs_lib.perturbs(cell.runs[0].method):
    notes.append(f"ρ={cell.rho:g}")
  if with_rho and cell.variant:
    notes.append(cell.variant)
  return text + (f" ({', '.join(notes)})" if notes else "")


def fmt_num(x: float, digits: int = 2) -> str:
  if x is None:
    return "—"
  return "NaN" if not math.isfinite(x) else f"{x:.{digits}f}"


def markdown(header: list[str], rows: list[list[str]]) -> str:
  lines = [
      "| " + " | ".join(header) + " |",
      "|" + "|".join("---" for _ in header) + "|",
  ]
  lines += ["| " + " | ".join(row) + " |" for row in rows]
  return "\n".join(lines)


@dataclass
class Table:
  key: str
  title: str
  header: list[str]
  rows: list[list[str]]
  csv_header: list[str]
  csv_rows: list[list[Any]]

  def markdown(self) -> str:
    return f"### {self.title}\n\n" + markdown(self.header, self.rows)


def _cell_csv(cell: Cell) -> list[Any]:
  return [
      cell.mean,
      cell.std,
      cell.n,
      cell.rho,
      cell.lr,
      cell.variant,
      cell.settings,
  ]


CELL_CSV = [
    "eval_loss_mean",
    "eval_loss_std",
    "seeds",
    "best_rho",
    "best_lr",
    "best_variant",
    "settings_tried",
]


# ------------------------------------------------- the paper's tables


def _cells(groups, key: str) -> list[tuple[dict, Cell]]:
  """(paper row, our best cell for the same group) down a paper table."""
  return [
      (
          row,
          best(
              groups.get(
                  (
                      row["schedule"],
                      row["size"],
                      row["nonlinearity"],
                      row["method"],
                  ),
                  [],
              )
          ),
      )
      for row in paper.rows(key)
  ]


def table_methods(groups, key: str, title: str) -> Table | None:
  """One size and schedule, one row per method (Table 1)."""
  cells = _cells(groups, key)
  if not any(c.found for _, c in cells):
    return None
  rows, csv_rows = [], []
  for row, c in cells:
    m, p = row["method"], row["eval_loss"]
    rows.append(
        [
            method_label(m),
            fmt_loss(c),
            fmt_num(p, 2),
            str(c.n) if c.found else "0",
        ]
    )
    csv_rows.append([m] + _cell_csv(c) + [p])
  return Table(
      key,
      title,
      ["Method", "Eval loss (ours)", "paper", "seeds"],
      rows,
      ["method"] + CELL_CSV + ["paper"],
      csv_rows,
  )


def table_sizes(groups, key: str, title: str) -> Table | None:
  """Sizes down, methods across (Tables 2 and 3)."""
  cells = _cells(groups, key)
  if not any(c.found for _, c in cells):
    return None
  methods = paper.column(key, "method")
  header = ["Size"]
  for m in methods:
    header += [method_label(m), "paper"]
  rows, csv_rows = [], []
  for size in paper.column(key, "size"):
    line = [(row, c) for row, c in cells if row["size"] == size]
    if not any(c.found for _, c in line):
      continue
    out = [size]
    for row, c in line:
      out += [fmt_loss(c), fmt_num(row["eval_loss"], 2)]
      csv_rows.append([size, row["method"]] + _cell_csv(c) + [row["eval_loss"]])
    rows.append(out)
  return Table(
      key,
      title,
      header,
      rows,
      ["size", "method"] + CELL_CSV + ["paper"],
      csv_rows,
  )


def table_sharpness(groups, key: str, title: str) -> Table | None:
  """Eval loss and sharpness per method (Tables 4 and 6)."""
  cells = _cells(groups, key)
  if not any(c.found for _, c in cells):
    return None
  header = [
      "Method",
      "Eval loss",
      "paper",
      "λmax(H)",
      "paper",
      "tr(H)",
      "paper",
      "tr(GGN)",
      "paper",
  ]
  rows, csv_rows = [], []
  for row, c in cells:
    sh = sharpness_means(c) if c.found else {k: NAN for k in SHARPNESS_KEYS}
    p = [row["eval_loss"]] + [row[k] for k in SHARPNESS_KEYS]
    rows.append(
        [
            method_label(row["method"]),
            fmt_loss(c, 4),
            fmt_num(p[0], 3),
            fmt_num(sh["lambda_max"], 2),
            fmt_num(p[1], 2),
            fmt_num(sh["hessian_trace"], 1),
            fmt_num(p[2], 1),
            fmt_num(sh["ggn_trace"], 1),
            fmt_num(p[3], 1),
        ]
    )
    csv_rows.append(
        [row["method"]] + _cell_csv(c) + [sh[k] for k in SHARPNESS_KEYS] + p
    )
  return Table(
      key,
      title,
      header,
      rows,
      ["method"]
      + CELL_CSV
      + list(SHARPNESS_KEYS)
      + [
          "paper_eval_loss",
          "paper_lambda_max",
          "paper_hessian_trace",
          "paper_ggn_trace",
      ],
      csv_rows,
  )


def table_nonlinearities(groups, key: str, title: str) -> Table | None:
  """Non-linearity x method (Table 5); only with runs of a second one."""
  rows, csv_rows = [], []
  first = paper.column(key, "nonlinearity")[0]
  for row, c in _cells(groups, key):
    nl, m, p = row["nonlinearity"], row["method"], row["eval_loss"]
    if c.found:
      rows.append(
          [
              {"gelu": "GeLU", "relu": "ReLU"}.get(nl, nl),
              method_label(m),
              fmt_loss(c),
              fmt_num(p, 4),
          ]
      )
      csv_rows.append([nl, m] + _cell_csv(c) + [p])
  if not any(r[0] != first for r in csv_rows):
    return None  # The comparison is the point: runs of another are needed.
  return Table(
      key,
      title,
      ["Non-linearity", "Method", "Eval loss (ours)", "paper"],
      rows,
      ["nonlinearity", "method"] + CELL_CSV + ["paper"],
      csv_rows,
  )


def paper_table(groups, key: str) -> Table | None:
  """One table of nanodo_sam/paper.json, laid out by what its rows vary."""
  info = paper.info(key)
  title = f"{info['source']}: {info['caption'].rstrip('.')}"
  if len(paper.column(key, "size")) > 1:
    return table_sizes(groups, key, title)
  if len(paper.column(key, "nonlinearity")) > 1:
    return table_nonlinearities(groups, key, title)
  if SHARPNESS_KEYS[0] in paper.rows(key)[0]:
    return table_sharpness(groups, key, title)
  return table_methods(groups, key, title)


def summary_table(groups) -> Table:
  rows, csv_rows = [], []
  for g in sorted(groups, key=lambda g: g[:3] + runs_lib.method_order(g[3])):
    c = best(groups[g])
    rows.append(
        [
            g[0],
            g[1],
            g[2],
            method_label(g[3]),
            fmt_loss(c, with_rho=False),
            f"{c.rho:g}" if runs_lib.perturbs(g[3]) else "—",
            f"{c.lr:g}",
            c.variant or "—",
            str(c.n),
            str(c.settings),
        ]
    )
    csv_rows.append(list(g) + _cell_csv(c))
  return Table(
      "summary",
      "Summary: best setting per group (all runs found)",
      [
          "Schedule",
          "Size",
          "Nonlin.",
          "Method",
          "Eval loss",
          "best ρ",
          "lr",
          "other",
          "seeds",
          "settings",
      ],
      rows,
      ["schedule", "size", "nonlinearity", "method"] + CELL_CSV,
      csv_rows,
  )


def settings_table(groups) -> Table:
  """Every (rho, lr) setting: the data behind Figure 3."""
  rows, csv_rows = [], []
  for g in sorted(groups):
    for (rho, lr, variant), rs in sorted(
        runs_lib.group_by(groups[g], *runs_lib.SETTING).items()
    ):
      mean, std = runs_lib.mean_std(r.loss for r in rs)
      diverged = sum(r.status == "diverged" for r in rs)
      rows.append(
          [
              g[0],
              g[1],
              g[2],
              method_label(g[3]),
              f"{rho:g}",
              f"{lr:g}",
              variant or "—",
              "NaN" if not math.isfinite(mean) else f"{mean:.4f}",
              f"{std:.4f}" if math.isfinite(std) and len(rs) > 1 else "—",
              str(len(rs)),
              str(diverged),
          ]
      )
      csv_rows.append(
          list(g) + [rho, lr, variant, mean, std, len(rs), diverged]
      )
  return Table(
      "settings",
      "Every setting (mean over seeds)",
      [
          "Schedule",
          "Size",
          "Nonlin.",
          "Method",
          "ρ",
          "lr",
          "other",
          "Eval loss",
          "std",
          "seeds",
          "diverged",
      ],
      rows,
      [
          "schedule",
          "size",
          "nonlinearity",
          "method",
          "rho",
          "lr",
          "variant",
          "eval_loss_mean",
          "eval_loss_std",
          "seeds",
          "diverged",
      ],
      csv_rows,
  )


def fmt_delta(diffs: dict[int, float], digits: int = 4) -> str:
  """Paired differences as "+mean ± std" ("—" without a common seed)."""
  if not diffs:
    return "—"
  mean, std = runs_lib.mean_std(diffs.values())
  if not math.isfinite(mean):
    return "NaN"
  return f"{mean:+.{digits}f}" + (
      f" ± {std:.{digits}f}" if len(diffs) > 1 else ""
  )


def _delta_csv(diffs: dict[int, float]) -> list[Any]:
  return list(runs_lib.mean_std(diffs.values())) + [len(diffs)]


def _comparison_row(c: equal_compute.Comparison) -> list[str]:
  at_compute = c.equal_compute
  return list(c.group[:3]) + [
      method_label(c.group[3], c.optimizer),
      str(c.steps),
      f"{c.flops:.3g}",
      fmt_loss(c.cell),
      fmt_loss(c.equal_steps),
      fmt_delta(equal_compute.paired(c.cell, c.equal_steps)),
      fmt_loss(at_compute),
      str(equal_compute.planned_steps(at_compute.runs[0]))
      if at_compute.runs
      else "—",
      fmt_delta(equal_compute.paired(c.cell, at_compute)),
  ]


def _comparison_csv(c: equal_compute.Comparison) -> list[Any]:
  out = list(c.group) + [c.steps, c.flops] + _cell_csv(c.cell)
  for cell in (c.equal_steps, c.equal_compute):
    steps = equal_compute.planned_steps(cell.runs[0]) if cell.runs else None
    out += [steps, cell.mean, cell.std, cell.n, cell.lr]
    out += _delta_csv(equal_compute.paired(c.cell, cell))
  return out


def equal_compute_table(comps: list[equal_compute.Comparison]) -> Table:
  """Each SAM-family group beside the plain optimizer (AdamW) at equal steps
  and at equal training FLOPs (nanodo_sam/equal_compute.py); Δ = method -
  baseline, paired by seed."""
  plain = " / ".join(
      sorted(
          {
              method_label(cell.runs[0].method, c.optimizer)
              for c in comps
              for cell in (c.equal_steps, c.equal_compute)
              if cell.runs
          }
      )
  )
  baseline = []
  for side in ("steps", "compute"):
    baseline += [
        f"{side}_baseline_{k}" for k in ("steps", "mean", "std", "seeds", "lr")
    ]
    baseline += [f"{side}_delta_{k}" for k in ("mean", "std", "seeds")]
  return Table(
      "equal_compute",
      f"Equal compute: each SAM-family method beside "
      f"{plain or 'the plain optimizer'} at equal steps and at equal "
      "training FLOPs (Δ = method − baseline, paired by seed)",
      [
          "Schedule",
          "Size",
          "Nonlin.",
          "Method",
          "steps",
          "train FLOPs",
          "Eval loss",
          "equal steps",
          "Δ",
          "equal compute",
          "its steps",
          "Δ",
      ],
      [_comparison_row(c) for c in comps],
      ["schedule", "size", "nonlinearity", "method", "steps", "train_flops"]
      + CELL_CSV
      + baseline,
      [_comparison_csv(c) for c in comps],
  )


def build_tables(runs: list[RunRecord]) -> tuple[list[Table], list[str]]:
  """Every table of the runs, and notes on those skipped. The paper's tables
  compare at equal steps: compute-matched runs (`equal_compute.split`) are
  left out of them, and shown in the equal-compute table."""
  equal_steps, matched = equal_compute.split(runs)
  groups = runs_lib.group_by(equal_steps, *runs_lib.GROUP)
  tables, notes = [], []
  for key in paper.keys():
    t = paper_table(groups, key)
    if t is None:
      notes.append(f"{key}: no matching runs, skipped")
      continue
    tables.append(t)
    info = paper.info(key)
    if SHARPNESS_KEYS[0] in paper.rows(key)[0] and not any(
        r.sharpness
        for r in equal_steps
        if r.group[:2] == (info["schedule"], info["size"])
    ):
      notes.append(
          f"{key}: no sharpness.json found; run `nanodo-sam "
          "analyze --workdir=RUN` on these runs for its columns"
      )
  tables.append(summary_table(groups))
  tables.append(settings_table(groups))
  comps = equal_compute.comparisons(runs)
  if comps:
    tables.append(equal_compute_table(comps))
    notes.append(
        f"equal_compute: {len(matched)} compute-matched runs (trained for a "
        "SAM-family run's FLOPs) are left out of the equal-steps tables"
    )
  else:
    notes.append(
        "equal_compute: no compute-matched runs (a sweep's "
        '"compute_matched" key makes them), skipped'
    )
  return tables, notes


# ------------------------------------------------------------------ output


def write_outputs(
    tables: list[Table], runs: list[RunRecord], out: str, text: str
) -> None:
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "tables.md"), "w") as f:
    f.write(text + "\n")
  for t in tables:
    with open(os.path.join(out, f"{t.key}.csv"), "w", newline="") as f:
      w = csv.writer(f)
      w.writerow(t.csv_header)
      w.writerows(t.csv_rows)
  with open(os.path.join(out, "runs.csv"), "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(
        [
            "workdir",
            "schedule",
            "size",
            "nonlinearity",
            "method",
            "rho",
            "lr",
            "seed",
            "steps",
            "status",
            "eval_loss",
        ]
    )
    for r in runs:
      w.writerow(
          [
              r.workdir,
              r.schedule,
              r.size,
              r.nonlinearity,
              r.method,
              r.rho,
              r.lr,
              r.seed,
              r.steps,
              r.status,
              r.loss,
          ]
      )


def render(
    tables: list[Table], notes: list[str], n_runs: int, metric: str
) -> str:
  parts = [
      f"# Results ({n_runs} runs; ours = {metric}; " "paper = published value)"
  ]
  parts += [t.markdown() for t in tables]
  if notes:
    parts.append("Notes:\n" + "\n".join(f"- {n}" for n in notes))
  return "\n\n".join(parts)


class _Parser(argparse.ArgumentParser):
  """Bad arguments: one line on stderr, exit code 2."""

  def error(self, message):
    print(f"{PROG}: error: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv=None) -> int:
  p = _Parser(prog=PROG, description=__doc__.splitlines()[0])
  p.add_argument("dirs", nargs="+", metavar="SWEEP_DIR")
  p.add_argument("--out", default="", help="default: FIRST_DIR/tables")
  p.add_argument(
      "--metric",
      default="final_eval_loss",
      choices=tuple(runs_lib.METRICS),
      help="the results.json key ranked and shown (runs.METRICS)",
  )
  args = p.parse_args(argv)
  for d in args.dirs:
    if not os.path.isdir(d):
      print(f"{PROG}: error: {d!r} is not a directory", file=sys.stderr)
      return 2
  runs = load_runs(
      args.dirs, args.metric, warn=lambda m: print(m, file=sys.stderr)
  )
  if not runs:
    print(
        f"{PROG}: error: no results.json under {', '.join(args.dirs)};"
        " finish some runs first",
        file=sys.stderr,
    )
    return 2
  tables, notes = build_tables(runs)
  text = render(tables, notes, len(runs), args.metric)
  out = args.out or os.path.join(args.dirs[0], "tables")
  write_outputs(tables, runs, out, text)
  print(text)
  print(f"\n(markdown and CSV written to {out})")
  return 0
