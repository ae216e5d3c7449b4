"""Config files, command-line overrides and the checks run before any work.

Configs are ml_collections ConfigDicts from `configs/*.py` (each defines
`get_config()`); `--config.a.b=v` overrides go through ml_collections'
config_flags. `validate` raises `UsageError` (one line: what is wrong and how
to fix it) before anything is compiled or written.
"""

from __future__ import annotations

import json
import math
import os

import ml_collections


class UsageError(ValueError):
  """Bad input: reported as one line and exit code 2 by the CLI."""


METHODS = ("adamw", "sam", "functional_sam", "logit_sam", "angle_sam",
           "precond_sam", "precond_functional_sam")
OPTIMIZERS = ("adamw", "sgd", "momentum")
DECAY_TYPES = ("cosine", "linear", "constant")
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


def from_json_file(path: str) -> ml_collections.ConfigDict:
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def model_config(cfg):
  """The model section as a `model.DoConfig`."""
  from nanodo_sam.model import DoConfig
  m = cfg.model
  try:
    return DoConfig(D=m.D, H=m.H, N=m.N, F=m.F, L=m.L, V=m.V,
                    nonlinearity=m.nonlinearity, dtype=m.dtype,
                    remat=m.remat)
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
    _require(math.isfinite(v) and v >= 0,
             f"opt.{key}={v} must be a finite number >= 0")
  _require(0 <= opt.b1 < 1 and 0 <= opt.b2 < 1,
           "opt.b1 and opt.b2 must lie in [0, 1)")
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
    for key in ("num_batches", "num_iters", "num_probes"):
      _require(cfg.diagnostics[key] >= 1,
               f"diagnostics.{key} must be >= 1 when diagnostics are on")
  if num_devices is not None:
    from nanodo_sam import sharding
    sharding.validate(cfg, num_devices)


def check_workdir(cfg, workdir: str) -> None:
  """A workdir that already holds a run must hold the same model and train
  state layout (sam.reuse adds a field to the checkpointed state)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return
  old = from_json_file(path)
  old_model = to_dict(old.model)
  new_model = to_dict(cfg.model)
  diff = sorted(k for k in set(old_model) | set(new_model)
                if k not in ("remat", "dtype")
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
