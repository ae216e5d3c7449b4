"""The paper's sizes planned on real compilers: `nanodo-sam plan` over a grid.

    python scripts/scale_report.py [--targets=h100x8,tpu-v5p-8]
        [--sizes=2M,23.9M,42.5M,117.9M,1208M]
        [--methods=adamw,sam,precond_functional_sam]
        [--also=h100x16:1208M,tpu-v5p-64:1208M] [--analyze=1208M]
        [--set=KEY=VALUE ...] [--out=docs/scale_plan.json]
    python scripts/scale_report.py --table=docs/scale_plan.json[,MORE.json]

For each target, size of configs/c4_fixed_length.py (bf16, batch 256 x 512)
and method, the run with FSDP over every chip of the target
(mesh.data=1, fsdp=-1, tensor=1), grad_accumulation_steps=0 (auto, fitted to
the target's memory), rho 0.05 for the SAM family, is handed to
`nanodo_sam.plan.plan`, which compiles its steps with the target's own
compiler (XLA's GPU compiler for h100x8, libtpu for tpu-v5p-8; `cpu-sim-N`:
N simulated CPU devices) and reads them back per chip. `--also` adds
TARGET:SIZE pairs (a multi-host target at 1208M); `--analyze` the
function `nanodo-sam analyze` jits, at the sizes given, on every target.

Rows are written to --out as they come; a second run with the same --out
skips the (target, size, method) rows already there, so it resumes.
"""

from __future__ import annotations

import argparse
import ast
import datetime
import json
import os
import sys
import time

GiB = 2**30
SIZES = "2M,23.9M,42.5M,117.9M,1208M"
METHODS = "adamw,sam,precond_functional_sam"


def size_config(size: str, method: str, analyze: bool = False, overrides=()):
  """configs/c4_fixed_length.py:SIZE with FSDP over every chip, `method`,
  the target's memory as the budget and (with `analyze`) the diagnostics
  on, so that `plan` also compiles the function `analyze` jits."""
  from nanodo_sam import config as config_lib

  cfg = config_lib.load_config_file(f"configs/c4_fixed_length.py:{size}")
  with cfg.unlocked():
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 1, -1, 1
    cfg.mesh.device_memory_gb = 0.0
    cfg.grad_accumulation_steps = 0
    cfg.sam.method = method
    cfg.sam.rho = 0.0 if method == "adamw" else 0.05
    cfg.diagnostics.every_steps = 1000 if analyze else 0
    for key, text in overrides:
      try:
        value = ast.literal_eval(text)
      except (ValueError, SyntaxError):
        value = text  # A string.
      cfg.update_from_flattened_dict({key: value})
  return cfg


def row(
    target: str, size: str, method: str, analyze: bool, overrides=()
) -> dict:
  """One plan, flattened for the table (`plan.plan`'s report inside)."""
  from nanodo_sam import plan
  from nanodo_sam import targets

  t0 = time.time()
  report = plan.plan(
      size_config(size, method, analyze, overrides), targets.get(target)
  )
  return {
      "target": target,
      "size": size,
      "method": method,
      "analyze": analyze,
      "wall_s": round(time.time() - t0, 1),
      "report": report,
  }


def _cells(r: dict, p: dict) -> list[str]:
  rep = r["report"]
  c = p["collective_bytes"]
  by = p["collective_bytes_by_dtype"]
  f32 = sum(v.get("f32", 0.0) for v in by.values())
  est = p["estimate"]
  step = f"{est['step_s'] * 1e3:.0f}" if "step_s" in est else "-"
  mfu = f"{est['mfu']:.0%}" if "mfu" in est else "-"
  mem = rep["target"]["memory_bytes"]
  return [
      r["target"],
      r["size"],
      r["method"],
      p["what"],
      str(rep["microbatches"]),
      f"{p['memory_bytes']['total'] / GiB:.1f}"
      + (f" ({p['memory_bytes']['total'] / mem:.0%})" if mem else ""),
      rep["attention"]["kernel"],
      f"{c['all-gather'] / GiB:.2f}",
      f"{c['reduce-scatter'] / GiB:.2f}",
      f"{c['all-reduce'] / GiB:.2f}",
      f"{(c['all-to-all'] + c['collective-permute']) / GiB:.2f}",
      f"{f32 / max(c['total'], 1):.0%}",
      f"{p['collective_ratio']:.2f}",
      f"{p['matmul_flops'] / 1e12:.1f}",
      step,
      mfu,
  ]


HEADER = [
    "target",
    "size",
    "method",
    "program",
    "microbatches",
    "memory GiB/chip (of chip)",
    "attention",
    "all-gather GiB",
    "reduce-scatter GiB",
    "all-reduce GiB",
    "other GiB",
    "f32 share of collectives",
    "collectives x f32 params",
    "matmul TFLOP/chip",
    "est. step ms (TPU)",
    "est. MFU",
]


def table(rows: list[dict]) -> str:
  lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
  for r in rows:
    if "error" in r:
      lines.append(
          f"| {r['target']} | {r['size']} | {r['method']} | "
          f"{r['error']} |" + " |" * (len(HEADER) - 4)
      )
      continue
    for p in r["report"]["programs"]:
      lines.append("| " + " | ".join(_cells(r, p)) + " |")
  return "\n".join(lines)


def _order(r: dict) -> tuple:
  """Table order: target, then size as in SIZES, then method."""
  sizes, methods = SIZES.split(","), METHODS.split(",")
  return (
      r["target"],
      sizes.index(r["size"]) if r["size"] in sizes else 99,
      methods.index(r["method"]) if r["method"] in methods else 99,
  )


def jobs(args) -> list[tuple[str, str, str, bool]]:
  """(target, size, method, analyze) in order."""
  analyze = set(filter(None, args.analyze.split(",")))
  out = [
      (t, s, m, s in analyze)
      for t in args.targets.split(",")
      for s in args.sizes.split(",")
      for m in args.methods.split(",")
  ]
  for pair in filter(None, args.also.split(",")):
    t, s = pair.split(":")
    out += [(t, s, m, False) for m in args.methods.split(",")]
  return out


def _parser() -> argparse.ArgumentParser:
  """The script's flags."""
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--targets", default="h100x8,tpu-v5p-8")
  p.add_argument("--sizes", default=SIZES)
  p.add_argument("--methods", default=METHODS)
  p.add_argument(
      "--also",
      default="h100x16:1208M",
      help="TARGET:SIZE pairs planned for every method too",
  )
  p.add_argument(
      "--analyze",
      default="",
      help="sizes whose analyze function is planned too",
  )
  p.add_argument(
      "--set",
      action="append",
      default=[],
      help="KEY=VALUE config override, e.g. model.remat=True",
  )
  p.add_argument("--out", default="")
  p.add_argument("--table", default="", help="only print a JSON's table")
  return p


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  if args.table:  # Several files (runs split over processes): one table.
    rows = []
    for path in args.table.split(","):
      with open(path) as f:
        rows += json.load(f)["rows"]
    print(table(sorted(rows, key=_order)))
    return 0
  import jax

  jax.config.update("jax_platforms", "cpu")  # Only compiles.
  from nanodo_sam import targets
  from nanodo_sam.errors import UsageError

  todo = jobs(args)
  sims = [
      targets.get(t).chips for t, *_ in todo if targets.get(t).platform == "cpu"
  ]
  if sims:  # Before JAX starts its CPU backend.
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_"
        f"force_host_platform_device_count={max(sims)}"
    )
  rows = []
  if args.out and os.path.exists(args.out):  # Resume.
    with open(args.out) as f:
      rows = json.load(f)["rows"]
  done = {(r["target"], r["size"], r["method"]) for r in rows}
  overrides = [kv.split("=", 1) for kv in args.set]
  for t, s, m, analyze in todo:
    if (t, s, m) in done:
      continue
    try:
      r = row(t, s, m, analyze, overrides)
    except UsageError as e:  # Does not fit: the row says why.
      r = {"target": t, "size": s, "method": m, "error": str(e)}
    rows.append(r)
    print(table([r]).splitlines()[-1], flush=True)
    if args.out:
      with open(args.out, "w") as f:
        json.dump(
            {"date": datetime.date.today().isoformat(), "rows": rows},
            f,
            indent=1,
        )
  return 0


if __name__ == "__main__":
  sys.exit(main())
