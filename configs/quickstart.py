"""A tiny byte-level model on tiny_shakespeare: trains in ~1 minute on a CPU.

tiny_shakespeare is one long document and the byte vocabulary has no BOS
piece, so documents are closed with EOS only and evaluation reads packed rows;
everything else is base.py's (Nanodo's) defaults.
"""

from nanodo_sam import keys


def get_config():
  c = keys.defaults()
  c.model.update(D=128, H=4, N=2, F=512, L=128, V=259)
  c.data.tfds_name = "tiny_shakespeare:1.0.0"
  c.data.use_shipped = True  # The text shipped with the package, offline.
  c.data.vocab = "byte"
  c.data.add_bos = False
  c.data.eval_mode = "packed"
  c.data.batch_size = 16
  c.data.eval_batch_size = 16
  c.data.eval_steps = 4
  c.opt.num_train_steps = 300
  c.opt.warmup_steps = 30
  c.opt.peak_learning_rate = 3e-3
  c.eval_every_steps = 100
  c.checkpoint_every_steps = 100
  c.log_every_steps = 25
  return c
