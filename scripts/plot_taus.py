"""Figures 2 and 4: tau_logit, tau_func, tau_cross over training.

    python scripts/plot_taus.py PATH [PATH ...] [--out=FILE.png] [--no-cross]

PATH is a run directory or a directory of runs. Reads the scalars
`sharpness/tau_logit`, `sharpness/tau_func`, `sharpness/tau_cross` from the
TensorBoard event files a run writes when diagnostics.every_steps > 0 (or
`nanodo-sam analyze` logs); one panel per tau, one line per run. --no-cross
gives Figure 2 (tau_logit, tau_func only). Default output:
COMMON_PARENT/figures/taus.png.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from scripts import figures  # pylint: disable=g-import-not-at-top

TAUS = ("tau_logit", "tau_func", "tau_cross")
LABELS = {"tau_logit": "τ_logit", "tau_func": "τ_func",
          "tau_cross": "τ_cross"}


def event_dirs(paths) -> list[str]:
  """Directories holding TensorBoard event files, under `paths`."""
  dirs = set()
  for p in paths:
    for f in glob.glob(os.path.join(p, "**", "events.out.tfevents.*"),
                       recursive=True):
      dirs.add(os.path.dirname(os.path.abspath(f)))
  return sorted(dirs)


def iter_events(path: str):
  """Event protos from one event file (a TFRecord file: length, masked CRC,
  payload, CRC per record), without importing TensorFlow."""
  import struct
  from tensorboard.compat.proto import event_pb2
  with open(path, "rb") as f:
    while True:
      header = f.read(12)
      if len(header) < 12:
        return
      (length,) = struct.unpack("<Q", header[:8])
      payload = f.read(length)
      if len(payload) < length or len(f.read(4)) < 4:
        return  # A truncated last record (the run is still writing).
      yield event_pb2.Event.FromString(payload)


def _value(v) -> float | None:
  if v.HasField("simple_value"):
    return float(v.simple_value)
  if v.HasField("tensor"):  # TF2 summaries (clu): a scalar tensor.
    import numpy as np
    t = v.tensor
    if t.float_val:
      return float(t.float_val[0])
    if t.double_val:
      return float(t.double_val[0])
    if t.tensor_content:
      dtype = {1: np.float32, 2: np.float64}.get(t.dtype)
      if dtype is not None:
        return float(np.frombuffer(t.tensor_content, dtype)[0])
  return None


def read_scalars(logdir: str, tags) -> dict[str, list[tuple[int, float]]]:
  """{tag: [(step, value)]} from a directory's event files (simple-value or
  TF2 tensor summaries; a step logged twice, e.g. after a resume, keeps its
  last value)."""
  wanted = set(tags)
  out: dict[str, dict[int, float]] = {}
  files = sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*")),
                 key=os.path.getmtime)
  for path in files:
    for event in iter_events(path):
      if not event.HasField("summary"):
        continue
      for v in event.summary.value:
        if v.tag in wanted:
          value = _value(v)
          if value is not None:
            out.setdefault(v.tag, {})[int(event.step)] = value
  return {tag: sorted(pts.items()) for tag, pts in out.items()}


def run_label(logdir: str) -> str:
  import json
  path = os.path.join(logdir, "config.json")
  name = os.path.basename(logdir)
  try:
    with open(path) as f:
      cfg = json.load(f)
    method, rho = cfg["sam"]["method"], cfg["sam"]["rho"]
    return method if method == "adamw" else f"{method} ρ={rho:g}"
  except (OSError, ValueError, KeyError, TypeError):
    return name


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("paths", nargs="+", metavar="PATH")
  p.add_argument("--out", default="")
  p.add_argument("--no-cross", action="store_true",
                 help="only tau_logit and tau_func (Figure 2)")
  args = p.parse_args(argv)
  taus = TAUS[:2] if args.no_cross else TAUS
  series = {}
  for d in event_dirs(args.paths):
    data = read_scalars(d, [f"sharpness/{t}" for t in taus])
    if data:
      series[d] = data
  if not series:
    print("plot_taus: error: no sharpness/tau_* scalars in event files under "
          f"{', '.join(args.paths)}; train with --config.diagnostics."
          "every_steps=N", file=sys.stderr)
    return 2
  plt = figures.pyplot()
  fig, axes = plt.subplots(1, len(taus), figsize=(4.5 * len(taus), 3.8),
                           squeeze=False)
  for ax, tau in zip(axes[0], taus):
    for d, data in series.items():
      pts = data.get(f"sharpness/{tau}", [])
      if pts:
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker="o", ms=3, label=run_label(d))
    ax.axhline(0.0, color="k", lw=0.6)
    ax.set_title(LABELS[tau])
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  axes[0][0].legend(fontsize=7)
  out = args.out or figures.default_out(args.paths, "taus.png")
  figures.save(fig, out, note=f" ({len(series)} runs)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
