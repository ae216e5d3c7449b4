"""Every config key, with its default and meaning. Other configs start here.

The defaults are Nanodo's wherever the paper is silent (the paper's numbers
came out of Nanodo; docs/fidelity.md has the row-by-row comparison), so a run
from this file or from configs/c4_*.py is comparable with the paper's tables.
The settings this project used before it matched Nanodo are kept as named
options (`config.LEGACY_DEFAULTS` lists them).

Override any key on the command line, e.g.
  nanodo-sam train --config=configs/base.py --config.sam.method=sam
"""

import os
import sys

import ml_collections
from ml_collections import config_dict

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:  # `nanodo_sam` from any directory.
  sys.path.insert(0, _ROOT)

from nanodo_sam.loss import HEAD_CHUNK_TOKENS  # pylint: disable=g-import-not-at-top


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0                      # Fixes init, training data order and RNG.
  c.workdir = ""                  # Run directory (or --workdir=DIR).
  c.schedule_name = ""            # fixed_length | chinchilla (for tables).

  # Model: the Nanodo Transformer (nanodo_sam/model.py). Defaults: 2M size.
  c.model = ml_collections.ConfigDict()
  c.model.D = 256                 # Width.
  c.model.H = 4                   # Attention heads (D % H == 0).
  c.model.N = 3                   # Blocks.
  c.model.F = 1024                # MLP hidden width (4D in the paper).
  c.model.L = 512                 # Sequence length (tokens per row).
  c.model.V = 32101               # Vocabulary size (>= the vocabulary's).
  c.model.nonlinearity = "gelu"   # gelu | relu (Table 5).
  # Compute dtype: float32 | bfloat16. Nanodo defaults to bfloat16, as do
  # configs/c4_*.py; float32 here because this file also starts the CPU
  # configs (quickstart, tests), where bfloat16 is emulated and slower.
  c.model.dtype = "float32"
  c.model.remat = False           # Rematerialise each block in backward.
  # Tokens per device in one chunk of the output layer + loss (the [B, L, V]
  # logits are never whole); 0 = whole logits. GPU matmuls want >= ~2K.
  c.model.head_chunk_tokens = HEAD_CHUNK_TOKENS
  # Attention and MLP kernel init: xavier_uniform (Nanodo's DoConfig default)
  # | fan_in_truncated_normal (this project's before it matched Nanodo).
  c.model.kernel_init = "xavier_uniform"
  # Under dtype=bfloat16: "float32" keeps the embeddings, the residual stream
  # and the tied output layer in float32 (Nanodo: its embeddings have no
  # dtype); "compute" runs them in `dtype` as well (cheaper, less exact).
  c.model.residual_dtype = "float32"
  # Attention kernel: auto (cuDNN flash attention on an NVIDIA GPU of compute
  # capability >= 8.0 with dtype=bfloat16 and head dim D/H a multiple of 8 up
  # to 128, or 256 on Hopper; XLA everywhere else, TPU and CPU included) | xla
  # | cudnn (an error where it cannot run). The sharpness diagnostics always
  # use xla (cuDNN's kernel has no forward-mode derivative).
  c.model.attention = "auto"
  c.model.size_name = ""          # Label of a paper size (configs/sizes.py).

  # Data: seqio Tasks over TFDS or files (nanodo_sam/data.py).
  c.data = ml_collections.ConfigDict()
  c.data.tfds_name = "c4/en:3.1.0"
  # A folder or gs:// bucket holding the prepared TFDS dataset; "" =
  # $TFDS_DATA_DIR, else ~/tensorflow_datasets (TFDS's default).
  c.data.tfds_data_dir = ""
  # True: read the copy shipped with the package (nanodo_sam/data_files:
  # tiny_shakespeare, and of c4/en:3.1.0 a 1,000-document subset) when
  # neither tfds_data_dir nor $TFDS_DATA_DIR holds the dataset. False here:
  # the paper's configs train on the full C4.
  c.data.use_shipped = False
  # True: TFDS downloads and prepares a dataset that is not there (needs
  # internet; the full C4 is large). False: its absence is an error saying
  # how to get it.
  c.data.download = False
  c.data.train_split = "train"
  c.data.eval_split = "validation"
  # Glob of .txt, .jsonl[.gz] or .parquet files: overrides TFDS.
  c.data.train_files = ""
  c.data.eval_files = ""          # Glob for evaluation (with train_files).
  c.data.text_column = "text"     # The text field of .jsonl / .parquet rows.
  # A SentencePiece model: "shipped:FILE" (a file shipped with the package:
  # the T5 C4 vocabulary, 32,101 pieces), a path (local or gs://); or "byte".
  c.data.vocab = "shipped:c4_t5_sentencepiece_cc_all.32000.100extra.model"
  c.data.batch_size = 256         # Global batch, in sequences.
  c.data.eval_batch_size = 64
  # Eval batches, in order: per_document reads at most one pass of the split.
  c.data.eval_steps = 8
  c.data.shuffle_buffer = 1024    # Packed-row shuffle buffer.
  # Frame each document BOS + ids + EOS (Nanodo's _py_tokenize); needs a
  # vocabulary with a BOS piece (the T5 one has bos=2; `byte` has none).
  c.data.add_bos = True
  # nanodo: rows of L tokens, targets shifted by one, the last position
  # unscored (Nanodo's get_in_out) | shifted: rows of L+1, all L scored.
  c.data.packing = "nanodo"
  # per_document: each eval document on its own, BOS-framed, padded or cut
  # to L, token-weighted (Nanodo's evaluator: what the paper's eval losses
  # are) | packed: eval rows packed like the training rows.
  c.data.eval_mode = "per_document"

  # Optimizer (nanodo_sam/optimizer.py).
  c.opt = ml_collections.ConfigDict()
  c.opt.optimizer = "adamw"       # adamw | sgd | momentum.
  c.opt.num_train_steps = 10_000
  c.opt.peak_learning_rate = 1e-3
  # Warmup start and decay end; None = peak / 10 (Nanodo's default config;
  # the paper states neither), so they follow the peak in an lr sweep.
  c.opt.init_learning_rate = config_dict.placeholder(float)
  c.opt.final_learning_rate = config_dict.placeholder(float)
  c.opt.warmup_steps = 1000
  c.opt.decay_type = "cosine"     # cosine | linear | constant.
  # With independent_weight_decay (Nanodo's option, on here): the per-step
  # decay at the peak learning rate, 1e-4 (the paper's "decoupled weight
  # decay 1e-4"; optax gets weight_decay / peak, which at lr 1e-3 is the
  # paper's other statement, 0.1). Off: optax's coefficient (x lr).
  c.opt.weight_decay = 1e-4
  c.opt.independent_weight_decay = True
  # Comma-separated name fragments of parameters not decayed (Nanodo's
  # weight_decay_exclusion_names; its default, like ours, decays all), e.g.
  # "scale,embedding".
  c.opt.weight_decay_exclusions = ""
  c.opt.b1 = 0.9                  # Adam b1; SGD momentum for "momentum".
  c.opt.b2 = 0.98                 # Nanodo's AdamW b2 (the paper is silent).
  c.opt.eps = 1e-9                # Nanodo's AdamW eps.
  c.opt.clip_by_global_norm = 0.0  # 0 = no clipping (Nanodo's default).

  # The gradient step (nanodo_sam/sam.py).
  c.sam = ml_collections.ConfigDict()
  # adamw | sam | functional_sam | logit_sam | angle_sam | precond_sam |
  # precond_functional_sam | adaptive_sam | gsam | momentum_sam
  # (docs/sam_variants.md).
  c.sam.method = "adamw"
  c.sam.rho = 0.0                 # Perturbation radius.
  c.sam.phi = config_dict.placeholder(float)  # Angle-SAM angle (radians).
  c.sam.rho_warmup_steps = 0      # rho grows linearly from 0 over this.
  c.sam.start_step = 0            # Plain gradient before this step.
  c.sam.end_step = -1             # Plain gradient from this step (-1: never).
  c.sam.every_k = 1               # SAM-family step every k-th step.
  # LookSAM-style reuse (with every_k > 1): the steps in between take g plus
  # the last measured (method gradient - g), rescaled to the current ||g||.
  c.sam.reuse = False
  c.sam.precond_normalize = "after"  # after: rho P^-1g/|P^-1g|; before.
  # global | microbatch (each its own eps) | replica (each data shard its own).
  c.sam.perturbation_scope = "global"
  # GSAM's weight of -g_orth (gsam, precond_gsam; 0 = SAM); needed there.
  c.sam.alpha = config_dict.placeholder(float)
  # ASAM's eta in T = |theta| + eta (adaptive methods); None = 0.01.
  c.sam.adaptive_eta = config_dict.placeholder(float)
  # constant | lr: rho follows the learning rate from rho_min (at the lowest
  # rate) to rho (at the peak), GSAM's schedule; any method.
  c.sam.rho_schedule = "constant"
  c.sam.rho_min = config_dict.placeholder(float)  # With 'lr'; None = 0.

  # Microbatches per step (lax.scan); 0 = auto: the fewest whose compiled
  # step fits a device's memory (mesh.device_memory_gb), chosen at start-up.
  c.grad_accumulation_steps = 1

  c.eval_every_steps = 500        # 0 = only at the end.
  c.checkpoint_every_steps = 1000  # 0 = only at the end.
  c.checkpoint_max_to_keep = 3
  c.log_every_steps = 50

  # Sharpness diagnostics during training (nanodo_sam/sharpness.py).
  c.diagnostics = ml_collections.ConfigDict()
  c.diagnostics.every_steps = 0   # 0 = off.
  c.diagnostics.num_batches = 1   # Fixed eval batches the metrics use.
  c.diagnostics.batch_size = 8    # Sequences per diagnostics batch.
  c.diagnostics.num_iters = 20    # Lanczos iterations (0: no lambda_max).
  c.diagnostics.num_probes = 10   # Hutchinson probes (0: no traces).
  c.diagnostics.tol = 1e-3        # Lanczos relative tolerance.
  # True: lambda_max, ||g||, SAM-edge, 2/lr and eigenvector alignments on the
  # current training minibatch (edge of stability) instead of the fixed set.
  c.diagnostics.on_train_batch = False

  # A profiler trace of steps [start_step, start_step + num_steps) in the
  # workdir (plugins/profile/, TensorBoard's profile tab), process 0 only.
  c.profile = ml_collections.ConfigDict()
  c.profile.start_step = 10       # >= 1: step 0 compiles.
  c.profile.num_steps = 0         # 0 = off.

  c.wandb = ml_collections.ConfigDict()
  c.wandb.enabled = False
  c.wandb.project = "nanodo-sam"
  c.wandb.mode = "offline"        # online | offline | disabled.

  # Device mesh (nanodo_sam/sharding.py); -1 fills the remaining devices.
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  # Memory of one device in GiB for the fit checks (auto microbatches, the
  # refusal of a step that cannot fit); 0 = the device's own. XLA gets
  # XLA_PYTHON_CLIENT_MEM_FRACTION (JAX's default 0.75) of it.
  c.mesh.device_memory_gb = 0.0
  return c
