"""Data: packing, vocabularies, fixed eval order, resumable train order."""

import gzip
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from conftest import SHARED_DATA, SPM_PATH, needs_data, tiny_config
from nanodo_sam import data as data_lib
from nanodo_sam.config import UsageError


@pytest.mark.parametrize("packing,row", [("shifted", 4), ("nanodo", 3)])
def test_pack_concatenates_with_eos_and_splits_round_trip(packing, row):
  docs = [[5, 6, 7, 1], [8, 1], [9, 10, 11, 12, 13, 1], [14, 15, 1]]
  ds = tf.data.Dataset.from_generator(
      lambda: ({"targets": np.array(d, np.int32)} for d in docs),
      output_signature={"targets": tf.TensorSpec([None], tf.int32)})
  rows = [r.numpy() for r in data_lib.pack(ds, seq_len=3, packing=packing)]
  flat = np.concatenate(docs)
  assert all(r.shape == (row,) for r in rows)
  n = len(flat) // row
  assert len(rows) == n
  np.testing.assert_array_equal(np.concatenate(rows), flat[:row * n])
  batch = data_lib._to_batch(tf.constant(np.stack(rows)), packing)
  np.testing.assert_array_equal(batch["inputs"][:, 1:],
                                batch["targets"][:, :-1])
  assert batch["inputs"].shape == (n, 3)
  # shifted scores every position; nanodo leaves the last one unscored.
  np.testing.assert_array_equal(batch["weights"][:, :-1], 1.0)
  np.testing.assert_array_equal(batch["weights"][:, -1],
                                0.0 if packing == "nanodo" else 1.0)


@needs_data
def test_tiny_shakespeare_bytes_decode_to_the_raw_text():
  cfg = tiny_config(**{"data.packing": "shifted"})
  batches = data_lib.eval_batches(cfg)
  assert len(batches) == cfg.data.eval_steps
  b = batches[0]
  assert b["inputs"].shape == (8, 32) and b["inputs"].dtype == np.int32
  assert b["weights"].dtype == np.float32 and b["weights"].min() == 1.0
  raw = open(os.path.join(SHARED_DATA, "manual",
                          "tiny_shakespeare_input.txt")).read()
  text = data_lib.decode("byte", b["inputs"][0])
  assert len(text) > 20 and text in raw


@needs_data
def test_eval_batches_are_fixed_and_train_order_follows_the_seed():
  cfg = tiny_config()
  a, b = data_lib.eval_batches(cfg), data_lib.eval_batches(cfg)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["inputs"], y["inputs"])
  it = lambda seed: data_lib.TrainIterator(data_lib.train_dataset(cfg, seed))
  s0, s0b, s1 = it(0), it(0), it(1)
  first = next(s0)["inputs"]
  np.testing.assert_array_equal(first, next(s0b)["inputs"])
  assert not np.array_equal(first, next(s1)["inputs"])


@needs_data
def test_train_iterator_position_survives_save_and_restore(tmp_path):
  cfg = tiny_config()
  it = data_lib.TrainIterator(data_lib.train_dataset(cfg, 3))
  for _ in range(5):
    next(it)
  it.save(str(tmp_path))
  expected = [next(it)["inputs"] for _ in range(3)]
  fresh = data_lib.TrainIterator(data_lib.train_dataset(cfg, 3))
  fresh.restore(str(tmp_path))
  for e in expected:
    np.testing.assert_array_equal(next(fresh)["inputs"], e)


@needs_data
def test_c4_with_the_t5_sentencepiece_vocabulary():
  cfg = tiny_config()
  cfg.data.tfds_name = "c4/en:3.1.0"
  cfg.data.vocab = SPM_PATH
  cfg.model.V = 32101
  b = data_lib.eval_batches(cfg)[0]
  assert b["inputs"].shape == (8, 32)
  assert b["inputs"].max() < 32101
  text = data_lib.decode(SPM_PATH, b["inputs"][0])
  assert len(text.split()) > 5


def test_user_text_and_jsonl_files(tmp_path):
  docs = ["the first document.", "a second one, with \"quotes\" and\nnewlines",
          "third"]
  with gzip.open(tmp_path / "part-0.jsonl.gz", "wt") as f:
    for d in docs:
      f.write(json.dumps({"text": d, "url": "x"}) + "\n")
  (tmp_path / "a.txt").write_text("plain text file " * 20)
  for pattern, expected in [(str(tmp_path / "*.jsonl.gz"), docs),
                            (str(tmp_path / "*.txt"),
                             ["plain text file " * 20])]:
    cfg = tiny_config()
    cfg.data.train_files = pattern
    cfg.data.eval_files = pattern
    cfg.model.L = 8
    cfg.data.eval_batch_size = 1
    cfg.data.eval_steps = 3
    rows = [b["inputs"][0] for b in data_lib.eval_batches(cfg)]
    stream = np.concatenate([np.frombuffer(d.encode(), np.uint8).astype(
        np.int32) + 3 for d in expected for _ in [0]])
    # Bytes are offset by 3 special ids; EOS (1) closes each document.
    flat = np.concatenate([np.append(np.frombuffer(d.encode(), np.uint8)
                                     .astype(np.int32) + 3, 1)
                           for d in expected] * 4)
    got = np.concatenate([np.append(r, 0)[:8] for r in rows])
    np.testing.assert_array_equal(got[:8], flat[:8])
    del stream


def test_missing_vocabulary_and_dataset_say_where_they_looked(tmp_path):
  with pytest.raises(UsageError, match="vocabulary file not found"):
    data_lib.make_vocab(str(tmp_path / "nope.model"))
  cfg = tiny_config()
  cfg.data.tfds_name = "tiny_shakespeare:1.0.0"
  cfg.data.tfds_data_dir = str(tmp_path)
  with pytest.raises(UsageError, match="not found in TFDS data dir"):
    data_lib.make_task(cfg.data)
  with pytest.raises(UsageError, match="no files match"):
    data_lib.make_task(cfg.data, split_files=str(tmp_path / "*.jsonl"))
