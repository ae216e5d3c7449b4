"""The paper in miniature: its findings tested on a 2-core CPU (docs/miniature.md).

Everything is configs/base.py's, i.e. Nanodo's defaults (docs/fidelity.md):
xavier_uniform kernels, AdamW b2 0.98 / eps 1e-9, decoupled weight decay 1e-4
per step at the peak, warmup from and cosine decay to peak / 10, documents
framed BOS + ids + EOS in rows of L tokens, per-document evaluation. Scaled
down from the paper's 2M prototyping model so that the whole study (about 60
runs) fits in about two hours on 2 CPU cores:

    paper (2M):  D256 H4 N3 F1024, L 512, batch 256, 10K steps, 1.31B tokens
    miniature:   D64  H1 N2 F256,  L 64,  batch 16,  MINI_STEPS steps

The C4 subset shipped with the package (1,000 training documents, about 0.5M
T5 tokens) is read for about 0.6 epochs, so, as in the paper, no batch is
seen twice. The evaluation set is all 200 validation documents of the
subset, one per row, cut to L. Float32 compute (bfloat16 is emulated on a
CPU).

Config argument: options joined by "+", none by default:
  byte  the byte vocabulary (V = 259) instead of the C4 SentencePiece one
        (V = 32,101): the same model on the same C4 text with ~124x fewer
        outputs; it has no BOS piece, so documents are closed with EOS only;
  taus  the logit/functional split of the sharpness gradient (tau_logit,
        tau_func, tau_cross along g and along AdamW's P^-1 g) every 20
        steps on the 8 fixed validation rows, without lambda_max and traces.

  nanodo-sam train --config=configs/miniature.py --workdir=runs/mini \\
      --config.sam.method=precond_functional_sam --config.sam.rho=0.5
  nanodo-sam sweep configs/sweeps/miniature.py --backend=local
"""

from nanodo_sam import keys

MINI_STEPS = 300
OPTIONS = ("byte", "taus")
TAU_EVERY = 20


def get_config(arg: str = ""):
  options = [o for o in arg.split("+") if o]
  unknown = sorted(set(options) - set(OPTIONS))
  if unknown:
    raise ValueError(
        f"config argument {arg!r}: unknown {unknown}; use "
        f"options from {list(OPTIONS)} joined by '+', e.g. "
        "configs/miniature.py:byte+taus"
    )
  c = keys.defaults()
  c.schedule_name = "miniature"
  c.model.update(D=64, H=1, N=2, F=256, L=64, V=32101)
  c.model.size_name = "miniature"
  c.data.tfds_name = "c4/en:3.1.0"
  c.data.use_shipped = True  # The C4 subset shipped with the package.
  c.data.batch_size = 16
  c.data.eval_batch_size = 25
  c.data.eval_steps = 8  # The subset's 200 validation documents.
  c.opt.num_train_steps = MINI_STEPS
  c.opt.warmup_steps = MINI_STEPS // 10
  # The best of {1e-3, 3e-3, 1e-2, 3e-2, 1e-1} for AdamW at seed 0 (final
  # eval loss 7.48, 7.30, 7.16 at 300 steps; 3e-2 and 1e-1 were behind 1e-2
  # by 0.07 and 0.27 at step 150, and stopped there).
  c.opt.peak_learning_rate = 1e-2
  c.eval_every_steps = 50
  c.checkpoint_every_steps = 0  # The final one (analyze, prune-eval).
  c.log_every_steps = 25
  # What `nanodo-sam analyze` uses: 8 fixed validation rows, 20 Lanczos
  # iterations, 8 Hutchinson probes.
  c.diagnostics.num_batches = 1
  c.diagnostics.batch_size = 8
  c.diagnostics.num_iters = 20
  c.diagnostics.num_probes = 8
  if "byte" in options:
    c.data.vocab = "byte"
    c.model.V = 259
    c.data.add_bos = False
  if "taus" in options:
    c.diagnostics.every_steps = TAU_EVERY
    c.diagnostics.num_iters = 0
    c.diagnostics.num_probes = 0
  return c
