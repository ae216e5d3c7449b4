"""Starting a run from another run's parameters: `init_from=DIR[:STEP]`.

The new run takes the parameters of DIR's checkpoint STEP (default: its
newest) and nothing else: a fresh optimizer state, schedule, step counter and
RNG, its own workdir and data config (continued pretraining, or fine-tuning
on another corpus, with any method). Only the `params` subtree is read, with
orbax's partial restore, so the source may have been trained with another
optimizer or method. The source run is only read. A run that has checkpoints
of its own resumes from them and never reads the source again (it may have
been deleted by then). MaxText's `load_parameters_path` and Levanter's
`initialize_from` do the same.
"""

from __future__ import annotations

import logging
import os

import flax.linen as nn
import jax
import orbax.checkpoint as ocp
from etils import epath

from nanodo_sam import model as model_lib
from nanodo_sam import rundir
from nanodo_sam.errors import UsageError

log = logging.getLogger("nanodo_sam")
ITEM = "default"  # orbax's item name of a checkpoint's TrainState


def parse(spec: str) -> tuple[str, int | None]:
  """ "DIR[:STEP]" -> (DIR, STEP or None)."""
  head, sep, tail = spec.rpartition(":")
  if sep and head and tail.isdigit():
    return head, int(tail)
  return spec, None


def steps(workdir: str) -> list[int]:
  """The finished checkpoint steps in `workdir`/checkpoints, ascending
  (orbax's unfinished saves carry a suffix after the step)."""
  ckpts = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(ckpts):
    return []
  return sorted(int(n) for n in os.listdir(ckpts) if n.isdigit())


def _item(directory: str, step: int) -> epath.Path:
  return (
      epath.Path(os.path.abspath(directory)) / "checkpoints" / str(step) / ITEM
  )


def _shapes(tree) -> dict:
  """{"a/b/c": shape} of a parameter tree's leaves."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {
      "/".join(str(getattr(k, "key", k)) for k in path): tuple(x.shape)
      for path, x in flat
  }


def source(cfg, workdir: str) -> tuple[str, int] | None:
  """(directory, step) the run in `workdir` starts from; None when
  cfg.init_from is empty or the run has checkpoints of its own (it resumes
  from them). UsageError (one line) when the source does not exist, has no
  such checkpoint, is the workdir itself, or holds parameters of other shapes
  or another vocabulary than cfg's model. Reads only the source's
  config.json and checkpoint metadata."""
  spec = cfg.get("init_from", "")
  if not spec or steps(workdir):
    return None
  directory, step = parse(spec)
  if os.path.abspath(directory) == os.path.abspath(workdir):
    raise UsageError(
        f"init_from={spec!r} is the run's own workdir; start "
        "the new run in another --workdir"
    )
  if not os.path.isdir(directory):
    raise UsageError(
        f"init_from={spec!r}: no directory {directory!r}; "
        "point it at a run directory (DIR or DIR:STEP)"
    )
  have = steps(directory)
  if not have:
    raise UsageError(
        f"init_from={spec!r}: no checkpoint in "
        f"{directory!r}/checkpoints; train that run first"
    )
  if step is not None and step not in have:
    raise UsageError(
        f"init_from={spec!r}: no checkpoint for step {step}; "
        f"available steps: {have}"
    )
  step = have[-1] if step is None else step
  _check_fits(cfg, spec, directory, step)
  return directory, step


def _check_fits(cfg, spec: str, directory: str, step: int) -> None:
  src = rundir.read_config(directory)
  if src.data.vocab != cfg.data.vocab:
    raise UsageError(
        f"init_from={spec!r} was trained with data.vocab={src.data.vocab!r}, "
        f"this run uses {cfg.data.vocab!r}; use the source's vocabulary"
    )
  try:
    meta = ocp.PyTreeCheckpointHandler().metadata(_item(directory, step))
    there = _shapes(meta.tree["params"])
  except Exception as e:  # pylint: disable=broad-except
    raise UsageError(
        f"init_from={spec!r}: checkpoint {step} cannot be read "
        f"({str(e).splitlines()[0] if str(e) else e!r})"
    ) from None
  here = _shapes(
      nn.unbox(
          model_lib.abstract_params(
              model_lib.TransformerDo(model_lib.from_config(cfg))
          )
      )
  )
  for name in sorted(set(here) | set(there)):
    if here.get(name) != there.get(name):
      raise UsageError(
          f"init_from={spec!r} does not fit this model: parameter {name} is "
          f"{there.get(name)} there, {here.get(name)} here; use the source's "
          "model config (model.D, H, N, F, L, V)"
      )


def load_params(directory: str, step: int, abstract_params):
  """The parameters of `directory`'s checkpoint `step`, placed like
  `abstract_params` (ShapeDtypeStructs with shardings)."""
  args = jax.tree.map(
      lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, dtype=a.dtype),
      abstract_params,
  )
  out = ocp.PyTreeCheckpointHandler().restore(
      _item(directory, step),
      args=ocp.args.PyTreeRestore(
          item={"params": abstract_params},
          restore_args={"params": args},
          partial_restore=True,
      ),
  )
  log.info(
      "parameters from step %d of %s (init_from); fresh optimizer "
      "state, schedule and step counter",
      step,
      directory,
  )
  return out["params"]
