"""What a sweep file is made of: the `SweepSpec` it returns and grid helpers.

A sweep file (configs/sweeps/NAME.py) defines `get_sweep()` returning a
`SweepSpec` (a dict with the same keys is accepted too):

    SweepSpec(name="table1",                           # output: runs/<name>
              config="configs/c4_fixed_length.py:2M",  # config file[:ARG]
              overrides={"eval_every_steps": 250},     # every run (optional)
              runs=[{"sam.method": "sam", "sam.rho": 0.1, "seed": 0}, ...])

Each run is a dict of config overrides (`--config.KEY=VALUE` of `nanodo-sam
train`); the reserved key "config" replaces the sweep's config for that run
(e.g. another size: "configs/c4_fixed_length.py:23.9M"). The spec checks its
own shape when built; `nanodo-sam sweep` then checks every key against the
config and names the runs (nanodo_sam/sweep.py).
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from typing import Any, Sequence

from nanodo_sam.errors import UsageError

# Run keys that are not config overrides: "config" (another config file
# for this run), "compute_matched" (METHOD: this run trains for METHOD's
# compute, its steps and warmup scaled; nanodo_sam/sweep.py).
RESERVED = ("config", "compute_matched")
NAME_CHARS = re.compile(r"[^A-Za-z0-9._+=-]")  # Not allowed in names.
_KEY = re.compile(r"[A-Za-z_][\w.]*")


class SweepError(UsageError):
  """Bad sweep input: reported as one line, exit code 2."""


def format_value(v: Any) -> str:
  """An override value as ml_collections' --config.KEY=VALUE parser reads it
  (and as it appears in run names)."""
  if isinstance(v, bool):
    return "true" if v else "false"
  if isinstance(v, float):
    return repr(v)
  if isinstance(v, (int, str)):
    return str(v)
  raise SweepError(
      f"override value {v!r} has type {type(v).__name__}; use "
      "a number, string or bool"
  )


@dataclasses.dataclass(frozen=True)
class SweepSpec:
  """A sweep as its file declares it; raises SweepError (one line) when built
  with a bad shape. `name` "" means the sweep file's name."""

  config: str
  runs: list
  overrides: dict = dataclasses.field(default_factory=dict)
  name: str = ""
  description: str = ""

  def __post_init__(self):
    if not isinstance(self.name, str) or NAME_CHARS.search(self.name):
      raise SweepError(
          f"sweep name {self.name!r} must be letters, digits, "
          "'.', '_', '+', '=' or '-'"
      )
    if not isinstance(self.config, str):
      raise SweepError(
          "'config' must be a config path like "
          "'configs/c4_fixed_length.py:2M'"
      )
    if not isinstance(self.overrides, dict):
      raise SweepError(f"'overrides' is {self.overrides!r}, not a dict")
    for key in RESERVED:
      if key in self.overrides:
        raise SweepError(f"'{key}' cannot be a common override; set it per run")
    if not isinstance(self.runs, list) or not self.runs:
      raise SweepError("'runs' must be a non-empty list of override dicts")
    for i, run in enumerate(self.runs):
      if not isinstance(run, dict):
        raise SweepError(f"run {i} is {run!r}, not a dict")
      for k, v in list(run.items()) + list(self.overrides.items()):
        if not isinstance(k, str) or not _KEY.fullmatch(k):
          raise SweepError(f"run {i}: bad override key {k!r}")
        if k not in RESERVED:
          format_value(v)

  @classmethod
  def from_dict(cls, d: dict) -> SweepSpec:
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
      raise SweepError(
          f"unknown sweep keys {sorted(unknown)}; use name, "
          "config, overrides, runs, description"
      )
    return cls(
        config=d.get("config"),
        runs=d.get("runs"),
        overrides=d.get("overrides") or {},
        name=d.get("name") or "",
        description=d.get("description") or "",
    )


# ----------------------------------------------------------- grid helpers


def grid(**axes: Sequence[Any]) -> list[dict]:
  """Cartesian product: grid(a=[1, 2], b=[3]) -> [{a:1,b:3}, {a:2,b:3}].
  Keys with dots go through `**{"sam.rho": [...]}`."""
  keys = list(axes)
  return [
      dict(zip(keys, vals))
      for vals in itertools.product(*(axes[k] for k in keys))
  ]


def method_runs(
    methods: Sequence[str],
    rhos,
    *,
    learning_rates: Sequence[float] = (1e-3,),
    seeds: Sequence[int] = (0,),
    fixed: dict | None = None,
    compute_matched: bool = False,
) -> list[dict]:
  """The method x rho x learning rate x seed grid.

  compute_matched: also, per learning rate and seed, one run of each
  method that does not perturb (AdamW) trained for the compute of each
  method that costs more per step ("compute_matched": the first method of
  that cost; its steps and warmup scaled by `nanodo-sam sweep`).

  rhos: one sequence for every method, or {method: sequence}. A method that
  does not perturb (AdamW: `perturbs` in its `sam.METHODS` entry) gets a
  single run without sam.rho. `fixed` overrides come first in each run (and
  so first in its name), e.g. {"config": ...}. A method that needs an option
  gets its default unless `fixed` sets it (`method_options`).
  """
  from nanodo_sam.sam import METHODS  # pylint: disable=g-import-not-at-top

  runs = []
  for method in methods:
    if method not in METHODS:
      raise SweepError(
          f"unknown method {method!r}; use one of " f"{', '.join(METHODS)}"
      )
    if not METHODS[method].perturbs:
      method_rhos = [None]
    elif isinstance(rhos, dict):
      if method not in rhos:
        raise SweepError(f"no rho values for method {method!r}")
      method_rhos = list(rhos[method])
    else:
      method_rhos = list(rhos)
    for rho, lr, seed in itertools.product(method_rhos, learning_rates, seeds):
      run = dict(fixed or {})
      run["sam.method"] = method
      if rho is not None:
        run["sam.rho"] = float(rho)
      run["opt.peak_learning_rate"] = float(lr)
      run["seed"] = int(seed)
      for key, value in method_options(method).items():
        run.setdefault(key, value)
      runs.append(run)
  if compute_matched:
    runs += _compute_matched_runs(methods, learning_rates, seeds, fixed)
  return runs


def _compute_matched_runs(methods, learning_rates, seeds, fixed) -> list:
  from nanodo_sam.sam import METHODS  # pylint: disable=g-import-not-at-top

  by_cost = {}
  for method in methods:
    by_cost.setdefault(METHODS[method].cost, method)
  plain = [m for m in methods if not METHODS[m].perturbs]
  return [
      {
          **(fixed or {}),
          "sam.method": base,
          "compute_matched": matched,
          "opt.peak_learning_rate": float(lr),
          "seed": int(seed),
      }
      for base in plain
      for cost, matched in by_cost.items()
      if cost > METHODS[base].cost
      for lr, seed in itertools.product(learning_rates, seeds)
  ]


def method_options(method: str) -> dict:
  """The overrides a method needs to run: its registry entry's required
  options at their examples (`sam.example_options`; Angle-SAM's phi 0.7854,
  GSAM's alpha 0.2)."""
  from nanodo_sam import sam  # pylint: disable=g-import-not-at-top

  return sam.example_options(method)


def around(
    center: float, factors: Sequence[float] = (0.5, 1.0, 2.0), digits: int = 4
) -> list[float]:
  """rho values around a centre: around(0.4) -> [0.2, 0.4, 0.8]."""
  return [round(center * f, digits) for f in factors]
