"""A text file split by lines into train.txt and test.txt (the last lines).

Long & Bartlett's (2024) tiny_shakespeare split holds out the last 10,000
lines. A config names the two files (`split_paths`: reads the input, writes
nothing); the data pipeline writes them when it first reads them
(`write_if_missing`), into <cache>/<stem>_<hash of the input>_last<N>/
($NANODO_SAM_CACHE, default ~/.cache/nanodo_sam), once, atomically.
"""

from __future__ import annotations

import hashlib
import os
import re

FILES = ("train.txt", "test.txt")
_FOLDER = re.compile(
    r"(?P<stem>\w+)_(?P<digest>[0-9a-f]{12})_last" r"(?P<lines>\d+)"
)


def cache_dir() -> str:
  return os.path.expanduser(
      os.environ.get(
          "NANODO_SAM_CACHE", os.path.join("~", ".cache", "nanodo_sam")
      )
  )


def _read(raw_file: str, test_lines: int) -> tuple[bytes, list[bytes]]:
  raw_file = os.path.abspath(os.path.expanduser(raw_file))
  if not os.path.isfile(raw_file):
    raise ValueError(
        f"tiny_shakespeare text not found at {raw_file!r}; set "
        "TINY_SHAKESPEARE_TXT to karpathy/char-rnn's "
        "data/tinyshakespeare/input.txt, or unset it for the copy shipped "
        "with the package"
    )
  with open(raw_file, "rb") as f:
    text = f.read()
  lines = text.splitlines(keepends=True)
  if len(lines) <= test_lines:
    raise ValueError(
        f"{raw_file!r} has {len(lines)} lines; the split needs "
        f"more than {test_lines}"
    )
  return text, lines


def _folder(text: bytes, stem: str, cache: str, test_lines: int) -> str:
  digest = hashlib.sha1(text).hexdigest()[:12]
  return os.path.join(cache or cache_dir(), f"{stem}_{digest}_last{test_lines}")


def split_paths(
    raw_file: str,
    test_lines: int,
    cache: str = "",
    stem: str = "tiny_shakespeare",
) -> tuple[str, str]:
  """(train.txt, test.txt) of `raw_file`'s split; writes nothing."""
  text, _ = _read(raw_file, test_lines)
  folder = _folder(text, stem, cache, test_lines)
  return tuple(os.path.join(folder, name) for name in FILES)


def _write_once(path: str, data: bytes) -> None:
  """Writes `data` to `path` unless it already holds exactly that (atomic)."""
  if os.path.isfile(path) and os.path.getsize(path) == len(data):
    with open(path, "rb") as f:
      if f.read() == data:
        return
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, path)


def write_split(
    raw_file: str,
    test_lines: int,
    cache: str = "",
    stem: str = "tiny_shakespeare",
) -> tuple[str, str]:
  """(train.txt, test.txt): all but the last `test_lines` lines, and those;
  written if not there yet. Each file is one document (the data pipeline
  packs it into rows)."""
  text, lines = _read(raw_file, test_lines)
  folder = _folder(text, stem, cache, test_lines)
  os.makedirs(folder, exist_ok=True)
  paths = tuple(os.path.join(folder, name) for name in FILES)
  _write_once(paths[0], b"".join(lines[:-test_lines]))
  _write_once(paths[1], b"".join(lines[-test_lines:]))
  return paths


def write_if_missing(path: str, raw_files: dict[str, str]) -> bool:
  """Writes the split `path` belongs to if `path` is a missing split file
  (`split_paths`) of one of `raw_files` ({stem: input file}); whether it
  wrote. ValueError if the input's hash differs from the folder's."""
  folder, name = os.path.split(path)
  match = _FOLDER.fullmatch(os.path.basename(folder))
  if (
      os.path.exists(path)
      or name not in FILES
      or not match
      or match["stem"] not in raw_files
  ):
    return False
  raw_file, lines = raw_files[match["stem"]], int(match["lines"])
  cache, stem = os.path.dirname(folder), match["stem"]
  if _folder(_read(raw_file, lines)[0], stem, cache, lines) != folder:
    raise ValueError(
        f"{path!r} was named from another input than {raw_file!r} (its "
        "hash differs); set TINY_SHAKESPEARE_TXT as when the config was "
        "loaded, or load the config again"
    )
  write_split(raw_file, lines, cache, stem)
  return True
