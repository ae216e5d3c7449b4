"""Shared fixtures: offline data paths and small configs."""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.abspath(os.path.join(ROOT, "..", "shared", "data"))
TFDS_DIR = os.path.join(SHARED_DATA, "tensorflow_datasets")
SPM_PATH = os.path.join(SHARED_DATA,
                        "c4_t5_sentencepiece_cc_all.32000.100extra.model")

if ROOT not in sys.path:
  sys.path.insert(0, ROOT)
os.environ.setdefault("TFDS_DATA_DIR", TFDS_DIR)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

needs_data = pytest.mark.skipif(not os.path.isdir(TFDS_DIR),
                                reason="../shared/data is not present")


def tiny_config(**overrides):
  """The quickstart config shrunk to seconds: byte-level tiny_shakespeare."""
  from configs import quickstart
  c = quickstart.get_config()
  c.model.update(D=32, H=2, N=1, F=64, L=32, V=259)
  c.data.batch_size = 8
  c.data.eval_batch_size = 8
  c.data.eval_steps = 2
  c.opt.num_train_steps = 20
  c.opt.warmup_steps = 2
  c.eval_every_steps = 10
  c.checkpoint_every_steps = 10
  c.log_every_steps = 5
  for k, v in overrides.items():
    node = c
    *path, last = k.split(".")
    for p in path:
      node = node[p]
    node[last] = v
  return c


def read_scalars(workdir, prefix: str) -> dict:
  """{tag: {step: value}} of the TensorBoard scalars under `prefix`."""
  from tensorboard.backend.event_processing import event_accumulator as ea
  from tensorboard.util import tensor_util
  acc = ea.EventAccumulator(str(workdir), size_guidance={ea.TENSORS: 0,
                                                         ea.SCALARS: 0})
  acc.Reload()
  out = {}
  for tag in acc.Tags()["tensors"]:
    if tag.startswith(prefix):
      out[tag] = {e.step: float(tensor_util.make_ndarray(e.tensor_proto))
                  for e in acc.Tensors(tag)}
  for tag in acc.Tags()["scalars"]:
    if tag.startswith(prefix):
      out[tag] = {e.step: e.value for e in acc.Scalars(tag)}
  return out


@pytest.fixture
def tiny_cfg():
  return tiny_config
