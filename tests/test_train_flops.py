"""Cumulative training FLOPs (nanodo_sam/train_flops.py) against counts
made by hand from the registry's passes per method and step kind."""

import pytest

from conftest import tiny_config
from nanodo_sam import train_flops

# The tiny model (D32 N1 F64 L32 V259), batch 8: per token
# 6 x 8,288 non-embedding params + 6 x 259 x 32 + 12 x 1 x 32 x 32 = 111,744;
# 256 tokens per step.
PLAIN = 111_744 * 256


def _cfg(**sam):
  return tiny_config(**{f"sam.{k}": v for k, v in sam.items()})


@pytest.mark.parametrize(
    "sam,plain_steps_per_10",
    [
        ({"method": "adamw"}, 10),
        ({"method": "sam"}, 20),  # 2 forwards + 2 backwards a step.
        ({"method": "momentum_sam"}, 10),  # 1 + 1: no extra pass.
        ({"method": "angle_sam"}, 10 * 16 / 6),  # 2 forwards, 3 backwards.
        ({"method": "sam", "start_step": 4}, 4 + 6 * 2),  # Late phase.
        ({"method": "sam", "every_k": 3}, 4 * 2 + 6),  # SAM at 0, 3, 6, 9.
        ({"method": "sam", "every_k": 3, "reuse": True}, 4 * 2 + 6),
    ],
)
def test_training_flops_count_each_step_kind(sam, plain_steps_per_10):
  cfg = _cfg(**sam)
  assert train_flops.plain_step_flops(cfg) == PLAIN
  assert train_flops.train_flops(cfg, 10) == pytest.approx(
      PLAIN * plain_steps_per_10, rel=1e-12
  )


def test_the_counter_counts_each_step_once():
  cfg = _cfg(method="sam", every_k=3, start_step=2)
  count = train_flops.Counter(cfg)
  for n in (1, 5, 5, 9, 25):
    assert count(n) == pytest.approx(train_flops.train_flops(cfg, n))
  assert count(3) == pytest.approx(train_flops.train_flops(cfg, 3))
