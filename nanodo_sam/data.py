"""Data: seqio Tasks over TFDS or files (text, JSON-lines, parquet), packed
into fixed-length rows.

Documents are tokenized and framed BOS + ids + EOS (`data.add_bos`; EOS
only without it), concatenated and cut into rows. With `data.packing=nanodo`
(Nanodo's layout) a row is L tokens: `inputs` = row, `targets` = row shifted
by one, the last position padded and unscored; with `shifted` a row is L+1
tokens: `inputs` = row[:-1], `targets` = row[1:]. Training order is fixed by
`seed`. Evaluation (`eval_batches`) reads the eval split in a fixed order,
either per document (`data.eval_mode=per_document`, Nanodo's evaluator: each
document on its own row, padded or cut to L, at most one pass) or packed like
the training rows. Each process reads only its own shard
(`seqio.ShardInfo`). The train iterator's position is checkpointable
(`TrainIterator.save/restore`, tf.data iterator checkpoints).
`target_bytes` gives the UTF-8 bytes behind each target token (bits per
byte).
"""

from __future__ import annotations

import contextlib
import functools
import glob
import gzip
import hashlib
import importlib.resources
import json
import logging
import os
import re
from typing import Any, Iterator

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np

from nanodo_sam import keys
from nanodo_sam import text_split
from nanodo_sam.errors import UsageError
from nanodo_sam.keys import BYTE_VOCAB

# The small public data shipped in the package (nanodo_sam/data_files; its
# README.md gives each file's source and licence), found with
# importlib.resources so that an installed wheel reads it too.
SHIPPED = "shipped:"  # data.vocab "shipped:FILE": FILE of data_files.
T5_VOCAB_FILE = "c4_t5_sentencepiece_cc_all.32000.100extra.model"
# The T5 C4 vocabulary's SHA-256: a run directory written before the package
# shipped it names another copy (a folder beside the checkout); where that
# path is gone, the shipped copy stands in for it if it has this hash.
T5_VOCAB_SHA256 = (
    "15d8dfa11996e0d1e8645897ec4d70b1dec6a7cb6d87df0daf560a3cde479006"
)
TINY_SHAKESPEARE_TXT = "tiny_shakespeare/input.txt"  # karpathy/char-rnn's.
SHIPPED_TFDS_DIR = "tensorflow_datasets"  # c4/en:3.1.0: a 1,000-doc subset.


# TensorFlow, TFDS, seqio (which imports TensorFlow) and pyarrow are
# imported on first use: TensorFlow takes seconds to import and only feeds
# the data, so a bad config is reported before it; pyarrow only reads
# parquet files.


def _tf():
  import tensorflow as tf  # Lazy: see above.

  tf.config.set_visible_devices([], "GPU")
  return tf


def _tfds():
  import tensorflow_datasets as tfds  # Lazy: see above.

  return tfds


def _seqio():
  import seqio  # Lazy: see above.

  return seqio


def _pyarrow():
  import pyarrow as pa  # Lazy: see above.

  return pa


def _parquet():
  import pyarrow.parquet as pq  # Lazy: see above.

  return pq


def shipped_path(name: str) -> str:
  """The path of `name` in the package's data_files (installed or not)."""
  path = importlib.resources.files("nanodo_sam") / "data_files" / name
  if not path.exists():
    raise FileNotFoundError(
        f"{name!r} is not among the package's data "
        f"files ({path}); reinstall nanodo-sam"
    )
  return str(path)


def tiny_shakespeare_txt() -> str:
  """The raw tiny_shakespeare text: $TINY_SHAKESPEARE_TXT, else the copy
  shipped with the package."""
  return os.environ.get("TINY_SHAKESPEARE_TXT") or shipped_path(
      TINY_SHAKESPEARE_TXT
  )


def resolve_path(path: str) -> str:
  """Expands ~ and $VARS; keeps remote paths (gs://...) as they are."""
  return os.path.expanduser(os.path.expandvars(path))


def _sha256(path: str) -> str:
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


def vocab_path(vocab: str) -> str:
  """The file behind data.vocab: "shipped:FILE" is the package's copy; a
  local path that is gone and names the T5 C4 vocabulary (a run made before
  the package shipped it) is the shipped copy when that has the recorded
  hash; any other path is itself (~ and $VARS expanded)."""
  if vocab.startswith(SHIPPED):
    return shipped_path(vocab[len(SHIPPED) :])
  path = resolve_path(vocab)
  if (
      "://" not in path
      and not os.path.exists(path)
      and os.path.basename(path) == T5_VOCAB_FILE
  ):
    shipped = shipped_path(T5_VOCAB_FILE)
    if _sha256(shipped) == T5_VOCAB_SHA256:
      return shipped
  return path


def bos_id(vocab) -> int | None:
  """The vocabulary's BOS id, or None if it has none (`byte`)."""
  tokenizer = getattr(vocab, "tokenizer", None)
  if tokenizer is None:
    return None
  bos = tokenizer.bos_id()
  return None if bos < 0 else int(bos)


def make_vocab(vocab: str):
  """`byte` or a SentencePiece model: "shipped:FILE" or a path (local or
  remote; `vocab_path`)."""
  seqio = _seqio()
  if vocab == BYTE_VOCAB:
    return seqio.ByteVocabulary()
  try:
    path = vocab_path(vocab)
  except FileNotFoundError as e:
    raise UsageError(f"vocabulary file not found: {e} (data.vocab)") from None
  if "://" not in path and not os.path.exists(path):
    raise UsageError(
        f"vocabulary file not found: {path!r} (data.vocab); pass "
        "--config.data.vocab=PATH to a SentencePiece .model file, "
        f"{SHIPPED}{T5_VOCAB_FILE} (the T5 C4 vocabulary shipped with the "
        "package) or 'byte'"
    )
  return seqio.SentencePieceVocabulary(path)


def _file_kind(pattern: str, files: list[str]) -> str:
  """ "parquet", "json" (.jsonl/.json, optionally .gz) or "text": the one
  kind of every file `pattern` matched (UsageError if they mix kinds)."""
  stem = [f[:-3] if f.endswith(".gz") else f for f in files]
  kinds = {
      "parquet"
      if f.endswith(PARQUET)
      else "json"
      if s.endswith((".jsonl", ".json"))
      else "text"
      for f, s in zip(files, stem)
  }
  if len(kinds) != 1:
    raise UsageError(
        f"{pattern!r} mixes {' and '.join(sorted(kinds))} "
        "files; use one kind per glob"
    )
  return kinds.pop()


def _file_source(pattern: str, text_column: str = "text"):
  """A seqio source over text (.txt, one document per file), JSON-lines
  (.jsonl/.json, optionally .gz, one {text_column: ...} document per line)
  or parquet files (`_parquet_source`)."""
  seqio = _seqio()
  tf = _tf()
  try:  # A held-out split a config names is written on first read.
    text_split.write_if_missing(
        resolve_path(pattern), {"tiny_shakespeare": tiny_shakespeare_txt()}
    )
  except ValueError as e:
    raise UsageError(str(e)) from None
  files = sorted(glob.glob(resolve_path(pattern)))
  if not files:
    raise UsageError(
        f"no files match {pattern!r} (data.train_files / "
        "data.eval_files); give a glob of .txt, .jsonl[.gz] "
        "or .parquet files"
    )
  kind = _file_kind(pattern, files)
  if kind == "parquet":
    return _parquet_source(files, text_column)

  def parse_json(line):
    return json.loads(line.numpy().decode("utf-8"))[text_column]

  def dataset_fn(split, shuffle_files, seed=None):
    del split
    ds = tf.data.Dataset.from_tensor_slices(files)
    if shuffle_files:
      ds = _shuffle_once(ds, len(files), seed)
    if kind == "json":
      ds = ds.interleave(
          lambda f: tf.data.TextLineDataset(
              f,
              compression_type=tf.where(
                  tf.strings.regex_full_match(f, r".*\.gz"), "GZIP", ""
              ),
          ),
          cycle_length=1,
      )
      ds = ds.map(
          lambda line: {"text": tf.py_function(parse_json, [line], tf.string)}
      )
      return ds.map(lambda ex: {"text": tf.ensure_shape(ex["text"], [])})
    return ds.map(lambda f: {"text": tf.io.read_file(f)})

  return seqio.FunctionDataSource(dataset_fn, splits=["train", "validation"])


PARQUET = ".parquet"


def _shuffle_once(ds, n: int, seed):
  """The files' (or row groups') order, shuffled by the seed, the same in
  every epoch: a restored iterator does not get back the per-epoch reshuffle
  of a source-level shuffle (the epoch after a resume came out in another
  order), while the document and row shuffles after it reshuffle every epoch
  and resume exactly (tests/test_data.py)."""
  return ds.shuffle(n, seed=seed, reshuffle_each_iteration=False)


def _parquet_row_groups(files: list[str], column: str) -> list[tuple[str, int]]:
  """(file, row group) of every non-empty row group, read from the files'
  footers only. UsageError for a file that is empty, is not parquet, lacks
  `column` or holds no text in it."""
  pa, pq = _pyarrow(), _parquet()
  units = []
  for f in files:
    if os.path.getsize(f) == 0:
      raise UsageError(
          f"{f!r} is empty (0 bytes); remove it from "
          "data.train_files / data.eval_files"
      )
    try:
      with pq.ParquetFile(f) as pf:
        schema, meta = pf.schema_arrow, pf.metadata
    except (pa.ArrowException, OSError) as e:
      raise UsageError(
          f"{f!r} is not a parquet file "
          f"({str(e).splitlines()[0]}); data.train_files / "
          "data.eval_files take .parquet, .jsonl[.gz] or .txt "
          "files"
      ) from None
    if column not in schema.names:
      raise UsageError(
          f"{f!r} has no column {column!r}; its columns are "
          f"{schema.names}: set --config.data.text_column to "
          "the one holding the text"
      )
    kind = schema.field(column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
      raise UsageError(
          f"column {column!r} of {f!r} holds {kind}, not text "
          "(data.text_column)"
      )
    if meta.num_rows == 0:
      raise UsageError(
          f"{f!r} has no rows; remove it from "
          "data.train_files / data.eval_files"
      )
    units += [
        (f, g) for g in range(meta.num_row_groups) if meta.row_group(g).num_rows
    ]
  return units


def _read_row_group(path, group, column) -> np.ndarray:
  """One row group's non-null texts, UTF-8 (a tf.py_function)."""
  pq = _parquet()
  with pq.ParquetFile(path.numpy().decode()) as pf:
    texts = (
        pf.read_row_group(int(group), columns=[column.numpy().decode()])
        .column(0)
        .drop_null()
        .to_pylist()
    )
  return np.array([t.encode("utf-8") for t in texts], dtype=object)


def _parquet_source(files: list[str], column: str):
  """Parquet files as a seqio source, streamed one row group at a time (the
  only part of a file in memory). Its shards are the row groups, so each
  process reads its own (`_read_plan`); the files' order is shuffled by the
  seed. The tf.data state holds only (file, row group) and the position in
  it: a checkpointed iterator re-reads that row group on restore."""
  seqio = _seqio()
  tf = _tf()
  units = _parquet_row_groups(files, column)

  def dataset(units, shuffle: bool, seed):
    paths, groups = zip(*units)
    ds = tf.data.Dataset.from_tensor_slices((list(paths), list(groups)))
    if shuffle:
      ds = _shuffle_once(ds, len(units), seed)

    def rows(path, group):
      texts = tf.py_function(_read_row_group, [path, group, column], tf.string)
      return tf.data.Dataset.from_tensor_slices(tf.ensure_shape(texts, [None]))

    return ds.flat_map(rows).map(lambda text: {"text": text})

  class ParquetSource(seqio.DataSource):
    """Row groups of parquet files; a shard is a row group."""

    @property
    def supports_arbitrary_sharding(self) -> bool:
      return False

    def list_shards(self, split: str) -> list[str]:
      del split
      return [f"{f}#{g}" for f, g in units]

    def get_dataset(
        self,
        split: str = "train",
        shuffle: bool = True,
        seed=None,
        shard_info=None,
        *,
        sequence_length=None,
        use_cached=False,
        num_epochs=1,
    ):
      del split, sequence_length, use_cached, num_epochs
      mine = (
          units
          if shard_info is None
          else units[shard_info.index :: shard_info.num_shards]
      )
      return dataset(mine, shuffle, seed)

  return ParquetSource(splits=["train", "validation"])


# TFDS datasets whose copy ships with the package, read when the config
# allows it (data.use_shipped) and neither data.tfds_data_dir nor
# $TFDS_DATA_DIR holds them: name -> a function returning its seqio source.
def _shipped_c4():
  seqio = _seqio()
  return seqio.TfdsDataSource(
      "c4/en:3.1.0", tfds_data_dir=shipped_path(SHIPPED_TFDS_DIR)
  )


def _shipped_tiny_shakespeare():
  """tiny_shakespeare from the shipped text, split as TFDS's builder splits
  it (the first 90% of the characters, then 5% and 5%; each split one
  example): the examples of TFDS's tiny_shakespeare:1.0.0."""
  seqio = _seqio()
  tf = _tf()
  with open(shipped_path(TINY_SHAKESPEARE_TXT), encoding="utf-8") as f:
    text = f.read()
  i = int(len(text) * 0.9)
  rest = text[i:]
  j = int(len(rest) * 0.5)
  splits = {"train": text[:i], "validation": rest[:j], "test": rest[j:]}

  class TextSplits(seqio.DataSource):
    """One example per split, the whole of it; one shard."""

    @property
    def supports_arbitrary_sharding(self) -> bool:
      return False

    def list_shards(self, split: str) -> list[str]:
      return [split]

    def get_dataset(
        self,
        split: str = "train",
        shuffle: bool = True,
        seed=None,
        shard_info=None,
        *,
        sequence_length=None,
        use_cached=False,
        num_epochs=1,
    ):
      del shuffle, seed, shard_info, sequence_length, use_cached, num_epochs
      return tf.data.Dataset.from_tensors({"text": splits[split]})

  return TextSplits(splits=list(splits))


SHIPPED_TFDS = {
    "c4/en:3.1.0": _shipped_c4,
    "c4/en": _shipped_c4,
    "tiny_shakespeare:1.0.0": _shipped_tiny_shakespeare,
    "tiny_shakespeare": _shipped_tiny_shakespeare,
}


@contextlib.contextmanager
def _tfds_quiet():
  """Holds back TFDS's log lines below ERROR (e.g. "Variant folder ... has
  no dataset_info.json" from is_prepared): the caller reports in one line."""
  absl_log = logging.getLogger("absl")
  level = absl_log.level
  absl_log.setLevel(logging.ERROR)
  try:
    yield
  finally:
    absl_log.setLevel(level)


def _tfds_prepared(name: str, data_dir: str | None):
  """(builder, whether the dataset is prepared in data_dir)."""
  tfds = _tfds()
  with _tfds_quiet():
    try:
      builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # DatasetNotFoundError and friends.
      raise UsageError(
          f"unknown TFDS dataset {name!r} (data.tfds_name): "
          f"{str(e).splitlines()[0]}"
      ) from None
    return builder, builder.is_prepared()


def tfds_choice(data_cfg, prepare: bool = False) -> tuple[str | None, bool]:
  """Where data.tfds_name is read from, as (TFDS data dir, shipped):
  data.tfds_data_dir (a folder or gs:// bucket; it must hold the dataset),
  else $TFDS_DATA_DIR if it holds it, else the copy shipped with the package
  (shipped=True: data.use_shipped and a name in SHIPPED_TFDS), else TFDS's
  default folder (~/tensorflow_datasets, data dir None). Where the folder
  read (not the shipped copy) lacks it, `prepare` with data.download=True
  lets TFDS download and prepare it there; otherwise its absence is a
  UsageError saying how to get it. Only reads the dataset's metadata."""
  name = data_cfg.tfds_name
  configured = resolve_path(keys.of(data_cfg, "data.tfds_data_dir"))
  data_dir = configured or os.environ.get("TFDS_DATA_DIR") or None
  shipped = keys.of(data_cfg, "data.use_shipped") and name in SHIPPED_TFDS
  if data_dir is not None or not shipped:
    builder, prepared = _tfds_prepared(name, data_dir)
    if prepared:
      return data_dir, False
    if prepare and keys.of(data_cfg, "data.download"):
      builder.download_and_prepare()
      return data_dir, False
    if configured or not shipped:
      raise UsageError(_missing(name, data_dir, builder.data_dir))
  return None, True


def check_available(data_cfg) -> None:
  """The TFDS dataset a config reads is there (`tfds_choice`; prepared
  first with data.download=True), else one-line UsageError: asked before
  any compile or write."""
  if not (
      keys.of(data_cfg, "data.train_files")
      and keys.of(data_cfg, "data.eval_files")
  ):
    tfds_choice(data_cfg, prepare=True)


def tfds_source(data_cfg):
  """The seqio source of data.tfds_name, read where `tfds_choice` says."""
  seqio = _seqio()
  data_dir, shipped = tfds_choice(data_cfg, prepare=True)
  if shipped:
    return SHIPPED_TFDS[data_cfg.tfds_name]()
  return seqio.TfdsDataSource(data_cfg.tfds_name, tfds_data_dir=data_dir)


def tfds_files(data_cfg) -> dict[str, list[tuple[str, int | None]]]:
  """{split: [(file, records it should hold, if known)]} of the files
  data.tfds_name is read from (`tfds_choice`): the TFDS splits' shards and
  the record counts of their dataset_info.json, or the shipped text."""
  tfds = _tfds()
  name = data_cfg.tfds_name
  data_dir, shipped = tfds_choice(data_cfg)
  if shipped and name.startswith("tiny_shakespeare"):
    text = shipped_path(TINY_SHAKESPEARE_TXT)  # One file, split on reading.
    return {s: [(text, None)] for s in ("train", "validation", "test")}
  if shipped:
    data_dir = shipped_path(SHIPPED_TFDS_DIR)
  info = tfds.builder(name, data_dir=data_dir).info
  splits = {k: info.splits[k] for k in sorted(info.splits.keys())}
  return {
      k: [(str(p), int(n)) for p, n in zip(v.filepaths, v.shard_lengths)]
      for k, v in splits.items()
  }


def _missing(name: str, data_dir: str | None, looked: str) -> str:
  """The one line for a TFDS dataset that is not there."""
  where = (
      "TFDS's default folder"
      if data_dir is None
      else f"TFDS data dir {data_dir!r}"
  )
  shipped = (
      f"; a copy ships with the package: --config.data.use_shipped="
      "True"
      + (" (C4: a 1,000-document subset)" if name.startswith("c4") else "")
      if name in SHIPPED_TFDS
      else ""
  )
  return (
      f"dataset {name!r} not found in {where} (looked in {looked}); set "
      "TFDS_DATA_DIR or --config.data.tfds_data_dir to the folder or "
      "gs:// bucket holding it prepared, or pass "
      "--config.data.download=True to let TFDS download and prepare it"
      f"{shipped}"
  )


def make_task(data_cfg, *, split_files: str = ""):
  """The seqio Task for a config: TFDS name, or text files when given."""
  seqio = _seqio()
  vocab = make_vocab(data_cfg.vocab)
  preprocessors = [
      functools.partial(seqio.preprocessors.rekey, key_map={"targets": "text"}),
      seqio.preprocessors.tokenize,
  ]
  if keys.of(data_cfg, "data.add_bos"):
    bos = bos_id(vocab)
    if bos is None:
      raise UsageError(
          f"data.add_bos=True but the vocabulary {data_cfg.vocab!r} has no "
          "BOS piece; set --config.data.add_bos=False (documents are then "
          "closed with EOS only)"
      )
    preprocessors.append(functools.partial(_prepend, token=bos))
  preprocessors.append(seqio.preprocessors.append_eos)
  if split_files:
    source = _file_source(split_files, keys.of(data_cfg, "data.text_column"))
    name = "files"
  else:
    source = tfds_source(data_cfg)
    name = data_cfg.tfds_name
  return seqio.Task(
      name.replace("/", "_").replace(":", "_"),
      source=source,
      output_features={"targets": seqio.Feature(vocab, add_eos=True)},
      preprocessors=preprocessors,
  )


def _model_task(cfg, split_files: str):
  """make_task, for a model whose embedding must hold every token id."""
  task = make_task(cfg.data, split_files=split_files)
  size = task.output_features["targets"].vocabulary.vocab_size
  if cfg.model.V < size:
    raise UsageError(
        f"model.V={cfg.model.V} is smaller than the {size} tokens of the "
        f"vocabulary {cfg.data.vocab!r} (data.vocab): larger ids would fall "
        f"outside the embedding; set --config.model.V={size} or more"
    )
  return task


def _prepend(ds, token: int):
  """BOS in front of every tokenized document (before EOS is appended)."""
  tf = _tf()
  return ds.map(
      lambda ex: {
          **ex,
          "targets": tf.concat(
              [tf.constant([token], ex["targets"].dtype), ex["targets"]], 0
          ),
      }
  )


def check_split(task, split: str) -> None:
  if split not in task.source.splits:
    raise UsageError(
        f"split {split!r} is not in {sorted(task.source.splits)}"
        " (data.eval_split)"
    )


def _pieces(tokens, piece: int = 4096):
  """A document as consecutive slices of <= piece tokens (rebatch is
  quadratic in the length of one element, so long documents are cut first)."""
  tf = _tf()
  k = (tf.size(tokens, out_type=tf.int64) + piece - 1) // piece
  return tf.data.Dataset.range(k).map(
      lambda i: tokens[i * piece : (i + 1) * piece]
  )


def row_length(seq_len: int, packing: str) -> int:
  """Tokens per packed row: L (nanodo) or L+1 (shifted)."""
  return seq_len if packing == "nanodo" else seq_len + 1


def pack(ds, seq_len: int, packing: str = "nanodo"):
  """Concatenate framed documents and cut rows (`row_length` tokens)."""
  ds = ds.flat_map(lambda ex: _pieces(ex["targets"]))
  return ds.rebatch(row_length(seq_len, packing), drop_remainder=True)


def _to_batch(rows, packing: str = "nanodo", pad_id: int = 0):
  """Rows -> inputs, targets and weights (0 where the target is padding)."""
  tf = _tf()
  if packing == "nanodo":  # Nanodo's get_in_out.
    inputs = rows
    targets = tf.concat(
        [
            rows[:, 1:],
            tf.fill([tf.shape(rows)[0], 1], tf.cast(pad_id, rows.dtype)),
        ],
        1,
    )
  else:
    inputs, targets = rows[:, :-1], rows[:, 1:]
  return {
      "inputs": inputs,
      "targets": targets,
      "weights": tf.cast(tf.not_equal(targets, pad_id), tf.float32),
  }


def _shard_info():
  seqio = _seqio()
  return seqio.ShardInfo(
      index=jax.process_index(), num_shards=jax.process_count()
  )


def _read_plan(task, split: str):
  """(shard_info for seqio, shard_info for packed rows): how this process
  gets its own part of `split`.

  seqio shards a source by files, or else by documents; a split with fewer
  files than processes (tiny_shakespeare: 1 file, 1 document) would leave
  some processes with nothing. Then every process reads the whole split and
  keeps every n-th packed row instead.
  """
  info = _shard_info()
  if info.num_shards == 1:
    return None, None
  source = task.source
  if (
      source.supports_arbitrary_sharding
      or len(source.list_shards(split=split)) >= info.num_shards
  ):
    return info, None
  return None, info


def _host_batch_size(global_batch_size: int) -> int:
  n = jax.process_count()
  if global_batch_size % n:
    raise UsageError(
        f"batch size {global_batch_size} is not divisible by the "
        f"{n} processes"
    )
  return global_batch_size // n


def train_dataset(cfg, seed: int):
  """Infinite, shuffled (by `seed`), packed training batches for this host."""
  task = _model_task(
      cfg, keys.of(cfg.data, "data.train_files")
  )  # Checks first.
  tf = _tf()
  split = keys.of(cfg.data, "data.train_split")
  by_source, by_rows = _read_plan(task, split)
  ds = task.get_dataset(
      sequence_length=None,
      split=split,
      shuffle=True,
      seed=seed,
      num_epochs=1,
      use_cached=False,
      shard_info=by_source,
  )
  # Repeat after seqio's document shuffle: a corpus of few long documents
  # (tiny_shakespeare is one) must not be re-tokenized to fill its buffer.
  packing = keys.of(cfg.data, "data.packing")
  ds = pack(ds.repeat(), cfg.model.L, packing)
  if by_rows:
    ds = ds.shard(by_rows.num_shards, by_rows.index)
  ds = ds.shuffle(keys.of(cfg.data, "data.shuffle_buffer"), seed=seed + 1)
  ds = ds.batch(_host_batch_size(cfg.data.batch_size), drop_remainder=True)
  ds = ds.map(functools.partial(_to_batch, packing=packing))
  options = tf.data.Options()
  options.deterministic = True
  options.experimental_external_state_policy = (
      tf.data.experimental.ExternalStatePolicy.IGNORE
  )
  return ds.with_options(options).prefetch(2)


class TrainIterator:
  """Numpy batches from a tf.data pipeline whose position can be saved.
  `source` (a `Source`): a read error is DataError naming it."""

  def __init__(self, ds, source: Source | None = None):
    tf = _tf()
    self._it = iter(ds)
    self._ckpt = tf.train.Checkpoint(iterator=self._it)
    self._source = source

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    with reading(self._source):
      return {k: v.numpy() for k, v in next(self._it).items()}

  def save(self, directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    self._ckpt.write(os.path.join(directory, f"process_{jax.process_index()}"))

  def restore(self, directory: str) -> None:
    self._ckpt.read(
        os.path.join(directory, f"process_{jax.process_index()}")
    ).assert_consumed()


def eval_batches(cfg) -> list[dict[str, np.ndarray]]:
  """The fixed evaluation set, read in order.

  per_document (Nanodo's evaluator): one document per row, framed like the
  training documents, padded with 0 (unscored) or cut to L; the first
  eval_steps batches of at most one pass of the split (the last batch padded
  with empty rows, so every document read counts). packed: the first
  eval_steps batches of packed rows (the split repeats if it is shorter).
  """
  with reading(Source(cfg.data, "eval")):
    return _eval_batches(cfg)


def _eval_batches(cfg) -> list[dict[str, np.ndarray]]:
  task = _model_task(cfg, keys.of(cfg.data, "data.eval_files"))
  split = (
      "train" if keys.of(cfg.data, "data.eval_files") else cfg.data.eval_split
  )
  check_split(task, split)
  by_source, by_rows = _read_plan(task, split)
  ds = task.get_dataset(
      sequence_length=None,
      split=split,
      shuffle=False,
      num_epochs=1,
      use_cached=False,
      shard_info=by_source,
  )
  batch_size = _host_batch_size(cfg.data.eval_batch_size)
  if keys.of(cfg.data, "data.eval_mode") == "per_document":
    return _document_batches(
        ds, cfg.model.L, batch_size, by_rows, cfg.data.eval_steps
    )
  packing = keys.of(cfg.data, "data.packing")
  ds = pack(ds.repeat(), cfg.model.L, packing)
  if by_rows:
    ds = ds.shard(by_rows.num_shards, by_rows.index)
  ds = ds.batch(batch_size, drop_remainder=True).map(
      functools.partial(_to_batch, packing=packing)
  )
  return [
      {k: v.numpy() for k, v in b.items()} for b in ds.take(cfg.data.eval_steps)
  ]


def _document_batches(
    ds, seq_len: int, batch_size: int, by_rows, num_batches: int
) -> list[dict[str, np.ndarray]]:
  """Per-document eval batches (see `eval_batches`); every process returns
  the same number of batches (empty ones where its shard ran out)."""
  tf = _tf()
  ds = ds.map(lambda ex: ex["targets"][:seq_len])
  if by_rows:
    ds = ds.shard(by_rows.num_shards, by_rows.index)
  ds = ds.padded_batch(
      batch_size,
      padded_shapes=[seq_len],
      padding_values=tf.constant(0, tf.int32),
  )
  rows = [r.numpy() for r in ds.take(num_batches)]
  count = _agree_on_count(len(rows))
  if not rows and count == 0:
    raise UsageError(
        "the eval split has no documents; check data.eval_split"
        " / data.eval_files"
    )
  out = []
  for i in range(count):
    r = rows[i] if i < len(rows) else np.zeros((0, seq_len), np.int32)
    r = np.concatenate(
        [r, np.zeros((batch_size - len(r), seq_len), r.dtype)]
    ).astype(np.int32)
    out.append({k: np.asarray(v) for k, v in _to_batch(r, "nanodo").items()})
  return out


def _agree_on_count(n: int) -> int:
  """The largest n over processes (all must run the same eval steps)."""
  if jax.process_count() == 1:
    return n
  return int(np.max(multihost_utils.process_allgather(np.int32(n))))


def target_bytes(vocab: str, V: int):
  """`(inputs, targets) -> bytes` [B, L] (jnp): the UTF-8 bytes each target
  token adds to the decoded text of its document, for bits per byte
  (`evaluate.make_eval_step`).

  A token's bytes are those of its piece as the vocabulary decodes it:
  one per byte of the byte vocabulary; a SentencePiece piece's UTF-8 bytes
  with its word marker U+2581 as a space (one byte), except the space
  SentencePiece puts in front of a document (its dummy prefix, removed when
  decoding), i.e. on a piece right after BOS or EOS. Special pieces (pad,
  EOS, BOS) and unknown pieces (whose source text is lost) add none, nor do
  ids beyond the vocabulary. Summed over a document's targets this is the
  length of `decode(ids)` in UTF-8 (SentencePiece's normalisation, e.g. of
  whitespace, included).
  """
  v = make_vocab(vocab)
  bytes_V = np.zeros(V, np.int32)
  prefix_V = np.zeros(V, np.int32)
  starts_doc_V = np.zeros(V, np.int32)
  tokenizer = getattr(v, "tokenizer", None)
  if tokenizer is None:  # seqio.ByteVocabulary: specials, then 256 bytes.
    bytes_V[v.vocab_size - 256 : v.vocab_size] = 1
  else:
    a = tokenizer.encode("a")
    strips = (
        tokenizer.id_to_piece(a[0]).startswith("\u2581")
        and tokenizer.decode(a) == "a"
    )
    for i in range(min(tokenizer.get_piece_size(), V)):
      if tokenizer.is_control(i) or tokenizer.is_unknown(i):
        continue
      if tokenizer.is_byte(i):
        bytes_V[i] = 1
        continue
      piece = tokenizer.id_to_piece(i)
      bytes_V[i] = len(piece.replace("\u2581", " ").encode("utf-8"))
      prefix_V[i] = strips and piece.startswith("\u2581")
    for special in (bos_id(v), v.eos_id):
      if special is not None and special < V:
        starts_doc_V[special] = 1
  bytes_V, prefix_V, starts_doc_V = map(
      jnp.asarray, (bytes_V, prefix_V, starts_doc_V)
  )

  def fn(inputs_BxL, targets_BxL):
    return (
        bytes_V[targets_BxL] - prefix_V[targets_BxL] * starts_doc_V[inputs_BxL]
    )

  return fn


def vocab_size(vocab: str) -> int:
  return make_vocab(vocab).vocab_size


def decode(vocab: str, ids: Any) -> str:
  return make_vocab(vocab).decode(np.asarray(ids).tolist())


# ------------------------------------------------------------ damaged data

# sysexits.h EX_DATAERR: the data could not be read (a damaged shard).
EXIT_DATA_ERROR = 65


class DataError(Exception):
  """Reading the input data failed: one line naming the dataset, the split
  and, where it can be found, the damaged file."""


class Source:
  """The data a run reads for `kind` ("train" or "eval"), as the user named
  it: `name` (TFDS dataset or file glob), `split`, and `shards()`."""

  def __init__(self, data_cfg, kind: str):
    self.data_cfg, self.kind = data_cfg, kind
    self.files = keys.of(data_cfg, f"data.{kind}_files")
    if self.files:
      self.name, self.split = f"files {self.files!r}", kind
    else:
      self.name = f"TFDS dataset {data_cfg.tfds_name!r}"
      self.split = (
          keys.of(data_cfg, "data.train_split")
          if kind == "train"
          else data_cfg.eval_split
      )

  def shards(self) -> list[tuple[str, int | None]]:
    """(file, records it should hold, if known) of every shard of the
    split: the glob's files, or the TFDS split's (`tfds_files`)."""
    if self.files:
      return [(f, None) for f in sorted(glob.glob(resolve_path(self.files)))]
    return tfds_files(self.data_cfg)[self.split]

  def error(self, e: Exception) -> DataError:
    """The DataError for read error `e`: the damaged file is looked for by
    reading the split's shards in order (`check_shard`) up to a byte budget
    (a user's dataset may be terabytes: `nanodo-sam data --check` reads
    all)."""
    cause = _error_text(e)
    where = ""
    try:
      found = find_damaged(self.shards())
    except Exception:  # pylint: disable=broad-except
      found = None
    if found and found[0]:
      where = f" in {found[0]}" + (
          "" if cause in found[1] else f" ({found[1]})"
      )
    elif found is not None:
      where = (
          " (the damaged file was not found in the first "
          f"{_BUDGET >> 30} GiB: `nanodo-sam data --check` reads all)"
      )
    return DataError(
        f"reading the {self.split} split of {self.name} failed{where}: "
        f"{cause} ({type(e).__name__}); replace the damaged file (`nanodo-sam"
        " data --check --config=...` lists every damaged one), then run the "
        "same command again"
    )


def reading(source: Source | None) -> _Reading:
  """Context: a TensorFlow read error (tf.errors.OpError: a truncated or
  corrupted record, a bad gzip stream, a parse error) becomes the source's
  DataError."""
  return _Reading(source)


class _Reading:

  def __init__(self, source: Source | None):
    self.source = source

  def __enter__(self):
    return self

  def __exit__(self, kind, e, tb):
    if self.source is None or e is None:
      return False
    import tensorflow as tf  # Loaded by now: the error is TensorFlow's.

    if isinstance(e, tf.errors.OpError) and not isinstance(
        e, tf.errors.OutOfRangeError
    ):
      raise self.source.error(e) from None
    return False


_BUDGET = 1 << 30  # bytes read to find a damaged shard after a read error


def find_damaged(shards, budget: int = _BUDGET):
  """(file, why) of the first damaged shard, ("", "") if none was found
  within `budget` bytes of reading, None if every shard is sound."""
  used = 0
  for path, expected in shards:
    why = check_shard(path, expected)
    if why:
      return path, why
    used += os.path.getsize(path) if os.path.exists(path) else 0
    if used > budget:
      return "", ""
  return None


def check_shard(
    path: str, expected: int | None = None, text_column: str = "text"
) -> str | None:
  """Reads one shard once; None if it is sound, else why not. TFRecord
  files: every record with its checksums, and the count against
  `expected` (a file cut at a record boundary); JSON lines (.gz): every
  line parsed, with `text_column`; parquet: every row group's column;
  text: every byte."""
  tf = _tf()
  try:
    if not os.path.exists(path) and "://" not in path:
      return "missing"
    if ".tfrecord" in os.path.basename(path):
      n = int(
          tf.data.TFRecordDataset(path).reduce(
              np.int64(0), lambda count, _: count + 1
          )
      )
      if expected is not None and n != expected:
        return f"{n} records, its dataset_info.json says {expected}"
      return None
    stem = path[:-3] if path.endswith(".gz") else path
    if stem.endswith((".jsonl", ".json")):
      return _check_json_lines(path, text_column)
    if path.endswith(PARQUET):
      pq = _parquet()
      with pq.ParquetFile(path) as pf:
        for g in range(pf.metadata.num_row_groups):
          pf.read_row_group(g, columns=[text_column])
      return None
    with tf.io.gfile.GFile(path, "rb") as f:
      while f.read(1 << 24):
        pass
    return None
  except Exception as e:  # pylint: disable=broad-except
    return f"{type(e).__name__}: {_error_text(e)}"


def _error_text(e: Exception) -> str:
  """The first line of a (TensorFlow) error, without TF's op decorations."""
  lines = (getattr(e, "message", "") or str(e)).strip().splitlines()
  text = re.sub(
      r"\{\{function_node [^}]*\}\}\s*",
      "",
      lines[0] if lines else type(e).__name__,
  )
  return re.sub(r"\s*\[Op:[^\]]*\].*$", "", text)[:300]


def _check_json_lines(path: str, text_column: str) -> str | None:
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rb") as f:
    for i, line in enumerate(f, 1):  # (a blank line fails training too)
      try:
        doc = json.loads(line)
      except ValueError as e:
        return f"line {i}: not JSON ({e})"
      if not isinstance(doc, dict) or not isinstance(doc.get(text_column), str):
        return f"line {i}: no text in {text_column!r}"
  return None


def validate(data_cfg) -> None:
  """The data.* keys fit together; UsageError (one line) otherwise."""
  if data_cfg.add_bos and data_cfg.vocab == BYTE_VOCAB:
    raise UsageError(
        "data.add_bos=True but the byte vocabulary has no BOS piece; set "
        "--config.data.add_bos=False (documents are then closed with EOS "
        "only) or use a SentencePiece data.vocab"
    )
