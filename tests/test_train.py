"""The training loop: a real short run, exact resume (after kills at any
point and after SIGTERM), divergence, methods, hooks."""

import collections
import json
import logging
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import ROOT, crash_then_resume, listing, read_scalars, tiny_config, tiny_flags
from nanodo_sam import checkpoint
from nanodo_sam import cli
from nanodo_sam import data as data_lib
from nanodo_sam import optimizer as optimizer_lib
from nanodo_sam import preemption
from nanodo_sam import runs as runs_lib
from nanodo_sam import sam_schedule
from nanodo_sam import state as state_lib
from nanodo_sam import sweep as sweep_lib
from nanodo_sam import train as train_lib


def _params(workdir, cfg, step=None):
  s = state_lib.setup(cfg)
  mngr = checkpoint.checkpoint_manager(str(workdir), read_only=True)
  return s, jax.device_get(checkpoint.restore_state(mngr, s, step))


def _steps(workdir):
  return sorted(
      checkpoint.checkpoint_manager(str(workdir), read_only=True).all_steps()
  )


def _pairs(history):
  return [(int(n), float(loss)) for n, loss in history]


def _no_constant(name):
  raise ValueError(f"not strict JSON: {name}")


def _strict_json(path):
  """The file parsed by a strict JSON parser (a bare NaN raises)."""
  with open(path) as f:
    return json.loads(f.read(), parse_constant=_no_constant)


def _main(*argv):
  """`nanodo-sam ARGV` in this process; its exit status."""
  with pytest.raises(SystemExit) as e:
    cli.main(list(argv))
    raise SystemExit(0)
  return e.value.code


def test_short_tiny_shakespeare_run_lowers_eval_loss(tmp_path):
  cfg = tiny_config(
      **{
          "opt.num_train_steps": 60,
          "eval_every_steps": 20,
          "opt.peak_learning_rate": 1e-2,
      }
  )
  res = train_lib.train(cfg, str(tmp_path))
  losses = [l for _, l in res["eval_history"]]
  assert res["status"] == "completed" and res["steps"] == 60
  # An untrained model scores log(259) = 5.56 nats; eval loss falls at every
  # evaluation and ends far below that.
  assert len(losses) == 3 and losses[0] > losses[1] > losses[2]
  assert losses[-1] < np.log(259) - 1.5
  on_disk = json.load(open(tmp_path / "results.json"))
  for key in (
      "final_eval_loss",
      "best_eval_loss",
      "steps",
      "tokens",
      "method",
      "rho",
      "peak_learning_rate",
      "model_size",
      "wall_seconds",
      "status",
  ):
    assert key in on_disk
  assert on_disk["tokens"] == 60 * 8 * 32
  assert json.load(open(tmp_path / "config.json"))["model"]["D"] == 32
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path))


@pytest.mark.slow  # End-to-end training runs.
def test_interrupted_run_resumes_bitwise_identically(tmp_path, monkeypatch):
  """Preconditioned F-SAM every 3rd step with sam.reuse: the checkpoint at
  step 10 falls between two full steps, so the resumed run must restore the
  carried difference (TrainState.reuse) as well as params and optimizer."""
  cfg = tiny_config(
      **{
          "sam.method": "precond_functional_sam",
          "sam.rho": 0.05,
          "sam.every_k": 3,
          "sam.reuse": True,
      }
  )
  full = train_lib.train(cfg, str(tmp_path / "full"))

  # Dies mid-run at its 15th batch, after the step-10 checkpoint.
  resumed = crash_then_resume(monkeypatch, cfg, str(tmp_path / "resumed"), 15)

  assert resumed["final_eval_loss"] == full["final_eval_loss"]
  assert resumed["eval_history"][-1] == full["eval_history"][-1]
  _, a = _params(tmp_path / "full", cfg)
  _, b = _params(tmp_path / "resumed", cfg)
  assert int(a.step) == int(b.step) == 20
  assert float(a.reuse.grad_norm) > 0
  for x, y in zip(
      jax.tree.leaves((a.params, a.opt_state, a.reuse)),
      jax.tree.leaves((b.params, b.opt_state, b.reuse)),
  ):
    np.testing.assert_array_equal(x, y)


@pytest.mark.slow  # End-to-end training runs.
def test_non_finite_loss_keeps_only_checkpoints_whose_loss_was_finite(
    tmp_path, capsys, caplog
):
  """SGD at a learning rate that blows up within a few steps, a checkpoint
  after every step: the checkpoint of the state whose loss came back NaN is
  dropped, so the newest kept one had a finite loss and evaluates finite;
  the message names it; results.json is strict JSON; started again the run
  is done; with other settings it goes on from the kept checkpoint."""
  boom = dict(
      **{
          "opt.optimizer": "sgd",
          "opt.weight_decay": 0.0,
          "opt.warmup_steps": 0,
          "opt.decay_type": "constant",
          "opt.num_train_steps": 40,
          "opt.peak_learning_rate": 1e4,
          "checkpoint_every_steps": 1,
          "eval_every_steps": 0,
      }
  )
  caplog.set_level(logging.INFO, logger="nanodo_sam")
  cfg = tiny_config(**boom)
  workdir = tmp_path / "boom"
  res = train_lib.train(cfg, str(workdir))
  assert res["status"] == "diverged"
  bad = res["steps"]  # Steps 0..bad-1 had a finite loss; step `bad` not.
  kept = res["checkpoint_step"]
  assert kept is not None and kept >= 1, "no good checkpoint to test"
  # The newest checkpoint_max_to_keep=3, the diverged state's gone.
  assert kept == bad - 1
  assert _steps(workdir) == list(range(max(1, kept - 2), kept + 1))
  assert f"at step {bad}; kept checkpoint: step {kept}" in caplog.text
  on_disk = _strict_json(workdir / "results.json")
  assert on_disk["status"] == "diverged" and on_disk["final_eval_loss"] is None
  assert on_disk["checkpoint_step"] == kept
  assert _main("eval", f"--workdir={workdir}") == 0
  out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert out["step"] == kept and np.isfinite(out["eval_loss"])

  before = listing(workdir)  # Started again: done, nothing touched.
  assert train_lib.train(cfg, str(workdir)) == on_disk
  assert listing(workdir) == before

  # Other settings, from the kept checkpoint (results.json removed).
  os.remove(workdir / "results.json")
  calm = tiny_config(**{**boom, "opt.peak_learning_rate": 1e-3})
  res = train_lib.train(calm, str(workdir))
  assert res["status"] == "completed" and res["steps"] == 40
  assert np.isfinite(res["final_eval_loss"])
  assert "Resumed from step %d" % kept in caplog.text

  # Rare checkpoints: none was written before the loss went NaN.
  cfg = tiny_config(**{**boom, "checkpoint_every_steps": 20})
  res = train_lib.train(cfg, str(tmp_path / "rare"))
  assert res["status"] == "diverged" and res["checkpoint_step"] is None
  assert _steps(tmp_path / "rare") == []
  assert "no checkpoint is kept" in caplog.text
  assert (
      _strict_json(tmp_path / "rare" / "results.json")["best_eval_loss"] is None
  )


@pytest.mark.parametrize(
    "method,extra",
    [
        ("sam", {}),
        ("functional_sam", {}),
        ("logit_sam", {}),
        ("angle_sam", {"sam.phi": 0.5}),
        ("precond_sam", {}),
    ],
)
@pytest.mark.slow  # End-to-end training runs.
def test_each_method_trains_and_logs_its_metrics(tmp_path, method, extra):
  cfg = tiny_config(
      **{
          "sam.method": method,
          "sam.rho": 0.05,
          "opt.num_train_steps": 6,
          "eval_every_steps": 0,
          "checkpoint_every_steps": 0,
          "log_every_steps": 3,
          **extra,
      }
  )
  res = train_lib.train(cfg, str(tmp_path))
  assert res["status"] == "completed" and res["method"] == method
  assert np.isfinite(res["final_eval_loss"])
  from tensorboard.backend.event_processing import event_accumulator

  acc = event_accumulator.EventAccumulator(str(tmp_path))
  acc.Reload()
  tags = set(acc.Tags()["tensors"]) | set(acc.Tags()["scalars"])
  for key in ("loss", "grad_norm", "perturbation_norm", "rho", "cosine"):
    assert f"train/{key}" in tags


def test_schedules_choose_the_step_on_the_host():
  cfg = tiny_config(
      **{
          "sam.method": "sam",
          "sam.rho": 0.1,
          "sam.start_step": 4,
          "sam.every_k": 3,
          "sam.end_step": 12,
      }
  )
  used = [s for s in range(16) if sam_schedule.uses_sam_step(cfg.sam, s)]
  assert used == [4, 7, 10]
  cfg.sam.reuse = True  # The steps in between, inside [start, end), reuse.
  kinds = "".join(sam_schedule.step_kind(cfg.sam, s)[0] for s in range(16))
  assert kinds == "ppppsrrsrrsrpppp"
  cfg.sam.rho_warmup_steps = 10
  rhos = [float(sam_schedule.rho_at(cfg.sam, s)) for s in (0, 4, 9, 20)]
  np.testing.assert_allclose(rhos, [0.01, 0.05, 0.1, 0.1], rtol=1e-6)


@pytest.mark.slow  # End-to-end training runs.
def test_profile_writes_a_trace_of_its_steps(tmp_path, caplog):
  """profile.num_steps=2 from step 1 of a 4-step run: a trace TensorBoard's
  profile plugin reads (plugins/profile/<time>/*.xplane.pb) and its log line;
  a window past the end is closed when the run ends."""
  caplog.set_level(logging.INFO, logger="nanodo_sam")
  cfg = tiny_config(
      **{
          "opt.num_train_steps": 4,
          "eval_every_steps": 0,
          "checkpoint_every_steps": 0,
          "profile.start_step": 1,
          "profile.num_steps": 2,
      }
  )
  assert train_lib.train(cfg, str(tmp_path / "a"))["status"] == "completed"
  traces = list((tmp_path / "a" / "plugins" / "profile").glob("*/*.xplane.pb"))
  assert len(traces) == 1 and traces[0].stat().st_size > 0
  assert "profile of steps 1-2 written to" in caplog.text
  cfg.profile.start_step, cfg.profile.num_steps = 3, 10
  assert train_lib.train(cfg, str(tmp_path / "b"))["status"] == "completed"
  assert list((tmp_path / "b" / "plugins" / "profile").glob("*/*.xplane.pb"))


@pytest.mark.slow  # End-to-end training runs.
def test_wandb_offline_logs_and_a_resumed_run_continues_its_wandb_run(
    tmp_path, monkeypatch
):
  """Killed after its step-2 checkpoint and resumed, the run logs into the
  same wandb run: both attempts carry the id kept in the workdir."""
  monkeypatch.setenv("WANDB_SILENT", "true")
  cfg = tiny_config(
      **{
          "wandb.enabled": True,
          "wandb.mode": "offline",
          "opt.num_train_steps": 4,
          "eval_every_steps": 0,
          "checkpoint_every_steps": 2,
          "log_every_steps": 2,
      }
  )
  res = crash_then_resume(monkeypatch, cfg, str(tmp_path), 4)
  assert res["status"] == "completed"
  run_id = (tmp_path / "wandb_id").read_text().strip()
  runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
  assert len(runs) == 2 and len(run_id) == 16
  for run in runs:
    assert run.name.endswith(f"-{run_id}") and list(run.glob("*.wandb"))


@pytest.mark.slow  # End-to-end training runs.
def test_hooks_fire_on_exactly_their_steps(tmp_path):
  """Hooks registered with every=3 over 10 steps fire at the step counts n
  they should, each seeing theta_n: BEFORE hooks with the batch step n takes,
  AFTER hooks one step ahead of the metrics read back (or none behind, with
  flush=True), METRICS hooks with step n-1's metrics. Started again once
  finished, the run fires only the at_end hooks, on the same final state."""
  cfg = tiny_config(
      **{
          "opt.num_train_steps": 10,
          "eval_every_steps": 4,
          "checkpoint_every_steps": 0,
          "log_every_steps": 5,
      }
  )
  schedule = optimizer_lib.learning_rate_schedule(cfg.opt)
  seen = collections.defaultdict(list)

  def record(name):
    def hook(run, n):
      seen[name].append(n)
      if name.startswith("metrics"):
        assert run.steps_done == n
        np.testing.assert_allclose(
            run.metrics["learning_rate"], schedule(n - 1), rtol=1e-6
        )
        return
      assert int(run.state.step) == n, (name, n)
      if name == "before":
        assert run.batch["inputs"].shape == (8, 32)
      elif name == "after":  # Step n-1 dispatched, its metrics not read.
        assert run.steps_done == n - 1 and run.pending[0] == n - 1
      elif name == "after_flush":
        assert run.steps_done == n and run.pending is None

    return hook

  B, A, M = train_lib.BEFORE, train_lib.AFTER, train_lib.METRICS
  hooks = [
      train_lib.Hook(record("before"), 3, when=B),
      train_lib.Hook(record("after"), 3, when=A),
      train_lib.Hook(record("after_flush"), 3, when=A, flush=True, at_end=True),
      train_lib.Hook(record("metrics"), 3, when=M),
      train_lib.Hook(record("metrics_first"), 4, when=M, first=True),
      train_lib.Hook(record("never"), 0, when=A),
  ]
  res = train_lib.train(cfg, str(tmp_path), hooks=hooks)
  assert res["status"] == "completed"
  assert dict(seen) == {
      "before": [0, 3, 6, 9],
      "after": [3, 6, 9],
      "after_flush": [3, 6, 9, 10],
      "metrics": [3, 6, 9],
      "metrics_first": [1, 4, 8],
  }
  assert [n for n, _ in res["eval_history"]] == [4, 8, 10]

  # Started again once finished: nothing runs, nothing on disk changes.
  seen.clear()
  before = listing(tmp_path)
  again = train_lib.train(cfg, str(tmp_path), hooks=hooks)
  assert not seen and listing(tmp_path) == before
  assert again == json.loads((tmp_path / "results.json").read_text())
  # Killed after its final checkpoint, before results.json: started again,
  # it fires only the at_end hooks on the same final state; the final eval,
  # in progress.json already, is not redone.
  os.remove(tmp_path / "results.json")
  again = train_lib.train(cfg, str(tmp_path), hooks=hooks)
  assert dict(seen) == {"after_flush": [10]}
  assert _pairs(again["eval_history"]) == _pairs(res["eval_history"])
  assert again["final_eval_loss"] == res["final_eval_loss"]
  assert again["steps"] == 10
  with pytest.raises(ValueError, match="when='afterwards'"):
    train_lib.Hook(record("typo"), 3, when="afterwards")


# ------------------------------------------- kills, signals and resumption

# 60 steps, an eval every 10, a checkpoint every 20, train/* every step.
RESUME = {
    "opt.num_train_steps": 60,
    "eval_every_steps": 10,
    "checkpoint_every_steps": 20,
    "log_every_steps": 1,
}

# Runs `nanodo-sam train` and SIGKILLs it at a chosen point: `after_eval N`
# (the eval at step N is in progress.json, its checkpoint not yet written;
# the checkpoints before it are on disk), `before_results` (the final
# checkpoint is written, results.json not), `batch N` (as the loop fetches
# the batch of step N-1).
KILLER = """
import os, signal, sys
from nanodo_sam import cli, data, rundir, train
point, at = sys.argv[1], int(sys.argv[2])

def die():
  os.kill(os.getpid(), signal.SIGKILL)

if point == "after_eval":
  write_progress = train._write_progress
  def wrapped(run, status):
    write_progress(run, status)
    if status == "running" and run.eval_history[-1:] and \\
        run.eval_history[-1][0] == at and run.steps_done == at:
      run.checkpoint_manager.wait_until_finished()
      die()
  train._write_progress = wrapped
elif point == "before_results":
  write_json = rundir.write_json
  def wrapped(path, obj):
    if path.endswith("results.json"):
      die()
    write_json(path, obj)
  rundir.write_json = wrapped
elif point == "batch":
  next_batch, calls = data.TrainIterator.__next__, []
  def wrapped(self):
    calls.append(1)
    if len(calls) == at:
      die()
    return next_batch(self)
  data.TrainIterator.__next__ = wrapped
cli.main(sys.argv[3:])
"""


def _env():
  return dict(os.environ, PYTHONPATH=ROOT)


def _killed(tmp_path, workdir, point, at):
  """`nanodo-sam train` on RESUME, SIGKILLed at `point`."""
  script = tmp_path / "killer.py"
  script.write_text(KILLER)
  proc = subprocess.run(
      [
          sys.executable,
          str(script),
          point,
          str(at),
          "train",
          f"--workdir={workdir}",
          *tiny_flags(**RESUME),
      ],
      env=_env(),
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=600,
  )
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
  assert not (workdir / "results.json").exists()
  return json.loads((workdir / "progress.json").read_text())


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """The RESUME run without interruption: (workdir, results)."""
  workdir = tmp_path_factory.mktemp("reference")
  res = train_lib.train(tiny_config(**RESUME), str(workdir))
  assert res["status"] == "completed"
  return workdir, res


def _assert_same_run(workdir, reference):
  """The run in `workdir` ended exactly like the reference: every eval,
  the best loss, the whole train loss curve and the final state, bitwise."""
  ref_dir, ref = reference
  res = _strict_json(workdir / "results.json")
  assert _pairs(res["eval_history"]) == _pairs(ref["eval_history"])
  assert [n for n, _ in res["eval_history"]] == [10, 20, 30, 40, 50, 60]
  assert res["best_eval_loss"] == min(l for _, l in ref["eval_history"])
  assert res["final_eval_loss"] == ref["final_eval_loss"]
  assert res["status"] == "completed" and res["steps"] == 60
  curve = read_scalars(workdir, "train/loss")["train/loss"]
  assert curve == read_scalars(ref_dir, "train/loss")["train/loss"]
  assert sorted(curve) == list(range(1, 61))
  cfg = tiny_config(**RESUME)
  _, a = _params(workdir, cfg, 60)
  _, b = _params(ref_dir, cfg, 60)
  for x, y in zip(
      jax.tree.leaves((a.params, a.opt_state, a.step)),
      jax.tree.leaves((b.params, b.opt_state, b.step)),
  ):
    np.testing.assert_array_equal(x, y)
  np.testing.assert_array_equal(
      jax.random.key_data(a.rng), jax.random.key_data(b.rng)
  )
  return res


@pytest.mark.slow  # Two SIGKILLed runs and two resumptions.
def test_killed_between_eval_and_checkpoint_then_after_the_last_checkpoint(
    tmp_path, reference, capsys, caplog
):
  """SIGKILLed right after the eval at step 30 (checkpoint 20 on disk), then
  resumed and SIGKILLed after the final checkpoint, before results.json:
  started again, the run ends with every evaluation exactly once, the best
  loss and the loss curve of the uninterrupted run; started once more, it
  is done and touches nothing."""
  workdir = tmp_path / "run"
  progress = _killed(tmp_path, workdir, "after_eval", 30)
  assert [n for n, _ in progress["eval_history"]] == [10, 20, 30]
  assert _steps(workdir) == [20]
  progress = _killed(tmp_path, workdir, "before_results", 0)
  assert _steps(workdir) == [20, 40, 60]
  assert [n for n, _ in progress["eval_history"]] == [10, 20, 30, 40, 50, 60]

  caplog.set_level(logging.INFO, logger="nanodo_sam")
  assert _main("train", f"--workdir={workdir}", *tiny_flags(**RESUME)) == 0
  res = _assert_same_run(workdir, reference)
  assert _strict_json(workdir / "progress.json")["status"] == "completed"

  before = listing(workdir)
  caplog.clear()
  capsys.readouterr()
  assert _main("train", f"--workdir={workdir}", *tiny_flags(**RESUME)) == 0
  assert "has finished (completed at step 60); nothing to do" in caplog.text
  assert (
      json.loads(capsys.readouterr().out)["final_eval_loss"]
      == res["final_eval_loss"]
  )
  assert listing(workdir) == before


@pytest.mark.slow
def test_killed_at_every_kind_of_point_resumes_exactly(tmp_path, reference):
  """Five SIGKILLs in one run: before any checkpoint, right after an eval
  whose step's checkpoint is not yet written (20), between a checkpoint and
  an eval (step 46), after the final eval before the final checkpoint,
  and before results.json. Checkpoints are saved asynchronously: the
  after_eval and before_results kills come after the run has waited for its
  saves, so exactly the due ones are on disk; a `batch` kill may land while
  a save is in flight (lost: a matter of timing, not a fault), so there
  only none that was not due may be on disk. Either way the run must end
  exactly as the uninterrupted one."""
  workdir = tmp_path / "run"
  for point, at, due, evals in [
      ("batch", 8, [], []),
      ("after_eval", 20, [], [10, 20]),
      ("batch", 46, [20, 40], [10, 20, 30, 40]),
      ("after_eval", 60, [20, 40], [10, 20, 30, 40, 50, 60]),
      ("before_results", 0, [20, 40, 60], [10, 20, 30, 40, 50, 60]),
  ]:
    progress = _killed(tmp_path, workdir, point, at)
    if point == "batch":
      assert set(_steps(workdir)) <= set(due), (point, _steps(workdir))
    else:
      assert _steps(workdir) == due, point
    assert [n for n, _ in progress["eval_history"]] == evals, point
  assert _main("train", f"--workdir={workdir}", *tiny_flags(**RESUME)) == 0
  _assert_same_run(workdir, reference)


@pytest.mark.slow  # End-to-end training runs.
def test_sigterm_checkpoints_then_the_same_command_resumes_bitwise(
    tmp_path, reference
):
  """SIGTERM during a run: it finishes the step in flight, checkpoints that
  step with the data position, records itself as preempted (no
  results.json: the launcher and runs.py see it unfinished) and exits 75;
  the same command then ends it exactly as the uninterrupted run."""
  workdir = tmp_path / "run"
  proc = subprocess.Popen(
      [
          sys.executable,
          "-m",
          "nanodo_sam.cli",
          "train",
          f"--workdir={workdir}",
          *tiny_flags(**RESUME),
      ],
      env=_env(),
      cwd=ROOT,
      stderr=subprocess.PIPE,
      text=True,
  )
  lines = []
  for line in proc.stderr:  # The progress line of step 3, then SIGTERM.
    lines.append(line)
    if " step 3/60" in line:
      proc.send_signal(signal.SIGTERM)
      break
  lines += proc.stderr.readlines()
  assert proc.wait(timeout=600) == preemption.EXIT_PREEMPTED, "".join(lines)
  progress = _strict_json(workdir / "progress.json")
  n = progress["steps"]
  assert progress["status"] == "preempted" and progress["signal"] == "SIGTERM"
  assert 3 <= n < 60 and progress["checkpoint_step"] == n
  assert n in _steps(workdir)
  assert (workdir / "data_state" / str(n)).is_dir()
  assert not (workdir / "results.json").exists()
  run = sweep_lib.Run(name="run", config="", overrides={}, workdir=str(workdir))
  assert not sweep_lib.is_done(run)
  record = runs_lib.read_run(str(workdir))
  assert record.status == "preempted"
  assert not runs_lib.load_runs([str(tmp_path)], finished=True)

  assert _main("train", f"--workdir={workdir}", *tiny_flags(**RESUME)) == 0
  _assert_same_run(workdir, reference)
