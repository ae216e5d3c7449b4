"""What each `nanodo-sam` command does, once cli.py has parsed its flags.

`cmd_NAME(fv)` runs command NAME with its parsed flags (cli.COMMANDS names
them); `run` starts one. Bad input raises UsageError, which cli.py reports
as one line and exit code 2.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import tempfile
import time

import flax.linen as nn
import jax

from nanodo_sam import analyze
from nanodo_sam import checkpoint
from nanodo_sam import data as data_lib
from nanodo_sam import data_check
from nanodo_sam import eval_data
from nanodo_sam import evaluate
from nanodo_sam import init_from
from nanodo_sam import lm_eval_run as run_lib
from nanodo_sam import model as model_lib
from nanodo_sam import preemption
from nanodo_sam import prune
from nanodo_sam import quantize as quantize_lib
from nanodo_sam import rundir
from nanodo_sam import sample as sample_lib
from nanodo_sam import sharding
from nanodo_sam import state as state_lib
from nanodo_sam.errors import UsageError


def run(name: str, fv) -> None:
  """Runs `name` (a cmd_* function here) with its parsed flags: the
  multi-process start-up first where it takes those flags. A damaged data
  shard is one line and exit data.EXIT_DATA_ERROR."""
  try:
    if "coordinator_address" in fv:
      sharding.maybe_initialize_distributed(
          fv.coordinator_address, fv.num_processes, fv.process_id
      )
    if name not in ("cmd_train", "cmd_params"):  # train: after validation.
      quiet_tensorflow()
    globals()[name](fv)
  except data_lib.DataError as e:
    print(f"nanodo-sam: error: {e}", file=sys.stderr)
    sys.exit(data_lib.EXIT_DATA_ERROR)


def quiet_tensorflow() -> None:
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


def cmd_train(fv) -> None:
  """Exits 0 (completed), 1 (diverged), 75 (stopped by a signal)."""
  # First: a SIGTERM from here on ends the run cleanly (exit 75), even one
  # that comes while it starts up.
  stop = preemption.StopRequest().install()
  cfg = fv.config
  workdir = fv.workdir or cfg.workdir
  if not workdir:
    raise UsageError(
        "no workdir; pass --workdir=DIR or " "--config.workdir=DIR"
    )
  with cfg.unlocked():
    cfg.workdir = workdir
  # Validated (once, by setup) before TensorFlow is imported: a bad config
  # or mesh is one line, fast; then the data is asked for, before compiles.
  s = state_lib.setup(cfg, before_compile=lambda: _data_ready(cfg, workdir))
  # Lazy: the training loop's writers import TensorFlow (clu).
  from nanodo_sam import train as train_lib

  results = train_lib.train(cfg, workdir, stop=stop, setup=s)
  print(
      json.dumps(
          {k: v for k, v in results.items() if k != "eval_history"}, indent=2
      )
  )
  sys.exit(
      {
          "completed": 0,
          "preempted": preemption.EXIT_PREEMPTED,
          train_lib.SAVE_FAILED: checkpoint.EXIT_SAVE_FAILED,
      }.get(results["status"], 1)
  )


def _data_ready(cfg, workdir: str) -> None:
  """The run's init_from source fits, its lm-eval tasks exist and the
  config's data (and its second eval set's) is there (one line if not);
  TensorFlow, which the check may import, is imported quietly first."""
  init_from.source(cfg, workdir)
  eval_data.check(cfg)
  quiet_tensorflow()
  run_lib.check_config_tasks(cfg)
  data_lib.check_available(cfg.data)


def _put(s):
  """Host batch -> global array on `s`'s mesh."""
  return lambda b: sharding.global_batch(b, s.mesh)


def cmd_eval(fv) -> None:
  """`eval_run` of the flags, printed as one JSON line."""
  print(
      json.dumps(
          eval_run(
              fv.workdir,
              fv.step,
              data_from=fv.data_from,
              quantize=fv.quantize,
              group_size=fv.group_size,
              quantize_embeddings=fv.quantize_embeddings,
          )
      )
  )


def eval_run(
    workdir: str,
    step: int | None = None,
    *,
    data_from: str = "",
    quantize: str = "",
    group_size: int = 0,
    quantize_embeddings: bool = False,
) -> dict:
  """Eval metrics of a checkpoint on the run's eval set (or `data_from`'s);
  with `quantize` ("int8"/"int4"), also of its quantized weights
  ("quantized") and the change ("delta": quantized - float)."""
  bits = quantize_lib.parse_width(quantize) if quantize else None
  cfg = rundir.read_config(workdir)
  if data_from:
    cfg.data = eval_data.data_config_from(data_from, cfg)
  if bits is not None:
    quantize_lib.check_group_size(
        nn.unbox(
            model_lib.abstract_params(
                model_lib.TransformerDo(model_lib.from_config(cfg))
            )
        ),
        group_size,
        quantize_embeddings,
    )
  s, state, step = checkpoint.restore_run(workdir, cfg, step)
  eval_step, batches = evaluate.eval_step_for(s), data_lib.eval_batches(cfg)
  metrics = evaluate.eval_metrics(eval_step, state.params, batches, _put(s))
  out = {"step": step, **{f"eval_{k}": v for k, v in metrics.items()}}
  if data_from:
    out["data_from"] = data_from
  if bits is None:
    return out
  params = jax.device_put(
      quantize_lib.quantize_params(
          state.params, bits, group_size, quantize_embeddings
      ),
      s.state_sharding.params,
  )
  after = evaluate.eval_metrics(eval_step, params, batches, _put(s))
  out.update(
      quantize=quantize,
      group_size=group_size,
      quantize_embeddings=quantize_embeddings,
      quantized={f"eval_{k}": v for k, v in after.items()},
      delta={f"eval_{k}": after[k] - metrics[k] for k in evaluate.METRICS},
  )
  return out


def _check_sample_flags(fv) -> None:
  for key, least in (("max_new_tokens", 1), ("num_samples", 1), ("top_k", 0)):
    if getattr(fv, key) < least:
      raise UsageError(f"--{key}={getattr(fv, key)} must be >= {least}")
  if not (math.isfinite(fv.temperature) and fv.temperature >= 0):
    raise UsageError(
        f"--temperature={fv.temperature} must be a finite "
        "number >= 0 (0: greedy)"
    )


def cmd_sample(fv) -> None:
  """Samples from a checkpoint (nanodo_sam/sample.py), printed as text."""
  _check_sample_flags(fv)
  log = logging.getLogger("nanodo_sam")
  cfg = rundir.read_config(fv.workdir)
  vocab = data_lib.make_vocab(cfg.data.vocab)
  prompt = sample_lib.prompt_ids(vocab, fv.prompt, cfg.data.add_bos)
  num_new = sample_lib.max_new_tokens(
      len(prompt), cfg.model.L, fv.max_new_tokens
  )
  if num_new < fv.max_new_tokens:
    log.info(
        "the prompt (%d tokens) leaves room for %d of the %d new "
        "tokens in the context model.L=%d",
        len(prompt),
        num_new,
        fv.max_new_tokens,
        cfg.model.L,
    )
  s, state, step = checkpoint.restore_run(fv.workdir, cfg, fv.step)
  t0 = time.time()
  new = sample_lib.generate(
      s.model,
      state.params,
      prompt,
      num_new=num_new,
      key=jax.random.key(fv.seed),
      temperature=fv.temperature,
      top_k=fv.top_k,
      num_samples=fv.num_samples,
      vocab_size=vocab.vocab_size,
      eos_id=vocab.eos_id,
  )
  log.info(
      "step %d: %d x %d tokens in %.2f s (with compilation)",
      step,
      new.shape[0],
      new.shape[1],
      time.time() - t0,
  )
  for i, ids in enumerate(new):
    if len(new) > 1:
      print(f"--- sample {i} ---")
    print(sample_lib.text(vocab, prompt, ids))


def cmd_params(fv) -> None:
  mcfg = model_lib.from_config(fv.config)
  print(
      json.dumps(
          {
              "total_params": model_lib.total_params(mcfg),
              "non_embedding_params": model_lib.non_embedding_params(mcfg),
              "embedding_params": model_lib.embedding_params(mcfg),
          }
      )
  )


def cmd_analyze(fv) -> None:
  """Sharpness of a checkpoint (Table 4 columns) -> sharpness.json."""
  analyze_run(
      fv.workdir,
      fv.step,
      **{k: getattr(fv, k) for k in ("num_batches", "num_iters", "num_probes")},
  )


def analyze_run(workdir: str, step: int | None = None, **diagnostics) -> str:
  """`nanodo-sam analyze`: the sharpness of run `workdir`'s checkpoint at
  `step` (None: the latest) -> sharpness.json, its table printed; returns its
  path. `diagnostics`: num_batches, num_iters, num_probes (None: the run's)."""
  cfg = rundir.read_config(workdir)
  d = cfg.diagnostics
  for key, value in diagnostics.items():
    if value is not None:
      least = 1 if key == "num_batches" else 0  # 0: leave that metric out
      if value < least:
        raise UsageError(f"--{key}={value} must be >= {least}")
      d[key] = value
  cfg.data.eval_steps = max(cfg.data.eval_steps, d.num_batches)
  restored = checkpoint.restore_run(workdir, cfg, step)
  out = analyze.measure(cfg, restored, data_lib.eval_batches(cfg))
  latest = restored.step == max(
      checkpoint.checkpoint_manager(workdir, read_only=True).all_steps()
  )
  path = analyze.write(workdir, out, latest)
  print(analyze.table(out))
  print(f"wrote {path}")
  return path


def cmd_prune_eval(fv) -> None:
  """One-shot global magnitude pruning of a checkpoint -> prune.json."""
  prune_eval_run(fv.workdir, fv.fractions, fv.step)


def prune_eval_run(workdir: str, fractions: str, step: int | None = None):
  """`nanodo-sam prune-eval`: run `workdir`'s checkpoint at `step` (None:
  the latest) pruned by each of `fractions` ("0,0.1,...") and evaluated ->
  prune.json, its table printed; returns its path."""
  fractions = prune.parse_fractions(fractions)  # Before any work.
  cfg = rundir.read_config(workdir)
  s, state, step = checkpoint.restore_run(workdir, cfg, step)
  eval_step, batches = evaluate.eval_step_for(s), data_lib.eval_batches(cfg)
  rows = prune.prune_eval(
      state.params,
      fractions,
      lambda p: evaluate.eval_loss(eval_step, p, batches, _put(s)),
      put_params=lambda p: jax.device_put(p, s.state_sharding.params),
  )
  path = prune.write_prune_json(workdir, rows, step=step, cfg=cfg)
  print(prune.format_table(rows))
  print(f"wrote {path}")
  return path


def cmd_data(fv) -> None:
  """`data --check`: every shard of the config's data read once; exits
  data.EXIT_DATA_ERROR if any is damaged."""
  if not fv.check:
    raise UsageError(
        "nothing to do: `nanodo-sam data --check --config=FILE` "
        "reads every shard of the config's data"
    )
  if data_check.check(fv.config.data):
    sys.exit(data_lib.EXIT_DATA_ERROR)


def cmd_bench(fv) -> None:
  """Step time, tokens/s, MFU, compile time and memory per size and method."""
  # Lazy: bench times the training loop, whose writers import TensorFlow.
  from nanodo_sam import bench

  bench.run(
      fv.config,
      fv.sizes,
      fv.methods,
      steps=fv.steps,
      out=fv.out or "bench.json",
  )


def cmd_export(fv) -> None:
  """A checkpoint as a Hugging Face model directory (export.py)."""
  from nanodo_sam import export  # Lazy: needs the `export` extra.

  export.check_extra()
  export.check_out_dir(fv.out)
  cfg = rundir.read_config(fv.workdir)
  s, state, step = checkpoint.restore_run(fv.workdir, cfg, fv.step)
  params = jax.device_get(state.params)
  export.write(
      fv.out,
      params,
      s.model.cfg,
      cfg.data.vocab,
      {"workdir": os.path.abspath(fv.workdir), "step": step},
  )
  print(
      f"wrote {fv.out} (step {step}, float32; load it with "
      "transformers.AutoModelForCausalLM.from_pretrained)"
  )


def cmd_lm_eval(fv) -> None:
  """lm-evaluation-harness tasks on a checkpoint (lm_eval_run.py)."""
  names = run_lib.check_args(fv.backend, fv.tasks, fv.include_path)
  if fv.limit is not None and fv.limit < 1:
    raise UsageError(f"--limit={fv.limit} must be >= 1")
  cfg = rundir.read_config(fv.workdir)
  tmp = run_lib.temporary_dir()
  try:
    manager = run_lib.task_manager(
        run_lib.write_shipped_tasks(tmp), fv.include_path
    )
    run_lib.check_tasks(manager, names)
    s, state, step = checkpoint.restore_run(fv.workdir, cfg, fv.step)
    vocab = data_lib.make_vocab(cfg.data.vocab)
    if fv.backend == "jax":
      from nanodo_sam import lm_eval_backend

      lm = lm_eval_backend.JaxLM(
          s, state.params, vocab, cfg.data.eval_batch_size
      )
    else:
      from nanodo_sam import export

      export.write(
          os.path.join(tmp, "hf"),
          jax.device_get(state.params),
          s.model.cfg,
          cfg.data.vocab,
          {"step": step},
      )
      lm = run_lib.hf_model(
          os.path.join(tmp, "hf"), cfg.data.eval_batch_size, cfg.model.L
      )
    results = run_lib.evaluate(lm, manager, names, fv.limit)
  finally:
    run_lib.remove(tmp)
  path = run_lib.write_results(fv.workdir, step, fv.backend, results)
  print(run_lib.table(results))
  print(f"wrote {path}")


def cmd_plan(fv) -> None:
  """`nanodo-sam plan`: the run compiled for --target by its real compiler
  (`plan.plan`); a table on stdout, JSON with --out. Only compiles: JAX
  stays on the CPU (cpu-sim-N: N simulated CPU devices)."""
  from nanodo_sam import plan  # pylint: disable=g-import-not-at-top
  from nanodo_sam import targets  # pylint: disable=g-import-not-at-top

  if not fv.target:
    raise UsageError(
        "plan needs --target=T; known targets: "
        f"{', '.join(targets.TARGETS)}, cpu-sim-N"
    )
  t = targets.get(fv.target)
  targets.check_installed(t)
  out = _writable_out(fv.out)
  jax.config.update("jax_platforms", "cpu")
  if t.platform == "cpu":
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_"
        f"force_host_platform_device_count={t.chips}"
    )
  report = plan.plan(fv.config, t)
  print(plan.format_report(report))
  if out:
    with open(out, "w") as f:
      json.dump(report, f, indent=1)


def _writable_out(path: str) -> str:
  """`path` if its folder exists (UsageError otherwise: checked before any
  compile, so a bad path costs nothing)."""
  folder = os.path.dirname(os.path.abspath(path)) if path else ""
  if path and (not os.path.isdir(folder) or os.path.isdir(path)):
    raise UsageError(f"--out={path}: give a file in an existing folder")
  return path
