"""Runs anywhere: the data shipped with the package, where each dataset is
read from (data.tfds_data_dir, $TFDS_DATA_DIR, the shipped copy), data
that is missing (one line, exit 2) or downloaded (data.download), run
directories written before the package shipped its data, and a fresh copy
of the repository with nothing beside it."""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, SPM_PATH, TINY_SHAKESPEARE_TXT, tiny_config
from nanodo_sam import cli
from nanodo_sam import config as config_lib
from nanodo_sam import data as data_lib
from nanodo_sam import rundir
from nanodo_sam.config import UsageError

# TFDS's tiny_shakespeare:1.0.0 split sizes, in characters (its catalog:
# 90% / 5% / 5% of the 1,115,394 characters).
TFDS_TINY_SHAKESPEARE = {
    "train": 1_003_854,
    "validation": 55_770,
    "test": 55_770,
}


def _texts(source, split):
  return [
      ex["text"].numpy().decode("utf-8")
      for ex in source.get_dataset(split, shuffle=False)
  ]


def test_shipped_files_are_the_recorded_ones():
  sha = lambda p: hashlib.sha256(open(p, "rb").read()).hexdigest()
  assert sha(SPM_PATH) == data_lib.T5_VOCAB_SHA256
  readme = open(data_lib.shipped_path("README.md")).read()
  for name in (data_lib.T5_VOCAB_FILE, data_lib.TINY_SHAKESPEARE_TXT):
    assert f"{sha(data_lib.shipped_path(name))}  {name}" in readme
  v = data_lib.make_vocab(f"shipped:{data_lib.T5_VOCAB_FILE}")
  assert (v.vocab_size, v.eos_id, data_lib.bos_id(v)) == (32101, 1, 2)


def test_shipped_tiny_shakespeare_is_split_as_tfds_splits_it():
  raw = open(TINY_SHAKESPEARE_TXT, encoding="utf-8").read()
  source = data_lib.SHIPPED_TFDS["tiny_shakespeare:1.0.0"]()
  texts = {s: _texts(source, s) for s in TFDS_TINY_SHAKESPEARE}
  assert {s: [len(t) for t in v] for s, v in texts.items()} == {
      s: [n] for s, n in TFDS_TINY_SHAKESPEARE.items()
  }
  assert texts["train"][0] + texts["validation"][0] + texts["test"][0] == raw


def test_shipped_c4_subset_has_its_documents():
  source = data_lib.SHIPPED_TFDS["c4/en:3.1.0"]()
  assert len(_texts(source, "validation")) == 200
  assert len(_texts(source, "train")) == 1000


def _copy_c4(root):
  """A TFDS data dir holding a copy of the shipped C4 subset."""
  shutil.copytree(
      data_lib.shipped_path(data_lib.SHIPPED_TFDS_DIR), root / "tfds"
  )
  return str(root / "tfds")


def _read_from(source) -> str:
  """The TFDS data dir a TfdsDataSource reads ("shipped" for the shipped
  one)."""
  data_dir = source.tfds_dataset.data_dir
  return (
      "shipped"
      if data_dir == data_lib.shipped_path(data_lib.SHIPPED_TFDS_DIR)
      else data_dir
  )


def test_tfds_data_dir_and_env_win_over_the_shipped_copy(tmp_path, monkeypatch):
  cfg = tiny_config(**{"data.tfds_name": "c4/en:3.1.0"})
  assert cfg.data.use_shipped
  assert _read_from(data_lib.tfds_source(cfg.data)) == "shipped"
  tfds_dir = _copy_c4(tmp_path)
  monkeypatch.setenv("TFDS_DATA_DIR", tfds_dir)
  assert _read_from(data_lib.tfds_source(cfg.data)) == tfds_dir
  # $TFDS_DATA_DIR without the dataset: the shipped copy.
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "empty"))
  assert _read_from(data_lib.tfds_source(cfg.data)) == "shipped"
  # The config's folder comes first, and must hold the dataset.
  cfg.data.tfds_data_dir = tfds_dir
  assert _read_from(data_lib.tfds_source(cfg.data)) == tfds_dir
  cfg.data.tfds_data_dir = str(tmp_path / "empty")
  with pytest.raises(UsageError, match="not found in TFDS data dir"):
    data_lib.tfds_source(cfg.data)


def test_paper_configs_do_not_read_the_subset(tmp_path, monkeypatch):
  cfg = config_lib.load_config_file("configs/c4_fixed_length.py:2M")
  assert not cfg.data.use_shipped and not cfg.data.download
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
  with pytest.raises(UsageError) as e:
    data_lib.tfds_source(cfg.data)
  msg = str(e.value)
  assert "\n" not in msg and "--config.data.download=True" in msg
  assert "TFDS_DATA_DIR" in msg and "gs://" in msg
  monkeypatch.setenv("TFDS_DATA_DIR", _copy_c4(tmp_path))
  assert data_lib.tfds_source(cfg.data).tfds_dataset.data_dir == str(
      tmp_path / "tfds"
  )


def test_missing_c4_is_the_first_and_only_line_on_stderr(tmp_path):
  """A paper config on a machine without C4: one line, first on stderr (no
  TFDS warning about the empty folder before it), exit 2, nothing written."""
  home = tmp_path / "home"
  (home / "tensorflow_datasets" / "c4" / "en" / "3.1.0").mkdir(parents=True)
  env = {k: v for k, v in os.environ.items() if k != "TFDS_DATA_DIR"}
  env.update(HOME=str(home), PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  workdir = tmp_path / "run"
  p = subprocess.run(
      [
          sys.executable,
          "-m",
          "nanodo_sam.cli",
          "train",
          f"--config={os.path.join(ROOT, 'configs', 'c4_fixed_length.py')}:2M",
          f"--workdir={workdir}",
      ],
      cwd=tmp_path,
      env=env,
      capture_output=True,
      text=True,
      timeout=600,
  )
  assert p.returncode == 2, p.stderr
  first = p.stderr.splitlines()[0]
  assert first.startswith(
      "nanodo-sam: error: dataset 'c4/en:3.1.0' not "
      "found in TFDS's default folder"
  ), p.stderr
  assert "--config.data.download=True" in first
  assert not workdir.exists()


def test_download_lets_tfds_prepare_a_dataset(tmp_path):
  """data.download=True: TFDS prepares a dataset that is not there (here
  one defined by a builder in this file, generated offline), then it is
  read; without it, the absence is a UsageError."""
  import tensorflow_datasets as tfds

  class NanodoSamTestText(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self,
          features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
      )

    def _split_generators(self, dl_manager):
      del dl_manager
      return {
          "train": self._generate_examples(["one document", "another"]),
          "validation": self._generate_examples(["held out"]),
      }

    def _generate_examples(self, docs):
      for i, d in enumerate(docs):
        yield i, {"text": d}

  del NanodoSamTestText  # Registered with TFDS by its definition.
  cfg = tiny_config(
      **{
          "data.tfds_name": "nanodo_sam_test_text:1.0.0",
          "data.tfds_data_dir": str(tmp_path),
      }
  )
  with pytest.raises(UsageError, match="not found in TFDS data dir"):
    data_lib.tfds_source(cfg.data)
  assert not list(tmp_path.iterdir())
  cfg.data.download = True
  source = data_lib.tfds_source(cfg.data)
  assert _texts(source, "validation") == ["held out"]
  cfg.data.download = False  # Now prepared: read as it is.
  assert sorted(_texts(data_lib.tfds_source(cfg.data), "train")) == [
      "another",
      "one document",
  ]


def test_an_old_vocabulary_path_maps_to_the_shipped_copy(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  old = os.path.join("..", "shared", "data", data_lib.T5_VOCAB_FILE)
  assert data_lib.vocab_path(old) == SPM_PATH
  other = os.path.join("..", "shared", "data", "other.model")
  assert data_lib.vocab_path(other) == other
  # An existing file at the old path is read as it is.
  (tmp_path / data_lib.T5_VOCAB_FILE).write_bytes(b"x")
  assert data_lib.vocab_path(data_lib.T5_VOCAB_FILE) == data_lib.T5_VOCAB_FILE
  # A shipped copy with another hash does not stand in for it.
  monkeypatch.setattr(data_lib, "T5_VOCAB_SHA256", "0" * 64)
  assert data_lib.vocab_path(old) == old
  with pytest.raises(UsageError, match="vocabulary file not found"):
    data_lib.make_vocab(old)


def _old_style(workdir):
  """Rewrites a run's config.json as runs wrote it before the package
  shipped its data: the vocabulary beside the checkout, no use_shipped or
  download keys."""
  path = os.path.join(workdir, "config.json")
  raw = json.load(open(path))
  raw["data"]["vocab"] = os.path.join(
      "..", "shared", "data", data_lib.T5_VOCAB_FILE
  )
  del raw["data"]["use_shipped"], raw["data"]["download"]
  json.dump(raw, open(path, "w"))


@pytest.mark.slow  # End-to-end training runs.
def test_an_old_run_directory_evaluates_and_resumes(
    tmp_path, monkeypatch, capsys
):
  from nanodo_sam import train as train_lib

  monkeypatch.chdir(tmp_path)
  over = {
      "data.tfds_name": "c4/en:3.1.0",
      "model.V": 32101,
      "data.vocab": SPM_PATH,
      "data.add_bos": True,
      "data.eval_mode": "per_document",
      "opt.num_train_steps": 6,
      "checkpoint_every_steps": 3,
      "eval_every_steps": 3,
  }
  workdir = str(tmp_path / "run")
  straight = train_lib.train(tiny_config(**over), workdir)
  # Back to step 3, as a crash there would leave it; then an old run.
  shutil.rmtree(os.path.join(workdir, "checkpoints", "6"))
  os.remove(os.path.join(workdir, "results.json"))
  _old_style(workdir)
  old = rundir.read_config(workdir)
  assert old.data.use_shipped and not os.path.exists(old.data.vocab)
  with pytest.raises(SystemExit) as e:
    cli.main(["eval", f"--workdir={workdir}"])
    raise SystemExit(0)
  assert e.value.code == 0
  metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert metrics["step"] == 3 and np.isfinite(metrics["eval_loss"])
  resumed = train_lib.train(old, workdir)
  assert resumed["final_eval_loss"] == straight["final_eval_loss"]


def _fresh_clone(tmp_path) -> str:
  """The repository's tracked files (what a clone has) in a folder with
  nothing beside it."""
  files = (
      subprocess.run(
          ["git", "ls-files", "-z"], cwd=ROOT, check=True, capture_output=True
      )
      .stdout.decode()
      .split("\0")
  )
  clone = tmp_path / "alone" / "nanodo-sam"
  for f in filter(None, files):
    if os.path.isfile(os.path.join(ROOT, f)):
      os.makedirs(clone / os.path.dirname(f), exist_ok=True)
      shutil.copy2(os.path.join(ROOT, f), clone / f)
  assert os.listdir(tmp_path / "alone") == ["nanodo-sam"]
  return str(clone)


@pytest.mark.slow  # End to end: two runs from a fresh clone.
def test_a_fresh_clone_trains_the_quickstart_and_the_miniature(tmp_path):
  clone = _fresh_clone(tmp_path)
  env = {
      k: v
      for k, v in os.environ.items()
      if k not in ("TFDS_DATA_DIR", "NANODO_SRC")
  }
  env.update(
      HOME=str(tmp_path / "home"),
      PYTHONPATH=clone,
      JAX_PLATFORMS="cpu",
      TF_CPP_MIN_LOG_LEVEL="3",
  )

  def run(*argv):
    p = subprocess.run(
        [sys.executable, *argv],
        cwd=clone,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout

  where = run("-c", "import nanodo_sam; print(nanodo_sam.__file__)")
  assert where.strip().startswith(clone)
  out = run(
      "-m",
      "nanodo_sam.cli",
      "train",
      "--config=configs/quickstart.py",
      "--workdir=runs/quickstart",
      "--config.opt.num_train_steps=4",
      "--config.opt.warmup_steps=1",
      "--config.eval_every_steps=0",
      "--config.data.eval_steps=1",
      "--config.checkpoint_every_steps=0",
  )
  assert json.loads(out)["steps"] == 4
  out = run(
      "-m",
      "nanodo_sam.cli",
      "train",
      "--config=configs/miniature.py",
      "--workdir=runs/mini",
      "--config.opt.num_train_steps=1",
      "--config.opt.warmup_steps=0",
      "--config.eval_every_steps=0",
      "--config.data.eval_steps=1",
      "--config.checkpoint_every_steps=0",
  )
  results = json.loads(out)
  assert results["steps"] == 1 and np.isfinite(results["final_eval_loss"])


def test_a_wheel_carries_the_data_and_finds_it(tmp_path):
  """A non-editable install: the wheel holds every shipped file, and the
  package, imported from the unpacked wheel, finds them."""
  import importlib.util
  import zipfile
  # Built with this environment's setuptools where it has one (offline).
  local = (
      ["--no-build-isolation"] if importlib.util.find_spec("setuptools") else []
  )
  subprocess.run(
      [
          sys.executable,
          "-m",
          "pip",
          "wheel",
          ROOT,
          "--no-deps",
          "-q",
          "-w",
          str(tmp_path / "dist"),
          *local,
      ],
      check=True,
      capture_output=True,
      timeout=600,
  )
  (wheel,) = (tmp_path / "dist").glob("nanodo_sam-*.whl")
  tracked = subprocess.run(
      ["git", "ls-files", "nanodo_sam/data_files"],
      cwd=ROOT,
      check=True,
      capture_output=True,
      text=True,
  ).stdout.split()
  assert len(tracked) == 18, tracked
  with zipfile.ZipFile(wheel) as z:
    assert set(tracked) <= set(z.namelist())
    z.extractall(tmp_path / "site")
  env = dict(os.environ, PYTHONPATH=str(tmp_path / "site"))
  p = subprocess.run(
      [
          sys.executable,
          "-c",
          "import nanodo_sam, json\n"
          "from nanodo_sam import data\n"
          "print(json.dumps([nanodo_sam.__file__, data.vocab_path("
          "'shipped:' + data.T5_VOCAB_FILE), data.shipped_path("
          "data.TINY_SHAKESPEARE_TXT)]))",
      ],
      cwd=tmp_path,
      env=env,
      capture_output=True,
      text=True,
      check=True,
  )
  where, vocab, text = json.loads(p.stdout)
  for path in (where, vocab, text):
    assert path.startswith(str(tmp_path / "site")), path
  assert (
      hashlib.sha256(open(vocab, "rb").read()).hexdigest()
      == data_lib.T5_VOCAB_SHA256
  )
  _configs_load_the_same_from(tmp_path / "site", cwd=tmp_path)


def _configs_load_the_same_from(site, cwd):
  """Every configs/*.py, given to the installed package (imported from
  `site`, run in `cwd`, outside the checkout) as --config=PATH relative to
  `cwd`, is the config the checkout loads; so is `nanodo-sam params`'s
  count."""
  folder = os.path.join(ROOT, "configs")
  names = sorted(
      f for f in os.listdir(folder) if f.endswith(".py") and f != "__init__.py"
  )
  assert len(names) >= 8, names
  paths = [os.path.relpath(os.path.join(folder, n), cwd) for n in names]
  code = (
      "import contextlib, io, json, sys\n"
      "import nanodo_sam\n"
      "from nanodo_sam import cli, config\n"
      "out = {'package': nanodo_sam.__file__}\n"
      "for path in sys.argv[1:]:\n"
      "  out[path] = config.to_dict(config.load_config_file(path))\n"
      "buf = io.StringIO()\n"
      "with contextlib.redirect_stdout(buf):\n"
      "  cli.main(['params', '--config=' + sys.argv[1]])\n"
      "out['params'] = json.loads(buf.getvalue().splitlines()[-1])\n"
      "print(json.dumps(out))"
  )
  p = subprocess.run(
      [sys.executable, "-c", code, *paths],
      cwd=cwd,
      env=dict(os.environ, PYTHONPATH=str(site)),
      capture_output=True,
      text=True,
      timeout=600,
  )
  assert p.returncode == 0, p.stderr
  out = json.loads(p.stdout.splitlines()[-1])
  assert out.pop("package").startswith(str(site))
  from nanodo_sam import model as model_lib

  first = config_lib.load_config_file(os.path.join(folder, names[0]))
  assert out.pop("params")["total_params"] == model_lib.total_params(
      first.model
  )
  assert sorted(out) == sorted(paths)
  for name, path in zip(names, paths):
    here = config_lib.to_dict(
        config_lib.load_config_file(os.path.join(folder, name))
    )
    assert out[path] == here, name
