"""The data a checkpoint is evaluated on when it is not its run's own
(`nanodo-sam eval --data_from=RUN|FILE`): the data config of another run
directory or config file, e.g. the pretraining data of a run continued on
another corpus (init_from), whose eval loss there measures forgetting.
"""

from __future__ import annotations

import os

from nanodo_sam import config as config_lib
from nanodo_sam import data as data_lib
from nanodo_sam import rundir
from nanodo_sam.errors import UsageError


def data_config_from(spec: str, cfg, what: str = "--data_from"):
  """The `data` section of run directory `spec` (its config.json) or of
  config file `spec` ("FILE.py[:ARG]"), to evaluate `cfg`'s model on;
  UsageError (one line, naming the setting `what`) when there is neither,
  or it uses another vocabulary than cfg."""
  if os.path.isdir(spec):
    other = rundir.read_config(spec)
  elif os.path.isfile(spec.split(":")[0]):
    other = config_lib.load_config_file(spec)
  else:
    raise UsageError(
        f"{what}={spec!r} is neither a run directory nor a config file"
    )
  if other.data.vocab != cfg.data.vocab:
    raise UsageError(
        f"{what}={spec!r} uses data.vocab={other.data.vocab!r}, the run "
        f"{cfg.data.vocab!r}; evaluate on data of the same vocabulary"
    )
  return other.data


def _other_cfg(cfg):
  """`cfg` with the data config of its eval_data_from."""
  other = cfg.copy_and_resolve_references()
  with other.unlocked():
    other.data = data_config_from(cfg.eval_data_from, cfg, "eval_data_from")
  return other


def check(cfg) -> None:
  """UsageError (one line) unless cfg's eval_data_from (if set) names a run
  directory or config file of the same vocabulary whose data is there."""
  if cfg.get("eval_data_from"):
    data_lib.check_available(_other_cfg(cfg).data)


def other_eval_batches(cfg) -> tuple[str, list]:
  """(eval_data_name, the eval batches of eval_data_from's data config)."""
  return cfg.eval_data_name, data_lib.eval_batches(_other_cfg(cfg))
