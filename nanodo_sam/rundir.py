"""The run directory's files: config.json, progress.json and results.json.

`nanodo-sam train --workdir=DIR` writes config.json (the resolved config),
progress.json as it goes and results.json when the run has ended; `eval`,
`analyze`, `sample` and `prune-eval` read the config back (`read_config`),
and so does the run reader (runs.py). A run directory made before a key
existed was trained with that key's legacy value (`LEGACY_DEFAULTS`), which
`read_config` fills in and `check_workdir` holds a resumed run to.
"""

from __future__ import annotations

import json
import math
import os

import ml_collections

from nanodo_sam import keys
from nanodo_sam.config import to_dict
from nanodo_sam.errors import UsageError

CONFIG, PROGRESS, RESULTS = "config.json", "progress.json", "results.json"
# The settings used before the defaults became Nanodo's (docs/fidelity.md),
# by config key. A run directory whose config.json lacks one of these keys
# was trained with this value; `legacy_defaults(c)` sets them all (the
# companion studies in docs/experiments.md were measured so).
LEGACY_DEFAULTS = {
    "model.kernel_init": "fan_in_truncated_normal",
    "model.residual_dtype": "compute",
    "data.add_bos": False,
    "data.packing": "shifted",
    "data.eval_mode": "packed",
    "opt.init_learning_rate": 0.0,
    "opt.final_learning_rate": 0.0,
    "opt.weight_decay": 0.1,
    "opt.independent_weight_decay": False,
    "opt.weight_decay_exclusions": "",
    "opt.b2": 0.95,
    "opt.eps": 1e-8,
}


def legacy_defaults(cfg):
  """Sets every key of LEGACY_DEFAULTS on `cfg` (in place); returns it."""
  for key, value in LEGACY_DEFAULTS.items():
    *parents, last = key.split(".")
    node = cfg
    for part in parents:
      node = node[part]
    node[last] = value
  return cfg


def strict(obj):
  """`obj` with every non-finite float (NaN, +-inf) as None, so it is strict
  JSON (json.dump would write the bare NaN that most parsers reject)."""
  if isinstance(obj, dict):
    return {k: strict(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [strict(v) for v in obj]
  if hasattr(obj, "item") and getattr(obj, "ndim", None) == 0:
    obj = obj.item()  # numpy / jax scalars
  if isinstance(obj, float) and not math.isfinite(obj):
    return None
  return obj


def write_json(path: str, obj: dict) -> None:
  """Strict JSON (`strict`), written atomically (a temporary file, then
  os.replace: a kill leaves the old file or the new one), by process 0."""
  import jax  # Lazy: the run reader (runs.py) uses this module without JAX.

  if jax.process_index() == 0:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(strict(obj), f, indent=2, sort_keys=True, allow_nan=False)
    os.replace(tmp, path)


def write_config(workdir: str, cfg) -> None:
  """config.json: the run's resolved config."""
  write_json(os.path.join(workdir, CONFIG), to_dict(cfg))


def config_from_json(path: str) -> ml_collections.ConfigDict:
  """A run's config.json; keys it predates get their LEGACY_DEFAULTS value
  (what that run was trained with)."""
  with open(path) as f:
    raw = json.load(f)
  for key, value in LEGACY_DEFAULTS.items():
    *parents, last = key.split(".")
    node = raw
    for part in parents:
      node = node.setdefault(part, {})
    node.setdefault(last, value)
  # Runs made before data.use_shipped existed read $TFDS_DATA_DIR, else a
  # copy of the data the package now ships.
  raw.setdefault("data", {}).setdefault("use_shipped", True)
  return ml_collections.ConfigDict(raw)


def read_config(workdir: str | None) -> ml_collections.ConfigDict:
  """The config of the run in `workdir` (`config_from_json`); UsageError
  when there is none."""
  if not workdir:
    raise UsageError("--workdir=DIR is required")
  path = os.path.join(workdir, CONFIG)
  if not os.path.exists(path):
    raise UsageError(
        f"no run in {workdir!r} (no {CONFIG}); train one with"
        " `nanodo-sam train --config=... --workdir=DIR`"
    )
  return config_from_json(path)


def read_results(workdir: str) -> dict | None:
  """results.json of the run in `workdir`, or None if it has none."""
  path = os.path.join(workdir, RESULTS)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise UsageError(
        f"{path} cannot be read ({e}); move it away to train the run on"
    ) from None


def history_until(workdir: str, step: int) -> list:
  """The evaluations progress.json recorded up to `step`, the checkpoint the
  run resumes from: later ones (after it, before a kill) are redone."""
  path = os.path.join(workdir, PROGRESS)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    history = json.load(f).get("eval_history", [])
  return [
      (int(n), float("nan") if loss is None else float(loss))
      for n, loss in history
      if int(n) <= step
  ]


def _check_writable(workdir: str) -> None:
  """The workdir is a directory (or does not exist yet) this user can
  write in."""
  existing = os.path.abspath(workdir)
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    where = (
        "is a file"
        if existing == os.path.abspath(workdir)
        else f"lies in a file ({existing})"
    )
    raise UsageError(
        f"workdir {workdir!r} {where}, not a directory; pass "
        "--workdir=DIR, a new or existing run directory"
    )
  if not os.access(existing, os.W_OK | os.X_OK):
    raise UsageError(
        f"workdir {workdir!r} is not writable ({existing} is "
        "read-only to this user); pass a --workdir you can "
        "write to"
    )


def _check_same_run(cfg, old, workdir: str) -> None:
  """`cfg` resumes the run whose config is `old` (see check_workdir)."""
  for key in LEGACY_DEFAULTS:
    was, now = keys.get(old, key), keys.get(cfg, key)
    if was != now:
      raise UsageError(
          f"workdir {workdir!r} holds a run with {key}={was!r} (now "
          f"{now!r}); resume it with --config.{key}={was!r} or use a new "
          "--workdir"
      )
  old_model, new_model = to_dict(old.model), to_dict(cfg.model)
  diff = sorted(
      k
      for k in set(old_model) | set(new_model)
      if k not in ("remat", "dtype", "attention")
      and old_model.get(k) != new_model.get(k)
  )
  if diff:
    k = diff[0]
    raise UsageError(
        f"workdir {workdir!r} holds a run of a different model (model.{k}: "
        f"{old_model.get(k)} there, {new_model.get(k)} now); use a new "
        "--workdir or the same model config"
    )
  old_reuse = bool(keys.of(old.sam, "sam.reuse"))
  if old_reuse != bool(keys.of(cfg.sam, "sam.reuse")):
    raise UsageError(
        f"workdir {workdir!r} holds a run with sam.reuse={old_reuse}, whose "
        "checkpoints have a different train state; use a new --workdir or "
        f"--config.sam.reuse={old_reuse}"
    )


def check_workdir(cfg, workdir: str) -> None:
  """The workdir must be a directory (or not exist yet) this user can write
  in. One that already holds a run must hold the same model and train state
  layout (sam.reuse adds a field to the checkpointed state), and the same
  value of every setting whose default changed when the defaults became
  Nanodo's (LEGACY_DEFAULTS): resuming an older run with today's defaults
  would silently switch its optimizer or data framing mid-run."""
  _check_writable(workdir)
  path = os.path.join(workdir, CONFIG)
  if os.path.exists(path):
    _check_same_run(cfg, config_from_json(path), workdir)
