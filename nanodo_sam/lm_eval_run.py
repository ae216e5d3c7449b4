"""`nanodo-sam lm-eval`: lm-evaluation-harness tasks on a checkpoint.

Two small tasks ship with the package and run offline: `nanodo_cloze`
(multiple choice, 20 sentences of data_files/lm_eval/cloze.jsonl, acc and
acc_norm) and `nanodo_shakespeare` (rolling perplexity over 40 passages of
the shipped tiny_shakespeare's test split: word and byte perplexity, bits
per byte). A user's own task YAMLs come in with `--include_path=DIR`; the
harness's own tasks (hellaswag, lambada_openai, arc_easy, piqa, ...) load
their data from the Hugging Face Hub, so they need a machine that reaches
it. Results: `lm_eval_step{N}_{backend}.json` in the run directory and the
harness's table on stdout.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile

from nanodo_sam import data as data_lib
from nanodo_sam.errors import UsageError

BACKENDS = ("jax", "hf")
SHIPPED_TASKS = ("nanodo_cloze", "nanodo_shakespeare")
_PASSAGES = 40  # nanodo_shakespeare's passages (of the test split's start).
_TINY_SHAKESPEARE_TEST = 55_770  # characters: TFDS's test split, the last.

_CLOZE_YAML = """task: nanodo_cloze
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{query}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: gold
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""
_ROLLING_YAML = """task: nanodo_shakespeare
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: byte_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: bits_per_byte
    aggregation: bits_per_byte
    higher_is_better: false
"""


def write_shipped_tasks(directory: str) -> str:
  """The shipped tasks' YAMLs (and the passages' JSON lines) in
  `directory`, with absolute paths to their data; returns it."""
  with open(data_lib.tiny_shakespeare_txt()) as f:
    test = f.read()[-_TINY_SHAKESPEARE_TEST:]
  passages = [p.strip() for p in test.split("\n\n") if p.strip()]
  rolling = os.path.join(directory, "shakespeare.jsonl")
  with open(rolling, "w") as f:
    for p in passages[:_PASSAGES]:
      f.write(json.dumps({"text": p}) + "\n")
  cloze = data_lib.shipped_path("lm_eval/cloze.jsonl")
  for name, text in (
      ("nanodo_cloze.yaml", _CLOZE_YAML.format(path=cloze)),
      ("nanodo_shakespeare.yaml", _ROLLING_YAML.format(path=rolling)),
  ):
    with open(os.path.join(directory, name), "w") as f:
      f.write(text)
  return directory


def parse_tasks(tasks: str) -> list[str]:
  names = [t.strip() for t in tasks.split(",") if t.strip()]
  if not names:
    raise UsageError(
        "--tasks=T1,T2 is required (shipped: "
        f"{', '.join(SHIPPED_TASKS)}; or the harness's, e.g. "
        "hellaswag)"
    )
  return names


def task_manager(shipped_dir: str, include_path: str):
  """The harness's TaskManager over its own tasks, the shipped ones and
  `include_path`'s (UsageError if that is not a folder)."""
  # Hugging Face datasets (the harness imports it) logs the frameworks it
  # found at INFO while it loads: not the run's to report.
  logging.getLogger("datasets").setLevel(logging.WARNING)
  from lm_eval.tasks import TaskManager  # Lazy: the `eval` extra.

  paths = [shipped_dir]
  if include_path:
    if not os.path.isdir(include_path):
      raise UsageError(
          f"--include_path={include_path!r} is not a folder of task YAMLs"
      )
    paths.append(include_path)
  return TaskManager(include_path=paths)


def check_tasks(manager, names: list[str]) -> None:
  """UsageError naming the first task the harness does not know."""
  known = set(manager.all_tasks)
  for name in names:
    if name not in known:
      raise UsageError(
          f"unknown lm-eval task {name!r}; shipped: "
          f"{', '.join(SHIPPED_TASKS)}; `lm_eval ls tasks` lists the "
          "harness's; --include_path=DIR adds your own YAMLs"
      )


def config_tasks(cfg) -> list[str]:
  """The task names of a training config's eval.lm_eval_tasks ([] if none)."""
  tasks = cfg.get("eval", {}).get("lm_eval_tasks", "")
  return [t.strip() for t in tasks.split(",") if t.strip()]


def check_config_tasks(cfg) -> None:
  """UsageError (one line) for a task of eval.lm_eval_tasks the harness does
  not know: checked before a run touches its workdir."""
  names = config_tasks(cfg)
  if not names:
    return
  directory = write_shipped_tasks(temporary_dir())
  try:
    check_tasks(task_manager(directory, ""), names)
  finally:
    remove(directory)


def check_installed() -> None:
  """UsageError (one line) unless lm-evaluation-harness is installed."""
  try:
    import lm_eval  # pylint: disable=unused-import
  except ImportError:
    raise UsageError(
        "lm-eval needs lm-evaluation-harness; install the eval extra: "
        "pip install -e '.[eval]'"
    ) from None


def check_args(backend: str, tasks: str, include_path: str) -> list[str]:
  """The task names, once the flags that need no run are valid."""
  if backend not in BACKENDS:
    raise UsageError(
        f"--backend={backend!r} is not one of {', '.join(BACKENDS)}"
    )
  check_installed()
  if include_path and not os.path.isdir(include_path):
    raise UsageError(
        f"--include_path={include_path!r} is not a folder of task YAMLs"
    )
  return parse_tasks(tasks)


def hf_model(out_dir: str, batch_size: int, max_length: int):
  """The harness's HFLM over an exported model directory (float32, CPU)."""
  from lm_eval.models.huggingface import HFLM  # Lazy: torch, transformers.

  return HFLM(
      pretrained=out_dir,
      backend="causal",
      device="cpu",
      dtype="float32",
      batch_size=batch_size,
      max_length=max_length,
  )


def evaluate(lm, manager, names: list[str], limit: int | None) -> dict:
  """simple_evaluate's results; a task whose data cannot be fetched (a Hub
  task offline) is one UsageError line."""
  from lm_eval import evaluator  # Lazy: the `eval` extra.

  try:
    return evaluator.simple_evaluate(
        model=lm,
        tasks=names,
        task_manager=manager,
        limit=limit,
        log_samples=False,
        bootstrap_iters=0,
    )
  except (ConnectionError, OSError) as e:
    raise UsageError(
        f"an lm-eval task's data could not be loaded ({type(e).__name__}: "
        f"{' '.join(str(e).split())[:200]}); the harness's own tasks need "
        "the Hugging Face Hub; offline, use the shipped tasks "
        f"({', '.join(SHIPPED_TASKS)}) or --include_path"
    ) from None


def write_results(workdir: str, step: int, backend: str, results: dict) -> str:
  """lm_eval_step{step}_{backend}.json in the run directory."""
  path = os.path.join(workdir, f"lm_eval_step{step}_{backend}.json")
  keep = {
      k: results[k]
      for k in ("results", "versions", "n-shot", "config")
      if k in results
  }
  with open(path, "w") as f:
    json.dump(
        {"step": step, "backend": backend, **keep}, f, indent=2, default=str
    )
  return path


def table(results: dict) -> str:
  from lm_eval.utils import make_table  # Lazy: the `eval` extra.

  return make_table(results)


def temporary_dir() -> str:
  return tempfile.mkdtemp(prefix="nanodo_sam_lm_eval_")


def remove(directory: str) -> None:
  shutil.rmtree(directory, ignore_errors=True)
