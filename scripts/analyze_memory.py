"""Memory of `nanodo-sam analyze` per model size, from XLA's buffer assignment.

    python scripts/analyze_memory.py [--sizes=2M,23.9M,42.5M,117.9M,1208M]
        [--devices=8] [--num_iters=20] [--num_probes=10] [--out=FILE.json]

For each size of configs/c4_fixed_length.py, the function `analyze` jits
(`analyze.compiled_memory`: loss, the tau split along g and P^-1 g,
lambda_max by Lanczos, Hutchinson traces of H and H_G) is lowered on
abstract inputs (nothing is allocated) on a mesh of `--devices` CPU devices
with FSDP over all of them (the parameters, AdamW's moments, the Krylov basis
and the probes split like the parameters), compiled, and XLA's
`memory_analysis()` gives the bytes per device: arguments (the train state
and the batch), temporaries (basis, probes, activations) and outputs. The
same numbers hold on a GPU or TPU mesh of that size up to the backend's own
fusion choices. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

# The paper's fixed-length config, beside this script's folder.
CONFIG = os.path.join(
    os.path.dirname(os.path.abspath(__file__)),
    "..",
    "configs",
    "c4_fixed_length.py",
)


def measure(size: str, num_iters: int, num_probes: int) -> dict:
  import jax
  from nanodo_sam import analyze
  from nanodo_sam import config as config_lib
  from nanodo_sam import model as model_lib

  cfg = config_lib.load_config_file(f"{CONFIG}:{size}")
  with cfg.unlocked():
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 1, -1, 1
    cfg.diagnostics.num_iters, cfg.diagnostics.num_probes = (
        num_iters,
        num_probes,
    )
    # analyze runs no train step: no microbatch search, and a simulated CPU
    # device stands for an 80 GB GPU.
    cfg.grad_accumulation_steps, cfg.mesh.device_memory_gb = 1, 80.0
  t0 = time.time()
  memory = analyze.compiled_memory(cfg)
  return {
      "size": size,
      "params": model_lib.total_params(cfg.model),
      "devices": jax.device_count(),
      "batch_rows": memory.pop("batch_rows"),
      "L": cfg.model.L,
      "num_iters": num_iters,
      "num_probes": num_probes,
      "compile_s": round(time.time() - t0, 1),
      **{f"{k}_bytes": v for k, v in memory.items()},
  }


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--sizes", default="2M,23.9M,42.5M,117.9M,1208M")
  p.add_argument("--devices", type=int, default=8)
  p.add_argument("--num_iters", type=int, default=20)
  p.add_argument("--num_probes", type=int, default=10)
  p.add_argument("--out", default="analyze_memory.json")
  args = p.parse_args(argv)
  os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "") + " --xla_force_"
      f"host_platform_device_count={args.devices}"
  )
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  rows = []
  print(
      "| size | params | devices | args GiB/dev | temp GiB/dev | "
      "total GiB/dev | compile s |"
  )
  print("|---|---|---|---|---|---|---|")
  for size in args.sizes.split(","):
    r = measure(size, args.num_iters, args.num_probes)
    rows.append(r)
    gib = lambda k: f"{r[k] / 2**30:.3f}"
    print(
        f"| {size} | {r['params'] / 1e6:.1f}M | {r['devices']} | "
        f"{gib('argument_bytes')} | {gib('temp_bytes')} | "
        f"{gib('total_bytes')} | {r['compile_s']} |",
        flush=True,
    )
  with open(args.out, "w") as f:
    json.dump(rows, f, indent=2)
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
