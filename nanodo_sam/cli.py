"""`nanodo-sam train|eval|params|analyze|prune-eval|bench`.

Config files are ml_collections files with `--config.a.b=value` overrides.
Bad input is reported as one line on stderr with exit code 2, before any work.
"""

from __future__ import annotations

import json
import logging
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # Before TF is imported.

from absl import flags
from ml_collections import config_flags

from nanodo_sam.config import UsageError

USAGE = """usage: nanodo-sam COMMAND [flags]

commands:
  train       --config=FILE [--workdir=DIR] [--config.KEY=VALUE ...]
  eval        --workdir=DIR [--step=N]
  params      --config=FILE [--config.KEY=VALUE ...]
  analyze     --workdir=DIR [--step=N] [--num_batches=K] [--num_iters=I] [--num_probes=P]
  prune-eval  --workdir=DIR --fractions=0,0.1,...
  bench       --config=FILE [--sizes=2M,23.9M] [--methods=all] [--steps=N]
"""


def _fail(msg: str) -> None:
  print(f"nanodo-sam: error: {msg}", file=sys.stderr)
  sys.exit(2)


def _define_flags(command: str) -> flags.FlagValues:
  fv = flags.FlagValues()
  if command in ("train", "params", "bench"):
    config_flags.DEFINE_config_file("config", None, "Config file.",
                                    flag_values=fv, lock_config=True)
  flags.DEFINE_string("workdir", None, "Run directory.", flag_values=fv)
  flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).",
                       flag_values=fv)
  flags.DEFINE_integer("num_batches", None, "Fixed eval batches.",
                       flag_values=fv)
  flags.DEFINE_integer("num_iters", None, "Lanczos iterations.",
                       flag_values=fv)
  flags.DEFINE_integer("num_probes", None, "Hutchinson probes.",
                       flag_values=fv)
  flags.DEFINE_string("fractions", "0,0.1,0.2,0.3,0.4,0.5",
                      "Pruned fractions.", flag_values=fv)
  flags.DEFINE_string("sizes", "", "Model sizes (configs/sizes.py).",
                      flag_values=fv)
  flags.DEFINE_string("methods", "all", "Methods to benchmark.",
                      flag_values=fv)
  flags.DEFINE_integer("steps", 10, "Timed steps per method.", flag_values=fv)
  flags.DEFINE_string("out", "", "Output JSON path.", flag_values=fv)
  flags.DEFINE_string("coordinator_address", "", "jax.distributed.",
                      flag_values=fv)
  flags.DEFINE_integer("num_processes", 0, "jax.distributed.",
                       flag_values=fv)
  flags.DEFINE_integer("process_id", -1, "jax.distributed.", flag_values=fv)
  return fv


def _add_config_paths(argv) -> list[str]:
  """argv with --config=FILE[:ARG] resolved (`config.find_config_file`: from
  the working directory, then the repository) and its checkout on sys.path,
  so config files can `from configs import base` from any working dir."""
  from nanodo_sam import config as config_lib
  out = []
  for arg in argv:
    if arg.startswith("--config="):
      try:
        path, config_arg = config_lib.find_config_file(arg.split("=", 1)[1])
      except UsageError as e:
        _fail(str(e))
      config_lib.add_import_root(path)
      arg = f"--config={path}" + (f":{config_arg}" if config_arg else "")
    out.append(arg)
  return out


def _parse(command: str, argv) -> flags.FlagValues:
  fv = _define_flags(command)
  argv = _add_config_paths(argv)
  saved_argv = sys.argv
  # config_flags discovers --config.* overrides by reading sys.argv.
  sys.argv = ["nanodo-sam " + command] + list(argv)
  try:
    fv(sys.argv)
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
  finally:
    sys.argv = saved_argv
  return fv


def _load_run_config(workdir: str | None):
  from nanodo_sam import config as config_lib
  if not workdir:
    raise UsageError("--workdir=DIR is required")
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise UsageError(f"no run in {workdir!r} (no config.json); train one with"
                     " `nanodo-sam train --config=... --workdir=DIR`")
  return config_lib.from_json_file(path)


def _restore_params(workdir: str, cfg, step: int | None):
  """(Setup, state, step) from a run directory's checkpoint."""
  from nanodo_sam import checkpoint
  from nanodo_sam import state as state_lib
  s = state_lib.setup(cfg)
  mngr = checkpoint.checkpoint_manager(workdir)
  steps = mngr.all_steps()
  if not steps:
    raise UsageError(f"no checkpoint in {workdir!r}/checkpoints; train first "
                     "or point --workdir at a run directory")
  if step is not None and step not in steps:
    raise UsageError(f"no checkpoint for step {step} in {workdir!r}; "
                     f"available steps: {sorted(steps)}")
  step = max(steps) if step is None else step
  return s, checkpoint.restore_state(mngr, s, step), step


def cmd_train(fv) -> None:
  import jax
  from nanodo_sam import config as config_lib
  cfg = fv.config
  workdir = fv.workdir or cfg.workdir
  if not workdir:
    raise UsageError("no workdir; pass --workdir=DIR or "
                     "--config.workdir=DIR")
  with cfg.unlocked():
    cfg.workdir = workdir
  # Checked before importing the trainer, whose TensorFlow import prints C++
  # log lines: a bad config or mesh gives one line, fast.
  config_lib.validate(cfg, num_devices=jax.device_count())
  from nanodo_sam import train as train_lib
  results = train_lib.train(cfg, workdir)
  print(json.dumps({k: v for k, v in results.items()
                    if k != "eval_history"}, indent=2))
  if results["status"] != "completed":
    sys.exit(1)


def cmd_eval(fv) -> None:
  from nanodo_sam import data as data_lib
  from nanodo_sam import evaluate, sharding
  cfg = _load_run_config(fv.workdir)
  s, state, step = _restore_params(fv.workdir, cfg, fv.step)
  eval_step = evaluate.make_eval_step(s.logits_fn, s.state_sharding.params,
                                      sharding.batch_sharding(s.mesh))
  loss = evaluate.eval_loss(eval_step, state.params,
                            data_lib.eval_batches(cfg),
                            lambda b: sharding.global_batch(b, s.mesh))
  print(json.dumps({"step": step, "eval_loss": loss}))


def cmd_params(fv) -> None:
  import jax
  import numpy as np
  from nanodo_sam import config as config_lib
  from nanodo_sam import model as model_lib
  mcfg = config_lib.model_config(fv.config)
  shapes = model_lib.abstract_params(model_lib.TransformerDo(mcfg))
  import flax.linen as nn
  total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(shapes)))
  print(json.dumps({"total_params": total,
                    "non_embedding_params":
                        model_lib.non_embedding_params(mcfg),
                    "embedding_params": mcfg.V * mcfg.D + mcfg.L * mcfg.D}))


SHARPNESS_COLUMNS = ("eval_loss", "lambda_max", "hessian_trace", "ggn_trace",
                     "tau_logit", "tau_func", "tau_cross", "tau_logit_precond",
                     "tau_func_precond", "tau_cross_precond", "sam_edge",
                     "two_over_lr")


def cmd_analyze(fv) -> None:
  """Sharpness of a checkpoint (Table 4 columns) -> sharpness.json."""
  import jax
  from nanodo_sam import checkpoint
  from nanodo_sam import data as data_lib
  from nanodo_sam import diagnostics, evaluate, sharding
  cfg = _load_run_config(fv.workdir)
  d = cfg.diagnostics
  for key in ("num_batches", "num_iters", "num_probes"):
    value = getattr(fv, key)
    if value is not None:
      least = 1 if key == "num_batches" else 0  # 0: leave that metric out
      if value < least:
        raise UsageError(f"--{key}={value} must be >= {least}")
      d[key] = value
  cfg.data.eval_steps = max(cfg.data.eval_steps, d.num_batches)
  s, state, step = _restore_params(fv.workdir, cfg, fv.step)
  eval_data = data_lib.eval_batches(cfg)
  eval_step = evaluate.make_eval_step(s.logits_fn, s.state_sharding.params,
                                      sharding.batch_sharding(s.mesh))
  loss = evaluate.eval_loss(eval_step, state.params, eval_data,
                            lambda b: sharding.global_batch(b, s.mesh))
  # SAM-edge and 2/lr at the peak learning rate: at the end of a decayed
  # schedule the rate in effect is ~0 and both would be meaningless.
  lr = cfg.opt.peak_learning_rate
  sharp = diagnostics.make_sharpness(cfg, s, eval_data)
  out = diagnostics.to_scalars(sharp(state, lr, cfg.sam.rho,
                                     jax.random.key(cfg.seed)))
  out.update(eval_loss=loss, step=step, method=cfg.sam.method,
             rho=cfg.sam.rho, learning_rate=lr,
             num_batches=d.num_batches, batch_size=d.batch_size,
             num_iters=d.num_iters, num_probes=d.num_probes)
  latest = step == max(checkpoint.checkpoint_manager(fv.workdir).all_steps())
  name = "sharpness.json" if latest else f"sharpness_{step}.json"
  with open(os.path.join(fv.workdir, name), "w") as f:
    json.dump(out, f, indent=2, sort_keys=True)
  print(f"| step | {' | '.join(SHARPNESS_COLUMNS)} |")
  print("|---" * (len(SHARPNESS_COLUMNS) + 1) + "|")
  print(f"| {step} | " + " | ".join(
      f"{out[k]:.4g}" if k in out else "n/a" for k in SHARPNESS_COLUMNS)
        + " |")
  print(f"wrote {os.path.join(fv.workdir, name)}")


def cmd_prune_eval(fv) -> None:
  """One-shot global magnitude pruning of a checkpoint -> prune.json."""
  import jax
  from nanodo_sam import data as data_lib
  from nanodo_sam import evaluate, prune, sharding
  fractions = prune.parse_fractions(fv.fractions)  # Before any work.
  cfg = _load_run_config(fv.workdir)
  s, state, step = _restore_params(fv.workdir, cfg, fv.step)
  eval_step = evaluate.make_eval_step(s.logits_fn, s.state_sharding.params,
                                      sharding.batch_sharding(s.mesh))
  batches = data_lib.eval_batches(cfg)
  put = lambda b: sharding.global_batch(b, s.mesh)
  rows = prune.prune_eval(
      state.params, fractions,
      lambda p: evaluate.eval_loss(eval_step, p, batches, put),
      put_params=lambda p: jax.device_put(p, s.state_sharding.params))
  path = prune.write_prune_json(fv.workdir, rows, step=step, cfg=cfg)
  print(prune.format_table(rows))
  print(f"wrote {path}")


def cmd_bench(fv) -> None:
  """Step time, tokens/s, MFU, compile time and memory per size and method."""
  from nanodo_sam import bench
  bench.run(fv.config, fv.sizes, fv.methods, steps=fv.steps,
            out=fv.out or "bench.json")


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "params": cmd_params,
            "analyze": cmd_analyze, "prune-eval": cmd_prune_eval,
            "bench": cmd_bench}


def main(argv=None) -> None:
  argv = sys.argv[1:] if argv is None else argv
  if not argv or argv[0] in ("-h", "--help", "help"):
    print(USAGE)
    sys.exit(0 if argv else 2)
  command, rest = argv[0], argv[1:]
  if command not in COMMANDS:
    _fail(f"unknown command {command!r}; use one of {', '.join(COMMANDS)}")
  logging.basicConfig(level=logging.INFO,
                      format="%(asctime)s %(levelname)s %(message)s")
  for noisy in ("absl", "jax", "orbax", "tensorflow", "seqio"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  fv = _parse(command, rest)
  from nanodo_sam import sharding
  try:
    sharding.maybe_initialize_distributed(fv.coordinator_address,
                                          fv.num_processes, fv.process_id)
    COMMANDS[command](fv)
  except UsageError as e:
    _fail(str(e))


if __name__ == "__main__":
  main()
