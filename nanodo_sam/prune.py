"""One-shot global magnitude pruning (paper Figure 5).

`prune(params, fraction)` zeroes exactly round(fraction * n) of the n
non-embedding weights, those of smallest |w| pooled over every kernel and
LayerNorm scale of the model (one global threshold, unstructured). The token
embedding (tied with the output layer) and the position embedding are never
pruned. `prune_eval` evaluates a list of fractions;
`nanodo-sam prune-eval --workdir=DIR --fractions=0,0.1,...` writes
DIR/prune.json and prints the table.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Callable, Sequence

import jax
import numpy as np

from nanodo_sam import keys
from nanodo_sam.errors import UsageError

EMBEDDINGS = ("embed", "pos_embed")


def _top_key(path) -> str:
  k = path[0]
  return str(getattr(k, "key", getattr(k, "name", k)))


def is_prunable(path, exclude: Sequence[str] = EMBEDDINGS) -> bool:
  """A leaf is pruned unless it lies under a top-level embedding module."""
  return _top_key(path) not in exclude


def parse_fractions(text: str) -> list[float]:
  """'0,0.1,0.5' -> [0.0, 0.1, 0.5]; UsageError unless each is in [0, 1)."""
  items = [t.strip() for t in str(text).split(",") if t.strip()]
  if not items:
    raise UsageError(
        "--fractions is empty; give comma-separated fractions "
        "in [0, 1), e.g. --fractions=0,0.1,0.2,0.5"
    )
  out = []
  for t in items:
    try:
      f = float(t)
    except ValueError:
      raise UsageError(
          f"--fractions: {t!r} is not a number; give "
          "comma-separated fractions in [0, 1), e.g. "
          "--fractions=0,0.1,0.2,0.5"
      ) from None
    if not (math.isfinite(f) and 0.0 <= f < 1.0):
      raise UsageError(
          f"--fractions: {t} is outside [0, 1); a fraction is "
          "the share of non-embedding weights set to zero, e.g. "
          "--fractions=0,0.1,0.2,0.5"
      )
    out.append(f)
  return out


def prunable_count(params, exclude: Sequence[str] = EMBEDDINGS) -> int:
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  return sum(int(np.size(x)) for p, x in leaves if is_prunable(p, exclude))


def prune(params, fraction: float, exclude: Sequence[str] = EMBEDDINGS):
  """params with the `fraction` smallest-|w| non-embedding weights zeroed.

  Exactly round(fraction * n) weights are zeroed (ties broken by position),
  pooled globally over all prunable leaves. Pruned leaves come back as numpy
  arrays of the same dtype; embedding leaves are returned as they are.
  """
  if not (0.0 <= fraction < 1.0):
    raise ValueError(f"fraction={fraction} must lie in [0, 1)")
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  idx = [i for i, (p, _) in enumerate(leaves) if is_prunable(p, exclude)]
  if fraction == 0.0 or not idx:
    return params
  host = [np.asarray(jax.device_get(leaves[i][1])) for i in idx]
  sizes = [h.size for h in host]
  n = sum(sizes)
  k = int(round(fraction * n))
  if k == 0:
    return params
  flat = np.concatenate([np.abs(h).ravel().astype(np.float32) for h in host])
  drop = np.argpartition(flat, k - 1)[:k] if k < n else np.arange(n)
  keep = np.ones(n, bool)
  keep[drop] = False
  new = [x for _, x in leaves]
  offset = 0
  for i, h, size in zip(idx, host, sizes):
    mask = keep[offset : offset + size].reshape(h.shape)
    new[i] = np.where(mask, h, np.zeros((), h.dtype)).astype(h.dtype)
    offset += size
  return jax.tree_util.tree_unflatten(treedef, new)


def zero_fraction(params, exclude: Sequence[str] = EMBEDDINGS) -> float:
  """The share of exact zeros among the prunable weights."""
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  arrays = [
      np.asarray(jax.device_get(x))
      for p, x in leaves
      if is_prunable(p, exclude)
  ]
  n = sum(a.size for a in arrays)
  return sum(int(np.sum(a == 0)) for a in arrays) / max(n, 1)


def prune_eval(
    params,
    fractions: Sequence[float],
    eval_fn: Callable[[Any], float],
    put_params: Callable[[Any], Any] = lambda p: p,
    exclude: Sequence[str] = EMBEDDINGS,
    log: Callable[[str], None] | None = None,
) -> list[tuple[float, float, float]]:
  """[(fraction, eval loss, actual zero fraction)] for each fraction.

  eval_fn(params) -> float evaluates on the fixed eval batches; put_params
  places pruned (numpy) params back on the devices with their sharding.
  """
  rows = []
  for f in fractions:
    pruned = prune(params, f, exclude)
    actual = zero_fraction(pruned, exclude)
    loss = float(eval_fn(put_params(pruned) if f > 0 else params))
    rows.append((float(f), loss, actual))
    if log:
      log(f"pruned {f:.3f} (actual {actual:.4f}): eval loss {loss:.4f}")
  return rows


def format_table(rows: Sequence[tuple[float, float, float]]) -> str:
  base = rows[0][1] if rows and rows[0][0] == 0.0 else None
  lines = [
      "fraction  actual   eval_loss" + ("  delta" if base else ""),
      "--------  -------  ---------" + ("  -------" if base else ""),
  ]
  for f, loss, actual in rows:
    line = f"{f:8.3f}  {actual:7.4f}  {loss:9.4f}"
    if base is not None:
      line += f"  {loss - base:+7.4f}"
    lines.append(line)
  return "\n".join(lines)


def write_prune_json(workdir: str, rows, *, step: int, cfg=None) -> str:
  """DIR/prune.json: {"step", "method", "rho", "model_size_name", "results":
  [{"fraction", "eval_loss", "actual_fraction"}, ...]} (what
  scripts/plot_pruning.py reads)."""
  out = {
      "step": int(step),
      "results": [
          {"fraction": f, "eval_loss": l, "actual_fraction": a}
          for f, l, a in rows
      ],
  }
  if cfg is not None:
    out.update(
        method=cfg.sam.method,
        rho=cfg.sam.rho,
        model_size_name=keys.of(cfg.model, "model.size_name"),
        seed=cfg.seed,
    )
  path = os.path.join(workdir, "prune.json")
  if jax.process_index() == 0:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(out, f, indent=2)
    os.replace(tmp, path)
  return path
