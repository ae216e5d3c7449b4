"""The sharpness-aware gradient-step family: SAM, Functional-SAM and friends.

Every method starts from one clean `jax.vjp` of `logits_fn` at theta, which
gives the loss L(theta) and g = grad L(theta). Methods that perturb share one
perturbation eps = rho * d / ||d|| with d = g, or d = g / P for the
preconditioned variants (P = sqrt(nu_hat) + eps_adam from AdamW), and then
differ only in which Jacobian and which logit cotangent meet, J(a)^T dL/dF(b)
for points a, b in {theta, theta + eps} (`head.head_vjp`;
Singh et al. 2025, eqs. 2, 10-12, 19):

  sam                   J(theta+eps)^T dL/dF(theta+eps) = grad L(theta+eps)
  functional_sam        J(theta+eps)^T dL/dF(theta)      (functional path)
  logit_sam             J(theta)^T     dL/dF(theta+eps)  (logit path)
  angle_sam             g + sin(phi) (logit_sam - g)
                          + cos(phi) (functional_sam - g)

To first order in rho, functional_sam - g = rho H_F e and logit_sam - g =
rho H_G e (Gauss-Newton / functional-Hessian split of the loss Hessian), so
sam = logit_sam + functional_sam - g + O(rho^2). Adding a method is one
function `(step: Step) -> grads` and one `register` call (or line in
`METHODS`); a method with options of its own declares them there
(`Option`: name, default, range, meaning), and the config keys
(`--config.sam.NAME`), their validation, `nanodo-sam bench`, the sweeps and
the tables read them from its entry.

The public codebases' variants differ in where eps points (`Method.direction`:
ASAM's T^2 g, Momentum-SAM's -m) or in a final combination (GSAM's
projection, `Method.combine`); docs/sam_variants.md lists them all.

This module is the equations of one batch's step (`gradient`). The logits
and the loss are head.py's (chunked over the sequence with the model's
output layer, `head`); how a batch's gradient is accumulated over
microbatches and where it is perturbed (global, microbatch, replica) is
distribute.py's. `reuse_correction` is the LookSAM-style cheap step between
full ones (config `sam.reuse`). It sees the model only through `logits_fn`
and `head`: it imports neither the model nor the trainer.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from nanodo_sam import head as head_lib
from nanodo_sam import tree_math
from nanodo_sam.loss import LogitsFn, OutputHead

NORM_EPS = 1e-12  # keeps eps = rho * d / ||d|| finite when d = 0
OPTIMIZERS_WITH_PRECOND = ("adamw",)
# Optimizers whose state holds a first moment (Momentum-SAM's direction):
# AdamW's mu, SGD with momentum's trace.
OPTIMIZERS_WITH_MOMENTUM = ("adamw", "momentum")
# How tables and legends name each optimizer's plain step (`label`).
OPTIMIZER_LABELS = {"adamw": "AdamW", "sgd": "SGD", "momentum": "Momentum"}
# Where eps points (`Method.direction`): along g (SAM), along T^2 g with T =
# |theta| + eta (ASAM, Kwon et al. 2021), or against the optimizer's first
# moment m (Momentum-SAM, Becker et al. 2024).
DIRECTIONS = ("gradient", "adaptive", "momentum")

PyTree = Any
Point = head_lib.Point


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


# ------------------------------------------------------- the clean pass


class Clean(NamedTuple):
  """The one clean pass at theta: loss, g and the point to reuse."""

  loss: jax.Array
  grads: PyTree
  point: Point


def clean_vjp(
    params: PyTree,
    batch: dict[str, Any],
    logits_fn: LogitsFn,
    head: OutputHead | None = None,
) -> Clean:
  """1 forward + 1 backward: the plain gradient, keeping the pieces to reuse."""
  p = head_lib.point(params, batch["inputs"], logits_fn, head)
  loss, grads = head_lib.head_vjp(p, p, batch, logits_fn, head)
  return Clean(loss, grads, p)


# ----------------------------------------------------- a method's options


@dataclasses.dataclass(frozen=True)
class Option:
  """A setting a method reads besides rho: config key `sam.NAME`, declared in
  the entries (`Method.options`) of the methods that read it, and from there
  in the key table, validation, bench, the sweeps and the tables.

  default: the key's default (None: unset). if_unset: what the method uses
  when unset; an option with neither is required by its methods. example: a
  value bench and the sweeps set for a required option. A number lies in
  [least, inf) (least None: any finite number); a string is one of
  `choices`.
  """

  name: str
  meaning: str
  default: Any = None
  if_unset: Any = None
  example: Any = None
  least: float | None = 0.0
  choices: tuple = ()

  @property
  def key(self) -> str:
    return f"sam.{self.name}"

  @property
  def required(self) -> bool:
    return self.default is None and self.if_unset is None

  def problem(self, value) -> str | None:
    """Why `value` (set) is out of range, or None (traced: not checked)."""
    if self.choices:
      if value in self.choices:
        return None
      return f"is unknown; use one of {', '.join(self.choices)}"
    number = _as_float(value)
    if number is None or (
        math.isfinite(number) and (self.least is None or number >= self.least)
    ):
      return None
    return (
        "must be a finite number"
        if self.least is None
        else f"must be >= {self.least:g}"
    )


PHI = Option(
    "phi",
    "Angle-SAM's angle in radians (0 = functional_sam, pi/2 = logit_sam).",
    least=None,
    example=0.7854,
)
PRECOND_NORMALIZE = Option(
    "precond_normalize",
    "The preconditioned methods' eps: after = rho P^-1 g / ||P^-1 g||; "
    "before = rho (g / ||g||) / P.",
    default="after",
    choices=("after", "before"),
)
ALPHA = Option("alpha", "GSAM's weight of -g_orth (0 = SAM).", example=0.2)
ADAPTIVE_ETA = Option(
    "adaptive_eta",
    "ASAM's eta in T = |theta| + eta; unset = 0.01 (the official code's "
    "value).",
    if_unset=0.01,
)


class Options(NamedTuple):
  """The step's inputs beyond rho: the method options' values by name (as
  set; None where unset) and the optimizer state some methods read."""

  values: dict[str, Any] = {}
  precond: PyTree | None = None  # AdamW's P (precond methods)
  momentum: PyTree | None = None  # the optimizer's first moment

  def get(self, option: Option):
    """`option`'s value, or what a method uses when it is unset."""
    value = self.values.get(option.name)
    if value is None:
      return option.if_unset if option.default is None else option.default
    return value


@dataclasses.dataclass(frozen=True)
class Step:
  """What a method sees: the clean pass and the perturbed parameters."""

  clean: Clean
  params_eps: PyTree | None  # theta + eps; None for methods that don't perturb
  batch: dict[str, Any]
  logits_fn: LogitsFn
  opts: Options = Options()
  head: OutputHead | None = None

  def option(self, option: Option):
    """The value of one of the method's options."""
    return self.opts.get(option)

  def perturbed(self) -> Point:
    """1 forward at theta + eps (to the output layer), keeping J(theta+eps)^T."""
    return head_lib.point(
        self.params_eps, self.batch["inputs"], self.logits_fn, self.head
    )

  def jt(self, a: Point, b: Point) -> PyTree:
    """J(a)^T dL/dF(b): 1 backward at a (the output layer's part chunked)."""
    return head_lib.head_vjp(a, b, self.batch, self.logits_fn, self.head)[1]


# -------------------------------------------------------- perturbations


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
  `precond_normalize` is one of PRECOND_NORMALIZE.choices.
  """
  if precond_normalize not in PRECOND_NORMALIZE.choices:
    raise ValueError(
        f"precond_normalize={precond_normalize!r} is unknown; "
        f"use one of {PRECOND_NORMALIZE.choices}"
    )
  if precond is None:
    return _scale_to(grads, rho)
  divide = lambda g, p: (g / p).astype(g.dtype)
  if precond_normalize == "before":
    return jax.tree.map(divide, _scale_to(grads, rho), precond)
  return _scale_to(jax.tree.map(divide, grads, precond), rho)


def adaptive_perturbation(
    grads: PyTree, params: PyTree, rho, eta: float = ADAPTIVE_ETA.if_unset
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
  phi = step.option(PHI)
  s, c = jnp.sin(phi), jnp.cos(phi)
  return jax.tree.map(
      lambda g0, gl, gf: (g0 + s * (gl - g0) + c * (gf - g0)).astype(g0.dtype),
      g,
      g_logit,
      g_func,
  )


def _surrogate_gap(g_p: PyTree, g: PyTree, opts: Options) -> PyTree:
  """GSAM's g_p - alpha g_orth, g_orth = g - (<g, g_p>/||g_p||^2) g_p: the
  part of g orthogonal to g_p, descended to shrink the surrogate gap
  L(theta + eps) - L(theta) without changing the perturbed loss."""
  alpha = opts.get(ALPHA)
  coef = tree_math.vdot(g, g_p) / jnp.maximum(
      jnp.square(tree_math.norm(g_p)), jnp.finfo(jnp.float32).tiny
  )
  return jax.tree.map(
      lambda p, x: (p - alpha * (x - coef * p)).astype(p.dtype), g_p, g
  )


@dataclasses.dataclass(frozen=True)
class Method:
  """A registry entry: every fact about a method, read by the rest of the code
  (config keys and validation, the train step, `nanodo-sam bench`, sweeps,
  tables, figures).

  `forwards`/`backwards` are the passes through the network per step
  (bench's FLOPs, `cost`; tests/test_sam.py counts them in the real step).
  """

  fn: Callable[[Step], PyTree]
  label: str  # the name as the paper writes it (tables, figure legends)
  forwards: int = 2
  backwards: int = 2
  perturbs: bool = True  # needs eps (theta + eps)
  precond: bool = False  # eps in AdamW's geometry, uses `precond`
  options: tuple[Option, ...] = ()  # the settings it reads besides rho
  direction: str = "gradient"  # where eps points: one of DIRECTIONS
  # The one clean pass is taken at theta + eps (eps known before the step,
  # as Momentum-SAM's is): `loss` and g are then those at theta + eps.
  lookahead: bool = False
  # (fn's gradient, g, options) -> the step's gradient, applied once to the
  # whole batch's (the accumulated) fn gradient and g: a step not linear in
  # the batch (GSAM's projection).
  combine: Callable[[PyTree, PyTree, Options], PyTree] | None = None

  def __call__(self, step: Step) -> PyTree:
    return self.fn(step)

  @property
  def cost(self) -> float:
    """One step's cost in plain steps: (2 forwards + 4 backwards) / 6, a
    backward pass costing two forwards (bench's FLOPs, the compute of a
    run, `sam_schedule.adamw_step_equivalents`)."""
    return (2 * self.forwards + 4 * self.backwards) / 6

  @property
  def uses_phi(self) -> bool:
    return PHI in self.options

  @property
  def uses_alpha(self) -> bool:
    return ALPHA in self.options


_PRECOND = dict(precond=True, options=(PRECOND_NORMALIZE,))
_ADAPTIVE = dict(direction="adaptive", options=(ADAPTIVE_ETA,))
_GSAM = dict(options=(ALPHA,), combine=_surrogate_gap)

METHODS: dict[str, Method] = {
    "adamw": Method(_plain, "AdamW", forwards=1, backwards=1, perturbs=False),
    "sam": Method(_sam, "SAM"),
    "functional_sam": Method(_functional_sam, "Func-SAM"),
    "logit_sam": Method(_logit_sam, "Logit-SAM"),
    "angle_sam": Method(_angle_sam, "Angle-SAM", backwards=3, options=(PHI,)),
    "precond_sam": Method(_sam, "Precond SAM", **_PRECOND),
    "precond_functional_sam": Method(
        _functional_sam, "Precond Func-SAM", **_PRECOND
    ),
    "adaptive_sam": Method(_sam, "ASAM", **_ADAPTIVE),
    "gsam": Method(_sam, "GSAM", **_GSAM),
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
        _functional_sam, "Func-ASAM", **_ADAPTIVE
    ),
    "functional_momentum_sam": Method(
        _functional_sam, "Func-Momentum-SAM", direction="momentum"
    ),
    "precond_gsam": Method(
        _sam,
        "Precond GSAM",
        precond=True,
        options=(PRECOND_NORMALIZE, ALPHA),
        combine=_surrogate_gap,
    ),
}
# The plain step's key: the base optimizer's own gradient, no perturbation.
PLAIN = "adamw"


def register(name: str, method: Method) -> Method:
  """Add `method` to METHODS as `name`: the one place a new method goes.
  Its options may be new (a new config key sam.NAME) or shared with other
  methods (the same Option)."""
  for option in method.options:
    known = all_options().get(option.name)
    if known is not None and known != option:
      raise ValueError(
          f"option sam.{option.name} of method {name!r} differs "
          "from the one the registry has; share that Option"
      )
  METHODS[name] = method
  return method


def all_options() -> dict[str, Option]:
  """Every registered method's options by name, in the registry's order
  (the config keys sam.NAME the key table lists)."""
  out = {}
  for entry in METHODS.values():
    for option in entry.options:
      out.setdefault(option.name, option)
  return out


def methods_with(option: str) -> frozenset[str]:
  """The methods that read option `option`."""
  return frozenset(
      k for k, m in METHODS.items() if any(o.name == option for o in m.options)
  )


def example_options(method: str) -> dict[str, Any]:
  """{"sam.NAME": value} that lets `method` run: each of its required
  options at its `example` (bench, sweeps); {} for a method without one."""
  return {o.key: o.example for o in METHODS[method].options if o.required}


def config_options(sam_cfg, method: str | None = None) -> dict[str, Any]:
  """{option name: its value in config section `sam`} for every option, or
  for those of `method` only."""
  names = (
      all_options()
      if method is None
      else [o.name for o in METHODS[method].options]
  )
  return {name: sam_cfg.get(name) for name in names}


PRECOND_METHODS = frozenset(k for k, m in METHODS.items() if m.precond)
PHI_METHODS = methods_with(PHI.name)
ALPHA_METHODS = methods_with(ALPHA.name)
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
    return OPTIMIZER_LABELS.get(optimizer, optimizer)
  return METHODS[method].label


# ------------------------------------------------------------ validation


def _as_float(x) -> float | None:
  """A concrete python float, or None for a traced value."""
  try:
    return float(x)
  except (TypeError, jax.errors.ConcretizationTypeError):
    return None


def validate(method: str, rho, optimizer: str = "adamw", **options) -> None:
  """Raise ValueError (one line: what is wrong and how to fix it) on a bad
  method/rho/optimizer/option combination: the one check of the step's
  options (sam_schedule.validate calls it). `options`: the method options'
  values by name (`Option`; None = unset). Traced values are not checked."""
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
  _validate_options(method, options)
  _validate_optimizer(method, optimizer)


def _validate_options(method: str, values: dict[str, Any]) -> None:
  """Each option set is one of the method's (or at its default) and in its
  range; each required option of the method is set."""
  known = all_options()
  unknown = sorted(set(values) - set(known))
  if unknown:
    raise ValueError(
        f"sam.{unknown[0]} is not an option of any method; use "
        f"one of {', '.join('sam.' + k for k in known)}"
    )
  mine = {o.name for o in METHODS[method].options}
  for name, option in known.items():
    value = values.get(name)
    if name in mine and value is None and option.required:
      raise ValueError(
          f"sam.method={method!r} needs sam.{name} "
          f"({option.meaning.rstrip('.')}); set it"
      )
    if value is None or (name not in mine and value == option.default):
      continue
    if name not in mine:
      raise ValueError(
          f"sam.{name}={value!r} is ignored by sam.method="
          f"{method!r}; unset sam.{name} or use one of "
          f"{sorted(methods_with(name))}"
      )
    problem = option.problem(value)
    if problem:
      raise ValueError(
          f"sam.{name}={value!r} {problem} " f"({option.meaning.rstrip('.')})"
      )


def _validate_optimizer(method: str, optimizer: str) -> None:
  """AdamW's second moment (precond methods) and an optimizer's first moment
  (momentum methods) exist."""
  if method in PRECOND_METHODS and optimizer not in OPTIMIZERS_WITH_PRECOND:
    raise ValueError(
        f"sam.method={method!r} preconditions with AdamW's second "
        f"moment but opt.optimizer={optimizer!r}; use "
        f"opt.optimizer='adamw' or a method without 'precond_'"
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
    precond: PyTree | None = None,
    head: OutputHead | None = None,
    momentum: PyTree | None = None,
    **options,
) -> tuple[jax.Array, PyTree, dict[str, jax.Array]]:
  """(loss at theta, the method's gradient, scalar metrics).

  `method` is a static python value; `rho` and the numeric `options` (the
  method's `Option`s by name: phi, alpha, adaptive_eta, precond_normalize,
  ...; None = unset) may be traced. `precond` (P = sqrt(nu_hat) + eps_adam,
  same tree as params) is used only by precond methods; None there means
  P = 1 (no Adam state yet). `momentum` (the optimizer's first moment, a
  tree like params) only by the momentum methods; None there means m = 0
  (the first step: the plain gradient). For a `lookahead` method (Momentum-
  SAM) the one pass is at theta + eps, and the loss and the metrics' g are
  there. `head` (optional): logits_fn's output layer, so the step can chunk
  the [B, L, V] logits (`head.head_vjp`); the result is the same without it.
  """
  validate(method, rho, **options)
  opts = Options(options, precond, momentum)
  loss, grads, _, metrics = method_gradient(
      METHODS[method],
      params,
      batch,
      logits_fn=logits_fn,
      rho=rho,
      opts=opts,
      head=head,
  )
  return loss, grads, metrics


def method_gradient(
    entry: Method, params, batch, *, logits_fn, rho, opts: Options, head=None
):
  """(loss, the method's gradient, the plain gradient g, metrics) on one
  batch with validated options: `gradient`'s equations."""
  rho = jnp.asarray(rho, jnp.result_type(float))
  if entry.lookahead:
    eps = perturb(entry, params, None, rho, opts)
    clean = clean_vjp(shift(params, eps), batch, logits_fn, head)
    params_eps = None
  else:
    clean = clean_vjp(params, batch, logits_fn, head)
    eps = perturb(entry, params, clean.grads, rho, opts)
    params_eps = shift(params, eps)
  grads = combine(
      entry,
      entry(Step(clean, params_eps, batch, logits_fn, opts, head)),
      clean.grads,
      opts,
  )
  return (
      clean.loss,
      grads,
      clean.grads,
      step_metrics(grads, clean.grads, eps, rho),
  )


def combine(entry: Method, grads, g, opts: Options):
  """The entry's final combination of its gradient with g (GSAM's), once
  per batch; `grads` unchanged for the others."""
  if entry.combine is None:
    return grads
  return entry.combine(grads, g, opts)


def perturb(entry: Method, params, grads, rho, opts: Options):
  """The method's perturbation eps from g = `grads` (None for methods that
  do not perturb)."""
  if not entry.perturbs:
    return None
  if entry.direction == "momentum":
    return momentum_perturbation(opts.momentum, rho, params)
  if entry.direction == "adaptive":
    return adaptive_perturbation(grads, params, rho, opts.get(ADAPTIVE_ETA))
  return perturbation(
      grads,
      rho,
      opts.precond if entry.precond else None,
      opts.get(PRECOND_NORMALIZE),
  )


def shift(params: PyTree, eps: PyTree | None) -> PyTree | None:
  """theta + eps in the parameters' dtypes (None without eps)."""
  if eps is None:
    return None
  return jax.tree.map(lambda p, e: p + e.astype(p.dtype), params, eps)


def step_metrics(grads, g, eps, rho) -> dict[str, jax.Array]:
  """The scalars every step logs."""
  return {
      "grad_norm": tree_math.norm(g),
      "perturbation_norm": (
          tree_math.norm(eps) if eps is not None else jnp.zeros((), jnp.float32)
      ),
      "cosine": cosine(grads, g),
      "rho": rho,
  }


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


def cast_like(tree: PyTree, like: PyTree) -> PyTree:
  """`tree` in the dtypes of `like`'s leaves."""
  return jax.tree.map(lambda x, p: x.astype(p.dtype), tree, like)
