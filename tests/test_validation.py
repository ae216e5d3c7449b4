"""validation.validate asks each module for its own keys; rundir reads and
guards run directories."""

import json

import pytest

from conftest import tiny_config
from nanodo_sam import keys
from nanodo_sam import model as model_lib
from nanodo_sam import rundir
from nanodo_sam import validation
from nanodo_sam.errors import UsageError


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            {"opt.warmup_steps": 10, "opt.num_train_steps": 5},
            "opt.warmup_steps=10 must lie in [0, opt.num_train_steps=5]",
        ),
        (
            {
                "sam.reuse": True,
                "sam.every_k": 2,
            },  # the plain step: nothing to reuse
            "sam.reuse=True needs a SAM-family sam.method",
        ),
        (
            {"sam.method": "sam", "sam.rho": 0.1, "sam.reuse": True},
            "sam.reuse=True does nothing with sam.every_k=1",
        ),
        (
            {"sam.start_step": 5, "sam.end_step": 2},
            "sam.end_step=2 is before sam.start_step=5",
        ),
        (
            {"model.D": 30, "model.H": 4},
            "model.D=30 is not divisible by model.H=4",
        ),
        (
            {"model.nonlinearity": "tanh"},
            "model.nonlinearity='tanh' is unknown; use one of gelu, relu",
        ),
        (
            {"data.batch_size": 6, "grad_accumulation_steps": 4},
            "data.batch_size=6 is not divisible by grad_accumulation_steps=4",
        ),
        (
            {"diagnostics.every_steps": 1, "diagnostics.num_batches": 9},
            "diagnostics.num_batches=9 exceeds data.eval_steps",
        ),
    ],
)
def test_each_module_checks_its_keys(overrides, message):
  validation.validate(tiny_config())  # The starting point is valid.
  with pytest.raises(UsageError) as e:
    validation.validate(tiny_config(**overrides))
  assert message in str(e.value)


def test_model_choices_are_the_key_tables():
  for field, table in (
      ("nonlinearity", model_lib.NONLINEARITIES),
      ("dtype", model_lib.DTYPES),
      ("kernel_init", model_lib.KERNEL_INITS),
  ):
    assert set(table) == set(keys.BY_NAME[f"model.{field}"].choices), field
  assert len(model_lib.CHOICES) == 5
  with pytest.raises(
      UsageError,
      match="model.attention='flash' is unknown; "
      "use one of auto, xla, cudnn",
  ):
    model_lib.DoConfig(D=8, H=2, N=1, F=8, L=4, V=10, attention="flash")


def test_read_config_fills_legacy_defaults(tmp_path):
  with pytest.raises(UsageError, match="no run in"):
    rundir.read_config(str(tmp_path))
  raw = keys.defaults().to_dict()
  del raw["opt"]["b2"], raw["model"]["kernel_init"]
  (tmp_path / rundir.CONFIG).write_text(json.dumps(raw))
  cfg = rundir.read_config(str(tmp_path))
  assert cfg.opt.b2 == rundir.LEGACY_DEFAULTS["opt.b2"] == 0.95
  assert cfg.model.kernel_init == "fan_in_truncated_normal"
  assert cfg.opt.eps == 1e-9  # present: kept
  with pytest.raises(UsageError, match="model.kernel_init='fan_in_trunc"):
    rundir.check_workdir(keys.defaults(), str(tmp_path))
