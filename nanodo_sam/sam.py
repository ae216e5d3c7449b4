"""The sharpness-aware gradient-step family: SAM, Functional-SAM and friends.

Every method starts from one clean `jax.vjp` of `logits_fn` at theta, which
gives the loss L(theta) and g = grad L(theta). Methods that perturb share one
perturbation eps = rho * d / ||d|| with d = g, or d = g / P for the
preconditioned variants (P = sqrt(nu_hat) + eps_adam from AdamW), and then
differ only in which Jacobian and which logit cotangent meet, J(a)^T dL/dF(b)
for points a, b in {theta, theta + eps} (`head_vjp`;
Singh et al. 2025, eqs. 2, 10-12, 19):

  sam                   J(theta+eps)^T dL/dF(theta+eps) = grad L(theta+eps)
  functional_sam        J(theta+eps)^T dL/dF(theta)      (functional path)
  logit_sam             J(theta)^T     dL/dF(theta+eps)  (logit path)
  angle_sam             g + sin(phi) (logit_sam - g)
                          + cos(phi) (functional_sam - g)

To first order in rho, functional_sam - g = rho H_F e and logit_sam - g =
rho H_G e (Gauss-Newton / functional-Hessian split of the loss Hessian), so
sam = logit_sam + functional_sam - g + O(rho^2). Adding a method is one
function `(step: Step) -> grads` and one line in `METHODS`.

The public codebases' variants differ in where eps points (`Method.direction`:
ASAM's T^2 g, Momentum-SAM's -m) or in a final combination (GSAM's
projection, `Method.combine`); docs/sam_variants.md lists them all.

Memory: when the caller hands over the model's output layer (`head`, a
loss.OutputHead; the Nanodo model's is `model.output_head`), the output layer,
the loss and dL/dF run over chunks of the sequence (`head.chunk_tokens`
tokens per device, config model.head_chunk_tokens) and are recomputed from
the features instead of stored, so no step ever holds a [B, L, V] tensor;
without one the logits are the features and J^T is a plain vjp. On a mesh the
chunk loop moves only scalars between devices (`head_vjp`).
`reuse_correction` is the LookSAM-style cheap step between full ones (config
`sam.reuse`).

This module sees the model only through `logits_fn` and `head`: it imports
neither the model nor the trainer.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from nanodo_sam import optimizer as optimizer_lib
from nanodo_sam import tree_math
from nanodo_sam.loss import LogitsFn, OutputHead, cross_entropy

NORM_EPS = 1e-12  # keeps eps = rho * d / ||d|| finite when d = 0
PRECOND_NORMALIZE = ("after", "before")
PERTURBATION_SCOPES = ("global", "microbatch", "replica")
OPTIMIZERS_WITH_PRECOND = ("adamw",)
# Optimizers whose state holds a first moment (Momentum-SAM's direction):
# AdamW's mu, SGD with momentum's trace.
OPTIMIZERS_WITH_MOMENTUM = ("adamw", "momentum")
# Where eps points (`Method.direction`): along g (SAM), along T^2 g with T =
# |theta| + eta (ASAM, Kwon et al. 2021), or against the optimizer's first
# moment m (Momentum-SAM, Becker et al. 2024).
DIRECTIONS = ("gradient", "adaptive", "momentum")
ADAPTIVE_ETA = 0.01  # ASAM's eta when unset (the official code's value)

PyTree = Any


# ---------------------------------------------------------------- tree maths


def cosine(a: PyTree, b: PyTree) -> jax.Array:
  """cos(a, b); 0 (not NaN) when either side is zero."""
  dot = tree_math.vdot(a, b)
  denom = tree_math.norm(a) * tree_math.norm(b)
  return dot / jnp.maximum(denom, jnp.finfo(denom.dtype).tiny)


def _scale_to(tree: PyTree, rho: jax.Array) -> PyTree:
  """rho * tree / (||tree|| + NORM_EPS)."""
  scale = rho / (tree_math.norm(tree) + NORM_EPS)
  return jax.tree.map(lambda x: (scale * x).astype(x.dtype), tree)


# ---------------------------------------------------------- shared helpers


class Point(NamedTuple):
  """theta or theta + eps seen through logits_fn, up to its output layer.

  `head_params` and `h_BxLxD` are the output layer's parameters and input
  features (without a `head`: no parameters and the logits themselves);
  `vjp_fn` maps their cotangents to the parameters'.
  """

  head_params: PyTree
  h_BxLxD: jax.Array
  vjp_fn: Callable[[tuple[PyTree, jax.Array]], tuple[PyTree]]


class Clean(NamedTuple):
  """The one clean pass at theta: loss, g and the point to reuse."""

  loss: jax.Array
  grads: PyTree
  point: Point


def _identity_head(logits_fn: LogitsFn) -> OutputHead:
  return OutputHead(
      features=logits_fn,
      select=lambda params: (),
      apply=lambda head_params, logits: logits,
  )


def resolve_head(
    logits_fn: LogitsFn, head: OutputHead | None = None
) -> tuple[OutputHead, bool]:
  """(the OutputHead the step runs, whether it is a real output layer to
  chunk): `head` when given, else logits_fn itself after an identity layer."""
  if head is None:
    return _identity_head(logits_fn), False
  return head, True


def point(
    params: PyTree,
    inputs_BxL: jax.Array,
    logits_fn: LogitsFn,
    head: OutputHead | None = None,
) -> Point:
  """1 forward up to the output layer, keeping its J^T for backwards."""
  head, _ = resolve_head(logits_fn, head)
  (head_params, h_BxLxD), vjp_fn = jax.vjp(
      lambda p: (head.select(p), head.features(p, inputs_BxL)), params
  )
  return Point(head_params, h_BxLxD, vjp_fn)


def _batch_shards(head: OutputHead) -> int:
  """How many ways a batch's rows are split (`head.batch_sharding`)."""
  s = head.batch_sharding
  if s is None or not len(s.spec) or s.spec[0] is None:
    return 1
  axes = (s.spec[0],) if isinstance(s.spec[0], str) else tuple(s.spec[0])
  return math.prod(s.mesh.shape[a] for a in axes)


def _keep_rows(head: OutputHead, x: jax.Array, axis: int = 0) -> jax.Array:
  """x with its `axis` split like the batch's rows (`head.batch_sharding`);
  unchanged without one."""
  s = head.batch_sharding
  if s is None:
    return x
  spec = PartitionSpec(*((None,) * axis + tuple(s.spec[:1])))
  return jax.lax.with_sharding_constraint(x, NamedSharding(s.mesh, spec))


def _num_chunks(head: OutputHead, chunked: bool, p: Point) -> int:
  """The fewest chunks of the sequence (a divisor of L) holding at most
  `head.chunk_tokens` tokens on each device (the rows split `_batch_shards`
  ways); 1 (the logits whole) without a real output layer or with
  chunk_tokens <= 0."""
  B, L = p.h_BxLxD.shape[:2]
  budget = getattr(head, "chunk_tokens", 0)
  if not chunked or budget <= 0:
    return 1
  rows = max(B // _batch_shards(head), 1)
  for n in range(1, L + 1):
    if L % n == 0 and rows * (L // n) <= budget:
      return n
  return L


def _replicated(head: OutputHead, tree: PyTree) -> PyTree:
  """`tree` whole on every device (one all-gather, outside any loop)."""
  s = head.batch_sharding
  rep = NamedSharding(s.mesh, PartitionSpec())
  return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, rep), tree)


def head_vjp(
    a: Point,
    b: Point,
    batch: dict[str, Any],
    logits_fn: LogitsFn,
    head: OutputHead | None = None,
) -> tuple[jax.Array, PyTree]:
  """(L(b), J(a)^T dL/dF(b)): the loss at point b and its logit cotangent
  pulled back through the network at point a (a is b for the plain gradient).

  This is the one place logits exist. With a `head` they are computed, turned
  into the loss and its cotangent dL/dF = w (softmax - onehot) and pulled back
  through the output layer one chunk of the sequence at a time (lax.scan;
  `head.chunk_tokens` tokens per device), so no [B, L, V] tensor is ever
  alive; dL/dF(b) is recomputed from b's features when a is not b rather than
  stored. Without a head, the logits are the features and this is a plain
  vjp.

  On a mesh (`head.batch_sharding` splits the rows G ways) the rows are
  grouped [G, B/G, ...] along the devices and the output layer is gathered
  once, before the loop; each group accumulates its own part of the output
  layer's gradient ([G, V, D], one [V, D] per device), and the groups are
  summed once after the loop (a reduce-scatter into the parameters' layout).
  Inside the loop only scalars (the loss) cross devices.
  """
  head, chunked = resolve_head(logits_fn, head)
  n = _num_chunks(head, chunked, b)
  # cross_entropy divides by max(sum(weights), 1): with the weights divided by
  # the batch's total here, each chunk's value is its share of the batch mean.
  weights_BxL = batch["weights"]
  weights_BxL = weights_BxL / jnp.maximum(jnp.sum(weights_BxL), 1.0)
  xs = (a.h_BxLxD, b.h_BxLxD, batch["targets"], weights_BxL)
  if n > 1 and _batch_shards(head) > 1:
    loss, d_head, dh_BxLxD = _grouped_chunks(a, b, xs, n, head)
  else:
    loss, d_head, dh_BxLxD = _chunks(a, b, xs, n, head)
  (grads,) = a.vjp_fn((d_head, dh_BxLxD.astype(a.h_BxLxD.dtype)))
  return loss, grads


def _chunk_fn(head: OutputHead, same: bool):
  """(a's head params, b's, h_a, h_b, targets, weights) of one chunk ->
  (its share of the loss, d head params, dh)."""

  def one(w_a, w_b, h_a, h_b, targets, weights):
    loss_fn = lambda z: cross_entropy(
        z, {"targets": targets, "weights": weights}
    )
    if same:
      logits, pull = jax.vjp(head.apply, w_a, h_a)
    else:
      logits = head.apply(w_b, h_b)
      pull = jax.vjp(head.apply, w_a, h_a)[1]
    loss, dlogits = jax.value_and_grad(loss_fn)(logits)
    d_head, dh = pull(dlogits.astype(logits.dtype))
    return loss, d_head, dh

  return one


def _f32_zeros(tree: PyTree) -> PyTree:
  return jax.tree.map(
      lambda x: jnp.zeros(x.shape, jnp.promote_types(x.dtype, jnp.float32)),
      tree,
  )


def _chunks(a: Point, b: Point, xs, n: int, head: OutputHead):
  """The head over n chunks of the sequence, every chunk split by rows like
  the batch (without the constraint XLA's partitioner replicates the chunks
  inside the scan)."""
  one = _chunk_fn(head, a is b)

  def kept(h_a, h_b, targets, weights):
    h_a, h_b, targets, weights = (
        _keep_rows(head, x) for x in (h_a, h_b, targets, weights)
    )
    loss, d_head, dh = one(
        a.head_params, b.head_params, h_a, h_b, targets, weights
    )
    return loss, d_head, _keep_rows(head, dh)

  if n == 1:
    return kept(*xs)
  split = lambda x: _keep_rows(
      head,
      jnp.moveaxis(
          x.reshape((x.shape[0], n, x.shape[1] // n) + x.shape[2:]), 1, 0
      ),
      1,
  )

  def body(acc, chunk):
    loss, d_head, dh = kept(*chunk)
    acc = jax.tree.map(lambda s, x: s + x.astype(s.dtype), acc, (loss, d_head))
    return acc, dh

  zeros = _f32_zeros((jnp.zeros(()), a.head_params))
  (loss, d_head), dh_nxBxLcxD = jax.lax.scan(
      body, zeros, tuple(split(x) for x in xs)
  )
  dh_BxLxD = _keep_rows(
      head, jnp.moveaxis(dh_nxBxLcxD, 0, 1).reshape(a.h_BxLxD.shape)
  )
  return loss, _cast_like(d_head, a.head_params), dh_BxLxD


def _grouped_chunks(a: Point, b: Point, xs, n: int, head: OutputHead):
  """`_chunks` on a mesh without a collective in the loop beyond scalars:
  rows grouped [G, B/G] along the devices, the output layer gathered once,
  its gradient accumulated per group and summed over the groups once."""
  G = _batch_shards(head)
  one = _chunk_fn(head, a is b)
  w_a = _replicated(head, a.head_params)
  w_b = w_a if a is b else _replicated(head, b.head_params)
  # One copy of a's output layer per group: its cotangent is the group's own
  # part of the gradient, kept on the group's devices.
  w_a_G = jax.tree.map(
      lambda x: _keep_rows(head, jnp.broadcast_to(x, (G,) + x.shape)), w_a
  )

  def split(x):  # [B, L, ...] -> [n, G, B/G, L/n, ...], G along the devices.
    B, L = x.shape[:2]
    x = x.reshape((G, B // G, n, L // n) + x.shape[2:])
    return _keep_rows(head, jnp.moveaxis(x, 2, 0), 1)

  grouped = jax.vmap(one, in_axes=(0, None, 0, 0, 0, 0))

  def body(acc, chunk):
    chunk = tuple(_keep_rows(head, x) for x in chunk)
    loss_G, d_head_G, dh = grouped(w_a_G, w_b, *chunk)
    acc = jax.tree.map(
        lambda s, x: s + x.astype(s.dtype), acc, (jnp.sum(loss_G), d_head_G)
    )
    return acc, _keep_rows(head, dh)

  zeros = _f32_zeros((jnp.zeros(()), w_a_G))
  zeros = (zeros[0], jax.tree.map(lambda z: _keep_rows(head, z), zeros[1]))
  (loss, d_head_G), dh_nxGxbxLcxD = jax.lax.scan(
      body, zeros, tuple(split(x) for x in xs)
  )
  d_head = jax.tree.map(lambda d: jnp.sum(d, axis=0), d_head_G)
  dh = jnp.moveaxis(dh_nxGxbxLcxD, 0, 2)  # [G, B/G, n, L/n, D]
  dh_BxLxD = _keep_rows(head, dh.reshape(a.h_BxLxD.shape))
  return loss, _cast_like(d_head, a.head_params), dh_BxLxD


def clean_vjp(
    params: PyTree,
    batch: dict[str, Any],
    logits_fn: LogitsFn,
    head: OutputHead | None = None,
) -> Clean:
  """1 forward + 1 backward: the plain gradient, keeping the pieces to reuse."""
  p = point(params, batch["inputs"], logits_fn, head)
  loss, grads = head_vjp(p, p, batch, logits_fn, head)
  return Clean(loss, grads, p)


def perturbation(
    grads: PyTree,
    rho: jax.Array,
    precond: PyTree | None = None,
    precond_normalize: str = "after",
) -> PyTree:
  """The SAM ascent step eps, ||eps|| = rho unless preconditioned "before".

  precond=None: eps = rho g/||g||. Otherwise with P = precond,
  "after": eps = rho (g/P)/||g/P|| (ascent in Adam's geometry, norm rho);
  "before": eps = rho (g/||g||)/P (plain SAM step, then rescaled per entry).
  `precond_normalize` is one of PRECOND_NORMALIZE (checked by `validate`).
  """
  if precond is None:
    return _scale_to(grads, rho)
  divide = lambda g, p: (g / p).astype(g.dtype)
  if precond_normalize == "before":
    return jax.tree.map(divide, _scale_to(grads, rho), precond)
  return _scale_to(jax.tree.map(divide, grads, precond), rho)


def adaptive_perturbation(
    grads: PyTree, params: PyTree, rho, eta: float = ADAPTIVE_ETA
) -> PyTree:
  """ASAM's eps = rho T^2 g / ||T g||, T = |theta| + eta elementwise: the
  SAM ascent step in the coordinates theta / T, where a rescaling of the
  weights that leaves the network's function unchanged leaves it unchanged
  too (Kwon et al. 2021, eq. 12)."""
  f32 = lambda x: x.astype(jnp.promote_types(x.dtype, jnp.float32))
  t = jax.tree.map(lambda p: jnp.abs(f32(p)) + eta, params)
  tg = jax.tree.map(lambda t, g: t * f32(g), t, grads)
  scale = rho / (tree_math.norm(tg) + NORM_EPS)
  return jax.tree.map(
      lambda t, x, g: (scale * t * x).astype(g.dtype), t, tg, grads
  )


def momentum_perturbation(momentum: PyTree | None, rho, like: PyTree) -> PyTree:
  """Momentum-SAM's eps = -rho m / ||m||, m the optimizer's first moment
  (a tree like `like`); zero when m is None or 0 (the first step), so the
  step then takes the plain gradient."""
  if momentum is None:
    return jax.tree.map(jnp.zeros_like, like)
  eps = _scale_to(jax.tree.map(jnp.negative, momentum), rho)
  return jax.tree.map(lambda e, x: e.astype(x.dtype), eps, like)


class Options(NamedTuple):
  """The step's options beyond rho; each is read only by the methods whose
  registry entry uses it (`validate` refuses the others)."""

  phi: float | None = None  # Angle-SAM's angle
  alpha: float | None = None  # GSAM's weight of -g_orth
  precond: PyTree | None = None  # AdamW's P (precond methods)
  precond_normalize: str = "after"
  adaptive_eta: float | None = None  # ASAM's eta (None: ADAPTIVE_ETA)
  momentum: PyTree | None = None  # the optimizer's first moment


@dataclasses.dataclass(frozen=True)
class Step:
  """What a method sees: the clean pass and the perturbed parameters."""

  clean: Clean
  params_eps: PyTree | None  # theta + eps; None for methods that don't perturb
  batch: dict[str, Any]
  logits_fn: LogitsFn
  phi: float | None
  head: OutputHead | None = None

  def perturbed(self) -> Point:
    """1 forward at theta + eps (to the output layer), keeping J(theta+eps)^T."""
    return point(
        self.params_eps, self.batch["inputs"], self.logits_fn, self.head
    )

  def jt(self, a: Point, b: Point) -> PyTree:
    """J(a)^T dL/dF(b): 1 backward at a (the output layer's part chunked)."""
    return head_vjp(a, b, self.batch, self.logits_fn, self.head)[1]


# ------------------------------------------------------------------ methods


def _plain(step: Step) -> PyTree:
  """g (adamw): nothing beyond the clean pass."""
  return step.clean.grads


def _sam(step: Step) -> PyTree:
  """grad L(theta+eps): +1 forward, +1 backward."""
  eps = step.perturbed()
  return step.jt(eps, eps)


def _functional_sam(step: Step) -> PyTree:
  """J(theta+eps)^T dL/dF(theta): +1 forward, +1 backward."""
  return step.jt(step.perturbed(), step.clean.point)


def _logit_sam(step: Step) -> PyTree:
  """J(theta)^T dL/dF(theta+eps): +1 forward, +1 backward (the clean one)."""
  return step.jt(step.clean.point, step.perturbed())


def _angle_sam(step: Step) -> PyTree:
  """Eq. 19; +1 forward, +2 backward (both VJPs reused).

  phi=0 is functional_sam, phi=pi/2 is logit_sam.
  """
  eps, clean = step.perturbed(), step.clean.point
  g = step.clean.grads
  g_logit = step.jt(clean, eps)
  g_func = step.jt(eps, clean)
  s, c = jnp.sin(step.phi), jnp.cos(step.phi)
  return jax.tree.map(
      lambda g0, gl, gf: (g0 + s * (gl - g0) + c * (gf - g0)).astype(g0.dtype),
      g,
      g_logit,
      g_func,
  )


def _surrogate_gap(g_p: PyTree, g: PyTree, alpha) -> PyTree:
  """GSAM's g_p - alpha g_orth, g_orth = g - (<g, g_p>/||g_p||^2) g_p: the
  part of g orthogonal to g_p, descended to shrink the surrogate gap
  L(theta + eps) - L(theta) without changing the perturbed loss."""
  coef = tree_math.vdot(g, g_p) / jnp.maximum(
      jnp.square(tree_math.norm(g_p)), jnp.finfo(jnp.float32).tiny
  )
  return jax.tree.map(
      lambda p, x: (p - alpha * (x - coef * p)).astype(p.dtype), g_p, g
  )


@dataclasses.dataclass(frozen=True)
class Method:
  """A registry entry: every fact about a method, read by the rest of the code
  (config validation, the train step, `nanodo-sam bench`, tables, figures).

  `forwards`/`backwards` are the passes through the network per step
  (bench's FLOPs; tests/test_sam.py counts them in the real step).
  """

  fn: Callable[[Step], PyTree]
  label: str  # the name as the paper writes it (tables, figure legends)
  forwards: int = 2
  backwards: int = 2
  perturbs: bool = True  # needs eps (theta + eps)
  precond: bool = False  # eps in AdamW's geometry, uses `precond`
  uses_phi: bool = False  # needs the angle phi
  uses_alpha: bool = False  # needs GSAM's alpha
  direction: str = "gradient"  # where eps points: one of DIRECTIONS
  # The one clean pass is taken at theta + eps (eps known before the step,
  # as Momentum-SAM's is): `loss` and g are then those at theta + eps.
  lookahead: bool = False
  # (fn's gradient, g, alpha) -> the step's gradient, applied once to the
  # whole batch's (the accumulated) fn gradient and g: a step not linear in
  # the batch (GSAM's projection).
  combine: Callable[[PyTree, PyTree, Any], PyTree] | None = None

  def __call__(self, step: Step) -> PyTree:
    return self.fn(step)


METHODS: dict[str, Method] = {
    "adamw": Method(_plain, "AdamW", forwards=1, backwards=1, perturbs=False),
    "sam": Method(_sam, "SAM"),
    "functional_sam": Method(_functional_sam, "Func-SAM"),
    "logit_sam": Method(_logit_sam, "Logit-SAM"),
    "angle_sam": Method(_angle_sam, "Angle-SAM", backwards=3, uses_phi=True),
    "precond_sam": Method(_sam, "Precond SAM", precond=True),
    "precond_functional_sam": Method(
        _functional_sam, "Precond Func-SAM", precond=True
    ),
    "adaptive_sam": Method(_sam, "ASAM", direction="adaptive"),
    "gsam": Method(_sam, "GSAM", uses_alpha=True, combine=_surrogate_gap),
    "momentum_sam": Method(
        _plain,
        "Momentum-SAM",
        forwards=1,
        backwards=1,
        direction="momentum",
        lookahead=True,
    ),
    # Combinations none of the public codebases has (docs/sam_variants.md).
    "functional_adaptive_sam": Method(
        _functional_sam, "Func-ASAM", direction="adaptive"
    ),
    "functional_momentum_sam": Method(
        _functional_sam, "Func-Momentum-SAM", direction="momentum"
    ),
    "precond_gsam": Method(
        _sam,
        "Precond GSAM",
        precond=True,
        uses_alpha=True,
        combine=_surrogate_gap,
    ),
}
# The plain step's key: the base optimizer's own gradient, no perturbation.
PLAIN = "adamw"
PRECOND_METHODS = frozenset(k for k, m in METHODS.items() if m.precond)
PHI_METHODS = frozenset(k for k, m in METHODS.items() if m.uses_phi)
ALPHA_METHODS = frozenset(k for k, m in METHODS.items() if m.uses_alpha)
ADAPTIVE_METHODS = frozenset(
    k for k, m in METHODS.items() if m.direction == "adaptive"
)
MOMENTUM_METHODS = frozenset(
    k for k, m in METHODS.items() if m.direction == "momentum"
)


def is_plain(method: str) -> bool:
  """Whether `method` takes the plain step (it has no perturbation): the
  trainer then compiles and schedules only the plain step."""
  return not METHODS[method].perturbs


def label(method: str, optimizer: str = "adamw") -> str:
  """The method's name in tables and figure legends. The plain step is
  named by its base optimizer ("AdamW", "SGD", "Momentum"), the others by
  the registry ("SAM", "Func-SAM", ...)."""
  if is_plain(method):
    return optimizer_lib.LABELS.get(optimizer, optimizer)
  return METHODS[method].label


# ------------------------------------------------------------ validation


def _as_float(x) -> float | None:
  """A concrete python float, or None for a traced value."""
  try:
    return float(x)
  except (TypeError, jax.errors.ConcretizationTypeError):
    return None


def validate(
    method: str,
    rho,
    phi=None,
    optimizer: str = "adamw",
    precond_normalize: str = "after",
    perturbation_scope: str = "global",
    alpha=None,
    adaptive_eta=None,
) -> None:
  """Raise ValueError (one line: what is wrong and how to fix it) on a bad
  method/rho/phi/optimizer/option combination: the one check of the step's
  options (sam_schedule.validate calls it). Traced rho is not checked."""
  if method not in METHODS:
    raise ValueError(
        f"sam.method={method!r} is unknown; use one of " f"{sorted(METHODS)}"
    )
  rho_value = _as_float(rho)
  if rho_value is not None and not rho_value >= 0:
    raise ValueError(
        f"sam.rho={rho!r} must be >= 0; set sam.rho to a "
        "non-negative radius (0 gives the plain gradient)"
    )
  if method in PHI_METHODS and phi is None:
    raise ValueError(
        f"sam.method={method!r} needs the angle sam.phi "
        "(radians; 0 = functional_sam, pi/2 = logit_sam); set it"
    )
  if method not in PHI_METHODS and phi is not None:
    raise ValueError(
        f"sam.phi={phi!r} is ignored by sam.method={method!r}; "
        f"unset sam.phi or use one of {sorted(PHI_METHODS)}"
    )
  _validate_variant_options(method, optimizer, alpha, adaptive_eta)
  if method in PRECOND_METHODS and optimizer not in OPTIMIZERS_WITH_PRECOND:
    raise ValueError(
        f"sam.method={method!r} preconditions with AdamW's second "
        f"moment but opt.optimizer={optimizer!r}; use "
        f"opt.optimizer='adamw' or a method without 'precond_'"
    )
  if precond_normalize not in PRECOND_NORMALIZE:
    raise ValueError(
        f"sam.precond_normalize={precond_normalize!r} is unknown; "
        "use 'after' (normalise P^-1 g) or 'before' (P^-1 "
        "applied to g/||g||)"
    )
  if perturbation_scope not in PERTURBATION_SCOPES:
    raise ValueError(
        f"sam.perturbation_scope={perturbation_scope!r} is "
        "unknown; use 'global' (eps from the whole batch), "
        "'microbatch' (each microbatch its own eps) or "
        "'replica' (each data-parallel shard its own eps)"
    )


def _validate_variant_options(
    method: str, optimizer: str, alpha, adaptive_eta
) -> None:
  """GSAM's alpha, ASAM's eta and Momentum-SAM's first moment."""
  if method in ALPHA_METHODS and alpha is None:
    raise ValueError(
        f"sam.method={method!r} needs GSAM's sam.alpha (the "
        "weight of -g_orth; 0 = SAM); set it"
    )
  if method not in ALPHA_METHODS and alpha is not None:
    raise ValueError(
        f"sam.alpha={alpha!r} is ignored by sam.method="
        f"{method!r}; unset sam.alpha or use one of "
        f"{sorted(ALPHA_METHODS)}"
    )
  if method not in ADAPTIVE_METHODS and adaptive_eta is not None:
    raise ValueError(
        f"sam.adaptive_eta={adaptive_eta!r} is ignored by "
        f"sam.method={method!r}; unset sam.adaptive_eta or use "
        f"one of {sorted(ADAPTIVE_METHODS)}"
    )
  for name, value in (("alpha", alpha), ("adaptive_eta", adaptive_eta)):
    number = _as_float(value)
    if number is not None and not number >= 0:
      raise ValueError(
          f"sam.{name}={value!r} must be >= 0; set a " "non-negative value"
      )
  if method in MOMENTUM_METHODS and optimizer not in OPTIMIZERS_WITH_MOMENTUM:
    raise ValueError(
        f"sam.method={method!r} perturbs against the "
        f"optimizer's first moment, which opt.optimizer="
        f"{optimizer!r} has none of; use opt.optimizer='adamw' "
        "or 'momentum'"
    )


# ---------------------------------------------------------------- the step


def gradient(
    method: str,
    params: PyTree,
    batch: dict[str, Any],
    *,
    logits_fn: LogitsFn,
    rho,
    phi: float | None = None,
    precond: PyTree | None = None,
    precond_normalize: str = "after",
    head: OutputHead | None = None,
    alpha: float | None = None,
    adaptive_eta: float | None = None,
    momentum: PyTree | None = None,
) -> tuple[jax.Array, PyTree, dict[str, jax.Array]]:
  """(loss at theta, the method's gradient, scalar metrics).

  `method` and `precond_normalize` are static python values; `rho`, `phi`,
  `alpha` and `adaptive_eta` may be traced. `precond` (P = sqrt(nu_hat) +
  eps_adam, same tree as params) is used only by precond methods; None there
  means P = 1 (no Adam state yet). `momentum` (the optimizer's first moment,
  a tree like params) only by the momentum methods; None there means m = 0
  (the first step: the plain gradient). For a `lookahead` method (Momentum-
  SAM) the one pass is at theta + eps, and the loss and the metrics' g are
  there. `head` (optional): logits_fn's output layer, so the step can chunk
  the [B, L, V] logits (see `head_vjp`); the result is the same without it.
  """
  validate(
      method,
      rho,
      phi,
      precond_normalize=precond_normalize,
      alpha=alpha,
      adaptive_eta=adaptive_eta,
  )
  opts = Options(phi, alpha, precond, precond_normalize, adaptive_eta, momentum)
  loss, grads, _, metrics = _gradient(
      method, params, batch, logits_fn=logits_fn, rho=rho, opts=opts, head=head
  )
  return loss, grads, metrics


def _gradient(method, params, batch, *, logits_fn, rho, opts: Options, head):
  """`gradient` on validated options, also returning the plain gradient g."""
  entry = METHODS[method]
  rho = jnp.asarray(rho, jnp.result_type(float))
  if entry.lookahead:
    eps = _eps(entry, params, None, rho, opts)
    clean = clean_vjp(_add(params, eps), batch, logits_fn, head)
    params_eps = None
  else:
    clean = clean_vjp(params, batch, logits_fn, head)
    eps = _eps(entry, params, clean.grads, rho, opts)
    params_eps = _add(params, eps)
  grads = _combine(
      entry,
      entry(Step(clean, params_eps, batch, logits_fn, opts.phi, head)),
      clean.grads,
      opts,
  )
  return (
      clean.loss,
      grads,
      clean.grads,
      _metrics(grads, clean.grads, eps, rho),
  )


def _combine(entry: Method, grads, g, opts: Options):
  if entry.combine is None:
    return grads
  return entry.combine(grads, g, opts.alpha)


def _eps(entry: Method, params, grads, rho, opts: Options):
  """The method's perturbation (None for methods that do not perturb)."""
  if not entry.perturbs:
    return None
  if entry.direction == "momentum":
    return momentum_perturbation(opts.momentum, rho, params)
  if entry.direction == "adaptive":
    eta = ADAPTIVE_ETA if opts.adaptive_eta is None else opts.adaptive_eta
    return adaptive_perturbation(grads, params, rho, eta)
  return perturbation(
      grads,
      rho,
      opts.precond if entry.precond else None,
      opts.precond_normalize,
  )


def _add(params: PyTree, eps: PyTree | None) -> PyTree | None:
  if eps is None:
    return None
  return jax.tree.map(lambda p, e: p + e.astype(p.dtype), params, eps)


def _metrics(grads, g, eps, rho) -> dict[str, jax.Array]:
  return {
      "grad_norm": tree_math.norm(g),
      "perturbation_norm": (
          tree_math.norm(eps) if eps is not None else jnp.zeros((), jnp.float32)
      ),
      "cosine": cosine(grads, g),
      "rho": rho,
  }


# ------------------------------------------------ gradient accumulation


def _microbatches(batch: dict[str, Any], k: int):
  """[B, ...] -> [k, B/k, ...] and each microbatch's share of the weights.

  Microbatch i takes rows i, i+k, i+2k, ...: with the batch split over n =
  data x fsdp devices (B divisible by n k), every device holds B/(n k) rows of
  every microbatch, so each scan step runs on all devices without moving the
  batch (contiguous blocks would make XLA gather it).
  """
  micro = jax.tree.map(
      lambda x: x.reshape((x.shape[0] // k, k) + x.shape[1:]).swapaxes(0, 1),
      batch,
  )
  w_k = jnp.sum(
      micro["weights"].astype(jnp.float32),
      axis=tuple(range(1, micro["weights"].ndim)),
  )
  return micro, w_k / jnp.maximum(jnp.sum(w_k), 1.0)


class GradientResult(NamedTuple):
  """What `accumulated_gradient` returns (unpacks as 4 values)."""

  loss: jax.Array  # at the unperturbed params
  grads: PyTree  # the method's gradient
  metrics: dict[str, jax.Array]
  reuse: Reuse | None = None  # Reuse(grads - g, ||g||) with return_reuse


def accumulated_gradient(
    method: str,
    params: PyTree,
    batch: dict[str, Any],
    *,
    logits_fn: LogitsFn,
    rho,
    phi=None,
    precond=None,
    precond_normalize: str = "after",
    num_microbatches: int = 1,
    perturbation_scope: str = "global",
    return_reuse: bool = False,
    head: OutputHead | None = None,
    groups: Groups | None = None,
    alpha=None,
    adaptive_eta=None,
    momentum=None,
) -> GradientResult:
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

  return_reuse=True also fills `reuse` with `Reuse(delta = grads - g, ||g||)`,
  what the steps in between carry forward (`reuse_correction`).

  `groups` (on a mesh, with several microbatches; not with the "microbatch"
  scope): the parameters are gathered once per step (and theta + eps once)
  and each group of devices accumulates its own part of the gradient over
  the microbatches, reduced once per scan (`_grouped_sum`), instead of a
  gather and a reduction per microbatch. The result is the same.

  "replica" (on a mesh, with `groups`): each shard of the rows its own eps
  (`_replica_gradient`); without `groups` it is "global". A `lookahead`
  method's passes are all at the same theta + eps, whatever the scope.
  """
  validate(
      method,
      rho,
      phi,
      precond_normalize=precond_normalize,
      perturbation_scope=perturbation_scope,
      alpha=alpha,
      adaptive_eta=adaptive_eta,
  )
  opts = Options(phi, alpha, precond, precond_normalize, adaptive_eta, momentum)
  kw = dict(logits_fn=logits_fn, rho=rho, opts=opts, head=head)
  entry = METHODS[method]
  if perturbation_scope == "replica" and groups is not None:
    result = _replica_gradient(
        method,
        params,
        batch,
        rho=rho,
        opts=opts,
        k=num_microbatches,
        groups=groups,
    )
  elif num_microbatches == 1:
    result = _gradient(method, params, batch, **kw)
  elif groups is not None and perturbation_scope == "global":
    result = _grouped_accumulation(
        entry,
        params,
        batch,
        rho=jnp.asarray(rho, jnp.result_type(float)),
        opts=opts,
        k=num_microbatches,
        groups=groups,
    )
  elif (
      perturbation_scope == "microbatch"
      or not entry.perturbs
      or entry.lookahead
  ):
    result = _per_microbatch(
        method, params, batch, num_microbatches, keep_g=return_reuse, **kw
    )
  else:
    result = _global_accumulation(entry, params, batch, num_microbatches, **kw)
  return _gradient_result(*result, return_reuse=return_reuse)


def _gradient_result(
    loss, grads, g, metrics, return_reuse: bool
) -> GradientResult:
  """`accumulated_gradient`'s result; with `return_reuse` also what the
  reuse steps carry: Reuse(grads - g in float32, ||g||)."""
  if not return_reuse:
    return GradientResult(loss, grads, metrics)
  delta = jax.tree.map(
      lambda a, b: a.astype(jnp.float32) - b.astype(jnp.float32), grads, g
  )
  return GradientResult(loss, grads, metrics, Reuse(delta, tree_math.norm(g)))


def _per_microbatch(method: str, params, batch, k: int, keep_g: bool, **kw):
  """(loss, grads, g or None, metrics): `_gradient` on each of k
  microbatches (its own eps, for a perturbing method), summed by weight."""
  micro, frac_k = _microbatches(batch, k)

  def one(mb):
    loss, grads, g, metrics = _gradient(method, params, mb, **kw)
    return loss, grads, (g if keep_g else None), metrics

  shapes = jax.eval_shape(one, jax.tree.map(lambda x: x[0], micro))
  loss, grads, g, metrics = tree_math.scan_sum(one, micro, frac_k, shapes)
  return loss, _cast_like(grads, params), g, metrics


def _global_accumulation(
    entry: Method, params, batch, k: int, *, logits_fn, rho, opts: Options, head
):
  """(loss, grads, g, metrics) with eps from the whole batch's gradient:
  one scan over the k microbatches for g, a second for the method's
  gradient at theta + eps."""
  rho = jnp.asarray(rho, jnp.result_type(float))
  micro, frac_k = _microbatches(batch, k)

  def clean(mb):
    c = clean_vjp(params, mb, logits_fn, head)
    return c.loss, c.grads

  shapes = jax.eval_shape(clean, jax.tree.map(lambda x: x[0], micro))
  loss, g = tree_math.scan_sum(clean, micro, frac_k, shapes)
  eps = _eps(entry, params, g, rho, opts)
  params_eps = _add(params, eps)

  def perturbed(mb):
    return entry(
        Step(
            clean_vjp(params, mb, logits_fn, head),
            params_eps,
            mb,
            logits_fn,
            opts.phi,
            head,
        )
    )

  grads = _cast_like(tree_math.scan_sum(perturbed, micro, frac_k, g), params)
  grads = _combine(entry, grads, _cast_like(g, params), opts)
  return loss, grads, g, _metrics(grads, g, eps, rho)


class Groups(NamedTuple):
  """How `accumulated_gradient` splits a step over the devices' groups.

  `batch_sharding` splits a batch's rows G ways (`sharding.batch_sharding`)
  and `params_sharding` is the parameters' layout, where the summed
  gradients go; `logits_fn` and `head` are the model's without sharding
  constraints (they run on one group's rows with whole parameters); `cast`
  (optional) the model's cast to its compute dtype, applied before the
  gather so that it moves compute-dtype weights.
  """

  batch_sharding: Any
  params_sharding: Any
  logits_fn: LogitsFn
  head: OutputHead | None = None
  cast: Callable[[PyTree], PyTree] | None = None


def _group_count(groups: Groups) -> int:
  return _batch_shards(OutputHead(None, None, None, groups.batch_sharding))


def _grouped(groups: Groups, tree: PyTree) -> PyTree:
  """Every leaf's axis 0 (the groups) split like the batch's rows."""
  head = OutputHead(None, None, None, groups.batch_sharding)
  return jax.tree.map(lambda x: _keep_rows(head, x), tree)


def _per_group(groups: Groups, params: PyTree) -> PyTree:
  """params (cast to the compute dtype on their shards) gathered once, whole
  on every device, and seen as one copy per group [G, ...], each on its
  group's devices (no data moves)."""
  G = _group_count(groups)
  head = OutputHead(None, None, None, groups.batch_sharding)
  if groups.cast is not None:
    params = jax.lax.with_sharding_constraint(
        groups.cast(params), groups.params_sharding
    )
  whole = _replicated(head, params)
  return _grouped(
      groups, jax.tree.map(lambda x: jnp.broadcast_to(x, (G,) + x.shape), whole)
  )


def _grouped_sum(fn, params_G, micro_kxG, frac_kxG, like, groups: Groups):
  """sum over microbatches i and groups j of frac_ij * fn(params_j, mb_ij),
  each group accumulating its own sum on its devices ([G, ...] f32); summed
  over the groups once at the end (a reduce-scatter into the parameters'
  layout when the caller constrains it)."""
  run = jax.vmap(fn)
  G = frac_kxG.shape[1]
  like_G = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct((G,) + x.shape, x.dtype), like
  )
  acc = tree_math.scan_sum(
      lambda mb: run(params_G, mb),
      micro_kxG,
      frac_kxG,
      like_G,
      constrain=lambda t: _grouped(groups, t),
  )
  return jax.tree.map(lambda x: jnp.sum(x, axis=0), acc)


def _to_params_layout(groups: Groups, grads: PyTree, params: PyTree):
  """The summed gradient in the parameters' dtype and layout."""
  return jax.lax.with_sharding_constraint(
      _cast_like(grads, params), groups.params_sharding
  )


def _group_microbatches(batch, k: int, G: int):
  """[B, ...] -> [k, G, B/(k G), ...] and each piece's share of the weights:
  microbatch i takes rows i, i+k, ... as `_microbatches` does; within it,
  group j the rows on group j's devices."""
  micro, _ = _microbatches(batch, k)
  micro = jax.tree.map(
      lambda x: x.reshape((k, G, x.shape[1] // G) + x.shape[2:]), micro
  )
  w = micro["weights"].astype(jnp.float32)
  w_kxG = jnp.sum(w, axis=tuple(range(2, w.ndim)))
  return micro, w_kxG / jnp.maximum(jnp.sum(w_kxG), 1.0)


def _grouped_accumulation(
    entry: Method, params, batch, *, rho, opts: Options, k: int, groups: Groups
):
  """`accumulated_gradient`'s global-scope result with one gather of theta
  (and one of theta + eps) per step and one reduction per scan (a lookahead
  method: one gather of theta + eps, its one pass there)."""
  G = _group_count(groups)
  logits_fn, head = groups.logits_fn, groups.head
  micro, frac = _group_microbatches(batch, k, G)
  ahead = _eps(entry, params, None, rho, opts) if entry.lookahead else None
  params_G = _per_group(
      groups, params if ahead is None else _add(params, ahead)
  )

  def clean(p, mb):
    c = clean_vjp(p, mb, logits_fn, head)
    return c.loss, c.grads

  one = jax.tree.map(lambda x: x[0, 0], micro)
  like = jax.eval_shape(clean, jax.tree.map(lambda x: x[0], params_G), one)
  loss, g = _grouped_sum(clean, params_G, micro, frac, like, groups)
  g = _to_params_layout(groups, g, params)
  if not entry.perturbs or entry.lookahead:
    return loss, g, g, _metrics(g, g, ahead, rho)
  eps = _eps(entry, params, g, rho, opts)
  params_eps = _add(params, eps)
  both_G = (params_G, _per_group(groups, params_eps))

  def perturbed(both, mb):
    p, p_eps = both
    return entry(
        Step(
            clean_vjp(p, mb, logits_fn, head),
            p_eps,
            mb,
            logits_fn,
            opts.phi,
            head,
        )
    )

  grads = _to_params_layout(
      groups, _grouped_sum(perturbed, both_G, micro, frac, g, groups), params
  )
  grads = _combine(entry, grads, g, opts)
  return loss, grads, g, _metrics(grads, g, eps, rho)


def _replica_gradient(
    method: str, params, batch, *, rho, opts: Options, k: int, groups: Groups
):
  """perturbation_scope='replica': shard_map over the batch's axes
  (`groups.batch_sharding`); each of the G shards takes the whole method on
  its B/G rows (its own eps from its own gradient: m-sharpness with m = B/G,
  the data-parallel default of Foret et al.'s code and optax.contrib.sam's
  `batch_axis_name`), over k microbatches with the global scope inside the
  shard; the results are averaged with each shard's share of the loss
  weights. The parameters are gathered whole onto every device."""
  spec = groups.batch_sharding.spec[0]
  axes = (spec,) if isinstance(spec, str) else tuple(spec)
  static = dict(
      phi=opts.phi,
      alpha=opts.alpha,
      adaptive_eta=opts.adaptive_eta,
      precond_normalize=opts.precond_normalize,
  )

  def local(args, batch):
    params, precond, momentum, rho = args
    res = accumulated_gradient(
        method,
        params,
        batch,
        logits_fn=groups.logits_fn,
        head=groups.head,
        rho=rho,
        precond=precond,
        momentum=momentum,
        num_microbatches=k,
        return_reuse=True,
        **static,
    )
    g = jax.tree.map(
        lambda x, d: x.astype(jnp.float32) - d, res.grads, res.reuse.delta
    )
    w = jnp.sum(batch["weights"].astype(jnp.float32))
    frac = w / jnp.maximum(jax.lax.psum(w, axes), 1.0)
    mean = lambda tree: jax.tree.map(
        lambda x: jax.lax.psum(frac * x.astype(jnp.float32), axes), tree
    )
    return mean((res.loss, res.grads, g, res.metrics))

  args = (params, opts.precond, opts.momentum, jnp.asarray(rho, jnp.float32))
  specs = (
      jax.tree.map(lambda _: PartitionSpec(), args),
      jax.tree.map(lambda _: PartitionSpec(axes), batch),
  )
  loss, grads, g, metrics = jax.shard_map(
      local,
      mesh=groups.batch_sharding.mesh,
      in_specs=specs,
      out_specs=PartitionSpec(),
      check_vma=False,
  )(args, batch)
  return (
      loss,
      _to_params_layout(groups, grads, params),
      _to_params_layout(groups, g, params),
      metrics,
  )


# ------------------------------------------------- reuse between steps


class Reuse(NamedTuple):
  """What the steps between two full SAM-family steps carry (sam.reuse)."""

  delta: PyTree  # g_method - g at the last full step, float32
  grad_norm: jax.Array  # ||g|| there; 0 before the first one


def reuse_init(params: PyTree) -> Reuse:
  """Nothing measured yet: `reuse_correction` returns g unchanged."""
  return Reuse(
      jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params),
      jnp.zeros((), jnp.float32),
  )


def reuse_correction(g: PyTree, delta: PyTree, g_norm_at_measure) -> PyTree:
  """LookSAM-style reuse: g + ||g|| / ||g_m|| * delta.

  delta = g_method - g_m was measured at the last step that took the full
  method's gradient (g_m its plain gradient there); in between, the plain
  gradient g is corrected by that component, rescaled to the current gradient
  norm. At the measured step itself this gives back g_method exactly; before
  any measurement (||g_m|| = 0) it gives g.
  """
  g_norm_at_measure = jnp.asarray(g_norm_at_measure, jnp.float32)
  scale = jnp.where(
      g_norm_at_measure > 0,
      tree_math.norm(g)
      / jnp.where(g_norm_at_measure > 0, g_norm_at_measure, 1.0),
      0.0,
  )
  return jax.tree.map(lambda x, d: (x + scale * d).astype(x.dtype), g, delta)


def _cast_like(tree: PyTree, like: PyTree) -> PyTree:
  return jax.tree.map(lambda x, p: x.astype(p.dtype), tree, like)
