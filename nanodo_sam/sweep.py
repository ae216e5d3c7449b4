"""Expand a sweep file into runs and launch them: locally, on SLURM, on TPU VMs.

    nanodo-sam sweep configs/sweeps/table1.py --backend=local \
        [--out=runs/table1] [--parallel=N] [--dry-run] [--only=REGEX] \
        [--set=KEY=VALUE ...] [--train-cmd=CMD]
    nanodo-sam sweep configs/sweeps/table2.py --backend=slurm \
        --sbatch=--gpus-per-node=8 --sbatch=--time=48:00:00
    nanodo-sam sweep configs/sweeps/table2.py --backend=tpu \
        --tpu=my-v4-32 --zone=us-central2-b

A sweep file (configs/sweeps/*.py) defines `get_sweep()` returning a
`SweepSpec` (nanodo_sam/sweep_spec.py: name, config, overrides, runs; the
grid helpers `method_runs`, `grid` and `around` live there too). This module
checks every override key against its config, names the runs and starts them.
A run's workdir is OUT/<name>, the name built from its overrides in order
(`23.9M-precond_functional_sam-rho0.5-lr0.001-seed0`), so re-expanding a
sweep gives the same directories.

A `get_sweep(out)` with a parameter receives the output folder and may list
runs that depend on finished ones there (a tuning stage, then the chosen
setting on more seeds: configs/sweeps/miniature.py).

Backends:
  local  runs the grid here, `--parallel` at a time (default 1), each run's
         output in OUT/<name>/train.log; runs whose results.json exists are
         skipped, so an interrupted sweep is resumed by launching it again
         (Ctrl-C stops the runs at a step boundary with a checkpoint; a
         stopped run has no results.json, so it is resumed).
         A dependent sweep is expanded again after each pass until it lists
         nothing new, so one command runs all its stages.
  slurm  writes OUT/sweep.sbatch, one array task per grid point (each task
         `srun nanodo-sam train ...`; with several tasks per node JAX's
         multi-process start-up detects SLURM) that requeues itself when
         preempted or near its time limit (`slurm_script`), and prints the
         sbatch command
         (a dependent sweep: the runs it lists now; launch it again when
         they have finished for the next stage).
  tpu    prints one `gcloud compute tpus tpu-vm ssh TPU --worker=all
         --command=...` per run (run them one after another on the same TPU
         VM; OUT is a path there); nothing is written here.

Every value in a generated shell command is quoted with shlex.quote. Bad input
stops with one line and exit code 2 before anything is started or written.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.util
import inspect
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from nanodo_sam import config as config_lib
from nanodo_sam.errors import UsageError
from nanodo_sam.preemption import EXIT_PREEMPTED  # No JAX import.
from nanodo_sam.sweep_spec import NAME_CHARS, RESERVED, SweepError, SweepSpec, format_value

# Runs start here, and config paths inside it are given relative to it.
REPO_ROOT = config_lib.REPO_ROOT

PROG = "nanodo-sam sweep"
BACKENDS = ("local", "slurm", "tpu")
# XLA flags the SLURM script sets for GPUs (MaxText's GPU recipes): overlap
# collectives with compute (latency-hiding scheduler, pipelined and combined
# collectives, double-buffered loops) and cuBLAS rather than Triton GEMMs.
# XLA_FLAGS in the submitting environment or --env=XLA_FLAGS=... replaces
# them; every flag is checked against the installed jaxlib by
# tests/test_launch.py (XLA aborts on an unknown one).
XLA_GPU_FLAGS = (
    "--xla_gpu_enable_latency_hiding_scheduler=true",
    "--xla_gpu_enable_triton_gemm=false",
    "--xla_gpu_enable_highest_priority_async_stream=true",
    "--xla_gpu_all_reduce_combine_threshold_bytes=134217728",
    "--xla_gpu_all_gather_combine_threshold_bytes=134217728",
    "--xla_gpu_reduce_scatter_combine_threshold_bytes=67108864",
    "--xla_gpu_enable_pipelined_all_gather=true",
    "--xla_gpu_enable_pipelined_reduce_scatter=true",
    "--xla_gpu_enable_pipelined_all_reduce=true",
    "--xla_gpu_enable_while_loop_double_buffering=true",
)
# Seconds a stopped run may take to finish its step and checkpoint: the
# local backend's wait after Ctrl-C, the SLURM script's --signal lead time.
STOP_GRACE_S = 300
# How override keys appear in run names ("" = the value alone).
ABBREV = {
    "sam.method": "",
    "model.nonlinearity": "",
    "model.size_name": "",
    "sam.rho": "rho",
    "sam.phi": "phi",
    "sam.alpha": "alpha",
    "sam.adaptive_eta": "eta",
    "sam.rho_schedule": "rhosched",
    "sam.rho_min": "rhomin",
    "opt.peak_learning_rate": "lr",
    "opt.weight_decay": "wd",
    "opt.num_train_steps": "steps",
    "sam.rho_warmup_steps": "rhowarmup",
    "sam.every_k": "k",
    "sam.reuse": "reuse",
    "seed": "seed",
    "init_from": "from_",
}
_MAX_NAME = 120


# -------------------------------------------------------------- the sweep


@dataclass(frozen=True)
class Run:
  name: str
  config: str  # "path.py" or "path.py:arg"
  overrides: dict  # This run's overrides (in its name).
  common: dict = field(default_factory=dict)  # Sweep-wide (not in the name).
  workdir: str = ""

  def train_args(self) -> list[str]:
    """The arguments after `nanodo-sam train`."""
    args = [f"--config={self.config}", f"--workdir={self.workdir}"]
    merged = dict(self.common)
    merged.update(self.overrides)
    args += [f"--config.{k}={format_value(v)}" for k, v in merged.items()]
    return args


@dataclass
class Sweep:
  """A sweep file expanded: its runs named, checked and placed under OUT."""

  name: str
  path: str
  config: str
  runs: list[Run]
  # get_sweep(out) lists runs that depend on finished ones: the local
  # backend expands it again after each pass until nothing new appears.
  dependent: bool = False


def _config_parts(config: str) -> tuple[str, str]:
  path, sep, arg = config.partition(":")
  return path, arg if sep else ""


def resolve_config(config: str) -> str:
  """Checks the config file exists (`config.find_config_file`); returns it
  relative to the repository when it lies inside it (commands run from the
  repository root)."""
  path, arg = config_lib.find_config_file(config, root=REPO_ROOT)
  if path.startswith(REPO_ROOT + os.sep):
    path = os.path.relpath(path, REPO_ROOT)
  return path + (f":{arg}" if arg else "")


def check_keys(config, keys: Iterable[str], where: str) -> None:
  """Every override key must name an existing config field."""
  for key in keys:
    node = config
    for part in key.split("."):
      try:
        node = node[part]
      except (KeyError, TypeError, AttributeError):
        raise SweepError(
            f"{where}: unknown config key {key!r} (see "
            "configs/base.py for every key)"
        ) from None


def run_name(overrides: dict, sweep_config: str) -> str:
  """Deterministic, readable, filesystem-safe name from the overrides."""
  parts = []
  for key, value in overrides.items():
    if key == "config":
      path, arg = _config_parts(value)
      sweep_path, _ = _config_parts(sweep_config)
      stem = os.path.splitext(os.path.basename(path))[0]
      same = os.path.normpath(path) == os.path.normpath(sweep_path)
      parts.append(arg if same and arg else f"{stem}{':' + arg if arg else ''}")
      continue
    text = format_value(value)
    if key == "init_from":  # The source run's folder name (and :STEP).
      text = os.path.basename(text.rstrip("/").split(":")[0]) + (
          f"_{text.rsplit(':', 1)[1]}" if ":" in text else ""
      )
    abbrev = ABBREV.get(key)
    if abbrev is None:
      parts.append(f"{key}={text}")
    else:
      parts.append(f"{abbrev}{text}")
  raw = "-".join(parts) or "default"
  name = NAME_CHARS.sub("x", raw).replace(":", "x")
  if name != raw or len(name) > _MAX_NAME or name.startswith("."):
    digest = hashlib.sha1(
        json.dumps(overrides, sort_keys=True).encode()
    ).hexdigest()[:8]
    name = f"{name.lstrip('.')[:_MAX_NAME]}-{digest}"
  return name


def _takes_out(get_sweep) -> bool:
  """Whether get_sweep has a parameter: the sweep's output folder, for a
  sweep whose later runs depend on finished ones."""
  return bool(inspect.signature(get_sweep).parameters)


def read_spec(path: str, out: str | None = None) -> tuple[SweepSpec, bool]:
  """(the SweepSpec a sweep file's get_sweep() returns (or a dict with its
  keys), its name defaulting to the file's; whether it depends on finished
  runs); SweepError if anything fails.

  A get_sweep that takes a parameter is called with the output folder
  (`out`, else runs/<its name>), so it can list runs that depend on
  finished ones (e.g. each method at the best rho of a tuning stage)."""
  if not path or not os.path.isfile(path):
    raise SweepError(
        f"sweep file {path!r} not found; give a file like "
        "configs/sweeps/table1.py"
    )
  if not path.endswith(".py"):
    raise SweepError(f"sweep file {path!r} is not a .py file")
  config_lib.import_package_of(path)  # For `from configs import base`.
  module_name = "_sweep_" + re.sub(r"\W", "_", os.path.abspath(path))
  module_spec = importlib.util.spec_from_file_location(module_name, path)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except UsageError:
    raise
  except Exception as e:  # A broken sweep file: say which and why.
    raise SweepError(
        f"cannot load sweep file {path!r}: " f"{type(e).__name__}: {e}"
    ) from None
  if not callable(getattr(module, "get_sweep", None)):
    raise SweepError(f"sweep file {path!r} defines no get_sweep()")
  default_name = os.path.splitext(os.path.basename(path))[0]

  def call(*args):
    spec = module.get_sweep(*args)
    if isinstance(spec, dict):
      spec = SweepSpec.from_dict(spec)
    elif not isinstance(spec, SweepSpec):
      raise SweepError("get_sweep() must return a SweepSpec or a dict")
    return dataclasses.replace(spec, name=spec.name or default_name)

  try:
    if not _takes_out(module.get_sweep):
      return call(), False
    if out is None:  # Its default folder: runs/<the name it gives itself>.
      out = os.path.join("runs", call(None).name)
    return call(os.path.abspath(out)), True
  except UsageError as e:
    raise SweepError(f"{path}: {e}") from None
  except Exception as e:  # pylint: disable=broad-except
    raise SweepError(
        f"{path}: get_sweep() failed: {type(e).__name__}: " f"{e}"
    ) from None


def _compute_matched(overrides: dict, common: dict, cfg, i: int) -> dict:
  """A run with "compute_matched": METHOD trains its own method for the
  training compute METHOD would take in its steps
  (`sam_schedule.adamw_step_equivalents`: the registry's `Method.cost` per
  step from sam.start_step on): its opt.num_train_steps and
  opt.warmup_steps are scaled by the ratio of the two, so the schedule is
  stretched, not cut. AdamW for SAM's compute: twice the steps."""
  from nanodo_sam import sam as sam_lib  # pylint: disable=g-import-not-at-top
  from nanodo_sam import sam_schedule  # pylint: disable=g-import-not-at-top

  method = overrides["compute_matched"]
  if method not in sam_lib.METHODS:
    raise SweepError(
        f"run {i}: compute_matched={method!r} is not a method; use one of "
        f"{', '.join(sam_lib.METHODS)}"
    )

  def value(key):
    section, name = key.split(".")
    return overrides.get(key, common.get(key, cfg[section][name]))

  steps = int(value("opt.num_train_steps"))
  start = int(value("sam.start_step"))
  own = sam_schedule.adamw_step_equivalents(steps, start, value("sam.method"))
  factor = sam_schedule.adamw_step_equivalents(steps, start, method) / own
  out = dict(overrides)
  out["opt.num_train_steps"] = round(steps * factor)
  out["opt.warmup_steps"] = round(int(value("opt.warmup_steps")) * factor)
  return out


def load_sweep(
    path: str, out: str | None = None, extra: dict | None = None
) -> Sweep:
  """Loads and checks a sweep file; run workdirs lie under `out`."""
  spec, dependent = read_spec(path, out)
  config = resolve_config(spec.config)
  common = dict(spec.overrides)
  common.update(extra or {})
  out = os.path.abspath(out or os.path.join("runs", spec.name))
  runs, seen, loaded = [], {}, {}
  for i, overrides in enumerate(spec.runs):
    run_config = (
        resolve_config(overrides["config"]) if "config" in overrides else config
    )
    if run_config not in loaded:
      loaded[run_config] = config_lib.load_config_file(run_config, REPO_ROOT)
      check_keys(loaded[run_config], common, f"{path}: overrides")
    check_keys(
        loaded[run_config],
        [k for k in overrides if k not in RESERVED],
        f"{path}: run {i}",
    )
    rname = run_name(overrides, config)
    if "compute_matched" in overrides:
      overrides = _compute_matched(overrides, common, loaded[run_config], i)
    if rname in seen:
      raise SweepError(
          f"{path}: runs {seen[rname]} and {i} have the same "
          f"name {rname!r} (identical overrides?)"
      )
    seen[rname] = i
    runs.append(
        Run(
            name=rname,
            config=run_config,
            overrides={k: v for k, v in overrides.items() if k not in RESERVED},
            common=common,
            workdir=os.path.join(out, rname),
        )
    )
  return Sweep(
      name=spec.name, path=path, config=config, runs=runs, dependent=dependent
  )


# --------------------------------------------------------------- backends


def is_done(run: Run) -> bool:
  """results.json closes a completed or diverged run; a preempted one has
  none (its progress.json says so) and is started again."""
  return os.path.isfile(os.path.join(run.workdir, "results.json"))


def shell_join(args: Iterable[str]) -> str:
  return " ".join(shlex.quote(a) for a in args)


def _manifest(sweep: Sweep, out: str, backend: str) -> None:
  os.makedirs(out, exist_ok=True)
  manifest = {
      "name": sweep.name,
      "sweep_file": os.path.abspath(sweep.path),
      "backend": backend,
      "runs": [
          {
              "name": r.name,
              "config": r.config,
              "overrides": r.overrides,
              "common": r.common,
              "workdir": r.workdir,
          }
          for r in sweep.runs
      ],
  }
  tmp = os.path.join(out, "sweep.json.tmp")
  with open(tmp, "w") as f:
    json.dump(manifest, f, indent=2)
  os.replace(tmp, os.path.join(out, "sweep.json"))


def _result_line(run: Run, rc: int) -> str:
  if rc == EXIT_PREEMPTED:
    return "stopped by a signal at a checkpoint; launch again to resume"
  try:
    with open(os.path.join(run.workdir, "results.json")) as f:
      res = json.load(f)
    loss = res.get("final_eval_loss")
    return (
        f"{res.get('status')}, eval loss "
        f"{'n/a' if loss is None else f'{loss:.4f}'}"
    )
  except (OSError, ValueError):
    return "no results.json (see train.log)"


def _report_end(run: Run, rc: int, where: str, t_run: float) -> bool:
  """Prints how a run's process ended; returns whether the run is done."""
  done = is_done(run)
  state = (
      "done"
      if done
      else "stopped"
      if rc == EXIT_PREEMPTED
      else f"FAILED (exit {rc})"
  )
  print(
      f"{where} {state} {run.name}: {_result_line(run, rc)} "
      f"({time.time() - t_run:.0f}s)",
      flush=True,
  )
  return done


def _stop(active) -> None:
  """Ctrl-C: each active (run, proc, log, t, i) finishes its step and
  writes a checkpoint (exit 75), or is killed after STOP_GRACE_S."""
  for _, proc, _, _, _ in active:
    proc.send_signal(signal.SIGINT)
  for _, proc, log, _, _ in active:
    try:
      proc.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
      proc.kill()
    log.close()
  print(
      "interrupted; launch again to resume (finished runs are skipped, "
      "stopped ones resume from their checkpoint)",
      file=sys.stderr,
  )


def run_local(
    sweep: Sweep,
    out: str,
    train_cmd: list[str],
    parallel: int,
    env: dict | None = None,
) -> int:
  """Runs every not-yet-finished run; returns the number that failed."""
  _manifest(sweep, out, "local")
  todo = [r for r in sweep.runs if not is_done(r)]
  for r in sweep.runs:
    if is_done(r):
      print(f"skip (results.json exists): {r.name}", flush=True)
  total, failed, queue, active = len(todo), 0, list(todo), {}
  t0 = time.time()

  def start(run: Run, index: int):
    os.makedirs(run.workdir, exist_ok=True)
    cmd = train_cmd + run.train_args()
    with open(os.path.join(run.workdir, "command.sh"), "w") as f:
      f.write(f"cd {shlex.quote(REPO_ROOT)} && {shell_join(cmd)}\n")
    log = open(os.path.join(run.workdir, "train.log"), "ab")
    proc = subprocess.Popen(
        cmd,
        cwd=REPO_ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=dict(os.environ, **(env or {})),
    )
    print(f"[{index}/{total}] start {run.name}", flush=True)
    return proc, log, time.time(), index

  index = 0
  try:
    while queue or active:
      while queue and len(active) < parallel:
        index += 1
        run = queue.pop(0)
        active[run.name] = (run, *start(run, index))
      time.sleep(0.2)
      for key, (run, proc, log, t_run, i) in list(active.items()):
        rc = proc.poll()
        if rc is None:
          continue
        log.close()
        del active[key]
        failed += not _report_end(run, rc, f"[{i}/{total}]", t_run)
  except KeyboardInterrupt:
    _stop(active.values())
    raise
  print(
      f"sweep {sweep.name}: {total - failed} of {total} started runs "
      f"finished, {failed} failed, {len(sweep.runs) - total} already done; "
      f"{time.time() - t0:.0f}s; results in {out}",
      flush=True,
  )
  return failed


def _check_sbatch_token(value: str, what: str) -> None:
  if not value or re.search(r"\s", value):
    raise SweepError(
        f"{what} {value!r} must be non-empty without whitespace "
        "(sbatch splits #SBATCH lines on spaces)"
    )


def _slurm_header(
    sweep: Sweep,
    out: str,
    sbatch_args: Sequence[str],
    parallel: int,
    env: dict | None,
) -> list[str]:
  """The sbatch script's options, comments and environment, up to the
  `case` over array tasks."""
  n = len(sweep.runs)
  array = f"0-{n - 1}" + (f"%{parallel}" if parallel else "")
  logs = os.path.join(out, "logs")
  _check_sbatch_token(logs, "--out")
  for a in sbatch_args:
    _check_sbatch_token(a, "--sbatch")
  return [
      "#!/bin/bash",
      f"#SBATCH --job-name={sweep.name}",
      f"#SBATCH --array={array}",
      f"#SBATCH --output={logs}/%x-%A_%a.out",
      "#SBATCH --open-mode=append",
      # Preemption-safe: SIGTERM to this shell STOP_GRACE_S before the time
      # limit; requeueable when preempted (an --sbatch option may override).
      f"#SBATCH --signal=B:TERM@{STOP_GRACE_S}",
      "#SBATCH --requeue",
      *[f"#SBATCH {a}" for a in sbatch_args],
      f"# Sweep {sweep.name} ({n} runs) from {os.path.abspath(sweep.path)}:",
      "# array task i trains grid point i; finished runs (results.json) exit",
      "# at once, so resubmitting the script resumes the sweep. With several",
      "# tasks per job (--ntasks-per-node, --nodes), srun starts one JAX",
      "# process per task and JAX detects the SLURM cluster.",
      f"# Requeue: {STOP_GRACE_S} s before the time limit (--signal=B:TERM@"
      f"{STOP_GRACE_S}) or on",
      "# preemption SLURM sends SIGTERM; the trap below forwards it to srun,",
      "# which signals every task: each finishes its step, writes a checkpoint",
      f"# and exits {EXIT_PREEMPTED}, and the task requeues itself (scontrol "
      "requeue; with",
      "# --requeue SLURM also requeues preempted jobs). Started again, the",
      "# same command resumes the run exactly where it stopped.",
      "set -euo pipefail",
      f"cd {shlex.quote(REPO_ROOT)}",
      f"export PYTHONPATH={shlex.quote(REPO_ROOT)}${{PYTHONPATH:+:$PYTHONPATH}}",
      "# GPU compiler flags (nanodo_sam/sweep.py XLA_GPU_FLAGS); an XLA_FLAGS",
      "# set when submitting, or --env=XLA_FLAGS=..., replaces them.",
      f'export XLA_FLAGS="${{XLA_FLAGS:-{" ".join(XLA_GPU_FLAGS)}}}"',
      *[f"export {k}={shlex.quote(v)}" for k, v in (env or {}).items()],
      'case "${SLURM_ARRAY_TASK_ID:?not an array task}" in',
  ]


def slurm_script(
    sweep: Sweep,
    out: str,
    train_cmd: list[str],
    sbatch_args: Sequence[str] = (),
    parallel: int = 0,
    env: dict | None = None,
) -> str:
  """One sbatch array script: array task i runs grid point i."""
  lines = _slurm_header(sweep, out, sbatch_args, parallel, env)
  for i, run in enumerate(sweep.runs):
    lines.append(f"  {i}) WORKDIR={shlex.quote(run.workdir)}")
    lines.append(f"     RUN=({shell_join(train_cmd + run.train_args())}) ;;")
  lines += [
      '  *) echo "no grid point for array task $SLURM_ARRAY_TASK_ID" >&2;'
      " exit 1 ;;",
      "esac",
      'if [ -f "$WORKDIR/results.json" ]; then',
      '  echo "already finished: $WORKDIR"; exit 0',
      "fi",
      'mkdir -p "$WORKDIR"',
      'srun "${RUN[@]}" &',
      "SRUN_PID=$!",
      "trap 'kill -TERM \"$SRUN_PID\" 2>/dev/null || true' TERM INT",
      "# A trapped signal cuts `wait` short: wait until srun has exited.",
      'while kill -0 "$SRUN_PID" 2>/dev/null; do wait "$SRUN_PID" || true;'
      " done",
      'rc=0; wait "$SRUN_PID" || rc=$?',
      f'if [ "$rc" -eq {EXIT_PREEMPTED} ]; then',
      '  TASK="${SLURM_ARRAY_JOB_ID:-$SLURM_JOB_ID}_$SLURM_ARRAY_TASK_ID"',
      '  echo "stopped at a checkpoint: requeueing $TASK"',
      '  scontrol requeue "$TASK" && exit 0',
      "fi",
      'exit "$rc"',
      "",
  ]
  return "\n".join(lines)


def tpu_commands(
    sweep: Sweep,
    train_cmd: list[str],
    tpu: str,
    zone: str,
    project: str,
    remote_dir: str,
    env: dict | None = None,
) -> list[str]:
  """One `gcloud ... ssh --worker=all --command=...` per run."""
  cmds = []
  prefix = [f"{k}={shlex.quote(v)}" for k, v in (env or {}).items()]
  for run in sweep.runs:
    done = os.path.join(run.workdir, "results.json")
    inner = (
        f"cd {shlex.quote(remote_dir)} && "
        f"if [ -f {shlex.quote(done)} ] ; then echo already finished ; "
        f"else {' '.join(['env', 'PYTHONPATH=.'] + prefix)} "
        f"{shell_join(train_cmd + run.train_args())} ; fi"
    )
    args = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", tpu, f"--zone={zone}"]
    if project:
      args.append(f"--project={project}")
    args += ["--worker=all", f"--command={inner}"]
    cmds.append(shell_join(args))
  return cmds


# --------------------------------------------------------------------- CLI


class _Parser(argparse.ArgumentParser):

  def error(self, message):
    print(f"{PROG}: error: {message}", file=sys.stderr)
    sys.exit(2)


def _parser() -> argparse.ArgumentParser:
  p = _Parser(prog=PROG, description="Expand a sweep file and launch its runs.")
  p.add_argument("sweep_file")
  p.add_argument(
      "--backend", default="local", help="local | slurm | tpu (default local)"
  )
  p.add_argument(
      "--out", default="", help="output directory (default runs/<sweep name>)"
  )
  p.add_argument(
      "--parallel",
      type=int,
      default=0,
      help="local: runs at a time (default 1); slurm: array "
      "throttle (default none)",
  )
  p.add_argument(
      "--dry-run",
      action="store_true",
      help="print the runs and their overrides; start nothing",
  )
  p.add_argument(
      "--only", default="", help="regex: keep only runs whose name matches"
  )
  p.add_argument(
      "--set",
      action="append",
      default=[],
      metavar="KEY=VALUE",
      help="extra override for every run (repeatable), e.g. "
      "data.tfds_data_dir=gs://bucket/tensorflow_datasets",
  )
  p.add_argument(
      "--train-cmd",
      default="",
      help="training command (default: this Python -m "
      "nanodo_sam.cli train for local, 'nanodo-sam train' "
      "otherwise)",
  )
  p.add_argument(
      "--env",
      action="append",
      default=[],
      metavar="NAME=VALUE",
      help="environment variable for the runs, e.g. "
      "TFDS_DATA_DIR=gs://bucket/tensorflow_datasets",
  )
  _backend_flags(p)
  return p


def _backend_flags(p: argparse.ArgumentParser) -> None:
  """The flags of the slurm and tpu backends."""
  p.add_argument(
      "--sbatch",
      action="append",
      default=[],
      help="slurm: extra #SBATCH option (repeatable), e.g. "
      "--sbatch=--gpus-per-node=8",
  )
  p.add_argument("--tpu", default="", help="tpu: TPU VM name")
  p.add_argument("--zone", default="", help="tpu: zone")
  p.add_argument("--project", default="", help="tpu: GCP project")
  p.add_argument(
      "--remote-dir",
      default="nanodo-sam",
      help="tpu: repository checkout on the TPU VM (relative to "
      "the home directory, or absolute)",
  )


def _key_values(items: Sequence[str], what: str, key_re: str) -> dict:
  out = {}
  for item in items:
    key, sep, value = item.partition("=")
    if not sep or not re.fullmatch(key_re, key):
      raise SweepError(f"{what} {item!r} is not KEY=VALUE")
    out[key] = value
  return out


@dataclass
class _Plan:
  """The command line, checked: what `main` launches."""

  sweep: Sweep
  out: str
  extra: dict
  env: dict
  only: re.Pattern | None
  train_cmd: list[str]


def _plan(args) -> _Plan:
  """Checks every argument and loads the sweep; SweepError (one line)
  before anything is started or written."""
  if args.backend not in BACKENDS:
    raise SweepError(
        f"unknown backend {args.backend!r}; use one of "
        f"{', '.join(BACKENDS)}"
    )
  if args.parallel < 0:
    raise SweepError(f"--parallel={args.parallel} must be >= 1")
  extra = _key_values(args.set, "--set", r"[A-Za-z_][\w.]*")
  env = _key_values(args.env, "--env", r"[A-Za-z_]\w*")
  if args.backend == "tpu" and not (args.tpu and args.zone):
    raise SweepError("--backend=tpu needs --tpu=NAME and --zone=ZONE")
  try:
    only = re.compile(args.only) if args.only else None
  except re.error as e:
    raise SweepError(f"--only={args.only!r} is not a regex: {e}") from None
  sweep = load_sweep(args.sweep_file, args.out or None, extra)
  out = os.path.abspath(args.out or os.path.join("runs", sweep.name))
  if only:
    sweep.runs = [r for r in sweep.runs if only.search(r.name)]
    if not sweep.runs:
      raise SweepError(f"--only={args.only!r} matches no run")
  if args.train_cmd:
    train_cmd = shlex.split(args.train_cmd)
  elif args.backend == "local":
    train_cmd = [sys.executable, "-m", "nanodo_sam.cli", "train"]
  else:
    train_cmd = ["nanodo-sam", "train"]
  return _Plan(sweep, out, extra, env, only, train_cmd)


def _dry_run(plan: _Plan) -> int:
  """Prints the runs, their overrides and the first command."""
  sweep = plan.sweep
  print(
      f"sweep {sweep.name}: {len(sweep.runs)} runs, config "
      f"{sweep.config}, out {plan.out} (dry run: nothing started or "
      "written)"
  )
  for i, run in enumerate(sweep.runs):
    state = "done" if is_done(run) else "todo"
    kv = " ".join(f"{k}={format_value(v)}" for k, v in run.overrides.items())
    cfg = f" [{run.config}]" if run.config != sweep.config else ""
    print(f"{i:4d} {state} {run.name}{cfg}: {kv}")
  if sweep.runs and sweep.runs[0].common:
    print(
        "every run: "
        + " ".join(
            f"{k}={format_value(v)}" for k, v in sweep.runs[0].common.items()
        )
    )
  print("command: " + shell_join(plan.train_cmd + sweep.runs[0].train_args()))
  return 0


def _launch_local(plan: _Plan, args) -> int:
  """Runs the sweep here; a dependent sweep is expanded again after each
  pass until it lists nothing new."""
  sweep, failed, seen = plan.sweep, 0, set()
  while True:
    new = [r for r in sweep.runs if r.name not in seen]
    seen.update(r.name for r in sweep.runs)
    if not new:
      break
    failed += run_local(
        dataclasses.replace(sweep, runs=new),
        plan.out,
        plan.train_cmd,
        max(args.parallel, 1),
        plan.env,
    )
    if not sweep.dependent or failed:
      break
    sweep = load_sweep(args.sweep_file, plan.out, plan.extra)
    if plan.only:
      sweep.runs = [r for r in sweep.runs if plan.only.search(r.name)]
  return 1 if failed else 0


def _launch(plan: _Plan, args) -> int:
  if args.backend == "local":
    return _launch_local(plan, args)
  sweep, out = plan.sweep, plan.out
  if args.backend == "slurm":
    script = slurm_script(
        sweep, out, plan.train_cmd, args.sbatch, args.parallel, plan.env
    )
    _manifest(sweep, out, "slurm")
    os.makedirs(os.path.join(out, "logs"), exist_ok=True)
    path = os.path.join(out, "sweep.sbatch")
    with open(path, "w") as f:
      f.write(script)
    print(f"wrote {path} ({len(sweep.runs)} array tasks); submit with:")
    print(f"  sbatch {shlex.quote(path)}")
    return 0
  cmds = tpu_commands(
      sweep,
      plan.train_cmd,
      args.tpu,
      args.zone,
      args.project,
      args.remote_dir,
      plan.env,
  )
  print(
      f"# sweep {sweep.name}: {len(cmds)} runs; run these one after "
      "another (--out is a path on the TPU VM: use a shared disk or a "
      "gcsfuse mount so checkpoints outlive it)"
  )
  print("\n".join(cmds))
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  """`nanodo-sam sweep`: 0 done, 1 a run failed, 2 bad input."""
  args = _parser().parse_args(argv)
  try:
    plan = _plan(args)
    return _dry_run(plan) if args.dry_run else _launch(plan, args)
  except UsageError as e:
    print(f"{PROG}: error: {e}", file=sys.stderr)
    return 2
