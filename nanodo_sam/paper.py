"""The paper's published numbers (nanodo_sam/paper.json), table by table.

Reference data, not results of this code: the "paper" columns of
`nanodo-sam tables` (nanodo_sam/tables.py), and the layout of the paper's
tables (which sizes, methods and non-linearities, in the paper's order) that
the tables and the sweeps in configs/sweeps/ follow. NaN where the paper
reports NaN (the run diverged).
"""

from __future__ import annotations

import functools
import json
import os

PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "paper.json")
NAN = float("nan")


@functools.cache
def _tables() -> dict:
  with open(PATH) as f:
    return json.load(f)["tables"]


def keys() -> tuple[str, ...]:
  """The tables: "table1", ..., "table6"."""
  return tuple(_tables())


def info(table: str) -> dict:
  """A table's source ("Table 2"), caption and the fields every row shares
  (schedule, size, nonlinearity)."""
  return {k: v for k, v in _tables()[table].items() if k != "rows"}


def rows(table: str) -> list[dict]:
  """The table's rows in the paper's order, each with the table-wide fields
  filled in and null as NaN."""
  t = _tables()[table]
  shared = {
      k: v for k, v in t.items() if k in ("schedule", "size", "nonlinearity")
  }
  return [
      {**shared, **{k: NAN if v is None else v for k, v in row.items()}}
      for row in t["rows"]
  ]


def column(table: str, field: str) -> tuple:
  """The distinct values of `field` down the table, in the paper's order
  (e.g. the sizes or methods of Table 2)."""
  return tuple(dict.fromkeys(r[field] for r in rows(table)))


def value(table: str, field: str = "eval_loss", **where) -> float:
  """The published `field` of the row matching `where` (e.g.
  size="23.9M", method="sam"); NaN if the paper gives none."""
  for r in rows(table):
    if all(r.get(k) == v for k, v in where.items()):
      return r.get(field, NAN)
  return NAN
