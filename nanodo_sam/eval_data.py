"""The data a checkpoint is evaluated on when it is not its run's own
(`nanodo-sam eval --data_from=RUN|FILE`): the data config of another run
directory or config file, e.g. the pretraining data of a run continued on
another corpus (init_from), whose eval loss there measures forgetting.
"""

from __future__ import annotations

import os

from nanodo_sam import config as config_lib
from nanodo_sam import rundir
from nanodo_sam.errors import UsageError


def data_config_from(spec: str, cfg):
  """The `data` section of run directory `spec` (its config.json) or of
  config file `spec` ("FILE.py[:ARG]"), to evaluate `cfg`'s model on;
  UsageError (one line) when there is neither, or it uses another
  vocabulary than cfg."""
  if os.path.isdir(spec):
    other = rundir.read_config(spec)
  elif os.path.isfile(spec.split(":")[0]):
    other = config_lib.load_config_file(spec)
  else:
    raise UsageError(
        f"--data_from={spec!r} is neither a run directory nor " "a config file"
    )
  if other.data.vocab != cfg.data.vocab:
    raise UsageError(
        f"--data_from={spec!r} uses data.vocab={other.data.vocab!r}, the run "
        f"{cfg.data.vocab!r}; evaluate on data of the same vocabulary"
    )
  return other.data
