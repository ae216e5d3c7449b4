"""A miniature C4 run trained further on tiny_shakespeare: forgetting.

The model, vocabulary (C4's SentencePiece) and optimizer constants are
configs/miniature.py's; the data is tiny_shakespeare (shipped with the
package; one long document, so evaluation reads packed rows), and every eval
also measures the C4 eval set the run was pretrained on, logged as
eval_c4/loss: the forgetting curve is in the run's own logs. Set `init_from`
to the pretrained run (its parameters; fresh AdamW state, schedule and step
counter). The continued budget is fixed: CONTINUE_STEPS steps of plain
AdamW at a peak learning rate of 3e-3 (a third of pretraining's), whatever
the source run's method, with the same data order (seed 0) for every
source, so sources are compared on the same batches.

  nanodo-sam train --config=configs/continued.py --workdir=runs/cont \\
      --config.init_from=runs/sam_buys/sam-rho0.1-seed1
"""

import os

from configs import miniature

CONTINUE_STEPS = 100
# The pretraining data, whose eval set measures forgetting.
PRETRAINING = os.path.join(os.path.dirname(__file__), "miniature.py")


def get_config():
  c = miniature.get_config()
  c.schedule_name = "continued"
  c.data.tfds_name = "tiny_shakespeare:1.0.0"
  c.data.eval_mode = "packed"
  c.data.eval_steps = 4
  c.opt.num_train_steps = CONTINUE_STEPS
  c.opt.warmup_steps = CONTINUE_STEPS // 10
  c.opt.peak_learning_rate = 3e-3
  c.eval_every_steps = 25
  c.eval_data_from = PRETRAINING
  c.eval_data_name = "c4"
  return c
