"""Tables 1-6 of the paper from run directories, with the paper's numbers.

    python scripts/make_tables.py SWEEP_DIR [SWEEP_DIR ...] [--out=DIR]
        [--metric=final_eval_loss|best_eval_loss]

Reads every run under the directories (`results.json` + `config.json`, and
`sharpness.json` from `nanodo-sam analyze` when present), groups runs by
(schedule, model size, nonlinearity, method), picks the best (rho, learning
rate) per group on the mean eval loss over seeds, and prints, as markdown:

  Table 1  2M, fixed-length: AdamW / SAM / Precond SAM / Func-SAM / Precond
           Func-SAM
  Table 2  fixed-length, 23.9M..1208M x 4 methods
  Table 3  Chinchilla, 23.9M..1208M x 4 methods
  Table 4  23.9M Chinchilla: eval loss, lambda_max(H), tr(H), tr(GGN)
  Table 5  2M fixed-length: GeLU vs ReLU
  Table 6  117.9M Chinchilla: as Table 4
  Summary  every group found (whatever its size or schedule)

Each cell is mean +- std over seeds (std omitted for one seed), with the
chosen rho; the column "paper" beside it is the published number. A run whose
results.json says "diverged" counts as NaN, and a (rho, lr) setting with a
diverged seed is NaN; a group whose settings all diverged shows NaN (as the
paper's Tables 2 and 3 do). Tables without matching runs are skipped with a
note. Markdown and CSV files go to SWEEP_DIR/tables/ (or --out).
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import math
import os
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

NAN = float("nan")
SIZES = ("23.9M", "42.5M", "117.9M", "1208M")
METHOD_LABELS = {
    "adamw": "AdamW",
    "sam": "SAM",
    "precond_sam": "Precond SAM",
    "functional_sam": "Func-SAM",
    "precond_functional_sam": "Precond Func-SAM",
    "logit_sam": "Logit-SAM",
    "angle_sam": "Angle-SAM",
}
TABLE_METHODS = ("precond_functional_sam", "precond_sam", "sam", "adamw")
SHARPNESS_KEYS = ("lambda_max", "hessian_trace", "ggn_trace")

# ------------------------------------------------- the paper's own numbers
# Published values from "Avoiding spurious sharpness minimization broadens
# applicability of SAM" (Tables 1-6), shown in the "paper" columns. They are
# reference data, not results of this code. NaN: the paper's run diverged.
PAPER = {
    "table1": {"adamw": 3.90, "sam": 3.91, "precond_sam": 3.89,
               "functional_sam": 3.88, "precond_functional_sam": 3.86},
    "table2": {
        "23.9M": {"precond_functional_sam": 3.53, "precond_sam": 3.55,
                  "sam": 3.59, "adamw": 3.57},
        "42.5M": {"precond_functional_sam": 3.41, "precond_sam": 3.44,
                  "sam": 3.46, "adamw": 3.45},
        "117.9M": {"precond_functional_sam": 3.25, "precond_sam": 3.27,
                   "sam": 3.29, "adamw": 3.28},
        "1208M": {"precond_functional_sam": 3.05, "precond_sam": NAN,
                  "sam": NAN, "adamw": 3.08},
    },
    "table3": {
        "23.9M": {"precond_functional_sam": 3.63, "precond_sam": 3.66,
                  "sam": 3.71, "adamw": 3.69},
        "42.5M": {"precond_functional_sam": 3.41, "precond_sam": 3.43,
                  "sam": 3.46, "adamw": 3.45},
        "117.9M": {"precond_functional_sam": 3.10, "precond_sam": 3.11,
                   "sam": 3.13, "adamw": 3.12},
        "1208M": {"precond_functional_sam": 2.61, "precond_sam": NAN,
                  "sam": NAN, "adamw": 2.63},
    },
    # (eval loss, lambda_max(H), tr(H), tr(GGN)).
    "table4": {"adamw": (3.69, 10.61, 4897.52, 4745.03),
               "sam": (3.71, 2.71, 3324.58, 3231.46),
               "precond_sam": (3.66, 5.62, 3182.78, 3097.87),
               "precond_functional_sam": (3.63, 6.20, 2687.12, 2503.86)},
    "table5": {"gelu": {"precond_functional_sam": 3.8614,
                        "precond_sam": 3.8894, "adamw": 3.9069},
               "relu": {"precond_functional_sam": 3.8777,
                        "precond_sam": 3.8937, "adamw": 3.9145}},
    "table6": {"precond_functional_sam": (3.096, 8.884, 2790.650, 2746.559),
               "precond_sam": (3.108, 7.415, 2920.445, 2060.214),
               "sam": (3.126, 3.381, 2235.759, 2222.779),
               "adamw": (3.120, 9.259, 3299.497, 3285.881)},
}


# ------------------------------------------------------------ reading runs


@dataclass
class RunRecord:
  workdir: str
  method: str
  rho: float
  lr: float
  seed: int
  size: str
  schedule: str
  nonlinearity: str
  steps: int
  status: str
  loss: float               # NaN when diverged.
  results: dict
  config: dict
  sharpness: dict | None = None
  variant: str = ""         # Other tuned keys that differ from the default.

  @property
  def group(self) -> tuple:
    return (self.schedule, self.size, self.nonlinearity, self.method)

  @property
  def setting(self) -> tuple:
    return (self.rho, self.lr, self.variant)


def _read_json(path: str) -> Any:
  with open(path) as f:
    return json.load(f)


def _num(x, default=NAN) -> float:
  try:
    v = float(x)
  except (TypeError, ValueError):
    return default
  return v


def _infer_schedule(cfg: dict, size: str) -> str:
  """Runs made before configs set schedule_name: infer from the length."""
  steps = cfg.get("opt", {}).get("num_train_steps")
  if steps == 10_000:
    return "fixed_length"
  try:
    sys.path.insert(0, os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))))
    from configs import c4_chinchilla
    if steps in (c4_chinchilla.chinchilla_steps(size, w)
                 for w in c4_chinchilla.PARAM_COUNTS):
      return "chinchilla"
  except Exception:  # pylint: disable=broad-except
    pass
  return "unknown"


# Keys that make a run a different setting of its group (besides rho and lr),
# with their defaults (configs/base.py): e.g. SAM with rho warm-up at 1208M.
VARIANT_KEYS = {
    ("sam", "rho_warmup_steps"): 0, ("sam", "start_step"): 0,
    ("sam", "end_step"): -1, ("sam", "every_k"): 1,
    ("sam", "precond_normalize"): "after", ("sam", "phi"): None,
    ("sam", "perturbation_scope"): "global", ("opt", "weight_decay"): 0.1,
}


def _variant(cfg: dict) -> str:
  parts = []
  for (section, key), default in VARIANT_KEYS.items():
    value = cfg.get(section, {}).get(key, default)
    if value != default:
      parts.append(f"{key}={value}")
  return ",".join(parts)


def load_runs(dirs: list[str], metric: str = "final_eval_loss",
              warn=print) -> list[RunRecord]:
  """Every run (a directory with results.json) under `dirs`, deduplicated."""
  paths = []
  for d in dirs:
    paths += glob.glob(os.path.join(d, "**", "results.json"), recursive=True)
  runs, seen = [], set()
  for path in sorted(set(os.path.abspath(p) for p in paths)):
    workdir = os.path.dirname(path)
    try:
      res = _read_json(path)
      cfg_path = os.path.join(workdir, "config.json")
      cfg = _read_json(cfg_path) if os.path.exists(cfg_path) else {}
    except (OSError, ValueError) as e:
      warn(f"note: skipping {workdir}: {e}")
      continue
    model = cfg.get("model", {})
    opt = cfg.get("opt", {})
    size = res.get("model_size_name") or model.get("size_name") or \
        str(res.get("model_size", "?"))
    schedule = cfg.get("schedule_name") or _infer_schedule(cfg, size)
    status = res.get("status", "completed")
    loss = _num(res.get(metric))
    if status == "diverged" or not math.isfinite(loss):
      loss = NAN
    rho = _num(res.get("rho", cfg.get("sam", {}).get("rho")), 0.0)
    method = res.get("method") or cfg.get("sam", {}).get("method", "?")
    rec = RunRecord(
        workdir=workdir, method=method,
        rho=0.0 if method == "adamw" else rho,
        lr=_num(res.get("peak_learning_rate",
                        opt.get("peak_learning_rate"))),
        seed=int(cfg.get("seed", 0)), size=size, schedule=schedule,
        nonlinearity=model.get("nonlinearity", "gelu"),
        steps=int(res.get("steps") or 0), status=status, loss=loss,
        results=res, config=cfg, variant=_variant(cfg))
    sharp = os.path.join(workdir, "sharpness.json")
    if os.path.exists(sharp):
      try:
        rec.sharpness = _read_json(sharp)
      except (OSError, ValueError) as e:
        warn(f"note: ignoring {sharp}: {e}")
    key = rec.group + rec.setting + (rec.seed,
                                     opt.get("num_train_steps", rec.steps))
    if key in seen:
      warn(f"note: {workdir} repeats an earlier run (same method, size, "
           "schedule, rho, lr, seed); using the first")
      continue
    seen.add(key)
    runs.append(rec)
  return runs


# ------------------------------------------------------------- statistics


@dataclass
class Cell:
  """The best (rho, lr) setting of one group, over its seeds."""
  mean: float = NAN
  std: float = NAN
  n: int = 0
  rho: float = NAN
  lr: float = NAN
  settings: int = 0
  variant: str = ""
  runs: list = field(default_factory=list)

  @property
  def found(self) -> bool:
    return self.settings > 0


def _mean_std(xs: list[float]) -> tuple[float, float]:
  if not xs or any(not math.isfinite(x) for x in xs):
    return NAN, NAN
  m = sum(xs) / len(xs)
  if len(xs) < 2:
    return m, 0.0
  return m, math.sqrt(sum((x - m)**2 for x in xs) / (len(xs) - 1))


def settings_of(runs: list[RunRecord]) -> dict[tuple, list[RunRecord]]:
  out = defaultdict(list)
  for r in runs:
    out[r.setting].append(r)
  return out


def best_cell(runs: list[RunRecord]) -> Cell:
  """Best (rho, lr) on the mean over seeds; NaN if every setting diverged."""
  settings = settings_of(runs)
  if not settings:
    return Cell()
  stats = {s: _mean_std([r.loss for r in rs]) for s, rs in settings.items()}
  finite = [s for s in stats if math.isfinite(stats[s][0])]
  if not finite:  # All diverged: report NaN (at the smallest rho tried).
    s = min(settings)
    return Cell(NAN, NAN, len(settings[s]), s[0], s[1], len(settings),
                s[2], settings[s])
  s = min(finite, key=lambda k: (stats[k][0], k))
  mean, std = stats[s]
  return Cell(mean, std, len(settings[s]), s[0], s[1], len(settings), s[2],
              settings[s])


def groups_of(runs: list[RunRecord]) -> dict[tuple, list[RunRecord]]:
  out = defaultdict(list)
  for r in runs:
    out[r.group].append(r)
  return out


def sharpness_means(cell: Cell) -> dict[str, float]:
  out = {}
  for key in SHARPNESS_KEYS:
    xs = [_num(r.sharpness.get(key)) for r in cell.runs
          if r.sharpness is not None]
    out[key] = _mean_std(xs)[0] if xs else NAN
  return out


# -------------------------------------------------------------- formatting


def fmt_loss(cell: Cell, digits: int = 4, with_rho: bool = True) -> str:
  if not cell.found:
    return "—"
  text = "NaN" if not math.isfinite(cell.mean) else f"{cell.mean:.{digits}f}"
  if math.isfinite(cell.mean) and cell.n > 1:
    text += f" ± {cell.std:.{digits}f}"
  notes = []
  if with_rho and cell.runs and cell.runs[0].method != "adamw":
    notes.append(f"ρ={cell.rho:g}")
  if with_rho and cell.variant:
    notes.append(cell.variant)
  return text + (f" ({', '.join(notes)})" if notes else "")


def fmt_num(x: float, digits: int = 2) -> str:
  if x is None:
    return "—"
  return "NaN" if not math.isfinite(x) else f"{x:.{digits}f}"


def markdown(header: list[str], rows: list[list[str]]) -> str:
  lines = ["| " + " | ".join(header) + " |",
           "|" + "|".join("---" for _ in header) + "|"]
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
  return [cell.mean, cell.std, cell.n, cell.rho, cell.lr, cell.variant,
          cell.settings]


CELL_CSV = ["eval_loss_mean", "eval_loss_std", "seeds", "best_rho",
            "best_lr", "best_variant", "settings_tried"]


def _lookup(groups, schedule, size, nonlinearity, method) -> Cell:
  return best_cell(groups.get((schedule, size, nonlinearity, method), []))


def table_methods(groups, key, title, schedule, size, methods,
                  paper: dict) -> Table | None:
  cells = {m: _lookup(groups, schedule, size, "gelu", m) for m in methods}
  if not any(c.found for c in cells.values()):
    return None
  rows, csv_rows = [], []
  for m in methods:
    c = cells[m]
    rows.append([METHOD_LABELS.get(m, m), fmt_loss(c),
                 fmt_num(paper.get(m), 2), str(c.n) if c.found else "0"])
    csv_rows.append([m] + _cell_csv(c) + [paper.get(m, NAN)])
  return Table(key, title, ["Method", "Eval loss (ours)", "paper", "seeds"],
               rows, ["method"] + CELL_CSV + ["paper"], csv_rows)


def table_sizes(groups, key, title, schedule, paper: dict) -> Table | None:
  cells = {(s, m): _lookup(groups, schedule, s, "gelu", m)
           for s in SIZES for m in TABLE_METHODS}
  if not any(c.found for c in cells.values()):
    return None
  header = ["Size"]
  for m in TABLE_METHODS:
    header += [METHOD_LABELS[m], "paper"]
  rows, csv_rows = [], []
  for s in SIZES:
    if not any(cells[(s, m)].found for m in TABLE_METHODS):
      continue
    row = [s]
    for m in TABLE_METHODS:
      c = cells[(s, m)]
      row += [fmt_loss(c), fmt_num(paper[s][m], 2)]
      csv_rows.append([s, m] + _cell_csv(c) + [paper[s][m]])
    rows.append(row)
  return Table(key, title, header, rows, ["size", "method"] + CELL_CSV +
               ["paper"], csv_rows)


def table_sharpness(groups, key, title, schedule, size,
                    paper: dict) -> Table | None:
  methods = list(paper)
  cells = {m: _lookup(groups, schedule, size, "gelu", m) for m in methods}
  if not any(c.found for c in cells.values()):
    return None
  header = ["Method", "Eval loss", "paper", "λmax(H)", "paper", "tr(H)",
            "paper", "tr(GGN)", "paper"]
  rows, csv_rows = [], []
  for m in methods:
    c = cells[m]
    sh = sharpness_means(c) if c.found else {k: NAN for k in SHARPNESS_KEYS}
    p = paper[m]
    rows.append([METHOD_LABELS[m], fmt_loss(c, 4), fmt_num(p[0], 3),
                 fmt_num(sh["lambda_max"], 2), fmt_num(p[1], 2),
                 fmt_num(sh["hessian_trace"], 1), fmt_num(p[2], 1),
                 fmt_num(sh["ggn_trace"], 1), fmt_num(p[3], 1)])
    csv_rows.append([m] + _cell_csv(c) + [sh[k] for k in SHARPNESS_KEYS] +
                    list(p))
  return Table(key, title, header, rows,
               ["method"] + CELL_CSV + list(SHARPNESS_KEYS) +
               ["paper_eval_loss", "paper_lambda_max", "paper_hessian_trace",
                "paper_ggn_trace"], csv_rows)


def table5(groups) -> Table | None:
  rows, csv_rows = [], []
  for nl in ("gelu", "relu"):
    for m in ("precond_functional_sam", "precond_sam", "adamw"):
      c = _lookup(groups, "fixed_length", "2M", nl, m)
      p = PAPER["table5"][nl][m]
      if c.found:
        rows.append([{"gelu": "GeLU", "relu": "ReLU"}[nl],
                     METHOD_LABELS[m], fmt_loss(c), fmt_num(p, 4)])
        csv_rows.append([nl, m] + _cell_csv(c) + [p])
  if not any(r[0] == "ReLU" for r in rows):
    return None  # Table 5 is the comparison: ReLU runs are the point.
  return Table("table5", "Table 5: GeLU vs ReLU, 2M, fixed-length",
               ["Non-linearity", "Method", "Eval loss (ours)", "paper"], rows,
               ["nonlinearity", "method"] + CELL_CSV + ["paper"], csv_rows)


def summary_table(groups) -> Table:
  rows, csv_rows = [], []
  order = list(METHOD_LABELS)
  for g in sorted(groups, key=lambda g: (g[0], g[1], g[2],
                                         order.index(g[3]) if g[3] in order
                                         else 99, g[3])):
    c = best_cell(groups[g])
    rows.append([g[0], g[1], g[2], METHOD_LABELS.get(g[3], g[3]),
                 fmt_loss(c, with_rho=False),
                 "—" if g[3] == "adamw" else f"{c.rho:g}", f"{c.lr:g}",
                 c.variant or "—", str(c.n), str(c.settings)])
    csv_rows.append(list(g) + _cell_csv(c))
  return Table("summary", "Summary: best setting per group (all runs found)",
               ["Schedule", "Size", "Nonlin.", "Method", "Eval loss",
                "best ρ", "lr", "other", "seeds", "settings"], rows,
               ["schedule", "size", "nonlinearity", "method"] + CELL_CSV,
               csv_rows)


def settings_table(groups) -> Table:
  """Every (rho, lr) setting: the data behind Figure 3."""
  rows, csv_rows = [], []
  for g in sorted(groups):
    for (rho, lr, variant), rs in sorted(settings_of(groups[g]).items()):
      mean, std = _mean_std([r.loss for r in rs])
      diverged = sum(r.status == "diverged" for r in rs)
      rows.append([g[0], g[1], g[2], METHOD_LABELS.get(g[3], g[3]),
                   f"{rho:g}", f"{lr:g}", variant or "—",
                   "NaN" if not math.isfinite(mean) else f"{mean:.4f}",
                   f"{std:.4f}" if math.isfinite(std) and len(rs) > 1
                   else "—", str(len(rs)), str(diverged)])
      csv_rows.append(list(g) + [rho, lr, variant, mean, std, len(rs),
                                 diverged])
  return Table("settings", "Every setting (mean over seeds)",
               ["Schedule", "Size", "Nonlin.", "Method", "ρ", "lr", "other",
                "Eval loss", "std", "seeds", "diverged"], rows,
               ["schedule", "size", "nonlinearity", "method", "rho", "lr",
                "variant", "eval_loss_mean", "eval_loss_std", "seeds",
                "diverged"], csv_rows)


def build_tables(runs: list[RunRecord]) -> tuple[list[Table], list[str]]:
  groups = groups_of(runs)
  specs = [
      ("table1", lambda: table_methods(
          groups, "table1", "Table 1: 2M, fixed-length (10K steps)",
          "fixed_length", "2M",
          ("adamw", "sam", "precond_sam", "functional_sam",
           "precond_functional_sam"), PAPER["table1"])),
      ("table2", lambda: table_sizes(
          groups, "table2", "Table 2: fixed-length (10K steps)",
          "fixed_length", PAPER["table2"])),
      ("table3", lambda: table_sizes(
          groups, "table3", "Table 3: Chinchilla-style", "chinchilla",
          PAPER["table3"])),
      ("table4", lambda: table_sharpness(
          groups, "table4", "Table 4: sharpness, 23.9M, Chinchilla",
          "chinchilla", "23.9M", PAPER["table4"])),
      ("table5", lambda: table5(groups)),
      ("table6", lambda: table_sharpness(
          groups, "table6", "Table 6: sharpness, 117.9M, Chinchilla",
          "chinchilla", "117.9M", PAPER["table6"])),
  ]
  tables, notes = [], []
  for key, make in specs:
    t = make()
    if t is None:
      notes.append(f"{key}: no matching runs, skipped")
    else:
      tables.append(t)
      if key in ("table4", "table6") and not any(
          r.sharpness for r in runs if r.group[:2] == (
              "chinchilla", "23.9M" if key == "table4" else "117.9M")):
        notes.append(f"{key}: no sharpness.json found; run `nanodo-sam "
                     "analyze --workdir=RUN` on these runs for its columns")
  tables.append(summary_table(groups))
  tables.append(settings_table(groups))
  return tables, notes


def write_outputs(tables: list[Table], notes: list[str], runs, out: str,
                  text: str) -> None:
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
    w.writerow(["workdir", "schedule", "size", "nonlinearity", "method",
                "rho", "lr", "seed", "steps", "status", "eval_loss"])
    for r in runs:
      w.writerow([r.workdir, r.schedule, r.size, r.nonlinearity, r.method,
                  r.rho, r.lr, r.seed, r.steps, r.status, r.loss])


def render(tables: list[Table], notes: list[str], n_runs: int,
           metric: str) -> str:
  parts = [f"# Results ({n_runs} runs; eval loss = {metric}; "
           "paper = published value)"]
  parts += [t.markdown() for t in tables]
  if notes:
    parts.append("Notes:\n" + "\n".join(f"- {n}" for n in notes))
  return "\n\n".join(parts)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("dirs", nargs="+", metavar="SWEEP_DIR")
  p.add_argument("--out", default="", help="default: FIRST_DIR/tables")
  p.add_argument("--metric", default="final_eval_loss",
                 choices=("final_eval_loss", "best_eval_loss"))
  args = p.parse_args(argv)
  for d in args.dirs:
    if not os.path.isdir(d):
      print(f"make_tables: error: {d!r} is not a directory", file=sys.stderr)
      return 2
  runs = load_runs(args.dirs, args.metric,
                   warn=lambda m: print(m, file=sys.stderr))
  if not runs:
    print(f"make_tables: error: no results.json under {', '.join(args.dirs)};"
          " finish some runs first", file=sys.stderr)
    return 2
  tables, notes = build_tables(runs)
  text = render(tables, notes, len(runs), args.metric)
  out = args.out or os.path.join(args.dirs[0], "tables")
  write_outputs(tables, notes, runs, out, text)
  print(text)
  print(f"\n(markdown and CSV written to {out})")
  return 0


if __name__ == "__main__":
  try:
    sys.exit(main())
  except BrokenPipeError:  # Output piped into `head`.
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.exit(1)
