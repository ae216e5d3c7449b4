"""Checkpoints: the train state (orbax) and the data position beside it.

`<workdir>/checkpoints/<step>` holds the state, `<workdir>/data_state/<step>`
the tf.data iterator, so a resumed run continues with the same batches.

The loop keeps only checkpoints it knows are good: orbax deletes nothing by
itself (max_to_keep=None); `retain` drops all but the newest few once the
newest one is known good, and `delete` drops one that is not (train.py).
"""

from __future__ import annotations

import os
import shutil

import jax
import orbax.checkpoint as ocp


def checkpoint_manager(workdir: str, read_only: bool = False):
  """Orbax's manager of `<workdir>/checkpoints`. read_only: for readers
  (eval, analyze), which create nothing (orbax's own read_only option logs
  warnings on every use)."""
  return ocp.CheckpointManager(
      os.path.join(os.path.abspath(workdir), "checkpoints"),
      options=ocp.CheckpointManagerOptions(max_to_keep=None,
                                           create=not read_only))


def restore_state(mngr, s, step: int | None = None):
  """The TrainState at `step` (default: the latest), laid out like
  `s.abstract_state` (a state.Setup's)."""
  step = mngr.latest_step() if step is None else step
  return mngr.restore(step, args=ocp.args.StandardRestore(s.abstract_state))


def data_state_dir(workdir: str, step: int) -> str:
  return os.path.join(workdir, "data_state", str(step))


def save(mngr, train_it, workdir: str, step: int, state) -> None:
  """The data position, then the state (orbax saves asynchronously)."""
  train_it.save(data_state_dir(workdir, step))
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
