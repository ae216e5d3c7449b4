"""Checkpoints: the train state (orbax) and the data position beside it.

`<workdir>/checkpoints/<step>` holds the state, `<workdir>/data_state/<step>`
the tf.data iterator, so a resumed run continues with the same batches.
"""

from __future__ import annotations

import os
import shutil

import jax
import orbax.checkpoint as ocp


def checkpoint_manager(workdir: str, max_to_keep: int = 3):
  return ocp.CheckpointManager(
      os.path.join(os.path.abspath(workdir), "checkpoints"),
      options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                           create=True))


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


def prune_data_states(workdir: str, mngr) -> None:
  """Drops the data positions whose checkpoint orbax has deleted."""
  root = os.path.join(workdir, "data_state")
  if not os.path.isdir(root) or jax.process_index() != 0:
    return
  keep = {str(s) for s in mngr.all_steps()}
  for name in os.listdir(root):
    if name not in keep:
      shutil.rmtree(os.path.join(root, name), ignore_errors=True)
