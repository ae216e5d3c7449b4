"""`nanodo-sam train|eval|sample|params|analyze|prune-eval|data|bench|plan|
sweep|tables|export|lm-eval`: the commands, their flags and help, parsed
here; what each does is in commands.py, imported only once a command's flags
parse (so usage, --help and a bad flag answer at once, without importing
JAX).

Config files are ml_collections files with `--config.a.b=value` overrides.
Bad input is reported as one line on stderr with exit code 2, before any work
(and before TensorFlow's start-up lines, which are silenced: that line is the
first thing on stderr).

Exit status of `train`: 0 completed (or finished before), 1 diverged (or a
crash), 2 bad input, 65 (data.EXIT_DATA_ERROR) the data could not be read (a
damaged shard: `nanodo-sam data --check` lists them), 74
(checkpoint.EXIT_SAVE_FAILED) a checkpoint could not be written (a full
disk; the one before is intact), 75 (preemption.EXIT_PREEMPTED) stopped by
SIGTERM/SIGINT with a checkpoint written. After 74 or 75 (once there is
space), the same command resumes the run.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from typing import NamedTuple

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # Before TF is imported.

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags
from ml_collections import config_flags

from nanodo_sam import config as config_lib
from nanodo_sam import targets
from nanodo_sam.errors import UsageError

# pylint: enable=g-import-not-at-top,wrong-import-position


def _fail(msg: str) -> None:
  print(f"nanodo-sam: error: {msg}", file=sys.stderr)
  sys.exit(2)


# Every flag: (absl definer, metavar, default, one-line help). A command
# defines only the flags it lists in COMMANDS; `nanodo-sam COMMAND --help`
# prints them from here.
FLAGS = {
    "config": (
        None,
        "FILE[:ARG]",
        None,
        "Config file (configs/NAME.py); override any key of "
        "configs/base.py with --config.KEY=VALUE.",
    ),
    "workdir": (
        flags.DEFINE_string,
        "DIR",
        None,
        "Run directory (config.json, checkpoints/, results).",
    ),
    "step": (
        flags.DEFINE_integer,
        "N",
        None,
        "Checkpoint step (default: the latest).",
    ),
    "num_batches": (
        flags.DEFINE_integer,
        "K",
        None,
        "Fixed eval batches (default: diagnostics.num_batches).",
    ),
    "num_iters": (
        flags.DEFINE_integer,
        "I",
        None,
        "Lanczos iterations; 0 leaves out lambda_max.",
    ),
    "num_probes": (
        flags.DEFINE_integer,
        "P",
        None,
        "Hutchinson probes; 0 leaves out the traces.",
    ),
    "fractions": (
        flags.DEFINE_string,
        "F,F,...",
        "0,0.1,0.2,0.3,0.4,0.5",
        "Fractions of non-embedding weights to prune.",
    ),
    "sizes": (
        flags.DEFINE_string,
        "S,S,...",
        "",
        "Model sizes of nanodo_sam/sizes.py (default: the config's).",
    ),
    "methods": (
        flags.DEFINE_string,
        "M,M,...",
        "all",
        "Methods (sam.METHODS names, variants like sam:k=5) or all.",
    ),
    "steps": (flags.DEFINE_integer, "N", 10, "Timed steps per method."),
    "out": (
        flags.DEFINE_string,
        "PATH",
        "",
        "Output: bench's or plan's JSON (bench.json), export's model "
        "directory.",
    ),
    "target": (
        flags.DEFINE_string,
        "T",
        None,
        f"Machine to compile for: {', '.join(targets.TARGETS)} or "
        "cpu-sim-N (docs/benchmarks.md lists them).",
    ),
    "prompt": (
        flags.DEFINE_string,
        "TEXT",
        "",
        "Text to continue (empty: start a new document).",
    ),
    "max_new_tokens": (
        flags.DEFINE_integer,
        "N",
        200,
        "Tokens to generate (at most model.L - prompt + 1).",
    ),
    "temperature": (
        flags.DEFINE_float,
        "T",
        1.0,
        "Softmax temperature; 0 is greedy (argmax).",
    ),
    "top_k": (
        flags.DEFINE_integer,
        "K",
        0,
        "Sample among the K most likely tokens (0: all).",
    ),
    "seed": (flags.DEFINE_integer, "S", 0, "Sampling seed."),
    "num_samples": (
        flags.DEFINE_integer,
        "M",
        1,
        "Samples of the same prompt (one batch).",
    ),
    "check": (
        flags.DEFINE_boolean,
        "true|false",
        False,
        "Read every shard once and list the damaged ones (exit 65 "
        "if any); --check alone is true.",
    ),
    "tasks": (
        flags.DEFINE_string,
        "T1,T2",
        "",
        "lm-eval tasks: shipped (nanodo_cloze, nanodo_shakespeare), "
        "--include_path's or the harness's (Hub).",
    ),
    "backend": (
        flags.DEFINE_string,
        "jax|hf",
        "jax",
        "lm-eval model: the project's forward (jax) or the "
        "exported Hugging Face model (hf).",
    ),
    "include_path": (
        flags.DEFINE_string,
        "DIR",
        "",
        "A folder of your own lm-eval task YAMLs.",
    ),
    "limit": (
        flags.DEFINE_integer,
        "N",
        None,
        "Score only the first N documents of each task.",
    ),
    "quantize": (
        flags.DEFINE_string,
        "int8|int4",
        "",
        "Also evaluate the weights rounded to 8 or 4 bits "
        "(weight-only, symmetric, round to nearest): before, after "
        "and the difference.",
    ),
    "group_size": (
        flags.DEFINE_integer,
        "G",
        0,
        "With --quantize: one scale per G inputs of an output "
        "channel (0: per output channel).",
    ),
    "quantize_embeddings": (
        flags.DEFINE_boolean,
        "true|false",
        False,
        "With --quantize: the token and position "
        "embeddings too (kept in float by default).",
    ),
    "data_from": (
        flags.DEFINE_string,
        "RUN|FILE",
        "",
        "Evaluate on the eval set of another run directory's (or "
        "config file's) data config, e.g. the pretraining data of "
        "a continued run (forgetting).",
    ),
    "coordinator_address": (
        flags.DEFINE_string,
        "HOST:PORT",
        "",
        "jax.distributed coordinator (multi-process).",
    ),
    "num_processes": (
        flags.DEFINE_integer,
        "N",
        0,
        "jax.distributed process count.",
    ),
    "process_id": (
        flags.DEFINE_integer,
        "I",
        -1,
        "jax.distributed process id.",
    ),
}
DISTRIBUTED = ("coordinator_address", "num_processes", "process_id")


def _define_flags(command: str, config=None, argv=()) -> flags.FlagValues:
  """The flags `command` lists in COMMANDS; `config`: its loaded --config
  file, which takes the --config.KEY=VALUE overrides in `argv`."""
  fv = flags.FlagValues()
  for name in COMMANDS[command].flags:
    define, _, default, text = FLAGS[name]
    if name == "config":
      if config is not None:
        config_flags.DEFINE_config_dict(
            "config",
            config,
            text,
            flag_values=fv,
            lock_config=True,
            sys_argv=["nanodo-sam"] + list(argv),
        )
    else:
      define(name, default, text, flag_values=fv)
  return fv


def usage() -> str:
  """`nanodo-sam --help`: the commands, one line each."""
  width = max(map(len, COMMANDS))
  lines = ["usage: nanodo-sam COMMAND [flags]", "", "commands:"]
  lines += [f"  {name:<{width}}  {c.summary}" for name, c in COMMANDS.items()]
  lines += ["", "`nanodo-sam COMMAND --help` lists a command's flags."]
  return "\n".join(lines)


def command_help(command: str) -> str:
  """`nanodo-sam COMMAND --help`: what it does and each of its flags."""
  c = COMMANDS[command]
  specs = [f"--{n}={FLAGS[n][1]}" for n in c.flags]
  width = max(map(len, specs))
  lines = [f"usage: nanodo-sam {command} [flags]", "", c.summary, "", "flags:"]
  for name, spec in zip(c.flags, specs):
    _, _, default, text = FLAGS[name]
    if default not in (None, ""):
      text += f" (default: {default})"
    lines.append(f"  {spec:<{width}}  {text}")
  return "\n".join(lines)


def _load_config(command: str, argv) -> tuple:
  """(the ConfigDict of --config=FILE[:ARG], argv without that flag).

  The file is found and run by `config.load_config_file` (a relative path
  from the working directory; a missing file, a syntax error, a failing or
  missing get_config is one line), once; the --config.KEY=VALUE overrides
  then apply to it."""
  specs, rest, args = [], [], iter(argv)
  for arg in args:
    if arg.startswith("--config="):
      specs.append(arg.split("=", 1)[1])
    elif arg == "--config":
      specs.append(next(args, ""))
    else:
      rest.append(arg)
  if not specs or not specs[-1]:
    _fail(f"{command} needs --config=FILE (e.g. configs/quickstart.py)")
  try:
    return config_lib.load_config_file(specs[-1]), rest
  except UsageError as e:
    _fail(str(e))


def _parse(command: str, argv) -> flags.FlagValues:
  config = None
  if "config" in COMMANDS[command].flags:
    config, argv = _load_config(command, argv)
  try:
    fv = _define_flags(command, config, argv)
    fv(["nanodo-sam " + command] + list(argv))
  except flags.UnrecognizedFlagError as e:
    _fail(
        f"unknown flag --{e.flagname} for `nanodo-sam {command}`; "
        f"`nanodo-sam {command} --help` lists its flags"
    )
  except (flags.Error, KeyError, AttributeError, ValueError, TypeError) as e:
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    msg = (
        lines[-1]
        if lines and "parsing config file" in lines[0]
        else lines[0]
        if lines
        else type(e).__name__
    )
    if isinstance(e, (KeyError, AttributeError)):
      key = str(e).strip("'\"")
      bad = [
          a.split("=")[0][2:]
          for a in argv
          if a.startswith("--config.") and key in a.split("=")[0]
      ]
      msg = f"unknown config key {bad[0] if bad else key!r}"
    _fail(f"{msg} (see configs/base.py for every key)")
  return fv


class Command(NamedTuple):
  fn: str  # the function of commands.py that runs it (own_args: MODULE.FUNC)
  summary: str
  flags: tuple[str, ...]
  own_args: bool = False  # fn(argv) parses its own arguments (argparse).


COMMANDS = {
    "train": Command(
        "cmd_train",
        "Train a run in --workdir, or resume it.",
        ("config", "workdir") + DISTRIBUTED,
    ),
    "eval": Command(
        "cmd_eval",
        "Eval loss, perplexity, token accuracy and "
        "bits per byte of a checkpoint.",
        (
            "workdir",
            "step",
            "quantize",
            "group_size",
            "quantize_embeddings",
            "data_from",
        )
        + DISTRIBUTED,
    ),
    "sample": Command(
        "cmd_sample",
        "Text from a checkpoint in the run's "
        "own vocabulary (KV-cached decoding).",
        (
            "workdir",
            "step",
            "prompt",
            "max_new_tokens",
            "temperature",
            "top_k",
            "seed",
            "num_samples",
        ),
    ),
    "params": Command(
        "cmd_params",
        "Total and non-embedding parameter " "counts of a config.",
        ("config",),
    ),
    "analyze": Command(
        "cmd_analyze",
        "Sharpness of a checkpoint "
        "(lambda_max, traces, taus, SAM-edge) -> "
        "sharpness.json.",
        ("workdir", "step", "num_batches", "num_iters", "num_probes")
        + DISTRIBUTED,
    ),
    "prune-eval": Command(
        "cmd_prune_eval",
        "Eval loss after one-shot " "magnitude pruning -> prune.json.",
        ("workdir", "step", "fractions") + DISTRIBUTED,
    ),
    "data": Command(
        "cmd_data",
        "Read every shard of a config's dataset "
        "once and list the damaged ones (--check).",
        ("config", "check"),
    ),
    "bench": Command(
        "cmd_bench",
        "Step time, tokens/s, MFU and memory per " "method -> JSON.",
        ("config", "sizes", "methods", "steps", "out"),
    ),
    "plan": Command(
        "cmd_plan",
        "Compile a run's steps for a target (H100s, "
        "TPU pods) on this CPU: memory, microbatches, "
        "collectives, attention, estimated step time.",
        ("config", "target", "out"),
    ),
    "sweep": Command(
        "sweep.main",
        "Expand a sweep file and launch its runs " "(local, SLURM, TPU VM).",
        (),
        own_args=True,
    ),
    "export": Command(
        "cmd_export",
        "A checkpoint as a Hugging Face GPT-2 "
        "model directory (safetensors, tokenizer).",
        ("workdir", "step", "out"),
    ),
    "lm-eval": Command(
        "cmd_lm_eval",
        "lm-evaluation-harness tasks on a "
        "checkpoint -> lm_eval_step{N}_{backend}.json.",
        ("workdir", "step", "tasks", "backend", "include_path", "limit"),
    ),
    "tables": Command(
        "tables.main",
        "The paper's tables from run directories, " "beside its numbers.",
        (),
        own_args=True,
    ),
}
HELP = ("-h", "--help", "-help", "--helpshort", "--helpfull", "help")


def _run_own_args(fn: str, argv) -> None:
  """Runs `nanodo_sam.MODULE.FUNC(argv)`, a command that parses its own
  arguments (argparse); exits with its code."""
  module, func = fn.split(".")
  try:
    sys.exit(
        getattr(importlib.import_module(f"nanodo_sam.{module}"), func)(argv)
    )
  except UsageError as e:
    _fail(str(e))
  except BrokenPipeError:  # Output piped into `head`.
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.exit(1)


def main(argv=None) -> None:
  argv = sys.argv[1:] if argv is None else argv
  if not argv or argv[0] in HELP:
    print(usage())
    sys.exit(0 if argv else 2)
  command, rest = argv[0], argv[1:]
  if command not in COMMANDS:
    _fail(f"unknown command {command!r}; use one of {', '.join(COMMANDS)}")
  if COMMANDS[command].own_args:
    _run_own_args(COMMANDS[command].fn, rest)
  if any(a in HELP for a in rest):
    print(command_help(command))
    sys.exit(0)
  logging.basicConfig(
      level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s"
  )
  for noisy in ("absl", "jax", "orbax", "tensorflow", "seqio"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  fv = _parse(command, rest)
  try:
    # Lazy: usage, --help and bad flags answer without importing JAX.
    from nanodo_sam import commands  # pylint: disable=g-import-not-at-top

    commands.run(COMMANDS[command].fn, fv)
  except UsageError as e:
    _fail(str(e))


if __name__ == "__main__":
  main()
