"""The checks a config passes before any work: each module checks its own
keys, and `validate` asks them all, in one place.

Each key's type, range and choices come from the key table (`keys.check`);
what relates several keys is checked by the module that reads them. Bad
input raises `UsageError`: one line saying what is wrong and how to fix it,
before anything is compiled or written. `state.setup` calls `validate`
once for every command that builds a model.
"""

from __future__ import annotations

from nanodo_sam import data as data_lib
from nanodo_sam import diagnostics
from nanodo_sam import keys
from nanodo_sam import lm_eval_run
from nanodo_sam import model as model_lib
from nanodo_sam import optimizer as optimizer_lib
from nanodo_sam import sam_schedule
from nanodo_sam import sharding
from nanodo_sam import step as step_lib


def validate(cfg, num_devices: int | None = None) -> None:
  """Checks the whole config; UsageError on the first problem. With
  `num_devices`, also against this machine: the mesh and the attention
  kernel."""
  keys.check(cfg)
  model_cfg = model_lib.from_config(cfg)
  optimizer_lib.validate(cfg.opt)
  data_lib.validate(cfg.data)
  sam_schedule.validate(cfg)
  step_lib.validate(cfg)
  diagnostics.validate(cfg)
  if cfg.get("eval", {}).get("lm_eval_tasks", ""):
    lm_eval_run.check_installed()  # Task names: commands._data_ready.
  if num_devices is not None:
    sharding.validate(cfg, num_devices)
    model_lib.attention_implementation(model_cfg)
