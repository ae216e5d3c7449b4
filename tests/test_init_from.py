"""init_from=DIR[:STEP]: a new run starts from another run's parameters with
a fresh optimizer state and step counter; the source is only read; a resumed
run resumes from its own checkpoints; a bad source is one line, exit 2."""

import hashlib
import os
import shutil

import jax
import numpy as np
import pytest

from conftest import read_scalars, tiny_config, tiny_flags
from nanodo_sam import checkpoint
from nanodo_sam import cli
from nanodo_sam import init_from
from nanodo_sam import train as train_lib
from nanodo_sam import train_flops


def test_parse_splits_a_trailing_step_only():
  assert init_from.parse("runs/a") == ("runs/a", None)
  assert init_from.parse("runs/a:20") == ("runs/a", 20)
  assert init_from.parse("runs/a:b") == ("runs/a:b", None)
  assert init_from.parse("/x/y:0") == ("/x/y", 0)


def _cli_fails(capsys, *args):
  with pytest.raises(SystemExit) as e:
    cli.main(list(args))
  err = capsys.readouterr().err.strip().splitlines()
  return e.value.code, err


def test_a_missing_source_is_one_line_exit_2_and_nothing_written(
    tmp_path, capsys
):
  work = tmp_path / "new"
  code, err = _cli_fails(
      capsys,
      "train",
      *tiny_flags(),
      f"--config.init_from={tmp_path / 'nope'}",
      f"--workdir={work}",
  )
  assert code == 2 and len(err) == 1
  assert "init_from" in err[0] and "no directory" in err[0]
  assert not work.exists()


def _digests(root) -> dict:
  out = {}
  for dirpath, _, files in os.walk(root):
    for name in files:
      path = os.path.join(dirpath, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).digest()
  return out


@pytest.fixture
def source(trained_run):
  """conftest's tiny run: checkpoints every 5 steps (5, 10, ... 40)."""
  return trained_run


def _params_at(workdir, step):
  cfg = tiny_config()
  return checkpoint.restore_run(str(workdir), cfg, step).state.params


def _capture_start(seen):
  """A hook that records the state the loop starts from (before a step)."""

  def hook(run, n):
    if "start" not in seen:  # Copied: the step donates its buffers.
      seen["start"] = (n, jax.device_get(run.state))

  return train_lib.Hook(hook, every=1, when=train_lib.BEFORE)


def _stop_after(step):
  def hook(run, n):
    if n == step:
      run.stop.signal = "SIGTERM"

  return train_lib.Hook(hook, every=1)


@pytest.mark.slow
def test_starts_from_source_params_fresh_state_and_reads_only(source, tmp_path):
  before = _digests(source)
  cfg = tiny_config(
      **{"init_from": f"{source}:5", "opt.num_train_steps": 10, "seed": 3}
  )
  seen = {}
  work = tmp_path / "new"
  res = train_lib.train(
      cfg, str(work), hooks=[_capture_start(seen), _stop_after(6)]
  )
  assert res["status"] == "preempted"
  n, state = seen["start"]
  assert n == 0 and int(state.step) == 0
  want = _params_at(source, 5)
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Fresh AdamW moments (the source's are non-zero after 5 steps).
  assert all(
      not np.any(np.asarray(x))
      for x in jax.tree.leaves(state.opt_state)
      if np.ndim(x) > 0
  )
  assert init_from.steps(str(work)) == [6]
  assert _digests(source) == before
  # Resumed: from its own step 6, never reading the source (moved away).
  shutil.move(source, tmp_path / "gone")
  try:
    seen.clear()
    res = train_lib.train(cfg, str(work), hooks=[_capture_start(seen)])
    assert res["status"] == "completed" and res["steps"] == 10
    assert seen["start"][0] == 6 and int(seen["start"][1].step) == 6
    # Its training FLOPs: its own 10 plain steps (not the source's).
    assert res["train_flops"] == train_flops.train_flops(cfg, 10) > 0
    logged = read_scalars(work, "train/flops")["train/flops"]
    assert logged[10] == pytest.approx(res["train_flops"], rel=1e-6)
  finally:
    shutil.move(tmp_path / "gone", source)
  assert _digests(source) == before


@pytest.mark.slow
@pytest.mark.parametrize(
    "override,words",
    [
        ({"model.D": 64, "model.F": 128}, "does not fit this model"),
        (
            {
                "data.vocab": "shipped:c4_t5_sentencepiece_cc_all.32000.100extra.model",
                "model.V": 32101,
            },
            "data.vocab",
        ),
        ({}, "no checkpoint for step 7"),
    ],
)
def test_a_source_that_does_not_fit_is_one_line_exit_2(
    source, tmp_path, capsys, override, words
):
  spec = f"{source}:7" if not override else str(source)
  work = tmp_path / "new"
  code, err = _cli_fails(
      capsys,
      "train",
      *tiny_flags(**override),
      f"--config.init_from={spec}",
      f"--workdir={work}",
  )
  assert code == 2 and len(err) == 1 and words in err[0], err
  assert not work.exists()
