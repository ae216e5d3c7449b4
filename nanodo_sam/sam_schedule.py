"""Which gradient each step takes, and the rho in effect (config `sam.*`).

The loop picks one of the compiled steps on the host (`step_kind`), so a step
outside the SAM window or between two `every_k` steps costs exactly a plain
step; `rho_at` runs inside the jitted step.
"""

from __future__ import annotations

import jax.numpy as jnp

from nanodo_sam import optimizer as optimizer_lib

RHO_SCHEDULES = ("constant", "lr")


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
  lr_min = min(optimizer_lib.final_learning_rate(opt_cfg),
               optimizer_lib.init_learning_rate(opt_cfg)
               if opt_cfg.warmup_steps > 0 else lr_max)
  rho_min = sam_cfg.get("rho_min")
  rho_min = 0.0 if rho_min is None else rho_min
  if lr_max <= lr_min:
    return jnp.asarray(sam_cfg.rho, jnp.float32)
  frac = (jnp.asarray(lr, jnp.float32) - lr_min) / (lr_max - lr_min)
  return (rho_min + (sam_cfg.rho - rho_min) * frac).astype(jnp.float32)


def uses_sam_step(sam_cfg, step: int) -> bool:
  """Whether step `step` takes the configured SAM-family gradient."""
  if sam_cfg.method == "adamw" or step < sam_cfg.start_step:
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
  in_window = (sam_cfg.method != "adamw" and step >= sam_cfg.start_step
               and not 0 <= sam_cfg.end_step <= step)
  return "reuse" if in_window and sam_cfg.get("reuse", False) else "plain"
