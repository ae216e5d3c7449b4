"""Every config key: its default, type, range or choices, and meaning.

`KEYS` is the one table of them. `defaults()` builds the ConfigDict every
config file starts from (configs/base.py returns it); `check(cfg)` checks each
key's type and range against the same table. The defaults are Nanodo's
wherever the paper is silent (docs/fidelity.md has the row-by-row
comparison), so a run from the defaults or from configs/c4_*.py is comparable
with the paper's tables. Checks that relate several keys live with the module
that owns them; `validation.validate` asks each.

Override any key on the command line, e.g.
  nanodo-sam train --config=configs/base.py --config.sam.method=sam
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Callable

import ml_collections
from ml_collections import config_dict

from nanodo_sam import sam as sam_lib
from nanodo_sam.errors import UsageError
from nanodo_sam.loss import HEAD_CHUNK_TOKENS


@dataclasses.dataclass(frozen=True)
class Key:
  """One config key. Its value is of one of `types` and `ok(value)` holds,
  else UsageError "NAME=VALUE `need`". none_ok: None (an unset placeholder,
  the default then) is allowed. choices: the allowed values, where listed."""

  name: str
  default: Any
  meaning: str
  types: tuple = (str,)
  ok: Callable[[Any], bool] = lambda v: True
  need: str = ""
  none_ok: bool = False
  choices: tuple = ()


def _str(name: str, default: str, meaning: str) -> Key:
  return Key(name, default, meaning)


def _flag(name: str, default: bool, meaning: str) -> Key:
  return Key(name, default, meaning, (bool,))


def _int(
    name: str, default: int, least: int, meaning: str, note: str = ""
) -> Key:
  need = (
      f"must be a positive integer{note}"
      if least == 1
      else f"must be an integer >= {least}{note}"
  )
  return Key(name, default, meaning, (int,), lambda v: v >= least, need)


def _num(
    name: str,
    default: float | None,
    meaning: str,
    least: float | None = 0.0,
    below: float | None = None,
    note: str = "",
) -> Key:
  """A finite number >= least (None: any) and < below (None: no bound);
  a None default makes None allowed."""
  need = (
      "must be a finite number"
      if least is None
      else f"must be >= {least:g}"
      if below is None
      else f"must lie in [{least:g}, {below:g})"
  )
  return Key(
      name,
      default,
      meaning,
      (float,),
      lambda v: (
          math.isfinite(v)
          and (least is None or v >= least)
          and (below is None or v < below)
      ),
      need + note,
      default is None,
  )


def choice(name: str, default: str, options: tuple, meaning: str) -> Key:
  """A key whose value is one of `options` (the one choice mechanism)."""
  return Key(
      name,
      default,
      meaning,
      (str,),
      lambda v: v in options,
      f"is unknown; use one of {', '.join(options)}",
      choices=tuple(options),
  )


def _mesh_axis(axis: str, default: int) -> Key:
  return Key(
      f"mesh.{axis}",
      default,
      f"Devices on the {axis} axis.",
      (int,),
      lambda v: v == -1 or v >= 1,
      "must be a positive integer, or -1 (the devices left)",
  )


BYTE_VOCAB = "byte"  # data.vocab for seqio's ByteVocabulary (no BOS piece).

_RUN = (
    _int("seed", 0, 0, "Fixes init, training data order and RNG."),
    _str("workdir", "", "Run directory (or --workdir=DIR)."),
    _str("schedule_name", "", "fixed_length | chinchilla (for tables)."),
    _str(
        "init_from",
        "",
        "DIR[:STEP]: start from that run's parameters (its newest "
        "checkpoint, or STEP) with a fresh optimizer state, schedule and "
        "step counter; the source is only read, and a resumed run resumes "
        "from its own checkpoints (nanodo_sam/init_from.py).",
    ),
)
_MODEL = (  # The Nanodo Transformer (nanodo_sam/model.py); 2M size.
    _int("model.D", 256, 1, "Width."),
    _int("model.H", 4, 1, "Attention heads (D % H == 0)."),
    _int("model.N", 3, 1, "Blocks."),
    _int("model.F", 1024, 1, "MLP hidden width (4D in the paper)."),
    _int("model.L", 512, 1, "Sequence length (tokens per row)."),
    _int("model.V", 32101, 1, "Vocabulary size (>= the vocabulary's)."),
    choice(
        "model.nonlinearity",
        "gelu",
        ("gelu", "relu"),
        "The MLP nonlinearity (Table 5).",
    ),
    choice(
        "model.dtype",
        "float32",
        ("float32", "bfloat16"),
        "Compute dtype. Nanodo defaults to bfloat16, as "
        "do configs/c4_*.py; float32 here because the defaults also start "
        "the CPU configs (quickstart, tests), where bfloat16 is emulated "
        "and slower.",
    ),
    _flag("model.remat", False, "Rematerialise each block in backward."),
    _int(
        "model.head_chunk_tokens",
        HEAD_CHUNK_TOKENS,
        0,
        "Tokens per device in one chunk of the output layer + loss (the "
        "[B, L, V] logits are never whole); 0 = whole logits. GPU matmuls "
        "want >= ~2K.",
        " (0: whole logits)",
    ),
    choice(
        "model.kernel_init",
        "xavier_uniform",
        ("xavier_uniform", "fan_in_truncated_normal"),
        "Attention and MLP kernel init: xavier_uniform (Nanodo's DoConfig "
        "default) | fan_in_truncated_normal (the legacy default).",
    ),
    choice(
        "model.residual_dtype",
        "float32",
        ("float32", "compute"),
        "Under dtype=bfloat16: float32 keeps the embeddings, the residual "
        "stream and the tied output layer in float32 (Nanodo: its "
        "embeddings have no dtype); compute runs them in `dtype` as well "
        "(cheaper, less exact).",
    ),
    choice(
        "model.attention",
        "auto",
        ("auto", "xla", "cudnn"),
        "Attention kernel: auto (cuDNN flash attention on an NVIDIA GPU of "
        "compute capability >= 8.0 with dtype=bfloat16 and head dim D/H a "
        "multiple of 8 up to 128, or 256 on Hopper; XLA everywhere else, "
        "TPU and CPU included) | xla | cudnn (an error where it cannot "
        "run). The sharpness diagnostics always use xla (cuDNN's kernel "
        "has no forward-mode derivative).",
    ),
    _str("model.size_name", "", "Label of a paper size (configs/sizes.py)."),
)
_DATA = (  # seqio Tasks over TFDS or files (nanodo_sam/data.py).
    _str("data.tfds_name", "c4/en:3.1.0", "The TFDS dataset."),
    _str(
        "data.tfds_data_dir",
        "",
        'A folder or gs:// bucket holding the prepared TFDS dataset; "" = '
        "$TFDS_DATA_DIR, else ~/tensorflow_datasets (TFDS's default).",
    ),
    _flag(
        "data.use_shipped",
        False,
        "True: read the copy shipped with the package "
        "(nanodo_sam/data_files: tiny_shakespeare, and of c4/en:3.1.0 a "
        "1,000-document subset) when neither tfds_data_dir nor "
        "$TFDS_DATA_DIR holds the dataset. False here: the paper's configs "
        "train on the full C4.",
    ),
    _flag(
        "data.download",
        False,
        "True: TFDS downloads and prepares a dataset that is not there "
        "(needs internet; the full C4 is large). False: its absence is an "
        "error saying how to get it.",
    ),
    _str("data.train_split", "train", "The TFDS training split."),
    _str("data.eval_split", "validation", "The TFDS evaluation split."),
    _str(
        "data.train_files",
        "",
        "Glob of .txt, .jsonl[.gz] or .parquet files: overrides TFDS.",
    ),
    _str("data.eval_files", "", "Glob for evaluation (with train_files)."),
    Key(
        "data.text_column",
        "text",
        "The text field of .jsonl / .parquet rows.",
        (str,),
        bool,
        "must name the text field of the .jsonl / .parquet files, e.g. "
        "'text'",
    ),
    _str(
        "data.vocab",
        "shipped:c4_t5_sentencepiece_cc_all.32000.100extra.model",
        'A SentencePiece model: "shipped:FILE" (a file shipped with the '
        "package: the T5 C4 vocabulary, 32,101 pieces), a path (local or "
        f'gs://); or "{BYTE_VOCAB}".',
    ),
    _int("data.batch_size", 256, 1, "Global batch, in sequences."),
    _int("data.eval_batch_size", 64, 1, "Global eval batch, in sequences."),
    _int(
        "data.eval_steps",
        8,
        1,
        "Eval batches, in order: per_document reads at most one pass of "
        "the split.",
    ),
    _int(
        "data.shuffle_buffer",
        1024,
        1,
        "Packed-row shuffle buffer.",
        " (1 = no shuffling)",
    ),
    _flag(
        "data.add_bos",
        True,
        "Frame each document BOS + ids + EOS (Nanodo's _py_tokenize); "
        "needs a vocabulary with a BOS piece (the T5 one has bos=2; "
        "`byte` has none).",
    ),
    choice(
        "data.packing",
        "nanodo",
        ("nanodo", "shifted"),
        "nanodo: rows of L tokens, targets shifted by one, the last "
        "position unscored (Nanodo's get_in_out) | shifted: rows of L+1, "
        "all L scored.",
    ),
    choice(
        "data.eval_mode",
        "per_document",
        ("per_document", "packed"),
        "per_document: each eval document on its own, BOS-framed, padded "
        "or cut to L, token-weighted (Nanodo's evaluator: what the "
        "paper's eval losses are) | packed: eval rows packed like the "
        "training rows.",
    ),
)
_OPT = (  # The optimizer (nanodo_sam/optimizer.py).
    choice(
        "opt.optimizer",
        "adamw",
        ("adamw", "sgd", "momentum"),
        "The base optimizer.",
    ),
    _int("opt.num_train_steps", 10_000, 1, "Training steps."),
    _num("opt.peak_learning_rate", 1e-3, "Learning rate after warmup."),
    _num(
        "opt.init_learning_rate",
        None,
        "Warmup start; None = peak / 10 (Nanodo's default config; the "
        "paper states neither), so it follows the peak in an lr sweep.",
        note=" (None: peak/10)",
    ),
    _num(
        "opt.final_learning_rate",
        None,
        "Decay end; None = peak / 10, like opt.init_learning_rate.",
        note=" (None: peak/10)",
    ),
    _int("opt.warmup_steps", 1000, 0, "Linear warmup steps."),
    choice(
        "opt.decay_type",
        "cosine",
        ("cosine", "linear", "constant"),
        "The decay after warmup.",
    ),
    _num(
        "opt.weight_decay",
        1e-4,
        "With independent_weight_decay (Nanodo's option, on here): the "
        "per-step decay at the peak learning rate, 1e-4 (the paper's "
        '"decoupled weight decay 1e-4"; optax gets weight_decay / peak, '
        "which at lr 1e-3 is the paper's other statement, 0.1). Off: "
        "optax's coefficient (x lr).",
    ),
    _flag(
        "opt.independent_weight_decay",
        True,
        "Divide opt.weight_decay by the peak learning rate (above).",
    ),
    _str(
        "opt.weight_decay_exclusions",
        "",
        "Comma-separated name fragments of parameters not decayed "
        "(Nanodo's weight_decay_exclusion_names; its default, like this "
        'one, decays all), e.g. "scale,embedding".',
    ),
    _num("opt.b1", 0.9, 'Adam b1; SGD momentum for "momentum".', below=1),
    _num("opt.b2", 0.98, "Nanodo's AdamW b2 (the paper is silent).", below=1),
    _num("opt.eps", 1e-9, "Nanodo's AdamW eps."),
    _num(
        "opt.clip_by_global_norm",
        0.0,
        "0 = no clipping (Nanodo's default).",
        note=" (0: off)",
    ),
)
# The gradient step (nanodo_sam/sam.py). The methods' own options (sam.phi,
# sam.alpha, ...) are declared by their registry entries (`sam.Option`) and
# listed after sam.rho (`method_keys`).
_SAM = (
    _str(
        "sam.method",
        "adamw",
        "adamw (the plain step) or a method of sam.METHODS: sam | "
        "functional_sam | logit_sam | angle_sam | precond_sam | "
        "precond_functional_sam | adaptive_sam | gsam | momentum_sam ... "
        "(docs/sam_variants.md)",
    ),
    _num("sam.rho", 0.0, "Perturbation radius."),
    _int("sam.rho_warmup_steps", 0, 0, "rho grows linearly from 0 over this."),
    _int("sam.start_step", 0, 0, "Plain gradient before this step."),
    _int(
        "sam.end_step",
        -1,
        -1,
        "Plain gradient from this step (-1: never).",
        " (-1: until the end)",
    ),
    _int("sam.every_k", 1, 1, "SAM-family step every k-th step."),
    _flag(
        "sam.reuse",
        False,
        "LookSAM-style reuse (with every_k > 1): the steps in between take "
        "g plus the last measured (method gradient - g), rescaled to the "
        "current ||g||.",
    ),
    choice(
        "sam.perturbation_scope",
        "global",
        ("global", "microbatch", "replica"),
        "global | microbatch (each microbatch its own eps) | replica (each "
        "data-parallel shard its own eps): where the step is perturbed "
        "(nanodo_sam/distribute.py).",
    ),
    choice(
        "sam.rho_schedule",
        "constant",
        ("constant", "lr"),
        "constant, or lr: rho follows the learning rate from sam.rho_min "
        "(at the lowest rate) to sam.rho (at the peak), GSAM's schedule; "
        "any method.",
    ),
    _num(
        "sam.rho_min",
        None,
        "With sam.rho_schedule='lr': rho at the "
        "lowest learning rate; unset = 0.",
    ),
)
_LOOP = (
    _int(
        "grad_accumulation_steps",
        1,
        0,
        "Microbatches per step (lax.scan); 0 = auto: the fewest whose "
        "compiled step fits a device's memory (mesh.device_memory_gb), "
        "chosen at start-up.",
        " (0: auto, the fewest microbatches that fit)",
    ),
    _int(
        "eval_every_steps",
        500,
        0,
        "0 = only at the end.",
        " (0: only at the end)",
    ),
    _str(
        "eval_data_from",
        "",
        "RUN|FILE: at every eval, also the eval set of that run "
        "directory's (or config file's) data config, logged as "
        "eval_<eval_data_name>/<metric>: the forgetting curve of a run "
        "continued on other data (init_from). Same vocabulary.",
    ),
    Key(
        "eval_data_name",
        "other",
        "The second eval set's name in the logs.",
        (str,),
        lambda v: v.isidentifier(),
        "must be a name of letters, digits and _ (a log tag)",
    ),
    _int(
        "checkpoint_every_steps",
        1000,
        0,
        "0 = only at the end.",
        " (0: only at the end)",
    ),
    _int(
        "checkpoint_max_to_keep",
        3,
        1,
        "Checkpoints kept.",
        " (else nothing is left to resume from)",
    ),
    _int("log_every_steps", 50, 1, "Training metrics every this many steps."),
)
_LM_EVAL = (  # lm-evaluation-harness during training (lm_eval_hook.py).
    _str(
        "eval.lm_eval_tasks",
        "",
        "lm-evaluation-harness tasks run on the parameters during training, "
        "comma-separated (e.g. nanodo_cloze,nanodo_shakespeare); '' = off. "
        "Needs the eval extra.",
    ),
    _int(
        "eval.lm_eval_every",
        0,
        0,
        "Run eval.lm_eval_tasks every this many steps; 0 = only at the end.",
        " (0: only at the end)",
    ),
)
_DIAGNOSTICS = (  # Sharpness during training (nanodo_sam/sharpness.py).
    _int("diagnostics.every_steps", 0, 0, "0 = off.", " (0: off)"),
    _int(
        "diagnostics.num_batches", 1, 1, "Fixed eval batches the metrics use."
    ),
    _int("diagnostics.batch_size", 8, 1, "Sequences per diagnostics batch."),
    _int(
        "diagnostics.num_iters",
        20,
        0,
        "Lanczos iterations.",
        " (0 leaves out lambda_max)",
    ),
    _int(
        "diagnostics.num_probes",
        10,
        0,
        "Hutchinson probes.",
        " (0 leaves out the traces)",
    ),
    Key(
        "diagnostics.tol",
        1e-3,
        "Lanczos relative tolerance.",
        (float,),
        lambda v: math.isfinite(v) and v > 0,
        "must be a positive number",
    ),
    _flag(
        "diagnostics.on_train_batch",
        False,
        "True: lambda_max, ||g||, SAM-edge, 2/lr and eigenvector "
        "alignments on the current training minibatch (edge of "
        "stability) instead of the fixed set.",
    ),
)
_OUTPUT = (
    _int(
        "profile.start_step",
        10,
        1,
        "A profiler trace of steps [start_step, start_step + num_steps) in "
        "the workdir (plugins/profile/, TensorBoard's profile tab), process "
        "0 only; >= 1: step 0 compiles.",
        " (step 0 compiles)",
    ),
    _int("profile.num_steps", 0, 0, "0 = off.", " (0: off)"),
    _flag("wandb.enabled", False, "Log to Weights & Biases."),
    _str("wandb.project", "nanodo-sam", "The W&B project."),
    choice(
        "wandb.mode",
        "offline",
        ("online", "offline", "disabled"),
        "The W&B mode.",
    ),
)
_MESH = (  # The device mesh (nanodo_sam/sharding.py).
    _mesh_axis("data", -1),
    _mesh_axis("fsdp", 1),
    _mesh_axis("tensor", 1),
    _num(
        "mesh.device_memory_gb",
        0.0,
        "Memory of one device in GiB for the fit checks (auto "
        "microbatches, the refusal of a step that cannot fit); 0 = the "
        "device's own. XLA gets XLA_PYTHON_CLIENT_MEM_FRACTION (JAX's "
        "default 0.75) of it.",
        note=" (0: the device's own)",
    ),
)


def _option_key(option: sam_lib.Option) -> Key:
  """The config key of a method's option (`sam.Option`): its default,
  range or choices and meaning, naming the methods that read it."""
  users = ", ".join(sorted(sam_lib.methods_with(option.name)))
  meaning = f"{option.meaning} Read by: {users}."
  if option.choices:
    return choice(option.key, option.default, option.choices, meaning)
  return _num(option.key, option.default, meaning, least=option.least)


def method_keys() -> tuple[Key, ...]:
  """The keys of every registered method's options, in registry order."""
  return tuple(_option_key(o) for o in sam_lib.all_options().values())


def all_keys() -> tuple[Key, ...]:
  """Every config key, in the order of the default config; the methods'
  options as the registry has them now (a method registered later adds
  its own)."""
  i = [k.name for k in _SAM].index("sam.rho") + 1
  return (
      *_RUN,
      *_MODEL,
      *_DATA,
      *_OPT,
      *_SAM[:i],
      *method_keys(),
      *_SAM[i:],
      *_LOOP,
      *_DIAGNOSTICS,
      *_LM_EVAL,
      *_OUTPUT,
      *_MESH,
  )


def by_name() -> dict[str, Key]:
  """{name: Key} of `all_keys()`."""
  return {k.name: k for k in all_keys()}


def __getattr__(name: str):
  """KEYS (`all_keys()`) and BY_NAME (`by_name()`), read when asked, so they
  hold the options of methods registered after import."""
  if name == "KEYS":
    return all_keys()
  if name == "BY_NAME":
    return by_name()
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def defaults() -> ml_collections.ConfigDict:
  """The default config: every key of KEYS at its default."""
  c = ml_collections.ConfigDict()
  for key in all_keys():
    *parents, last = key.name.split(".")
    node = c
    for part in parents:
      if part not in node:
        node[part] = ml_collections.ConfigDict()
      node = node[part]
    node[last] = (
        config_dict.placeholder(key.types[0])
        if key.default is None
        else key.default
    )
  return c


_KINDS = {
    int: "an integer",
    float: "a number",
    str: "a string",
    bool: "True or False",
}
_MISSING = object()


def get(cfg, name: str, default=None):
  """cfg's value at dotted `name`, or `default` where it has none."""
  node = cfg
  for part in name.split("."):
    if part not in node:
      return default
    node = node[part]
  return node


def of(section, name: str):
  """The value of key `name` (dotted, e.g. "data.packing") in `section`, the
  config block it lives in (cfg.data), else the key table's default: a
  block built by hand or read from an old run holds only some keys, and the
  table is the one source of every default."""
  return section.get(name.rsplit(".", 1)[-1], by_name()[name].default)


def _is(value, types: tuple) -> bool:
  if isinstance(value, bool):
    return bool in types
  if float in types and isinstance(value, numbers.Real):
    return True
  if int in types and isinstance(value, numbers.Integral):
    return True
  return isinstance(value, tuple(t for t in types if t not in (int, float)))


def check_choice(name: str, value) -> None:
  """UsageError unless `value` is one of key `name`'s choices."""
  key = by_name()[name]
  if not key.ok(value):
    raise UsageError(f"{name}={value!r} {key.need}")


def check(cfg, keys=None) -> None:
  """Each key's type and range (`keys`: default all); UsageError on the
  first bad one. Keys a config lacks (as an old run's config.json may) are
  skipped."""
  for key in all_keys() if keys is None else keys:
    value = get(cfg, key.name, _MISSING)
    if value is _MISSING or (value is None and key.none_ok):
      continue
    if not _is(value, key.types):
      kinds = " or ".join(_KINDS[t] for t in key.types)
      raise UsageError(
          f"{key.name}={value!r} must be {kinds}"
          + (" or None" if key.none_ok else "")
      )
    if not key.ok(value):
      raise UsageError(f"{key.name}={value!r} {key.need}")
