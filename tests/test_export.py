"""`nanodo-sam export` against transformers itself (PyTorch on the CPU).

The exported GPT-2 must load without missing or unexpected keys, give the
project's float32 log-softmax within 1e-4, generate greedily what
`nanodo-sam sample --temperature=0` prints, and its tokenizer must give the
project's ids (and decode them as the project does) on every shipped C4
validation document and on edge strings.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

from conftest import listing, tiny_flags
from conftest import run_cli as _run
from nanodo_sam import cli
from nanodo_sam import data as data_lib
from nanodo_sam import export
from nanodo_sam import hf_tokenizer
from nanodo_sam import model as model_lib
from nanodo_sam import sample as sample_lib

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T5 = data_lib.SHIPPED + data_lib.T5_VOCAB_FILE
EDGE_STRINGS = [
    "",
    " ",
    "  leading",
    "trailing  ",
    "repeated    spaces",
    "\ttabs\tand ",
    "new\nlines\n\n",
    " \t \n ",
    "\ufb01 \u2460 \uff28\uff45\uff4c\uff4c"
    "\uff4f \u00bd \u2126",  # NFKC: ligature, circled 1, fullwidth, ...
    "<extra_id_0> sentinel <extra_id_7>",
    "glued<extra_id_1>",
    "\u65e5\u672c\u8a9e \U0001d518 \u2603 caf\u00e9",
    "It's 3.14, isn't it?",
]


def _load(out_dir):
  """The exported model (eval mode) and tokenizer; asserts that every weight
  was found and used."""
  model, info = transformers.AutoModelForCausalLM.from_pretrained(
      out_dir, output_loading_info=True
  )
  assert isinstance(model, transformers.GPT2LMHeadModel)
  assert not any(info.values()), info
  assert model.dtype == torch.float32
  return model.eval(), transformers.AutoTokenizer.from_pretrained(out_dir)


def _log_probs_hf(model, tokens_BxL):
  with torch.no_grad():
    logits = model(torch.tensor(np.asarray(tokens_BxL))).logits
  return torch.log_softmax(logits, -1).numpy()


def _log_probs(model, params, tokens_BxL):
  return np.asarray(
      jax.nn.log_softmax(
          model.apply({"params": params}, jnp.asarray(tokens_BxL)), -1
      )
  )


def _greedy_hf(hf, prompt, num_new):
  with torch.no_grad():
    out = hf.generate(
        torch.tensor([prompt]), max_new_tokens=num_new, do_sample=False
    )
  return out[0, len(prompt) :].tolist()


def _cut_at_eos(ids, eos):
  ids = list(ids)
  return ids[: ids.index(eos) + 1] if eos in ids else ids


@pytest.mark.parametrize("vocab", [T5, "byte"])
def test_tokenizer_gives_the_projects_ids_and_text(tmp_path, vocab):
  v = data_lib.make_vocab(vocab)
  specials = hf_tokenizer.write(vocab, str(tmp_path), 512)
  tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
  assert {
      r: tok.convert_tokens_to_ids(t) for r, (t, _) in specials.items()
  } == {r: i for r, (_, i) in specials.items()}
  assert (tok.pad_token_id, tok.eos_token_id) == (0, v.eos_id)
  assert tok.bos_token_id == data_lib.bos_id(v)  # T5: 2; byte: None.
  assert tok("a b").input_ids == list(v.encode("a b"))  # No BOS/EOS added.
  source = data_lib.SHIPPED_TFDS["c4/en:3.1.0"]()
  docs = [
      ex["text"].numpy().decode()
      for ex in source.get_dataset("validation", shuffle=False)
  ]
  assert len(docs) == 200
  for text in docs + EDGE_STRINGS:
    ids = list(v.encode(text))
    assert tok(text, add_special_tokens=False).input_ids == ids, text
    assert tok.decode(ids) == v.decode(ids), text
  if vocab == T5:  # Whitespace alone is nothing; <unk> decodes as " ⁇ ".
    assert list(v.encode(" \t\n")) == []
    assert tok.decode([3, 5]) == v.decode([3, 5])
    assert os.path.exists(tmp_path / hf_tokenizer.SPM_FILE)


@pytest.mark.parametrize(
    "nonlinearity,vocab,V,dtype",
    [
        pytest.param("gelu", T5, 32101, "float32", marks=pytest.mark.slow),
        ("relu", "byte", 300, "bfloat16"),
    ],
)
def test_random_model_matches_the_projects_forward(
    tmp_path, nonlinearity, vocab, V, dtype
):
  cfg = model_lib.DoConfig(
      D=32, H=4, N=2, F=64, L=24, V=V, nonlinearity=nonlinearity, dtype=dtype
  )
  params = model_lib.init_params(
      model_lib.TransformerDo(cfg), jax.random.key(1)
  )
  export.write(str(tmp_path), params, cfg, vocab, {"test": True})
  hf, _ = _load(tmp_path)
  config = json.loads((tmp_path / "config.json").read_text())
  assert config["layer_norm_epsilon"] == 1e-6  # flax's LayerNorm default.
  weights = safetensors.numpy.load_file(tmp_path / export.WEIGHTS)
  assert {w.dtype for w in weights.values()} == {np.dtype(np.float32)}
  assert np.array_equal(
      weights["transformer.wte.weight"], params["embed"]["embedding"]
  )
  assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()
  # Exact in float32: a bfloat16-compute model is compared at float32.
  f32 = model_lib.TransformerDo(
      model_lib.DoConfig(**{**cfg.__dict__, "dtype": "float32"})
  )
  tokens = np.random.default_rng(0).integers(0, V, (3, cfg.L))
  diff = np.abs(_log_probs(f32, params, tokens) - _log_probs_hf(hf, tokens))
  assert diff.max() < 1e-4
  if dtype == "bfloat16":  # ... and differs from the bf16 forward.
    bf16 = _log_probs(model_lib.TransformerDo(cfg), params, tokens)
    assert np.abs(bf16 - _log_probs_hf(hf, tokens)).max() > 1e-4


def test_random_t5_model_generates_as_sample_does(tmp_path):
  cfg = model_lib.DoConfig(D=32, H=4, N=2, F=64, L=24, V=32110)
  model = model_lib.TransformerDo(cfg)
  params = model_lib.init_params(model, jax.random.key(2))
  params["embed"]["embedding"] *= 30  # Sharp logits: no near ties.
  export.write(str(tmp_path), params, cfg, T5, {"test": True})
  hf, tok = _load(tmp_path)
  gen = json.loads((tmp_path / "generation_config.json").read_text())
  assert gen["suppress_tokens"] == list(range(32101, 32110))
  v = data_lib.make_vocab(T5)
  prompt = sample_lib.prompt_ids(v, "The weather today", add_bos=True)
  assert prompt[0] == 2 and prompt[1:] == tok("The weather today").input_ids
  ours = sample_lib.generate(
      model,
      params,
      prompt,
      num_new=12,
      key=jax.random.key(0),
      vocab_size=v.vocab_size,
      eos_id=v.eos_id,
  )[0].tolist()
  theirs = _cut_at_eos(_greedy_hf(hf, prompt, 12), v.eos_id)
  assert len(ours) >= 2 and ours == theirs


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A run of the tiny quickstart model (20 steps) and its export."""
  root = tmp_path_factory.mktemp("trained")
  workdir, out = str(root / "run"), str(root / "hf")
  with pytest.raises(SystemExit) as e:
    cli.main(["train", *tiny_flags(), f"--workdir={workdir}"])
  assert e.value.code == 0
  with pytest.raises(SystemExit) as e:
    cli.main(["export", f"--workdir={workdir}", f"--out={out}"])
    raise SystemExit(0)
  assert e.value.code == 0
  return workdir, out


@pytest.mark.slow
def test_trained_checkpoint_matches_forward_and_greedy_sample(trained, capsys):
  from nanodo_sam import checkpoint, rundir

  workdir, out = trained
  hf, tok = _load(out)
  marker = json.loads(open(os.path.join(out, export.MARKER)).read())
  assert marker["step"] == 20 and marker["exported_dtype"] == "float32"
  cfg = rundir.read_config(workdir)
  s, state, _ = checkpoint.restore_run(workdir, cfg)
  params = jax.device_get(state.params)
  inputs = data_lib.eval_batches(cfg)[0]["inputs"]
  diff = np.abs(_log_probs(s.model, params, inputs) - _log_probs_hf(hf, inputs))
  assert diff.max() < 1e-4
  code, printed, _ = _run(
      capsys,
      "sample",
      f"--workdir={workdir}",
      "--prompt=ROMEO:",
      "--temperature=0",
      "--max_new_tokens=20",
  )
  assert code == 0
  v = data_lib.make_vocab(cfg.data.vocab)
  prompt = sample_lib.prompt_ids(v, "ROMEO:", cfg.data.add_bos)
  new = _cut_at_eos(_greedy_hf(hf, prompt, 20), v.eos_id)
  ours = sample_lib.generate(
      s.model,
      params,
      prompt,
      num_new=20,
      key=jax.random.key(0),
      vocab_size=v.vocab_size,
      eos_id=v.eos_id,
  )[0].tolist()
  assert len(new) >= 1 and new == ours
  assert printed == sample_lib.text(v, prompt, np.asarray(new)) + "\n"
  # The byte vocabulary's invalid UTF-8 (a barely trained model writes it):
  # the project drops it, the exported tokenizer writes U+FFFD.
  text = tok.decode([i for i in prompt + new if i != v.eos_id])
  assert text.replace("\ufffd", "") + "\n" == printed


@pytest.mark.slow
def test_export_replaces_an_export_and_refuses_other_directories(
    trained, tmp_path, capsys
):
  workdir, out = trained
  before = listing(out)
  code, printed, _ = _run(
      capsys, "export", f"--workdir={workdir}", "--step=10", f"--out={out}"
  )
  assert code == 0 and "step 10" in printed
  assert json.loads(open(os.path.join(out, export.MARKER)).read())["step"] == 10
  assert set(listing(out)) == set(before)
  other = tmp_path / "other"
  other.mkdir()
  (other / "notes.txt").write_text("mine")
  for argv, says, target in [
      ([f"--out={other}"], "holds something other than an export", other),
      (
          ["--step=7", f"--out={tmp_path / 'new'}"],
          "no checkpoint for step 7",
          tmp_path,
      ),
      ([], "--out=DIR is required", tmp_path),
  ]:
    seen = listing(target)
    code, _, err = _run(capsys, "export", f"--workdir={workdir}", *argv)
    lines = [l for l in err.splitlines() if l.startswith("nanodo-sam")]
    assert code == 2 and len(lines) == 1 and says in lines[0], err
    assert listing(target) == seen


def test_export_refuses_a_directory_with_other_files_before_any_work(
    tmp_path, capsys
):
  (tmp_path / "config.json").write_text("{}")  # Not ours: no marker.
  seen = listing(tmp_path)
  code, _, err = _run(
      capsys, "export", "--workdir=/nonexistent", f"--out={tmp_path}"
  )
  assert code == 2 and err.startswith("nanodo-sam: error: --out=")
  assert len(err.strip().splitlines()) == 1 and "nanodo_sam_export" in err
  assert listing(tmp_path) == seen


def test_package_imports_no_torch_transformers_or_lm_eval():
  script = (
      "import sys\n"
      "from nanodo_sam import cli, commands, train, export, "
      "hf_tokenizer\n"
      "print([m for m in ('torch', 'transformers', 'lm_eval') "
      "if m in sys.modules])"
  )
  out = subprocess.run(
      [sys.executable, "-c", script],
      capture_output=True,
      text=True,
      check=False,
      cwd=_ROOT,
  )
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.slow
def test_package_and_train_import_no_torch_transformers_or_lm_eval(tmp_path):
  script = f"""
import sys
from nanodo_sam import cli
try:
  cli.main(["train", *{tiny_flags(**{"opt.num_train_steps": 2})!r},
            "--workdir={tmp_path / 'run'}"])
except SystemExit as e:
  assert e.code == 0, e.code
heavy = [m for m in ("torch", "transformers", "lm_eval") if m in sys.modules]
print("heavy:", heavy)
"""
  out = subprocess.run(
      [sys.executable, "-c", script],
      capture_output=True,
      text=True,
      check=False,
      cwd=_ROOT,
  )
  assert out.returncode == 0, out.stderr[-2000:]
  assert "heavy: []" in out.stdout
  assert "torch" in sys.modules  # This test's own process does import it.
