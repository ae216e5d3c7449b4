"""Config files, command-line overrides and the checks run before any work.

Configs are ml_collections ConfigDicts from `configs/*.py` (each defines
`get_config()`); `--config.a.b=v` overrides go through ml_collections'
config_flags. `validate` raises `UsageError` (one line: what is wrong and how
to fix it) before anything is compiled or written.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import numbers
import os
import re
import sys
from typing import Any, Callable

import ml_collections


class UsageError(ValueError):
  """Bad input: reported as one line and exit code 2 by the CLI."""


OPTIMIZERS = ("adamw", "sgd", "momentum")
DECAY_TYPES = ("cosine", "linear", "constant")
BYTE_VOCAB = "byte"  # data.vocab for seqio's ByteVocabulary (no BOS piece).
PACKINGS = ("nanodo", "shifted")
EVAL_MODES = ("per_document", "packed")
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


def _get(cfg, key: str, default=None):
  node = cfg
  for part in key.split("."):
    if part not in node:
      return default
    node = node[part]
  return node


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


# ------------------------------------------------------ keys: type and range

WANDB_MODES = ("online", "offline", "disabled")


@dataclasses.dataclass(frozen=True)
class Key:
  """A config key's type and range: a value of one of `types` for which
  `ok(value)` holds, else UsageError "KEY=VALUE `need`". none_ok: None (an
  unset placeholder) is allowed."""
  name: str
  types: tuple = (str,)
  ok: Callable[[Any], bool] = lambda v: True
  need: str = ""
  none_ok: bool = False


_KINDS = {int: "an integer", float: "a number", str: "a string",
          bool: "True or False"}


def _integer(name: str, least: int, note: str = "") -> Key:
  if least == 1:
    return Key(name, (int,), lambda v: v >= 1,
               f"must be a positive integer{note}")
  return Key(name, (int,), lambda v: v >= least,
             f"must be an integer >= {least}{note}")


def _number(name: str, least: float | None = 0.0, below: float | None = None,
            none_ok: bool = False, note: str = "") -> Key:
  """A finite number >= least (None: any) and < below (None: no bound)."""
  need = ("must be a finite number" if least is None else
          f"must be >= {least:g}" if below is None else
          f"must lie in [{least:g}, {below:g})")
  return Key(name, (float,), lambda v: (
      math.isfinite(v) and (least is None or v >= least)
      and (below is None or v < below)), need + note, none_ok)


def _choice(name: str, options: tuple) -> Key:
  return Key(name, (str,), lambda v: v in options,
             f"is unknown; use one of {', '.join(options)}")


def _flag(name: str) -> Key:
  return Key(name, (bool,))


# Every key of configs/base.py, in its order (tests/test_cli.py checks that
# none is missing). A new key is one line here; checks that relate several
# keys follow in `validate`, and each module checks its own choices
# (model.DoConfig: nonlinearity, dtype, ...; sam.validate: the method).
KEYS = (
    _integer("seed", 0), Key("workdir"), Key("schedule_name"),
    *(_integer(f"model.{k}", 1) for k in ("D", "H", "N", "F", "L", "V")),
    Key("model.nonlinearity"), Key("model.dtype"), _flag("model.remat"),
    _integer("model.head_chunk_tokens", 0, " (0: whole logits)"),
    Key("model.kernel_init"), Key("model.residual_dtype"),
    Key("model.attention"),
    Key("model.size_name"),
    Key("data.tfds_name"), Key("data.tfds_data_dir"),
    _flag("data.use_shipped"), _flag("data.download"),
    Key("data.train_split"), Key("data.eval_split"), Key("data.train_files"),
    Key("data.eval_files"),
    Key("data.text_column", (str,), bool, "must name the text field of the "
        ".jsonl / .parquet files, e.g. 'text'"),
    Key("data.vocab"),
    _integer("data.batch_size", 1), _integer("data.eval_batch_size", 1),
    _integer("data.eval_steps", 1),
    _integer("data.shuffle_buffer", 1, " (1 = no shuffling)"),
    _flag("data.add_bos"), _choice("data.packing", PACKINGS),
    _choice("data.eval_mode", EVAL_MODES),
    _choice("opt.optimizer", OPTIMIZERS), _integer("opt.num_train_steps", 1),
    _number("opt.peak_learning_rate"),
    _number("opt.init_learning_rate", none_ok=True, note=" (None: peak/10)"),
    _number("opt.final_learning_rate", none_ok=True, note=" (None: peak/10)"),
    _integer("opt.warmup_steps", 0), _choice("opt.decay_type", DECAY_TYPES),
    _number("opt.weight_decay"), _flag("opt.independent_weight_decay"),
    Key("opt.weight_decay_exclusions"),  # "scale,embedding": name fragments.
    _number("opt.b1", below=1), _number("opt.b2", below=1),
    _number("opt.eps"), _number("opt.clip_by_global_norm", note=" (0: off)"),
    Key("sam.method"), _number("sam.rho"),
    _number("sam.phi", least=None, none_ok=True),
    _integer("sam.rho_warmup_steps", 0), _integer("sam.start_step", 0),
    _integer("sam.end_step", -1, " (-1: until the end)"),
    _integer("sam.every_k", 1), _flag("sam.reuse"),
    Key("sam.precond_normalize"), Key("sam.perturbation_scope"),
    _number("sam.alpha", none_ok=True), _number("sam.adaptive_eta",
                                                none_ok=True),
    Key("sam.rho_schedule"), _number("sam.rho_min", none_ok=True),
    _integer("grad_accumulation_steps", 0, " (0: auto, the fewest "
             "microbatches that fit)"),
    _integer("eval_every_steps", 0, " (0: only at the end)"),
    _integer("checkpoint_every_steps", 0, " (0: only at the end)"),
    _integer("checkpoint_max_to_keep", 1, " (else nothing is left to "
             "resume from)"),
    _integer("log_every_steps", 1),
    _integer("diagnostics.every_steps", 0, " (0: off)"),
    _integer("diagnostics.num_batches", 1),
    _integer("diagnostics.batch_size", 1),
    _integer("diagnostics.num_iters", 0, " (0 leaves out lambda_max)"),
    _integer("diagnostics.num_probes", 0, " (0 leaves out the traces)"),
    Key("diagnostics.tol", (float,), lambda v: math.isfinite(v) and v > 0,
        "must be a positive number"),
    _flag("diagnostics.on_train_batch"),
    _integer("profile.start_step", 1, " (step 0 compiles)"),
    _integer("profile.num_steps", 0, " (0: off)"),
    _flag("wandb.enabled"), Key("wandb.project"),
    _choice("wandb.mode", WANDB_MODES),
    *(Key(f"mesh.{axis}", (int,), lambda v: v == -1 or v >= 1,
          "must be a positive integer, or -1 (the devices left)")
      for axis in ("data", "fsdp", "tensor")),
    _number("mesh.device_memory_gb", note=" (0: the device's own)"),
)
_MISSING = object()


def _is(value, types: tuple) -> bool:
  if isinstance(value, bool):
    return bool in types
  if float in types and isinstance(value, numbers.Real):
    return True
  if int in types and isinstance(value, numbers.Integral):
    return True
  return isinstance(value, tuple(t for t in types if t not in (int, float)))


def check_keys(cfg, keys=KEYS) -> None:
  """Each key's type and range (keys a config lacks, as an old run's
  config.json may, are skipped)."""
  for key in keys:
    value = _get(cfg, key.name, _MISSING)
    if value is _MISSING or (value is None and key.none_ok):
      continue
    kinds = " or ".join(_KINDS[t] for t in key.types)
    _require(_is(value, key.types),
             f"{key.name}={value!r} must be {kinds}"
             + (" or None" if key.none_ok else ""))
    _require(key.ok(value), f"{key.name}={value!r} {key.need}")


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
  _validate_sam(sam, opt.optimizer)
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


def _validate_sam(sam, optimizer: str) -> None:
  """The step's options (sam.validate), then the rho schedule's."""
  from nanodo_sam import sam as sam_lib
  try:
    sam_lib.validate(sam.method, sam.rho, sam.phi, optimizer=optimizer,
                     precond_normalize=sam.precond_normalize,
                     perturbation_scope=sam.perturbation_scope,
                     alpha=sam.get("alpha"),
                     adaptive_eta=sam.get("adaptive_eta"))
  except ValueError as e:
    raise UsageError(str(e)) from None
  _validate_rho_schedule(sam)


def _validate_rho_schedule(sam) -> None:
  """sam.rho_schedule and sam.rho_min (sam_schedule.rho_at)."""
  from nanodo_sam import sam_schedule
  schedule, rho_min = sam.get("rho_schedule", "constant"), sam.get("rho_min")
  _require(schedule in sam_schedule.RHO_SCHEDULES,
           f"sam.rho_schedule={schedule!r} is unknown; use 'constant' or "
           "'lr' (rho follows the learning rate from sam.rho_min to sam.rho)")
  _require(rho_min is None or schedule == "lr",
           f"sam.rho_min={rho_min!r} is ignored by sam.rho_schedule="
           f"{schedule!r}; unset sam.rho_min or set sam.rho_schedule='lr'")
  _require(rho_min is None or rho_min <= sam.rho,
           f"sam.rho_min={rho_min!r} exceeds sam.rho={sam.rho!r} (the "
           "largest rho, at the peak learning rate); lower sam.rho_min")


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


def _one_line(e: Exception) -> str:
  """An exception as one line: type, message, and for a syntax error where."""
  if isinstance(e, SyntaxError):
    return f"SyntaxError: {e.msg} (line {e.lineno})"
  text = " ".join(str(e).split())
  return f"{type(e).__name__}: {text}" if text else type(e).__name__
