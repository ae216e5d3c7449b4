"""The default config: every key at its default (nanodo_sam/keys.py holds
each key's default, type, range and meaning). Other configs start here.

Override any key on the command line, e.g.
  nanodo-sam train --config=configs/base.py --config.sam.method=sam
"""

import os
import sys

import ml_collections

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:  # `nanodo_sam` from any directory.
  sys.path.insert(0, _ROOT)

from nanodo_sam import keys  # pylint: disable=g-import-not-at-top


def get_config() -> ml_collections.ConfigDict:
  return keys.defaults()
