"""Faults beyond kills, injected for real: a truncated checkpoint file, a
disk that fills up during a save (a 12 MB tmpfs), a truncated TFRecord
shard. Each ends in one line (no traceback) and an exit status a script can
act on, and nothing is lost: the run, resumed, ends exactly as the
uninterrupted one (docs/faults.md)."""

import json
import logging
import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import ROOT, listing, tiny_config, tiny_flags
from nanodo_sam import checkpoint
from nanodo_sam import cli
from nanodo_sam import data as data_lib
from nanodo_sam import data_check
from nanodo_sam import runs as runs_lib
from nanodo_sam import state as state_lib
from nanodo_sam import train as train_lib

# 30 steps, an eval and a checkpoint every 10, all kept.
RUN = {
    "opt.num_train_steps": 30,
    "eval_every_steps": 10,
    "checkpoint_every_steps": 10,
    "checkpoint_max_to_keep": 5,
}


def _main(*argv):
  """`nanodo-sam ARGV` in this process; its exit status."""
  with pytest.raises(SystemExit) as e:
    cli.main(list(argv))
    raise SystemExit(0)
  return e.value.code


def _env():
  return dict(os.environ, PYTHONPATH=ROOT)


def _pairs(history):
  return [(int(n), float(loss)) for n, loss in history]


def _final_state(workdir, step=30):
  s = state_lib.setup(tiny_config(**RUN))
  mngr = checkpoint.checkpoint_manager(str(workdir), read_only=True)
  return jax.device_get(checkpoint.restore_state(mngr, s, step))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """The RUN without a fault: (workdir, results)."""
  workdir = tmp_path_factory.mktemp("reference")
  res = train_lib.train(tiny_config(**RUN), str(workdir))
  assert res["status"] == "completed"
  return workdir, res


def _assert_same_run(workdir, reference):
  """Same eval history, final eval loss and final state, bitwise."""
  ref_dir, ref = reference
  res = json.loads((workdir / "results.json").read_text())
  assert res["status"] == "completed" and res["steps"] == 30
  assert _pairs(res["eval_history"]) == _pairs(ref["eval_history"])
  assert [n for n, _ in res["eval_history"]] == [10, 20, 30]
  assert res["final_eval_loss"] == ref["final_eval_loss"]
  a, b = _final_state(workdir), _final_state(ref_dir)
  for x, y in zip(
      jax.tree.leaves((a.params, a.opt_state, a.step)),
      jax.tree.leaves((b.params, b.opt_state, b.step)),
  ):
    np.testing.assert_array_equal(x, y)


def _errors(caplog):
  return [
      r.getMessage()
      for r in caplog.records
      if r.levelno >= logging.WARNING and r.name == "nanodo_sam"
  ]


# --------------------------------------------------- an unreadable checkpoint


def _truncate_largest(step_dir, size=1000) -> str:
  """Truncates the largest file under `step_dir` to `size` bytes (what a
  node dying during a copy to a network filesystem leaves); its path."""
  files = [os.path.join(r, f) for r, _, fs in os.walk(step_dir) for f in fs]
  path = max(files, key=os.path.getsize)
  assert os.path.getsize(path) > size
  with open(path, "r+b") as f:
    f.truncate(size)
  return path


def _killed_after(workdir, step, monkeypatch):
  """Trains RUN in `workdir` until just after checkpoint `step` (the
  process dies as it fetches the batch of step `step` + 5)."""

  class Died(Exception):
    pass

  real_next = data_lib.TrainIterator.__next__
  calls = []

  def dying_next(self):
    calls.append(1)
    if len(calls) == step + 5:
      raise Died()
    return real_next(self)

  monkeypatch.setattr(data_lib.TrainIterator, "__next__", dying_next)
  with pytest.raises(Died):
    train_lib.train(tiny_config(**RUN), str(workdir))
  monkeypatch.setattr(data_lib.TrainIterator, "__next__", real_next)


def test_a_truncated_newest_checkpoint_is_moved_aside_and_the_run_ends_exactly(
    tmp_path, reference, monkeypatch, caplog, capfd
):
  """Killed after checkpoint 20, whose largest file is then cut to 1,000
  bytes: the same command says so in one line, moves it to
  checkpoints/corrupt/20 (the damaged file still there), resumes from
  checkpoint 10 with its data position and ends as the uninterrupted run;
  `nanodo-sam eval` on the damaged run (before that) uses checkpoint 10
  and moves nothing."""
  workdir = tmp_path / "run"
  _killed_after(workdir, 20, monkeypatch)
  cut = _truncate_largest(workdir / "checkpoints" / "20")
  capfd.readouterr()

  caplog.set_level(logging.INFO, logger="nanodo_sam")
  before = listing(workdir)
  assert _main("eval", f"--workdir={workdir}") == 0
  assert (
      json.loads(capfd.readouterr().out.strip().splitlines()[-1])["step"] == 10
  )
  [line] = _errors(caplog)
  assert "checkpoint 20" in line and "cannot be read" in line
  assert "OUT_OF_RANGE" in line and "checkpoint 10" in line
  assert listing(workdir) == before

  caplog.clear()
  assert _main("train", f"--workdir={workdir}", *tiny_flags(**RUN)) == 0
  [line] = _errors(caplog)
  aside = workdir / "checkpoints" / "corrupt" / "20"
  assert (
      f"moved it to {aside}" in line and "resuming from checkpoint 10" in line
  )
  assert "Traceback" not in capfd.readouterr().err
  moved = str(aside) + cut[len(str(workdir / "checkpoints" / "20")) :]
  assert os.path.getsize(moved) == 1000  # Kept as it was, for a look.
  assert (aside / "data_state").is_dir()
  _assert_same_run(workdir, reference)


def test_no_readable_checkpoint_is_one_line_and_moves_nothing(
    tmp_path, monkeypatch, capfd
):
  workdir = tmp_path / "run"
  _killed_after(workdir, 20, monkeypatch)
  for step in (10, 20):
    _truncate_largest(workdir / "checkpoints" / str(step))
  capfd.readouterr()
  before = listing(workdir)
  for argv in (["train", *tiny_flags(**RUN)], ["eval"]):
    assert _main(argv[0], f"--workdir={workdir}", *argv[1:]) == 2
    err = capfd.readouterr().err
    lines = [l for l in err.splitlines() if l.startswith("nanodo-sam")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("nanodo-sam: error: no checkpoint in ")
    assert "step 20: OUT_OF_RANGE" in lines[0]
    assert "step 10: OUT_OF_RANGE" in lines[0]
    assert "nothing was moved" in lines[0]
    assert listing(workdir) == before


# ------------------------------------------------------------- a full disk

# Runs `nanodo-sam train` with the disk filled (a file beside the workdir)
# once checkpoint 10 is written, leaving room for the data position but not
# the state. `precheck`: as it is (the save is refused before it starts);
# `write`: without that check, so the writes themselves fail (orbax's
# asynchronous save, or TensorBoard's events file, whichever comes first).
FILLER = """
import os, shutil, sys
from nanodo_sam import checkpoint, cli, train
mode, workdir = sys.argv[1], sys.argv[2]
if mode == "write":
  checkpoint._check_space = lambda *args: None

def fill(run, n):
  if n != 10:
    return
  run.checkpoint_manager.wait_until_finished()
  position = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in
                 os.walk(checkpoint.data_state_dir(workdir, 10)) for f in fs)
  free = shutil.disk_usage(workdir).free
  with open(os.path.join(os.path.dirname(workdir), "filler"), "wb") as f:
    f.write(bytes(free - position - 100_000))

hooks = train.default_hooks
train.default_hooks = lambda run, d=None: hooks(run, d) + [
    train.Hook(fill, 10)]
cli.main(sys.argv[3:])
"""


@pytest.fixture
def small_disk(tmp_path):
  """A 12 MB tmpfs at tmp_path/disk (needs root and mount permission)."""
  disk = tmp_path / "disk"
  disk.mkdir()
  proc = subprocess.run(
      ["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(disk)],
      capture_output=True,
      text=True,
  )
  if proc.returncode != 0:
    pytest.skip(
        "a size-limited tmpfs cannot be mounted here (needs root "
        f"and CAP_SYS_ADMIN): {proc.stderr.strip()}"
    )
  try:
    yield disk
  finally:
    subprocess.run(["umount", str(disk)], check=False)


@pytest.mark.parametrize(
    "mode",
    [  # End to end, both: a run stopped and resumed.
        pytest.param("precheck", marks=pytest.mark.slow),
        pytest.param("write", marks=pytest.mark.slow),
    ],
)
def test_a_full_disk_ends_in_one_line_exit_74_and_the_same_command_resumes(
    tmp_path, small_disk, reference, mode, caplog
):
  workdir = small_disk / "run"
  script = tmp_path / "filler.py"
  script.write_text(FILLER)
  proc = subprocess.run(
      [
          sys.executable,
          str(script),
          mode,
          str(workdir),
          "train",
          f"--workdir={workdir}",
          *tiny_flags(**RUN),
      ],
      env=_env(),
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=600,
  )
  assert proc.returncode == checkpoint.EXIT_SAVE_FAILED, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  # The run's log lines at WARNING and above: this one. (The format is
  # the CLI's, or Python's default when the driver configured it first.)
  [line] = [
      l
      for l in proc.stderr.splitlines()
      if re.match(
          r"([-\d]+ [\d:,]+ (WARNING|ERROR) |" r"(WARNING|ERROR):nanodo_sam:)",
          l,
      )
  ]
  assert "could not be written in" in line
  assert (
      "not enough free space"
      if mode == "precheck"
      else "no space left on device"
  ) in line
  assert "a checkpoint needs about" in line and "MiB free" in line
  assert "Checkpoint 10 is intact" in line and "same command" in line
  progress = json.loads((workdir / "progress.json").read_text())
  assert progress["status"] == "save_failed"
  assert progress["checkpoint_step"] == 10
  assert progress["error"] in line
  assert not (workdir / "results.json").exists()
  assert runs_lib.read_run(str(workdir)).status == "save_failed"
  assert os.listdir(workdir / "checkpoints") == ["10"]  # No tmp directory.
  assert os.listdir(workdir / "data_state") == ["10"]

  # A leftover of a save that never finished, as a kill during it leaves.
  leftover = workdir / "checkpoints" / "20.orbax-checkpoint-tmp-1234"
  shutil.copytree(workdir / "checkpoints" / "10", leftover)
  (small_disk / "filler").unlink()  # Space again: the same command.
  caplog.set_level(logging.INFO, logger="nanodo_sam")
  assert _main("train", f"--workdir={workdir}", *tiny_flags(**RUN)) == 0
  assert f"removed {leftover}: an unfinished save" in caplog.text
  assert not leftover.exists()
  _assert_same_run(workdir, reference)


# ---------------------------------------------------------- damaged data


C4 = "c4/en:3.1.0"


@pytest.fixture
def tfds_copy(tmp_path):
  """A copy of the C4 subset shipped with the package (never modify it)."""
  root = tmp_path / "tfds"
  shutil.copytree(data_lib.shipped_path(data_lib.SHIPPED_TFDS_DIR), root)
  return root


def c4_flags(tfds_dir) -> list[str]:
  """The tiny run's flags reading C4 (byte vocabulary) from `tfds_dir`."""
  return [
      *tiny_flags(),
      f"--config.data.tfds_name={C4}",
      "--config.data.use_shipped=False",
      f"--config.data.tfds_data_dir={tfds_dir}",
  ]


def _shard(root, split, i=0):
  n = {"train": 8, "validation": 2}[split]
  return (
      root
      / "c4"
      / "en"
      / "3.1.0"
      / f"__local_c4_builder-{split}.tfrecord-{i:05d}-of-{n:05d}"
  )


def _records(root, split, i) -> int:
  """The record count dataset_info.json gives shard i of `split`."""
  with open(root / "c4" / "en" / "3.1.0" / "dataset_info.json") as f:
    info = json.load(f)
  [sp] = [x for x in info["splits"] if x["name"] == split]
  return int(sp["shardLengths"][i])


def test_a_full_disks_unretrieved_write_errors_are_not_printed(caplog):
  """orbax writes a checkpoint's arrays in asyncio tasks; when the disk is
  full, those whose failure nobody awaited reach asyncio's logger ("Task
  exception was never retrieved", with a traceback) after the save has
  failed. The user sees SaveFailed's one line instead; any other error
  still reaches the log."""
  checkpoint._ERRORS.install()  # pylint: disable=protected-access
  full = ValueError(
      "RESOURCE_EXHAUSTED: Error writing ...: Failed to write 164217 bytes "
      "to file 6: No space left on device [os_error_code='28']"
  )
  other = ValueError("something else")
  asyncio_log = logging.getLogger("asyncio")
  with caplog.at_level(logging.ERROR, logger="asyncio"):
    for e in (full, other):
      asyncio_log.error(
          "Task exception was never retrieved", exc_info=(ValueError, e, None)
      )
  assert [r.exc_info[1] for r in caplog.records] == [other]


@pytest.mark.parametrize("split", ["train", "validation"])
def test_a_truncated_shard_is_one_line_naming_dataset_split_and_file(
    tmp_path, tfds_copy, capfd, split
):
  shard = _shard(tfds_copy, split)
  os.truncate(shard, 1000)  # Inside its first record: read at once.
  capfd.readouterr()
  code = _main("train", f"--workdir={tmp_path / 'run'}", *c4_flags(tfds_copy))
  err = capfd.readouterr().err
  assert code == data_lib.EXIT_DATA_ERROR == 65
  assert "Traceback" not in err, err
  [line] = [l for l in err.splitlines() if l.startswith("nanodo-sam")]
  assert line.startswith(
      f"nanodo-sam: error: reading the {split} split of " f"TFDS dataset '{C4}"
  )
  assert f"failed in {shard}: truncated record" in line
  assert "(DataLossError)" in line
  assert "nanodo-sam data --check" in line
  assert not (tmp_path / "run" / "checkpoints" / "10").exists()


def test_data_check_reads_every_shard_and_lists_the_damaged_ones(
    tfds_copy, capfd
):
  flags = c4_flags(tfds_copy)
  capfd.readouterr()
  assert _main("data", "--check", *flags) == 0
  assert "checked 10 shards" in capfd.readouterr().out  # 8 train, 2 val
  # One cut in the middle of a record, one at a record boundary (0 bytes:
  # readable, but short of the records dataset_info.json counts).
  os.truncate(_shard(tfds_copy, "train"), 1000)
  os.truncate(_shard(tfds_copy, "validation", 1), 0)
  assert _main("data", "--check", *flags) == data_lib.EXIT_DATA_ERROR
  out = capfd.readouterr().out.splitlines()
  damaged = {l.split()[1]: l for l in out if l.startswith("damaged: ")}
  train, val = (
      str(_shard(tfds_copy, "train")),
      str(_shard(tfds_copy, "validation", 1)),
  )
  assert sorted(damaged) == sorted([train, val])
  assert "split train): DataLossError: truncated record" in damaged[train]
  n = _records(tfds_copy, "validation", 1)
  assert n > 0
  assert (
      f"split validation): 0 records, its dataset_info.json says {n}"
      in damaged[val]
  )
  assert out[-1].startswith("checked 10 shards") and "2 damaged" in out[-1]


def test_data_check_of_file_corpora(tmp_path):
  """JSON lines (.gz cut short, a line that is not JSON) and parquet."""
  import gzip
  import pyarrow as pa
  import pyarrow.parquet as pq

  docs = [json.dumps({"text": f"document {i} " * 50}) for i in range(200)]
  good = tmp_path / "a.jsonl.gz"
  good.write_bytes(gzip.compress("\n".join(docs).encode()))
  cut = tmp_path / "b.jsonl.gz"
  cut.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
  bad = tmp_path / "c.jsonl"
  bad.write_text(docs[0] + "\n{not json\n")
  cfg = tiny_config(**{"data.train_files": str(tmp_path / "*.jsonl*")})
  damaged = data_check.check(cfg.data, echo=lambda _: None)
  assert [os.path.basename(f) for f, _ in damaged] == ["b.jsonl.gz", "c.jsonl"]
  assert "EOFError" in damaged[0][1]
  assert damaged[1][1].startswith("line 2: not JSON")

  pq.write_table(
      pa.table({"text": [f"doc {i}" for i in range(100)]}),
      tmp_path / "d.parquet",
      row_group_size=10,
  )
  data = (tmp_path / "d.parquet").read_bytes()
  (tmp_path / "e.parquet").write_bytes(data[: len(data) // 2])
  assert data_lib.check_shard(str(tmp_path / "d.parquet")) is None
  assert "ArrowInvalid" in data_lib.check_shard(str(tmp_path / "e.parquet"))
