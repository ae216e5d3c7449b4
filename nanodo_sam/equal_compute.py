"""Equal compute: each SAM-family group beside the plain optimizer (AdamW)
at equal steps and at equal training FLOPs.

A SAM-family step costs about two plain ones (the registry's `Method.cost`),
so equal steps favour it; a sweep's "compute_matched" runs (nanodo_sam/
sweep.py) train AdamW for its compute instead. Such a run is recognised from
its own records, not its directory's name: a plain-method run whose planned
training FLOPs (`planned_flops`) match, within FLOPS_TOLERANCE, those of a
SAM-family run of the same schedule, size and non-linearity with fewer
planned steps, at a step count no other method's run of that panel has
(`split`). The paper's tables compare at equal steps and leave them out;
`comparisons` pairs each SAM-family group with both AdamW baselines, and
`flops_history` puts a run's eval history on the FLOPs axis
(scripts/plot_flops.py).
"""

from __future__ import annotations

import dataclasses
import math
import os

from nanodo_sam import rundir
from nanodo_sam import runs as runs_lib
from nanodo_sam.runs import Cell, RunRecord

# Two runs trained for the same compute when their training FLOPs differ by
# at most this fraction (steps are whole: a matched run's count is rounded).
FLOPS_TOLERANCE = 0.01


def planned_steps(run: RunRecord) -> int:
  """The steps the run was configured for (opt.num_train_steps)."""
  return int(run.get("opt.num_train_steps", run.steps))


def _config(run: RunRecord):
  return rundir.config_from_json(os.path.join(run.workdir, rundir.CONFIG))


def planned_flops(run: RunRecord) -> float:
  """Training FLOPs of the run's planned steps: results.json's train_flops
  when it trained them all, else (diverged or stopped early) the trainer's
  count (`train_flops.train_flops`) for its config; NaN for a run made
  before train_flops was recorded."""
  recorded = runs_lib.as_float((run.results or {}).get("train_flops"))
  if not math.isfinite(recorded) or run.steps == planned_steps(run):
    return recorded
  from nanodo_sam import train_flops  # pylint: disable=g-import-not-at-top

  return train_flops.train_flops(_config(run), planned_steps(run))


def same_flops(a: float, b: float) -> bool:
  """Whether a and b are the same compute (within FLOPS_TOLERANCE)."""
  if not (math.isfinite(a) and math.isfinite(b)) or min(a, b) <= 0:
    return False
  return abs(a - b) <= FLOPS_TOLERANCE * max(a, b)


def _panel(run: RunRecord) -> tuple:
  return run.group[:3]  # schedule, size, nonlinearity


def _is_matched(run: RunRecord, panel: list[RunRecord], flops: dict) -> bool:
  """Whether `run` (of a `panel`; `flops`: id -> planned FLOPs) is a plain
  run trained for the compute of a SAM-family run with fewer steps."""
  if runs_lib.perturbs(run.method):
    return False
  steps = planned_steps(run)
  others = [o for o in panel if o.method != run.method]
  if any(planned_steps(o) == steps for o in others):
    return False  # An equal-steps peer of another method's run.
  return any(
      runs_lib.perturbs(o.method)
      and planned_steps(o) < steps
      and same_flops(flops[id(o)], flops[id(run)])
      for o in others
  )


def split(
    runs: list[RunRecord],
) -> tuple[list[RunRecord], list[RunRecord]]:
  """(the runs compared at equal steps, the compute-matched runs)."""
  return _split(runs, {id(r): planned_flops(r) for r in runs})


def _split(runs: list[RunRecord], flops: dict) -> tuple[list, list]:
  panels = runs_lib.group_by(runs, "schedule", "size", "nonlinearity")
  matched = {id(r) for r in runs if _is_matched(r, panels[_panel(r)], flops)}
  return (
      [r for r in runs if id(r) not in matched],
      [r for r in runs if id(r) in matched],
  )


@dataclasses.dataclass
class Comparison:
  """One SAM-family group (its best setting) and the plain optimizer's best
  setting at the same planned steps and at the same training FLOPs."""

  group: tuple  # runs.GROUP of the SAM-family runs
  steps: int
  flops: float
  cell: Cell
  equal_steps: Cell
  equal_compute: Cell

  @property
  def optimizer(self) -> str:
    return self.cell.runs[0].get("opt.optimizer", "adamw")


def paired(a: Cell, b: Cell) -> dict[int, float]:
  """{seed: a's metric - b's} over the seeds both cells hold; empty when
  either holds none, or one seed twice (runs that differ in a key the
  tables do not group by)."""
  if not (a.runs and b.runs):
    return {}
  try:
    return runs_lib.paired_differences(a.runs, b.runs)
  except ValueError:
    return {}


def _compare(group, steps, sam_runs, plain_runs, flops) -> Comparison:
  """The best of `sam_runs` beside the best of `plain_runs` (same base
  optimizer) at `steps` and at its training FLOPs."""
  cell = runs_lib.best(sam_runs)
  target = flops[id(cell.runs[0])]
  optimizer = cell.runs[0].get("opt.optimizer", "adamw")
  plain_runs = [
      r for r in plain_runs if r.get("opt.optimizer", "adamw") == optimizer
  ]
  return Comparison(
      group,
      steps,
      target,
      cell,
      runs_lib.best([r for r in plain_runs if planned_steps(r) == steps]),
      runs_lib.best(
          [r for r in plain_runs if same_flops(flops[id(r)], target)]
      ),
  )


def comparisons(runs: list[RunRecord]) -> list[Comparison]:
  """Each SAM-family group (and planned step count) of the equal-steps runs
  beside the plain runs of its panel; [] when no run is compute-matched."""
  flops = {id(r): planned_flops(r) for r in runs}
  equal_steps, matched = _split(runs, flops)
  if not matched:
    return []
  groups = {}
  for r in equal_steps:
    if runs_lib.perturbs(r.method):
      groups.setdefault(r.group + (planned_steps(r),), []).append(r)
  plain = [r for r in runs if not runs_lib.perturbs(r.method)]
  return [
      _compare(
          key[:4],
          key[4],
          groups[key],
          [r for r in plain if _panel(r) == key[:3]],
          flops,
      )
      for key in sorted(
          groups,
          key=lambda k: k[:3] + runs_lib.method_order(k[3]) + k[4:],
      )
  ]


def flops_history(run: RunRecord) -> list[tuple[float, float]]:
  """The run's eval history as (training FLOPs so far, eval loss): each
  eval step's FLOPs counted by the trainer's own counter
  (`train_flops.Counter`) for its config.json."""
  from nanodo_sam import train_flops  # pylint: disable=g-import-not-at-top

  count = train_flops.Counter(_config(run))
  return [(count(step), loss) for step, loss in sorted(run.eval_history)]
