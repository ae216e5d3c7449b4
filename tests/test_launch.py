"""nanodo_sam/sweep.py (`nanodo-sam sweep`): grid expansion, naming, skip-existing, dry-run, SLURM and
TPU command generation, shell quoting, bad input. No training here (a fake
training command stands in); tests/test_reproduce.py trains for real."""

import json
import os
import shlex
import subprocess
import sys

import pytest

from nanodo_sam import config as config_lib
from nanodo_sam import sweep as sw
from nanodo_sam import sweep_spec as authoring
from nanodo_sam import validation

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EVIL = "a b'; rm -rf /"

FAKE_TRAIN = """
import json, os, sys
args = sys.argv[1:]
workdir = [a.split("=", 1)[1] for a in args if a.startswith("--workdir=")][0]
with open(os.environ["FAKE_LOG"], "a") as f:
  f.write(json.dumps(args) + "\\n")
os.makedirs(workdir, exist_ok=True)
with open(os.path.join(workdir, "results.json"), "w") as f:
  json.dump({"status": "completed", "final_eval_loss": 1.0}, f)
"""


def write_sweep(
    tmp_path, runs, *, config="configs/quickstart.py", overrides=None, name="t"
):
  spec = {"name": name, "config": config, "runs": runs}
  if overrides:
    spec["overrides"] = overrides
  path = tmp_path / f"{name}_sweep.py"
  path.write_text(f"def get_sweep():\n  return {spec!r}\n")
  return str(path)


def test_method_runs_grid_adamw_has_no_rho():
  runs = authoring.method_runs(
      ["adamw", "sam"], [0.1, 0.2], learning_rates=(1e-3, 3e-3), seeds=(0, 1)
  )
  adamw = [r for r in runs if r["sam.method"] == "adamw"]
  sam = [r for r in runs if r["sam.method"] == "sam"]
  assert len(adamw) == 2 * 2 and len(sam) == 2 * 2 * 2
  assert all("sam.rho" not in r for r in adamw)
  assert {
      (r["sam.rho"], r["opt.peak_learning_rate"], r["seed"]) for r in sam
  } == {(a, b, c) for a in (0.1, 0.2) for b in (1e-3, 3e-3) for c in (0, 1)}
  assert authoring.grid(**{"a": [1, 2], "b.c": ["x"]}) == [
      {"a": 1, "b.c": "x"},
      {"a": 2, "b.c": "x"},
  ]


def _config_for(run):
  """The resolved config of a run: its file's get_config(arg) + overrides."""
  cfg = config_lib.load_config_file(run.config, sw.REPO_ROOT)
  for key, value in {**run.common, **run.overrides}.items():
    node, *path_, last = [cfg] + key.split(".")
    for p in path_:
      node = node[p]
    assert last in node, f"{run.name}: unknown config key {key}"
    node[last] = value
  return cfg


@pytest.mark.parametrize(
    "name,count",
    [
        ("table1", 57),
        ("table2", 40),
        ("table3", 40),
        ("table5", 66),
        ("rho_sweep", 15),
        ("smoke", 4),
    ],
)
def test_paper_sweeps_expand_to_valid_configs(name, count, tmp_path):
  sweep = sw.load_sweep(
      os.path.join(ROOT, "configs", "sweeps", f"{name}.py"), out=str(tmp_path)
  )
  assert len(sweep.runs) == count
  names = [r.name for r in sweep.runs]
  assert len(set(names)) == len(names)
  assert all(os.path.dirname(r.workdir) == str(tmp_path) for r in sweep.runs)
  checked = set()
  for run in sweep.runs:
    if run.overrides["sam.method"] == "adamw":
      assert "sam.rho" not in run.overrides
    key = (run.config, tuple(run.overrides))
    if key in checked:  # One full validation per config/override shape.
      continue
    checked.add(key)
    cfg = _config_for(run)
    validation.validate(cfg)


def test_paper_rho_centres_and_sizes():
  sweep = sw.load_sweep(os.path.join(ROOT, "configs/sweeps/table2.py"))
  names = {r.name for r in sweep.runs}
  assert "23.9M-sam-rho0.1-lr0.001-seed0" in names
  assert "23.9M-precond_functional_sam-rho0.5-lr0.001-seed0" in names
  assert "117.9M-precond_functional_sam-rho0.4-lr0.001-seed0" in names
  assert "1208M-precond_functional_sam-rho0.4-lr0.001-seed0" in names
  configs = {r.config for r in sweep.runs}
  assert configs == {
      f"configs/c4_fixed_length.py:{s}"
      for s in ("23.9M", "42.5M", "117.9M", "1208M")
  }
  table3 = sw.load_sweep(os.path.join(ROOT, "configs/sweeps/table3.py"))
  assert {r.config.split(":")[0] for r in table3.runs} == {
      "configs/c4_chinchilla.py"
  }


def test_sizes_and_chinchilla_steps():
  from configs import c4_chinchilla, c4_fixed_length
  from configs import sizes as sizes_config
  from nanodo_sam import sizes
  from nanodo_sam import model as model_lib

  expected = {
      "2M": 2_361_088,
      "23.9M": 23_895_360,
      "42.5M": 42_477_312,
      "117.9M": 117_981_440,
      "1208M": 1_208_012_800,
  }
  for name, n in expected.items():
    cfg = c4_fixed_length.get_config(name)
    assert model_lib.non_embedding_params(model_lib.from_config(cfg)) == n
    assert cfg.model.size_name == name and cfg.opt.num_train_steps == 10_000
    assert cfg.data.batch_size * cfg.model.L == 131_072
  steps = {n: c4_chinchilla.get_config(n).opt.num_train_steps for n in expected}
  assert steps == {
      "2M": 361,
      "23.9M": 3647,
      "42.5M": 6482,
      "117.9M": 18003,
      "1208M": 184329,
  }
  total = c4_chinchilla.get_config("23.9M,total")
  assert total.chinchilla_params == "total"
  assert total.opt.num_train_steps == -(
      -20 * sizes.total_params("23.9M") // 131072
  )
  with pytest.raises(ValueError, match="unknown model size"):
    sizes_config.get_config("7B")


def test_run_names_are_safe_and_deterministic():
  a = sw.run_name({"sam.method": "sam", "sam.rho": 0.1, "seed": 0}, "c.py")
  assert a == "sam-rho0.1-seed0"
  evil = sw.run_name({"data.vocab": EVIL}, "c.py")
  assert evil == sw.run_name({"data.vocab": EVIL}, "c.py")
  assert "/" not in evil and " " not in evil and "'" not in evil
  assert evil != sw.run_name({"data.vocab": "a b'; rm -rf ~"}, "c.py")


def test_compute_matched_runs_train_for_the_methods_compute(tmp_path):
  """AdamW for SAM's compute trains 2x the steps (warmup stretched with
  them); Momentum-SAM costs one plain step, so for SAM's compute it too
  takes 2x; after a plain start (sam.start_step) only the SAM part counts
  twice. The quickstart config: 300 steps, 30 warmup."""
  runs = authoring.method_runs(
      ["adamw", "sam", "momentum_sam"], [0.1], compute_matched=True
  )
  matched = [r for r in runs if "compute_matched" in r]
  assert matched == [
      {
          "sam.method": "adamw",
          "compute_matched": "sam",
          "opt.peak_learning_rate": 1e-3,
          "seed": 0,
      }
  ]
  runs = matched + [
      {"sam.method": "momentum_sam", "sam.rho": 0.1, "compute_matched": "sam"},
      {"sam.method": "adamw", "compute_matched": "sam", "sam.start_step": 100},
  ]
  sweep = sw.load_sweep(write_sweep(tmp_path, runs), out=str(tmp_path / "o"))
  steps = [
      (r.overrides["opt.num_train_steps"], r.overrides["opt.warmup_steps"])
      for r in sweep.runs
  ]
  assert steps == [(600, 60), (600, 60), (100 + 2 * 200, 50)]
  assert sweep.runs[0].name == "adamw-compute_matched=sam-lr0.001-seed0"
  assert "compute_matched" not in sweep.runs[0].overrides  # Not a key.
  with pytest.raises(authoring.SweepError, match="common override"):
    authoring.SweepSpec(
        config="c.py", runs=[{}], overrides={"compute_matched": "sam"}
    )


def test_a_continued_run_is_named_after_its_source():
  name = sw.run_name(
      {"config": "configs/continued.py", "init_from": "/r/s/sam-rho0.1-seed1/"},
      "configs/miniature.py",
  )
  assert name == "continued-from_sam-rho0.1-seed1"
  assert (
      sw.run_name({"init_from": "/r/s/adamw-seed2:200"}, "c.py")
      == "from_adamw-seed2_200"
  )


def test_dry_run_prints_runs_and_writes_nothing(tmp_path, capsys):
  path = write_sweep(
      tmp_path, authoring.method_runs(["adamw", "sam"], [0.1, 0.2])
  )
  out = tmp_path / "out"
  assert sw.main([path, "--dry-run", f"--out={out}"]) == 0
  text = capsys.readouterr().out
  assert "3 runs" in text
  assert "sam-rho0.2-lr0.001-seed0: sam.method=sam sam.rho=0.2" in text
  assert "adamw-lr0.001-seed0" in text
  assert not out.exists()


def test_local_runs_each_once_and_skips_finished(tmp_path, capsys, monkeypatch):
  fake = tmp_path / "fake_train.py"
  fake.write_text(FAKE_TRAIN)
  log = tmp_path / "calls.jsonl"
  monkeypatch.setenv("FAKE_LOG", str(log))
  path = write_sweep(
      tmp_path,
      authoring.method_runs(["adamw", "sam"], [0.1, 0.2]),
      overrides={"data.vocab": EVIL},
  )
  out = tmp_path / "out"
  done = out / "sam-rho0.1-lr0.001-seed0"
  done.mkdir(parents=True)
  (done / "results.json").write_text("{}")
  argv = [
      path,
      "--backend=local",
      f"--out={out}",
      "--parallel=2",
      f"--train-cmd={sys.executable} {fake}",
  ]
  assert sw.main(argv) == 0
  calls = [json.loads(l) for l in log.read_text().splitlines()]
  assert len(calls) == 2  # The finished run was skipped.
  workdirs = sorted(a for c in calls for a in c if a.startswith("--workdir="))
  assert workdirs == [
      f"--workdir={out}/adamw-lr0.001-seed0",
      f"--workdir={out}/sam-rho0.2-lr0.001-seed0",
  ]
  for c in calls:  # The value with spaces and quotes arrives intact.
    assert f"--config.data.vocab={EVIL}" in c
    assert c[0] == "--config=configs/quickstart.py"
  assert "skip (results.json exists): sam-rho0.1" in capsys.readouterr().out
  assert sw.main(argv) == 0  # Everything finished: nothing runs again.
  assert len(log.read_text().splitlines()) == 2
  assert json.loads((out / "sweep.json").read_text())["name"] == "t"


def _array_lines(script: str) -> dict[int, list[str]]:
  runs, index = {}, None
  for line in script.splitlines():
    s = line.strip()
    if s[:1].isdigit() and ") WORKDIR=" in s:
      index = int(s.split(")")[0])
    elif s.startswith("RUN=(") and s.endswith(") ;;"):
      runs[index] = shlex.split(s[len("RUN=(") : -len(") ;;")])
  return runs


def test_slurm_script_one_array_task_per_run(tmp_path, capsys):
  path = write_sweep(
      tmp_path,
      authoring.method_runs(["adamw", "sam"], [0.1, 0.2]),
      overrides={"data.vocab": EVIL},
  )
  out = tmp_path / "out"
  assert (
      sw.main(
          [
              path,
              "--backend=slurm",
              f"--out={out}",
              "--parallel=2",
              "--sbatch=--gpus-per-node=8",
              "--sbatch=--time=24:00:00",
              "--env=TFDS_DATA_DIR=gs://b/tfds",
          ]
      )
      == 0
  )
  script = (out / "sweep.sbatch").read_text()
  assert f"sbatch {out}/sweep.sbatch" in capsys.readouterr().out
  assert "#SBATCH --array=0-2%2" in script
  assert "#SBATCH --gpus-per-node=8" in script
  assert 'srun "${RUN[@]}"' in script
  assert "export TFDS_DATA_DIR=gs://b/tfds" in script
  runs = _array_lines(script)
  assert sorted(runs) == [0, 1, 2]
  assert runs[1][:2] == ["nanodo-sam", "train"]
  assert f"--workdir={out}/sam-rho0.1-lr0.001-seed0" in runs[1]
  assert "--config.sam.rho=0.1" in runs[1]
  assert all(f"--config.data.vocab={EVIL}" in r for r in runs.values())
  subprocess.run(["bash", "-n", str(out / "sweep.sbatch")], check=True)


def test_slurm_script_runs_through_bash_with_args_intact(tmp_path):
  """Execute the generated script with a fake srun: the arguments that reach
  the program are exactly the overrides, and an injection attempt stays
  inert text."""
  marker = tmp_path / "pwned"
  payload = f"x y'; touch {marker}; echo '\"$(touch {marker})\""
  path = write_sweep(
      tmp_path,
      [{"sam.method": "sam", "sam.rho": 0.1}],
      overrides={"data.vocab": payload},
  )
  out = tmp_path / "out"
  assert sw.main([path, "--backend=slurm", f"--out={out}"]) == 0
  bindir = tmp_path / "bin"
  bindir.mkdir()
  srun = bindir / "srun"
  srun.write_text(
      f"#!{sys.executable}\nimport json, os, sys\n"
      "json.dump([sys.argv[1:], os.environ.get('XLA_FLAGS')], "
      f"open({str(tmp_path / 'argv.json')!r}, 'w'))\n"
  )
  srun.chmod(0o755)
  env = dict(
      os.environ, PATH=f"{bindir}:{os.environ['PATH']}", SLURM_ARRAY_TASK_ID="0"
  )
  env.pop("XLA_FLAGS", None)
  subprocess.run(
      ["bash", str(out / "sweep.sbatch")],
      check=True,
      env=env,
      capture_output=True,
  )
  argv, xla_flags = json.loads((tmp_path / "argv.json").read_text())
  assert argv[:2] == ["nanodo-sam", "train"]
  assert f"--config.data.vocab={payload}" in argv
  assert not marker.exists()
  # The GPU compiler flags by default; an XLA_FLAGS set at submission wins.
  assert xla_flags.split() == list(sw.XLA_GPU_FLAGS)
  subprocess.run(
      ["bash", str(out / "sweep.sbatch")],
      check=True,
      env=dict(env, XLA_FLAGS="--xla_dump_to=/tmp/x"),
      capture_output=True,
  )
  _, xla_flags = json.loads((tmp_path / "argv.json").read_text())
  assert xla_flags == "--xla_dump_to=/tmp/x"


def test_slurm_xla_gpu_flags_are_known_to_the_installed_xla():
  """XLA aborts on an unknown flag in XLA_FLAGS; JAX on the CPU parses the
  GPU ones too, so a flag renamed in a new jaxlib fails here."""
  code = "import jax; jax.numpy.ones(1).block_until_ready()"
  for flags in (" ".join(sw.XLA_GPU_FLAGS), "--xla_gpu_no_such_flag=true"):
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=dict(os.environ, XLA_FLAGS=flags),
        timeout=300,
    )
    assert (proc.returncode == 0) == ("no_such" not in flags), proc.stderr


def test_tpu_commands_quote_every_value(tmp_path, capsys):
  path = write_sweep(
      tmp_path,
      authoring.method_runs(["sam"], [0.1]),
      overrides={"data.vocab": EVIL},
  )
  out = tmp_path / "out"
  assert (
      sw.main(
          [
              path,
              "--backend=tpu",
              "--tpu=v4-32",
              "--zone=us-c2-b",
              f"--out={out}",
          ]
      )
      == 0
  )
  lines = [
      l for l in capsys.readouterr().out.splitlines() if l.startswith("gcloud")
  ]
  assert len(lines) == 1
  args = shlex.split(lines[0])
  assert args[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "v4-32"]
  assert "--worker=all" in args and "--zone=us-c2-b" in args
  inner = [a for a in args if a.startswith("--command=")][0]
  inner_args = shlex.split(inner[len("--command=") :])
  assert f"--config.data.vocab={EVIL}" in inner_args
  assert "--config.sam.rho=0.1" in inner_args
  assert not out.exists()  # OUT is a path on the TPU VM.


@pytest.mark.parametrize(
    "argv,message",
    [
        (["missing_sweep.py"], "not found"),
        (["{sweep}", "--backend=kubernetes"], "unknown backend"),
        (["{sweep}", "--backend=tpu"], "needs --tpu"),
        (["{sweep}", "--set=novalue"], "KEY=VALUE"),
        (["{sweep}", "--only=zzz"], "matches no run"),
        (["{bad}"], "defines no get_sweep"),
        (["{dup}"], "same name"),
        (["{badcfg}"], "not found"),
        (["{badkey}"], "unknown config key 'sam.rhoo'"),
        (["{badmatch}"], "compute_matched='samm' is not a method"),
        (["{sweep}", "--set=opt.nope=1"], "unknown config key 'opt.nope'"),
    ],
)
def test_bad_input_is_one_line_exit_2(argv, message, tmp_path, capsys):
  sweep = write_sweep(tmp_path, [{"seed": 0}])
  bad = tmp_path / "bad.py"
  bad.write_text("x = 1\n")
  dup = write_sweep(tmp_path, [{"seed": 0}, {"seed": 0}], name="dup")
  badcfg = write_sweep(
      tmp_path, [{"seed": 0}], config="configs/nope.py", name="badcfg"
  )
  badkey = write_sweep(tmp_path, [{"sam.rhoo": 0.1}], name="badkey")
  badmatch = write_sweep(
      tmp_path, [{"compute_matched": "samm"}], name="badmatch"
  )
  files = dict(sweep=sweep, bad=bad, dup=dup, badcfg=badcfg, badkey=badkey)
  argv = [a.format(badmatch=badmatch, **files) for a in argv]
  rc = sw.main(argv + [f"--out={tmp_path / 'out'}"])
  assert rc == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and message in err, err
  assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "spec,message",
    [
        ({"config": "c.py", "runs": []}, "'runs' must be a non-empty list"),
        ({"config": "c.py", "runs": [3]}, "run 0 is 3, not a dict"),
        ({"config": "c.py", "runs": [{"a b": 1}]}, "bad override key 'a b'"),
        ({"config": "c.py", "runs": [{"seed": [0]}]}, "has type list"),
        (
            {"config": "c.py", "runs": [{}], "overrides": {"config": "d.py"}},
            "'config' cannot be a common override",
        ),
        ({"config": 3, "runs": [{}]}, "'config' must be a config path"),
        ({"config": "c.py", "runs": [{}], "name": "a/b"}, "sweep name 'a/b'"),
        ({"config": "c.py", "runs": [{}], "grid": []}, "unknown sweep keys"),
    ],
)
def test_sweep_spec_checks_itself(spec, message):
  with pytest.raises(authoring.SweepError, match=message) as e:
    authoring.SweepSpec.from_dict(spec)
  assert "\n" not in str(e.value)
  assert authoring.SweepSpec(config="c.py", runs=[{"seed": 0}]).name == ""
  with pytest.raises(authoring.SweepError, match="unknown method 'samm'"):
    authoring.method_runs(["samm"], [0.1])


def test_cli_entry_point_bad_backend_exit_2(tmp_path):
  sweep = write_sweep(tmp_path, [{"seed": 0}])
  r = subprocess.run(
      [
          sys.executable,
          "-m",
          "nanodo_sam.cli",
          "sweep",
          sweep,
          "--backend=nope",
      ],
      cwd=tmp_path,
      capture_output=True,
      text=True,
      env=dict(os.environ, PYTHONPATH=ROOT),
  )
  assert r.returncode == 2
  assert r.stderr.strip() == (
      "nanodo-sam sweep: error: unknown backend "
      "'nope'; use one of local, slurm, tpu"
  )
  assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "command,flag", [("sweep", "--backend"), ("tables", "--metric")]
)
def test_installed_entry_point_help(command, flag, tmp_path):
  """The console script pip installs (`nanodo-sam`, pyproject.toml) runs
  the package's commands from any directory."""
  exe = os.path.join(os.path.dirname(sys.executable), "nanodo-sam")
  if not os.path.isfile(exe):
    pytest.skip(f"no installed nanodo-sam beside {sys.executable}")
  r = subprocess.run(
      [exe, command, "--help"],
      cwd=tmp_path,
      capture_output=True,
      text=True,
      env=dict(os.environ, PYTHONPATH=ROOT),
      timeout=120,
  )
  assert r.returncode == 0, r.stderr
  assert r.stdout.startswith(f"usage: nanodo-sam {command}")
  assert flag in r.stdout


def test_loading_every_config_and_sweep_writes_nothing(tmp_path, monkeypatch):
  """Config and sweep files are read by path from anywhere; loading them
  writes nothing (data a config names is prepared when a run reads it)."""
  home = tmp_path / "home"
  home.mkdir()
  monkeypatch.setenv("HOME", str(home))
  monkeypatch.delenv("NANODO_SAM_CACHE", raising=False)
  monkeypatch.setenv("XDG_CACHE_HOME", str(home / ".cache"))
  monkeypatch.chdir(tmp_path)
  configs = sorted(
      f
      for f in os.listdir(os.path.join(ROOT, "configs"))
      if f.endswith(".py") and f != "__init__.py"
  )
  sweeps = sorted(
      f
      for f in os.listdir(os.path.join(ROOT, "configs", "sweeps"))
      if f.endswith(".py") and f != "__init__.py"
  )
  assert len(configs) >= 8 and len(sweeps) >= 11
  for name in configs:
    cfg = config_lib.load_config_file(os.path.join(ROOT, "configs", name))
    assert "model" in cfg, name
  for name in sweeps:
    sweep = sw.load_sweep(
        os.path.join(ROOT, "configs", "sweeps", name),
        out=str(tmp_path / "runs" / name),
    )
    assert sweep.runs, name
  assert [p for p in home.rglob("*")] == []
  assert sorted(os.listdir(tmp_path)) == ["home"]


def test_a_config_file_imports_from_its_own_checkout(tmp_path):
  """`from configs import base` in a config file loaded by path reads the
  configs/ folder beside it (a copy elsewhere here), not the first one on
  sys.path (the loader adds nothing to sys.path)."""
  import shutil

  copy = tmp_path / "elsewhere" / "configs"
  shutil.copytree(os.path.join(ROOT, "configs"), copy)
  (copy / "base.py").write_text(
      "from nanodo_sam import keys\n\n\ndef get_config():\n"
      "  c = keys.defaults()\n  c.schedule_name = 'from_the_copy'\n"
      "  return c\n"
  )
  (copy / "mine.py").write_text(
      "from configs import base\n\n\ndef get_config():\n"
      "  return base.get_config()\n"
  )
  code = (
      "import sys; from nanodo_sam import config as c; "
      f"cfg = c.load_config_file({str(copy / 'mine.py')!r}); "
      "print(cfg.schedule_name, sys.modules['configs'].__file__)"
  )
  r = subprocess.run(
      [sys.executable, "-c", code],
      cwd=tmp_path,
      text=True,
      capture_output=True,
      env=dict(os.environ, PYTHONPATH=ROOT),
  )
  assert r.returncode == 0, r.stderr
  assert r.stdout.split() == ["from_the_copy", str(copy / "__init__.py")]
