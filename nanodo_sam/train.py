"""The training loop: the jitted step, and periodic hooks around it.

The step is a pure function `(state, batch) -> (state, metrics)`, jitted once
per gradient kind (`sam_schedule.step_kind`: plain, SAM-family, reuse) with
explicit shardings and the state donated. The loop dispatches step N before
reading step N-1's metrics, so the host never waits on the device except
where a hook asks for it. Everything else a run does at some steps (logging,
diagnostics, eval, checkpoints) is a `Hook`, listed in `default_hooks`;
`train(cfg, workdir, hooks=[...])` adds more.

Nothing a run produced is lost when it stops early: progress.json holds the
eval history as it grows (consistent with the checkpoint a resumed run starts
from), SIGTERM/SIGINT end it at a step boundary with a checkpoint
(`preemption`), a non-finite loss keeps only checkpoints whose loss was read
back finite, and results.json (strict JSON) closes a completed or diverged
run, which started again then changes nothing.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from nanodo_sam import checkpoint
from nanodo_sam import data as data_lib
from nanodo_sam import diagnostics
from nanodo_sam import eval_data
from nanodo_sam import evaluate
from nanodo_sam import flops as flops_lib
from nanodo_sam import init_from as init_from_lib
from nanodo_sam import keys
from nanodo_sam import lm_eval_hook
from nanodo_sam import lm_eval_run
from nanodo_sam import model as model_lib
from nanodo_sam import preemption
from nanodo_sam import rundir
from nanodo_sam import sam as sam_lib
from nanodo_sam import sam_schedule
from nanodo_sam import sharding
from nanodo_sam import state as state_lib
from nanodo_sam import step as step_lib
from nanodo_sam import train_flops
from nanodo_sam import writers

log = logging.getLogger("nanodo_sam")


class DivergedError(RuntimeError):
  """The training or eval loss (or the parameters) became non-finite."""


class Preempted(Exception):
  """A stop request (SIGTERM/SIGINT) ended the run at a step boundary."""


# The run directory's files this module writes (config.json besides).
RESULTS, PROGRESS = rundir.RESULTS, rundir.PROGRESS
# results.json statuses of a run that has ended: started again, it is done.
FINISHED = ("completed", "diverged")
# progress.json status of a run whose checkpoint could not be written (a
# full disk): the same command resumes it (checkpoint.EXIT_SAVE_FAILED).
SAVE_FAILED = "save_failed"


# ------------------------------------------------------------------ the step

make_train_step = step_lib.make_train_step
jit_train_step = step_lib.jit_train_step


# The jitted step of a `sam_schedule.step_kind` (`step.jit_step`: the one
# `state.setup` compiled when it fitted the microbatches, else a new one).
jit_step = step_lib.jit_step


# --------------------------------------------------------------------- hooks

BEFORE, AFTER, METRICS = "before", "after", "metrics"


@dataclasses.dataclass(frozen=True)
class Hook:
  """`fn(run, n)`, called by the loop at every `every`-th step count n (<= 0:
  never); n counts the steps done.

  when=AFTER (default): once step n-1 is dispatched; run.state is theta_n
    (possibly still being computed).
  when=BEFORE: before step n is dispatched; run.state is theta_n and
    run.batch the batch step n takes.
  when=METRICS: when the metrics of step n-1 are read back, which is one step
    late (after step n is dispatched); run.metrics holds them on the host.
  flush: read back the pending step's metrics first (so a diverged step stops
    the run before the hook acts on its state, and the host waits for it).
  at_end: also at n = total (AFTER hooks: also when a run killed after its
    final checkpoint, before results.json, is started again). first: also
    at n = 1.
  """

  fn: Callable[[Run, int], None]
  every: int
  when: str = AFTER
  flush: bool = False
  at_end: bool = False
  first: bool = False

  def __post_init__(self):
    if self.when not in (BEFORE, AFTER, METRICS):
      raise ValueError(
          f"Hook(when={self.when!r}) is unknown; use one of "
          f"{(BEFORE, AFTER, METRICS)}"
      )

  def due(self, n: int, total: int) -> bool:
    return (
        (self.every > 0 and n % self.every == 0)
        or (self.at_end and n == total)
        or (self.first and n == 1)
    )


@dataclasses.dataclass
class Run:
  """A run in progress: what the loop keeps and hands to every hook."""

  cfg: Any
  setup: state_lib.Setup
  workdir: str
  state: state_lib.TrainState
  start: int  # the step this process started (or resumed) from
  writer: Any
  checkpoint_manager: Any  # orbax CheckpointManager of workdir/checkpoints
  train_iter: data_lib.TrainIterator
  eval_data: list
  stop: preemption.StopRequest = dataclasses.field(
      default_factory=preemption.StopRequest
  )
  hooks: list[Hook] = dataclasses.field(default_factory=list)
  batch: Any = None  # the batch step n takes (BEFORE hooks)
  metrics: dict | None = None  # step n-1's metrics, host (METRICS hooks)
  pending: tuple | None = None  # (step, its metrics on device)
  steps_done: int = 0  # steps whose loss was read back finite
  # (n, eval loss) of every evaluation of the run, across resumes.
  eval_history: list = dataclasses.field(default_factory=list)
  last_eval: tuple | None = None  # (step, evaluate.eval_metrics' dict)
  save_error: str | None = None  # the line of a failed save

  @property
  def total(self) -> int:
    return self.cfg.opt.num_train_steps

  def put(self, host_batch: dict) -> dict:
    return sharding.global_batch(host_batch, self.setup.mesh)

  def fire(self, when: str, n: int) -> None:
    """Runs the `when` hooks due at step count n, in registration order."""
    for hook in self.hooks:
      if hook.when == when and hook.due(n, self.total):
        if hook.flush:
          self.flush()
        hook.fn(self, n)

  def flush(self) -> None:
    """Reads back the pending step's metrics: stops the run on a non-finite
    loss, otherwise runs the METRICS hooks."""
    if self.pending is None:
      return
    step, metrics = self.pending
    self.pending = None
    self.metrics = jax.device_get(metrics)
    if not np.isfinite(self.metrics["loss"]):
      # Step `step`'s loss is the loss at theta_step: its checkpoint goes.
      raise self.diverged(
          f"training loss is {self.metrics['loss']} at step " f"{step}",
          bad_step=step,
      )
    self.steps_done = step + 1
    self.fire(METRICS, step + 1)

  def diverged(self, what: str, bad_step: int | None) -> DivergedError:
    """The error for a non-finite loss at theta_bad_step (or non-finite
    parameters), once that state's checkpoint, if any, is deleted: every
    other one had its loss read back finite (each step's loss is read before
    the next checkpoint is written), so the newest kept one is good."""
    if bad_step is not None:
      checkpoint.delete(self.checkpoint_manager, self.workdir, bad_step)
    checkpoint.retain(
        self.checkpoint_manager, self.workdir, self.cfg.checkpoint_max_to_keep
    )
    kept = self.checkpoint_manager.latest_step()
    ckpts = os.path.join(self.workdir, "checkpoints")
    if kept is None:
      return DivergedError(
          f"{what}; no checkpoint is kept (none was written before it); "
          "train again with other settings, in a new workdir"
      )
    return DivergedError(
        f"{what}; kept checkpoint: step {kept} in {ckpts} (its loss was "
        "finite). To go on from it with other settings (e.g. a lower "
        f"opt.peak_learning_rate), delete {self.workdir}/{RESULTS} and train "
        "again with them"
    )


def default_hooks(run: Run, diagnose=None) -> list[Hook]:
  """The loop's periodic work, in the order it runs at a step count. A new
  periodic job is one more line here (or a hook passed to `train`).
  `diagnose`: `diagnostics.make_diagnose`'s function (None: off)."""
  cfg = run.cfg
  return [
      Hook(_log_train(run), cfg.log_every_steps, when=METRICS, first=True),
      Hook(_diagnostics(diagnose), cfg.diagnostics.every_steps, when=BEFORE),
      Hook(_evaluate(run), cfg.eval_every_steps, flush=True, at_end=True),
      *(
          [Hook(_evaluate_other(run), cfg.eval_every_steps, at_end=True)]
          if cfg.get("eval_data_from")
          else []
      ),
      Hook(_save, cfg.checkpoint_every_steps, flush=True, at_end=True),
      *([Hook(_profile(cfg), 1, at_end=True)] if _profiled(cfg) else []),
      *_lm_eval(cfg),
  ]


def _lm_eval(cfg) -> list[Hook]:
  """eval.lm_eval_tasks every eval.lm_eval_every steps and at the end
  (lm_eval_hook.py), or nothing: lm_eval is imported only when they are
  set."""
  names = lm_eval_run.config_tasks(cfg)
  if not names:
    return []
  return [
      Hook(
          lm_eval_hook.make_fn(names),
          cfg.eval.lm_eval_every,
          flush=True,
          at_end=True,
      )
  ]


def _profiled(cfg) -> bool:
  p = cfg.get("profile")
  return bool(p and p.num_steps) and jax.process_index() == 0


def _profile(cfg):
  """A jax.profiler trace of steps [profile.start_step, + num_steps) in the
  workdir (plugins/profile/<time>/*.xplane.pb: TensorBoard's profile tab),
  on process 0; `_train` ends a trace the run stops inside."""
  start = cfg.profile.start_step
  stop = start + cfg.profile.num_steps

  tracing = []

  def profile_hook(run: Run, n: int) -> None:
    if n == start and n < run.total:  # AFTER hooks: before step n runs.
      jax.profiler.start_trace(run.workdir)
      tracing.append(n)
    elif tracing and n == min(stop, run.total):
      jax.block_until_ready(run.state)
      jax.profiler.stop_trace()
      tracing.clear()
      log.info(
          "profile of steps %d-%d written to %s",
          start,
          n - 1,
          os.path.join(run.workdir, "plugins", "profile"),
      )

  return profile_hook


def _end_profile() -> None:
  """Stops a trace left running (the run stopped inside the window)."""
  try:
    jax.profiler.stop_trace()
  except RuntimeError:  # None was running.
    pass


def _log_train(run: Run):
  """train/* scalars and the progress line."""
  progress = writers.Progress(
      run.start,
      run.total,
      _tokens_per_step(run.cfg),
      run.writer,
      flops_per_token=flops_lib.step_flops_per_token(run.cfg),
      num_devices=jax.device_count(),
      peak_per_device=flops_lib.peak_flops(jax.devices()[0]),
  )

  count_flops = train_flops.Counter(run.cfg)

  def log_train(run: Run, n: int) -> None:
    run.writer.write_scalars(
        n,
        {f"train/{k}": float(v) for k, v in run.metrics.items()}
        | {"train/flops": count_flops(n)},
    )
    progress.log(n, run.metrics)

  return log_train


def _diagnostics(diagnose):
  """sharpness/* (or eos/*) scalars at theta_n."""

  def write_diagnostics(run: Run, n: int) -> None:
    run.writer.write_scalars(n, diagnose(run.state, run.batch, n))

  return write_diagnostics


def _evaluate(run: Run):
  """Eval metrics over the fixed eval batches (evaluate.METRICS), logged;
  the loss is kept in the history."""
  eval_step = evaluate.eval_step_for(run.setup)

  def evaluate_hook(run: Run, n: int) -> None:
    done = n in dict(run.eval_history)  # Recorded before a restart at n.
    if done and n != run.total:  # (at the end: its metrics for results.json)
      return
    metrics = evaluate.eval_metrics(
        eval_step, run.state.params, run.eval_data, run.put
    )
    run.last_eval = (n, metrics)
    if done:
      return
    run.eval_history.append((n, metrics["loss"]))
    run.writer.write_scalars(
        n, {f"eval/{k}": metrics[k] for k in evaluate.METRICS}
    )
    log.info(
        "step %d: eval loss %.4f, perplexity %.2f, accuracy %.4f, "
        "bits/byte %.4f",
        n,
        *(metrics[k] for k in evaluate.METRICS),
    )
    _write_progress(run, "running")
    if not np.isfinite(metrics["loss"]):
      raise run.diverged(
          f"eval loss is {metrics['loss']} at step {n}", bad_step=n
      )

  return evaluate_hook


def _evaluate_other(run: Run):
  """Eval metrics on the second eval set (eval_data_from), logged as
  eval_<eval_data_name>/<metric>."""
  eval_step = evaluate.eval_step_for(run.setup)
  name, batches = eval_data.other_eval_batches(run.cfg)

  def evaluate_other_hook(run: Run, n: int) -> None:
    if n == run.start:  # The end hooks again: logged before the restart.
      return
    metrics = evaluate.eval_metrics(
        eval_step, run.state.params, batches, run.put
    )
    run.writer.write_scalars(
        n, {f"eval_{name}/{k}": metrics[k] for k in evaluate.METRICS}
    )
    log.info("step %d: eval loss on %s %.4f", n, name, metrics["loss"])

  return evaluate_other_hook


@jax.jit
def _all_finite(tree) -> jax.Array:
  return jnp.all(
      jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)])
  )


def _save(run: Run, n: int) -> None:
  """A checkpoint of theta_n and the data position (none if one exists).

  Kept on disk: checkpoint_max_to_keep checkpoints whose loss was read back
  finite, plus this newest one until step n's loss is read (a non-finite one
  deletes it: `Run.diverged`). The older ones are dropped here, once the
  previous save has finished (orbax would wait for it anyway)."""
  manager = run.checkpoint_manager
  if manager.latest_step() == n:  # Written just before a stop or restart.
    return
  if not bool(_all_finite(run.state.params)):
    raise run.diverged(
        f"parameters are non-finite after step {n - 1}", bad_step=None
    )
  checkpoint.retain(manager, run.workdir, run.cfg.checkpoint_max_to_keep)
  checkpoint.save(manager, run.train_iter, run.workdir, n, run.state)


# ---------------------------------------------------------------- the loop


def _check_step_memory(s: state_lib.Setup) -> None:
  """Compiles the largest step the run takes on abstract inputs and refuses
  it (UsageError) if it needs more memory than a device has
  (`state.check_step_memory`); the loop then runs that compiled step. A
  wrapped step function that cannot be lowered ahead is left to XLA."""
  kind = step_lib.largest_kind(s.cfg)
  fn = jit_step(s, kind)
  if not hasattr(fn, "lower"):
    return
  state_lib.check_step_memory(s, state_lib.compile_step(s, fn), kind)
  s.steps[kind] = fn


def _step_fns(s: state_lib.Setup):
  """step -> the compiled step of its kind, each compiled on first use."""
  compiled = {}

  def for_step(step: int):
    kind = sam_schedule.step_kind(s.cfg.sam, step)
    if kind not in compiled:
      compiled[kind] = jit_step(s, kind)
    return compiled[kind]

  return for_step


def _loop(run: Run) -> None:
  step_fn = _step_fns(run.setup)
  for step in range(run.start, run.total):
    if run.stop.requested(step):
      _stop(run, step)
    run.batch = run.put(next(run.train_iter))
    run.fire(BEFORE, step)
    run.state, metrics = step_fn(step)(run.state, run.batch)
    run.flush()  # Step - 1's metrics, now that step is dispatched.
    run.pending = (step, metrics)
    run.fire(AFTER, step + 1)
  run.flush()
  if run.start == run.total:  # Killed before results.json: the end hooks.
    run.fire(AFTER, run.total)


def _stop(run: Run, n: int) -> None:
  """Ends the run before step n on a stop request: reads the loss of the
  step in flight, checkpoints theta_n with the data position (unless this
  process has taken no step) and raises Preempted."""
  run.flush()
  if n > run.start:
    _save(run, n)
  log.warning(
      "stopped by %s at step %d: checkpoint written; the same command "
      "resumes the run (exit status %d)",
      run.stop.signal,
      n,
      preemption.EXIT_PREEMPTED,
  )
  raise Preempted(run.stop.signal)


def train(
    cfg,
    workdir: str,
    hooks: Sequence[Hook] = (),
    stop: preemption.StopRequest | None = None,
    setup: state_lib.Setup | None = None,
) -> dict:
  """Trains (or resumes) a run in `workdir`; returns the results dict, whose
  status is completed, diverged, preempted or save_failed (no results.json
  for these two: the same call resumes them).
  `hooks` run after `default_hooks` at each step count. `stop`: a
  StopRequest installed earlier (the CLI's); by default one is installed
  here for the call. `setup`: state.setup(cfg) if made already (the CLI
  makes it, asking data.check_available before its compiles). A run with a results.json is
  finished: started again, it returns that file's results and touches
  nothing."""
  t_start = time.time()
  # Validates everything, then asks for the data, before any compile or
  # touching the disk.
  s = setup or state_lib.setup(
      cfg, before_compile=lambda: data_lib.check_available(cfg.data)
  )
  rundir.check_workdir(cfg, workdir)
  init_from_lib.source(cfg, workdir)  # Bad init_from: one line, before disk.
  eval_data.check(cfg)  # A bad second eval set too.
  results = rundir.read_results(workdir)
  if results is not None and results.get("status") in FINISHED:
    log.info(
        "the run in %s has finished (%s at step %s); nothing to do (its "
        "results are in %s)",
        workdir,
        results.get("status"),
        results.get("steps"),
        os.path.join(workdir, RESULTS),
    )
    return results
  _check_step_memory(s)  # Still before the disk: a step that cannot fit.
  own_stop = stop is None
  stop = preemption.StopRequest().install() if own_stop else stop
  try:
    return _train(cfg, workdir, s, hooks, stop, t_start)
  finally:
    if own_stop:
      stop.restore()


def _train(
    cfg,
    workdir: str,
    s: state_lib.Setup,
    hooks: Sequence[Hook],
    stop: preemption.StopRequest,
    t_start: float,
) -> dict:
  run = _open_run(cfg, workdir, s, stop)
  run.hooks = run.hooks + list(hooks)
  _write_progress(run, "running")
  t_loop = time.time()
  status = _run_to_the_end(run)
  results = _results(
      run,
      status,
      wall_seconds=time.time() - t_start,
      train_seconds=time.time() - t_loop,
  )
  _write_progress(run, status)
  if status in FINISHED:  # A preempted run, or a failed save, is not.
    rundir.write_json(os.path.join(workdir, RESULTS), results)
  _close(run.writer, status)
  return results


def _open_run(
    cfg, workdir: str, s: state_lib.Setup, stop: preemption.StopRequest
) -> Run:
  """The run in `workdir` at its newest readable checkpoint (unreadable
  newer ones moved aside), or at step 0, with its data, writers and
  default hooks; config.json written."""
  train_ds = data_lib.train_dataset(cfg, cfg.seed)
  eval_data = data_lib.eval_batches(cfg)
  diagnose = diagnostics.make_diagnose(cfg, s, eval_data)
  os.makedirs(workdir, exist_ok=True)
  checkpoint.remove_unfinished(workdir)
  manager = checkpoint.checkpoint_manager(workdir)
  train_iter = data_lib.TrainIterator(
      train_ds, data_lib.Source(cfg.data, "train")
  )
  start, state = checkpoint.restore_latest(manager, s, workdir, train_iter)
  if start is not None:
    log.info("Resumed from step %d in %s", start, workdir)
  else:
    start, state = 0, state_lib.init_state(s, cfg.seed)
    src = init_from_lib.source(cfg, workdir)
    if src is not None:
      state = state.replace(
          params=init_from_lib.load_params(*src, s.abstract_state.params)
      )
  rundir.write_config(workdir, cfg)
  history = rundir.history_until(workdir, start)
  writer = writers.make_writer(cfg, workdir)
  if start == 0:
    writers.write_hparams(writer, cfg)
    if (
        cfg.sam.method in sam_lib.PRECOND_METHODS
        and sam_schedule.uses_sam_step(cfg.sam, 0)
    ):
      log.info(
          "step 0: AdamW has no second moment yet; %s uses the "
          "unpreconditioned perturbation for this step",
          cfg.sam.method,
      )
  run = Run(
      cfg,
      s,
      workdir,
      state,
      start,
      writer,
      manager,
      train_iter,
      eval_data,
      stop=stop,
      steps_done=start,
      eval_history=history,
  )
  run.hooks = default_hooks(run, diagnose)
  return run


def _run_to_the_end(run: Run) -> str | None:
  """Runs the loop; returns the run's status (completed, diverged,
  preempted, save_failed) once the last save is done and the writers are
  flushed. A crash is raised (the writers closed first)."""
  cfg, workdir, manager = run.cfg, run.workdir, run.checkpoint_manager
  status = None  # Stays None if the loop crashes.
  try:
    try:
      _loop(run)
      status = "completed"
    except DivergedError as e:
      log.error("%s", e)
      status = "diverged"
    except Preempted:
      status = "preempted"
    manager.wait_until_finished()  # The last save: SaveFailed if it failed.
  except Exception as e:  # pylint: disable=broad-except
    failed = checkpoint.as_save_failed(e, workdir)  # (or a full disk)
    if failed is None:
      raise
    run.save_error = checkpoint.finish_failed(manager, workdir, failed).message
    log.error("%s", run.save_error)
    status = SAVE_FAILED
  finally:
    if _profiled(cfg):
      _end_profile()
    _wait(manager, status)
    if status == "completed":  # Its final checkpoint's eval was finite.
      checkpoint.retain(manager, workdir, cfg.checkpoint_max_to_keep)
    checkpoint.prune_data_states(workdir, manager)
    if status != SAVE_FAILED:  # (events lost on a full disk are redone)
      run.writer.flush()
    if status is None:  # A crash: end the writers' runs (wandb) here too.
      run.writer.close()
  return status


def _wait(manager, status: str | None) -> None:
  """Waits for the last save; after a crash (status None), a failure of
  that save is left out: the crash is what the user must see."""
  try:
    manager.wait_until_finished()
  except checkpoint.SaveFailed:
    if status is not None:
      raise


def _close(writer, status: str) -> None:
  """Closes the writers; after a failed save their errors (a full disk) are
  left out: the run already ends with the one line that says why."""
  if status != SAVE_FAILED:
    writer.close()
    return
  try:
    writer.close()
  except Exception:  # pylint: disable=broad-except
    pass


# ------------------------------------------- progress.json and results.json


def _write_progress(run: Run, status: str) -> None:
  """progress.json: the run so far, rewritten atomically at each eval and
  whenever the run starts or stops. status: running (or killed while
  running), preempted, completed, diverged."""
  progress = {
      "status": status,
      "steps": run.steps_done,
      "checkpoint_step": run.checkpoint_manager.latest_step(),
      "eval_history": run.eval_history,
  }
  if status == "preempted":
    progress["signal"] = run.stop.signal
  if status == SAVE_FAILED:
    progress["error"] = run.save_error
    try:  # The failed save's space is freed, but the disk may still be full.
      rundir.write_json(os.path.join(run.workdir, PROGRESS), progress)
    except OSError as e:
      log.error("progress.json could not be updated either (%s)", e)
    return
  rundir.write_json(os.path.join(run.workdir, PROGRESS), progress)


def _tokens_per_step(cfg) -> int:
  return cfg.data.batch_size * cfg.model.L


def _results(
    run: Run, status: str, wall_seconds: float, train_seconds: float
) -> dict:
  """The results dict; non-finite values become null on disk."""
  cfg = run.cfg
  final = (
      dict(run.eval_history).get(run.total) if status == "completed" else None
  )
  finite = [l for _, l in run.eval_history if np.isfinite(l)]
  at, last = run.last_eval or (None, {})
  final_metrics = {
      f"final_eval_{k}": (
          last[k] if at == run.total and status == "completed" else None
      )
      for k in evaluate.METRICS
      if k != "loss"
  }
  n_params = model_lib.non_embedding_params(run.setup.model.cfg)
  return {
      "final_eval_loss": final,
      "best_eval_loss": min(finite) if finite else None,
      **final_metrics,
      "steps": run.steps_done,
      "tokens": run.steps_done * _tokens_per_step(cfg),
      "train_flops": train_flops.train_flops(cfg, run.steps_done),
      "method": cfg.sam.method,
      "rho": cfg.sam.rho,
      "phi": cfg.sam.phi,
      "peak_learning_rate": cfg.opt.peak_learning_rate,
      "model_size": n_params,
      "model_size_name": keys.of(cfg.model, "model.size_name")
      or _format_size(n_params),
      "wall_seconds": wall_seconds,
      "train_seconds": train_seconds,
      # CPU time of this process (all threads): unlike wall time, it does not
      # grow when other jobs share the machine.
      "cpu_seconds": time.process_time(),
      "status": status,
      # The newest checkpoint kept (None: none): with status diverged, the
      # last state whose loss was finite.
      "checkpoint_step": run.checkpoint_manager.latest_step(),
      "eval_history": run.eval_history,
      **(
          {"lm_eval": lm_eval_hook.read_history(run.workdir)}
          if run.cfg.get("eval", {}).get("lm_eval_tasks")
          else {}
      ),
  }


def _format_size(n: int) -> str:
  return f"{n / 1e6:.1f}M" if n < 1e9 else f"{n / 1e6:.0f}M"
