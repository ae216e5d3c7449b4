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
"""Eval metrics (loss, perplexity, accuracy, bits per byte) against sums
computed here from the logits and the tokenizer's own decoding, and their
way into results.json, TensorBoard and `nanodo-sam eval`."""

import json
import math

import jax
import numpy as np
import pytest

from conftest import SPM_PATH, read_scalars, tiny_config
from nanodo_sam import data as data_lib
from nanodo_sam import evaluate
from nanodo_sam import model as model_lib
from nanodo_sam import train as train_lib
from test_cli import _run

# Documents whose decoding gives them back unchanged (no whitespace the
# SentencePiece normaliser would fold), with multi-byte UTF-8 characters and
# a leading digit (SentencePiece's lone word-marker piece).
DOCS = [
    "The café opened at nine.",
    "42 is the answer, Zürich said.",
    "Crème brûlée costs 3 € each.",
]


def _eval_set(tmp_path, vocab, add_bos):
  path = tmp_path / "eval.jsonl"
  long_doc = "many words in a long document " * 12  # Cut at L tokens.
  path.write_text(
      "".join(json.dumps({"text": d}) + "\n" for d in DOCS + [long_doc])
  )
  V = data_lib.make_vocab(vocab).vocab_size
  cfg = tiny_config(
      **{
          "data.train_files": str(path),
          "data.eval_files": str(path),
          "data.vocab": vocab,
          "data.add_bos": add_bos,
          "model.V": V,
          "data.eval_mode": "per_document",
          "data.eval_batch_size": 3,
          "data.eval_steps": 2,
      }
  )
  return cfg, data_lib.eval_batches(cfg)


@pytest.mark.parametrize(
    "vocab,add_bos",
    [("byte", False), (SPM_PATH, True)],
    ids=["byte", "sentencepiece"],
)
def test_metrics_equal_sums_computed_by_hand(tmp_path, vocab, add_bos):
  cfg, batches = _eval_set(tmp_path, vocab, add_bos)
  v = data_lib.make_vocab(vocab)
  model = model_lib.TransformerDo(model_lib.from_config(cfg))
  params = model_lib.init_params(model, jax.random.key(0))
  logits_fn = model_lib.make_logits_fn(model)
  eval_step = evaluate.make_eval_step(
      logits_fn, target_bytes=data_lib.target_bytes(vocab, cfg.model.V)
  )
  got = evaluate.eval_metrics(eval_step, params, batches)

  nats = tokens = correct = num_bytes = 0.0
  docs_seen = 0
  for b in batches:
    logits = np.asarray(logits_fn(params, b["inputs"]), np.float64)
    logz = np.log(
        np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1)
    ) + logits.max(-1)
    target = np.take_along_axis(logits, b["targets"][..., None], -1)[..., 0]
    w = b["weights"]
    nats += np.sum((logz - target) * w)
    tokens += w.sum()
    correct += np.sum((logits.argmax(-1) == b["targets"]) * w)
    for ids, row_w in zip(b["targets"], w):
      scored = [int(i) for i, x in zip(ids, row_w) if x and i != v.eos_id]
      if scored:  # The text these targets decode to, in UTF-8 bytes.
        text = v.decode(scored)
        num_bytes += len(text.encode("utf-8"))
        if docs_seen < len(DOCS) and add_bos:  # BOS-framed: the whole doc.
          assert text == DOCS[docs_seen]
        docs_seen += 1
  assert docs_seen == len(DOCS) + 1

  assert got["tokens"] == tokens and got["bytes"] == num_bytes
  assert got["loss"] == pytest.approx(nats / tokens, rel=1e-6)
  assert got["perplexity"] == pytest.approx(math.exp(got["loss"]), rel=1e-12)
  assert got["accuracy"] == pytest.approx(correct / tokens, rel=1e-12)
  # bits/byte = nats per token x tokens / (bytes x ln 2).
  assert got["bits_per_byte"] == pytest.approx(
      (nats / tokens) * tokens / (num_bytes * math.log(2)), rel=1e-6
  )
  assert evaluate.eval_loss(eval_step, params, batches) == got["loss"]


def test_bits_per_byte_is_nan_without_a_byte_count():
  m = evaluate.metrics_from_sums(
      {"loss": 6.0, "weight": 3.0, "correct": 1.0, "bytes": 0.0}
  )
  assert m["loss"] == 2.0 and m["accuracy"] == pytest.approx(1 / 3)
  assert m["perplexity"] == pytest.approx(math.exp(2.0))
  assert math.isnan(m["bits_per_byte"])


def test_a_run_records_every_metric_and_eval_reproduces_them(tmp_path, capsys):
  cfg = tiny_config()
  res = train_lib.train(cfg, str(tmp_path))
  on_disk = json.load(open(tmp_path / "results.json"))
  scalars = read_scalars(tmp_path, "eval/")
  assert set(scalars) == {f"eval/{k}" for k in evaluate.METRICS}
  final = {k: scalars[f"eval/{k}"][20] for k in evaluate.METRICS}
  assert final["loss"] == pytest.approx(res["final_eval_loss"], rel=1e-6)
  for k in ("perplexity", "accuracy", "bits_per_byte"):
    assert on_disk[f"final_eval_{k}"] == res[f"final_eval_{k}"]
    assert final[k] == pytest.approx(res[f"final_eval_{k}"], rel=1e-6)
  assert res["final_eval_perplexity"] == pytest.approx(
      math.exp(res["final_eval_loss"])
  )
  assert 0 < res["final_eval_accuracy"] < 1
  # Bytes: every scored target but EOS is one byte of tiny_shakespeare.
  batches = data_lib.eval_batches(cfg)
  n_bytes = sum(np.sum(b["weights"] * (b["targets"] != 1)) for b in batches)
  n_tokens = sum(np.sum(b["weights"]) for b in batches)
  assert res["final_eval_bits_per_byte"] == pytest.approx(
      res["final_eval_loss"] * n_tokens / (n_bytes * math.log(2)), rel=1e-6
  )
  code, out, _ = _run(capsys, "eval", f"--workdir={tmp_path}")
  assert code == 0
  printed = json.loads(out.strip().splitlines()[-1])
  assert printed["step"] == 20
  for k in evaluate.METRICS:
    assert printed[f"eval_{k}"] == pytest.approx(
        res[f"final_eval_{k}"], rel=1e-6
    )
  assert printed["eval_tokens"] == n_tokens and printed["eval_bytes"] == n_bytes
