"""The base config at one of the paper's model sizes (nanodo_sam/sizes.py).

  nanodo-sam params --config=configs/sizes.py:23.9M
"""

from configs import base
from nanodo_sam import sizes


def get_config(size: str = sizes.DEFAULT):
  """The base config (configs/base.py) at model size `size`."""
  return sizes.apply(base.get_config(), size or sizes.DEFAULT)
