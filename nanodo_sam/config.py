"""Config files, command-line overrides and the checks run before any work.

Configs are ml_collections ConfigDicts from `configs/*.py` (each defines
`get_config()`); `--config.a.b=v` overrides go through ml_collections'
config_flags. `validate` raises `UsageError` (one line: what is wrong and how
to fix it) before anything is compiled or written.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import sys

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


def validate(cfg, num_devices: int | None = None) -> None:
  """Checks the whole config; raises UsageError on the first problem."""
  model_config(cfg)
  opt, sam, data = cfg.opt, cfg.sam, cfg.data
  _require(opt.optimizer in OPTIMIZERS,
           f"opt.optimizer={opt.optimizer!r} is unknown; use one of "
           f"{', '.join(OPTIMIZERS)}")
  _require(opt.decay_type in DECAY_TYPES,
           f"opt.decay_type={opt.decay_type!r} is unknown; use one of "
           f"{', '.join(DECAY_TYPES)}")
  _require(opt.num_train_steps > 0, "opt.num_train_steps must be positive")
  _require(0 <= opt.warmup_steps <= opt.num_train_steps,
           f"opt.warmup_steps={opt.warmup_steps} must lie in "
           f"[0, opt.num_train_steps={opt.num_train_steps}]")
  for key in ("peak_learning_rate", "init_learning_rate",
              "final_learning_rate", "weight_decay", "eps",
              "clip_by_global_norm"):
    v = opt[key]
    if v is None and key in ("init_learning_rate", "final_learning_rate"):
      continue  # peak / 10.
    _require(isinstance(v, (int, float)) and math.isfinite(v) and v >= 0,
             f"opt.{key}={v} must be a finite number >= 0")
  _require(0 <= opt.b1 < 1 and 0 <= opt.b2 < 1,
           "opt.b1 and opt.b2 must lie in [0, 1)")
  _require(not (opt.independent_weight_decay and opt.weight_decay
                and not opt.peak_learning_rate > 0),
           "opt.independent_weight_decay divides opt.weight_decay by "
           "opt.peak_learning_rate, which is 0; set a positive peak or "
           "--config.opt.independent_weight_decay=False")
  _require(isinstance(opt.weight_decay_exclusions, str),
           f"opt.weight_decay_exclusions={opt.weight_decay_exclusions!r} must "
           "be a string of comma-separated name fragments, e.g. "
           "'scale,embedding'")
  _require(not (data.add_bos and data.vocab == BYTE_VOCAB),
           "data.add_bos=True but the byte vocabulary has no BOS piece; set "
           "--config.data.add_bos=False (documents are then closed with EOS "
           "only) or use a SentencePiece data.vocab")
  _require(data.packing in PACKINGS,
           f"data.packing={data.packing!r} is unknown; use one of "
           f"{', '.join(PACKINGS)}")
  _require(data.eval_mode in EVAL_MODES,
           f"data.eval_mode={data.eval_mode!r} is unknown; use one of "
           f"{', '.join(EVAL_MODES)}")
  from nanodo_sam import sam as sam_lib
  try:
    sam_lib.validate(sam.method, sam.rho, sam.phi, optimizer=opt.optimizer,
                     precond_normalize=sam.precond_normalize,
                     perturbation_scope=sam.perturbation_scope)
  except ValueError as e:
    raise UsageError(str(e)) from None
  _require(sam.every_k >= 1, f"sam.every_k={sam.every_k} must be >= 1")
  if sam.get("reuse", False):
    _require(sam.method != "adamw",
             "sam.reuse=True needs a SAM-family sam.method to reuse; set "
             "sam.method (e.g. functional_sam) or sam.reuse=False")
    _require(sam.every_k > 1,
             "sam.reuse=True does nothing with sam.every_k=1 (every step is "
             "a full one); set sam.every_k > 1 or sam.reuse=False")
  _require(sam.rho_warmup_steps >= 0 and sam.start_step >= 0,
           "sam.rho_warmup_steps and sam.start_step must be >= 0")
  _require(sam.end_step < 0 or sam.end_step >= sam.start_step,
           f"sam.end_step={sam.end_step} is before sam.start_step="
           f"{sam.start_step}; use -1 for 'until the end'")
  for key in ("batch_size", "eval_batch_size", "eval_steps"):
    _require(data[key] > 0, f"data.{key} must be positive")
  _require(cfg.grad_accumulation_steps >= 1,
           "grad_accumulation_steps must be >= 1")
  _require(data.batch_size % cfg.grad_accumulation_steps == 0,
           f"data.batch_size={data.batch_size} is not divisible by "
           f"grad_accumulation_steps={cfg.grad_accumulation_steps}")
  for key in ("eval_every_steps", "checkpoint_every_steps"):
    _require(cfg[key] >= 0, f"{key} must be >= 0 (0 = only at the end)")
  _require(cfg.diagnostics.every_steps >= 0,
           "diagnostics.every_steps must be >= 0 (0 = off)")
  if cfg.diagnostics.every_steps:
    _require(cfg.diagnostics.num_batches >= 1,
             "diagnostics.num_batches must be >= 1 when diagnostics are on")
    for key in ("num_iters", "num_probes"):
      _require(cfg.diagnostics[key] >= 0,
               f"diagnostics.{key} must be >= 0 (0 leaves out "
               f"{'lambda_max' if key == 'num_iters' else 'the traces'})")
  profile = cfg.get("profile")
  if profile is not None and profile.num_steps:
    _require(profile.num_steps > 0 and profile.start_step >= 1,
             f"profile.start_step={profile.start_step}, profile.num_steps="
             f"{profile.num_steps}: trace num_steps > 0 steps from a "
             "start_step >= 1 (step 0 compiles), or set num_steps=0 (off)")
  if num_devices is not None:  # Checks against this machine.
    from nanodo_sam import model as model_lib
    from nanodo_sam import sharding
    sharding.validate(cfg, num_devices)
    try:
      model_lib.attention_implementation(model_config(cfg))
    except ValueError as e:
      raise UsageError(str(e)) from None


def check_workdir(cfg, workdir: str) -> None:
  """A workdir that already holds a run must hold the same model and train
  state layout (sam.reuse adds a field to the checkpointed state), and the
  same value of every setting whose default changed when the defaults
  became Nanodo's (LEGACY_DEFAULTS): resuming an older run with today's
  defaults would silently switch its optimizer or data framing mid-run."""
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
    return module.get_config(arg) if arg else module.get_config()
  except Exception as e:  # pylint: disable=broad-except
    raise UsageError(f"config {spec!r} failed to load: "
                     f"{type(e).__name__}: {e}") from None
