"""`nanodo-sam plan`: a tiny model compiled by the real compilers on this
CPU, for an H100 host (XLA's GPU compiler, the `gpu` extra) and a TPU v5p
slice (libtpu, the `tpu` extra), and what they report: cuDNN attention on
the H100 target, the block weights gathered in bf16, nothing but scalars
moved inside the output head's chunk loop, memory within the chip, and the
compiler's step time on the TPU. Bad input: an unknown target, a missing
compiler, a run that cannot fit.

The compiles run in one subprocess for the module (`python
tests/test_plan.py OUT`), as `nanodo-sam plan` runs them: JAX on the CPU,
the target's devices from its topology. They skip only where the compiler's
extra is not installed (.ci/run installs both).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from conftest import WIDE, run_worker, step_config, tiny_flags, worker_env

# conftest's wide and short model (each H100 holds 2 rows, 4 head chunks;
# each v5p chip 4 rows, 8 chunks).
TINY = {**WIDE, "model.attention": "auto", "sam.method": "sam"}
TARGETS = {"h100x8": "jax_plugins.xla_cuda12", "tpu-v5p-8": "libtpu"}


def _installed(module: str) -> bool:
  try:
    return importlib.util.find_spec(module) is not None
  except ModuleNotFoundError:
    return False


def worker(out_path: str) -> None:
  import jax

  jax.config.update("jax_platforms", "cpu")
  from nanodo_sam import plan
  from nanodo_sam import targets

  res = {}
  for name, module in TARGETS.items():
    if not _installed(module):
      continue
    cfg = step_config((1, -1, 1), **TINY)
    report = plan.plan(cfg, targets.get(name))
    res[name] = report
  with open(out_path, "w") as f:
    json.dump(res, f, indent=1)


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
  if not any(_installed(m) for m in TARGETS.values()):
    pytest.skip(
        "neither compiler extra is installed: pip install -e " "'.[gpu,tpu]'"
    )
  return run_worker(__file__, [], 1, tmp_path_factory.mktemp("plan"))


def _report(reports, name):
  if name not in reports:
    pytest.skip(
        f"{name}'s compiler is not installed: pip install -e "
        f"'.[{'gpu' if name.startswith('h100') else 'tpu'}]'"
    )
  return reports[name]


def _step(report):
  (p,) = [p for p in report["programs"] if p["what"] == "sam step"]
  return p


def test_h100_target_runs_cudnn_attention(reports):
  r = _report(reports, "h100x8")
  assert r["target"]["chips"] == 8
  assert r["attention"]["kernel"] == "cudnn", r["attention"]
  # Forward and backward of 2 layers, at both SAM points: at least 8.
  assert _step(r)["cudnn_attention_calls"] >= 8


@pytest.mark.parametrize("name", TARGETS)
def test_block_weights_are_gathered_in_bf16(reports, name):
  """FSDP gathers the block kernels (N * (4D^2 + 2DF) parameters) in bf16:
  at least their bf16 bytes, twice for SAM's two points."""
  r = _report(reports, name)
  gathered = _step(r)["collective_bytes_by_dtype"]["all-gather"]
  blocks = 2 * (4 * 256**2 + 2 * 256 * 1024)
  assert gathered.get("bf16", 0) >= 2 * blocks * 2, gathered


@pytest.mark.parametrize("name", TARGETS)
def test_sam_collectives_within_the_scale_bound(reports, name):
  """The scale goal on the real compilers: a SAM-family step moves at most
  5x the float32 parameter bytes (tests/test_scale.py's bound)."""
  p = _step(_report(reports, name))
  assert 0 < p["collective_ratio"] <= 5.0, p["collective_bytes"]


@pytest.mark.parametrize("name", TARGETS)
def test_chunk_loop_moves_only_scalars(reports, name):
  p = _step(_report(reports, name))
  assert p["unknown_loops"] == 0
  # The head's chunk loop is there: its matmuls weigh more than once.
  assert p["matmul_flops"] > p["matmul_flops_counted_once"]
  assert p["collective_bytes_in_loops"] == 0, p["collective_bytes"]


@pytest.mark.parametrize("name", TARGETS)
def test_memory_is_within_the_chip(reports, name):
  r = _report(reports, name)
  m = _step(r)["memory_bytes"]
  assert 0 < m["total"] < r["budget_bytes"] <= r["target"]["memory_bytes"]
  assert r["microbatches"] == 1


def test_tpu_step_time_estimate_is_scaled_by_loops(reports):
  r = _report(reports, "tpu-v5p-8")
  assert r["target"]["chips"] == 4 and r["attention"]["kernel"] == "xla"
  est = _step(r)["estimate"]
  assert est["loop_scale"] > 1
  assert est["step_s"] == pytest.approx(
      est["compiler_optimal_s"] * est["loop_scale"]
  )
  # Not faster than its matmuls at the chip's peak; MFU a fraction.
  assert est["step_s"] >= est["matmul_at_peak_s"]
  assert 0 < est["mfu"] < 1


def _cli(args, env=None):
  return subprocess.run(
      [sys.executable, "-m", "nanodo_sam.cli", "plan", *args],
      capture_output=True,
      text=True,
      env=env or worker_env(1),
      timeout=600,
      cwd=os.path.dirname(os.path.dirname(__file__)),
  )


def _error_lines(stderr: str) -> list[str]:
  return [l for l in stderr.splitlines() if "nanodo-sam: error" in l]


def test_unknown_target_lists_the_known_ones(tmp_path):
  out = tmp_path / "plan.json"
  p = _cli(tiny_flags() + ["--target=h100x9", f"--out={out}"])
  assert p.returncode == 2
  (line,) = _error_lines(p.stderr)
  assert "h100x9" in line and "h100x8" in line and "tpu-v5p-8" in line
  assert "cpu-sim-N" in line
  assert not out.exists()


def test_missing_compiler_names_the_extra(monkeypatch):
  from nanodo_sam import targets
  from nanodo_sam.errors import UsageError

  monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
  with pytest.raises(UsageError, match=r"pip install -e '\.\[tpu\]'"):
    targets.check_installed(targets.get("tpu-v4-32"))
  with pytest.raises(UsageError, match=r"pip install -e '\.\[gpu\]'"):
    targets.check_installed(targets.get("a100x8"))


@pytest.mark.slow
def test_a_run_that_cannot_fit_exits_2(tmp_path):
  if not _installed(TARGETS["h100x8"]):
    pytest.skip("the GPU compiler is not installed: pip install -e '.[gpu]'")
  out = tmp_path / "plan.json"
  flags = [f"--config.{k}={v}" for k, v in TINY.items()]
  p = _cli(
      tiny_flags()
      + flags
      + [
          "--config.mesh.fsdp=-1",
          "--config.mesh.data=1",
          "--config.mesh.device_memory_gb=0.001",
          "--target=h100x8",
          f"--out={out}",
      ]
  )
  assert p.returncode == 2, p.stderr[-2000:]
  (line,) = _error_lines(p.stderr)
  assert "does not fit" in line and "budget" in line, line
  assert not out.exists()


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  worker(sys.argv[1])
