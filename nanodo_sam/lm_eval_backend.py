"""lm-evaluation-harness over the project's own forward (`nanodo-sam lm-eval`).

`JaxLM` is a harness model (`lm_eval.api.model.TemplateLM`, the base of the
harness's Hugging Face model, so requests are split into context and
continuation ids the same way) that scores as evaluation does: the run's
model, dtype, mesh and chunked output head (`head.token_log_probs`; the
[B, L, V] logits exist one chunk at a time). Every forward is one [B, L]
batch (B = data.eval_batch_size, L = model.L), padded, so it compiles once.
A request longer than L keeps its last L + 1 tokens, as the harness's HF
model does; perplexity tasks are scored in the harness's rolling windows of
L tokens; `generate_until` is greedy on the KV-cached sampler (sample.py).
The `hf` backend is the harness's own HFLM over the exported model
(export.py).

Imports lm_eval (the `eval` extra) at import time: only `nanodo-sam lm-eval`
and the training loop's lm-eval hook import this module.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM

from nanodo_sam import data as data_lib
from nanodo_sam import head as head_lib
from nanodo_sam import sample as sample_lib
from nanodo_sam import sharding


class JaxLM(TemplateLM):
  """The harness's LM over a restored run (checkpoint.Restored's setup and
  parameters) and its vocabulary (data.make_vocab)."""

  def __init__(self, setup, params, vocab, batch_size: int):
    super().__init__()
    self.setup, self.params, self.vocab = setup, params, vocab
    self.batch_size = batch_size
    self.max_length = setup.model.cfg.L
    self._score = jax.jit(
        functools.partial(
            head_lib.token_log_probs,
            logits_fn=setup.logits_fn,
            head=setup.head,
        )
    )

  @property
  def eot_token_id(self) -> int:
    return self.vocab.eos_id

  @property
  def prefix_token_id(self) -> int:
    """What an empty context is: BOS where the vocabulary has one, else EOS
    (a document boundary), as the harness's HF model chooses."""
    bos = data_lib.bos_id(self.vocab)
    return self.eot_token_id if bos is None else bos

  def tok_encode(self, string: str, add_special_tokens=None, **kwargs):
    del add_special_tokens, kwargs  # The vocabulary adds no BOS or EOS.
    return list(self.vocab.encode(string)) if string else []

  def _rows(self, pairs):
    """(inputs [n, L], targets [n, L], scored [n, L]) of (context ids,
    continuation ids) pairs: the last L + 1 tokens, the continuation's
    positions scored, padded with 0 on the right."""
    n, L = len(pairs), self.max_length
    inputs, targets, scored = (np.zeros((n, L), np.int32) for _ in range(3))
    for i, (context, continuation) in enumerate(pairs):
      whole = (list(context) + list(continuation))[-(L + 1) :]
      k = len(whole) - 1
      inputs[i, :k], targets[i, :k] = whole[:-1], whole[1:]
      scored[i, k - len(continuation) : k] = 1
    return inputs, targets, scored

  def score_pairs(self, pairs) -> list[tuple[float, bool]]:
    """(sum of the continuation's log-probabilities, whether every one of
    its tokens is the argmax) per (context ids, continuation ids)."""
    inputs, targets, scored = self._rows(pairs)
    out, B = [], self.batch_size
    for start in range(0, len(pairs), B):
      rows = [a[start : start + B] for a in (inputs, targets)]
      pad = B - len(rows[0])
      rows = [np.pad(a, ((0, pad), (0, 0))) for a in rows]
      batch = sharding.global_batch(
          {"inputs": rows[0], "targets": rows[1]}, self.setup.mesh
      )
      logp, greedy = jax.device_get(
          self._score(self.params, batch["inputs"], batch["targets"])
      )
      mask = scored[start : start + B].astype(bool)
      for j in range(len(mask)):
        out.append(
            (
                float(np.sum(logp[j][mask[j]], dtype=np.float64)),
                bool(np.all(greedy[j][mask[j]])),
            )
        )
    return out

  def _loglikelihood_tokens(self, requests, **kwargs):
    return self.score_pairs([(c, t) for _, c, t in requests])

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
    out = []
    for (text,) in [r.args for r in requests]:
      windows = [
          lm_utils.make_disjoint_window(w)
          for w in lm_utils.get_rolling_token_windows(
              token_list=self.tok_encode(text),
              prefix_token=self.prefix_token_id,
              max_seq_len=self.max_length,
              context_len=1,
          )
      ]
      out.append(sum(lp for lp, _ in self.score_pairs(windows)))
    return out

  def generate_until(self, requests, disable_tqdm: bool = False):
    out = []
    for context, kwargs in [r.args for r in requests]:
      until = kwargs.get("until") or [self.vocab.decode([self.eot_token_id])]
      until = [until] if isinstance(until, str) else list(until)
      prompt = self.tok_encode(context)[-self.max_length :] or [
          self.prefix_token_id
      ]
      num_new = sample_lib.max_new_tokens(
          len(prompt), self.max_length, kwargs.get("max_gen_toks", 256)
      )
      new = sample_lib.generate(
          self.setup.model,
          self.params,
          prompt,
          num_new=num_new,
          key=jax.random.key(0),
          vocab_size=self.vocab.vocab_size,
          eos_id=self.eot_token_id,
      )[0]
      text = self.vocab.decode(_before_eos(new.tolist(), self.eot_token_id))
      for stop in until:
        if stop:
          text = text.split(stop)[0]
      out.append(text)
    return out


def _before_eos(ids: list[int], eos: int) -> list[int]:
  return ids[: ids.index(eos)] if eos in ids else ids
