"""Stop requests: SIGTERM or SIGINT ends a run cleanly, at a step boundary.

What schedulers send before they take a machine away (SLURM's `--signal`,
preemption, `scancel`; TPU maintenance) is SIGTERM; Ctrl-C is SIGINT. Either
one, once, asks the loop to finish the step in flight, write a checkpoint and
the data position, record the run as preempted (progress.json) and exit with
EXIT_PREEMPTED; the same command then resumes it bit for bit. After the
first, Ctrl-C acts as it normally would (twice stops at once), and more
SIGTERMs change nothing (a scheduler may send one to every process of a job
and a batch script forward it again: the checkpoint must not be cut short).

With several processes (jax.distributed), JAX's own preemption service
catches SIGTERM and `multihost_utils.reached_preemption_sync_point` makes
every process stop at the same step (each must save the same checkpoint).
"""

from __future__ import annotations

import logging
import signal
import threading

import jax
from jax.experimental import multihost_utils

log = logging.getLogger("nanodo_sam")

# sysexits.h EX_TEMPFAIL ("temporary failure, try again"): what a requeueing
# script looks for. 0 = completed, 1 = diverged or crashed, 2 = bad input.
EXIT_PREEMPTED = 75
SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _multi_process() -> bool:
  return getattr(jax.distributed, "is_initialized", lambda: False)()


class StopRequest:
  """Catches SIGTERM/SIGINT while installed; `requested(step)` says whether
  the loop should stop before taking `step`."""

  def __init__(self):
    self.signal: str | None = None  # Name of the signal received, if any.
    self._previous: dict = {}

  def install(self) -> StopRequest:
    """Installs the handlers: in the main thread of a single process (with
    several, SIGTERM is JAX's, and a Ctrl-C on one process cannot stop the
    others at the same step: it acts as usual)."""
    if (
        threading.current_thread() is threading.main_thread()
        and not _multi_process()
    ):
      for sig in SIGNALS:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def restore(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}

  def _handle(self, signum, frame) -> None:
    del frame
    name = signal.Signals(signum).name
    if self.signal is not None:
      log.warning("%s received: already stopping", name)
      return
    self.signal = name
    if signal.SIGINT in self._previous:  # From now on Ctrl-C stops at once.
      signal.signal(signal.SIGINT, self._previous.pop(signal.SIGINT))
    log.warning(
        "%s received: finishing the step in flight, then writing a "
        "checkpoint and exiting with status %d (Ctrl-C stops at "
        "once)",
        name,
        EXIT_PREEMPTED,
    )

  def requested(self, step: int) -> bool:
    """Call at every step, with the same steps on every process."""
    if _multi_process():
      if multihost_utils.reached_preemption_sync_point(step):
        self.signal = self.signal or "SIGTERM"
        return True
    return self.signal is not None
