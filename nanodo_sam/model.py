"""The Nanodo decoder-only Transformer (flax linen) and its output head.

Tied input/output embedding, learned positions, pre-LayerNorm without bias,
causal multi-head attention, a two-layer MLP and no biases anywhere, as in
google-deepmind/nanodo and appendix A.1 of the paper. Parameters are float32.
By default everything else is Nanodo's too (docs/fidelity.md): attention and
MLP kernels start from xavier_uniform, and under `dtype=bfloat16` the blocks
and LayerNorms compute in bfloat16 while the embeddings, the residual stream
and the tied output layer stay float32 (`residual_dtype="float32"`); logits
(and everything after them) are float32. Every parameter carries logical axis
names that `sharding.py` maps to a mesh.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from nanodo_sam import keys
from nanodo_sam import targets
from nanodo_sam.errors import UsageError
from nanodo_sam.loss import LogitsFn, OutputHead

NONLINEARITIES = {"gelu": nn.gelu, "relu": nn.relu}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# Initialisers of the attention and MLP kernels. xavier_uniform is Nanodo's
# (`DoConfig.kernel_init`); fan_in_truncated_normal was the default before
# it matched Nanodo (the MLP's first layer at 1.58x Nanodo's std, the second
# at 0.79x). Embeddings always use Nanodo's fan-in normal.
KERNEL_INITS = {
    "xavier_uniform": nn.initializers.xavier_uniform(),
    "fan_in_truncated_normal": nn.initializers.variance_scaling(
        1.0, "fan_in", "truncated_normal"
    ),
}
# Where the residual stream lives under a low-precision `dtype`: "float32"
# (Nanodo: float32 embeddings and residual stream, output layer on the
# float32 features) or "compute" (embeddings, residual stream and output
# layer in `dtype` too).
RESIDUAL_DTYPES = keys.BY_NAME["model.residual_dtype"].choices
# The attention kernel (`jax.nn.dot_product_attention`'s implementation):
# "xla" (scores materialised, every derivative), "cudnn" (cuDNN flash
# attention: GPU, bfloat16, reverse mode only) or "auto" (cudnn wherever
# `cudnn_unsupported` finds nothing against it, else xla).
ATTENTIONS = keys.BY_NAME["model.attention"].choices
# DoConfig's fields whose values are choices of the key table.
CHOICES = (
    "nonlinearity",
    "dtype",
    "kernel_init",
    "residual_dtype",
    "attention",
)


@dataclasses.dataclass(frozen=True)
class DoConfig:
  """Model shape. D width, H heads, N blocks, F MLP width, L context, V vocab."""

  D: int
  H: int
  N: int
  F: int
  L: int
  V: int
  nonlinearity: str = "gelu"
  dtype: str = "float32"
  remat: bool = False
  kernel_init: str = "xavier_uniform"
  residual_dtype: str = "float32"
  attention: str = "xla"  # configs/base.py: "auto"

  def __post_init__(self):
    for name in CHOICES:  # The key table's choices (keys.py).
      keys.check_choice(f"model.{name}", getattr(self, name))
    for name in ("D", "H", "N", "F", "L", "V"):
      if getattr(self, name) <= 0:
        raise UsageError(
            f"model.{name} must be positive, got " f"{getattr(self, name)}"
        )
    if self.D % self.H:
      raise UsageError(
          f"model.D={self.D} is not divisible by model.H="
          f"{self.H}; choose D = H * head_dim"
      )

  @property
  def stream_dtype(self) -> str:
    """Dtype of the embeddings, the residual stream and the output layer."""
    return "float32" if self.residual_dtype == "float32" else self.dtype


def from_config(cfg) -> DoConfig:
  """The config's model section as a DoConfig (UsageError if it is bad)."""
  m = cfg.model
  return DoConfig(
      D=m.D,
      H=m.H,
      N=m.N,
      F=m.F,
      L=m.L,
      V=m.V,
      nonlinearity=m.nonlinearity,
      dtype=m.dtype,
      remat=m.remat,
      kernel_init=m.kernel_init,
      residual_dtype=m.residual_dtype,
      attention=keys.of(m, "model.attention"),
  )


def non_embedding_params(cfg) -> int:
  """N*(4D^2 + 2DF + 2D) + D: attention, MLP and LayerNorm scales. `cfg`:
  anything with N, D and F (a DoConfig, the config's `model` block)."""
  return cfg.N * (4 * cfg.D**2 + 2 * cfg.D * cfg.F + 2 * cfg.D) + cfg.D


def embedding_params(cfg) -> int:
  """(V + L) D: the token embedding (tied with the output layer) and the
  learned positions. `cfg`: anything with V, L and D."""
  return (cfg.V + cfg.L) * cfg.D


def total_params(cfg) -> int:
  """Every parameter: `non_embedding_params` + `embedding_params`."""
  return non_embedding_params(cfg) + embedding_params(cfg)


def cudnn_unsupported(cfg: DoConfig, backend: str | None = None) -> str | None:
  """Why cuDNN flash attention cannot run this model on `backend` (default:
  JAX's), or None when it can: an NVIDIA GPU with cuDNN, compute capability
  8.0 or later, bfloat16 compute and a head dimension that is a multiple of 8
  up to 128 (256 from Hopper on), the conditions of
  `jax.nn.dot_product_attention(implementation="cudnn")`. With a target
  active (`targets.active`, `nanodo-sam plan`), its platform and compute
  capability stand for the device's."""
  backend = backend or targets.platform()
  if backend != "gpu":
    return f"the {backend} backend has no cuDNN"
  if cfg.dtype != "bfloat16":
    return (
        f"cuDNN flash attention needs bfloat16 inputs, but model.dtype="
        f"{cfg.dtype}"
    )
  if targets.compute_capability() is not None:
    return _cudnn_unsupported_on(cfg, targets.compute_capability())
  try:  # JAX's own checks (private: a JAX without them is treated as no).
    from jax._src.cudnn import fused_attention_stablehlo as fa

    fa.check_cudnn_version()
    if not fa.check_compute_capability("8.0"):
      return (
          "cuDNN flash attention needs an NVIDIA GPU of compute "
          "capability 8.0 (Ampere) or later"
      )
    head_max = 256 if fa.check_compute_capability("9.0") else 128
  except Exception as e:  # pylint: disable=broad-except
    return f"cuDNN attention is not available ({type(e).__name__}: {e})"
  head_dim = cfg.D // cfg.H
  if head_dim % 8 or head_dim > head_max:
    return (
        f"the head dimension D/H = {head_dim} is not a multiple of 8 up "
        f"to {head_max}"
    )
  return None


def _cudnn_unsupported_on(
    cfg: DoConfig, capability: tuple[int, int]
) -> str | None:
  """`cudnn_unsupported` for a GPU of compute capability `capability` that
  is not this host's (a `targets` GPU): JAX's conditions, read from it."""
  if capability < (8, 0):
    return (
        "cuDNN flash attention needs an NVIDIA GPU of compute "
        "capability 8.0 (Ampere) or later"
    )
  head_max, head_dim = (256 if capability >= (9, 0) else 128), cfg.D // cfg.H
  if head_dim % 8 or head_dim > head_max:
    return (
        f"the head dimension D/H = {head_dim} is not a multiple of 8 up "
        f"to {head_max}"
    )
  return None


def attention_implementation(cfg: DoConfig, backend: str | None = None) -> str:
  """ "xla" or "cudnn": what `cfg.attention` means on `backend` (default:
  JAX's). Raises UsageError for "cudnn" where it cannot run."""
  if cfg.attention == "xla":
    return "xla"
  why = cudnn_unsupported(cfg, backend)
  if cfg.attention == "cudnn" and why:
    raise UsageError(
        f"model.attention=cudnn cannot run here: {why}; use "
        "--config.model.attention=auto (cuDNN where it can "
        "run, XLA elsewhere) or xla"
    )
  return "xla" if why else "cudnn"


def _kernel_init(cfg: DoConfig, axes: tuple[str, ...]):
  return nn.with_logical_partitioning(KERNEL_INITS[cfg.kernel_init], axes)


_EMBED_INIT = nn.initializers.variance_scaling(
    1.0, "fan_in", "normal", out_axis=0
)


def attention(
    q_BxTxHxK: jax.Array,
    k_BxSxHxK: jax.Array,
    v_BxSxHxK: jax.Array,
    mask_TxS: jax.Array | None = None,
    implementation: str = "xla",
) -> jax.Array:
  """Multi-head dot-product attention, the model's one call site: causal over
  the sequence when `mask_TxS` is None (training, T == S), else queries
  attend to the keys where the mask is True (decoding against the KV cache).
  `implementation`: "xla" or "cudnn" (`attention_implementation`).
  """
  mask = None if mask_TxS is None else mask_TxS[None, None]
  return jax.nn.dot_product_attention(
      q_BxTxHxK,
      k_BxSxHxK,
      v_BxSxHxK,
      mask=mask,
      is_causal=mask is None,
      implementation=implementation,
  )


class CausalAttn(nn.Module):
  """Causal multi-head self-attention without biases.

  With `cache_index` (decoding), the keys and values of x's T tokens go into
  the "cache" collection ([B, L, H, K] each) at positions cache_index..
  cache_index+T-1, and the queries attend to every cached position up to
  their own: the cost of a new token does not grow with the tokens before
  it beyond the attention over the cache.
  """

  cfg: DoConfig

  @nn.compact
  def __call__(
      self, x_BxTxD: jax.Array, cache_index: jax.Array | None = None
  ) -> jax.Array:
    cfg = self.cfg
    Dh = cfg.D // cfg.H
    dtype = DTYPES[cfg.dtype]
    dense = functools.partial(
        nn.DenseGeneral,
        features=(cfg.H, Dh),
        axis=-1,
        use_bias=False,
        dtype=dtype,
        kernel_init=_kernel_init(cfg, ("embed", "heads", "kv")),
    )
    q_BxTxHxK = dense(name="query")(x_BxTxD)
    k_BxSxHxK = dense(name="key")(x_BxTxD)
    v_BxSxHxK = dense(name="value")(x_BxTxD)
    mask_TxS = None
    if cache_index is not None:
      B, T = x_BxTxD.shape[:2]
      shape = (B, cfg.L, cfg.H, Dh)
      cached_k = self.variable(
          "cache", "cached_key", jnp.zeros, shape, k_BxSxHxK.dtype
      )
      cached_v = self.variable(
          "cache", "cached_value", jnp.zeros, shape, v_BxSxHxK.dtype
      )
      at = (0, cache_index, 0, 0)
      cached_k.value = jax.lax.dynamic_update_slice(
          cached_k.value, k_BxSxHxK, at
      )
      cached_v.value = jax.lax.dynamic_update_slice(
          cached_v.value, v_BxSxHxK, at
      )
      k_BxSxHxK, v_BxSxHxK = cached_k.value, cached_v.value
      mask_TxS = (
          jnp.arange(cfg.L)[None, :] <= cache_index + jnp.arange(T)[:, None]
      )
    # Training and scoring: model.attention's kernel; decoding against the
    # cache (an explicit mask, one position at a time): XLA's.
    impl = "xla" if mask_TxS is not None else attention_implementation(cfg)
    out_BxTxHxK = attention(q_BxTxHxK, k_BxSxHxK, v_BxSxHxK, mask_TxS, impl)
    return nn.DenseGeneral(
        features=cfg.D,
        axis=(-2, -1),
        use_bias=False,
        dtype=dtype,
        kernel_init=_kernel_init(cfg, ("heads", "kv", "embed")),
        name="attn_out",
    )(out_BxTxHxK)


class Mlp(nn.Module):
  """D -> F -> D with the configured nonlinearity, no biases."""

  cfg: DoConfig

  @nn.compact
  def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
    cfg = self.cfg
    dtype = DTYPES[cfg.dtype]
    h_BxLxF = nn.Dense(
        cfg.F,
        use_bias=False,
        dtype=dtype,
        kernel_init=_kernel_init(cfg, ("embed", "mlp")),
        name="fc1",
    )(x_BxLxD)
    h_BxLxF = NONLINEARITIES[cfg.nonlinearity](h_BxLxF)
    return nn.Dense(
        cfg.D,
        use_bias=False,
        dtype=dtype,
        kernel_init=_kernel_init(cfg, ("mlp", "embed")),
        name="fc2",
    )(h_BxLxF)


def _layer_norm(cfg: DoConfig, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(
      use_bias=False,
      dtype=DTYPES[cfg.dtype],
      name=name,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
  )


class TBlock(nn.Module):
  """Pre-LayerNorm residual block: x + attn(ln(x)), then x + mlp(ln(x))."""

  cfg: DoConfig

  @nn.compact
  def __call__(
      self, x_BxLxD: jax.Array, cache_index: jax.Array | None = None
  ) -> jax.Array:
    x_BxLxD = x_BxLxD + CausalAttn(self.cfg, name="attn")(
        _layer_norm(self.cfg, "ln_attn")(x_BxLxD), cache_index
    )
    return x_BxLxD + Mlp(self.cfg, name="mlp")(
        _layer_norm(self.cfg, "ln_mlp")(x_BxLxD)
    )


def output_logits(
    embedding_VxD: jax.Array, x_xD: jax.Array, dtype: str = "float32"
) -> jax.Array:
  """The tied output layer x E^T: computed in `dtype` (as nn.Embed.attend
  does), returned in float32. `x_xD` may have any leading shape."""
  dt = DTYPES[dtype]
  return jnp.dot(x_xD.astype(dt), embedding_VxD.astype(dt).T).astype(
      jnp.float32
  )


class TransformerDo(nn.Module):
  """tokens [B, L] int32 -> logits [B, L, V] float32.

  With `features_only=True`: the final LayerNorm's output h [B, L, D] (in the
  compute dtype), so that logits = output_logits(params["embed"]
  ["embedding"], h, cfg.stream_dtype); see `output_head`.

  With `decode=True` (sampling; `make_decode_fn`): tokens [B, T] continue the
  sequence held in the "cache" collection (`init_cache`), whose "index" is
  the position of their first token; T = the prompt to prefill, then 1.
  """

  cfg: DoConfig

  @nn.compact
  def __call__(
      self,
      tokens_BxL: jax.Array,
      features_only: bool = False,
      decode: bool = False,
  ) -> jax.Array:
    cfg = self.cfg
    stream = DTYPES[cfg.stream_dtype]
    embed = nn.Embed(
        cfg.V,
        cfg.D,
        dtype=stream,
        name="embed",
        embedding_init=nn.with_logical_partitioning(
            _EMBED_INIT, ("vocab", "embed")
        ),
    )
    pos_embed = nn.Embed(
        cfg.L,
        cfg.D,
        dtype=stream,
        name="pos_embed",
        embedding_init=nn.with_logical_partitioning(
            _EMBED_INIT, (None, "embed")
        ),
    )
    L = tokens_BxL.shape[1]
    start = None
    positions_L = jnp.arange(L)
    if decode:
      index = self.variable("cache", "index", jnp.zeros, (), jnp.int32)
      start = index.value
      index.value = start + L
      positions_L = start + positions_L
    x_BxLxD = embed(tokens_BxL) + pos_embed(positions_L[None, :])
    block = nn.remat(TBlock) if cfg.remat and not decode else TBlock
    for i in range(cfg.N):
      x_BxLxD = block(cfg, name=f"block_{i}")(x_BxLxD, start)
    x_BxLxD = _layer_norm(cfg, "out_ln")(x_BxLxD)
    if features_only:
      return x_BxLxD
    return output_logits(embed.embedding, x_BxLxD, cfg.stream_dtype)


def compute_params(cfg: DoConfig):
  """params -> params with every block's kernels in the compute dtype, the
  cast their layers apply first thing anyway (flax's promote_dtype), or None
  under float32. Done before the layers see them, it lets FSDP gather the
  weights in the compute dtype (`sharding.pin_params`); the embeddings, the
  LayerNorm scales and the rest stay as they are."""
  if DTYPES[cfg.dtype] == jnp.float32:
    return None
  dtype = DTYPES[cfg.dtype]

  def cast(params):
    return {
        k: (
            jax.tree_util.tree_map_with_path(
                lambda path, x: x.astype(dtype)
                if getattr(path[-1], "key", None) == "kernel"
                else x,
                v,
            )
            if k.startswith("block_")
            else v
        )
        for k, v in params.items()
    }

  return cast


def make_logits_fn(model: TransformerDo) -> LogitsFn:
  """`(params, inputs) -> logits`, the function every gradient step uses."""

  def logits_fn(params, inputs_BxL):
    return model.apply({"params": params}, inputs_BxL)

  return logits_fn


def output_head(model: TransformerDo) -> OutputHead:
  """The tied output layer applied to the final LayerNorm's output, handed to
  the gradient step (`sam.gradient(..., head=...)`) so that it can chunk the
  [B, L, V] logits."""
  return OutputHead(
      features=lambda params, inputs_BxL: model.apply(
          {"params": params}, inputs_BxL, features_only=True
      ),
      select=lambda params: params["embed"]["embedding"],
      apply=functools.partial(_apply_output, model.cfg.stream_dtype),
  )


def _apply_output(dtype: str, embedding_VxD, x_xD):
  return output_logits(embedding_VxD, x_xD, dtype)


def init_cache(model: TransformerDo, batch_size: int):
  """An empty KV cache for decoding `batch_size` sequences of up to L tokens:
  keys and values [B, L, H, D/H] per block (compute dtype), index 0."""
  shapes = jax.eval_shape(
      lambda: model.init(
          jax.random.key(0), jnp.zeros((batch_size, 1), jnp.int32), decode=True
      )["cache"]
  )
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def make_decode_fn(model: TransformerDo):
  """`(params, cache, tokens [B, T]) -> (logits [B, T, V], cache)`: the same
  forward pass as `make_logits_fn`, for T tokens that continue the cached
  sequence (positions cache index .. index + T - 1, which must stay < L)."""

  def decode_fn(params, cache, tokens_BxT):
    logits_BxTxV, updated = model.apply(
        {"params": params, "cache": cache},
        tokens_BxT,
        decode=True,
        mutable=["cache"],
    )
    return logits_BxTxV, updated["cache"]

  return decode_fn


def init_params(model: TransformerDo, rng: jax.Array):
  """Unboxed float32 parameters."""
  tokens = jnp.zeros((1, model.cfg.L), jnp.int32)
  return nn.unbox(model.init(rng, tokens)["params"])


def abstract_params(model: TransformerDo):
  """Parameter shapes and logical axes without allocating anything."""
  tokens = jax.ShapeDtypeStruct((1, model.cfg.L), jnp.int32)
  return jax.eval_shape(model.init, jax.random.key(0), tokens)["params"]
