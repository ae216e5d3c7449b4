"""`nanodo-sam`: params, eval, and bad input (one line, exit 2, disk intact)."""

import json
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT
from conftest import run_cli as _run
from nanodo_sam import cli

QUICK = os.path.join(ROOT, "configs", "quickstart.py")
TINY = [
    "--config.model.D=32",
    "--config.model.H=2",
    "--config.model.N=1",
    "--config.model.F=64",
    "--config.model.L=32",
    "--config.data.batch_size=8",
    "--config.data.eval_batch_size=8",
    "--config.data.eval_steps=1",
    "--config.opt.num_train_steps=4",
    "--config.opt.warmup_steps=1",
    "--config.eval_every_steps=0",
    "--config.checkpoint_every_steps=0",
]


def _assert_one_line_error(code, err, pattern):
  assert code == 2
  lines = [l for l in err.strip().splitlines() if l.startswith("nanodo-sam")]
  assert len(lines) == 1, err
  assert lines[0].startswith("nanodo-sam: error:")
  assert pattern in lines[0], lines[0]


def test_params_prints_total_and_non_embedding_counts(capsys):
  code, out, _ = _run(
      capsys,
      "params",
      f"--config={QUICK}",
      "--config.model.D=256",
      "--config.model.H=4",
      "--config.model.N=3",
      "--config.model.F=1024",
  )
  assert code == 0
  counts = json.loads(out.strip().splitlines()[-1])
  assert counts["non_embedding_params"] == 2_361_088
  assert counts["total_params"] == 2_361_088 + 259 * 256 + 128 * 256


@pytest.mark.parametrize(
    "override,pattern",
    [
        ("--config.model.nope=1", "unknown config key"),
        ("--config.sam.method=magic_sam", "sam.method='magic_sam' is unknown"),
        ("--config.sam.rho=-0.1", "must be >= 0"),
        ("--config.sam.phi=0.3", "sam.phi=0.3 is ignored"),
        ("--config.opt.optimizer=rmsprop", "opt.optimizer='rmsprop'"),
        ("--config.sam.reuse=True", "needs a SAM-family sam.method"),
        (
            "--config.sam.method=sam --config.sam.rho=0.1 --config.sam.reuse=True",
            "sam.reuse=True does nothing with sam.every_k=1",
        ),
        (
            "--config.data.vocab=/nonexistent/spm.model",
            "vocabulary file not found",
        ),
        (
            "--config.data.tfds_name=tiny_shakespeare:1.0.0 "
            "--config.data.tfds_data_dir=/nonexistent",
            "not found in TFDS data dir",
        ),
    ],
)
def test_bad_train_input_is_one_line_exit_2_and_writes_nothing(
    tmp_path, capsys, override, pattern
):
  workdir = tmp_path / "run"
  code, _, err = _run(
      capsys,
      "train",
      f"--config={QUICK}",
      f"--workdir={workdir}",
      *override.split(),
      *TINY,
  )
  _assert_one_line_error(code, err, pattern)
  assert not workdir.exists()


def test_precond_method_refuses_sgd(tmp_path, capsys):
  code, _, err = _run(
      capsys,
      "train",
      f"--config={QUICK}",
      f"--workdir={tmp_path / 'r'}",
      *TINY,
      "--config.sam.method=precond_sam",
      "--config.opt.optimizer=sgd",
  )
  _assert_one_line_error(code, err, "precond")


def test_workdir_of_another_model_is_refused_untouched(tmp_path, capsys):
  workdir = tmp_path / "run"
  code, out, _ = _run(
      capsys, "train", f"--config={QUICK}", f"--workdir={workdir}", *TINY
  )
  assert code == 0
  before = {
      p: os.path.getmtime(os.path.join(dp, p))
      for dp, _, fs in os.walk(workdir)
      for p in fs
  }
  code, _, err = _run(
      capsys,
      "train",
      f"--config={QUICK}",
      f"--workdir={workdir}",
      *TINY,
      "--config.model.D=64",
  )
  _assert_one_line_error(code, err, "different model")
  after = {
      p: os.path.getmtime(os.path.join(dp, p))
      for dp, _, fs in os.walk(workdir)
      for p in fs
  }
  assert before == after
  code, out, _ = _run(capsys, "eval", f"--workdir={workdir}")
  assert code == 0 and "eval_loss" in out
  code, _, err = _run(capsys, "eval", f"--workdir={workdir}", "--step=3")
  _assert_one_line_error(code, err, "no checkpoint for step 3")


def test_config_file_found_from_any_directory(tmp_path, monkeypatch, capsys):
  """--config=PATH resolves from the working directory, whichever it is
  (config.find_config_file guesses no repository root: a configs/x.py that
  is not under the working directory is not found); a missing file is one
  line."""
  monkeypatch.chdir(tmp_path)
  quickstart = os.path.relpath(os.path.join(ROOT, "configs", "quickstart.py"))
  code, out, _ = _run(
      capsys,
      "params",
      f"--config={quickstart}:",
      "--config.model.D=64",
      "--config.model.H=2",
  )
  assert code == 0 and json.loads(out.strip().splitlines()[-1])["total_params"]
  code, _, err = _run(capsys, "params", "--config=configs/quickstart.py")
  _assert_one_line_error(
      code, err, "config file 'configs/quickstart.py' not found"
  )
  code, _, err = _run(capsys, "params", "--config=configs/nope.py")
  _assert_one_line_error(code, err, "config file 'configs/nope.py' not found")
  code, _, err = _run(capsys, "params", "--config=configs/base.txt")
  _assert_one_line_error(code, err, "is not a .py file")


def test_eval_without_a_run_and_unknown_command(tmp_path, capsys):
  code, _, err = _run(capsys, "eval", f"--workdir={tmp_path}")
  _assert_one_line_error(code, err, "no run in")
  code, _, err = _run(capsys, "frobnicate")
  _assert_one_line_error(code, err, "unknown command")


def test_batch_not_divisible_by_data_parallel_devices(tmp_path):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
  workdir = tmp_path / "run"
  proc = subprocess.run(
      [
          sys.executable,
          "-m",
          "nanodo_sam.cli",
          "train",
          f"--config={QUICK}",
          f"--workdir={workdir}",
          *TINY,
          "--config.data.batch_size=12",
      ],
      env=env,
      capture_output=True,
      text=True,
      cwd=ROOT,
      timeout=300,
  )
  _assert_one_line_error(proc.returncode, proc.stderr, "not divisible")
  assert not workdir.exists()


@pytest.mark.slow  # A one-step run (~28 s on the shared 2-core CPU).
def test_train_validates_the_config_once(tmp_path, capsys, monkeypatch):
  from nanodo_sam import validation

  calls, validate = [], validation.validate
  monkeypatch.setattr(
      validation,
      "validate",
      lambda *a, **k: calls.append(a) or validate(*a, **k),
  )
  code, _, _ = _run(
      capsys,
      "train",
      f"--config={QUICK}",
      f"--workdir={tmp_path / 'run'}",
      *TINY,
      "--config.opt.num_train_steps=1",
  )
  assert code == 0 and (tmp_path / "run" / "results.json").exists()
  assert len(calls) == 1


@pytest.mark.slow  # Trains with diagnostics, then analyze and prune-eval.
def test_analyze_and_prune_eval_on_a_checkpoint(tmp_path, capsys):
  workdir = tmp_path / "run"
  code, _, _ = _run(
      capsys,
      "train",
      f"--config={QUICK}",
      f"--workdir={workdir}",
      *TINY,
      "--config.diagnostics.every_steps=2",
      "--config.diagnostics.num_iters=3",
      "--config.diagnostics.num_probes=2",
  )
  assert code == 0
  from tensorboard.backend.event_processing import event_accumulator

  acc = event_accumulator.EventAccumulator(str(workdir))
  acc.Reload()
  tags = set(acc.Tags()["tensors"]) | set(acc.Tags()["scalars"])
  assert {
      "sharpness/tau_logit",
      "sharpness/lambda_max",
      "sharpness/sam_edge",
      "sharpness/tau_logit_precond",
  } <= tags
  code, out, _ = _run(
      capsys,
      "analyze",
      f"--workdir={workdir}",
      "--num_iters=4",
      "--num_probes=3",
  )
  assert code == 0 and "lambda_max" in out
  res = json.load(open(workdir / "sharpness.json"))
  assert res["step"] == 4
  assert abs(res["tau_logit"] + res["tau_func"] + res["tau_cross"] - 1) < 1e-4
  # AdamW's P from the checkpoint: the split along P^-1 g as well.
  assert (
      abs(
          res["tau_logit_precond"]
          + res["tau_func_precond"]
          + res["tau_cross_precond"]
          - 1
      )
      < 1e-4
  )
  assert res["tau_logit_precond"] != res["tau_logit"]
  assert res["ggn_trace"] > 0 and res["eval_loss"] > 0
  for bad, pattern in [
      ("--num_iters=-1", "must be >= 0"),
      ("--num_batches=0", "must be >= 1"),
      ("--step=7", "no checkpoint for step 7"),
  ]:
    code, _, err = _run(capsys, "analyze", f"--workdir={workdir}", bad)
    _assert_one_line_error(code, err, pattern)
  code, _, err = _run(capsys, "analyze", f"--workdir={tmp_path}")
  _assert_one_line_error(code, err, "no run in")
  code, out, _ = _run(
      capsys, "prune-eval", f"--workdir={workdir}", "--fractions=0,0.5"
  )
  assert code == 0
  rows = json.load(open(workdir / "prune.json"))["results"]
  assert [r["fraction"] for r in rows] == [0.0, 0.5]
  assert abs(rows[1]["actual_fraction"] - 0.5) < 1e-3
  assert rows[0]["eval_loss"] != rows[1]["eval_loss"]
  code, _, err = _run(
      capsys, "prune-eval", f"--workdir={workdir}", "--fractions=0,1.5"
  )
  _assert_one_line_error(code, err, "outside [0, 1)")
  # nanodo_sam/runs.py reads all of it back (tests/test_runs.py: the rest).
  from nanodo_sam import runs

  run = runs.read_run(str(workdir))
  assert run.sharpness == res and run.prune["results"] == rows
  taus = run.scalars(prefix="sharpness/tau_")
  assert [s for s, _ in taus["sharpness/tau_logit"]] == [0, 2]
  for suffix in ("", "_precond"):  # Each split's three taus sum to 1 (eq. 9).
    names = [f"sharpness/tau_{p}{suffix}" for p in ("logit", "func", "cross")]
    for i in range(2):
      assert sum(taus[n][i][1] for n in names) == pytest.approx(1, abs=1e-4)


def test_help_lists_the_commands_and_each_commands_own_flags(capsys):
  code, out, _ = _run(capsys, "--help")
  assert code == 0
  for name, command in cli.COMMANDS.items():
    assert f"  {name} " in out and command.summary in out
  for name, command in cli.COMMANDS.items():
    code, out, err = _run(capsys, name, "--help")
    assert code == 0 and not err
    assert out.startswith(f"usage: nanodo-sam {name} ")
    listed = re.findall(r"^  --(\w+)=", out, re.M)
    assert listed == list(command.flags)
  code, out, _ = _run(capsys, "sample", "-h")
  assert code == 0 and "--temperature=T" in out and "--fractions" not in out
  code, _, err = _run(capsys, "eval", "--workdir=x", "--fractions=0,1")
  _assert_one_line_error(
      code, err, "unknown flag --fractions for " "`nanodo-sam eval`"
  )


@pytest.mark.parametrize(
    "case,pattern",
    [
        ("no_column", "has no column 'text'"),
        ("empty", "is empty (0 bytes)"),
        ("not_parquet", "is not a parquet file"),
        ("no_rows", "has no rows"),
        ("not_text", "holds int64, not text"),
        ("mixed", "mixes json and parquet files"),
    ],
)
def test_bad_parquet_input_is_one_line_exit_2_and_writes_nothing(
    tmp_path, capsys, case, pattern
):
  import pyarrow as pa
  import pyarrow.parquet as pq

  data = tmp_path / "data"
  data.mkdir()
  pq.write_table(
      pa.table({"text": ["a good document"] * 3}), data / "good.parquet"
  )
  bad = data / "bad.parquet"
  if case == "no_column":
    pq.write_table(pa.table({"content": ["x"]}), bad)
  elif case == "empty":
    bad.write_bytes(b"")
  elif case == "not_parquet":
    bad.write_text('{"text": "a JSON line in a .parquet file"}\n')
  elif case == "no_rows":
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), bad)
  elif case == "not_text":
    pq.write_table(pa.table({"text": [1, 2]}), bad)
  else:
    (data / "more.jsonl").write_text('{"text": "x"}\n')
  workdir = tmp_path / "run"
  code, _, err = _run(
      capsys,
      "train",
      f"--config={QUICK}",
      f"--workdir={workdir}",
      *TINY,
      f"--config.data.train_files={data}/*",
      f"--config.data.eval_files={data}/good.parquet",
  )
  _assert_one_line_error(code, err, pattern)
  assert not workdir.exists()
