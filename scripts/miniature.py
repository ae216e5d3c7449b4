"""The paper in miniature: analyse the study's runs, write docs/miniature.md.

    python scripts/miniature.py runs/miniature [--doc=docs/miniature.md]
        [--figures=docs] [--no-analyze]

The report is nanodo_sam/miniature.py's.
"""

import sys

from nanodo_sam import miniature

if __name__ == "__main__":
  sys.exit(miniature.main())
