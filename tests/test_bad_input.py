"""Bad input to `nanodo-sam train`: one line on stderr (`nanodo-sam: error:
...`, the first thing there), exit status 2, and nothing on disk created or
changed (issue: every bad input a clean line before any work)."""

import os
import subprocess
import sys

import pytest

from test_cli import QUICK, ROOT, TINY, _assert_one_line_error, _run


def _snapshot(path) -> dict:
  """{relative path: (size, mtime)} of everything under `path`."""
  out = {}
  for root, dirs, files in os.walk(path):
    for name in dirs + files:
      p = os.path.join(root, name)
      st = os.stat(p)
      out[os.path.relpath(p, path)] = (st.st_size, st.st_mtime_ns)
  return out


def _config_file(tmp_path, body: str) -> str:
  path = tmp_path / "bad_config.py"
  path.write_text(body)
  return str(path)


# (case, extra argv, the words the error line must hold). "{tmp}" is the test's
# folder; "{cfg:BODY}" a config file holding BODY.
CASES = [
    (
        "syntax error in the config file",
        ["--config={cfg:def get_config(:\n}"],
        "bad_config.py",
    ),
    (
        "get_config raises",
        [
            "--config={cfg:def get_config():\n"
            "  raise ValueError('no such size')\n}"
        ],
        "no such size",
    ),
    ("no get_config", ["--config={cfg:X = 1\n}"], "get_config"),
    (
        "log_every_steps=0",
        ["--config.log_every_steps=0"],
        "log_every_steps=0 must be a positive integer",
    ),
    (
        "shuffle_buffer=0",
        ["--config.data.shuffle_buffer=0"],
        "data.shuffle_buffer=0",
    ),
    (
        "negative width",
        ["--config.model.D=-1"],
        "model.D=-1 must be a positive integer",
    ),
    ("V below the vocabulary", ["--config.model.V=100"], "model.V=100"),
    (
        "nothing left to resume",
        ["--config.checkpoint_max_to_keep=0"],
        "checkpoint_max_to_keep=0",
    ),
    (
        "unknown wandb mode",
        ["--config.wandb.mode=sometimes"],
        "wandb.mode='sometimes'",
    ),
    (
        "diagnostics batches beyond the eval set",
        [
            "--config.diagnostics.every_steps=2",
            "--config.diagnostics.num_batches=5",
        ],
        "diagnostics.num_batches",
    ),
    (
        "a context that cannot fit",
        ["--config.model.L=100000000", "--config.model.D=4096"],
        "GiB",
    ),
    ("unknown key", ["--config.model.width=3"], "unknown config key"),
    (
        "cuDNN attention without a GPU",
        ["--config.model.attention=cudnn"],
        "model.attention=cudnn cannot run here",
    ),
    ("workdir is a file", ["--workdir={tmp}/a_file"], "a_file"),
]


@pytest.mark.parametrize("case,argv,words", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_touches_nothing(
    tmp_path, capsys, case, argv, words
):
  del case
  (tmp_path / "a_file").write_text("a user's file\n")
  before = _snapshot(tmp_path)
  args = [f"--config={QUICK}", f"--workdir={tmp_path}/run", *TINY]
  for arg in argv:
    arg = arg.replace("{tmp}", str(tmp_path))
    if "{cfg:" in arg:
      body = arg[arg.index("{cfg:") + 5 : arg.rindex("}")]
      arg = "--config=" + _config_file(tmp_path, body)
      before = _snapshot(tmp_path)
    args.append(arg)  # A later --config / --workdir wins.
  code, _, err = _run(capsys, "train", *args)
  _assert_one_line_error(code, err, words)
  assert _snapshot(tmp_path) == before  # No workdir, config.json, events.


@pytest.mark.parametrize(
    "argv,words",
    [
        (["--config.data.shuffle_buffer=0"], "data.shuffle_buffer=0"),
        (
            [
                "--config.diagnostics.every_steps=2",
                "--config.diagnostics.num_batches=5",
            ],
            "diagnostics.num_batches",
        ),
        pytest.param(  # Imports the harness (and HF datasets, which logs).
            ["--config.eval.lm_eval_tasks=nanodo_cloze,no_such_task"],
            "unknown lm-eval task 'no_such_task'",
            marks=pytest.mark.slow,  # ~15 s of imports.
            id="lm_eval_task",
        ),
    ],
)
def test_the_error_line_is_the_first_thing_on_stderr(tmp_path, argv, words):
  """In a fresh process (TensorFlow and absl start up there), the command's
  own line comes first: their start-up lines are silenced."""
  proc = subprocess.run(
      [
          sys.executable,
          "-m",
          "nanodo_sam.cli",
          "train",
          f"--config={QUICK}",
          f"--workdir={tmp_path}/run",
          *TINY,
          *argv,
      ],
      capture_output=True,
      text=True,
      cwd=ROOT,
      env={**os.environ, "JAX_PLATFORMS": "cpu"},
      timeout=300,
  )
  assert proc.returncode == 2
  lines = proc.stderr.strip().splitlines()
  assert lines and lines[0].startswith("nanodo-sam: error:"), proc.stderr
  assert len(lines) == 1 and words in lines[0], proc.stderr
  assert not (tmp_path / "run").exists()
