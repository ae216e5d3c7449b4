# Copyright 2026 The nanodo-sam Authors.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     https://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""Sampling text from a model with a KV cache (`nanodo-sam sample`).

The prompt is encoded with the run's own vocabulary and framed as its
documents were in training (BOS first under `data.add_bos`; a run without
BOS starts an empty prompt at a document boundary, EOS). `generate` prefills
the cache with the prompt in one pass, then takes one jitted step per new
token (`model.make_decode_fn`: the model's own forward pass in decode mode),
so a token costs one forward of one position plus attention over the cache.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from nanodo_sam import data as data_lib
from nanodo_sam import model as model_lib
from nanodo_sam.errors import UsageError


def prompt_ids(vocab, text: str, add_bos: bool) -> list[int]:
  """The prompt as the model saw documents begin: [BOS] + ids with
  `add_bos`; without it, the ids, or [EOS] (a document boundary) when the
  prompt is empty."""
  ids = list(vocab.encode(text)) if text else []
  if add_bos:
    return [data_lib.bos_id(vocab)] + ids
  return ids or [vocab.eos_id]


def max_new_tokens(prompt_len: int, context: int, wanted: int) -> int:
  """How many tokens fit: the last one needs no position of its own, so a
  prompt of P <= L tokens leaves room for L - P + 1."""
  if prompt_len > context:
    raise UsageError(
        f"the prompt is {prompt_len} tokens, longer than the model's context "
        f"model.L={context}; shorten --prompt"
    )
  return min(wanted, context - prompt_len + 1)


def _choose(logits_BxV, key, temperature: float, top_k: int, vocab_size: int):
  """The next token: argmax at temperature 0, else a sample from
  softmax(logits / temperature) over the top_k ids (0: all). Ids the
  vocabulary lacks (model.V may exceed it) are never chosen."""
  logits_BxV = logits_BxV.astype(jnp.float32)
  if vocab_size < logits_BxV.shape[-1]:
    ids_V = jnp.arange(logits_BxV.shape[-1])
    logits_BxV = jnp.where(ids_V < vocab_size, logits_BxV, -jnp.inf)
  if temperature == 0:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  logits_BxV = logits_BxV / temperature
  if 0 < top_k < logits_BxV.shape[-1]:
    kth_Bx1 = jax.lax.top_k(logits_BxV, top_k)[0][:, -1:]
    logits_BxV = jnp.where(logits_BxV < kth_Bx1, -jnp.inf, logits_BxV)
  return jax.random.categorical(key, logits_BxV).astype(jnp.int32)


@functools.lru_cache(maxsize=16)
def _decode_step(
    model: model_lib.TransformerDo,
    temperature: float,
    top_k: int,
    vocab_size: int,
):
  """Jitted (params, cache, tokens [B, T], key) -> (the token after the
  last one [B], cache), compiled once per prompt length and once for T = 1,
  and kept across `generate` calls."""
  decode_fn = model_lib.make_decode_fn(model)

  @functools.partial(jax.jit, donate_argnums=1)
  def step(params, cache, tokens_BxT, key):
    logits_BxTxV, cache = decode_fn(params, cache, tokens_BxT)
    return (
        _choose(logits_BxTxV[:, -1], key, temperature, top_k, vocab_size),
        cache,
    )

  return step


def generate(
    model: model_lib.TransformerDo,
    params,
    prompt: list[int],
    *,
    num_new: int,
    key: jax.Array,
    temperature: float = 0.0,
    top_k: int = 0,
    num_samples: int = 1,
    vocab_size: int | None = None,
    eos_id: int | None = None,
) -> np.ndarray:
  """[num_samples, n] new token ids after `prompt` (n <= num_new; fewer
  once every sample has produced `eos_id`). The prompt (1 <= P <= L tokens)
  is prefilled in one pass; each further token is one jitted decode step.
  P + num_new - 1 must not exceed model.L (`max_new_tokens`)."""
  L = model.cfg.L
  if not 1 <= len(prompt) <= L or len(prompt) + num_new - 1 > L:
    raise ValueError(
        f"a prompt of {len(prompt)} tokens and {num_new} new "
        f"ones do not fit the context L={L}"
    )
  step = _decode_step(
      model, float(temperature), int(top_k), int(vocab_size or model.cfg.V)
  )
  cache = model_lib.init_cache(model, num_samples)
  tokens_BxP = jnp.tile(jnp.asarray(prompt, jnp.int32), (num_samples, 1))
  keys = jax.random.split(key, num_new)
  token_B, cache = step(params, cache, tokens_BxP, keys[0])
  out = [token_B]
  done_B = np.zeros(num_samples, bool)
  for i in range(1, num_new):
    if eos_id is not None:
      done_B |= np.asarray(out[-1]) == eos_id
      if done_B.all():
        break
    token_B, cache = step(params, cache, token_B[:, None], keys[i])
    out.append(token_B)
  return np.stack([np.asarray(t) for t in out], axis=1)


def text(vocab, prompt: list[int], new_ids: np.ndarray) -> str:
  """The prompt and one sample's continuation decoded together (so word
  boundaries between them survive), cut at the first EOS; BOS and EOS
  framing are dropped."""
  ids = [i for i in prompt if i != vocab.eos_id]
  for i in new_ids.tolist():
    if i == vocab.eos_id:
      break
    ids.append(i)
  bos = data_lib.bos_id(vocab)
  return vocab.decode([i for i in ids if i != bos])
