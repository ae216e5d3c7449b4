"""The companion studies' machinery: SGD / momentum, the late-phase switch,
the edge-of-stability diagnostics through the training loop, the configs."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import TINY_SHAKESPEARE_TXT, read_scalars, tiny_config
from nanodo_sam import checkpoint
from nanodo_sam import optimizer as optimizer_lib
from nanodo_sam import sam_schedule
from nanodo_sam import sharpness
from nanodo_sam import state as state_lib
from nanodo_sam import step as step_lib
from nanodo_sam import train as train_lib


def _opt_cfg(**kw):
  c = ml_collections.ConfigDict(
      dict(
          optimizer="sgd",
          num_train_steps=10,
          peak_learning_rate=0.3,
          init_learning_rate=0.0,
          final_learning_rate=0.0,
          warmup_steps=0,
          decay_type="constant",
          weight_decay=0.0,
          b1=0.9,
          b2=0.95,
          eps=1e-8,
          clip_by_global_norm=0.0,
          # The weight decay these tests check is optax's (x lr).
          independent_weight_decay=False,
      )
  )
  c.update(kw)
  return c


def _tree(key, scale=1.0):
  k1, k2 = jax.random.split(key)
  return {
      "w": scale * jax.random.normal(k1, (3, 4), jnp.float32),
      "b": {"c": scale * jax.random.normal(k2, (5,), jnp.float32)},
  }


def _step(tx, params, grads, opt_state):
  updates, opt_state = tx.update(grads, opt_state, params)
  return jax.tree.map(lambda p, u: p + u, params, updates), opt_state


# ------------------------------------------------------------ optimizers


def test_sgd_without_weight_decay_is_p_minus_lr_g_exactly():
  lr = 0.3
  tx = optimizer_lib.make_optimizer(_opt_cfg(peak_learning_rate=lr))
  p = _tree(jax.random.key(0))
  g = _tree(jax.random.key(1))
  new, _ = _step(tx, p, g, tx.init(p))
  expected = jax.tree.map(lambda p, g: p - jnp.float32(lr) * g, p, g)
  for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(a, b)


def test_sgd_weight_decay_is_added_to_the_gradient():
  lr, wd = 0.3, 0.01
  tx = optimizer_lib.make_optimizer(
      _opt_cfg(peak_learning_rate=lr, weight_decay=wd)
  )
  p, g = _tree(jax.random.key(0)), _tree(jax.random.key(1))
  new, _ = _step(tx, p, g, tx.init(p))
  for a, p0, g0 in zip(*map(jax.tree.leaves, (new, p, g))):
    np.testing.assert_allclose(
        a, p0 - lr * (g0 + wd * p0), rtol=1e-6, atol=1e-7
    )


def test_momentum_matches_the_hand_computed_two_step_recursion():
  lr, mu, wd = 0.1, 0.9, 0.01
  tx = optimizer_lib.make_optimizer(
      _opt_cfg(
          optimizer="momentum", peak_learning_rate=lr, b1=mu, weight_decay=wd
      )
  )
  p0 = _tree(jax.random.key(0))
  g1, g2 = _tree(jax.random.key(1)), _tree(jax.random.key(2))
  state = tx.init(p0)
  p1, state = _step(tx, p0, g1, state)
  p2, state = _step(tx, p1, g2, state)
  for x0, a1, b1, a2, b2 in zip(*map(jax.tree.leaves, (p0, g1, g2, p1, p2))):
    x0, a1, b1 = (np.asarray(x, np.float64) for x in (x0, a1, b1))
    v1 = a1 + wd * x0  # v_1 = g_1 + wd p_0 (v_0 = 0)
    x1 = x0 - lr * v1  # p_1 = p_0 - lr v_1
    v2 = mu * v1 + (b1 + wd * x1)  # v_2 = mu v_1 + g_2 + wd p_1
    x2 = x1 - lr * v2  # p_2 = p_1 - lr v_2
    np.testing.assert_allclose(a2, x1, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(b2, x2, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------- the late-phase switch


def _spy_on_steps(monkeypatch):
  """Records (method, step) and the batch of each executed train step, the
  compiled step per method, and how many forward passes through the network (calls while
  tracing) each compiled step contains."""
  real = train_lib.jit_train_step
  used, passes, fns, batches = [], {}, {}, []

  def spy(s, method, correct=False):
    passes.setdefault(method, 0)

    def count(fn):
      def counted(params, inputs):
        passes[method] += 1
        return fn(params, inputs)

      return counted

    # The same logits function and head, counting network passes: the step
    # runs the head's `features` and the chunked output layer.
    fn = real(
        dataclasses.replace(
            s,
            logits_fn=count(s.logits_fn),
            head=s.head._replace(features=count(s.head.features)),
        ),
        method,
        correct,
    )
    fns[method] = fn

    def call(state, batch):
      used.append((method, int(state.step)))
      batches.append(batch)
      return fn(state, batch)

    return call

  monkeypatch.setattr(step_lib, "jit_train_step", spy)
  return used, passes, fns, batches


def _restore(workdir, cfg, step):
  s = state_lib.setup(cfg)
  mngr = checkpoint.checkpoint_manager(str(workdir))
  return s, checkpoint.restore_state(mngr, s, step)


def _assert_trees_equal(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)


def test_sam_start_step_takes_exact_adamw_steps_then_sam_steps(
    tmp_path, monkeypatch
):
  k, total = 3, 5
  late_cfg = tiny_config(
      **{
          "sam.method": "sam",
          "sam.rho": 0.05,
          "sam.start_step": k,
          "opt.num_train_steps": total,
          "checkpoint_every_steps": k,
          "eval_every_steps": 0,
          "log_every_steps": 1,
          "data.eval_steps": 1,
      }
  )
  assert [
      sam_schedule.uses_sam_step(late_cfg.sam, i) for i in range(total)
  ] == [False] * k + [True] * (total - k)
  real_jit_train_step = train_lib.jit_train_step
  used, passes, fns, batches = _spy_on_steps(monkeypatch)
  res = train_lib.train(late_cfg, str(tmp_path))
  assert res["status"] == "completed"
  # The loop ran the plain compiled step before k and the SAM step from k;
  # the plain one has a single forward pass (SAM: clean + perturbed).
  assert used == [("adamw", i) for i in range(k)] + [
      ("sam", i) for i in range(k, total)
  ]
  assert passes == {"adamw": 1, "sam": 2}

  # A pure AdamW run (its own config and compiled step) on the same batches
  # reaches the same state at k, bit for bit: params, AdamW moments, count.
  adamw_cfg = tiny_config(
      **{"sam.method": "adamw", "sam.rho": 0.0, "opt.num_train_steps": total}
  )
  s_adamw = state_lib.setup(adamw_cfg)
  adamw_step = real_jit_train_step(s_adamw, "adamw")
  state = state_lib.init_state(s_adamw, adamw_cfg.seed)
  for batch in batches[:k]:
    state, _ = adamw_step(state, batch)
  _, at_k = _restore(tmp_path, late_cfg, k)
  _assert_trees_equal(
      (state.params, state.opt_state), (at_k.params, at_k.opt_state)
  )

  # After the switch: the SAM step's updates from that state.
  _, final = _restore(tmp_path, late_cfg, total)
  state = at_k
  for batch in batches[k:]:
    state, metrics = fns["sam"](state, batch)
  _assert_trees_equal(
      (state.params, state.opt_state), (final.params, final.opt_state)
  )
  assert float(metrics["perturbation_norm"]) == pytest.approx(0.05, rel=1e-5)
  _, adamw_final = _restore(tmp_path, late_cfg, k)  # at_k was donated.
  for batch in batches[k:]:
    adamw_final, _ = adamw_step(adamw_final, batch)
  diff = max(
      float(np.max(np.abs(x - y)))
      for x, y in zip(
          jax.tree.leaves(final.params), jax.tree.leaves(adamw_final.params)
      )
  )
  assert diff > 1e-6  # ... which are not AdamW's.


@pytest.mark.slow  # End to end: a run with its diagnostics.
def test_edge_of_stability_run_logs_lambda_max_and_sam_edge(tmp_path):
  lr, rho = 0.2, 0.3
  cfg = tiny_config(
      **{
          "opt.optimizer": "sgd",
          "opt.decay_type": "constant",
          "opt.warmup_steps": 0,
          "opt.weight_decay": 0.0,
          "opt.peak_learning_rate": lr,
          "opt.num_train_steps": 2,
          "sam.method": "sam",
          "sam.rho": rho,
          "diagnostics.every_steps": 1,
          "diagnostics.on_train_batch": True,
          "diagnostics.num_iters": 3,
          "eval_every_steps": 0,
          "checkpoint_every_steps": 0,
          "data.eval_steps": 1,
      }
  )
  res = train_lib.train(cfg, str(tmp_path))
  assert res["status"] == "completed"
  eos = read_scalars(tmp_path, "eos/")
  for tag in (
      "lambda_max",
      "sam_edge",
      "two_over_lr",
      "grad_norm",
      "grad_alignment",
      "sam_grad_alignment",
      "lanczos_iters",
  ):
    assert sorted(eos[f"eos/{tag}"]) == [0, 1], tag  # Before steps 0 and 1.
  for step in (0, 1):
    lam, edge = eos["eos/lambda_max"][step], eos["eos/sam_edge"][step]
    two = eos["eos/two_over_lr"][step]
    g = eos["eos/grad_norm"][step]
    assert np.isfinite(lam) and lam != 0.0
    np.testing.assert_allclose(two, 2.0 / lr, rtol=1e-6)
    assert 0.0 < edge < two  # rho > 0 lowers the edge below 2/eta.
    np.testing.assert_allclose(
        edge, float(sharpness.sam_edge(lr, rho, g)), rtol=1e-5
    )
    # The edge solves eta lambda (1 + rho lambda / ||g||) = 2.
    np.testing.assert_allclose(lr * edge * (1 + rho * edge / g), 2.0, rtol=1e-4)
    for tag in ("grad_alignment", "sam_grad_alignment"):
      assert 0.0 <= eos[f"eos/{tag}"][step] <= 1.0 + 1e-5


# ----------------------------------------------------------------- configs


def test_edge_of_stability_split_holds_out_the_last_10000_lines(
    tmp_path, monkeypatch
):
  from nanodo_sam import text_split

  raw = tmp_path / "input.txt"
  lines = [f"line {i}\n".encode() for i in range(10_005)] + [b"no newline"]
  raw.write_bytes(b"".join(lines))
  cache = str(tmp_path / "cache")
  paths = text_split.split_paths(str(raw), 10_000, cache)
  assert not os.path.exists(cache)  # Naming the files writes nothing.
  train, test = text_split.write_split(str(raw), 10_000, cache)
  assert (train, test) == paths
  train_b, test_b = open(train, "rb").read(), open(test, "rb").read()
  assert train_b + test_b == raw.read_bytes()
  assert test_b.splitlines(keepends=True) == lines[-10_000:]
  assert text_split.write_split(str(raw), 10_000, cache) == (
      train,
      test,
  )  # Reused, not rewritten.
  with pytest.raises(ValueError, match="TINY_SHAKESPEARE_TXT"):
    text_split.write_split(str(tmp_path / "missing.txt"), 10_000)
  # A run's first read writes a missing split, from the same input only.
  os.remove(test)
  assert text_split.write_if_missing(test, {"tiny_shakespeare": str(raw)})
  assert open(test, "rb").read() == test_b
  assert not text_split.write_if_missing(test, {"tiny_shakespeare": str(raw)})
  os.remove(test)
  with pytest.raises(ValueError, match="hash differs"):
    text_split.write_if_missing(
        test, {"tiny_shakespeare": TINY_SHAKESPEARE_TXT}
    )


def test_edge_of_stability_configs_are_the_papers_setting(
    monkeypatch, tmp_path
):
  from configs import edge_of_stability as eos
  from nanodo_sam import sweep as sweep_lib
  from nanodo_sam import text_split
  from nanodo_sam import validation

  monkeypatch.setenv("NANODO_SAM_CACHE", str(tmp_path))
  full, reduced = eos.get_config(), eos.get_config("reduced")
  for c in (full, reduced):
    validation.validate(c)
    assert (
        c.opt.optimizer,
        c.opt.decay_type,
        c.opt.warmup_steps,
        c.opt.weight_decay,
    ) == ("sgd", "constant", 0, 0.0)
    assert c.sam.method == "sam" and c.diagnostics.on_train_batch
    assert c.model.V == 259 and c.data.vocab == "byte"
  m = full.model
  assert (m.N, m.H, m.D, m.L, full.data.batch_size) == (6, 8, 128, 64, 128)
  assert os.listdir(tmp_path) == []  # Loading the configs wrote nothing.
  for path in (full.data.train_files, full.data.eval_files):
    text_split.write_if_missing(
        path, {"tiny_shakespeare": TINY_SHAKESPEARE_TXT}
    )
  raw = open(TINY_SHAKESPEARE_TXT, "rb").read()
  train, test = (
      open(f, "rb").read()
      for f in (full.data.train_files, full.data.eval_files)
  )
  assert train + test == raw and len(test.splitlines()) == 10_000
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  sw = sweep_lib.load_sweep(
      os.path.join(root, "configs", "sweeps", "edge_of_stability.py"),
      out=str(tmp_path / "runs"),
  )
  lrs = {r.overrides["opt.peak_learning_rate"] for r in sw.runs}
  rhos = {r.overrides["sam.rho"] for r in sw.runs}
  assert sorted(lrs) == [0.01, 0.02, 0.05, 0.1, 0.2, 0.5]
  assert sorted(rhos) == [0.0, 0.1, 0.3, 1.0]


def test_late_phase_sweep_switch_points_and_compute():
  from configs import late_phase
  from nanodo_sam import sweep as sweep_lib

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  sw = sweep_lib.load_sweep(
      os.path.join(root, "configs", "sweeps", "late_phase.py"),
      out="/nonexistent",
  )
  total = late_phase.NUM_TRAIN_STEPS
  starts = {}
  for run in sw.runs:
    cfg = late_phase.get_config(run.config.partition(":")[2])
    method = run.overrides.get("sam.method", cfg.sam.method)
    starts.setdefault(method, set()).add(cfg.sam.start_step)
  expected = {round(f * total) for f in (0.0, 0.5, 0.75, 0.9)}
  assert starts["sam"] == starts["precond_functional_sam"] == expected
  assert starts["adamw"] == {total}  # The 100% point, shared by both.
  eq = sam_schedule.adamw_step_equivalents
  assert eq(total, 0, "sam") == 2 * total
  assert eq(total, total, "sam") == eq(total, 0, "adamw") == total
  assert eq(200, 150, "precond_functional_sam") == 150 + 2 * 50
