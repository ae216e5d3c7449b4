"""The training loop: one jitted step, eval, checkpoints, metrics, results.

The step is a pure function `(state, batch) -> (state, metrics)`, jitted once
per gradient kind (plain, SAM-family) with explicit shardings and the state
donated. The loop dispatches step N before reading step N-1's metrics, so the
host never waits on the device except at evals and checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from clu import metric_writers

from nanodo_sam import config as config_lib
from nanodo_sam import data as data_lib
from nanodo_sam import evaluate
from nanodo_sam import model as model_lib
from nanodo_sam import optimizer as optimizer_lib
from nanodo_sam import sam as sam_lib
from nanodo_sam import sharding

log = logging.getLogger("nanodo_sam")


class DivergedError(RuntimeError):
  """The training loss became non-finite."""


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array
  # sam_lib.Reuse carried between full SAM-family steps when sam.reuse is
  # on (checkpointed with the rest); None otherwise.
  reuse: Any = None


@dataclasses.dataclass
class Setup:
  """Everything derived from a config that the loop and the CLI share."""
  cfg: Any
  model: model_lib.TransformerDo
  logits_fn: Any
  tx: optax.GradientTransformation
  mesh: jax.sharding.Mesh
  state_sharding: Any
  abstract_state: Any


def setup(cfg) -> Setup:
  """Validates the config and builds model, optimizer, mesh and shardings."""
  config_lib.validate(cfg, num_devices=jax.device_count())
  model = model_lib.TransformerDo(config_lib.model_config(cfg))
  tx = optimizer_lib.make_optimizer(cfg.opt)
  mesh = sharding.make_mesh(cfg.mesh)

  def init_boxed(rng):
    params = model.init(rng, jnp.zeros((1, cfg.model.L), jnp.int32))["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=tx.init(params), rng=rng,
                      reuse=_reuse_init(cfg, params))

  boxed = jax.eval_shape(init_boxed, jax.random.key(0))
  state_sharding = sharding.logical_to_sharding(boxed, mesh)
  abstract_state = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      nn.unbox(boxed), state_sharding)
  logits_fn = sharding.pin_params(model_lib.make_logits_fn(model),
                                 state_sharding.params)
  return Setup(cfg, model, logits_fn, tx, mesh,
               state_sharding, abstract_state)


def init_state(s: Setup, seed: int) -> TrainState:
  def init(rng):
    init_rng, state_rng = jax.random.split(rng)
    params = nn.unbox(s.model.init(
        init_rng, jnp.zeros((1, s.cfg.model.L), jnp.int32))["params"])
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=s.tx.init(params), rng=state_rng,
                      reuse=_reuse_init(s.cfg, params))
  return jax.jit(init, out_shardings=s.state_sharding)(jax.random.key(seed))


def _reuse_init(cfg, params):
  return sam_lib.reuse_init(params) if cfg.sam.get("reuse", False) else None


def rho_at(sam_cfg, step):
  """rho, warmed up linearly from 0 over rho_warmup_steps."""
  if sam_cfg.rho_warmup_steps <= 0:
    return jnp.asarray(sam_cfg.rho, jnp.float32)
  frac = jnp.minimum((step + 1) / sam_cfg.rho_warmup_steps, 1.0)
  return sam_cfg.rho * frac.astype(jnp.float32)


def uses_sam_step(sam_cfg, step: int) -> bool:
  """Whether step `step` takes the configured SAM-family gradient."""
  if sam_cfg.method == "adamw" or step < sam_cfg.start_step:
    return False
  if 0 <= sam_cfg.end_step <= step:
    return False
  return (step - sam_cfg.start_step) % sam_cfg.every_k == 0


def step_kind(sam_cfg, step: int) -> str:
  """Which compiled step runs step `step`: "sam" (the configured method's
  gradient), "reuse" (between two of those with sam.reuse on: the plain
  gradient plus the carried correction) or "plain"."""
  if uses_sam_step(sam_cfg, step):
    return "sam"
  in_window = (sam_cfg.method != "adamw" and step >= sam_cfg.start_step
               and not 0 <= sam_cfg.end_step <= step)
  return "reuse" if in_window and sam_cfg.get("reuse", False) else "plain"


def make_train_step(s: Setup, method: str, correct: bool = False):
  """The pure step for one gradient method (jitted by `jit_train_step`).

  With sam.reuse on, a SAM-family step also stores `Reuse(g_method - g,
  ||g||)` in the state, and `correct=True` (method "adamw") builds the cheap
  step in between: the plain gradient plus that difference rescaled to the
  current ||g|| (`sam.reuse_correction`), one forward and one backward.
  """
  cfg = s.cfg
  sam_cfg = cfg.sam
  schedule = optimizer_lib.learning_rate_schedule(cfg.opt)
  accum = cfg.grad_accumulation_steps
  store = bool(sam_cfg.get("reuse", False)) and method != "adamw"
  if correct and (method != "adamw" or not sam_cfg.get("reuse", False)):
    raise ValueError("correct=True is the sam.reuse step: method 'adamw' "
                     "with sam.reuse on")

  def step_fn(state: TrainState, batch):
    rho = rho_at(sam_cfg, state.step)
    precond = None
    if method in sam_lib.PRECOND_METHODS:
      precond, _ = optimizer_lib.adam_preconditioner(
          state.opt_state, b2=cfg.opt.b2, eps=cfg.opt.eps)
    loss, grads, metrics, *reuse = sam_lib.accumulated_gradient(
        method, state.params, batch, logits_fn=s.logits_fn, rho=rho,
        phi=sam_cfg.phi, precond=precond,
        precond_normalize=sam_cfg.precond_normalize, num_microbatches=accum,
        perturbation_scope=sam_cfg.perturbation_scope, return_reuse=store)
    reuse = reuse[0] if store else state.reuse
    if correct:
      g = grads
      grads = sam_lib.reuse_correction(g, reuse.delta, reuse.grad_norm)
      metrics = dict(metrics, cosine=sam_lib.cosine(grads, g), rho=rho)
    updates, opt_state = s.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(metrics, loss=loss, learning_rate=schedule(state.step),
                   update_norm=optax.tree.norm(updates))
    return state.replace(step=state.step + 1, params=params,
                         opt_state=opt_state, reuse=reuse), metrics

  return step_fn


def jit_train_step(s: Setup, method: str, correct: bool = False):
  return jax.jit(
      make_train_step(s, method, correct),
      in_shardings=(s.state_sharding, sharding.batch_sharding(s.mesh)),
      out_shardings=(s.state_sharding, sharding.replicated(s.mesh)),
      donate_argnums=0)


def jit_step(s: Setup, kind: str):
  """The compiled step for a `step_kind`."""
  if kind == "reuse":
    return jit_train_step(s, "adamw", correct=True)
  return jit_train_step(s, s.cfg.sam.method if kind == "sam" else "adamw")


def _all_finite(tree) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x))
                            for x in jax.tree.leaves(tree)]))


class WandbWriter(metric_writers.MetricWriter):
  """clu MetricWriter that forwards scalars to wandb (offline works)."""

  def __init__(self, cfg, workdir: str):
    import wandb
    self._wandb = wandb
    self._run = wandb.init(project=cfg.wandb.project, mode=cfg.wandb.mode,
                           dir=workdir, config=config_lib.to_dict(cfg),
                           name=os.path.basename(os.path.abspath(workdir)),
                           resume="allow")

  def write_scalars(self, step, scalars):
    self._run.log(dict(scalars), step=int(step))

  def write_summaries(self, step, values, metadata=None):
    pass

  def write_images(self, step, images):
    pass

  def write_videos(self, step, videos):
    pass

  def write_audios(self, step, audios, *, sample_rate):
    pass

  def write_texts(self, step, texts):
    pass

  def write_histograms(self, step, arrays, num_buckets=None):
    pass

  def write_hparams(self, hparams):
    pass

  def flush(self):
    pass

  def close(self):
    self._run.finish()


def make_writer(cfg, workdir: str):
  writer = metric_writers.create_default_writer(
      workdir, just_logging=jax.process_index() > 0, asynchronous=True)
  if cfg.wandb.enabled and jax.process_index() == 0:
    writer = metric_writers.MultiWriter([writer, WandbWriter(cfg, workdir)])
  return writer


def checkpoint_manager(workdir: str, max_to_keep: int = 3):
  return ocp.CheckpointManager(
      os.path.join(os.path.abspath(workdir), "checkpoints"),
      options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                           create=True))


def restore_state(mngr, s: Setup, step: int | None = None) -> TrainState:
  step = mngr.latest_step() if step is None else step
  return mngr.restore(step, args=ocp.args.StandardRestore(s.abstract_state))


def _data_state_dir(workdir: str, step: int) -> str:
  return os.path.join(workdir, "data_state", str(step))


def _write_json(path: str, obj: dict) -> None:
  if jax.process_index() == 0:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(obj, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def _format_size(n: int) -> str:
  return f"{n / 1e6:.1f}M" if n < 1e9 else f"{n / 1e6:.0f}M"


def train(cfg, workdir: str) -> dict:
  """Trains (or resumes) a run in `workdir`; returns the results dict."""
  t_start = time.time()
  s = setup(cfg)  # Validates everything before touching the disk.
  config_lib.check_workdir(cfg, workdir)
  train_ds = data_lib.train_dataset(cfg, cfg.seed)
  eval_data = data_lib.eval_batches(cfg)
  os.makedirs(workdir, exist_ok=True)
  _write_json(os.path.join(workdir, "config.json"), config_lib.to_dict(cfg))

  mngr = checkpoint_manager(workdir, cfg.checkpoint_max_to_keep)
  train_it = data_lib.TrainIterator(train_ds)
  if mngr.latest_step() is not None:
    start = mngr.latest_step()
    state = restore_state(mngr, s)
    train_it.restore(_data_state_dir(workdir, start))
    log.info("Resumed from step %d in %s", start, workdir)
  else:
    start = 0
    state = init_state(s, cfg.seed)

  writer = make_writer(cfg, workdir)
  if start == 0:
    writer.write_hparams({k: v for k, v in _flat(config_lib.to_dict(cfg))
                          .items() if isinstance(v, (int, float, str, bool))})
  total = cfg.opt.num_train_steps
  step_fns = {}

  def step_fn_for(step: int):
    kind = step_kind(cfg.sam, step)
    if kind not in step_fns:
      step_fns[kind] = jit_step(s, kind)
    return step_fns[kind]

  params_sharding = s.state_sharding.params
  eval_step = evaluate.make_eval_step(s.logits_fn, params_sharding,
                                      sharding.batch_sharding(s.mesh))
  put = lambda b: sharding.global_batch(b, s.mesh)
  diagnose = _make_diagnostics(cfg, s, eval_data)
  finite_fn = jax.jit(_all_finite)
  tokens_per_step = cfg.data.batch_size * cfg.model.L
  eval_history = []
  status = "completed"
  pending = None  # (step, metrics on device): read one step late.
  logged_precond_fallback = False
  finished = [start]  # Steps whose loss was read back finite.

  def flush(pending):
    if pending is None:
      return
    step, metrics = pending
    metrics = jax.device_get(metrics)
    if not np.isfinite(metrics["loss"]):
      raise DivergedError(f"training loss is {metrics['loss']} at step "
                          f"{step}; the last good checkpoint is kept")
    finished[0] = step + 1
    if (step + 1) % cfg.log_every_steps == 0 or step == 0:
      writer.write_scalars(step + 1, {f"train/{k}": float(v)
                                      for k, v in metrics.items()})
      progress.log(step + 1, metrics)

  def run_eval(step):
    loss = evaluate.eval_loss(eval_step, state.params, eval_data, put)
    eval_history.append((step, loss))
    writer.write_scalars(step, {"eval/loss": loss})
    log.info("step %d: eval loss %.4f", step, loss)
    return loss

  def save(step):
    if not bool(finite_fn(state.params)):
      raise DivergedError(f"parameters are non-finite after step {step}; "
                          "the last good checkpoint is kept")
    train_it.save(_data_state_dir(workdir, step))
    mngr.save(step, args=ocp.args.StandardSave(state))

  progress = _Progress(start, total, tokens_per_step, writer)
  t_loop = time.time()
  try:
    for step in range(start, total):
      batch = put(next(train_it))
      if (cfg.sam.method in sam_lib.PRECOND_METHODS and step == 0
          and uses_sam_step(cfg.sam, step) and not logged_precond_fallback):
        log.info("step 0: AdamW has no second moment yet; %s uses the "
                 "unpreconditioned perturbation for this step",
                 cfg.sam.method)
        logged_precond_fallback = True
      if diagnose and step % cfg.diagnostics.every_steps == 0:
        writer.write_scalars(step, diagnose(state, batch, step))
      state, metrics = step_fn_for(step)(state, batch)
      flush(pending)
      pending = (step, metrics)
      done = step + 1
      if cfg.eval_every_steps and done % cfg.eval_every_steps == 0 \
          and done != total:
        flush(pending)
        pending = None
        run_eval(done)
      if cfg.checkpoint_every_steps and \
          done % cfg.checkpoint_every_steps == 0 and done != total:
        flush(pending)
        pending = None
        save(done)
    flush(pending)
    pending = None
    final_loss = run_eval(total)
    if mngr.latest_step() != total:
      save(total)
  except DivergedError as e:
    log.error("%s", e)
    status = "diverged"
    final_loss = float("nan")
  finally:
    mngr.wait_until_finished()
    _prune_data_states(workdir, mngr)
    writer.flush()
  steps_done = finished[0]
  finite = [l for _, l in eval_history if np.isfinite(l)]
  n_params = model_lib.non_embedding_params(s.model.cfg)
  results = {
      "final_eval_loss": final_loss,
      "best_eval_loss": min(finite) if finite else float("nan"),
      "steps": steps_done,
      "tokens": steps_done * tokens_per_step,
      "method": cfg.sam.method,
      "rho": cfg.sam.rho,
      "phi": cfg.sam.phi,
      "peak_learning_rate": cfg.opt.peak_learning_rate,
      "model_size": n_params,
      "model_size_name": cfg.model.get("size_name", "") or
                         _format_size(n_params),
      "wall_seconds": time.time() - t_start,
      "train_seconds": time.time() - t_loop,
      # CPU time of this process (all threads): unlike wall time, it does not
      # grow when other jobs share the machine.
      "cpu_seconds": time.process_time(),
      "status": status,
      "eval_history": eval_history,
  }
  _write_json(os.path.join(workdir, "results.json"), results)
  writer.close()
  return results


class _Progress:
  """Console line every log_every_steps: loss, steps/s, tokens/s, ETA."""

  def __init__(self, start: int, total: int, tokens_per_step: int, writer):
    self.total, self.tokens_per_step, self.writer = total, tokens_per_step, \
        writer
    self.last_step, self.last_time = start, time.time()

  def log(self, step: int, metrics) -> None:
    now = time.time()
    if step > self.last_step and now > self.last_time:
      rate = (step - self.last_step) / (now - self.last_time)
      eta = (self.total - step) / rate
      self.writer.write_scalars(step, {
          "perf/steps_per_sec": rate,
          "perf/tokens_per_sec": rate * self.tokens_per_step})
      log.info("step %d/%d: loss %.4f, grad_norm %.3f | %.2f steps/s, "
               "%.0f tokens/s, ETA %s", step, self.total, metrics["loss"],
               metrics["grad_norm"], rate, rate * self.tokens_per_step,
               time.strftime("%H:%M:%S", time.gmtime(eta)))
    self.last_step, self.last_time = step, now


def _prune_data_states(workdir: str, mngr) -> None:
  root = os.path.join(workdir, "data_state")
  if not os.path.isdir(root) or jax.process_index() != 0:
    return
  keep = {str(s) for s in mngr.all_steps()}
  for name in os.listdir(root):
    if name not in keep:
      shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def _flat(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def _make_diagnostics(cfg, s: Setup, eval_data):
  """`diagnose(state, batch, step) -> scalars`, run before step `step` (at
  theta_step) every diagnostics.every_steps; None when off.

  On the fixed eval batches (default): the full sharpness set. With
  diagnostics.on_train_batch: Long & Bartlett's edge-of-stability set on the
  current training minibatch, including the alignment of g and of the
  configured method's gradient with the top Hessian eigenvector.
  """
  d = cfg.diagnostics
  if not d.every_steps:
    return None
  from nanodo_sam import sharpness
  schedule = optimizer_lib.learning_rate_schedule(cfg.opt)
  if d.get("on_train_batch", False):
    def eos(state, batch, lr, rho, rng):
      precond = None
      if cfg.sam.method in sam_lib.PRECOND_METHODS:
        precond, _ = optimizer_lib.adam_preconditioner(
            state.opt_state, b2=cfg.opt.b2, eps=cfg.opt.eps)
      _, sam_grads, _ = sam_lib.gradient(
          cfg.sam.method, state.params, batch, logits_fn=s.logits_fn,
          rho=rho, phi=cfg.sam.phi, precond=precond,
          precond_normalize=cfg.sam.precond_normalize)
      return sharpness.edge_of_stability(
          state.params, batch, sam_grads, logits_fn=s.logits_fn, lr=lr,
          rho=rho, num_iters=d.num_iters, rng=rng, tol=d.tol)
    fn = jax.jit(eos, in_shardings=(s.state_sharding,
                                    sharding.batch_sharding(s.mesh), None,
                                    None, None))
    prefix = "eos"
  else:
    fixed = diagnostics_batch(cfg, eval_data)
    fn = jax.jit(lambda state, batch, lr, rho, rng: sharpness.diagnostics(
        state.params, fixed, logits_fn=s.logits_fn, lr=lr, rho=rho,
        num_iters=d.num_iters, num_probes=d.num_probes, rng=rng, tol=d.tol,
        precond=adam_precond(cfg, state.opt_state)))
    prefix = "sharpness"

  def diagnose(state, batch, step):
    rng = jax.random.fold_in(state.rng, step)
    out = jax.device_get(fn(state, batch, schedule(step),
                            rho_at(cfg.sam, step), rng))
    return {f"{prefix}/{k}": float(v) for k, v in out.items()}

  return diagnose


def adam_precond(cfg, opt_state):
  """AdamW's P from an optimizer state (all ones before its first update),
  or None for another optimizer: the preconditioned direction of the
  sharpness decomposition."""
  if cfg.opt.optimizer != "adamw":
    return None
  precond, _ = optimizer_lib.adam_preconditioner(opt_state, b2=cfg.opt.b2,
                                                 eps=cfg.opt.eps)
  return precond


def diagnostics_batch(cfg, eval_data):
  """The fixed [K, B, L] batch the sharpness metrics are computed on."""
  k, b = cfg.diagnostics.num_batches, cfg.diagnostics.batch_size
  if len(eval_data) < k:
    raise config_lib.UsageError(
        f"diagnostics.num_batches={k} exceeds data.eval_steps="
        f"{len(eval_data)} eval batches; lower it or raise data.eval_steps")
  return {key: np.stack([eb[key][:b] for eb in eval_data[:k]])
          for key in eval_data[0]}
