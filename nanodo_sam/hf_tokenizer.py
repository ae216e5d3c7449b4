"""A run's vocabulary as a Hugging Face tokenizer (`nanodo-sam export`).

Built with the `tokenizers` library (the `export` extra) from the vocabulary
the run trained with, so that `AutoTokenizer.from_pretrained(DIR)` gives the
project's ids:

- a SentencePiece model (the T5 C4 one): a Unigram model over its pieces and
  scores; its normaliser (the model's precompiled NFKC character map, then
  SentencePiece's removal of leading, trailing and repeated spaces); the
  Metaspace pre-tokenizer and decoder (U+2581 for a space, one in front of
  the text); its control pieces (pad, EOS, BOS) and <unk> as special tokens.
  Unknown pieces decode as SentencePiece's " ⁇ ".
- the byte vocabulary (seqio's: pad 0, EOS 1, unk 2, byte b at b + 3): a BPE
  model without merges over the 256 byte-level characters, so every UTF-8
  byte is one token.

Neither adds BOS or EOS (no post-processor): the project frames documents
itself (`data.add_bos`), and a harness's context/continuation split must see
the ids of the text alone. `tokenizer_config.json` names
PreTrainedTokenizerFast, which every transformers version since 4 loads.
"""

from __future__ import annotations

import json
import os
import shutil

from nanodo_sam import data as data_lib
from nanodo_sam.errors import UsageError
from nanodo_sam.keys import BYTE_VOCAB

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)
SPM_FILE = "spiece.model"  # The SentencePiece model, copied beside them.
UNK_SURFACE = " \u2047 "  # How SentencePiece decodes an unknown piece.


def _tokenizers():
  import tokenizers  # Lazy: the `export` extra.

  return tokenizers


def _spm_proto(path: str):
  from sentencepiece import sentencepiece_model_pb2  # Lazy: protobuf.

  proto = sentencepiece_model_pb2.ModelProto()
  with open(path, "rb") as f:
    proto.ParseFromString(f.read())
  return proto


def _specials(vocab) -> dict[str, tuple[str, int]]:
  """{role: (token, id)} of the vocabulary's special pieces: pad, eos, unk
  and, where it has one, bos (seqio's ids, as documents are framed)."""
  out = {
      "pad": ("<pad>", 0),
      "eos": ("</s>", vocab.eos_id),
      "unk": ("<unk>", vocab.unk_id),
  }
  tokenizer = getattr(vocab, "tokenizer", None)
  if tokenizer is not None:
    out = {role: (tokenizer.id_to_piece(i), i) for role, (_, i) in out.items()}
    out["pad"] = (tokenizer.id_to_piece(tokenizer.pad_id()), tokenizer.pad_id())
  bos = data_lib.bos_id(vocab)
  if bos is not None:
    out["bos"] = (vocab.tokenizer.id_to_piece(bos), bos)
  return out


def _sentencepiece_tokenizer(path: str, specials):
  tk = _tokenizers()
  proto = _spm_proto(path)
  spec = proto.normalizer_spec
  if not (
      spec.add_dummy_prefix
      and spec.escape_whitespaces
      and proto.trainer_spec.model_type == 1
  ):  # 1: UNIGRAM
    raise UsageError(
        f"{path}: only SentencePiece Unigram models with a dummy prefix "
        "and escaped whitespace export (the T5 C4 vocabulary is one)"
    )
  pieces = [(p.piece, p.score) for p in proto.pieces]
  tok = tk.Tokenizer(
      tk.models.Unigram(pieces, unk_id=specials["unk"][1], byte_fallback=False)
  )
  steps = []
  if spec.precompiled_charsmap:
    steps.append(tk.normalizers.Precompiled(spec.precompiled_charsmap))
  if spec.remove_extra_whitespaces:
    steps += [
        tk.normalizers.Replace(tk.Regex(" {2,}"), " "),
        tk.normalizers.Strip(left=True, right=True),
    ]
  tok.normalizer = tk.normalizers.Sequence(steps)
  tok.pre_tokenizer = tk.pre_tokenizers.Metaspace(
      replacement="\u2581", prepend_scheme="always", split=True
  )
  tok.decoder = tk.decoders.Sequence(
      [
          tk.decoders.Replace(specials["unk"][0], UNK_SURFACE),
          tk.decoders.Metaspace(
              replacement="\u2581", prepend_scheme="always", split=True
          ),
      ]
  )
  return tok


def _byte_tokenizer(specials):
  tk = _tokenizers()
  vocab = {token: i for token, i in specials.values()}
  for b, char in enumerate(_bytes_to_unicode()):
    vocab[char] = b + 3  # seqio.ByteVocabulary: 3 special ids first.
  tok = tk.Tokenizer(
      tk.models.BPE(vocab=vocab, merges=[], unk_token=specials["unk"][0])
  )
  tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(
      add_prefix_space=False, use_regex=False
  )
  tok.decoder = tk.decoders.ByteLevel()
  return tok


def _bytes_to_unicode() -> list[str]:
  """The printable character GPT-2's byte-level tokenizers (and `tokenizers`'
  ByteLevel pre-tokenizer) write for each byte 0..255."""
  printable = (
      list(range(ord("!"), ord("~") + 1))
      + list(range(ord("\xa1"), ord("\xac") + 1))
      + list(range(ord("\xae"), ord("\xff") + 1))
  )
  out, n = {}, 0
  for b in range(256):
    if b in printable:
      out[b] = chr(b)
    else:
      out[b] = chr(256 + n)
      n += 1
  return [out[b] for b in range(256)]


def build(vocab_name: str):
  """(tokenizers.Tokenizer, {role: (token, id)}) for `data.vocab`."""
  vocab = data_lib.make_vocab(vocab_name)
  specials = _specials(vocab)
  if vocab_name == BYTE_VOCAB:
    tok = _byte_tokenizer(specials)
  else:
    tok = _sentencepiece_tokenizer(data_lib.vocab_path(vocab_name), specials)
  tok.post_processor = None
  tok.add_special_tokens(
      [
          _tokenizers().AddedToken(token, special=True, normalized=False)
          for token, _ in sorted(specials.values(), key=lambda s: s[1])
      ]
  )
  return tok, specials


def write(vocab_name: str, out_dir: str, max_length: int, built=None) -> dict:
  """Writes the tokenizer files (and the .model file) into `out_dir`;
  returns {role: (token, id)} of the special tokens. `built`: `build`'s
  result, if made already."""
  tok, specials = built or build(vocab_name)
  tok.save(os.path.join(out_dir, "tokenizer.json"))
  tokens = {f"{role}_token": token for role, (token, _) in specials.items()}
  config = {
      "tokenizer_class": "PreTrainedTokenizerFast",
      "model_max_length": max_length,
      "clean_up_tokenization_spaces": False,
      "add_bos_token": False,
      "add_eos_token": False,
      **tokens,
  }
  for name, obj in (
      ("tokenizer_config.json", config),
      ("special_tokens_map.json", tokens),
  ):
    with open(os.path.join(out_dir, name), "w") as f:
      json.dump(obj, f, indent=2)
  if vocab_name != BYTE_VOCAB:
    shutil.copyfile(
        data_lib.vocab_path(vocab_name), os.path.join(out_dir, SPM_FILE)
    )
  return specials
