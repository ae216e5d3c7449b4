"""Shared fixtures: data paths, small configs, run directories and
subprocess workers (multi-device checks on fake CPU devices).

Every test reads the data shipped with the package (nanodo_sam/data_files),
whatever the machine holds: $TFDS_DATA_DIR is unset here (a test that needs
it sets it). Tests that compare with Nanodo's own source read it from
$NANODO_SRC (a checkout of google-deepmind/nanodo) and skip without it."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.pop("TFDS_DATA_DIR", None)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# The tests compile hundreds of small programs on the CPU, where compiling
# costs more than running: LLVM's optimisations off for every compile here
# and in the subprocesses the tests start (as test_sharding's and
# test_diagnostics_mesh's simulated meshes always had); the programs a test
# compares are compiled with the same flags (FAST_COMPILE, also a compile's
# compiler_options).
FAST_COMPILE = {"xla_backend_optimization_level": 0}
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = " ".join(
      os.environ.get("XLA_FLAGS", "").split()
      + [f"--{k}={v}" for k, v in FAST_COMPILE.items()]
  )

from nanodo_sam import data as _data  # noqa: E402  (after the environment)

SPM_PATH = _data.shipped_path(_data.T5_VOCAB_FILE)  # The T5 C4 vocabulary.
TINY_SHAKESPEARE_TXT = _data.shipped_path(_data.TINY_SHAKESPEARE_TXT)
NANODO_SRC = os.environ.get("NANODO_SRC", "")
needs_nanodo = pytest.mark.skipif(
    not os.path.isdir(os.path.join(NANODO_SRC, "nanodo")),
    reason="NANODO_SRC is not set to a checkout of google-deepmind/nanodo",
)


QUICKSTART = os.path.join(ROOT, "configs", "quickstart.py")
# configs/quickstart.py shrunk to seconds: byte-level tiny_shakespeare.
TINY_CONFIG = {
    "model.D": 32,
    "model.H": 2,
    "model.N": 1,
    "model.F": 64,
    "model.L": 32,
    "model.V": 259,
    "data.batch_size": 8,
    "data.eval_batch_size": 8,
    "data.eval_steps": 2,
    "opt.num_train_steps": 20,
    "opt.warmup_steps": 2,
    "eval_every_steps": 10,
    "checkpoint_every_steps": 10,
    "log_every_steps": 5,
}


def tiny_config(**overrides):
  """configs/quickstart.py with TINY_CONFIG and `overrides` ("a.b": value)."""
  from nanodo_sam.config import load_config_file

  c = load_config_file(QUICKSTART)
  for k, v in {**TINY_CONFIG, **overrides}.items():
    node = c
    *path, last = k.split(".")
    for p in path:
      node = node[p]
    node[last] = v
  return c


def tiny_flags(**overrides) -> list[str]:
  """The `nanodo-sam train` flags of `tiny_config(**overrides)`."""
  return [f"--config={QUICKSTART}"] + [
      f"--config.{k}={v}" for k, v in {**TINY_CONFIG, **overrides}.items()
  ]


def run_cli(capsys, *argv):
  """(exit code, stdout, stderr) of `nanodo-sam ARGV...` run in-process."""
  from nanodo_sam import cli  # pylint: disable=g-import-not-at-top

  with pytest.raises(SystemExit) as e:
    cli.main(list(argv))
    raise SystemExit(0)
  out = capsys.readouterr()
  return e.value.code, out.out, out.err


def listing(root) -> dict:
  """{relative path: (size, mtime)} of every file and folder under root:
  equal before and after means nothing on disk was touched."""
  out = {".": (0, os.stat(root).st_mtime_ns)}
  for dirpath, dirs, files in os.walk(root):
    for name in dirs + files:
      path = os.path.join(dirpath, name)
      st = os.stat(path)
      out[os.path.relpath(path, root)] = (
          st.st_size if name in files else 0,
          st.st_mtime_ns,
      )
  return out


def read_scalars(workdir, prefix: str) -> dict:
  """{tag: {step: value}} of the TensorBoard scalars under `prefix`."""
  from tensorboard.backend.event_processing import event_accumulator as ea
  from tensorboard.util import tensor_util

  acc = ea.EventAccumulator(
      str(workdir), size_guidance={ea.TENSORS: 0, ea.SCALARS: 0}
  )
  acc.Reload()
  out = {}
  for tag in acc.Tags()["tensors"]:
    if tag.startswith(prefix):
      out[tag] = {
          e.step: float(tensor_util.make_ndarray(e.tensor_proto))
          for e in acc.Tensors(tag)
      }
  for tag in acc.Tags()["scalars"]:
    if tag.startswith(prefix):
      out[tag] = {e.step: e.value for e in acc.Scalars(tag)}
  return out


def step_config(mesh=(1, 1, 1), **overrides):
  """The tiny config with a constant learning rate from step 0 on a
  (data, fsdp, tensor) mesh."""
  defaults = {
      "opt.warmup_steps": 0,
      "opt.decay_type": "constant",
      "opt.peak_learning_rate": 1e-3,
      "sam.rho": 0.1,
      "mesh.data": mesh[0],
      "mesh.fsdp": mesh[1],
      "mesh.tensor": mesh[2],
  }
  return tiny_config(**{**defaults, **overrides})


# Wide and short, like the paper's sizes (parameters outweigh a device's
# activations), bf16 as configs/c4_*.py: 16 rows x 64 positions, the head in
# chunks of 32 tokens, D/H = 64 (cuDNN's attention). tests/test_scale.py
# compiles it on 8 simulated devices, tests/test_plan.py for real targets.
WIDE = {
    "model.D": 256,
    "model.H": 4,
    "model.N": 2,
    "model.F": 1024,
    "model.L": 64,
    "model.V": 2048,
    "model.dtype": "bfloat16",
    "model.head_chunk_tokens": 32,
    "data.batch_size": 16,
}


# ------------------------------------------------------ subprocess workers

JOB_TIMEOUT = 900  # Seconds per subprocess; generous for loaded CI machines.


def worker_env(devices: int) -> dict[str, str]:
  """A clean environment with `devices` fake CPU devices and no cluster:
  multi-device checks run in subprocesses, as JAX fixes its devices when it
  starts."""
  env = {
      k: v
      for k, v in os.environ.items()
      if not k.startswith(
          ("SLURM_", "TPU_", "JAX_COORDINATOR", "OMPI_", "PMI_")
      )
  }
  flags = [
      f
      for f in env.get("XLA_FLAGS", "").split()
      if not f.startswith("--xla_force_host_platform_device_count")
  ]
  env["XLA_FLAGS"] = " ".join(
      flags + [f"--xla_force_host_platform_device_count={devices}"]
  )
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join(
      [ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
  )
  env["TF_CPP_MIN_LOG_LEVEL"] = "3"
  env["XLA_FLAGS"] += "".join(f" --{k}={v}" for k, v in FAST_COMPILE.items())
  return env


class Job:
  """A background subprocess whose output goes to files (no pipe stalls)."""

  def __init__(self, name: str, argv: list[str], env: dict, workdir: str):
    self.name, self.argv = name, argv
    os.makedirs(workdir, exist_ok=True)
    self.out_path = os.path.join(workdir, f"{name}.stdout")
    self.err_path = os.path.join(workdir, f"{name}.stderr")
    self._out = open(self.out_path, "w")
    self._err = open(self.err_path, "w")
    self.proc = subprocess.Popen(
        argv,
        env=env,
        cwd=ROOT,
        stdout=self._out,
        stderr=self._err,
        stdin=subprocess.DEVNULL,
    )

  def wait(self, timeout: float = JOB_TIMEOUT) -> tuple[int, str, str]:
    try:
      rc = self.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      self.proc.kill()
      self.proc.wait()
      rc = "timeout"
    self._out.close()
    self._err.close()
    with open(self.out_path) as f:
      out = f.read()
    with open(self.err_path) as f:
      err = f.read()
    return rc, out, err

  def kill(self) -> None:
    if self.proc.poll() is None:
      self.proc.kill()
      self.proc.wait()
    self._out.close()
    self._err.close()


def run_worker(
    script: str, args: list[str], devices: int, root, timeout=JOB_TIMEOUT
) -> dict:
  """The JSON that `python SCRIPT ARGS... ROOT/results.json` writes, run
  on `devices` fake CPU devices (`worker_env`); its stderr's tail if it
  fails."""
  out = os.path.join(str(root), "results.json")
  name = os.path.splitext(os.path.basename(script))[0]
  job = Job(
      name, [sys.executable, script, *args, out], worker_env(devices), str(root)
  )
  rc, _, err = job.wait(timeout)
  assert rc == 0, f"{name} worker failed ({rc}):\n{err[-4000:]}"
  with open(out) as f:
    return json.load(f)


@pytest.fixture
def tiny_cfg():
  return tiny_config


# A tiny model for end-to-end runs through the launcher (10 steps, seconds).
TINY = {
    "model.size_name": "tiny",
    "model.D": 32,
    "model.H": 2,
    "model.N": 1,
    "model.F": 64,
    "model.L": 32,
    "data.batch_size": 8,
    "data.eval_batch_size": 8,
    "data.eval_steps": 2,
    "opt.num_train_steps": 10,
    "opt.warmup_steps": 2,
    "eval_every_steps": 5,
    "checkpoint_every_steps": 10,
    "log_every_steps": 5,
}
TINY_RUNS = (
    "adamw-lr0.003-seed0",
    "precond_functional_sam-rho0.1-lr0.003-seed0",
)


@pytest.fixture(scope="session")
def tiny_sweep(tmp_path_factory):
  """Real run directories, made once: `nanodo-sam sweep` trains AdamW and Precond
  Func-SAM (rho 0.1) for 10 steps on the TINY model, then `nanodo-sam
  prune-eval` runs on the second (a run with sharpness diagnostics and
  `analyze`'s sharpness.json: tests/test_cli.py). Returns the sweep's output
  directory, holding TINY_RUNS."""
  from nanodo_sam import sweep as sw
  from nanodo_sam import sweep_spec as authoring
  from nanodo_sam import cli

  root = tmp_path_factory.mktemp("tiny_sweep")
  spec = {
      "name": "e2e",
      "config": "configs/quickstart.py",
      "overrides": TINY,
      "runs": authoring.method_runs(
          ["adamw", "precond_functional_sam"], [0.1], learning_rates=(3e-3,)
      ),
  }
  sweep_file = root / "e2e.py"
  sweep_file.write_text(f"def get_sweep():\n  return {spec!r}\n")
  out = root / "runs"
  assert (
      sw.main(
          [str(sweep_file), "--backend=local", f"--out={out}", "--parallel=2"]
      )
      == 0
  )
  pfs = out / TINY_RUNS[1]
  cli.main(["prune-eval", f"--workdir={pfs}", "--fractions=0,0.5"])
  return out


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
  """A tiny run trained once for the session: 40 steps, a checkpoint every
  5 kept (init_from's `DIR:5`; no step 7), one eval at the end (quantize's
  trained loss). Returns its workdir; a test that moves it puts it back."""
  from nanodo_sam import train as train_lib

  cfg = tiny_config(
      **{
          "opt.num_train_steps": 40,
          "eval_every_steps": 40,
          "checkpoint_every_steps": 5,
          "checkpoint_max_to_keep": 8,
      }
  )
  workdir = tmp_path_factory.mktemp("trained_run") / "run"
  train_lib.train(cfg, str(workdir))
  return workdir


def fake_run(
    root,
    name,
    *,
    method,
    rho,
    seed,
    loss,
    size="2M",
    schedule="fixed_length",
    nonlinearity="gelu",
    status="completed",
    sharpness=None,
    rho_warmup_steps=0,
):
  """A run directory written by hand (config.json, results.json and
  optionally sharpness.json), for table logic over many seeds and sizes."""
  d = root / name
  d.mkdir(parents=True)
  (d / "config.json").write_text(
      json.dumps(
          {
              "schedule_name": schedule,
              "seed": seed,
              "model": {"size_name": size, "nonlinearity": nonlinearity},
              "opt": {
                  "num_train_steps": 10000,
                  "peak_learning_rate": 1e-3,
                  "weight_decay": 1e-4,
              },
              "sam": {
                  "method": method,
                  "rho": rho,
                  "rho_warmup_steps": rho_warmup_steps,
              },
          }
      )
  )
  (d / "results.json").write_text(
      json.dumps(
          {
              "final_eval_loss": loss,
              "best_eval_loss": loss,
              "steps": 10000,
              "method": method,
              "rho": rho,
              "peak_learning_rate": 1e-3,
              "model_size_name": size,
              "status": status,
              "eval_history": [[5000, loss + 0.5], [10000, loss]],
          }
      )
  )
  if sharpness:
    (d / "sharpness.json").write_text(json.dumps(sharpness))


class Crash(Exception):
  """Raised by `crash_then_resume` in place of a batch: the run dies."""


def crash_then_resume(monkeypatch, cfg, workdir: str, at_batch: int) -> dict:
  """Trains `cfg` in `workdir` until its `at_batch`-th training batch is
  asked for (the process dies there: Crash), then trains the same config
  again in the same workdir, which resumes it; returns those results."""
  import pytest as _pytest
  from nanodo_sam import data as data_lib
  from nanodo_sam import train as train_lib

  real_next = data_lib.TrainIterator.__next__
  calls = {"n": 0}

  def crashing_next(self):
    calls["n"] += 1
    if calls["n"] == at_batch:
      raise Crash()
    return real_next(self)

  monkeypatch.setattr(data_lib.TrainIterator, "__next__", crashing_next)
  with _pytest.raises(Crash):
    train_lib.train(cfg, workdir)
  monkeypatch.setattr(data_lib.TrainIterator, "__next__", real_next)
  return train_lib.train(cfg, workdir)
