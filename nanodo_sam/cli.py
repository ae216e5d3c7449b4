"""`nanodo-sam train|eval|sample|params|analyze|prune-eval|data|bench`.

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

import json
import logging
import math
import os
import sys
import tempfile
import time
from typing import Callable, NamedTuple

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # Before TF is imported.

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags
import flax.linen as nn
import jax
from ml_collections import config_flags
import numpy as np

from nanodo_sam import analyze
from nanodo_sam import checkpoint
from nanodo_sam import config as config_lib
from nanodo_sam import data as data_lib
from nanodo_sam import data_check
from nanodo_sam import evaluate
from nanodo_sam import model as model_lib
from nanodo_sam import preemption
from nanodo_sam import prune
from nanodo_sam import rundir
from nanodo_sam import sample as sample_lib
from nanodo_sam import sharding
from nanodo_sam import state as state_lib
from nanodo_sam.errors import UsageError
# pylint: enable=g-import-not-at-top,wrong-import-position


def _fail(msg: str) -> None:
  print(f"nanodo-sam: error: {msg}", file=sys.stderr)
  sys.exit(2)


# Every flag: (absl definer, metavar, default, one-line help). A command
# defines only the flags it lists in COMMANDS; `nanodo-sam COMMAND --help`
# prints them from here.
FLAGS = {
    "config": (None, "FILE[:ARG]", None,
               "Config file (configs/NAME.py); override any key of "
               "configs/base.py with --config.KEY=VALUE."),
    "workdir": (flags.DEFINE_string, "DIR", None,
                "Run directory (config.json, checkpoints/, results)."),
    "step": (flags.DEFINE_integer, "N", None,
             "Checkpoint step (default: the latest)."),
    "num_batches": (flags.DEFINE_integer, "K", None,
                    "Fixed eval batches (default: diagnostics.num_batches)."),
    "num_iters": (flags.DEFINE_integer, "I", None,
                  "Lanczos iterations; 0 leaves out lambda_max."),
    "num_probes": (flags.DEFINE_integer, "P", None,
                   "Hutchinson probes; 0 leaves out the traces."),
    "fractions": (flags.DEFINE_string, "F,F,...", "0,0.1,0.2,0.3,0.4,0.5",
                  "Fractions of non-embedding weights to prune."),
    "sizes": (flags.DEFINE_string, "S,S,...", "",
              "Model sizes of configs/sizes.py (default: the config's)."),
    "methods": (flags.DEFINE_string, "M,M,...", "all",
                "Methods (sam.METHODS names, variants like sam:k=5) or all."),
    "steps": (flags.DEFINE_integer, "N", 10, "Timed steps per method."),
    "out": (flags.DEFINE_string, "PATH", "", "Output JSON (bench.json)."),
    "prompt": (flags.DEFINE_string, "TEXT", "",
               "Text to continue (empty: start a new document)."),
    "max_new_tokens": (flags.DEFINE_integer, "N", 200,
                       "Tokens to generate (at most model.L - prompt + 1)."),
    "temperature": (flags.DEFINE_float, "T", 1.0,
                    "Softmax temperature; 0 is greedy (argmax)."),
    "top_k": (flags.DEFINE_integer, "K", 0,
              "Sample among the K most likely tokens (0: all)."),
    "seed": (flags.DEFINE_integer, "S", 0, "Sampling seed."),
    "num_samples": (flags.DEFINE_integer, "M", 1,
                    "Samples of the same prompt (one batch)."),
    "check": (flags.DEFINE_boolean, "true|false", False,
              "Read every shard once and list the damaged ones (exit 65 "
              "if any); --check alone is true."),
    "coordinator_address": (flags.DEFINE_string, "HOST:PORT", "",
                            "jax.distributed coordinator (multi-process)."),
    "num_processes": (flags.DEFINE_integer, "N", 0,
                      "jax.distributed process count."),
    "process_id": (flags.DEFINE_integer, "I", -1,
                   "jax.distributed process id."),
}
DISTRIBUTED = ("coordinator_address", "num_processes", "process_id")


def _quiet_tensorflow() -> None:
  """Imports TensorFlow with file descriptor 2 sent to a temporary file: its
  C++ start-up writes lines that TF_CPP_MIN_LOG_LEVEL does not reach ("All
  log messages before absl::InitializeLog() ...", CUDA stub notices), which
  would otherwise come before a command's own words on stderr. They are
  shown if the import fails."""
  if "tensorflow" in sys.modules:
    return
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as caught:
    os.dup2(caught.fileno(), 2)
    try:
      # Lazy: the point of this function (TensorFlow's start-up, silenced).
      import tensorflow  # pylint: disable=g-import-not-at-top,unused-import
    except BaseException:
      os.dup2(saved, 2)
      caught.seek(0)
      sys.stderr.write(caught.read().decode(errors="replace"))
      raise
    finally:
      os.dup2(saved, 2)
      os.close(saved)


def _define_flags(command: str, config=None, argv=()) -> flags.FlagValues:
  """The flags `command` lists in COMMANDS; `config`: its loaded --config
  file, which takes the --config.KEY=VALUE overrides in `argv`."""
  fv = flags.FlagValues()
  for name in COMMANDS[command].flags:
    define, _, default, text = FLAGS[name]
    if name == "config":
      if config is not None:
        config_flags.DEFINE_config_dict("config", config, text,
                                        flag_values=fv, lock_config=True,
                                        sys_argv=["nanodo-sam"] + list(argv))
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
  lines = [f"usage: nanodo-sam {command} [flags]", "", c.summary, "",
           "flags:"]
  for name, spec in zip(c.flags, specs):
    _, _, default, text = FLAGS[name]
    if default not in (None, ""):
      text += f" (default: {default})"
    lines.append(f"  {spec:<{width}}  {text}")
  return "\n".join(lines)


def _load_config(command: str, argv) -> tuple:
  """(the ConfigDict of --config=FILE[:ARG], argv without that flag).

  The file is found and run by `config.load_config_file` (from the working
  directory, then the repository; a missing file, a syntax error, a failing
  or missing get_config is one line), once; the --config.KEY=VALUE
  overrides then apply to it."""
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
    _fail(f"unknown flag --{e.flagname} for `nanodo-sam {command}`; "
          f"`nanodo-sam {command} --help` lists its flags")
  except (flags.Error, KeyError, AttributeError, ValueError, TypeError) as e:
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    msg = (lines[-1] if lines and "parsing config file" in lines[0]
           else lines[0] if lines else type(e).__name__)
    if isinstance(e, (KeyError, AttributeError)):
      key = str(e).strip("'\"")
      bad = [a.split("=")[0][2:] for a in argv
             if a.startswith("--config.") and key in a.split("=")[0]]
      msg = f"unknown config key {bad[0] if bad else key!r}"
    _fail(f"{msg} (see configs/base.py for every key)")
  return fv


def cmd_train(fv) -> None:
  """Exits 0 (completed), 1 (diverged), 75 (stopped by a signal)."""
  # First: a SIGTERM from here on ends the run cleanly (exit 75), even one
  # that comes while it starts up.
  stop = preemption.StopRequest().install()
  cfg = fv.config
  workdir = fv.workdir or cfg.workdir
  if not workdir:
    raise UsageError("no workdir; pass --workdir=DIR or "
                     "--config.workdir=DIR")
  with cfg.unlocked():
    cfg.workdir = workdir
  # Validated (once, by setup) before TensorFlow is imported: a bad config
  # or mesh is one line, fast.
  s = state_lib.setup(cfg)
  _quiet_tensorflow()
  # Lazy: the training loop's writers import TensorFlow (clu).
  from nanodo_sam import train as train_lib
  results = train_lib.train(cfg, workdir, stop=stop, setup=s)
  print(json.dumps({k: v for k, v in results.items()
                    if k != "eval_history"}, indent=2))
  sys.exit({"completed": 0, "preempted": preemption.EXIT_PREEMPTED,
            train_lib.SAVE_FAILED: checkpoint.EXIT_SAVE_FAILED}.get(
                results["status"], 1))


def _put(s):
  """Host batch -> global array on `s`'s mesh."""
  return lambda b: sharding.global_batch(b, s.mesh)


def cmd_eval(fv) -> None:
  """Eval metrics of a checkpoint on the run's eval set, as one JSON line."""
  cfg = rundir.read_config(fv.workdir)
  s, state, step = checkpoint.restore_run(fv.workdir, cfg, fv.step)
  metrics = evaluate.eval_metrics(evaluate.eval_step_for(s), state.params,
                                  data_lib.eval_batches(cfg), _put(s))
  print(json.dumps({"step": step, **{f"eval_{k}": v
                                     for k, v in metrics.items()}}))


def _check_sample_flags(fv) -> None:
  for key, least in (("max_new_tokens", 1), ("num_samples", 1), ("top_k", 0)):
    if getattr(fv, key) < least:
      raise UsageError(f"--{key}={getattr(fv, key)} must be >= {least}")
  if not (math.isfinite(fv.temperature) and fv.temperature >= 0):
    raise UsageError(f"--temperature={fv.temperature} must be a finite "
                     "number >= 0 (0: greedy)")


def cmd_sample(fv) -> None:
  """Samples from a checkpoint (nanodo_sam/sample.py), printed as text."""
  _check_sample_flags(fv)
  log = logging.getLogger("nanodo_sam")
  cfg = rundir.read_config(fv.workdir)
  vocab = data_lib.make_vocab(cfg.data.vocab)
  prompt = sample_lib.prompt_ids(vocab, fv.prompt, cfg.data.add_bos)
  num_new = sample_lib.max_new_tokens(len(prompt), cfg.model.L,
                                      fv.max_new_tokens)
  if num_new < fv.max_new_tokens:
    log.info("the prompt (%d tokens) leaves room for %d of the %d new "
             "tokens in the context model.L=%d", len(prompt), num_new,
             fv.max_new_tokens, cfg.model.L)
  s, state, step = checkpoint.restore_run(fv.workdir, cfg, fv.step)
  t0 = time.time()
  new = sample_lib.generate(
      s.model, state.params, prompt, num_new=num_new,
      key=jax.random.key(fv.seed), temperature=fv.temperature,
      top_k=fv.top_k, num_samples=fv.num_samples,
      vocab_size=vocab.vocab_size, eos_id=vocab.eos_id)
  log.info("step %d: %d x %d tokens in %.2f s (with compilation)", step,
           new.shape[0], new.shape[1], time.time() - t0)
  for i, ids in enumerate(new):
    if len(new) > 1:
      print(f"--- sample {i} ---")
    print(sample_lib.text(vocab, prompt, ids))


def cmd_params(fv) -> None:
  mcfg = model_lib.from_config(fv.config)
  shapes = model_lib.abstract_params(model_lib.TransformerDo(mcfg))
  total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(shapes)))
  print(json.dumps({"total_params": total,
                    "non_embedding_params":
                        model_lib.non_embedding_params(mcfg),
                    "embedding_params": mcfg.V * mcfg.D + mcfg.L * mcfg.D}))


def cmd_analyze(fv) -> None:
  """Sharpness of a checkpoint (Table 4 columns) -> sharpness.json."""
  cfg = rundir.read_config(fv.workdir)
  d = cfg.diagnostics
  for key in ("num_batches", "num_iters", "num_probes"):
    value = getattr(fv, key)
    if value is not None:
      least = 1 if key == "num_batches" else 0  # 0: leave that metric out
      if value < least:
        raise UsageError(f"--{key}={value} must be >= {least}")
      d[key] = value
  cfg.data.eval_steps = max(cfg.data.eval_steps, d.num_batches)
  restored = checkpoint.restore_run(fv.workdir, cfg, fv.step)
  out = analyze.measure(cfg, restored, data_lib.eval_batches(cfg))
  latest = restored.step == max(checkpoint.checkpoint_manager(
      fv.workdir, read_only=True).all_steps())
  path = analyze.write(fv.workdir, out, latest)
  print(analyze.table(out))
  print(f"wrote {path}")


def cmd_prune_eval(fv) -> None:
  """One-shot global magnitude pruning of a checkpoint -> prune.json."""
  fractions = prune.parse_fractions(fv.fractions)  # Before any work.
  cfg = rundir.read_config(fv.workdir)
  s, state, step = checkpoint.restore_run(fv.workdir, cfg, fv.step)
  eval_step, batches = evaluate.eval_step_for(s), data_lib.eval_batches(cfg)
  rows = prune.prune_eval(
      state.params, fractions,
      lambda p: evaluate.eval_loss(eval_step, p, batches, _put(s)),
      put_params=lambda p: jax.device_put(p, s.state_sharding.params))
  path = prune.write_prune_json(fv.workdir, rows, step=step, cfg=cfg)
  print(prune.format_table(rows))
  print(f"wrote {path}")


def cmd_data(fv) -> None:
  """`data --check`: every shard of the config's data read once; exits
  data.EXIT_DATA_ERROR if any is damaged."""
  if not fv.check:
    raise UsageError("nothing to do: `nanodo-sam data --check --config=FILE` "
                     "reads every shard of the config's data")
  if data_check.check(fv.config.data):
    sys.exit(data_lib.EXIT_DATA_ERROR)


def cmd_bench(fv) -> None:
  """Step time, tokens/s, MFU, compile time and memory per size and method."""
  # Lazy: bench times the training loop, whose writers import TensorFlow.
  from nanodo_sam import bench
  bench.run(fv.config, fv.sizes, fv.methods, steps=fv.steps,
            out=fv.out or "bench.json")


class Command(NamedTuple):
  fn: Callable
  summary: str
  flags: tuple[str, ...]


COMMANDS = {
    "train": Command(cmd_train, "Train a run in --workdir, or resume it.",
                     ("config", "workdir") + DISTRIBUTED),
    "eval": Command(cmd_eval, "Eval loss, perplexity, token accuracy and "
                    "bits per byte of a checkpoint.",
                    ("workdir", "step") + DISTRIBUTED),
    "sample": Command(cmd_sample, "Text from a checkpoint in the run's own "
                      "vocabulary (KV-cached decoding).",
                      ("workdir", "step", "prompt", "max_new_tokens",
                       "temperature", "top_k", "seed", "num_samples")),
    "params": Command(cmd_params, "Total and non-embedding parameter counts "
                      "of a config.", ("config",)),
    "analyze": Command(cmd_analyze, "Sharpness of a checkpoint (lambda_max, "
                       "traces, taus, SAM-edge) -> sharpness.json.",
                       ("workdir", "step", "num_batches", "num_iters",
                        "num_probes") + DISTRIBUTED),
    "prune-eval": Command(cmd_prune_eval, "Eval loss after one-shot "
                          "magnitude pruning -> prune.json.",
                          ("workdir", "step", "fractions") + DISTRIBUTED),
    "data": Command(cmd_data, "Read every shard of a config's dataset "
                    "once and list the damaged ones (--check).",
                    ("config", "check")),
    "bench": Command(cmd_bench, "Step time, tokens/s, MFU and memory per "
                     "method -> JSON.",
                     ("config", "sizes", "methods", "steps", "out")),
}
HELP = ("-h", "--help", "-help", "--helpshort", "--helpfull", "help")


def main(argv=None) -> None:
  argv = sys.argv[1:] if argv is None else argv
  if not argv or argv[0] in HELP:
    print(usage())
    sys.exit(0 if argv else 2)
  command, rest = argv[0], argv[1:]
  if command not in COMMANDS:
    _fail(f"unknown command {command!r}; use one of {', '.join(COMMANDS)}")
  if any(a in HELP for a in rest):
    print(command_help(command))
    sys.exit(0)
  logging.basicConfig(level=logging.INFO,
                      format="%(asctime)s %(levelname)s %(message)s")
  for noisy in ("absl", "jax", "orbax", "tensorflow", "seqio"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  fv = _parse(command, rest)
  try:
    if "coordinator_address" in fv:
      sharding.maybe_initialize_distributed(fv.coordinator_address,
                                            fv.num_processes, fv.process_id)
    if command not in ("train", "params"):  # train: after validation.
      _quiet_tensorflow()
    COMMANDS[command].fn(fv)
  except UsageError as e:
    _fail(str(e))
  except data_lib.DataError as e:  # A damaged shard: one line.
    print(f"nanodo-sam: error: {e}", file=sys.stderr)
    sys.exit(data_lib.EXIT_DATA_ERROR)


if __name__ == "__main__":
  main()
