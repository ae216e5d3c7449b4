"""The sharpness diagnostics of a run: on which batch, at which learning rate,
rho and random key `sharpness.py` is called. Shared by the training loop
(every diagnostics.every_steps) and `nanodo-sam analyze` (a checkpoint).

Two sets: on the fixed eval batches (default), `sharpness.measure` (taus,
lambda_max, traces, SAM-edge); with diagnostics.on_train_batch, Long &
Bartlett's edge-of-stability set on the current training minibatch
(`sharpness.edge_of_stability`), including the alignment of g and of the
configured method's gradient with the top Hessian eigenvector.

At scale both run the products through the model's output layer
(`exact_head`): the [B, L, V] logits in chunks of the sequence, each device
on its own rows of the batch (otherwise XLA's partitioner gathers
whole-batch activations on every device inside the forward-over-reverse
products).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np

from nanodo_sam import keys
from nanodo_sam import optimizer as optimizer_lib
from nanodo_sam import sam as sam_lib
from nanodo_sam import sam_schedule
from nanodo_sam import sharding
from nanodo_sam import sharpness
from nanodo_sam.errors import UsageError


def fixed_batch(cfg, eval_data) -> dict[str, np.ndarray]:
  """The fixed [K, B, L] batch the sharpness metrics are computed on: the
  first diagnostics.batch_size rows of the first diagnostics.num_batches eval
  batches."""
  k, b = cfg.diagnostics.num_batches, cfg.diagnostics.batch_size
  if len(eval_data) < k:
    raise UsageError(
        f"diagnostics.num_batches={k} exceeds data.eval_steps="
        f"{len(eval_data)} eval batches; lower it or raise data.eval_steps"
    )
  return {
      key: np.stack([eb[key][:b] for eb in eval_data[:k]])
      for key in eval_data[0]
  }


def exact_head(s):
  """The output layer of `s.diagnostics_logits_fn`'s model (attention
  "xla"), with the mesh's batch sharding (`state.Setup.diagnostics_head`):
  `sharpness` then runs each product on every device's own rows (shard_map)
  and chunks the logits."""
  return s.diagnostics_head


def chunk_tokens(cfg) -> int:
  """Tokens per device in one chunk of the diagnostics' output layer: the
  train step's model.head_chunk_tokens (0 = the whole sequence)."""
  n = int(keys.of(cfg.model, "model.head_chunk_tokens"))
  return (
      n
      if n > 0
      else cfg.model.L * max(cfg.diagnostics.batch_size, cfg.data.batch_size)
  )


def sharpness_fn(cfg, s) -> Callable[..., dict[str, jax.Array]]:
  """`(state, batch, lr, rho, rng) -> sharpness.measure(...)` with
  diagnostics.{num_iters,num_probes,tol}; with AdamW also the split along
  P^-1 g, P from the state's optimizer state. `s`: the run's state.Setup.

  Exact whatever the run trains with: the products differentiate
  `s.diagnostics_logits_fn` (attention "xla": cuDNN's kernel has no
  forward-mode derivative), every matmul in float32 (no TF32 or bfloat16
  passes for float32 inputs on GPU or TPU), and the Lanczos basis and the
  probes are split over the mesh like the parameters; the logits run in
  chunks, each device on its own rows (`exact_head`).
  """
  d = cfg.diagnostics
  head, tokens = exact_head(s), chunk_tokens(cfg)

  def fn(state, batch, lr, rho, rng):
    precond = optimizer_lib.adam_precond(state.opt_state, cfg.opt)
    with jax.default_matmul_precision("float32"):
      return sharpness.measure(
          state.params,
          batch,
          logits_fn=s.diagnostics_logits_fn,
          lr=lr,
          rho=rho,
          num_iters=d.num_iters,
          num_probes=d.num_probes,
          rng=rng,
          tol=d.tol,
          precond=precond,
          params_sharding=s.state_sharding.params,
          head=head,
          chunk_tokens=tokens,
      )

  return fn


def make_sharpness(cfg, s, eval_data) -> Callable[..., dict[str, jax.Array]]:
  """Jitted `(state, lr, rho, rng) -> sharpness_fn(...)` on the fixed batch
  (a constant of the compiled function)."""
  batch = fixed_batch(cfg, eval_data)
  fn = sharpness_fn(cfg, s)
  return jax.jit(lambda state, lr, rho, rng: fn(state, batch, lr, rho, rng))


def make_edge_of_stability(cfg, s) -> Callable[..., dict[str, jax.Array]]:
  """Jitted `(state, batch, lr, rho, rng) -> sharpness.edge_of_stability`
  on a training batch, with the configured method's gradient there (taken
  as the train step takes it). `s`: the run's state.Setup (logits_fn, head,
  diagnostics_logits_fn, state_sharding, mesh); exact as in `sharpness_fn`.
  """
  d = cfg.diagnostics
  head, tokens = exact_head(s), chunk_tokens(cfg)

  def eos(state, batch, lr, rho, rng):
    precond = (
        optimizer_lib.adam_precond(state.opt_state, cfg.opt)
        if cfg.sam.method in sam_lib.PRECOND_METHODS
        else None
    )
    _, sam_grads, _ = sam_lib.gradient(
        cfg.sam.method,
        state.params,
        batch,
        logits_fn=s.logits_fn,
        rho=rho,
        precond=precond,
        head=s.head,
        **sam_lib.config_options(cfg.sam, cfg.sam.method),
    )
    with jax.default_matmul_precision("float32"):
      return sharpness.edge_of_stability(
          state.params,
          batch,
          sam_grads,
          logits_fn=s.diagnostics_logits_fn,
          lr=lr,
          rho=rho,
          num_iters=d.num_iters,
          rng=rng,
          tol=d.tol,
          params_sharding=s.state_sharding.params,
          head=head,
          chunk_tokens=tokens,
      )

  return jax.jit(
      eos,
      in_shardings=(
          s.state_sharding,
          sharding.batch_sharding(s.mesh),
          None,
          None,
          None,
      ),
  )


def to_scalars(out: dict[str, Any], prefix: str = "") -> dict[str, float]:
  """Device results -> host floats, keys prefixed `prefix/` if given."""
  prefix = f"{prefix}/" if prefix else ""
  return {f"{prefix}{k}": float(v) for k, v in jax.device_get(out).items()}


def make_diagnose(
    cfg, s, eval_data
) -> Callable[[Any, Any, int], dict[str, float]] | None:
  """`diagnose(state, batch, step) -> scalars` for the training loop, run
  before step `step` (at theta_step) at the step's learning rate and rho,
  with a key folded from the state's; None when diagnostics are off.
  Raises UsageError (the fixed batch does not fit) before any work."""
  if not cfg.diagnostics.every_steps:
    return None
  schedule = optimizer_lib.learning_rate_schedule(cfg.opt)
  if keys.of(cfg.diagnostics, "diagnostics.on_train_batch"):
    fn = make_edge_of_stability(cfg, s)
    prefix = "eos"
  else:
    sharp = make_sharpness(cfg, s, eval_data)
    fn = lambda state, batch, lr, rho, rng: sharp(state, lr, rho, rng)
    prefix = "sharpness"

  def diagnose(state, batch, step):
    rng = jax.random.fold_in(state.rng, step)
    return to_scalars(
        fn(
            state,
            batch,
            schedule(step),
            sam_schedule.rho_at(cfg.sam, step, cfg.opt),
            rng,
        ),
        prefix,
    )

  return diagnose


def validate(cfg) -> None:
  """The diagnostics.* keys fit the eval batches their fixed batch is cut
  from; UsageError (one line) otherwise."""
  diag, data = cfg.diagnostics, cfg.data
  if not diag.every_steps:
    return
  if diag.num_batches > data.eval_steps:
    raise UsageError(
        f"diagnostics.num_batches={diag.num_batches} exceeds "
        f"data.eval_steps={data.eval_steps} eval batches; lower it or "
        "raise data.eval_steps"
    )
  if diag.batch_size > data.eval_batch_size:
    raise UsageError(
        f"diagnostics.batch_size={diag.batch_size} exceeds "
        f"data.eval_batch_size={data.eval_batch_size} (its rows come from "
        "the eval batches); lower it or raise data.eval_batch_size"
    )
