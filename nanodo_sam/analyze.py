"""`nanodo-sam analyze`: the sharpness of one checkpoint (the paper's Table 4
columns), written to the run directory as sharpness.json and shown as a
table row.

The metrics are the training loop's diagnostics (diagnostics.py) on the
fixed eval batches, at the peak learning rate: at the end of a decayed
schedule the rate in effect is ~0, and SAM-edge and 2/lr would be
meaningless.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp

from nanodo_sam import diagnostics
from nanodo_sam import evaluate
from nanodo_sam import hlo_cost
from nanodo_sam import sharding
from nanodo_sam import state as state_lib

COLUMNS = (
    "eval_loss",
    "lambda_max",
    "hessian_trace",
    "ggn_trace",
    "tau_logit",
    "tau_func",
    "tau_cross",
    "tau_logit_precond",
    "tau_func_precond",
    "tau_cross_precond",
    "sam_edge",
    "two_over_lr",
)


def measure(cfg, restored, eval_data) -> dict:
  """The eval loss and sharpness of a checkpoint.Restored, with the
  settings they were measured at (the sharpness.json record)."""
  s, state, step = restored
  loss = evaluate.eval_loss(
      evaluate.eval_step_for(s),
      state.params,
      eval_data,
      lambda b: sharding.global_batch(b, s.mesh),
  )
  lr = cfg.opt.peak_learning_rate
  sharp = diagnostics.make_sharpness(cfg, s, eval_data)
  out = diagnostics.to_scalars(
      sharp(state, lr, cfg.sam.rho, jax.random.key(cfg.seed))
  )
  d = cfg.diagnostics
  out.update(
      eval_loss=loss,
      step=step,
      method=cfg.sam.method,
      rho=cfg.sam.rho,
      learning_rate=lr,
      num_batches=d.num_batches,
      batch_size=d.batch_size,
      num_iters=d.num_iters,
      num_probes=d.num_probes,
  )
  return out


def write(workdir: str, out: dict, latest: bool) -> str:
  """sharpness.json (the newest checkpoint) or sharpness_<step>.json in
  `workdir`; returns its path."""
  name = "sharpness.json" if latest else f"sharpness_{out['step']}.json"
  path = os.path.join(workdir, name)
  with open(path, "w") as f:
    json.dump(out, f, indent=2, sort_keys=True)
  return path


def table(out: dict) -> str:
  """A markdown table of COLUMNS with `out` as its one row."""
  return "\n".join(
      [
          f"| step | {' | '.join(COLUMNS)} |",
          "|---" * (len(COLUMNS) + 1) + "|",
          f"| {out['step']} | "
          + " | ".join(f"{out[k]:.4g}" if k in out else "n/a" for k in COLUMNS)
          + " |",
      ]
  )


def compiled_memory(cfg) -> dict:
  """Bytes per device of the program `analyze` runs for config `cfg`
  (`diagnostics.sharpness_fn` on the diagnostics batches), lowered on
  abstract inputs (nothing allocated) on the config's mesh and compiled:
  XLA's `memory_analysis()` (`hlo_cost.memory_bytes`), and the rows of the
  batch it measured on."""
  s = state_lib.setup(cfg)
  rows = cfg.diagnostics.batch_size * cfg.diagnostics.num_batches
  tokens = jax.ShapeDtypeStruct(
      (rows, cfg.model.L), jnp.int32, sharding=sharding.batch_sharding(s.mesh)
  )
  batch = {
      "inputs": tokens,
      "targets": tokens,
      "weights": jax.ShapeDtypeStruct(
          tokens.shape, jnp.float32, sharding=tokens.sharding
      ),
  }
  scalar = jax.ShapeDtypeStruct((), jnp.float32)
  fn = diagnostics.sharpness_fn(cfg, s)
  compiled = (
      jax.jit(fn)
      .lower(s.abstract_state, batch, scalar, scalar, jax.random.key(0))
      .compile()
  )
  return {"batch_rows": rows, **hlo_cost.memory_bytes(compiled)}
