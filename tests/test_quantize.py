"""Weight-only quantization (nanodo_sam/quantize.py, `eval --quantize`) and
evaluation on another run's data (`eval --data_from`)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import QUICKSTART, read_scalars, tiny_config
from nanodo_sam import checkpoint
from nanodo_sam import evaluate
from nanodo_sam import state as state_lib
from nanodo_sam import cli
from nanodo_sam import data as data_lib
from nanodo_sam import model as model_lib
from nanodo_sam import quantize
from nanodo_sam import rundir
from nanodo_sam import train as train_lib
from nanodo_sam.errors import UsageError


def test_a_hand_computed_int4_example():
  w = jnp.array([[1.0, -2.2], [0.4, 4.0], [-0.3, 1.0]])
  # Column scales 1/7 and 4/7: 0.4 * 7 = 2.8 -> 3, -0.3 * 7 = -2.1 -> -2,
  # -2.2 * 7/4 = -3.85 -> -4, 1.0 * 7/4 = 1.75 -> 2.
  want = np.array([[1.0, -16 / 7], [3 / 7, 4.0], [-2 / 7, 8 / 7]])
  got, scale = quantize.quantize_dequantize(w, 4)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  np.testing.assert_allclose(scale.ravel(), [1 / 7, 4 / 7], rtol=1e-6)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [0, 8])
def test_error_within_half_a_grid_step_and_on_the_grid(bits, group_size):
  w = jax.random.normal(jax.random.key(bits + group_size), (32, 24)) * 0.1
  w_hat, scale_Gx1xO = quantize.quantize_dequantize(w, bits, group_size)
  g = group_size or 32
  scale_IxO = np.repeat(np.asarray(scale_Gx1xO)[:, 0], g, axis=0)
  assert scale_IxO.shape == w.shape
  err = np.abs(np.asarray(w_hat) - np.asarray(w))
  assert np.all(err <= scale_IxO / 2 * (1 + 1e-5))
  q = np.asarray(w_hat) / scale_IxO
  np.testing.assert_allclose(q, np.round(q), atol=1e-4)
  qmax = 2 ** (bits - 1) - 1
  assert np.abs(np.round(q)).max() == qmax  # Each group's largest weight.


def _tiny_params():
  cfg = tiny_config()
  model = model_lib.TransformerDo(model_lib.from_config(cfg))
  import flax.linen as nn

  return nn.unbox(
      model.init(jax.random.key(0), jnp.zeros((1, cfg.model.L), jnp.int32))[
          "params"
      ]
  )


def test_float_passes_through_and_only_kernels_change():
  params = _tiny_params()
  assert quantize.quantize_params(params, None) is params
  q = quantize.quantize_params(params, 4)
  flat_p = dict(jax.tree_util.tree_flatten_with_path(params)[0])
  flat_q = dict(jax.tree_util.tree_flatten_with_path(q)[0])
  changed = {
      jax.tree_util.keystr(k)
      for k in flat_p
      if not np.array_equal(flat_p[k], flat_q[k])
  }
  assert changed and all(k.endswith("['kernel']") for k in changed)
  assert len(changed) == sum(
      1 for k in flat_p if jax.tree_util.keystr(k).endswith("['kernel']")
  )
  with_emb = quantize.quantize_params(params, 8, embeddings=True)
  assert not np.array_equal(
      with_emb["embed"]["embedding"], params["embed"]["embedding"]
  )
  # attn_out [H, Dh, D]: its inputs are heads x head dim.
  assert quantize.input_dims(params)["block_0/attn/attn_out/kernel"] == 32


def test_a_group_size_that_does_not_divide_is_refused():
  params = _tiny_params()
  quantize.check_group_size(params, 16, embeddings=False)
  with pytest.raises(UsageError, match="does not divide the input dimension"):
    quantize.check_group_size(params, 5, embeddings=False)
  with pytest.raises(UsageError, match="use int8 or int4"):
    quantize.parse_width("int3")


def _eval(capsys, *args):
  with pytest.raises(SystemExit) as e:
    cli.main(["eval", *args])
  out = capsys.readouterr()
  return e.value.code, out.out, out.err.strip().splitlines()


def _cli_json(capsys, *args):
  cli.main(["eval", *args])
  return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "flags,words",
    [
        (["--quantize=int3"], "--quantize='int3' is unknown"),
        (["--quantize=int4", "--group_size=5"], "does not divide"),
        (["--data_from=/no/such/run"], "neither a run directory"),
    ],
)
def test_bad_eval_flags_are_one_line_exit_2(tmp_path, capsys, flags, words):
  rundir.write_config(str(tmp_path), tiny_config())  # No checkpoint needed.
  code, _, err = _eval(capsys, f"--workdir={tmp_path}", *flags)
  assert code == 2 and len(err) == 1 and words in err[0], err


@pytest.fixture
def trained(trained_run):
  """conftest's tiny run, trained 40 steps."""
  return trained_run


@pytest.mark.slow
def test_int8_changes_a_trained_loss_less_than_int4(trained, capsys):
  plain = _cli_json(capsys, f"--workdir={trained}")
  int8 = _cli_json(capsys, f"--workdir={trained}", "--quantize=int8")
  int4 = _cli_json(
      capsys, f"--workdir={trained}", "--quantize=int4", "--group_size=16"
  )
  for out in (int8, int4):  # The float metrics are the plain eval's.
    assert out["eval_loss"] == plain["eval_loss"]
    assert out["delta"]["eval_loss"] == pytest.approx(
        out["quantized"]["eval_loss"] - out["eval_loss"]
    )
  assert 0 < abs(int8["delta"]["eval_loss"]) < abs(int4["delta"]["eval_loss"])


@pytest.mark.slow
def test_data_from_evaluates_on_another_config_data(trained, tmp_path, capsys):
  other = tmp_path / "other.py"
  other.write_text(
      "from nanodo_sam.config import load_config_file\n"
      "def get_config():\n"
      f"  c = load_config_file({QUICKSTART!r})\n"
      "  c.model.L = 32\n  c.data.eval_batch_size = 4\n"
      "  c.data.eval_steps = 1\n  return c\n"
  )
  out = _cli_json(capsys, f"--workdir={trained}", f"--data_from={other}")
  cfg = tiny_config(**{"data.eval_batch_size": 4, "data.eval_steps": 1})
  tokens = sum(float(np.sum(b["weights"])) for b in data_lib.eval_batches(cfg))
  assert out["eval_tokens"] == tokens and 0 < tokens <= 4 * 32
  assert out["data_from"] == str(other)
  other.write_text(
      other.read_text().replace(
          "return c",
          "c.data.vocab = 'shipped:"
          "c4_t5_sentencepiece_cc_all.32000.100extra.model'\n  return c",
      )
  )
  code, _, err = _eval(capsys, f"--workdir={trained}", f"--data_from={other}")
  assert code == 2 and len(err) == 1 and "data.vocab" in err[0], err


@pytest.mark.slow
def test_a_second_eval_set_is_logged_during_training(trained, tmp_path):
  """Continued from `trained` (init_from) with a second eval set: the
  source's data; its logged loss at the end equals `eval --data_from`."""
  cfg = tiny_config(
      **{
          "init_from": str(trained),
          "eval_data_from": str(trained),
          "eval_data_name": "pretrain",
          "data.eval_steps": 1,
          "opt.num_train_steps": 10,
      }
  )
  work = tmp_path / "continued"
  train_lib.train(cfg, str(work))
  logged = read_scalars(work, "eval_pretrain/")
  assert set(logged) == {f"eval_pretrain/{k}" for k in evaluate.METRICS}
  assert sorted(logged["eval_pretrain/loss"]) == [10]
  checked = evaluate.eval_metrics(
      evaluate.eval_step_for(state_lib.setup(cfg)),
      checkpoint.restore_run(str(work), cfg).state.params,
      data_lib.eval_batches(tiny_config()),
  )
  assert logged["eval_pretrain/loss"][10] == pytest.approx(
      checked["loss"], rel=1e-5
  )


def test_a_bad_second_eval_set_is_one_line_exit_2(tmp_path, capsys):
  from conftest import tiny_flags

  with pytest.raises(SystemExit) as e:
    cli.main(
        [
            "train",
            *tiny_flags(),
            f"--workdir={tmp_path / 'w'}",
            f"--config.eval_data_from={tmp_path / 'none'}",
        ]
    )
  err = capsys.readouterr().err.strip().splitlines()
  assert e.value.code == 2 and len(err) == 1 and "eval_data_from" in err[0]
  assert not (tmp_path / "w").exists()
