"""Which gradient each step takes, and the rho in effect (config `sam.*`).

The loop picks one of the compiled steps on the host (`step_kind`), so a step
outside the SAM window or between two `every_k` steps costs exactly a plain
step; `rho_at` runs inside the jitted step.
"""

from __future__ import annotations

import jax.numpy as jnp

from nanodo_sam import sam as sam_lib
from nanodo_sam.errors import UsageError


def rho_at(sam_cfg, step):
  """rho, warmed up linearly from 0 over rho_warmup_steps."""
  if sam_cfg.rho_warmup_steps <= 0:
    return jnp.asarray(sam_cfg.rho, jnp.float32)
  frac = jnp.minimum((step + 1) / sam_cfg.rho_warmup_steps, 1.0)
  return sam_cfg.rho * frac.astype(jnp.float32)


def uses_sam_step(sam_cfg, step: int) -> bool:
  """Whether step `step` takes the configured SAM-family gradient."""
  if sam_lib.is_plain(sam_cfg.method) or step < sam_cfg.start_step:
    return False
  if 0 <= sam_cfg.end_step <= step:
    return False
  return (step - sam_cfg.start_step) % sam_cfg.every_k == 0


def step_kind(sam_cfg, step: int) -> str:
  """Which compiled step runs step `step`: "sam" (the configured method's
  gradient), "reuse" (between two of those with sam.reuse on: the plain
  gradient plus the carried correction) or "plain"."""
  if uses_sam_step(sam_cfg, step):
    return "sam"
  in_window = (not sam_lib.is_plain(sam_cfg.method)
               and step >= sam_cfg.start_step
               and not 0 <= sam_cfg.end_step <= step)
  return "reuse" if in_window and sam_cfg.get("reuse", False) else "plain"


def adamw_step_equivalents(num_train_steps: int, start_step: int,
                           method: str) -> int:
  """Cost of a run switching to `method` at `start_step`: plain steps count
  1, SAM-family steps 2 (two forward and two backward passes)."""
  if sam_lib.is_plain(method):
    return num_train_steps
  start = min(max(start_step, 0), num_train_steps)
  return start + 2 * (num_train_steps - start)
def validate(cfg) -> None:
  """The sam.* keys (the method's options: `sam.validate`; the schedule's)
  fit together and with opt.optimizer; UsageError (one line) otherwise."""
  sam = cfg.sam
  try:
    sam_lib.validate(sam.method, sam.rho, sam.phi, optimizer=cfg.opt.optimizer,
                     precond_normalize=sam.precond_normalize,
                     perturbation_scope=sam.perturbation_scope)
  except ValueError as e:
    raise UsageError(str(e)) from None
  if sam.get("reuse", False):
    if not sam_lib.METHODS[sam.method].perturbs:
      raise UsageError(
          "sam.reuse=True needs a SAM-family sam.method to reuse; set "
          "sam.method (e.g. functional_sam) or sam.reuse=False")
    if sam.every_k <= 1:
      raise UsageError(
          "sam.reuse=True does nothing with sam.every_k=1 (every step is a "
          "full one); set sam.every_k > 1 or sam.reuse=False")
  if 0 <= sam.end_step < sam.start_step:
    raise UsageError(f"sam.end_step={sam.end_step} is before sam.start_step="
                     f"{sam.start_step}; use -1 for 'until the end'")
