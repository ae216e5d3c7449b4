"""`nanodo-sam lm-eval`: the jax backend (the project's forward) against the
harness's own HFLM over the exported model, on the same requests."""

import json
import os

import jax
import numpy as np
import pytest
from lm_eval.api.instance import Instance

from conftest import listing, tiny_config, tiny_flags
from conftest import run_cli as _run
from nanodo_sam import data as data_lib
from nanodo_sam import export
from nanodo_sam import head as head_lib
from nanodo_sam import lm_eval_backend
from nanodo_sam import lm_eval_run
from nanodo_sam import model as model_lib
from nanodo_sam import state as state_lib


def _requests(kind, args):
  return [
      Instance(request_type=kind, doc={}, arguments=a, idx=i)
      for i, a in enumerate(args)
  ]


@pytest.fixture(scope="module")
def both(tmp_path_factory):
  """JaxLM and HFLM over one random tiny byte-level model (L = 32); JaxLM
  runs the output head in chunks of 64 tokens (4 of a batch of 8 rows)."""
  cfg = tiny_config(**{"model.head_chunk_tokens": 64})
  s = state_lib.setup(cfg)
  params = model_lib.init_params(s.model, jax.random.key(3))
  params["embed"]["embedding"] *= 10  # Sharp logits: no greedy near ties.
  out = str(tmp_path_factory.mktemp("hf"))
  export.write(out, params, s.model.cfg, cfg.data.vocab, {"test": True})
  vocab = data_lib.make_vocab(cfg.data.vocab)
  jax_lm = lm_eval_backend.JaxLM(s, params, vocab, batch_size=8)
  hf_lm = lm_eval_run.hf_model(out, batch_size=8, max_length=cfg.model.L)
  return jax_lm, hf_lm


def test_backends_agree_on_each_request(both):
  jax_lm, hf_lm = both
  pairs = [
      ("ROMEO: What", " say you?"),
      ("", "Hello"),
      ("a", "b" * 30),
      ("To be, or not ", "to be"),
      ("x" * 70, " long context"),
  ]
  pairs += [(f"Line {i}:", f" word{i}") for i in range(10)]  # > a batch.
  a = jax_lm.loglikelihood(_requests("loglikelihood", pairs))
  b = hf_lm.loglikelihood(_requests("loglikelihood", pairs))
  assert len(a) == len(b) == len(pairs)
  np.testing.assert_allclose(
      [x[0] for x in a], [x[0] for x in b], atol=1e-3, rtol=0
  )
  assert [x[1] for x in a] == [x[1] for x in b]
  assert all(x[0] < 0 for x in a)
  texts = [
      (
          "First Citizen:\nBefore we proceed any further, hear me "
          "speak.\n" * 3,
      ),
      ("short",),
  ]  # The first: several windows.
  a = jax_lm.loglikelihood_rolling(_requests("loglikelihood_rolling", texts))
  b = hf_lm.loglikelihood_rolling(_requests("loglikelihood_rolling", texts))
  np.testing.assert_allclose(a, b, atol=1e-3, rtol=0)
  assert len(texts[0][0].encode()) > 32  # Longer than L: rolling windows.


def _dense_log_softmax(logits_LxV, targets_L):
  """(log softmax(logits)[target], argmax == target) per position, float32,
  from the whole logits."""
  top_Lx1 = logits_LxV.max(-1, keepdims=True)
  logz_L = np.log(np.exp(logits_LxV - top_Lx1).sum(-1)) + top_Lx1[:, 0]
  target_L = np.take_along_axis(logits_LxV, targets_L[:, None], -1)[:, 0]
  return target_L - logz_L, logits_LxV.argmax(-1) == targets_L


def test_per_token_log_likelihoods_are_the_dense_log_softmax(both):
  """A one-token continuation after each prefix of a sequence scores that
  position's log softmax of the whole [L, V] logits (written out here), and
  its greedy flag is argmax == target, though the backend runs the output
  head in 4 chunks of 8 positions: a random next token and the argmax."""
  jax_lm, _ = both
  L = jax_lm.max_length
  assert head_lib.num_chunks(8, L, jax_lm.setup.head.chunk_tokens) == 4
  ids = np.random.default_rng(0).integers(3, 259, L + 1)
  logits_LxV = np.asarray(
      model_lib.make_logits_fn(jax_lm.setup.model)(
          jax_lm.params, ids[None, :-1].astype(np.int32)
      )[0],
      np.float32,
  )
  best_L = logits_LxV.argmax(-1)
  for targets_L in (ids[1:], best_L):
    got = jax_lm.score_pairs(
        [(ids[:k].tolist(), [int(targets_L[k - 1])]) for k in range(1, L + 1)]
    )
    logp_L, hit_L = _dense_log_softmax(logits_LxV, targets_L)
    np.testing.assert_allclose(
        [g[0] for g in got], logp_L, rtol=1e-6, atol=1e-6
    )
    np.testing.assert_array_equal([g[1] for g in got], hit_L)
  assert hit_L.all()  # The argmax targets: every greedy flag set.


def test_greedy_generate_until_agrees(both):
  jax_lm, hf_lm = both
  args = [
      ("ROMEO:", {"until": ["\n"], "max_gen_toks": 12}),
      ("The", {"until": ["zz"], "max_gen_toks": 8}),
  ]
  a = jax_lm.generate_until(_requests("generate_until", args))
  b = hf_lm.generate_until(_requests("generate_until", args))
  assert len(a) == 2
  # Invalid UTF-8 from the byte vocabulary: dropped here, U+FFFD there.
  assert a == [t.replace("\ufffd", "") for t in b]


def _refuses(tmp_path, capsys, cases):
  workdir = str(tmp_path)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(tiny_config().to_json())
  seen = listing(tmp_path)
  for argv, says in cases:
    code, _, err = _run(capsys, "lm-eval", f"--workdir={workdir}", *argv)
    lines = [l for l in err.splitlines() if l.startswith("nanodo-sam")]
    assert code == 2 and len(lines) == 1 and says in lines[0], err
  assert listing(tmp_path) == seen


def test_lm_eval_refuses_bad_flags_before_any_work(tmp_path, capsys):
  _refuses(
      tmp_path,
      capsys,
      [
          (["--tasks=nanodo_cloze", "--backend=torch"], "--backend='torch'"),
          (["--tasks="], "--tasks=T1,T2 is required"),
          (["--tasks=nanodo_cloze", "--limit=0"], "--limit=0 must be >= 1"),
      ],
  )


@pytest.mark.slow  # The harness's task index: seconds per case.
def test_lm_eval_refuses_an_unknown_task_or_step(tmp_path, capsys):
  _refuses(
      tmp_path,
      capsys,
      [
          (
              ["--tasks=nanodo_cloze,no_such_task"],
              "unknown lm-eval task 'no_such_task'",
          ),
          (["--tasks=nanodo_cloze", "--step=5"], "no checkpoint"),
      ],
  )


@pytest.mark.slow
def test_lm_eval_on_a_trained_run_by_both_backends(tmp_path, capsys):
  workdir = str(tmp_path / "run")
  code, _, _ = _run(capsys, "train", *tiny_flags(), f"--workdir={workdir}")
  assert code == 0
  results = {}
  for backend in ("jax", "hf"):
    code, out, _ = _run(
        capsys,
        "lm-eval",
        f"--workdir={workdir}",
        "--tasks=nanodo_cloze,nanodo_shakespeare",
        f"--backend={backend}",
    )
    assert code == 0 and "nanodo_cloze" in out and "bits_per_byte" in out
    path = os.path.join(workdir, f"lm_eval_step20_{backend}.json")
    assert path in out
    results[backend] = json.load(open(path))["results"]
  jax_r, hf_r = results["jax"], results["hf"]
  assert jax_r["nanodo_cloze"]["acc,none"] == hf_r["nanodo_cloze"]["acc,none"]
  assert jax_r["nanodo_shakespeare"]["bits_per_byte,none"] == pytest.approx(
      hf_r["nanodo_shakespeare"]["bits_per_byte,none"], abs=1e-4
  )


@pytest.mark.slow
def test_lm_eval_during_training_logs_beside_the_eval_loss_and_resumes(
    tmp_path, capsys
):
  from conftest import read_scalars
  from nanodo_sam import lm_eval_hook

  workdir = str(tmp_path / "run")
  argv = [
      "train",
      *tiny_flags(),
      f"--workdir={workdir}",
      "--config.eval.lm_eval_tasks=nanodo_cloze",
      "--config.eval.lm_eval_every=10",
  ]
  assert _run(capsys, *argv)[0] == 0
  history = lm_eval_hook.read_history(workdir)
  assert sorted(history, key=int) == ["10", "20"]
  assert 0 <= history["20"]["lm_eval/nanodo_cloze/acc"] <= 1
  logged = read_scalars(workdir, "lm_eval/")
  assert set(logged["lm_eval/nanodo_cloze/acc"]) == {10, 20}
  assert set(read_scalars(workdir, "eval/")["eval/loss"]) == {10, 20}
  results = json.load(open(os.path.join(workdir, "results.json")))
  assert results["lm_eval"] == history
  path = os.path.join(workdir, lm_eval_hook.HISTORY)
  seen = os.stat(path).st_mtime_ns
  assert _run(capsys, *argv)[0] == 0  # Finished: started again.
  assert os.stat(path).st_mtime_ns == seen  # Nothing scored twice.
  code, _, err = _run(
      capsys,
      "train",
      *tiny_flags(),
      f"--workdir={tmp_path / 'other'}",
      "--config.eval.lm_eval_tasks=nanodo_cloze,no_such_task",
  )
  assert code == 2 and "unknown lm-eval task 'no_such_task'" in err
  assert not (tmp_path / "other").exists()  # Refused before any work.
