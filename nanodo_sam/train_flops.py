"""Cumulative training FLOPs of a run: what `results.json` ("train_flops")
and the logs (`train/flops`) record, so runs compare at equal compute.

Each step costs model FLOPs per token (flops.model_flops_per_token) x tokens
per step x its kind's factor: the step kind (sam_schedule.step_kind: plain,
SAM-family, reuse; before sam.start_step or after sam.end_step a late-phase
run's steps are plain) runs the method `step.kind_args` gives it, whose
passes (the registry's forwards and backwards, flops.method_flops_factor)
set the factor: 1 for a plain or reuse step, (2 x forwards + 4 x backwards)
/ 6 for a SAM-family one. A run started with init_from counts its own steps
only.
"""

from __future__ import annotations

from nanodo_sam import flops as flops_lib
from nanodo_sam import sam_schedule
from nanodo_sam import step as step_lib


def step_factor(cfg, step: int) -> float:
  """FLOPs of step `step` / FLOPs of a plain step."""
  method, _ = step_lib.kind_args(cfg, sam_schedule.step_kind(cfg.sam, step))
  return flops_lib.method_flops_factor(method)


def plain_step_flops(cfg) -> float:
  """Model FLOPs of one plain (forward + backward) step of the whole batch."""
  m = cfg.model
  return (
      flops_lib.model_flops_per_token(m.D, m.N, m.F, m.L, m.V)
      * cfg.data.batch_size
      * m.L
  )


def train_flops(cfg, end: int, first: int = 0) -> float:
  """Training FLOPs of steps [first, end)."""
  return plain_step_flops(cfg) * sum(
      step_factor(cfg, s) for s in range(first, end)
  )


class Counter:
  """train_flops(cfg, n) for increasing n, each step counted once."""

  def __init__(self, cfg):
    self.cfg, self.steps, self.flops = cfg, 0, 0.0

  def __call__(self, n: int) -> float:
    if n < self.steps:
      self.steps, self.flops = 0, 0.0
    self.flops += train_flops(self.cfg, n, self.steps)
    self.steps = n
    return self.flops
