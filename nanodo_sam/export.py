"""A checkpoint as a Hugging Face GPT-2 model directory (`nanodo-sam export`).

The Nanodo Transformer is GPT-2 (`GPT2LMHeadModel`) without biases: learned
positions (`pos_embed` -> `wpe`), pre-LayerNorm with a scale only (`ln_attn`,
`ln_mlp`, `out_ln` -> `ln_1`, `ln_2`, `ln_f`, zero biases, the model's own
epsilon), attention with 1/sqrt(head_dim) scores whose query, key and value
kernels [D, H, D/H] are concatenated into `c_attn` [D, 3D] and whose output
kernel [H, D/H, D] is `attn.c_proj` [D, D], a tanh-GELU (or ReLU) MLP
(`fc1`, `fc2` -> `mlp.c_fc`, `mlp.c_proj`), and the output layer tied to the
token embedding (`embed` -> `wte`). Every other bias is zero. GPT-2's Conv1D
layers hold [in, out] weights, as flax kernels are, so nothing is
transposed.

Weights go to `model.safetensors` in float32, the run's parameters as they
are (a bfloat16-compute run keeps float32 parameters; the export computes in
float32, so its logits differ from that run's by bfloat16 rounding). The
tokenizer is hf_tokenizer.py's. Needs only the `export` extra (safetensors,
tokenizers); neither torch nor transformers.
"""

from __future__ import annotations

import datetime
import json
import os

import numpy as np

from nanodo_sam import data as data_lib
from nanodo_sam import hf_tokenizer
from nanodo_sam import model as model_lib
from nanodo_sam.errors import UsageError

WEIGHTS = "model.safetensors"
MARKER = "nanodo_sam_export.json"  # What was exported, from where.
FILES = (
    WEIGHTS,
    "config.json",
    "generation_config.json",
    MARKER,
    hf_tokenizer.SPM_FILE,
) + hf_tokenizer.TOKENIZER_FILES
ACTIVATIONS = {"gelu": "gelu_new", "relu": "relu"}  # nn.gelu is tanh GELU.


def check_extra() -> None:
  """UsageError (one line) unless the `export` extra is installed."""
  for module in ("safetensors", "tokenizers"):
    try:
      __import__(module)
    except ImportError:
      raise UsageError(
          f"`nanodo-sam export` needs {module}; install the "
          "export extra: pip install -e '.[export]'"
      ) from None


def check_out_dir(out: str) -> None:
  """UsageError unless `out` is absent, empty or an earlier export (which
  is replaced); nothing is touched."""
  if not out:
    raise UsageError(
        "--out=DIR is required (the Hugging Face model directory to write)"
    )
  if os.path.exists(out) and not os.path.isdir(out):
    raise UsageError(f"--out={out!r} is a file; pass a directory")
  if os.path.isdir(out) and os.listdir(out):
    other = sorted(set(os.listdir(out)) - set(FILES))
    if other or MARKER not in os.listdir(out):
      what = ", ".join(other[:3]) if other else f"but no {MARKER}"
      raise UsageError(
          f"--out={out!r} holds something other than an export ({what}); "
          "pass an empty or new directory, or an earlier export to replace"
      )


def layer_norm_epsilon(cfg: model_lib.DoConfig) -> float:
  """The epsilon of the model's LayerNorms (flax's default, read from the
  layer the model builds)."""
  return float(model_lib._layer_norm(cfg, "ln").epsilon)  # pylint: disable=protected-access


def gpt2_config(cfg: model_lib.DoConfig, specials: dict) -> dict:
  """config.json of GPT2LMHeadModel for `cfg` (no dropout, tied output)."""
  ids = {
      f"{role}_token_id": specials[role][1] if role in specials else None
      for role in ("bos", "eos", "pad")
  }  # None: GPT-2's own would stay.
  return {
      "architectures": ["GPT2LMHeadModel"],
      "model_type": "gpt2",
      "vocab_size": cfg.V,
      "n_positions": cfg.L,
      "n_ctx": cfg.L,
      "n_embd": cfg.D,
      "n_layer": cfg.N,
      "n_head": cfg.H,
      "n_inner": cfg.F,
      "activation_function": ACTIVATIONS[cfg.nonlinearity],
      "layer_norm_epsilon": layer_norm_epsilon(cfg),
      "resid_pdrop": 0.0,
      "embd_pdrop": 0.0,
      "attn_pdrop": 0.0,
      "summary_first_dropout": 0.0,
      "scale_attn_weights": True,
      "scale_attn_by_inverse_layer_idx": False,
      "reorder_and_upcast_attn": False,
      "tie_word_embeddings": True,
      "use_cache": True,
      "dtype": "float32",
      **ids,
  }


def generation_config(
    cfg: model_lib.DoConfig, specials: dict, vocab_size: int
) -> dict:
  """Greedy decoding that stops at EOS and never picks an id the vocabulary
  lacks (model.V may exceed it), as `nanodo-sam sample` does."""
  out = {
      "do_sample": False,
      "eos_token_id": specials["eos"][1],
      "pad_token_id": specials["pad"][1],
      "max_length": cfg.L,
  }
  if "bos" in specials:
    out["bos_token_id"] = specials["bos"][1]
  if vocab_size < cfg.V:
    out["suppress_tokens"] = list(range(vocab_size, cfg.V))
  return out


def gpt2_weights(params, cfg: model_lib.DoConfig) -> dict[str, np.ndarray]:
  """GPT2LMHeadModel's state dict (float32, without the tied lm_head) from
  the model's parameters."""
  p = {k: v for k, v in params.items()}
  f32 = lambda x: np.asarray(x, np.float32)
  zeros = lambda n: np.zeros((n,), np.float32)
  D = cfg.D
  out = {
      "transformer.wte.weight": f32(p["embed"]["embedding"]),
      "transformer.wpe.weight": f32(p["pos_embed"]["embedding"]),
      "transformer.ln_f.weight": f32(p["out_ln"]["scale"]),
      "transformer.ln_f.bias": zeros(D),
  }
  for i in range(cfg.N):
    b, h = p[f"block_{i}"], f"transformer.h.{i}."
    attn = b["attn"]
    qkv = [
        f32(attn[n]["kernel"]).reshape(D, D) for n in ("query", "key", "value")
    ]
    out.update(
        {
            h + "ln_1.weight": f32(b["ln_attn"]["scale"]),
            h + "ln_1.bias": zeros(D),
            h + "attn.c_attn.weight": np.concatenate(qkv, axis=1),
            h + "attn.c_attn.bias": zeros(3 * D),
            h
            + "attn.c_proj.weight": f32(attn["attn_out"]["kernel"]).reshape(
                D, D
            ),
            h + "attn.c_proj.bias": zeros(D),
            h + "ln_2.weight": f32(b["ln_mlp"]["scale"]),
            h + "ln_2.bias": zeros(D),
            h + "mlp.c_fc.weight": f32(b["mlp"]["fc1"]["kernel"]),
            h + "mlp.c_fc.bias": zeros(cfg.F),
            h + "mlp.c_proj.weight": f32(b["mlp"]["fc2"]["kernel"]),
            h + "mlp.c_proj.bias": zeros(D),
        }
    )
  return {k: np.ascontiguousarray(v) for k, v in out.items()}


def _write_json(path: str, obj: dict) -> None:
  with open(path, "w") as f:
    json.dump(obj, f, indent=2)
    f.write("\n")


def write(
    out: str, params, cfg: model_lib.DoConfig, vocab_name: str, source: dict
) -> None:
  """Writes the model directory `out` (checked by `check_out_dir` first):
  weights, config, generation config, tokenizer, and MARKER with `source`
  (where the parameters came from)."""
  from safetensors.numpy import save_file  # Lazy: the `export` extra.

  built = hf_tokenizer.build(vocab_name)  # UsageError before any write.
  os.makedirs(out, exist_ok=True)
  specials = hf_tokenizer.write(vocab_name, out, cfg.L, built)
  vocab_size = data_lib.vocab_size(vocab_name)
  save_file(
      gpt2_weights(params, cfg),
      os.path.join(out, WEIGHTS),
      metadata={"format": "pt"},
  )
  _write_json(os.path.join(out, "config.json"), gpt2_config(cfg, specials))
  _write_json(
      os.path.join(out, "generation_config.json"),
      generation_config(cfg, specials, vocab_size),
  )
  _write_json(
      os.path.join(out, MARKER),
      {
          **source,
          "vocab": vocab_name,
          "compute_dtype": cfg.dtype,
          "exported_dtype": "float32",
          "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
              timespec="seconds"
          ),
      },
  )
