"""Which gradient each step takes, and the rho in effect (config `sam.*`).

The loop picks one of the compiled steps on the host (`step_kind`), so a step
outside the SAM window or between two `every_k` steps costs exactly a plain
step; `rho_at` runs inside the jitted step.
"""

from __future__ import annotations

import jax.numpy as jnp

from nanodo_sam import optimizer as optimizer_lib
from nanodo_sam import sam as sam_lib
from nanodo_sam.errors import UsageError


def rho_at(sam_cfg, step, opt_cfg=None):
  """rho at `step`: sam.rho ('constant') or, with sam.rho_schedule='lr',
  following the learning rate between sam.rho_min (at the schedule's lowest
  rate) and sam.rho (at its peak), as GSAM does (Zhuang et al. 2022); then
  warmed up linearly from 0 over rho_warmup_steps. 'lr' needs `opt_cfg`."""
  rho = jnp.asarray(sam_cfg.rho, jnp.float32)
  if sam_cfg.get("rho_schedule", "constant") == "lr":
    rho = _follow_lr(sam_cfg, step, opt_cfg)
  if sam_cfg.rho_warmup_steps <= 0:
    return rho
  frac = jnp.minimum((step + 1) / sam_cfg.rho_warmup_steps, 1.0)
  return rho * frac.astype(jnp.float32)


def _follow_lr(sam_cfg, step, opt_cfg):
  """rho_min + (rho - rho_min) (lr - lr_min) / (lr_max - lr_min)."""
  if opt_cfg is None:
    raise ValueError("sam.rho_schedule='lr' needs the opt config")
  lr = optimizer_lib.learning_rate_schedule(opt_cfg)(step)
  lr_max = opt_cfg.peak_learning_rate
  lr_min = min(
      optimizer_lib.final_learning_rate(opt_cfg),
      optimizer_lib.init_learning_rate(opt_cfg)
      if opt_cfg.warmup_steps > 0
      else lr_max,
  )
  rho_min = sam_cfg.get("rho_min")
  rho_min = 0.0 if rho_min is None else rho_min
  if lr_max <= lr_min:
    return jnp.asarray(sam_cfg.rho, jnp.float32)
  frac = (jnp.asarray(lr, jnp.float32) - lr_min) / (lr_max - lr_min)
  return (rho_min + (sam_cfg.rho - rho_min) * frac).astype(jnp.float32)


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
  in_window = (
      not sam_lib.is_plain(sam_cfg.method)
      and step >= sam_cfg.start_step
      and not 0 <= sam_cfg.end_step <= step
  )
  return "reuse" if in_window and sam_cfg.get("reuse", False) else "plain"


def adamw_step_equivalents(
    num_train_steps: int, start_step: int, method: str
) -> float:
  """Cost of a run switching to `method` at `start_step`, in plain steps:
  plain steps count 1, the method's its registry cost (`Method.cost`: SAM's
  two forward and two backward passes 2, Angle-SAM's 2 + 2/3)."""
  if sam_lib.is_plain(method):
    return num_train_steps
  start = min(max(start_step, 0), num_train_steps)
  return start + sam_lib.METHODS[method].cost * (num_train_steps - start)


def validate(cfg) -> None:
  """The sam.* keys (the method's options: `sam.validate`; the schedule's)
  fit together and with opt.optimizer; UsageError (one line) otherwise."""
  sam = cfg.sam
  try:
    sam_lib.validate(
        sam.method,
        sam.rho,
        optimizer=cfg.opt.optimizer,
        **sam_lib.config_options(sam),
    )
  except ValueError as e:
    raise UsageError(str(e)) from None
  _validate_rho_schedule(sam)
  if sam.get("reuse", False):
    if not sam_lib.METHODS[sam.method].perturbs:
      raise UsageError(
          "sam.reuse=True needs a SAM-family sam.method to reuse; set "
          "sam.method (e.g. functional_sam) or sam.reuse=False"
      )
    if sam.every_k <= 1:
      raise UsageError(
          "sam.reuse=True does nothing with sam.every_k=1 (every step is a "
          "full one); set sam.every_k > 1 or sam.reuse=False"
      )
  if 0 <= sam.end_step < sam.start_step:
    raise UsageError(
        f"sam.end_step={sam.end_step} is before sam.start_step="
        f"{sam.start_step}; use -1 for 'until the end'"
    )


def _validate_rho_schedule(sam) -> None:
  """sam.rho_min goes with sam.rho_schedule='lr' and is at most sam.rho
  (`rho_at`); the schedule's name is the key table's choice."""
  rho_min, schedule = sam.get("rho_min"), sam.get("rho_schedule", "constant")
  if rho_min is not None and schedule != "lr":
    raise UsageError(
        f"sam.rho_min={rho_min!r} is ignored by "
        f"sam.rho_schedule={schedule!r}; unset sam.rho_min or "
        "set sam.rho_schedule='lr'"
    )
  if rho_min is not None and rho_min > sam.rho:
    raise UsageError(
        f"sam.rho_min={rho_min!r} exceeds sam.rho={sam.rho!r} "
        "(the largest rho, at the peak learning rate); lower "
        "sam.rho_min"
    )
