"""What the plot scripts share: headless pyplot and writing a figure."""

from __future__ import annotations

import os


def pyplot():
  """matplotlib.pyplot on the Agg backend (no display needed)."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  return plt


def default_out(paths, name: str) -> str:
  """<the folder the inputs share>/figures/<name>: where a figure goes when
  --out is not given."""
  parent = os.path.commonpath([os.path.abspath(p) for p in paths])
  if os.path.isfile(parent):
    parent = os.path.dirname(parent)
  return os.path.join(parent, "figures", name)


def save(fig, out: str, dpi: int = 120, note: str = "") -> None:
  """Lays out `fig`, writes it to `out` (creating its folder), says so."""
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  fig.savefig(out, dpi=dpi)
  print(f"wrote {out}{note}")
