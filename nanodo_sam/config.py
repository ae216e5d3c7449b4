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


# The checkout this module lies in (an installed package's site folder when
# it is not one): `nanodo-sam sweep` starts its runs there (sweep.py).
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def find_config_file(spec: str, root: str | None = None) -> tuple[str, str]:
  """(absolute path, ARG) of a config file given as 'PATH.py[:ARG]'.

  A relative PATH is looked up from the working directory (then from `root`
  where one is given: `nanodo-sam sweep` passes the folder its sweep files'
  paths are relative to), so a config file loads the same from a checkout
  and from an installed package. UsageError (one line) when it is not a .py
  file or does not exist. The one resolver behind `nanodo-sam --config=`,
  `nanodo-sam sweep` and the tests.
  """
  path, _, arg = spec.partition(":")
  if not path.endswith(".py"):
    raise UsageError(
        f"config {spec!r} is not a .py file; give "
        "configs/NAME.py or configs/NAME.py:ARG"
    )
  candidates = (
      [path] if os.path.isabs(path) else [os.path.join(os.getcwd(), path)]
  )
  if root is not None and not os.path.isabs(path):
    candidates.append(os.path.join(root, path))
  found = next((c for c in candidates if os.path.isfile(c)), None)
  if found is None:
    raise UsageError(
        f"config file {path!r} not found (looked in "
        f"{', '.join(dict.fromkeys(candidates))}); give "
        "configs/NAME.py or configs/NAME.py:ARG"
    )
  return os.path.abspath(found), arg


def import_package_of(path: str) -> None:
  """Makes the package holding `path` (`configs`, for configs/x.py)
  importable by name, without touching sys.path, so a config file can
  `from configs import base` whatever the working directory: its top folder
  is registered in sys.modules (replacing a `configs` from elsewhere)."""
  top = os.path.dirname(os.path.abspath(path))
  if not os.path.isfile(os.path.join(top, "__init__.py")):
    return
  while os.path.isfile(os.path.join(os.path.dirname(top), "__init__.py")):
    top = os.path.dirname(top)
  name = os.path.basename(top)
  known = sys.modules.get(name)
  if known is not None and [
      os.path.abspath(p) for p in getattr(known, "__path__", [])
  ] == [top]:
    return
  for loaded in [m for m in sys.modules if m.startswith(name + ".")]:
    del sys.modules[loaded]
  spec = importlib.util.spec_from_file_location(
      name, os.path.join(top, "__init__.py"), submodule_search_locations=[top]
  )
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module
  spec.loader.exec_module(module)


def load_config_file(
    spec: str, root: str | None = None
) -> ml_collections.ConfigDict:
  """The ConfigDict of 'PATH.py[:ARG]' (found as `find_config_file(spec,
  root)` finds it): the file's get_config(ARG), or get_config() without an
  ARG. UsageError (one line) if it fails."""
  path, arg = find_config_file(spec, root)
  import_package_of(path)
  module_spec = importlib.util.spec_from_file_location(
      "_config_" + re.sub(r"\W", "_", path), path
  )
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except Exception as e:  # pylint: disable=broad-except
    raise UsageError(
        f"config file {path!r} failed to load: " f"{_one_line(e)}"
    ) from None
  if not callable(getattr(module, "get_config", None)):
    raise UsageError(
        f"config file {path!r} defines no get_config(); a "
        "config file defines get_config() returning an "
        "ml_collections.ConfigDict (see configs/quickstart.py)"
    )
  try:
    cfg = module.get_config(arg) if arg else module.get_config()
  except Exception as e:  # pylint: disable=broad-except
    raise UsageError(
        f"config {spec!r}: get_config("
        f"{repr(arg) if arg else ''}) failed: {_one_line(e)}"
    ) from None
  if not isinstance(cfg, ml_collections.ConfigDict):
    raise UsageError(
        f"config {spec!r}: get_config() returned a "
        f"{type(cfg).__name__}, not an ml_collections.ConfigDict"
    )
  return cfg
