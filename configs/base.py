"""The default config: every key at its default (nanodo_sam/keys.py holds
each key's default, type, range and meaning). Other configs start here.

Override any key on the command line, e.g.
  nanodo-sam train --config=configs/base.py --config.sam.method=sam
"""

import ml_collections

from nanodo_sam import keys


def get_config() -> ml_collections.ConfigDict:
  return keys.defaults()
