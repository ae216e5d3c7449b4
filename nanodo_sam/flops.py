"""FLOPs of a training step and the hardware's peak: MFU, one definition.

`nanodo-sam bench` and the training loop's progress line (writers.Progress)
both count with these functions, so their TFLOP/s and MFU figures agree.

- model FLOPs per token (a plain step: forward + backward) =
  6 * non-embedding params + 6 * V * D for the tied output layer (a [D, V]
  matmul per token; the input lookup is free) + 12 * N * L * D for the
  attention scores and values (q.k over L keys and p.v, 2 * L * D each
  forward, x3 with backward). Convention: the causal mask is NOT exploited,
  the full L x L product is counted, as XLA's attention computes it (MaxText
  counts half; our MFU is then higher than MaxText's by that term's half);
- method FLOPs per token = model FLOPs * (2 * forwards + 4 * backwards) / 6,
  with the passes of the method's registry entry (`sam.METHODS`: a
  SAM-family step is 2 forwards + 2 backwards = 2x), averaged over the
  `sam.every_k` cycle;
- MFU = method FLOPs per token * tokens/s / (devices * peak per device),
  the dense bfloat16 peak of `PEAK_FLOPS`; None (n/a) where the device is
  not listed (CPUs among them).
"""

from __future__ import annotations

import types

from nanodo_sam import model as model_lib
from nanodo_sam import sam as sam_lib

# Dense (no sparsity) bfloat16 peak FLOP/s per device, by a substring of
# `jax.Device.device_kind` (first match wins). Vendor figures: NVIDIA H100
# SXM / H200 989.4 TFLOP/s, A100 312, B200 2250; Google TPU v4 275, v5e 197,
# v5p 459, v6e (Trillium) 918.
PEAK_FLOPS = (
    ("H100", 989e12),
    ("H200", 989e12),
    ("A100", 312e12),
    ("B200", 2250e12),
    ("TPU v4", 275e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12),
    ("TPU v5p", 459e12),
    ("TPU v5", 459e12),  # v5p reports "TPU v5".
    ("TPU v6 lite", 918e12),
    ("TPU v6e", 918e12),
)


def peak_flops(device) -> float | None:
  """The device's dense bf16 peak FLOP/s, or None where unknown (CPU)."""
  kind = getattr(device, "device_kind", "") or ""
  for name, peak in PEAK_FLOPS:
    if name.lower() in kind.lower():
      return peak
  return None


def model_flops_per_token(D: int, N: int, F: int, L: int, V: int) -> float:
  """6*N_nonembed + 6*V*D + 12*N*L*D (see the module docstring)."""
  n_nonembed = model_lib.non_embedding_params(
      types.SimpleNamespace(N=N, D=D, F=F)
  )
  return 6.0 * n_nonembed + 6.0 * V * D + 12.0 * N * L * D


def method_flops_factor(method: str, every_k: int = 1) -> float:
  """Method FLOPs / plain-step FLOPs, averaged over a k-step cycle."""
  full = sam_lib.METHODS[method].cost
  return (full + (every_k - 1)) / every_k


def step_flops_per_token(cfg) -> float:
  """FLOPs per trained token of a run's step (model x method factor)."""
  m = cfg.model
  return model_flops_per_token(m.D, m.N, m.F, m.L, m.V) * method_flops_factor(
      cfg.sam.method, cfg.sam.every_k
  )


def mfu(
    flops_per_token: float,
    tokens_per_sec: float,
    num_devices: int,
    peak_per_device: float | None,
) -> float | None:
  """Model FLOPs utilisation, or None without a known peak."""
  if not peak_per_device:
    return None
  return flops_per_token * tokens_per_sec / (num_devices * peak_per_device)
