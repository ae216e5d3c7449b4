"""SAM and the edge of stability (Long & Bartlett, JMLR 2024).

Their language-model experiment ("Sharpness-Aware Minimization and the Edge
of Stability"): an autoregressive character-level Transformer
(6 layers, 8 heads, width 128, sequences of 64 characters) trained with
minibatch SAM (minibatches of 128) and cross-entropy on tiny_shakespeare, the
last 10,000 lines held out as the test set; plain SGD (no momentum, no weight
decay) at a constant learning rate eta in {0.01, 0.02, 0.05, 0.1, 0.2, 0.5}
and SAM radius rho in {0, 0.1, 0.3, 1.0} (rho = 0 is SGD). Their claim: the
operator norm lambda_max of the minibatch loss Hessian settles at the SAM edge
4 / (eta (1 + sqrt(1 + 8 rho / (eta ||g||)))) (nanodo_sam.sharpness.sam_edge,
with ||g|| the minibatch gradient norm), which lies below GD's 2/eta when
rho > 0.

Here the Transformer is the Nanodo one (pre-LayerNorm, GeLU, F = 4D = 512,
byte vocabulary V = 259 = 256 bytes + 3 specials); their model was written in
Haiku, so details such as initialisation and normalisation differ. Every
`diagnostics.every_steps` steps the loop logs, before the step and on the
current training minibatch, eos/lambda_max, eos/sam_edge, eos/two_over_lr,
eos/grad_norm and the alignment of g and of the SAM gradient with the top
eigenvector (nanodo_sam.diagnostics).

The data split is theirs: `tiny_shakespeare_split()` derives a train file
(the first 30,000 lines, 854,960 bytes) and a test file (the last 10,000
lines, 260,434 bytes) from the raw input.txt and points data.train_files /
data.eval_files at them (the TFDS tiny_shakespeare splits are different:
90% / 5% / 5% by characters). Loading the config writes nothing: the files
are written once into a cache folder ($NANODO_SAM_CACHE, default
~/.cache/nanodo_sam) when a run first reads them (nanodo_sam/text_split.py).
The raw file is the copy shipped with the package
(nanodo_sam/data_files/tiny_shakespeare/input.txt, karpathy/char-rnn's
input.txt), or $TINY_SHAKESPEARE_TXT.

Config arguments:
  configs/edge_of_stability.py          their setting (eta 0.1, rho 0.1 by
                                        default; sweep: configs/sweeps/
                                        edge_of_stability.py)
  configs/edge_of_stability.py:reduced  a CPU-sized version (2 layers, width
                                        64, batch 32, 300 steps; 2-3
                                        CPU-minutes per run; sweep:
                                        configs/sweeps/
                                        edge_of_stability_reduced.py)

  nanodo-sam train --config=configs/edge_of_stability.py:reduced \
      --workdir=runs/eos/lr0.5-rho0.1 --config.opt.peak_learning_rate=0.5 \
      --config.sam.rho=0.1
  python scripts/plot_edge_of_stability.py runs/eos/* --out=eos.png

The project's settings from before its defaults became Nanodo's
(`rundir.LEGACY_DEFAULTS`: fan-in truncated normal init, packed rows of L+1
bytes without BOS, packed evaluation) are kept here, which is how the results
in docs/experiments.md were measured.

Not stated in the paper, our choices: the number of steps (they give
wall-clock time, 8-12 hours on a V100), how often lambda_max is measured and
with how many Lanczos iterations, and the evaluation set size.
"""

from nanodo_sam import keys
from nanodo_sam import rundir
from nanodo_sam import data as data_lib
from nanodo_sam import text_split

TEST_LINES = 10_000  # "The last 10000 lines ... were set aside as a test set"


def tiny_shakespeare_split() -> tuple[str, str]:
  """(train.txt, test.txt) of the split: their paths (nothing written)."""
  return text_split.split_paths(data_lib.tiny_shakespeare_txt(), TEST_LINES)


def get_config(arg: str = ""):
  if arg not in ("", "full", "reduced"):
    raise ValueError(
        f"unknown config argument {arg!r}; use "
        "configs/edge_of_stability.py or "
        "configs/edge_of_stability.py:reduced"
    )
  c = keys.defaults()
  c.schedule_name = "edge_of_stability" + (
      "_reduced" if arg == "reduced" else ""
  )
  rundir.legacy_defaults(c)
  c.model.update(D=128, H=8, N=6, F=512, L=64, V=259)
  c.model.size_name = "eos"
  train_file, test_file = tiny_shakespeare_split()
  c.data.vocab = "byte"
  c.data.tfds_name = ""  # Unused: the files below replace TFDS.
  c.data.train_files = train_file
  c.data.eval_files = test_file
  c.data.batch_size = 128
  c.data.eval_batch_size = 128
  c.data.eval_steps = 16  # 2,048 test rows (~131K characters).
  c.data.shuffle_buffer = 16_384  # ~ all 13.2K training rows of 65 bytes.

  c.opt.optimizer = "sgd"  # Plain SGD: no momentum.
  c.opt.decay_type = "constant"
  c.opt.warmup_steps = 0
  c.opt.weight_decay = 0.0
  c.opt.peak_learning_rate = 0.1  # Constant: eta (the sweep varies it).
  c.opt.num_train_steps = 20_000

  c.sam.method = "sam"  # rho = 0 is plain SGD.
  c.sam.rho = 0.1

  c.diagnostics.every_steps = 100
  c.diagnostics.on_train_batch = True
  c.diagnostics.num_iters = 20
  c.diagnostics.tol = 1e-3
  c.eval_every_steps = 1000
  c.checkpoint_every_steps = 2000
  c.log_every_steps = 100

  if arg == "reduced":
    # 98,624 non-embedding parameters (the full model: 1,181,312).
    c.model.update(D=64, H=4, N=2, F=256)
    c.data.batch_size = 32
    c.data.eval_batch_size = 64
    c.data.eval_steps = 4
    c.opt.num_train_steps = 300
    c.diagnostics.every_steps = 15
    c.diagnostics.num_iters = 12
    c.eval_every_steps = 100
    c.checkpoint_every_steps = 0  # Only the final one.
    c.log_every_steps = 25
  return c
