"""lm-evaluation-harness during training (the jax backend): the function of
the `train.Hook` that `eval.lm_eval_tasks` and `eval.lm_eval_every` add to
the loop (`train.default_hooks`; imported only when they are set).

At every `eval.lm_eval_every`-th step and at the end, the tasks run on the current
parameters through `lm_eval_backend.JaxLM`; each metric is written as the
scalar `lm_eval/TASK/METRIC` beside the eval loss (TensorBoard, wandb) and
the results go to `lm_eval_history.json` in the run directory, keyed by step
(and into results.json as "lm_eval"): a resumed run keeps them and does not
score a step twice.
"""

from __future__ import annotations

import json
import logging
import os
import numbers

from nanodo_sam import data as data_lib
from nanodo_sam import lm_eval_run
from nanodo_sam import rundir

HISTORY = "lm_eval_history.json"
log = logging.getLogger(__name__)


def scalars(results: dict) -> dict[str, float]:
  """{"lm_eval/TASK/METRIC": value} of simple_evaluate's results (numbers
  only; stderr left out)."""
  out = {}
  for task, metrics in results["results"].items():
    for key, value in metrics.items():
      name = key.split(",")[0]
      if isinstance(value, numbers.Number) and not name.endswith("_stderr"):
        out[f"lm_eval/{task}/{name}"] = float(value)
  return out


def read_history(workdir: str) -> dict[str, dict]:
  path = os.path.join(workdir, HISTORY)
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def make_fn(tasks: list[str], include_path: str = "", limit: int | None = None):
  """`fn(run, n)` of the hook (train.Run, steps done); the task names are
  checked now (UsageError if unknown)."""
  directory = lm_eval_run.write_shipped_tasks(lm_eval_run.temporary_dir())
  manager = lm_eval_run.task_manager(directory, include_path)
  lm_eval_run.check_tasks(manager, list(tasks))

  def lm_eval_hook(run, n: int) -> None:
    history = read_history(run.workdir)
    if str(n) in history:  # Scored before a restart.
      return
    # Lazy: lm_eval, so that train.py can read the history without it.
    from nanodo_sam import lm_eval_backend  # pylint: disable=g-import-not-at-top

    vocab = data_lib.make_vocab(run.cfg.data.vocab)
    lm = lm_eval_backend.JaxLM(
        run.setup, run.state.params, vocab, run.cfg.data.eval_batch_size
    )
    results = lm_eval_run.evaluate(lm, manager, list(tasks), limit)
    values = scalars(results)
    run.writer.write_scalars(n, values)
    history[str(n)] = values
    rundir.write_json(os.path.join(run.workdir, HISTORY), history)
    log.info(
        "step %d: lm-eval %s",
        n,
        ", ".join(f"{k[len('lm_eval/'):]} {v:.4f}" for k, v in values.items()),
    )

  return lm_eval_hook
