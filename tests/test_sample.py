# Copyright 2026 The nanodo-sam Authors.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     https://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""Sampling: the KV-cached decode against the full forward pass, for both
vocabularies, and `nanodo-sam sample` on a trained checkpoint."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ROOT, SPM_PATH
from nanodo_sam import data as data_lib
from nanodo_sam import model as model_lib
from nanodo_sam import sample as sample_lib
from test_cli import TINY, _assert_one_line_error, _run

QUICK = os.path.join(ROOT, "configs", "quickstart.py")


def _model(V, L=24, dtype="float32", N=2):
  cfg = model_lib.DoConfig(D=32, H=2, N=N, F=64, L=L, V=V, dtype=dtype)
  model = model_lib.TransformerDo(cfg)
  return model, model_lib.init_params(model, jax.random.key(0))


@pytest.mark.parametrize("dtype,atol", [("float32", 2e-5), ("bfloat16", 2e-2)])
def test_cached_decode_logits_equal_the_full_forward(dtype, atol):
  """Prefill 7 tokens, then feed the rest one at a time: every position's
  logits equal those of one forward pass over the whole sequence."""
  model, params = _model(V=50, dtype=dtype)
  tokens_BxL = jax.random.randint(jax.random.key(1), (3, 24), 0, 50)
  full_BxLxV = model.apply({"params": params}, tokens_BxL)
  decode = jax.jit(model_lib.make_decode_fn(model))
  cache = model_lib.init_cache(model, 3)
  logits, cache = decode(params, cache, tokens_BxL[:, :7])
  got = [logits]
  for t in range(7, 24):
    logits, cache = decode(params, cache, tokens_BxL[:, t : t + 1])
    got.append(logits)
  assert int(cache["index"]) == 24
  np.testing.assert_allclose(
      jnp.concatenate(got, 1), full_BxLxV, atol=atol, rtol=0
  )


@pytest.mark.parametrize(
    "vocab,add_bos",
    [("byte", False), (SPM_PATH, True)],
    ids=["byte", "sentencepiece"],
)
def test_greedy_sampling_is_the_argmax_of_a_full_forward(vocab, add_bos):
  """Greedy decoding with the cache picks, at every generated position, the
  argmax of one full forward pass over prompt + generated tokens; the prompt
  is framed as the run's documents (BOS first with add_bos)."""
  v = data_lib.make_vocab(vocab)
  model, params = _model(V=v.vocab_size, L=32)
  prompt = sample_lib.prompt_ids(v, "To be, or not to be", add_bos)
  if add_bos:
    assert prompt[0] == data_lib.bos_id(v)
  assert prompt[int(add_bos) :] == list(v.encode("To be, or not to be"))
  n = sample_lib.max_new_tokens(len(prompt), 32, 1000)
  assert n == 32 - len(prompt) + 1  # Fills the context exactly.
  new = sample_lib.generate(
      model,
      params,
      prompt,
      num_new=n,
      key=jax.random.key(0),
      temperature=0.0,
      num_samples=2,
  )
  assert new.shape == (2, n)
  np.testing.assert_array_equal(new[0], new[1])
  seq = np.array(prompt + new[0].tolist())
  full_LxV = model.apply({"params": params}, seq[None, :32])[0]
  np.testing.assert_array_equal(
      np.argmax(full_LxV, -1)[len(prompt) - 1 :], new[0]
  )
  # top_k=1 is greedy whatever the temperature.
  top1 = sample_lib.generate(
      model,
      params,
      prompt,
      num_new=n,
      key=jax.random.key(5),
      temperature=2.0,
      top_k=1,
  )
  np.testing.assert_array_equal(top1[0], new[0])
  assert sample_lib.text(v, prompt, new[0]).startswith("To be, or not to be")


def test_sampling_follows_the_seed_and_top_k():
  model, params = _model(V=50, L=16, N=1)
  prompt = [3, 4, 5]
  draw = lambda seed, **kw: sample_lib.generate(
      model,
      params,
      prompt,
      num_new=10,
      key=jax.random.key(seed),
      temperature=1.0,
      num_samples=4,
      **kw,
  )
  np.testing.assert_array_equal(draw(0), draw(0))
  assert not np.array_equal(draw(0), draw(1))
  # With top_k=3 every token is among the 3 most likely at its position.
  new = draw(2, top_k=3)
  assert new.shape[0] == 4 and new.shape[1] > 0, new.shape
  for row in new:
    seq = np.array(prompt + row.tolist())
    logits_LxV = model.apply({"params": params}, seq[None])[0]
    top3 = np.argsort(-np.asarray(logits_LxV), -1)[:, :3]
    for pos, token in enumerate(row):
      assert token in top3[len(prompt) - 1 + pos]


def test_prompt_longer_than_the_context_is_refused():
  with pytest.raises(ValueError, match="longer than the model's context"):
    sample_lib.max_new_tokens(33, 32, 10)
  assert sample_lib.max_new_tokens(32, 32, 10) == 1
  assert sample_lib.max_new_tokens(4, 32, 10) == 10


@pytest.mark.slow  # Trains, then the sample command.
def test_sample_command_on_a_trained_checkpoint(tmp_path, capsys):
  workdir = tmp_path / "run"
  code, _, _ = _run(
      capsys, "train", f"--config={QUICK}", f"--workdir={workdir}", *TINY
  )
  assert code == 0
  code, out, _ = _run(
      capsys,
      "sample",
      f"--workdir={workdir}",
      "--prompt=ROMEO:",
      "--max_new_tokens=8",
      "--temperature=0",
      "--num_samples=2",
  )
  assert code == 0, out
  samples = out.split("--- sample 1 ---\n")
  assert len(samples) == 2 and samples[0].startswith("--- sample 0 ---\n")
  texts = [s.replace("--- sample 0 ---\n", "").rstrip("\n") for s in samples]
  assert texts[0] == texts[1] and texts[0].startswith("ROMEO:")
  code, _, err = _run(
      capsys, "sample", f"--workdir={workdir}", "--prompt=" + "x" * 33
  )
  _assert_one_line_error(code, err, "longer than the model's context")
  code, _, err = _run(capsys, "sample", f"--workdir={workdir}", "--step=3")
  _assert_one_line_error(code, err, "no checkpoint for step 3")
  code, _, err = _run(
      capsys, "sample", f"--workdir={workdir}", "--temperature=-1"
  )
  _assert_one_line_error(code, err, "--temperature=-1.0 must be")
