"""The sharpness-aware gradient-step family: SAM, Functional-SAM and friends.

Every method starts from one clean `jax.vjp` of `logits_fn` at theta, which
gives the loss L(theta), the logit cotangent dL/dF(theta) and g = grad L(theta).
Methods that perturb share one perturbation eps = rho * d / ||d|| with d = g,
or d = g / P for the preconditioned variants (P = sqrt(nu_hat) + eps_adam from
AdamW), and then differ only in which Jacobian and which logit cotangent meet
(paper 004, eqs. 2, 10-12, 19):

  sam                   J(theta+eps)^T dL/dF(theta+eps) = grad L(theta+eps)
  functional_sam        J(theta+eps)^T dL/dF(theta)      (functional path)
  logit_sam             J(theta)^T     dL/dF(theta+eps)  (logit path)
  angle_sam             g + sin(phi) (logit_sam - g)
                          + cos(phi) (functional_sam - g)

To first order in rho, functional_sam - g = rho H_F e and logit_sam - g =
rho H_G e (Gauss-Newton / functional-Hessian split of the loss Hessian), so
sam = logit_sam + functional_sam - g + O(rho^2). Adding a method is one
function `(step: Step) -> grads` and one line in `METHODS`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from nanodo_sam.model import cross_entropy

NORM_EPS = 1e-12  # keeps eps = rho * d / ||d|| finite when d = 0
PRECOND_NORMALIZE = ("after", "before")
OPTIMIZERS_WITH_PRECOND = ("adamw",)

PyTree = Any
LogitsFn = Callable[[PyTree, jax.Array], jax.Array]


# ---------------------------------------------------------------- tree maths


def _norm(tree: PyTree) -> jax.Array:
  """Global L2 norm, accumulated in at least float32."""
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return jnp.zeros((), jnp.float32)
  return jnp.sqrt(sum(
      jnp.sum(jnp.square(x.astype(jnp.promote_types(x.dtype, jnp.float32))))
      for x in leaves))


def _dot(a: PyTree, b: PyTree) -> jax.Array:
  return sum(
      jnp.sum(x.astype(jnp.promote_types(x.dtype, jnp.float32)) *
              y.astype(jnp.promote_types(y.dtype, jnp.float32)))
      for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _cosine(a: PyTree, b: PyTree) -> jax.Array:
  """cos(a, b); 0 (not NaN) when either side is zero."""
  dot = _dot(a, b)
  denom = _norm(a) * _norm(b)
  return dot / jnp.maximum(denom, jnp.finfo(denom.dtype).tiny)


def _scale_to(tree: PyTree, rho: jax.Array) -> PyTree:
  """rho * tree / (||tree|| + NORM_EPS)."""
  scale = rho / (_norm(tree) + NORM_EPS)
  return jax.tree.map(lambda x: (scale * x).astype(x.dtype), tree)


# ---------------------------------------------------------- shared helpers


class Clean(NamedTuple):
  """The one clean pass at theta: loss, dL/dF(theta), g and J(theta)^T."""

  loss: jax.Array
  dlogits_BxLxV: jax.Array
  grads: PyTree
  vjp_fn: Callable[[jax.Array], tuple[PyTree]]


def clean_vjp(params: PyTree, batch: dict[str, Any], logits_fn: LogitsFn
              ) -> Clean:
  """1 forward + 1 backward: the plain gradient, keeping the pieces to reuse."""
  logits_BxLxV, vjp_fn = jax.vjp(lambda p: logits_fn(p, batch["inputs"]),
                                 params)
  loss, dlogits_BxLxV = jax.value_and_grad(cross_entropy)(logits_BxLxV, batch)
  (grads,) = vjp_fn(dlogits_BxLxV)
  return Clean(loss, dlogits_BxLxV, grads, vjp_fn)


def perturbation(grads: PyTree, rho: jax.Array, precond: PyTree | None = None,
                 precond_normalize: str = "after") -> PyTree:
  """The SAM ascent step eps, ||eps|| = rho unless preconditioned "before".

  precond=None: eps = rho g/||g||. Otherwise with P = precond,
  "after": eps = rho (g/P)/||g/P|| (ascent in Adam's geometry, norm rho);
  "before": eps = rho (g/||g||)/P (plain SAM step, then rescaled per entry).
  """
  if precond is None:
    return _scale_to(grads, rho)
  divide = lambda g, p: (g / p).astype(g.dtype)
  if precond_normalize == "after":
    return _scale_to(jax.tree.map(divide, grads, precond), rho)
  if precond_normalize == "before":
    return jax.tree.map(divide, _scale_to(grads, rho), precond)
  raise ValueError(f"precond_normalize={precond_normalize!r} is unknown; use "
                   f"one of {list(PRECOND_NORMALIZE)}")


def _cotangent(logits_BxLxV: jax.Array, batch: dict[str, Any]) -> jax.Array:
  """dL/dF at the given logits (elementwise softmax work, no network pass)."""
  return jax.grad(cross_entropy)(logits_BxLxV, batch)


@dataclasses.dataclass(frozen=True)
class Step:
  """What a method sees: the clean pass and the perturbed parameters."""

  clean: Clean
  params_eps: PyTree | None  # theta + eps; None for methods that don't perturb
  batch: dict[str, Any]
  logits_fn: LogitsFn
  phi: float | None

  def logits_eps(self) -> jax.Array:
    """1 forward at theta + eps."""
    return self.logits_fn(self.params_eps, self.batch["inputs"])

  def vjp_eps(self):
    """1 forward at theta + eps, keeping J(theta+eps)^T for 1 backward."""
    return jax.vjp(lambda p: self.logits_fn(p, self.batch["inputs"]),
                   self.params_eps)


# ------------------------------------------------------------------ methods


def _plain(step: Step) -> PyTree:
  """g (adamw): nothing beyond the clean pass."""
  return step.clean.grads


def _sam(step: Step) -> PyTree:
  """grad L(theta+eps): +1 forward, +1 backward."""
  logits_BxLxV, vjp_fn = step.vjp_eps()
  return vjp_fn(_cotangent(logits_BxLxV, step.batch))[0]


def _functional_sam(step: Step) -> PyTree:
  """J(theta+eps)^T dL/dF(theta): +1 forward, +1 backward."""
  _, vjp_fn = step.vjp_eps()
  return vjp_fn(step.clean.dlogits_BxLxV)[0]


def _logit_sam(step: Step) -> PyTree:
  """J(theta)^T dL/dF(theta+eps): +1 forward, +1 backward (the clean one)."""
  return step.clean.vjp_fn(_cotangent(step.logits_eps(), step.batch))[0]


def _angle_sam(step: Step) -> PyTree:
  """Eq. 19; +1 forward, +2 backward (both VJPs reused).

  phi=0 is functional_sam, phi=pi/2 is logit_sam.
  """
  logits_BxLxV, vjp_fn = step.vjp_eps()
  g = step.clean.grads
  g_logit = step.clean.vjp_fn(_cotangent(logits_BxLxV, step.batch))[0]
  g_func = vjp_fn(step.clean.dlogits_BxLxV)[0]
  s, c = jnp.sin(step.phi), jnp.cos(step.phi)
  return jax.tree.map(
      lambda g0, gl, gf: (g0 + s * (gl - g0) + c * (gf - g0)).astype(g0.dtype),
      g, g_logit, g_func)


@dataclasses.dataclass(frozen=True)
class Method:
  """A registry entry: the implementation and how it is driven."""

  fn: Callable[[Step], PyTree]
  perturbs: bool = True  # needs eps (theta + eps)
  precond: bool = False  # eps in AdamW's geometry, uses `precond`
  uses_phi: bool = False  # needs the angle phi

  def __call__(self, step: Step) -> PyTree:
    return self.fn(step)


METHODS: dict[str, Method] = {
    "adamw": Method(_plain, perturbs=False),
    "sam": Method(_sam),
    "functional_sam": Method(_functional_sam),
    "logit_sam": Method(_logit_sam),
    "angle_sam": Method(_angle_sam, uses_phi=True),
    "precond_sam": Method(_sam, precond=True),
    "precond_functional_sam": Method(_functional_sam, precond=True),
}
PRECOND_METHODS = frozenset(k for k, m in METHODS.items() if m.precond)
PHI_METHODS = frozenset(k for k, m in METHODS.items() if m.uses_phi)


# ------------------------------------------------------------ validation


def _as_float(x) -> float | None:
  """A concrete python float, or None for a traced value."""
  try:
    return float(x)
  except (TypeError, jax.errors.ConcretizationTypeError):
    return None


def validate(method: str, rho, phi=None, optimizer: str = "adamw",
             precond_normalize: str = "after") -> None:
  """Raise ValueError (one line: what is wrong and how to fix it) on a bad
  method/rho/phi/optimizer combination. Traced rho is not checked."""
  if method not in METHODS:
    raise ValueError(f"sam.method={method!r} is unknown; use one of "
                     f"{sorted(METHODS)}")
  rho_value = _as_float(rho)
  if rho_value is not None and not rho_value >= 0:
    raise ValueError(f"sam.rho={rho!r} must be >= 0; set sam.rho to a "
                     "non-negative radius (0 gives the plain gradient)")
  if method in PHI_METHODS and phi is None:
    raise ValueError(f"sam.method={method!r} needs the angle sam.phi "
                     "(radians; 0 = functional_sam, pi/2 = logit_sam); set it")
  if method not in PHI_METHODS and phi is not None:
    raise ValueError(f"sam.phi={phi!r} is ignored by sam.method={method!r}; "
                     f"unset sam.phi or use one of {sorted(PHI_METHODS)}")
  if method in PRECOND_METHODS and optimizer not in OPTIMIZERS_WITH_PRECOND:
    raise ValueError(f"sam.method={method!r} preconditions with AdamW's second "
                     f"moment but opt.optimizer={optimizer!r}; use "
                     f"opt.optimizer='adamw' or a method without 'precond_'")
  if precond_normalize not in PRECOND_NORMALIZE:
    raise ValueError(f"sam.precond_normalize={precond_normalize!r} is unknown; "
                     f"use one of {list(PRECOND_NORMALIZE)}")


# ---------------------------------------------------------------- the step


def gradient(method: str, params: PyTree, batch: dict[str, Any], *,
             logits_fn: LogitsFn, rho, phi: float | None = None,
             precond: PyTree | None = None, precond_normalize: str = "after"
             ) -> tuple[jax.Array, PyTree, dict[str, jax.Array]]:
  """(loss at theta, the method's gradient, scalar metrics).

  `method` and `precond_normalize` are static python values; `rho` and `phi`
  may be traced. `precond` (P = sqrt(nu_hat) + eps_adam, same tree as params) is
  used only by precond methods; None there means P = 1 (no Adam state yet).
  """
  validate(method, rho, phi, precond_normalize=precond_normalize)
  entry = METHODS[method]
  rho = jnp.asarray(rho, jnp.result_type(float))
  clean = clean_vjp(params, batch, logits_fn)
  eps = _eps(entry, clean.grads, rho, precond, precond_normalize)
  grads = entry(Step(clean, _add(params, eps), batch, logits_fn, phi))
  return clean.loss, grads, _metrics(grads, clean.grads, eps, rho)


def _eps(entry: Method, grads, rho, precond, precond_normalize):
  if not entry.perturbs:
    return None
  return perturbation(grads, rho, precond if entry.precond else None,
                      precond_normalize)


def _add(params: PyTree, eps: PyTree | None) -> PyTree | None:
  if eps is None:
    return None
  return jax.tree.map(lambda p, e: p + e.astype(p.dtype), params, eps)


def _metrics(grads, g, eps, rho) -> dict[str, jax.Array]:
  return {
      "grad_norm": _norm(g),
      "perturbation_norm": (_norm(eps) if eps is not None
                            else jnp.zeros((), jnp.float32)),
      "cosine": _cosine(grads, g),
      "rho": rho,
  }


# ------------------------------------------------ gradient accumulation


def _microbatches(batch: dict[str, Any], k: int):
  """[B, ...] -> [k, B/k, ...] and each microbatch's share of the weights."""
  micro = jax.tree.map(lambda x: x.reshape((k, x.shape[0] // k) + x.shape[1:]),
                       batch)
  w_k = jnp.sum(micro["weights"].astype(jnp.float32),
                axis=tuple(range(1, micro["weights"].ndim)))
  return micro, w_k / jnp.maximum(jnp.sum(w_k), 1.0)


def _weighted_sum(fn, micro, frac_k, like):
  """sum_i frac_i * fn(microbatch_i), one microbatch live at a time."""

  def body(acc, xs):
    mb, frac = xs
    out = fn(mb)
    return jax.tree.map(lambda a, o: a + frac * o.astype(a.dtype), acc,
                        out), None

  zeros = jax.tree.map(
      lambda x: jnp.zeros(x.shape, jnp.promote_types(x.dtype, jnp.float32)),
      like)
  acc, _ = jax.lax.scan(body, zeros, (micro, frac_k))
  return acc


def accumulated_gradient(method: str, params: PyTree, batch: dict[str, Any],
                         *, logits_fn: LogitsFn, rho, phi=None, precond=None,
                         precond_normalize: str = "after",
                         num_microbatches: int = 1,
                         perturbation_scope: str = "global"):
  """`gradient` over `num_microbatches` microbatches summed with lax.scan.

  "global" (the paper's semantics): eps comes from the gradient of the whole
  batch (first scan), then the method's gradient at that eps is accumulated
  over the same microbatches (second scan); equal to one full-batch step.
  Costs one extra clean forward per microbatch for the methods that need
  dL/dF(theta) in the second scan (XLA drops what a method does not use).
  "microbatch": each microbatch is perturbed by its own gradient
  (m-sharpness); one scan, the same cost and memory as without accumulation.
  Microbatches are weighted by their share of the loss weights, so the result
  equals the full-batch mean even with padding.
  """
  if num_microbatches == 1:
    return gradient(method, params, batch, logits_fn=logits_fn, rho=rho,
                    phi=phi, precond=precond,
                    precond_normalize=precond_normalize)
  validate(method, rho, phi, precond_normalize=precond_normalize)
  entry = METHODS[method]
  rho = jnp.asarray(rho, jnp.result_type(float))
  micro, frac_k = _microbatches(batch, num_microbatches)
  if perturbation_scope == "microbatch" or not entry.perturbs:
    def one(mb):
      loss, grads, metrics = gradient(
          method, params, mb, logits_fn=logits_fn, rho=rho, phi=phi,
          precond=precond, precond_normalize=precond_normalize)
      return loss, grads, metrics
    shapes = jax.eval_shape(one, jax.tree.map(lambda x: x[0], micro))
    loss, grads, metrics = _weighted_sum(one, micro, frac_k, shapes)
    return loss, _cast_like(grads, params), metrics
  if perturbation_scope != "global":
    raise ValueError(f"sam.perturbation_scope={perturbation_scope!r} is "
                     "unknown; use 'global' or 'microbatch'")

  def clean(mb):
    c = clean_vjp(params, mb, logits_fn)
    return c.loss, c.grads
  shapes = jax.eval_shape(clean, jax.tree.map(lambda x: x[0], micro))
  loss, g = _weighted_sum(clean, micro, frac_k, shapes)
  eps = _eps(entry, g, rho, precond, precond_normalize)
  params_eps = _add(params, eps)

  def perturbed(mb):
    return entry(Step(clean_vjp(params, mb, logits_fn), params_eps, mb,
                      logits_fn, phi))
  grads = _cast_like(_weighted_sum(perturbed, micro, frac_k, g), params)
  return loss, grads, _metrics(grads, g, eps, rho)


def _cast_like(tree: PyTree, like: PyTree) -> PyTree:
  return jax.tree.map(lambda x, p: x.astype(p.dtype), tree, like)
