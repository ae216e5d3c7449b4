"""The base config at one of the paper's model sizes (nanodo_sam/sizes.py).

nanodo-sam params --config=configs/sizes.py:23.9M
"""

from nanodo_sam import keys
from nanodo_sam import sizes


def get_config(size: str = sizes.DEFAULT):
  """The default config (nanodo_sam/keys.py) at model size `size`."""
  return sizes.apply(keys.defaults(), size or sizes.DEFAULT)
