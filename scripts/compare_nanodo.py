"""Side by side with Nanodo's own source: init, bfloat16 logits, one step.

    python scripts/compare_nanodo.py [--nanodo=PATH] [--out=compare_nanodo.json]

--nanodo is a checkout of google-deepmind/nanodo (default: $NANODO_SRC).

Prints a markdown table and writes JSON (the numbers in docs/fidelity.md):
for the paper's 2M shape at initialisation (V = 32,101, L = 512), on Nanodo's
parameters mapped onto this project's tree,
  - each kernel's std under this project's default and legacy init, as a
    multiple of Nanodo's (xavier_uniform);
  - the max |logits - Nanodo's logits| in float32;
  - the rms and max error of bfloat16 logits against float32 ones, for
    Nanodo, this project's default (float32 residual stream) and its legacy
    path (`model.residual_dtype=compute`).
Needs the Nanodo source (tests/test_fidelity.py checks the same things).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

SHAPE = dict(D=256, H=4, N=3, F=1024, L=512, V=32101)  # The paper's 2M.


def init_stds(ref, params) -> dict:
  """{init: {block-0 kernel: its std / Nanodo's}} under this project's
  default (xavier_uniform) and legacy init."""
  import jax
  from nanodo_sam import model as model_lib

  theirs = ref.kernels(ref.to_project(params, SHAPE["N"]))
  out = {}
  for init in ("xavier_uniform", "fan_in_truncated_normal"):
    ours = ref.kernels(
        model_lib.init_params(
            ref.project_model(**SHAPE, kernel_init=init), jax.random.key(0)
        )
    )
    out[init] = {
        k.split("']['", 1)[1]
        .rstrip("']")
        .replace("']['", "/"): float(ours[k].std() / theirs[k].std())
        for k in ours
        if "block_0" in k
    }
  return out


def logits_errors(ref, nanodo_src: str, nanodo, params, tokens) -> dict:
  """The float32 max |ours - Nanodo's| and, per model, the rms and max
  error of its bfloat16 logits against its float32 ones."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  mapped = ref.to_project(params, SHAPE["N"])
  apply = lambda m: jax.jit(lambda p, t: m.apply({"params": p}, t))
  ours_f32 = np.asarray(apply(ref.project_model(**SHAPE))(mapped, tokens))
  nano_f32 = np.asarray(apply(nanodo)(params, tokens))
  nb = ref.model(nanodo_src, **SHAPE, dtype=jnp.bfloat16)
  low = {"nanodo": np.asarray(apply(nb)(params, tokens)) - nano_f32}
  for residual in ("float32", "compute"):
    m = ref.project_model(**SHAPE, dtype="bfloat16", residual_dtype=residual)
    low[f"project residual_dtype={residual}"] = (
        np.asarray(apply(m)(mapped, tokens)) - ours_f32
    )
  return {
      "float32_max_abs_diff_vs_nanodo": float(
          np.abs(ours_f32 - nano_f32).max()
      ),
      "bfloat16_logits_error": {
          name: {
              "rms": float(np.sqrt(np.mean(d**2))),
              "max": float(np.abs(d).max()),
          }
          for name, d in low.items()
      },
  }


def print_tables(out: dict) -> None:
  print(
      f"2M shape, V={SHAPE['V']}, L={SHAPE['L']}, batch {out['batch']}, at "
      f"init; float32 max |ours - Nanodo's| = "
      f"{out['float32_max_abs_diff_vs_nanodo']:.3g}\n"
  )
  print("| kernel (block 0) | std x Nanodo, default | std x Nanodo, legacy |")
  print("|---|---|---|")
  d, l = (
      out["init_std_vs_nanodo"][k]
      for k in ("xavier_uniform", "fan_in_truncated_normal")
  )
  for k in d:
    print(f"| {k} | {d[k]:.3f} | {l[k]:.3f} |")
  print("\n| bfloat16 logits vs float32 | rms | max |\n|---|---|---|")
  for name, e in out["bfloat16_logits_error"].items():
    print(f"| {name} | {e['rms']:.4f} | {e['max']:.4f} |")


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--nanodo", default=os.environ.get("NANODO_SRC", ""))
  p.add_argument("--out", default="compare_nanodo.json")
  p.add_argument("--batch", type=int, default=4)
  args = p.parse_args(argv)
  if not os.path.isdir(os.path.join(args.nanodo, "nanodo")):
    print(
        f"compare_nanodo: error: no Nanodo source in {args.nanodo!r}; pass "
        "--nanodo=PATH (or set NANODO_SRC) to a google-deepmind/nanodo "
        "checkout",
        file=sys.stderr,
    )
    return 2
  import jax
  from nanodo_sam import nanodo_ref as ref

  nanodo = ref.model(args.nanodo, **SHAPE)
  params = ref.init(nanodo, SHAPE["L"])
  tokens = jax.random.randint(
      jax.random.key(1), (args.batch, SHAPE["L"]), 0, SHAPE["V"]
  )
  out = {
      "shape": SHAPE,
      "batch": args.batch,
      "init_std_vs_nanodo": init_stds(ref, params),
      **logits_errors(ref, args.nanodo, nanodo, params, tokens),
  }
  print_tables(out)
  with open(args.out, "w") as f:
    json.dump(out, f, indent=2)
  print(f"\nwrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
