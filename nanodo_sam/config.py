"""Config files: finding, loading and flattening them.

Configs are ml_collections ConfigDicts from `configs/*.py` (each defines
`get_config()`, starting from `keys.defaults()`); `--config.a.b=v` overrides
go through ml_collections' config_flags (cli.py). A file that cannot be
loaded is a `UsageError` (one line). The checks a loaded config passes are
`validation.validate`'s; a run directory's config is `rundir.read_config`'s.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sys

import ml_collections

# UsageError is errors.py's; config.UsageError is the same class.
from nanodo_sam.errors import UsageError, one_line as _one_line

# The paper's model sizes by name (appendix A.1; table in configs/sizes.py).
PAPER_SIZES = {
    "2M": dict(D=256, H=4, N=3, F=1024),
    "23.9M": dict(D=576, H=9, N=6, F=2304),
    "42.5M": dict(D=768, H=12, N=6, F=3072),
    "117.9M": dict(D=1280, H=20, N=6, F=5120),
    "1208M": dict(D=4096, H=64, N=6, F=16384),
}


def to_dict(cfg) -> dict:
  return json.loads(cfg.to_json_best_effort())


def flatten(tree: dict, prefix: str = "") -> dict:
  """{"sam": {"rho": 0.1}} -> {"sam.rho": 0.1} (a config as dotted keys)."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def find_config_file(spec: str) -> tuple[str, str]:
  """(absolute path, ARG) of a config file given as 'PATH.py[:ARG]'.

  A relative PATH is looked up from the working directory, then from the
  repository root, so `configs/x.py` works from anywhere. UsageError (one
  line) when it is not a .py file or does not exist. The one resolver behind
  `nanodo-sam --config=`, `launch.sweep` and the tests.
  """
  path, _, arg = spec.partition(":")
  if not path.endswith(".py"):
    raise UsageError(f"config {spec!r} is not a .py file; give "
                     "configs/NAME.py or configs/NAME.py:ARG")
  candidates = [path] if os.path.isabs(path) else [
      os.path.join(os.getcwd(), path), os.path.join(REPO_ROOT, path)]
  found = next((c for c in candidates if os.path.isfile(c)), None)
  if found is None:
    raise UsageError(f"config file {path!r} not found (looked in "
                     f"{', '.join(dict.fromkeys(candidates))}); give "
                     "configs/NAME.py or configs/NAME.py:ARG")
  return os.path.abspath(found), arg


def add_import_root(path: str) -> None:
  """Puts the folder holding `path`'s top package (the checkout, for
  configs/x.py) first on sys.path, so config files can `from configs import
  base` whatever the working directory."""
  root = os.path.dirname(os.path.abspath(path))
  while os.path.isfile(os.path.join(root, "__init__.py")):
    root = os.path.dirname(root)
  if root not in sys.path:
    sys.path.insert(0, root)


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """The ConfigDict of 'PATH.py[:ARG]': the file's get_config(ARG), or
  get_config() without an ARG. UsageError (one line) if it fails."""
  path, arg = find_config_file(spec)
  add_import_root(path)
  module_spec = importlib.util.spec_from_file_location(
      "_config_" + re.sub(r"\W", "_", path), path)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except Exception as e:  # pylint: disable=broad-except
    raise UsageError(f"config file {path!r} failed to load: "
                     f"{_one_line(e)}") from None
  if not callable(getattr(module, "get_config", None)):
    raise UsageError(f"config file {path!r} defines no get_config(); a "
                     "config file defines get_config() returning an "
                     "ml_collections.ConfigDict (see configs/quickstart.py)")
  try:
    cfg = module.get_config(arg) if arg else module.get_config()
  except Exception as e:  # pylint: disable=broad-except
    raise UsageError(f"config {spec!r}: get_config("
                     f"{repr(arg) if arg else ''}) failed: {_one_line(e)}"
                     ) from None
  if not isinstance(cfg, ml_collections.ConfigDict):
    raise UsageError(f"config {spec!r}: get_config() returned a "
                     f"{type(cfg).__name__}, not an ml_collections.ConfigDict")
  return cfg
