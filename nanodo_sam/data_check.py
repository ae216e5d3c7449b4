"""`nanodo-sam data --check`: reads every shard of a config's data once and
lists the damaged ones.

The shards are those of every split of the TFDS dataset (data.tfds_name,
read where training reads it: `data.tfds_choice`), or the files of
data.train_files and data.eval_files. Each is read whole by
`data.check_shard`: TFRecord shards record by record with their checksums
and against the record counts of dataset_info.json, JSON lines parsed,
parquet row groups decoded. Nothing is written.
"""

from __future__ import annotations

import logging
import os
import time

from nanodo_sam import data as data_lib
from nanodo_sam import keys

log = logging.getLogger("nanodo_sam")


def shards(data_cfg) -> list[tuple[str, str, int | None]]:
  """(what: dataset and split, file, records expected or None) of every
  shard the config names, each file once."""
  out, seen = [], set()
  kinds = [k for k in ("train", "eval") if keys.of(data_cfg, f"data.{k}_files")]
  for kind in kinds:
    src = data_lib.Source(data_cfg, kind)
    files = src.shards()
    if not files:
      raise data_lib.UsageError(
          f"no files match {src.files!r} " f"(data.{kind}_files)"
      )
    out += [(f"{src.name}", f, n) for f, n in files]
  if len(kinds) < 2:  # Some split comes from TFDS: check all of its splits.
    for split, files in data_lib.tfds_files(data_cfg).items():
      out += [
          (f"TFDS dataset {data_cfg.tfds_name!r}, split {split}", f, n)
          for f, n in files
      ]
  unique = []
  for what, f, n in out:
    if f not in seen:
      seen.add(f)
      unique.append((what, f, n))
  return unique


def check(data_cfg, echo=print) -> list[tuple[str, str]]:
  """Reads every shard once; echoes one line per damaged shard and a
  summary; returns [(file, why)] of the damaged ones."""
  todo = shards(data_cfg)
  column = keys.of(data_cfg, "data.text_column")
  damaged, size, t0, last = [], 0, time.time(), time.time()
  for i, (what, path, expected) in enumerate(todo, 1):
    why = data_lib.check_shard(path, expected, column)
    if why:
      damaged.append((path, why))
      echo(f"damaged: {path} ({what}): {why}")
    size += os.path.getsize(path) if os.path.exists(path) else 0
    if time.time() - last > 10:
      last = time.time()
      log.info("checked %d of %d shards", i, len(todo))
  echo(
      f"checked {len(todo)} shards ({size / 2**20:.1f} MiB) in "
      f"{time.time() - t0:.1f} s: "
      + (f"{len(damaged)} damaged" if damaged else "all readable")
  )
  return damaged
