"""The training loop: a real short run, exact resume, divergence, methods."""

import collections
import json
import os

import jax
import numpy as np
import pytest

from conftest import needs_data, tiny_config
from nanodo_sam import checkpoint
from nanodo_sam import data as data_lib
from nanodo_sam import optimizer as optimizer_lib
from nanodo_sam import sam_schedule
from nanodo_sam import state as state_lib
from nanodo_sam import train as train_lib

pytestmark = needs_data


def _params(workdir, cfg):
  s = state_lib.setup(cfg)
  mngr = checkpoint.checkpoint_manager(str(workdir))
  return s, jax.device_get(checkpoint.restore_state(mngr, s))


def test_short_tiny_shakespeare_run_lowers_eval_loss(tmp_path):
  cfg = tiny_config(**{"opt.num_train_steps": 60, "eval_every_steps": 20,
                       "opt.peak_learning_rate": 1e-2})
  res = train_lib.train(cfg, str(tmp_path))
  losses = [l for _, l in res["eval_history"]]
  assert res["status"] == "completed" and res["steps"] == 60
  # An untrained model scores log(259) = 5.56 nats; eval loss falls at every
  # evaluation and ends far below that.
  assert len(losses) == 3 and losses[0] > losses[1] > losses[2]
  assert losses[-1] < np.log(259) - 1.5
  on_disk = json.load(open(tmp_path / "results.json"))
  for key in ("final_eval_loss", "best_eval_loss", "steps", "tokens",
              "method", "rho", "peak_learning_rate", "model_size",
              "wall_seconds", "status"):
    assert key in on_disk
  assert on_disk["tokens"] == 60 * 8 * 32
  assert json.load(open(tmp_path / "config.json"))["model"]["D"] == 32
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path))


class _Crash(Exception):
  pass


def test_interrupted_run_resumes_bitwise_identically(tmp_path, monkeypatch):
  """Preconditioned F-SAM every 3rd step with sam.reuse: the checkpoint at
  step 10 falls between two full steps, so the resumed run must restore the
  carried difference (TrainState.reuse) as well as params and optimizer."""
  cfg = tiny_config(**{"sam.method": "precond_functional_sam",
                       "sam.rho": 0.05, "sam.every_k": 3, "sam.reuse": True})
  full = train_lib.train(cfg, str(tmp_path / "full"))

  calls = {"n": 0}
  real_next = data_lib.TrainIterator.__next__

  def crashing_next(self):
    calls["n"] += 1
    if calls["n"] == 15:  # Dies mid-run, after the step-10 checkpoint.
      raise _Crash()
    return real_next(self)

  monkeypatch.setattr(data_lib.TrainIterator, "__next__", crashing_next)
  with pytest.raises(_Crash):
    train_lib.train(cfg, str(tmp_path / "resumed"))
  monkeypatch.setattr(data_lib.TrainIterator, "__next__", real_next)
  resumed = train_lib.train(cfg, str(tmp_path / "resumed"))

  assert resumed["final_eval_loss"] == full["final_eval_loss"]
  assert resumed["eval_history"][-1] == full["eval_history"][-1]
  _, a = _params(tmp_path / "full", cfg)
  _, b = _params(tmp_path / "resumed", cfg)
  assert int(a.step) == int(b.step) == 20
  assert float(a.reuse.grad_norm) > 0
  for x, y in zip(jax.tree.leaves((a.params, a.opt_state, a.reuse)),
                  jax.tree.leaves((b.params, b.opt_state, b.reuse))):
    np.testing.assert_array_equal(x, y)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
  cfg = tiny_config(**{"opt.optimizer": "sgd", "opt.weight_decay": 0.0,
                       "opt.warmup_steps": 0, "opt.decay_type": "constant",
                       "opt.num_train_steps": 40,
                       "checkpoint_every_steps": 5})
  # Fine for 5 steps, then a learning rate that blows up.
  cfg.opt.peak_learning_rate = 1e-3
  train_lib.train(cfg, str(tmp_path / "ok"))
  s, good = _params(tmp_path / "ok", cfg)
  del s
  cfg.opt.peak_learning_rate = 1e12
  res = train_lib.train(cfg, str(tmp_path / "boom"))
  assert res["status"] == "diverged"
  assert json.load(open(tmp_path / "boom" / "results.json"))["status"] == \
      "diverged"
  mngr = checkpoint.checkpoint_manager(str(tmp_path / "boom"))
  s = state_lib.setup(cfg)
  for step in mngr.all_steps():
    state = checkpoint.restore_state(mngr, s, step)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state.params))
  del good


@pytest.mark.parametrize("method,extra", [
    ("sam", {}), ("functional_sam", {}), ("logit_sam", {}),
    ("angle_sam", {"sam.phi": 0.5}), ("precond_sam", {}),
])
def test_each_method_trains_and_logs_its_metrics(tmp_path, method, extra):
  cfg = tiny_config(**{"sam.method": method, "sam.rho": 0.05,
                       "opt.num_train_steps": 6, "eval_every_steps": 0,
                       "checkpoint_every_steps": 0, "log_every_steps": 3,
                       **extra})
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
  cfg = tiny_config(**{"sam.method": "sam", "sam.rho": 0.1,
                       "sam.start_step": 4, "sam.every_k": 3,
                       "sam.end_step": 12})
  used = [s for s in range(16) if sam_schedule.uses_sam_step(cfg.sam, s)]
  assert used == [4, 7, 10]
  cfg.sam.reuse = True  # The steps in between, inside [start, end), reuse.
  kinds = "".join(sam_schedule.step_kind(cfg.sam, s)[0] for s in range(16))
  assert kinds == "ppppsrrsrrsrpppp"
  cfg.sam.rho_warmup_steps = 10
  rhos = [float(sam_schedule.rho_at(cfg.sam, s)) for s in (0, 4, 9, 20)]
  np.testing.assert_allclose(rhos, [0.01, 0.05, 0.1, 0.1], rtol=1e-6)


def test_wandb_offline_logs_without_a_network(tmp_path, monkeypatch):
  monkeypatch.setenv("WANDB_SILENT", "true")
  cfg = tiny_config(**{"wandb.enabled": True, "wandb.mode": "offline",
                       "opt.num_train_steps": 4, "eval_every_steps": 0,
                       "checkpoint_every_steps": 0, "log_every_steps": 2})
  res = train_lib.train(cfg, str(tmp_path))
  assert res["status"] == "completed"
  runs = list((tmp_path / "wandb").glob("offline-run-*"))
  assert len(runs) == 1 and list(runs[0].glob("*.wandb"))


def test_hooks_fire_on_exactly_their_steps(tmp_path):
  """Hooks registered with every=3 over 10 steps fire at the step counts n
  they should, each seeing theta_n: BEFORE hooks with the batch step n takes,
  AFTER hooks one step ahead of the metrics read back (or none behind, with
  flush=True), METRICS hooks with step n-1's metrics. Started again once
  finished, the run fires only the at_end hooks, on the same final state."""
  cfg = tiny_config(**{"opt.num_train_steps": 10, "eval_every_steps": 4,
                       "checkpoint_every_steps": 0, "log_every_steps": 5})
  schedule = optimizer_lib.learning_rate_schedule(cfg.opt)
  seen = collections.defaultdict(list)

  def record(name):
    def hook(run, n):
      seen[name].append(n)
      if name.startswith("metrics"):
        assert run.steps_done == n
        np.testing.assert_allclose(run.metrics["learning_rate"],
                                   schedule(n - 1), rtol=1e-6)
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
  hooks = [train_lib.Hook(record("before"), 3, when=B),
           train_lib.Hook(record("after"), 3, when=A),
           train_lib.Hook(record("after_flush"), 3, when=A, flush=True,
                          at_end=True),
           train_lib.Hook(record("metrics"), 3, when=M),
           train_lib.Hook(record("metrics_first"), 4, when=M, first=True),
           train_lib.Hook(record("never"), 0, when=A)]
  res = train_lib.train(cfg, str(tmp_path), hooks=hooks)
  assert res["status"] == "completed"
  assert dict(seen) == {"before": [0, 3, 6, 9], "after": [3, 6, 9],
                        "after_flush": [3, 6, 9, 10], "metrics": [3, 6, 9],
                        "metrics_first": [1, 4, 8]}
  assert [n for n, _ in res["eval_history"]] == [4, 8, 10]

  seen.clear()
  again = train_lib.train(cfg, str(tmp_path), hooks=hooks)
  assert dict(seen) == {"after_flush": [10]}
  assert again["eval_history"] == [res["eval_history"][-1]]
  assert again["final_eval_loss"] == res["final_eval_loss"]
  assert again["steps"] == 10
  with pytest.raises(ValueError, match="when='afterwards'"):
    train_lib.Hook(record("typo"), 3, when="afterwards")
