"""The sharpness diagnostics of a run, shared by the training loop and
`nanodo-sam analyze`."""

import json

import jax
import numpy as np
import pytest

from conftest import read_scalars, tiny_config
from nanodo_sam import checkpoint
from nanodo_sam import cli
from nanodo_sam import data as data_lib
from nanodo_sam import diagnostics
from nanodo_sam import state as state_lib
from nanodo_sam import train as train_lib
from nanodo_sam.config import UsageError

# Independent of the random key: the taus are exact, the rest is closed form.
EXACT = (
    "loss",
    "grad_norm",
    "tau_logit",
    "tau_func",
    "tau_cross",
    "sam_edge",
    "two_over_lr",
)


@pytest.mark.slow  # Trains with diagnostics, then analyze.
def test_analyze_and_training_diagnostics_agree(tmp_path):
  """On the checkpointed theta_2, the numbers the loop logged before step 2
  are `diagnostics.make_sharpness` at that step's lr, rho and key; `analyze
  --step=2` is the same function at the peak lr, the configured rho and the
  seed's key, so with a constant schedule it gives the same numbers wherever
  the key does not enter, and the same as the shared function everywhere."""
  cfg = tiny_config(
      **{
          "sam.method": "sam",
          "sam.rho": 0.05,
          "opt.decay_type": "constant",
          "opt.warmup_steps": 0,
          "opt.num_train_steps": 4,
          "checkpoint_every_steps": 2,
          "eval_every_steps": 0,
          "diagnostics.every_steps": 2,
          "diagnostics.num_iters": 3,
          "diagnostics.num_probes": 2,
      }
  )
  workdir = tmp_path / "run"
  assert train_lib.train(cfg, str(workdir))["status"] == "completed"
  logged = {
      k.split("/", 1)[1]: v[2]
      for k, v in read_scalars(workdir, "sharpness/").items()
  }
  assert set(EXACT) | {"lambda_max", "hessian_trace", "ggn_trace"} <= set(
      logged
  )

  s = state_lib.setup(cfg)
  state = checkpoint.restore_state(
      checkpoint.checkpoint_manager(str(workdir)), s, 2
  )
  assert int(state.step) == 2
  sharp = diagnostics.make_sharpness(cfg, s, data_lib.eval_batches(cfg))
  lr, rho = cfg.opt.peak_learning_rate, cfg.sam.rho
  at_step = diagnostics.to_scalars(
      sharp(state, lr, rho, jax.random.fold_in(state.rng, 2))
  )
  for k, v in logged.items():
    np.testing.assert_allclose(v, at_step[k], rtol=1e-6, err_msg=k)

  cli.main(["analyze", f"--workdir={workdir}", "--step=2"])
  analyzed = json.load(open(workdir / "sharpness_2.json"))
  assert analyzed["learning_rate"] == lr and analyzed["rho"] == rho
  for k in EXACT:
    np.testing.assert_allclose(analyzed[k], logged[k], rtol=1e-6, err_msg=k)
  with_seed = diagnostics.to_scalars(
      sharp(state, lr, rho, jax.random.key(cfg.seed))
  )
  for k, v in with_seed.items():
    np.testing.assert_allclose(analyzed[k], v, rtol=1e-6, err_msg=k)
  # The key does enter the estimates: the check above is not vacuous.
  assert with_seed["hessian_trace"] != at_step["hessian_trace"]


def test_fixed_batch_takes_the_first_rows_of_the_first_batches():
  cfg = tiny_config(
      **{"diagnostics.num_batches": 2, "diagnostics.batch_size": 3}
  )
  rng = np.random.default_rng(0)
  eval_data = [
      {
          "inputs": rng.integers(0, 9, (8, 4)),
          "weights": rng.uniform(size=(8, 4)),
      }
      for _ in range(3)
  ]
  batch = diagnostics.fixed_batch(cfg, eval_data)
  for key in ("inputs", "weights"):
    assert batch[key].shape == (2, 3, 4)
    for i in range(2):
      np.testing.assert_array_equal(batch[key][i], eval_data[i][key][:3])
  with pytest.raises(UsageError, match="num_batches=2 exceeds"):
    diagnostics.fixed_batch(cfg, eval_data[:1])


def test_attention_auto_is_xla_on_cpu_and_cudnn_is_refused():
  from nanodo_sam import model as model_lib

  model_cfg = model_lib.from_config(tiny_config(**{"model.attention": "auto"}))
  assert model_lib.attention_implementation(model_cfg, "cpu") == "xla"
  cudnn = model_lib.from_config(tiny_config(**{"model.attention": "cudnn"}))
  with pytest.raises(ValueError, match="model.attention=cudnn cannot run"):
    model_lib.attention_implementation(cudnn, "cpu")


@pytest.mark.slow  # ~40 s on 2 cores
def test_diagnostics_stay_exact_when_training_uses_cudnn(monkeypatch):
  """A run that trains with attention=cudnn (pretended available here) has
  diagnostics on XLA's attention: they run on the CPU, where the cuDNN
  kernel cannot, and equal those of the same run with attention=xla."""
  from nanodo_sam import model as model_lib

  monkeypatch.setattr(
      model_lib, "cudnn_unsupported", lambda cfg, backend=None: None
  )
  rng = np.random.default_rng(0)
  batch = {
      "inputs": rng.integers(3, 259, (4, 32)).astype(np.int32),
      "targets": rng.integers(3, 259, (4, 32)).astype(np.int32),
      "weights": np.ones((4, 32), np.float32),
  }
  out = {}
  for attention in ("cudnn", "xla"):
    cfg = tiny_config(
        **{
            "model.attention": attention,
            "diagnostics.num_iters": 4,
            "diagnostics.num_probes": 2,
        }
    )
    s = state_lib.setup(cfg)
    state = state_lib.init_state(s, seed=0)
    if attention == "cudnn":  # The training path really asks for cuDNN.
      assert model_lib.attention_implementation(s.model.cfg) == "cudnn"
      # JAX's cuDNN attention refuses: no cuDNN here, or (with the CUDA
      # libraries installed, as CI's compiler extra has them) float32 Q.
      cudnn_refusal = "cuDNN is not detected|Q must be fp16/bf16"
      with pytest.raises(RuntimeError, match=cudnn_refusal):
        jax.jit(s.logits_fn)(state.params, batch["inputs"])
    fn = diagnostics.sharpness_fn(cfg, s)
    out[attention] = diagnostics.to_scalars(
        jax.jit(lambda st, b, fn=fn: fn(st, b, 1e-3, 0.1, jax.random.key(0)))(
            state, batch
        )
    )
  assert out["cudnn"].keys() == out["xla"].keys()
  assert set(EXACT) | {"lambda_max", "hessian_trace"} <= out["xla"].keys()
  for k, v in out["xla"].items():
    assert out["cudnn"][k] == pytest.approx(v, rel=1e-6, abs=1e-9), k
