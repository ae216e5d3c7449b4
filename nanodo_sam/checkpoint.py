"""Checkpoints: the train state (orbax) and the data position beside it.

`<workdir>/checkpoints/<step>` holds the state, `<workdir>/data_state/<step>`
the tf.data iterator, so a resumed run continues with the same batches.

The loop keeps only checkpoints it knows are good: orbax deletes nothing by
itself (max_to_keep=None); `retain` drops all but the newest few once the
newest one is known good, and `delete` drops one that is not (train.py).

Faults (docs/faults.md): a checkpoint that cannot be read is moved aside to
`checkpoints/corrupt/<step>` and the newest readable one restored
(`restore_latest`); a save that fails (a full disk) raises `SaveFailed`,
whose one line says what failed and which checkpoint is intact, and the
temporary directories it leaves are removed at the next start
(`remove_unfinished`).
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import sys
from typing import Any, NamedTuple

import jax
import orbax.checkpoint as ocp

from nanodo_sam import state as state_lib
from nanodo_sam.errors import UsageError

log = logging.getLogger("nanodo_sam")

# sysexits.h EX_IOERR: a checkpoint could not be written (a full disk); the
# newest one on disk is intact and the same command resumes from it.
EXIT_SAVE_FAILED = 74
CORRUPT = "corrupt"  # checkpoints/corrupt/<step>: unreadable ones, moved aside
TMP_MARK = ".orbax-checkpoint-tmp"  # orbax's unfinished saves


class SaveFailed(Exception):
  """Writing checkpoint `step` (or its data position, or with step None
  another of the run's files) failed; `message` (set by `finish_failed`) is
  the line for the user."""

  def __init__(
      self,
      step: int | None,
      directory: str,
      reason: str,
      needed: int | None = None,
      free: int | None = None,
  ):
    what = "the run's files" if step is None else f"checkpoint {step}"
    super().__init__(
        f"{what} could not be written in {directory}: " f"{reason}"
    )
    self.step, self.directory, self.reason = step, directory, reason
    self.needed, self.free = needed, free
    self.message = str(self)


class NoReadableCheckpoint(UsageError):
  """Every checkpoint of a run fails to restore."""


class Manager(ocp.CheckpointManager):
  """Orbax's manager; a save that fails, now or in the background, raises
  SaveFailed for its step (orbax's own error logs and their tracebacks are
  dropped: `_OrbaxErrors`), and after one failure nothing waits on orbax
  again (it would raise the same error at every wait)."""

  def __init__(self, *args, **kwargs):
    self.saving: int | None = None  # the step being written in background
    self.failed: SaveFailed | None = None
    super().__init__(*args, **kwargs)

  def save(self, step: int, *args, **kwargs):
    try:
      done = super().save(step, *args, **kwargs)  # Waits for the last save.
    except SaveFailed:
      raise
    except Exception as e:  # pylint: disable=broad-except
      raise self._fail(step, e) from None
    if done:
      self.saving = step
    return done

  def wait_until_finished(self):
    if self.failed is not None:
      return
    step, self.saving = self.saving, None
    try:
      super().wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise self._fail(step, e) from None
    if step is not None and not os.path.isdir(self.directory / str(step)):
      # Orbax logged the error without raising it.
      raise self._fail(step, None)

  def _fail(self, step, e) -> SaveFailed:
    cause = str(_innermost(e)) if e is not None else _ERRORS.last
    self.failed = SaveFailed(
        step, str(self.directory), _reason(cause or "unknown error")
    )
    return self.failed


def checkpoint_manager(workdir: str, read_only: bool = False):
  """Orbax's manager of `<workdir>/checkpoints`. read_only: for readers
  (eval, analyze), which create nothing (orbax's own read_only option logs
  warnings on every use)."""
  _ERRORS.install()
  _install_unraisable_filter()
  return Manager(
      os.path.join(os.path.abspath(workdir), "checkpoints"),
      options=ocp.CheckpointManagerOptions(
          max_to_keep=None, create=not read_only
      ),
  )


def restore_state(mngr, s, step: int | None = None):
  """The TrainState at `step` (default: the latest), laid out like
  `s.abstract_state` (a state.Setup's)."""
  step = mngr.latest_step() if step is None else step
  return mngr.restore(step, args=ocp.args.StandardRestore(s.abstract_state))


class Restored(NamedTuple):
  """A run's checkpoint, ready to evaluate, sample or analyze."""

  setup: Any  # state.Setup of the run's config (model, shardings, mesh)
  state: Any  # its TrainState (analyze reads the optimizer state too)
  step: int


def restore_run(workdir: str, cfg, step: int | None = None) -> Restored:
  """The checkpoint at `step` (default: the newest readable one, as train
  resumes from) of the run in `workdir` whose config is `cfg`; UsageError
  (one line) when there is none or it cannot be read. Touches nothing."""
  s = state_lib.setup(cfg)
  mngr = checkpoint_manager(workdir, read_only=True)
  steps = mngr.all_steps()
  if not steps:
    raise UsageError(
        f"no checkpoint in {workdir!r}/checkpoints; train first "
        "or point --workdir at a run directory"
    )
  if step is not None and step not in steps:
    raise UsageError(
        f"no checkpoint for step {step} in {workdir!r}; "
        f"available steps: {sorted(steps)}"
    )
  if step is None:
    step, state = restore_latest(mngr, s, workdir, move_aside=False)
    return Restored(s, state, step)
  try:
    return Restored(s, restore_state(mngr, s, step), step)
  except Exception as e:  # pylint: disable=broad-except
    raise UsageError(
        f"checkpoint {step} in {workdir!r} cannot be read "
        f"({describe_error(e)}); the others: "
        f"{sorted(set(steps) - {step})} (without --step: the newest "
        "readable one)"
    ) from None


def restore_latest(
    mngr, s, workdir: str, train_it=None, move_aside: bool = True
):
  """(step, state) of the newest checkpoint that can be read, with its data
  position restored into `train_it` (if given); (None, None) when there is
  no checkpoint. Each newer one that cannot be read is one log line (its
  step, why) and, with move_aside (the trainer; readers touch nothing), is
  moved to checkpoints/corrupt/<step> (never deleted: a user may want to
  look at it). None readable: NoReadableCheckpoint, nothing moved."""
  failed = []
  for step in sorted(mngr.all_steps(), reverse=True):
    try:
      state = restore_state(mngr, s, step)
      if train_it is not None:
        train_it.restore(data_state_dir(workdir, step))
    except Exception as e:  # pylint: disable=broad-except
      failed.append((step, describe_error(e)))
      continue
    for bad, why in failed:
      where = _move_aside(mngr, workdir, bad) if move_aside else None
      log.warning(
          "checkpoint %d in %s cannot be read (%s); %s checkpoint %d",
          bad,
          mngr.directory,
          why,
          f"moved it to {where}; resuming from" if where else "using",
          step,
      )
    if failed and move_aside:
      mngr.reload()
    return step, state
  if failed:
    raise NoReadableCheckpoint(
        f"no checkpoint in {mngr.directory} can be read ("
        + "; ".join(f"step {n}: {why}" for n, why in failed)
        + "); nothing was moved: look at them, or move the checkpoints "
        "directory away to train from the start"
    )
  return None, None


def _move_aside(mngr, workdir: str, step: int) -> str:
  """checkpoints/<step> (with its data position inside, as data_state) ->
  checkpoints/corrupt/<step>[.k]; the path it went to."""
  root = os.path.join(str(mngr.directory), CORRUPT)
  dest, k = os.path.join(root, str(step)), 0
  while os.path.exists(dest):
    k += 1
    dest = os.path.join(root, f"{step}.{k}")
  if jax.process_index() == 0:
    os.makedirs(root, exist_ok=True)
    shutil.move(os.path.join(str(mngr.directory), str(step)), dest)
    if os.path.isdir(data_state_dir(workdir, step)):
      shutil.move(
          data_state_dir(workdir, step), os.path.join(dest, "data_state")
      )
  return dest


def data_state_dir(workdir: str, step: int) -> str:
  return os.path.join(workdir, "data_state", str(step))


def save(mngr, train_it, workdir: str, step: int, state) -> None:
  """The data position, then the state (orbax saves asynchronously). Before
  them, the free space is compared with the size of the newest checkpoint
  (or of the state): SaveFailed if it cannot hold another."""
  _check_space(mngr, workdir, step, state)
  try:
    train_it.save(data_state_dir(workdir, step))
  except Exception as e:  # pylint: disable=broad-except
    raise SaveFailed(
        step, data_state_dir(workdir, step), _reason(str(_innermost(e)))
    ) from None
  mngr.save(step, args=ocp.args.StandardSave(state))


def delete(mngr, workdir: str, step: int) -> None:
  """Drops the checkpoint of `step` and its data position."""
  mngr.wait_until_finished()
  if step in mngr.all_steps():
    mngr.delete(step)
  _remove_data_state(workdir, step)


def retain(mngr, workdir: str, keep: int) -> None:
  """Drops all but the newest `keep` checkpoints (and data positions)."""
  mngr.wait_until_finished()
  for step in sorted(mngr.all_steps())[:-keep]:
    mngr.delete(step)
    _remove_data_state(workdir, step)


def _remove_data_state(workdir: str, step: int) -> None:
  if jax.process_index() == 0:
    shutil.rmtree(data_state_dir(workdir, step), ignore_errors=True)


def prune_data_states(workdir: str, mngr) -> None:
  """Drops the data positions whose checkpoint orbax has deleted."""
  root = os.path.join(workdir, "data_state")
  if not os.path.isdir(root) or jax.process_index() != 0:
    return
  keep = {str(s) for s in mngr.all_steps()}
  for name in os.listdir(root):
    if name not in keep:
      shutil.rmtree(os.path.join(root, name), ignore_errors=True)


# ------------------------------------------------------------------ faults


def remove_unfinished(workdir: str) -> None:
  """Removes the temporary directories of saves that never finished (a full
  disk, a kill during a save): orbax's `<step>.orbax-checkpoint-tmp*`."""
  root = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(root) or jax.process_index() != 0:
    return
  for name in sorted(os.listdir(root)):
    if TMP_MARK in name:
      shutil.rmtree(os.path.join(root, name), ignore_errors=True)
      log.info("removed %s: an unfinished save", os.path.join(root, name))


def as_save_failed(e: BaseException, workdir: str) -> SaveFailed | None:
  """`e` as a SaveFailed: itself, or (for any other write that a full disk
  broke, e.g. TensorBoard's events file) one for the run's files; None for
  an error that is not a failed write."""
  if isinstance(e, SaveFailed):
    return e
  if is_disk_full(e):
    return SaveFailed(None, workdir, _reason(str(_innermost(e))))
  return None


def is_disk_full(e: BaseException) -> bool:
  """Whether `e` or one of its causes is ENOSPC / EDQUOT."""
  seen = 0
  while e is not None and seen < 20:
    if getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
      return True
    if any(m in str(e) for m in _DISK_FULL):
      return True
    e, seen = e.__cause__ or e.__context__, seen + 1
  return False


_DISK_FULL = (
    "No space left on device",
    "Disk quota exceeded",
    "os_error_code='28'",
)


def finish_failed(mngr, workdir: str, failed: SaveFailed) -> SaveFailed:
  """After a failed save: removes what it left (orbax's temporary directory,
  the data position of a step that has no checkpoint) and completes
  `failed.message` with the space needed and the checkpoint that is
  intact."""
  try:
    mngr.wait_until_finished()  # Nothing else may be writing now.
  except SaveFailed:
    pass
  if jax.process_index() == 0:
    remove_unfinished(workdir)
    if failed.step is not None and not os.path.isdir(
        os.path.join(str(mngr.directory), str(failed.step))
    ):
      shutil.rmtree(data_state_dir(workdir, failed.step), ignore_errors=True)
  mngr.reload()
  intact = mngr.latest_step()
  needed = failed.needed or _checkpoint_bytes(mngr, workdir, intact)
  free = failed.free if failed.free is not None else _free_bytes(workdir)
  space = (
      f"; a checkpoint needs about {_mb(needed)}, {_mb(free)} free"
      if needed and free is not None
      else ""
  )
  then = (
      f"Checkpoint {intact} is intact"
      if intact is not None
      else "No checkpoint was written before it"
  )
  failed.message = (
      f"{failed}{space}. {then}: free space, then run the "
      "same command to resume (exit status "
      f"{EXIT_SAVE_FAILED})"
  )
  return failed


def _check_space(mngr, workdir: str, step: int, state) -> None:
  """SaveFailed now if the disk cannot hold checkpoint `step`: where the
  free space is cheap to know (a local directory, one process)."""
  free = _free_bytes(workdir)
  if free is None or jax.process_count() > 1:
    return
  needed = _checkpoint_bytes(mngr, workdir, mngr.latest_step()) or sum(
      x.nbytes for x in jax.tree.leaves(state)
  )
  if needed > free:
    raise SaveFailed(
        step,
        str(mngr.directory),
        "not enough free space",
        needed=needed,
        free=free,
    )


def _free_bytes(workdir: str) -> int | None:
  try:
    return shutil.disk_usage(workdir).free
  except OSError:  # A remote path (gs://...), or none yet.
    return None


def _checkpoint_bytes(mngr, workdir: str, step: int | None) -> int | None:
  """Bytes of checkpoint `step` on disk, its data position included."""
  if step is None:
    return None
  total = 0
  for top in (
      os.path.join(str(mngr.directory), str(step)),
      data_state_dir(workdir, step),
  ):
    for root, _, files in os.walk(top):
      total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
  return total or None


def _mb(n: int) -> str:
  return f"{n / 2**20:.1f} MiB"


def _innermost(e: BaseException) -> BaseException:
  while e.__cause__ is not None or (
      e.__context__ is not None and not e.__suppress_context__
  ):
    e = e.__cause__ or e.__context__
  return e


def describe_error(e: BaseException) -> str:
  """The first line of the innermost cause of `e` (orbax wraps tensorstore's
  error, which names the file and what is wrong with it)."""
  return _first_line(_innermost(e))


def _first_line(e) -> str:
  text = str(e).strip()
  return (text.splitlines()[0] if text else type(e).__name__)[:400]


def _reason(cause: str) -> str:
  """The cause of a failed write, in a few words."""
  if "No space left" in cause or "os_error_code='28'" in cause:
    return "no space left on device"
  if "quota exceeded" in cause.lower():
    return "disk quota exceeded"
  return _first_line(cause)


class _OrbaxErrors(logging.Filter):
  """Drops orbax's ERROR records (each with its traceback, several per
  failed save) and any library's ERROR record of a full disk (clu's writer
  thread) from the absl logger, and asyncio's "Task exception was never
  retrieved" for orbax's other writes that the full disk broke, keeping
  the last message: the failure reaches the user once, as SaveFailed's
  line."""

  last: str | None = None

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno < logging.ERROR:
      return True
    e = record.exc_info[1] if record.exc_info else None
    if f"{os.sep}orbax{os.sep}" in (record.pathname or "") or (
        e is not None and is_disk_full(e)
    ):
      _OrbaxErrors.last = str(e) if e is not None else record.getMessage()
      return False
    return True

  def install(self) -> None:
    for name in ("absl", "asyncio"):
      logger = logging.getLogger(name)
      if self not in logger.filters:
        logger.addFilter(self)


_ERRORS = _OrbaxErrors()


def _install_unraisable_filter() -> None:
  """Leaves out what a failed asynchronous save prints as "unraisable"
  errors: tensorstore's callbacks into orbax's closed event loop
  (RuntimeError 'Event loop is closed', one per pending write) and, at
  exit, orbax's write coroutines that never finished. Others go on to the
  hook that was there."""
  if getattr(sys.unraisablehook, "_nanodo_sam", False):
    return
  previous = sys.unraisablehook

  def hook(unraisable):
    e, obj = unraisable.exc_value, unraisable.object
    code = getattr(obj, "cr_code", None)
    if (isinstance(e, RuntimeError) and str(e) == "Event loop is closed") or (
        code is not None and "orbax" in code.co_filename
    ):
      return
    previous(unraisable)

  hook._nanodo_sam = True  # pylint: disable=protected-access
  sys.unraisablehook = hook
