"""Data: packing, vocabularies, fixed eval order, resumable train order."""

import glob
import gzip
import json
import os
import re

import numpy as np
import pytest
import tensorflow as tf

from conftest import SPM_PATH, TINY_SHAKESPEARE_TXT, crash_then_resume, tiny_config
from nanodo_sam import data as data_lib
from nanodo_sam.config import UsageError


@pytest.mark.parametrize("packing,row", [("shifted", 4), ("nanodo", 3)])
def test_pack_concatenates_with_eos_and_splits_round_trip(packing, row):
  docs = [[5, 6, 7, 1], [8, 1], [9, 10, 11, 12, 13, 1], [14, 15, 1]]
  ds = tf.data.Dataset.from_generator(
      lambda: ({"targets": np.array(d, np.int32)} for d in docs),
      output_signature={"targets": tf.TensorSpec([None], tf.int32)},
  )
  rows = [r.numpy() for r in data_lib.pack(ds, seq_len=3, packing=packing)]
  flat = np.concatenate(docs)
  assert all(r.shape == (row,) for r in rows)
  n = len(flat) // row
  assert len(rows) == n
  np.testing.assert_array_equal(np.concatenate(rows), flat[: row * n])
  batch = data_lib._to_batch(tf.constant(np.stack(rows)), packing)
  np.testing.assert_array_equal(
      batch["inputs"][:, 1:], batch["targets"][:, :-1]
  )
  assert batch["inputs"].shape == (n, 3)
  # shifted scores every position; nanodo leaves the last one unscored.
  np.testing.assert_array_equal(batch["weights"][:, :-1], 1.0)
  np.testing.assert_array_equal(
      batch["weights"][:, -1], 0.0 if packing == "nanodo" else 1.0
  )


def test_tiny_shakespeare_bytes_decode_to_the_raw_text():
  cfg = tiny_config(**{"data.packing": "shifted"})
  batches = data_lib.eval_batches(cfg)
  assert len(batches) == cfg.data.eval_steps
  b = batches[0]
  assert b["inputs"].shape == (8, 32) and b["inputs"].dtype == np.int32
  assert b["weights"].dtype == np.float32 and b["weights"].min() == 1.0
  raw = open(TINY_SHAKESPEARE_TXT).read()
  text = data_lib.decode("byte", b["inputs"][0])
  assert len(text) > 20 and text in raw


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
  docs = [
      "the first document.",
      'a second one, with "quotes" and\nnewlines',
      "third",
  ]
  with gzip.open(tmp_path / "part-0.jsonl.gz", "wt") as f:
    for d in docs:
      f.write(json.dumps({"text": d, "url": "x"}) + "\n")
  (tmp_path / "a.txt").write_text("plain text file " * 20)
  for pattern, expected in [
      (str(tmp_path / "*.jsonl.gz"), docs),
      (str(tmp_path / "*.txt"), ["plain text file " * 20]),
  ]:
    cfg = tiny_config()
    cfg.data.train_files = pattern
    cfg.data.eval_files = pattern
    cfg.model.L = 8
    cfg.data.eval_batch_size = 1
    cfg.data.eval_steps = 3
    rows = [b["inputs"][0] for b in data_lib.eval_batches(cfg)]
    stream = np.concatenate(
        [
            np.frombuffer(d.encode(), np.uint8).astype(np.int32) + 3
            for d in expected
            for _ in [0]
        ]
    )
    # Bytes are offset by 3 special ids; EOS (1) closes each document.
    flat = np.concatenate(
        [
            np.append(
                np.frombuffer(d.encode(), np.uint8).astype(np.int32) + 3, 1
            )
            for d in expected
        ]
        * 4
    )
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


# ------------------------------------------------------------------ parquet


def _write_parquet(root, files=2, groups=3, rows=40):
  """files x groups row groups of `rows` documents "<file>-<group>-<row> ...",
  with an id column beside the text."""
  import pyarrow as pa
  import pyarrow.parquet as pq

  os.makedirs(root, exist_ok=True)
  for f in range(files):
    docs = [
        f"{f}-{g}-{r} " + "to be or not " * (r % 5)
        for g in range(groups)
        for r in range(rows)
    ]
    pq.write_table(
        pa.table({"id": list(range(len(docs))), "text": docs}),
        os.path.join(root, f"part-{f}.parquet"),
        row_group_size=rows,
    )
  return os.path.join(root, "*.parquet")


def _parquet_config(pattern, **overrides):
  return tiny_config(
      **{"data.train_files": pattern, "data.eval_files": pattern, **overrides}
  )


def _documents(batches):
  """The "<file>-<group>-<row>" names of the documents in per-document
  eval batches."""
  return [
      data_lib.decode("byte", r).split(" ")[0]
      for b in batches
      for r in b["inputs"]
      if r.any()
  ]


def test_parquet_row_groups_stream_in_order_and_each_process_reads_its_own(
    tmp_path, monkeypatch
):
  import seqio

  pattern = _write_parquet(str(tmp_path))
  cfg = _parquet_config(
      pattern, **{"data.eval_mode": "per_document", "data.eval_steps": 100}
  )
  everything = _documents(data_lib.eval_batches(cfg))
  assert everything == [
      f"{f}-{g}-{r}" for f in range(2) for g in range(3) for r in range(40)
  ]
  # Two processes: the six row groups (file, group) are dealt out in turn,
  # so process 1 reads (0, 1), (1, 0), (1, 2) and nothing else.
  monkeypatch.setattr(
      data_lib, "_shard_info", lambda: seqio.ShardInfo(index=1, num_shards=2)
  )
  mine = _documents(data_lib.eval_batches(cfg))
  assert mine == [
      f"{f}-{g}-{r}" for f, g in ((0, 1), (1, 0), (1, 2)) for r in range(40)
  ]
  # Training reads the same shard (shuffled): every document that starts
  # in a packed row (after an EOS) is one of its row groups'.
  it = data_lib.TrainIterator(data_lib.train_dataset(cfg, 0))
  rows = [
      "".join("\n" if i == 1 else chr(i - 3) for i in r if i >= 1)
      for _ in range(5)
      for r in next(it)["inputs"]
  ]
  names = {m for r in rows for m in re.findall(r"\n(\d)-(\d)-\d+ ", r)}
  assert len(names) == 3 and names == {("0", "1"), ("1", "0"), ("1", "2")}


@pytest.mark.parametrize("kind", ["parquet", "jsonl"])
def test_file_corpus_position_survives_save_and_restore_across_epochs(
    tmp_path, kind
):
  """A parquet iterator's checkpoint holds (file, row group) and the
  position in it; a fresh pipeline restored from it yields the same batches,
  bit for bit, across row groups and into the next epochs (the corpus is ~30
  batches), as does a JSON-lines corpus of several files."""
  import pyarrow.parquet as pq

  pattern = _write_parquet(str(tmp_path / "data"))
  if kind == "jsonl":
    for f in glob.glob(pattern):
      with open(f.replace(".parquet", ".jsonl"), "w") as out:
        for text in pq.read_table(f)["text"].to_pylist():
          out.write(json.dumps({"text": text}) + "\n")
    pattern = pattern.replace(".parquet", ".jsonl")
  cfg = _parquet_config(pattern, **{"data.shuffle_buffer": 16})
  it = data_lib.TrainIterator(data_lib.train_dataset(cfg, 3))
  for _ in range(7):
    next(it)
  it.save(str(tmp_path / "pos"))
  expected = [next(it)["inputs"] for _ in range(60)]
  fresh = data_lib.TrainIterator(data_lib.train_dataset(cfg, 3))
  fresh.restore(str(tmp_path / "pos"))
  for e in expected:
    np.testing.assert_array_equal(next(fresh)["inputs"], e)
  other = data_lib.TrainIterator(data_lib.train_dataset(cfg, 4))
  assert not np.array_equal(next(other)["inputs"], expected[0])


@pytest.mark.slow  # Three training runs.
def test_a_parquet_corpus_trains_and_resumes_bitwise(tmp_path, monkeypatch):
  import jax
  from nanodo_sam import checkpoint
  from nanodo_sam import state as state_lib
  from nanodo_sam import train as train_lib

  cfg = _parquet_config(
      _write_parquet(str(tmp_path / "data")), **{"data.shuffle_buffer": 16}
  )
  full = train_lib.train(cfg, str(tmp_path / "full"))
  assert full["status"] == "completed" and np.isfinite(full["final_eval_loss"])
  # Dies at its 15th batch, after the step-10 checkpoint, then resumes.
  resumed = crash_then_resume(monkeypatch, cfg, str(tmp_path / "resumed"), 15)
  assert resumed["final_eval_loss"] == full["final_eval_loss"]
  s = state_lib.setup(cfg)
  a, b = (
      checkpoint.restore_state(
          checkpoint.checkpoint_manager(str(tmp_path / d)), s
      )
      for d in ("full", "resumed")
  )
  assert int(a.step) == int(b.step) == 20
  for x, y in zip(
      jax.tree.leaves((a.params, a.opt_state)),
      jax.tree.leaves((b.params, b.opt_state)),
  ):
    np.testing.assert_array_equal(x, y)


def test_text_column_names_the_jsonl_field_and_parquet_column(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq

  pq.write_table(
      pa.table({"body": ["a parquet document"]}), tmp_path / "x.parquet"
  )
  (tmp_path / "x.jsonl").write_text(json.dumps({"body": "a json one"}) + "\n")
  for pattern, text in (
      ("*.parquet", "a parquet document"),
      ("*.jsonl", "a json one"),
  ):
    cfg = _parquet_config(
        str(tmp_path / pattern),
        **{"data.text_column": "body", "data.eval_mode": "per_document"},
    )
    row = data_lib.eval_batches(cfg)[0]["inputs"][0]
    assert data_lib.decode("byte", row) == text


def test_a_named_text_split_is_written_when_first_read(tmp_path, monkeypatch):
  """configs/edge_of_stability.py names its tiny_shakespeare split without
  writing it; the pipeline writes it when a run first reads it."""
  from nanodo_sam import text_split

  monkeypatch.delenv("TINY_SHAKESPEARE_TXT", raising=False)
  train, test = text_split.split_paths(
      TINY_SHAKESPEARE_TXT, 10_000, str(tmp_path)
  )
  assert os.listdir(tmp_path) == []
  cfg = tiny_config(
      **{
          "data.train_files": train,
          "data.eval_files": test,
          "data.eval_mode": "packed",
      }
  )
  batches = data_lib.eval_batches(cfg)
  assert len(batches) == cfg.data.eval_steps
  raw = open(TINY_SHAKESPEARE_TXT, "rb").read()
  assert open(train, "rb").read() + open(test, "rb").read() == raw
  assert (
      data_lib.decode("byte", batches[0]["inputs"][0])[:20]
      in open(test, encoding="utf-8").read()
  )
