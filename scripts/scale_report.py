"""What the train step and `analyze` cost per device on a mesh, by compiling.

    python scripts/scale_report.py [--sizes=2M,23.9M,42.5M,117.9M,1208M]
        [--methods=adamw,sam,precond_functional_sam] [--devices=8]
        [--memory_gb=80] [--analyze] [--out=docs/scale_report.json]

For each size of configs/c4_fixed_length.py (bf16, batch 256 x 512) and
each method, the project's own train step (`state.setup(cfg)`, then
`train.jit_step(s, kind).lower(abstract_state, batch).compile()` on
`jax.ShapeDtypeStruct` inputs: nothing is allocated) is compiled on a mesh
of `--devices` simulated CPU devices with FSDP over all of them, and
`--memory_gb` standing for each device's memory (`mesh.device_memory_gb`:
the budget grad_accumulation_steps=0 fits the step into). From XLA's
compiled program it reports per device and per step:

- memory: XLA's buffer assignment (`memory_analysis()`);
- collective bytes by kind, weighted by the trip counts of the loops they
  run in (`nanodo_sam.hlo_cost`), and their ratio to the f32 parameter
  bytes;
- matmul FLOPs with loop trip counts (cost_analysis counts a loop body once);
- the microbatches the step was resolved to.

With --analyze, also the function `nanodo-sam analyze` jits
(`diagnostics.sharpness_fn`) per size: its memory per device. Prints a
markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

GiB = 2**30


def size_config(size: str, method: str, memory_gb: float, overrides=()):
  from nanodo_sam import config as config_lib

  cfg = config_lib.load_config_file(f"configs/c4_fixed_length.py:{size}")
  with cfg.unlocked():
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 1, -1, 1
    cfg.mesh.device_memory_gb = memory_gb
    cfg.sam.method = method
    cfg.sam.rho = 0.0 if method == "adamw" else 0.05
    for k, v in overrides:
      node = cfg
      *path, last = k.split(".")
      for p in path:
        node = node[p]
      node[last] = type(node[last])(v) if node[last] is not None else v
  return cfg


def abstract_batch(s, rows: int):
  import jax
  import jax.numpy as jnp
  from nanodo_sam import sharding

  tokens = jax.ShapeDtypeStruct(
      (rows, s.cfg.model.L), jnp.int32, sharding=sharding.batch_sharding(s.mesh)
  )
  return {
      "inputs": tokens,
      "targets": tokens,
      "weights": jax.ShapeDtypeStruct(
          tokens.shape, jnp.float32, sharding=tokens.sharding
      ),
  }


def param_bytes(s) -> int:
  import jax

  return sum(x.size * 4 for x in jax.tree.leaves(s.abstract_state.params))


def measure_step(
    size: str, method: str, memory_gb: float, overrides=()
) -> dict:
  from nanodo_sam import hlo_cost
  from nanodo_sam import state as state_lib
  from nanodo_sam import train

  t0 = time.time()
  cfg = size_config(size, method, memory_gb, overrides)
  s = state_lib.setup(cfg)
  kind = "plain" if method == "adamw" else "sam"
  compiled = (
      train.jit_step(s, kind)
      .lower(s.abstract_state, abstract_batch(s, cfg.data.batch_size))
      .compile()
  )
  out = hlo_cost.summary(compiled)
  if os.environ.get("SCALE_REPORT_HLO_DIR"):  # For reading what XLA did.
    with open(
        os.path.join(
            os.environ["SCALE_REPORT_HLO_DIR"], f"{size}_{method}.hlo"
        ),
        "w",
    ) as f:
      f.write(compiled.as_text())
  pb = param_bytes(s)
  return {
      "size": size,
      "method": method,
      "what": "train step",
      "microbatches": s.cfg.grad_accumulation_steps,
      "remat": bool(s.cfg.model.remat),
      "head_chunk_tokens": s.cfg.model.get("head_chunk_tokens"),
      "param_bytes_f32": pb,
      "collective_ratio": out["collective_bytes"]["total"] / pb,
      "seconds": round(time.time() - t0, 1),
      **out,
  }


def measure_analyze(size: str, memory_gb: float, overrides=()) -> dict:
  import jax
  import jax.numpy as jnp
  from nanodo_sam import diagnostics
  from nanodo_sam import hlo_cost
  from nanodo_sam import state as state_lib

  t0 = time.time()
  cfg = size_config(size, "adamw", memory_gb, overrides)
  s = state_lib.setup(cfg)
  rows = cfg.diagnostics.batch_size * cfg.diagnostics.num_batches
  scalar = jax.ShapeDtypeStruct((), jnp.float32)
  compiled = (
      jax.jit(diagnostics.sharpness_fn(cfg, s))
      .lower(
          s.abstract_state,
          abstract_batch(s, rows),
          scalar,
          scalar,
          jax.random.key(0),
      )
      .compile()
  )
  out = hlo_cost.summary(compiled)
  pb = param_bytes(s)
  return {
      "size": size,
      "method": "-",
      "what": "analyze",
      "param_bytes_f32": pb,
      "collective_ratio": out["collective_bytes"]["total"] / pb,
      "seconds": round(time.time() - t0, 1),
      **out,
  }


def head_chunks(
    D: int, rows: int, L: int, V: int, chunks, time_it: bool
) -> list[dict]:
  """The chunked output head alone (`sam.head_vjp`: output layer, loss,
  its cotangent and both gradients) on one device at width D for `rows` x
  L tokens, per chunk size in tokens: XLA's temporaries, and with
  `time_it` the median wall time of 3 runs after a warm-up."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from nanodo_sam import model as model_lib
  from nanodo_sam import head as head_lib
  from nanodo_sam.loss import OutputHead

  rng = np.random.default_rng(0)
  emb = jnp.asarray(rng.normal(size=(V, D)) / D**0.5, jnp.float32)
  h = jnp.asarray(rng.normal(size=(rows, L, D)), jnp.float32)
  batch = {
      "targets": jnp.asarray(rng.integers(0, V, (rows, L)), jnp.int32),
      "weights": jnp.ones((rows, L), jnp.float32),
  }
  out = []
  for tokens in chunks:
    head = OutputHead(
        features=lambda p, x: x,
        select=lambda p: p["emb"],
        apply=lambda e, x: model_lib.output_logits(e, x),
        chunk_tokens=tokens,
    )

    def fn(emb, h, batch, head=head):
      pt = head_lib.Point(emb, h, lambda ct: (ct,))  # Grads of (emb, h).
      return head_lib.head_vjp(pt, pt, batch, None, head)

    c = jax.jit(fn).lower(emb, h, batch).compile()
    row = {
        "D": D,
        "V": V,
        "tokens": rows * L,
        "chunk_tokens": tokens,
        "chunks": rows * L // min(tokens, rows * L),
        "temp_bytes": c.memory_analysis().temp_size_in_bytes,
    }
    if time_it:
      jax.block_until_ready(c(emb, h, batch))
      times = []
      for _ in range(3):
        t0 = time.perf_counter()
        jax.block_until_ready(c(emb, h, batch))
        times.append(time.perf_counter() - t0)
      row["seconds"] = float(np.median(times))
    out.append(row)
    print(row, flush=True)
  return out


HEADER = (
    "| size | what | method | microbatches | memory GiB/dev | "
    "all-gather GiB | reduce-scatter GiB | all-reduce GiB | "
    "other GiB | collectives x f32 params | matmul TFLOP/dev |"
)


def format_row(r: dict) -> str:
  c = r["collective_bytes"]
  other = c["all-to-all"] + c["collective-permute"]
  return (
      f"| {r['size']} | {r['what']} | {r['method']} | "
      f"{r.get('microbatches', '-')} | "
      f"{r['memory_bytes']['total'] / GiB:.1f} | "
      f"{c['all-gather'] / GiB:.2f} | {c['reduce-scatter'] / GiB:.2f} | "
      f"{c['all-reduce'] / GiB:.2f} | {other / GiB:.2f} | "
      f"{r['collective_ratio']:.2f} | {r['matmul_flops'] / 1e12:.1f} |"
  )


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--sizes", default="2M,23.9M,42.5M,117.9M,1208M")
  p.add_argument("--methods", default="adamw,sam,precond_functional_sam")
  p.add_argument("--devices", type=int, default=8)
  p.add_argument("--memory_gb", type=float, default=80.0)
  p.add_argument("--analyze", action="store_true")
  p.add_argument(
      "--no_steps", action="store_true", help="only analyze (with --analyze)"
  )
  p.add_argument(
      "--append",
      action="store_true",
      help="add the rows to those already in --out",
  )
  p.add_argument(
      "--set",
      action="append",
      default=[],
      help="KEY=VALUE config override, e.g. model.remat=True",
  )
  p.add_argument("--out", default="")
  p.add_argument(
      "--head_chunks",
      action="store_true",
      help="only measure the output head's chunk sizes",
  )
  p.add_argument(
      "--table",
      default="",
      help="only print the table of a JSON file this wrote",
  )
  args = p.parse_args(argv)
  if args.table:
    with open(args.table) as f:
      report = json.load(f)
    print(HEADER)
    print("|" + "---|" * (HEADER.count(" | ") + 1))
    for r in report["rows"]:
      print(format_row(r))
    return 0
  if args.head_chunks:
    rows = {
        "memory_1208M": head_chunks(
            4096,
            32,
            512,
            32101,
            (512, 1024, 2048, 4096, 8192, 16384),
            time_it=False,
        ),
        "time_23.9M": head_chunks(
            576, 4, 512, 32101, (128, 256, 512, 1024, 2048), time_it=True
        ),
    }
    if args.out:
      with open(args.out, "w") as f:
        json.dump(
            {"date": datetime.date.today().isoformat(), **rows}, f, indent=1
        )
    return 0
  os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "") + " --xla_force_"
      f"host_platform_device_count={args.devices}"
  )
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  overrides = [kv.split("=", 1) for kv in args.set]
  rows = []
  if args.append and os.path.exists(args.out):  # Add to an earlier run's.
    with open(args.out) as f:
      rows = json.load(f)["rows"]
  print(HEADER)
  print("|" + "---|" * (HEADER.count(" | ") + 1))
  for size in args.sizes.split(","):
    jobs = [
        ("step", m) for m in args.methods.split(",") if m and not args.no_steps
    ]
    jobs += [("analyze", None)] if args.analyze else []
    for what, method in jobs:
      r = (
          measure_step(size, method, args.memory_gb, overrides)
          if what == "step"
          else measure_analyze(size, args.memory_gb, overrides)
      )
      r["devices"] = args.devices
      rows.append(r)
      print(format_row(r), flush=True)
      if args.out:
        _write(args, rows)
  return 0


def _write(args, rows) -> None:
  with open(args.out, "w") as f:
    json.dump(
        {
            "date": datetime.date.today().isoformat(),
            "devices": args.devices,
            "memory_gb": args.memory_gb,
            "hardware": f"{args.devices} simulated CPU devices",
            "rows": rows,
        },
        f,
        indent=1,
    )


if __name__ == "__main__":
  sys.exit(main())
