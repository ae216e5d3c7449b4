"""What SAM buys at equal compute, in miniature: the study's design, and its
report from the runs (`write_report`; scripts/sam_buys.py runs the
quantized evaluations and calls it).

    nanodo-sam sweep configs/sweeps/sam_buys.py --backend=local
    python scripts/sam_buys.py runs/sam_buys [--doc=docs/sam_buys.md]

The runs (configs/sweeps/sam_buys.py), on the miniature setting
(configs/miniature.py) and the evaluation seeds of the miniature study:
  1. pretraining on the C4 subset: AdamW, SAM and Precond Func-SAM at the
     rho the miniature study chose at its tuning seed (docs/miniature.md),
     Momentum-SAM at the best of MOMENTUM_GRID at the tuning seed, and AdamW
     for SAM's compute (twice the steps, the schedule stretched);
  2. each pretrained run trained further on tiny_shakespeare with AdamW for
     a fixed budget (configs/continued.py), its C4 eval loss logged all
     along: forgetting;
  3. each pretrained run's weights quantized to int8 and int4
     (`nanodo-sam eval --quantize`): the loss increase.
"""

from __future__ import annotations

import math
import os

from nanodo_sam import miniature
from nanodo_sam import rundir
from nanodo_sam import sweep

SEEDS = miniature.EVAL_SEEDS  # Not the tuning seed: no selection bias.
TUNING_SEED = miniature.TUNING_SEED
# The rho the miniature study's grid chose at its tuning seed
# (docs/miniature.md, Table 1's rows).
CHOSEN_RHO = {"sam": 0.1, "precond_functional_sam": 1.0}
MOMENTUM_GRID = (0.1, 0.3, 1.0)
BASELINE = "adamw"
MATCHED = "adamw@sam"  # AdamW for SAM's compute.
ARMS = ("adamw", "sam", "precond_functional_sam", "momentum_sam", MATCHED)
WIDTHS = (8, 4)
CONFIG = "configs/miniature.py"
CONTINUED = "configs/continued.py"


def _final_loss(out: str, overrides: dict) -> float | None:
  """A sweep run's final eval loss once it has ended (+inf if it diverged),
  else None."""
  workdir = os.path.join(out, sweep.run_name(overrides, CONFIG))
  res = rundir.read_results(workdir) if os.path.isdir(workdir) else None
  if res is None or res.get("status") not in ("completed", "diverged"):
    return None
  loss = res.get("final_eval_loss")
  ok = isinstance(loss, (int, float)) and math.isfinite(loss)
  return loss if ok else math.inf


def best_momentum_rho(out: str | None) -> float | None:
  """The rho of MOMENTUM_GRID with the lowest final eval loss at the tuning
  seed, once every one has ended in `out` (a diverged run counts as
  +inf)."""
  if not out:
    return None
  losses = {
      rho: _final_loss(out, arm_overrides("momentum_sam", TUNING_SEED, rho))
      for rho in MOMENTUM_GRID
  }
  if any(v is None for v in losses.values()):
    return None
  return min(MOMENTUM_GRID, key=losses.get)


def arm_overrides(arm: str, seed: int, rho: float | None = None) -> dict:
  """The sweep run (overrides) of one pretraining arm."""
  if arm == MATCHED:
    return {"sam.method": BASELINE, "compute_matched": "sam", "seed": seed}
  if arm == BASELINE:
    return {"sam.method": arm, "seed": seed}
  rho = CHOSEN_RHO.get(arm, rho)
  return {"sam.method": arm, "sam.rho": rho, "seed": seed}


def pretrained_runs(out: str | None) -> list[tuple[str, dict]]:
  """(arm, overrides) of every pretraining run: Momentum-SAM's at its best
  rho only once its grid at the tuning seed has ended."""
  rho = best_momentum_rho(out)
  return [
      (arm, arm_overrides(arm, seed, rho))
      for arm in ARMS
      for seed in SEEDS
      if arm != "momentum_sam" or rho is not None
  ]


def continued_overrides(out: str, pretrained: dict) -> dict:
  """The run that trains `pretrained` further (configs/continued.py)."""
  source = os.path.join(out, sweep.run_name(pretrained, CONFIG))
  return {"config": CONTINUED, "init_from": source}
