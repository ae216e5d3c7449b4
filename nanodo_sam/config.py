"""Config files, command-line overrides and the checks run before any work.

Configs are ml_collections ConfigDicts from `configs/*.py` (each defines
`get_config()`); `--config.a.b=v` overrides go through ml_collections'
config_flags. `validate` raises `UsageError` (one line: what is wrong and how
to fix it) before anything is compiled or written.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sys

import ml_collections

from nanodo_sam import keys as keys_lib
from nanodo_sam.errors import UsageError, one_line as _one_line


BYTE_VOCAB = keys_lib.BYTE_VOCAB
# The settings this project used before its defaults became Nanodo's
# (docs/fidelity.md), by config key. A run directory whose config.json lacks
# one of these keys was trained with this value; `legacy_defaults(c)` sets
# them all (the companion studies in docs/experiments.md were measured so).
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
# The paper's model sizes by name (appendix A.1; table in configs/sizes.py).
PAPER_SIZES = {
    "2M": dict(D=256, H=4, N=3, F=1024),
    "23.9M": dict(D=576, H=9, N=6, F=2304),
    "42.5M": dict(D=768, H=12, N=6, F=3072),
    "117.9M": dict(D=1280, H=20, N=6, F=5120),
    "1208M": dict(D=4096, H=64, N=6, F=16384),
}


def to_dict(cfg) -> dict:
  return json.loads(cfg.to_json_best_effort())


_get = keys_lib.get


def _set(cfg, key: str, value) -> None:
  *path, last = key.split(".")
  node = cfg
  for part in path:
    node = node[part]
  node[last] = value


def legacy_defaults(cfg):
  """Sets every key of LEGACY_DEFAULTS on `cfg` (in place); returns it."""
  for key, value in LEGACY_DEFAULTS.items():
    _set(cfg, key, value)
  return cfg


def from_json_file(path: str) -> ml_collections.ConfigDict:
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


def model_config(cfg):
  """The model section as a `model.DoConfig`."""
  from nanodo_sam.model import DoConfig
  m = cfg.model
  try:
    return DoConfig(D=m.D, H=m.H, N=m.N, F=m.F, L=m.L, V=m.V,
                    nonlinearity=m.nonlinearity, dtype=m.dtype,
                    remat=m.remat, kernel_init=m.kernel_init,
                    residual_dtype=m.residual_dtype,
                    attention=m.get("attention", "xla"))
  except ValueError as e:
    raise UsageError(str(e)) from None


def _require(cond: bool, msg: str) -> None:
  if not cond:
    raise UsageError(msg)


# Every key's type and range: the one table of keys (keys.py).
KEYS = keys_lib.KEYS
check_keys = keys_lib.check


def validate(cfg, num_devices: int | None = None) -> None:
  """Checks the whole config; raises UsageError on the first problem: each
  key's type and range (KEYS), then what relates several keys."""
  check_keys(cfg)
  model_config(cfg)
  opt, sam, data, diag = cfg.opt, cfg.sam, cfg.data, cfg.diagnostics
  _require(opt.warmup_steps <= opt.num_train_steps,
           f"opt.warmup_steps={opt.warmup_steps} must lie in "
           f"[0, opt.num_train_steps={opt.num_train_steps}]")
  _require(not (opt.independent_weight_decay and opt.weight_decay
                and not opt.peak_learning_rate > 0),
           "opt.independent_weight_decay divides opt.weight_decay by "
           "opt.peak_learning_rate, which is 0; set a positive peak or "
           "--config.opt.independent_weight_decay=False")
  _require(not (data.add_bos and data.vocab == BYTE_VOCAB),
           "data.add_bos=True but the byte vocabulary has no BOS piece; set "
           "--config.data.add_bos=False (documents are then closed with EOS "
           "only) or use a SentencePiece data.vocab")
  from nanodo_sam import sam as sam_lib
  try:
    sam_lib.validate(sam.method, sam.rho, sam.phi, optimizer=opt.optimizer,
                     precond_normalize=sam.precond_normalize,
                     perturbation_scope=sam.perturbation_scope)
  except ValueError as e:
    raise UsageError(str(e)) from None
  if sam.get("reuse", False):
    _require(sam.method != "adamw",
             "sam.reuse=True needs a SAM-family sam.method to reuse; set "
             "sam.method (e.g. functional_sam) or sam.reuse=False")
    _require(sam.every_k > 1,
             "sam.reuse=True does nothing with sam.every_k=1 (every step is "
             "a full one); set sam.every_k > 1 or sam.reuse=False")
  _require(sam.end_step < 0 or sam.end_step >= sam.start_step,
           f"sam.end_step={sam.end_step} is before sam.start_step="
           f"{sam.start_step}; use -1 for 'until the end'")
  _require(data.batch_size % max(cfg.grad_accumulation_steps, 1) == 0,
           f"data.batch_size={data.batch_size} is not divisible by "
           f"grad_accumulation_steps={cfg.grad_accumulation_steps}")
  if diag.every_steps:  # Its fixed batch is cut from the eval batches.
    _require(diag.num_batches <= data.eval_steps,
             f"diagnostics.num_batches={diag.num_batches} exceeds "
             f"data.eval_steps={data.eval_steps} eval batches; lower it or "
             "raise data.eval_steps")
    _require(diag.batch_size <= data.eval_batch_size,
             f"diagnostics.batch_size={diag.batch_size} exceeds "
             f"data.eval_batch_size={data.eval_batch_size} (its rows come "
             "from the eval batches); lower it or raise data.eval_batch_size")
  profile = cfg.get("profile")
  if profile is not None and profile.num_steps:
    _require(profile.start_step >= 1,
             f"profile.start_step={profile.start_step}: the trace starts at a "
             "step >= 1 (step 0 compiles), or set profile.num_steps=0 (off)")
  if num_devices is not None:  # Checks against this machine.
    from nanodo_sam import model as model_lib
    from nanodo_sam import sharding
    sharding.validate(cfg, num_devices)
    try:
      model_lib.attention_implementation(model_config(cfg))
    except ValueError as e:
      raise UsageError(str(e)) from None


def check_workdir(cfg, workdir: str) -> None:
  """The workdir must be a directory (or not exist yet) we can write in. One
  that already holds a run must hold the same model and train state layout
  (sam.reuse adds a field to the checkpointed state), and the same value of
  every setting whose default changed when the defaults became Nanodo's
  (LEGACY_DEFAULTS): resuming an older run with today's defaults would
  silently switch its optimizer or data framing mid-run."""
  existing = os.path.abspath(workdir)
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    where = ("is a file" if existing == os.path.abspath(workdir)
             else f"lies in a file ({existing})")
    raise UsageError(f"workdir {workdir!r} {where}, not a directory; pass "
                     "--workdir=DIR, a new or existing run directory")
  if not os.access(existing, os.W_OK | os.X_OK):
    raise UsageError(f"workdir {workdir!r} is not writable ({existing} is "
                     "read-only to this user); pass a --workdir you can "
                     "write to")
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return
  old = from_json_file(path)
  for key in LEGACY_DEFAULTS:
    was, now = _get(old, key), _get(cfg, key)
    if was != now:
      raise UsageError(
          f"workdir {workdir!r} holds a run with {key}={was!r} (now "
          f"{now!r}); resume it with --config.{key}={was!r} or use a new "
          "--workdir")
  old_model = to_dict(old.model)
  new_model = to_dict(cfg.model)
  diff = sorted(k for k in set(old_model) | set(new_model)
                if k not in ("remat", "dtype", "attention")
                and old_model.get(k) != new_model.get(k))
  if diff:
    k = diff[0]
    raise UsageError(
        f"workdir {workdir!r} holds a run of a different model (model.{k}: "
        f"{old_model.get(k)} there, {new_model.get(k)} now); use a new "
        "--workdir or the same model config")
  old_reuse = bool(old.sam.get("reuse", False))
  if old_reuse != bool(cfg.sam.get("reuse", False)):
    raise UsageError(
        f"workdir {workdir!r} holds a run with sam.reuse={old_reuse}, whose "
        "checkpoints have a different train state; use a new --workdir or "
        f"--config.sam.reuse={old_reuse}")


# --------------------------------------------------------------- config files


def flatten(tree: dict, prefix: str = "") -> dict:
  """{"sam": {"rho": 0.1}} -> {"sam.rho": 0.1} (a config as dotted keys)."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def find_config_file(spec: str) -> tuple[str, str]:
  """(absolute path, ARG) of a config file given as 'PATH.py[:ARG]'.

  A relative PATH is looked up from the working directory, then from the
  repository root, so `configs/x.py` works from anywhere. UsageError (one
  line) when it is not a .py file or does not exist. The one resolver behind
  `nanodo-sam --config=`, `launch.sweep` and the tests.
  """
  path, _, arg = spec.partition(":")
  if not path.endswith(".py"):
    raise UsageError(f"config {spec!r} is not a .py file; give "
                     "configs/NAME.py or configs/NAME.py:ARG")
  candidates = [path] if os.path.isabs(path) else [
      os.path.join(os.getcwd(), path), os.path.join(REPO_ROOT, path)]
  found = next((c for c in candidates if os.path.isfile(c)), None)
  if found is None:
    raise UsageError(f"config file {path!r} not found (looked in "
                     f"{', '.join(dict.fromkeys(candidates))}); give "
                     "configs/NAME.py or configs/NAME.py:ARG")
  return os.path.abspath(found), arg


def add_import_root(path: str) -> None:
  """Puts the folder holding `path`'s top package (the checkout, for
  configs/x.py) first on sys.path, so config files can `from configs import
  base` whatever the working directory."""
  root = os.path.dirname(os.path.abspath(path))
  while os.path.isfile(os.path.join(root, "__init__.py")):
    root = os.path.dirname(root)
  if root not in sys.path:
    sys.path.insert(0, root)


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """The ConfigDict of 'PATH.py[:ARG]': the file's get_config(ARG), or
  get_config() without an ARG. UsageError (one line) if it fails."""
  path, arg = find_config_file(spec)
  add_import_root(path)
  module_spec = importlib.util.spec_from_file_location(
      "_config_" + re.sub(r"\W", "_", path), path)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except Exception as e:  # pylint: disable=broad-except
    raise UsageError(f"config file {path!r} failed to load: "
                     f"{_one_line(e)}") from None
  if not callable(getattr(module, "get_config", None)):
    raise UsageError(f"config file {path!r} defines no get_config(); a "
                     "config file defines get_config() returning an "
                     "ml_collections.ConfigDict (see configs/quickstart.py)")
  try:
    cfg = module.get_config(arg) if arg else module.get_config()
  except Exception as e:  # pylint: disable=broad-except
    raise UsageError(f"config {spec!r}: get_config("
                     f"{repr(arg) if arg else ''}) failed: {_one_line(e)}"
                     ) from None
  if not isinstance(cfg, ml_collections.ConfigDict):
    raise UsageError(f"config {spec!r}: get_config() returned a "
                     f"{type(cfg).__name__}, not an ml_collections.ConfigDict")
  return cfg
