"""Where metrics go: clu writers (TensorBoard + log), wandb and the progress
line.
"""

from __future__ import annotations

import logging
import os
import time
import uuid

import jax
from clu import metric_writers

from nanodo_sam import config as config_lib
from nanodo_sam import flops as flops_lib

log = logging.getLogger("nanodo_sam")


WANDB_ID_FILE = "wandb_id"


def wandb_run_id(workdir: str) -> str:
  """The wandb run id of the run in `workdir`: made once and kept there, so
  a resumed run continues the same wandb run (and a new run in a new or
  emptied workdir starts another)."""
  path = os.path.join(workdir, WANDB_ID_FILE)
  if os.path.exists(path):
    with open(path) as f:
      return f.read().strip()
  run_id = uuid.uuid4().hex[:16]
  with open(path + ".tmp", "w") as f:
    f.write(run_id + "\n")
  os.replace(path + ".tmp", path)
  return run_id


class WandbWriter(metric_writers.MetricWriter):
  """clu MetricWriter that forwards scalars to wandb (offline works). The
  run id lives in the workdir (`wandb_run_id`): a resumed run logs into the
  same wandb run. wandb drops steps at or below the last one it has, so the
  steps between the checkpoint and the kill are kept from the first attempt
  (the resumed run computes the same values: resumption is exact)."""

  def __init__(self, cfg, workdir: str):
    import wandb  # Lazy: optional (wandb.enabled), and slow to import.

    self._wandb = wandb
    self._run = wandb.init(
        project=cfg.wandb.project,
        mode=cfg.wandb.mode,
        dir=workdir,
        config=config_lib.to_dict(cfg),
        name=os.path.basename(os.path.abspath(workdir)),
        id=wandb_run_id(workdir),
        resume="allow",
    )

  def write_scalars(self, step, scalars):
    self._run.log(dict(scalars), step=int(step))

  def write_summaries(self, step, values, metadata=None):
    pass

  def write_images(self, step, images):
    pass

  def write_videos(self, step, videos):
    pass

  def write_audios(self, step, audios, *, sample_rate):
    pass

  def write_texts(self, step, texts):
    pass

  def write_histograms(self, step, arrays, num_buckets=None):
    pass

  def write_hparams(self, hparams):
    pass

  def flush(self):
    pass

  def close(self):
    self._run.finish()


def make_writer(cfg, workdir: str):
  """TensorBoard events in `workdir` and the log (process 0; the others
  only log), plus wandb with wandb.enabled."""
  writer = metric_writers.create_default_writer(
      workdir, just_logging=jax.process_index() > 0, asynchronous=True
  )
  if cfg.wandb.enabled and jax.process_index() == 0:
    writer = metric_writers.MultiWriter([writer, WandbWriter(cfg, workdir)])
  return writer


def write_hparams(writer, cfg) -> None:
  """The config's scalar values, flattened to dotted keys."""
  flat = config_lib.flatten(config_lib.to_dict(cfg))
  writer.write_hparams(
      {k: v for k, v in flat.items() if isinstance(v, (int, float, str, bool))}
  )


class Progress:
  """Console line every log_every_steps: loss, steps/s, tokens/s, TFLOP/s
  per device and MFU (`flops`: the counts `nanodo-sam bench` uses), ETA."""

  def __init__(
      self,
      start: int,
      total: int,
      tokens_per_step: int,
      writer,
      flops_per_token: float = 0.0,
      num_devices: int = 1,
      peak_per_device: float | None = None,
  ):
    self.total, self.tokens_per_step, self.writer = (
        total,
        tokens_per_step,
        writer,
    )
    self.flops_per_token, self.num_devices = flops_per_token, num_devices
    self.peak = peak_per_device
    self.last_step, self.last_time = start, time.time()

  def rates(self, steps_per_sec: float) -> dict:
    """perf/* scalars at a measured step rate (mfu only with a known peak)."""
    tokens = steps_per_sec * self.tokens_per_step
    out = {
        "perf/steps_per_sec": steps_per_sec,
        "perf/tokens_per_sec": tokens,
        "perf/tflops_per_device": (
            self.flops_per_token * tokens / self.num_devices / 1e12
        ),
    }
    mfu = flops_lib.mfu(
        self.flops_per_token, tokens, self.num_devices, self.peak
    )
    if mfu is not None:
      out["perf/mfu"] = mfu
    return out

  def log(self, step: int, metrics) -> None:
    now = time.time()
    if step > self.last_step and now > self.last_time:
      rate = (step - self.last_step) / (now - self.last_time)
      eta = (self.total - step) / rate
      perf = self.rates(rate)
      self.writer.write_scalars(step, perf)
      mfu = perf.get("perf/mfu")
      log.info(
          "step %d/%d: loss %.4f, grad_norm %.3f | %.2f steps/s, "
          "%.0f tokens/s, %.3g TFLOP/s/device, MFU %s, ETA %s",
          step,
          self.total,
          metrics["loss"],
          metrics["grad_norm"],
          rate,
          perf["perf/tokens_per_sec"],
          perf["perf/tflops_per_device"],
          "n/a" if mfu is None else f"{100 * mfu:.1f}%",
          time.strftime("%H:%M:%S", time.gmtime(eta)),
      )
    self.last_step, self.last_time = step, now
