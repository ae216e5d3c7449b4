"""The chunked output head (head.py): per-token log-likelihoods, eval sums
and the chunk loop against the whole logits, and no [B, L, V] array alive
when the output layer is chunked. The loss and its pullback through the
same loop (`head_vjp`) are checked for every method in test_perf.py
(`test_chunked_head_equals_plain_logits_fn`), the second-order products in
test_sharpness.py."""

import functools

import jax
from jax.extend import core as jax_core
import jax.numpy as jnp
import numpy as np
import pytest

from nanodo_sam import evaluate
from nanodo_sam import head as head_lib
from nanodo_sam import model as model_lib

B, L, V = 2, 8, 19


@functools.cache
def _model():
  m = model_lib.TransformerDo(
      model_lib.DoConfig(D=16, H=2, N=1, F=32, L=L, V=V)
  )
  return m, model_lib.init_params(m, jax.random.key(0))


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  weights = (rng.uniform(size=(B, L)) > 0.3).astype(np.float32)
  weights[0, 0] = 1.0
  return {
      "inputs": jnp.asarray(rng.integers(0, V, (B, L)), jnp.int32),
      "targets": jnp.asarray(rng.integers(0, V, (B, L)), jnp.int32),
      "weights": jnp.asarray(weights),
  }


def _reference(params, batch, logits_fn):
  """log p(target), argmax hits and the eval sums from the whole logits,
  in float64 on the host."""
  logits = np.asarray(logits_fn(params, batch["inputs"]), np.float64)
  top = logits.max(-1, keepdims=True)
  logz = np.log(np.exp(logits - top).sum(-1)) + top[..., 0]
  targets = np.asarray(batch["targets"])
  logp = np.take_along_axis(logits, targets[..., None], -1)[..., 0] - logz
  hit = logits.argmax(-1) == targets
  w = np.asarray(batch["weights"], np.float64)
  return (
      logp,
      hit,
      {
          "loss": -(logp * w).sum(),
          "weight": w.sum(),
          "correct": (hit * w).sum(),
      },
  )


def test_num_chunks_is_the_fewest_divisor_within_the_budget():
  assert [head_lib.num_chunks(2, 4, t) for t in (1, 2, 4, 8, 100)] == [
      4,
      4,
      2,
      1,
      1,
  ]
  assert head_lib.num_chunks(3, 6, 5) == 6  # 3 rows: no divisor fits 5.
  assert head_lib.num_chunks(2, 4, 0) == 1  # 0: the logits whole.


@pytest.mark.parametrize("chunk_tokens", [None, 0, B * L // 2, 1])
def test_token_log_probs_and_eval_sums_equal_the_whole_logits(chunk_tokens):
  """Through logits_fn alone (None), and 1, 2 and 8 chunks of the sequence
  through the head."""
  m, params = _model()
  batch = _batch()
  logits_fn = model_lib.make_logits_fn(m)
  head = (
      None
      if chunk_tokens is None
      else model_lib.output_head(m)._replace(chunk_tokens=chunk_tokens)
  )
  logp, hit, sums = _reference(params, batch, logits_fn)
  got, got_hit = jax.jit(
      functools.partial(
          head_lib.token_log_probs, logits_fn=logits_fn, head=head
      )
  )(params, batch["inputs"], batch["targets"])
  assert got.shape == (B, L) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, logp, rtol=1e-5, atol=1e-6)
  got_sums = jax.jit(
      functools.partial(head_lib.eval_sums, logits_fn=logits_fn, head=head)
  )(params, batch)
  np.testing.assert_allclose(got_sums["loss"], sums["loss"], rtol=1e-5)
  assert float(got_sums["weight"]) == sums["weight"]
  assert float(got_sums["correct"]) == sums["correct"] > 0
  np.testing.assert_array_equal(got_hit, hit)


def _shapes(jaxpr) -> set:
  """Every array shape a jaxpr (and the jaxprs inside it) computes."""
  out = set()
  for eqn in jaxpr.eqns:
    out.update(
        tuple(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape")
    )
    for sub in jax_core.jaxprs_in_params(eqn.params):
      out |= _shapes(sub)
  return out


def test_no_whole_logits_exist_when_chunked():
  """With 4 chunks no [B, L, V] array is computed (only [B, L/4, V]);
  through logits_fn alone it is."""
  m, params = _model()
  batch = _batch()
  logits_fn = model_lib.make_logits_fn(m)
  head = model_lib.output_head(m)._replace(chunk_tokens=B * L // 4)

  def shapes(h):
    fn = functools.partial(
        head_lib.token_log_probs, logits_fn=logits_fn, head=h
    )
    return _shapes(
        jax.make_jaxpr(fn)(params, batch["inputs"], batch["targets"]).jaxpr
    )

  chunked = shapes(head)
  assert (B, L // 4, V) in chunked and (B, L, V) not in chunked
  assert (B, L, V) in shapes(None)


def test_the_eval_step_with_its_head_is_the_eval_step_without():
  """`evaluate.make_eval_step` chunks through the head (as `eval_step_for`
  does with the run's) and sums the same as through the whole logits."""
  m, params = _model()
  batch = _batch(1)
  logits_fn = model_lib.make_logits_fn(m)
  head = model_lib.output_head(m)._replace(chunk_tokens=B * L // 4)
  chunked = evaluate.make_eval_step(logits_fn, head=head)(params, batch)
  whole = evaluate.make_eval_step(logits_fn)(params, batch)
  assert set(chunked) == set(whole) == {"loss", "weight", "correct", "bytes"}
  for k in whole:
    np.testing.assert_allclose(chunked[k], whole[k], rtol=1e-6, err_msg=k)
