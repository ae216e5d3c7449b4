"""Reading run directories: one `RunRecord` per run, and the statistics that
tables, figures and reports are built from.

A run directory is what `nanodo-sam train --workdir=DIR` writes: config.json
(the resolved config), progress.json as it goes (eval history so far; status
"preempted" when a signal stopped it), results.json when it has ended
(completed or diverged), TensorBoard event files, and sharpness.json /
prune.json after `nanodo-sam analyze` / `prune-eval`. `load_runs(paths)` reads every run under the given paths (a
run directory or any folder above runs). On top:

  group_by(runs, "method", "rho")  runs by attributes or dotted config keys
  varying_keys(runs)               the config keys a sweep varied
  best(runs)                       the best setting by mean loss over seeds
  paired_differences(a, b)         per-seed loss differences of two settings

`nanodo-sam tables` (nanodo_sam/tables.py) and scripts/plot_*.py read runs
only through here.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import json
import math
import os
import struct
from collections import defaultdict
from typing import Any, Callable, Iterable

import numpy as np

from nanodo_sam import keys
from nanodo_sam import rundir
from nanodo_sam.config import flatten, to_dict

NAN = float("nan")
# The run directory's files (rundir.py names the trainer's).
RUN_FILES = (
    rundir.CONFIG,
    rundir.RESULTS,
    "sharpness.json",
    "prune.json",
    rundir.PROGRESS,
)
EVENT_FILES = "events.out.tfevents."
# The paper tables' grouping: what a run is (GROUP) and what was tuned for it
# (SETTING); `best` picks the SETTING with the lowest mean over seeds.
GROUP = ("schedule", "size", "nonlinearity", "method")
SETTING = ("rho", "lr", "variant")
# Keys that make a run a different setting of its group besides rho and lr
# (e.g. SAM with rho warm-up at 1208M); `RunRecord.variant` names those whose
# value differs from the defaults' (keys.defaults()).
VARIANT_KEYS = (
    "sam.rho_warmup_steps",
    "sam.start_step",
    "sam.end_step",
    "sam.every_k",
    "sam.rho_schedule",
    "sam.rho_min",
    "sam.perturbation_scope",
    "opt.weight_decay",
)


def variant_keys() -> tuple[str, ...]:
  """VARIANT_KEYS with every method's own options (sam.phi, sam.alpha, ...:
  the registry's, `keys.method_keys`) after sam.every_k."""
  i = VARIANT_KEYS.index("sam.every_k") + 1
  options = tuple(k.name for k in keys.method_keys())
  return VARIANT_KEYS[:i] + options + VARIANT_KEYS[i:]


# results.json keys a run can be ranked by (`RunRecord(metric=...)`, `best`,
# `nanodo-sam tables --metric`), and whether higher is better.
METRICS = {
    "final_eval_loss": False,
    "best_eval_loss": False,
    "final_eval_perplexity": False,
    "final_eval_accuracy": True,
    "final_eval_bits_per_byte": False,
}


def as_float(x, default=NAN) -> float:
  """float(x), or `default` for None or text."""
  try:
    return float(x)
  except (TypeError, ValueError):
    return default


def _lookup(tree: dict, key: str, default=None):
  """tree["a"]["b"] for key "a.b"; `default` where a part is missing."""
  node = tree
  for part in key.split("."):
    if not isinstance(node, dict) or part not in node:
      return default
    node = node[part]
  return node


@functools.cache
def base_defaults() -> dict[str, Any]:
  """The default config's values, flattened: the defaults `variant`
  compares against."""
  return flatten(to_dict(keys.defaults()))


def _methods() -> dict:
  """The registry (`sam.METHODS`), imported when first needed (it brings
  JAX)."""
  from nanodo_sam.sam import METHODS  # pylint: disable=g-import-not-at-top

  return METHODS


def method_entry(method: str):
  """The method's `sam.METHODS` entry (label, passes, ...); None if unknown."""
  return _methods().get(method)


def method_label(method: str, optimizer: str = "adamw") -> str:
  """The method's name as the paper writes it (`sam.label`: the plain step
  is named by its base optimizer); an unknown method's own name."""
  if method_entry(method) is None:
    return method
  from nanodo_sam.sam import label  # pylint: disable=g-import-not-at-top

  return label(method, optimizer)


def perturbs(method: str) -> bool:
  """Whether the method has a radius rho (False for AdamW; True if unknown)."""
  entry = method_entry(method)
  return entry is None or entry.perturbs


def method_order(method: str) -> tuple:
  """Sort key: the registry's order, unknown methods after it by name."""
  names = list(_methods())
  return (names.index(method) if method in names else len(names), method)


# --------------------------------------------------------------- one run


@dataclasses.dataclass
class RunRecord:
  """One run directory. `results` is None until the run has ended;
  `metric` is the results.json key `loss` reads."""

  workdir: str
  config: dict
  results: dict | None = None
  sharpness: dict | None = None
  prune: dict | None = None
  metric: str = "final_eval_loss"
  progress: dict | None = None  # progress.json: the run so far

  @property
  def name(self) -> str:
    return os.path.basename(os.path.normpath(self.workdir))

  def get(self, key: str, default=None):
    """A config value by dotted key ("sam.rho")."""
    return _lookup(self.config, key, default)

  def _result(self, key: str, default=None):
    return (self.results or {}).get(key, default)

  def _recorded(self, key: str, config_key: str, default=None):
    """`key` of results.json, else the config's `config_key`, else `key` of
    sharpness.json or prune.json (which record method and rho too)."""
    for value in (
        self._result(key),
        self.get(config_key),
        (self.sharpness or {}).get(key),
        (self.prune or {}).get(key),
    ):
      if value is not None:
        return value
    return default

  @property
  def method(self) -> str:
    return self._recorded("method", "sam.method", "?")

  @property
  def rho(self) -> float:
    """The radius; 0 for a method that does not perturb (AdamW)."""
    if not perturbs(self.method):
      return 0.0
    return as_float(self._recorded("rho", "sam.rho"), 0.0)

  @property
  def lr(self) -> float:
    return as_float(
        self._result("peak_learning_rate", self.get("opt.peak_learning_rate"))
    )

  @property
  def seed(self) -> int:
    return int(self.get("seed", 0))

  @property
  def size(self) -> str:
    return self._recorded("model_size_name", "model.size_name") or str(
        self._result("model_size", "?")
    )

  @property
  def schedule(self) -> str:
    return self.get("schedule_name") or "unknown"

  @property
  def nonlinearity(self) -> str:
    return self.get("model.nonlinearity", "gelu")

  @property
  def status(self) -> str:
    """results.json's status ("completed", "diverged"); before it exists,
    "preempted" (stopped by a signal at a checkpoint: resumable),
    "save_failed" (a checkpoint could not be written, e.g. a full disk:
    resumable once there is space) or "unfinished" (running, or killed)."""
    if self.results is None:
      status = (self.progress or {}).get("status")
      return status if status in ("preempted", "save_failed") else "unfinished"
    return self.results.get("status", "completed")

  @property
  def steps(self) -> int:
    return int(self._result("steps") or 0)

  @property
  def final_eval_loss(self) -> float:
    return as_float(self._result("final_eval_loss"))

  @property
  def best_eval_loss(self) -> float:
    return as_float(self._result("best_eval_loss"))

  @property
  def wall_seconds(self) -> float:
    return as_float(self._result("wall_seconds"))

  @property
  def eval_history(self) -> list[tuple[int, float]]:
    """Every evaluation (step, loss), across resumes; of an unfinished run,
    those so far (progress.json)."""
    history = self._result(
        "eval_history", (self.progress or {}).get("eval_history", [])
    )
    return [(int(s), as_float(l)) for s, l in history]

  @property
  def loss(self) -> float:
    """results.json's `metric`; NaN for a diverged or unfinished run."""
    value = as_float(self._result(self.metric))
    if self.status == "diverged" or not math.isfinite(value):
      return NAN
    return value

  @property
  def variant(self) -> str:
    """ "key=value,..." for the `variant_keys` that differ from base.py."""
    defaults = base_defaults()
    parts = []
    for key in variant_keys():
      value = self.get(key, defaults.get(key))
      if value != defaults.get(key):
        parts.append(f"{key.rsplit('.', 1)[-1]}={value}")
    return ",".join(parts)

  @property
  def group(self) -> tuple:
    return tuple(getattr(self, k) for k in GROUP)

  @property
  def setting(self) -> tuple:
    return tuple(getattr(self, k) for k in SETTING)

  @property
  def label(self) -> str:
    """ "Precond Func-SAM ρ=0.5" (the method's label and radius)."""
    text = method_label(self.method, self.get("opt.optimizer", "adamw"))
    return text + (f" ρ={self.rho:g}" if perturbs(self.method) else "")

  def scalars(
      self, tags: Iterable[str] | None = None, prefix: str = ""
  ) -> dict[str, list[tuple[int, float]]]:
    """TensorBoard scalars of this run (`read_scalars`)."""
    return read_scalars(self.workdir, tags, prefix)


def _read_json(path: str) -> Any:
  with open(path) as f:
    return json.load(f)


def read_run(
    workdir: str,
    metric: str = "final_eval_loss",
    warn: Callable[[str], None] = print,
) -> RunRecord | None:
  """The run in `workdir`; None (with a note) if its config.json or
  results.json cannot be read. A broken sharpness.json or prune.json is
  ignored with a note."""
  files = {}
  for name in RUN_FILES:
    path = os.path.join(workdir, name)
    if not os.path.exists(path):
      continue
    try:
      files[name] = _read_json(path)
    except (OSError, ValueError) as e:
      if name in (rundir.CONFIG, rundir.RESULTS):
        warn(f"note: skipping {workdir}: {e}")
        return None
      warn(f"note: ignoring {path}: {e}")
  return RunRecord(
      workdir=workdir,
      config=files.get(rundir.CONFIG, {}),
      results=files.get(rundir.RESULTS),
      sharpness=files.get("sharpness.json"),
      prune=files.get("prune.json"),
      metric=metric,
      progress=files.get(rundir.PROGRESS),
  )


def _is_run(filenames: Iterable[str]) -> bool:
  return any(f in RUN_FILES or f.startswith(EVENT_FILES) for f in filenames)


def find_runs(paths: Iterable[str]) -> list[str]:
  """Every run directory (one holding config.json, results.json,
  sharpness.json, prune.json or event files) at or below `paths`, sorted; a
  path may also be one of a run's files."""
  found = set()
  for path in paths:
    if os.path.isfile(path):
      if _is_run([os.path.basename(path)]):
        found.add(os.path.dirname(os.path.abspath(path)))
      continue
    for root, dirs, files in os.walk(path):
      if _is_run(files):
        found.add(os.path.abspath(root))
        dirs[:] = []  # A run's checkpoints hold no other runs.
      else:
        dirs.sort()
  return sorted(found)


def load_runs(
    paths: Iterable[str],
    metric: str = "final_eval_loss",
    warn: Callable[[str], None] = print,
    finished: bool = False,
) -> list[RunRecord]:
  """Every run at or below `paths` (`find_runs`); with finished=True only
  those with a results.json."""
  runs = [read_run(d, metric, warn) for d in find_runs(paths)]
  return [
      r
      for r in runs
      if r is not None and (r.results is not None or not finished)
  ]


def unique(
    runs: Iterable[RunRecord], warn: Callable[[str], None] = print
) -> list[RunRecord]:
  """The runs without those repeating an earlier one (same GROUP, SETTING,
  seed, length and init_from source: a copied or re-launched directory),
  with a note each."""
  out, seen = [], set()
  for r in runs:
    key = r.group + r.setting + (r.seed, r.get("opt.num_train_steps", r.steps))
    key += (r.get("init_from", "") or "",)  # Continued from another run.
    if key in seen:
      warn(
          f"note: {r.workdir} repeats an earlier run (same method, size, "
          "schedule, rho, lr, seed); using the first"
      )
      continue
    seen.add(key)
    out.append(r)
  return out


# ------------------------------------------------- TensorBoard event files


def iter_events(path: str):
  """Event protos from one event file (a TFRecord file: length, masked CRC,
  payload, CRC per record), without importing TensorFlow."""
  from tensorboard.compat.proto import event_pb2  # pylint: disable=g-import-not-at-top

  with open(path, "rb") as f:
    while True:
      header = f.read(12)
      if len(header) < 12:
        return
      (length,) = struct.unpack("<Q", header[:8])
      payload = f.read(length)
      if len(payload) < length or len(f.read(4)) < 4:
        return  # A truncated last record (the run is still writing).
      yield event_pb2.Event.FromString(payload)


def _value(v) -> float | None:
  if v.HasField("simple_value"):
    return float(v.simple_value)
  if v.HasField("tensor"):  # TF2 summaries (clu): a scalar tensor.
    t = v.tensor
    if (
        t.tensor_shape.dim
        and math.prod(d.size for d in t.tensor_shape.dim) != 1
    ):
      return None  # Not a scalar.
    if t.float_val:
      return float(t.float_val[0])
    if t.double_val:
      return float(t.double_val[0])
    if t.int_val:
      return float(t.int_val[0])
    if t.int64_val:
      return float(t.int64_val[0])
    if t.tensor_content:
      dtype = {1: np.float32, 2: np.float64, 3: np.int32, 9: np.int64}.get(
          t.dtype
      )
      if dtype is not None:
        return float(np.frombuffer(t.tensor_content, dtype)[0])
  return None


def read_scalars(
    logdir: str, tags: Iterable[str] | None = None, prefix: str = ""
) -> dict[str, list[tuple[int, float]]]:
  """{tag: [(step, value)]} from the event files in `logdir`, for the given
  tags (all scalars if None) starting with `prefix`. Reads simple-value and
  TF2 tensor summaries; a step logged twice (after a resume) keeps its last
  value."""
  wanted = None if tags is None else set(tags)
  out: dict[str, dict[int, float]] = {}
  files = sorted(
      glob.glob(os.path.join(logdir, EVENT_FILES + "*")), key=os.path.getmtime
  )
  for path in files:
    for event in iter_events(path):
      if not event.HasField("summary"):
        continue
      for v in event.summary.value:
        if (wanted is None or v.tag in wanted) and v.tag.startswith(prefix):
          value = _value(v)
          if value is not None:
            out.setdefault(v.tag, {})[int(event.step)] = value
  return {tag: sorted(pts.items()) for tag, pts in sorted(out.items())}


# -------------------------------------------------------------- statistics


def attribute(run: RunRecord, key: str):
  """A RunRecord attribute ("method", "rho", "workdir", ...) or else a dotted
  config key ("sam.every_k")."""
  if (
      isinstance(getattr(type(run), key, None), property)
      or key in run.__dataclass_fields__
  ):
    return getattr(run, key)
  return run.get(key)


def group_by(
    runs: Iterable[RunRecord], *keys: str
) -> dict[tuple, list[RunRecord]]:
  """Runs by the values of `keys` (attributes or dotted config keys), in
  first-seen order."""
  out = defaultdict(list)
  for r in runs:
    out[tuple(attribute(r, k) for k in keys)].append(r)
  return dict(out)


def varying_keys(
    runs: Iterable[RunRecord], exclude: Iterable[str] = ("seed", "workdir")
) -> list[str]:
  """The dotted config keys whose value differs between the runs (what a
  sweep varied), minus `exclude`; a key a run lacks counts as None."""
  flats = [flatten(r.config) for r in runs]
  keys = sorted(set().union(*flats)) if flats else []
  skip = set(exclude)
  return [
      k
      for k in keys
      if k not in skip
      and len({json.dumps(f.get(k), sort_keys=True) for f in flats}) > 1
  ]


def mean_std(xs: Iterable[float]) -> tuple[float, float]:
  """(mean, sample std); NaN if empty or any value is not finite; std 0 for
  one value."""
  xs = list(xs)
  if not xs or any(not math.isfinite(x) for x in xs):
    return NAN, NAN
  m = sum(xs) / len(xs)
  if len(xs) < 2:
    return m, 0.0
  return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def _order(key: tuple) -> tuple:
  return tuple((x is None, 0 if x is None else x) for x in key)


@dataclasses.dataclass
class Cell:
  """The best setting of a group of runs, over its seeds."""

  mean: float = NAN
  std: float = NAN
  n: int = 0  # Seeds (runs) of the chosen setting.
  settings: int = 0  # Settings tried.
  setting: tuple = ()  # The chosen setting's values of `by`.
  runs: list = dataclasses.field(default_factory=list)

  @property
  def found(self) -> bool:
    return self.settings > 0

  @property
  def rho(self) -> float:
    return self.runs[0].rho if self.runs else NAN

  @property
  def lr(self) -> float:
    return self.runs[0].lr if self.runs else NAN

  @property
  def variant(self) -> str:
    return self.runs[0].variant if self.runs else ""


def best(runs: Iterable[RunRecord], by: Iterable[str] = SETTING) -> Cell:
  """The setting (runs grouped by `by`) with the best mean `loss` (the runs'
  metric) over its seeds: the lowest, or the highest for a metric where
  higher is better (`METRICS`). A setting with a diverged seed is NaN; when
  every setting diverged, the Cell is NaN at the smallest setting."""
  settings = group_by(runs, *by)
  if not settings:
    return Cell()
  first = next(iter(settings.values()))[0]
  sign = -1.0 if METRICS.get(first.metric, False) else 1.0
  stats = {s: mean_std(r.loss for r in rs) for s, rs in settings.items()}
  finite = [s for s in stats if math.isfinite(stats[s][0])]
  if not finite:
    s = min(settings, key=_order)
    return Cell(NAN, NAN, len(settings[s]), len(settings), s, settings[s])
  s = min(finite, key=lambda k: (sign * stats[k][0], _order(k)))
  return Cell(*stats[s], len(settings[s]), len(settings), s, settings[s])


def paired_differences(
    a: Iterable[RunRecord], b: Iterable[RunRecord]
) -> dict[int, float]:
  """{seed: a's loss - b's loss} for the seeds both sets of runs hold (one
  run per seed each): the paired comparison of two settings."""
  by_seed = []
  for runs in (a, b):
    seeds = group_by(runs, "seed")
    repeated = [s for s, rs in seeds.items() if len(rs) > 1]
    if repeated:
      raise ValueError(
          f"seed {repeated[0][0]} occurs in "
          f"{len(seeds[repeated[0]])} runs of one side; give "
          "one run per seed"
      )
    by_seed.append({s[0]: rs[0] for s, rs in seeds.items()})
  return {
      s: by_seed[0][s].loss - by_seed[1][s].loss
      for s in sorted(set(by_seed[0]) & set(by_seed[1]))
  }
