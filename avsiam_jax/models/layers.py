"""Small NNX layers with logical-axis annotations and an explicit compute dtype.

Parameters are float32 and carry logical axis names (`embed`, `mlp`, `heads`, ...); the mesh
rules in the config map those names to mesh axes, so no model code mentions devices.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from avsiam_jax import packing

Dtype = jnp.dtype

xavier = nnx.initializers.xavier_uniform()
zeros = nnx.initializers.zeros_init()
ones = nnx.initializers.ones_init()


def param(rngs: nnx.Rngs, init, shape, axes) -> nnx.Param:
  return nnx.Param(init(rngs.params(), shape, jnp.float32), logical_axes=axes)


# How activations are pinned to the mesh: set by sharding.with_activation_rules while a step is
# traced; unset (a model called outside a trainer step) the constraints are no-ops.
_CONSTRAIN = contextvars.ContextVar("constrain", default=None)


@contextlib.contextmanager
def constraining(fn):
  """Within: constrain(x, axes) calls fn(x, axes)."""
  token = _CONSTRAIN.set(fn)
  try:
    yield
  finally:
    _CONSTRAIN.reset(token)


def constrain(x, axes: tuple):
  """x with its logical activation axes ("batch", "tokens", "heads", "mlp", ...) kept where the
  mesh rules put them, so the partitioner moves weights rather than activations."""
  fn = _CONSTRAIN.get()
  return x if fn is None else fn(x, axes)


# Block boundaries: examples over the batch axes, the rest whole on each device.
TOKENS = ("batch", "tokens", "act_embed")
ROWS = ("batch", "act_embed")  # the same, batch and tokens flattened (batch-major)


def mean_pool(x_BxNxD):
  """Mean over tokens in float32 (B, D): every pooled feature, whatever the compute dtype."""
  return x_BxNxD.astype(jnp.float32).mean(axis=1)


class LayerNorm(nnx.Module):
  """LayerNorm computed in float32 whatever the compute dtype (bf16 variance is too coarse)."""

  def __init__(self, dim: int, *, eps: float, rngs: nnx.Rngs, dtype: Dtype = jnp.float32):
    self.scale = param(rngs, ones, (dim,), ("embed",))
    self.bias = param(rngs, zeros, (dim,), ("embed",))
    self.eps = eps
    self.dtype = dtype

  def __call__(self, x):
    return layer_norm(x, self.scale[...], self.bias[...], self.eps).astype(self.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x, scale, bias, eps: float):
  """LayerNorm over the last axis, in float32 (the result too). Its backward pass is the closed
  form from x and the saved row statistics: the same gradients as differentiating the forward,
  and the Base step 1.04x faster on a CPU (docs/benchmarks.md, "LayerNorm backward")."""
  return _layer_norm_fwd(x, scale, bias, eps)[0]


def _layer_norm_fwd(x, scale, bias, eps):
  x32 = x.astype(jnp.float32)
  mean = x32.mean(-1, keepdims=True)
  inv = jax.lax.rsqrt(jnp.square(x32 - mean).mean(-1, keepdims=True) + eps)
  return (x32 - mean) * inv * scale + bias, (x, mean, inv, scale)


def _layer_norm_bwd(eps, res, g):
  del eps
  x, mean, inv, scale = res
  xhat = (x.astype(jnp.float32) - mean) * inv
  gs = g * scale
  dx = inv * (gs - gs.mean(-1, keepdims=True) - xhat * (gs * xhat).mean(-1, keepdims=True))
  rows = tuple(range(x.ndim - 1))
  return dx.astype(x.dtype), (g * xhat).sum(rows), g.sum(rows)


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


class Dense(nnx.Module):
  def __init__(self, din: int, dout: int, *, axes: tuple, rngs: nnx.Rngs,
               dtype: Dtype = jnp.float32, kernel_init=xavier):
    self.kernel = param(rngs, kernel_init, (din, dout), axes)
    self.bias = param(rngs, zeros, (dout,), axes[1:])
    self.dtype = dtype

  def __call__(self, x):
    return x.astype(self.dtype) @ self.kernel[...].astype(self.dtype) + self.bias[...].astype(self.dtype)


class Attention(nnx.Module):
  """Multi-head self-attention; q/k/v kernels kept as (D, 3, heads, head_dim) so heads shard.

  `impl` is one of ATTENTION_IMPLS (resolved, not "auto"); all compute the same function.
  """

  def __init__(self, dim: int, heads: int, *, rngs: nnx.Rngs, dtype: Dtype = jnp.float32,
               impl: str = "dense"):
    if dim % heads:
      raise ValueError(f"width {dim} is not divisible by {heads} heads")
    hd = dim // heads
    # Xavier over the fused (D, 3D) matrix, as timm/vit_jax initialize it.
    qkv = xavier(rngs.params(), (dim, 3 * dim), jnp.float32).reshape(dim, 3, heads, hd)
    self.qkv = nnx.Param(qkv, logical_axes=("embed", None, "heads", "head_dim"))
    self.qkv_bias = param(rngs, zeros, (3, heads, hd), (None, "heads", "head_dim"))
    out = xavier(rngs.params(), (dim, dim), jnp.float32).reshape(heads, hd, dim)
    self.out = nnx.Param(out, logical_axes=("heads", "head_dim", "embed"))
    self.out_bias = param(rngs, zeros, (dim,), ("embed",))
    self.dtype = dtype
    self.impl = impl

  def __call__(self, x_BxLxD, segments=None):
    """segments: None, or packed rows' packing.Segments: each segment attends only to itself."""
    dt = self.dtype
    qkv = jnp.einsum("bld,dthk->tbhlk", x_BxLxD.astype(dt), self.qkv[...].astype(dt))
    qkv = constrain(qkv + self.qkv_bias[...].astype(dt)[:, None, :, None],
                    (None, "batch", "heads", "tokens", "head_dim"))
    y = segmented_attention(ATTENTION[self.impl], qkv[0], qkv[1], qkv[2], segments)
    return jnp.einsum("bhlk,hkd->bld", y, self.out[...].astype(dt)) + self.out_bias[...].astype(dt)


def dense_attention(q_BxHxLxK, k_BxHxSxK, v_BxHxSxK, allowed_BxLxS=None):
  """Softmax attention in (batch, heads, tokens, head_dim) layout, float32 logits and softmax
  (16-bit inputs: the scores stored in 16 bits after their shift, see below);
  allowed_BxLxS: where a query may attend (None: everywhere; every query at least itself).

  Both products are batched over (b, h) with the scores' rows contiguous, and the softmax is
  normalized after the product with v (one pass less over the (L, S) scores, none stored
  normalized); jax.nn.dot_product_attention's XLA path transposes the scores instead.
  """
  q = q_BxHxLxK * jnp.asarray(q_BxHxLxK.shape[-1] ** -0.5, q_BxHxLxK.dtype)
  logits = jnp.einsum("bhlk,bhsk->bhls", q, k_BxHxSxK, preferred_element_type=jnp.float32)
  mask = (lambda t: t) if allowed_BxLxS is None else (
      lambda t: jnp.where(allowed_BxLxS[:, None], t, -jnp.inf))
  logits = mask(logits)
  # The max only keeps exp in range; the result does not depend on it.
  if jnp.dtype(q.dtype).itemsize == 2:
    # 16-bit inputs: the max from a 16-bit product, and the shifted scores rounded to 16 bits,
    # so what is stored between the products is half the bytes. Rounding after the shift
    # keeps the large scores (near 0) exact; exp of the coarse ones is small.
    m = mask(jnp.einsum("bhlk,bhsk->bhls", q, k_BxHxSxK)).max(-1, keepdims=True)
    shifted = (logits - jax.lax.stop_gradient(m.astype(jnp.float32))).astype(q.dtype)
    e = jnp.exp(shifted.astype(jnp.float32)).astype(v_BxHxSxK.dtype)
  else:
    e = jnp.exp(logits - jax.lax.stop_gradient(logits.max(-1, keepdims=True)))
  y = jnp.einsum("bhls,bhsk->bhlk", e.astype(v_BxHxSxK.dtype), v_BxHxSxK,
                 preferred_element_type=jnp.float32)
  total = e.astype(jnp.float32).sum(-1, keepdims=True)
  return (y / total).astype(v_BxHxSxK.dtype)


# Scores per chunk of (batch, head) pairs in chunked attention: 4 MiB of float32 stays in a
# CPU's caches through the softmax and both products (benchmarks/attention.py).
CHUNK_SCORES = 2 ** 20


def chunked_attention(q_BxHxLxK, k_BxHxSxK, v_BxHxSxK):
  """dense_attention over chunks of (batch, head) pairs in a loop, each recomputed in the
  backward pass: the (L, S) scores never leave the cache and are never stored (CPU)."""
  b, h, l, d = q_BxHxLxK.shape
  s, n = k_BxHxSxK.shape[2], b * h
  c = max(c for c in range(1, n + 1) if n % c == 0 and (c == 1 or c * l * s <= CHUNK_SCORES))
  if c == n:  # all scores fit at once: nothing to loop over or recompute
    return dense_attention(q_BxHxLxK, k_BxHxSxK, v_BxHxSxK)
  chunk = lambda t: t.reshape(n // c, c, 1, *t.shape[2:])
  run = jax.checkpoint(lambda qkv: dense_attention(*qkv))
  y = jax.lax.map(run, (chunk(q_BxHxLxK), chunk(k_BxHxSxK), chunk(v_BxHxSxK)))
  return y.reshape(b, h, l, y.shape[-1])


def cudnn_attention(q_BxHxLxK, k_BxHxSxK, v_BxHxSxK):
  """cuDNN's fused kernel (NVIDIA GPUs, 16-bit inputs)."""
  swap = lambda t: jnp.swapaxes(t, 1, 2)
  y = jax.nn.dot_product_attention(swap(q_BxHxLxK), swap(k_BxHxSxK), swap(v_BxHxSxK),
                                   implementation="cudnn")
  return swap(y)


def segmented_attention(attention, q_BxHxLxK, k_BxHxLxK, v_BxHxLxK, segments=None):
  """`attention` within every segment of packed rows (packing.Segments): no example sees
  another or the padding, whose outputs are never used.

  dense (auto's choice on TPU) masks each whole row: fewer, larger products, which XLA's TPU
  compiler builds and runs faster than one slice per segment, for a few more FLOPs
  (docs/benchmarks.md, TPU plan). chunked (one CPU) and cudnn slice each segment out: on a CPU
  the masked scores cost more than the many small products.
  """
  if segments is None:
    return attention(q_BxHxLxK, k_BxHxLxK, v_BxHxLxK)
  if attention is dense_attention:
    ids_BxL = packing.segment_ids(segments)
    return dense_attention(q_BxHxLxK, k_BxHxLxK, v_BxHxLxK,
                           ids_BxL[:, :, None] == ids_BxL[:, None, :])
  cut = [packing.cut(t, segments, axis=2) for t in (q_BxHxLxK, k_BxHxLxK, v_BxHxLxK)]
  return packing.join([attention(*qkv) for qkv in zip(*cut)], segments, axis=2)


ATTENTION = {"dense": dense_attention, "chunked": chunked_attention, "cudnn": cudnn_attention}
# config.model.attention: "auto" picks per platform (resolve_attention) or one of ATTENTION.
ATTENTION_IMPLS = ("auto",) + tuple(ATTENTION)


def resolve_attention(name: str, platform: str, dtype, num_devices: int = 1) -> str:
  """The attention implementation for `platform` ("cpu", "gpu", "tpu"), compute dtype and
  device count: chunked loops over merged (batch, head) pairs, which the partitioner cannot
  split over devices, so it is the choice of one CPU device only."""
  if name not in ATTENTION_IMPLS:
    raise ValueError(f"attention must be one of {ATTENTION_IMPLS}, got {name!r}")
  if name != "auto":
    return name
  if platform == "cpu" and num_devices == 1:
    return "chunked"
  if platform in ("gpu", "cuda") and jnp.dtype(dtype).itemsize == 2:
    return "cudnn"
  return "dense"


class Mlp(nnx.Module):
  def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs, dtype: Dtype = jnp.float32):
    self.fc1 = Dense(dim, hidden, axes=("embed", "mlp"), rngs=rngs, dtype=dtype)
    self.fc2 = Dense(hidden, dim, axes=("mlp", "embed"), rngs=rngs, dtype=dtype)

  def __call__(self, x_RxD):
    """Token rows (R, D), as the blocks hold them."""
    # Exact (erf) GELU, as the pretrained ViTs were trained with.
    h = constrain(self.fc1(x_RxD), ("batch", "mlp"))
    return self.fc2(jax.nn.gelu(h, approximate=False))


# Activation rematerialization of a block in the backward pass: "none" keeps its activations,
# "dots" keeps only the weight matmuls' outputs (recomputes norms, GELU, attention), "full"
# keeps only its input and recomputes everything.
REMAT_POLICIES = ("none", "dots", "full")


def remat_policy(remat) -> str:
  """config.model.remat as a policy name; False/True are "none"/"full"."""
  if remat is None or remat is False:
    return "none"
  if remat is True:
    return "full"
  if remat not in REMAT_POLICIES:
    raise ValueError(f"remat must be one of {REMAT_POLICIES} (or a bool), got {remat!r}")
  return remat


def checkpointed(fn, remat: str):
  """`fn` under jax.checkpoint with the named policy ("none": fn itself)."""
  if remat == "none":
    return fn
  policy = (jax.checkpoint_policies.dots_with_no_batch_dims_saveable if remat == "dots"
            else None)
  return jax.checkpoint(fn, policy=policy)


class Block(nnx.Module):
  """Pre-norm transformer block whose LayerNorms may differ per input stream.

  `streams` names the norm sets, e.g. ("a", "v") for per-modality norms in the shared encoder
  or ("x",) for a single set; attention and MLP weights are always shared.
  With `remat` ("dots" or "full", see REMAT_POLICIES), the backward pass recomputes the block's
  activations from its input instead of keeping them: less memory for up to one more forward
  pass of compute.
  """

  def __init__(self, dim: int, heads: int, mlp: int, *, streams: tuple[str, ...], eps: float,
               rngs: nnx.Rngs, dtype: Dtype = jnp.float32, remat="none", attention="dense"):
    self.norm1 = nnx.Dict({s: LayerNorm(dim, eps=eps, rngs=rngs, dtype=dtype) for s in streams})
    self.attn = Attention(dim, heads, rngs=rngs, dtype=dtype, impl=attention)
    self.norm2 = nnx.Dict({s: LayerNorm(dim, eps=eps, rngs=rngs, dtype=dtype) for s in streams})
    self.mlp = Mlp(dim, mlp, rngs=rngs, dtype=dtype)
    self.remat = remat_policy(remat)

  def forward(self, x_RxD, batch: int, stream: str, segments=None):
    """The block over token rows (batch * tokens, D): the residual stream, norms and MLP
    stay 2-D from block to block (on a CPU, XLA fuses the backward pass's residual sums
    better than with a reshape at every matmul: benchmarks/step_profile.py); attention sees
    (batch, tokens, D)."""
    d = x_RxD.shape[-1]
    y = self.attn(self.norm1[stream](x_RxD).reshape(batch, -1, d), segments)
    x_RxD = constrain(x_RxD + y.reshape(-1, d), ROWS)
    return constrain(x_RxD + self.mlp(self.norm2[stream](x_RxD)), ROWS)

  def rows(self, x_RxD, batch: int, stream: str, segments=None):
    """forward under the block's remat policy."""
    if self.remat == "none":
      return self.forward(x_RxD, batch, stream, segments)
    # A pure function of (weights, input) so jax.checkpoint sees every weight as an input and
    # saves nothing but them and x; the block only reads its weights, so nothing is written back.
    graphdef, state = nnx.split(self)

    def run(state, x):
      return nnx.merge(graphdef, state).forward(x, batch, stream, segments)
    return checkpointed(run, self.remat)(state, x_RxD)

  def __call__(self, x_BxNxD, stream: str, segments=None):
    b, n, d = x_BxNxD.shape
    return self.rows(x_BxNxD.reshape(b * n, d), b, stream, segments).reshape(b, n, d)


@jax.custom_vjp
def grad_boundary(x):
  """x; in the backward pass its gradient goes through a loop of one trip whose count XLA
  cannot read, so it is materialized there once. XLA's CPU fusion otherwise recomputes the
  residual stream's gradient sum of all later blocks inside every consumer (O(depth^2) work:
  benchmarks/step_profile.py, "norms"). The gradient is unchanged (multiplied by exactly 1)."""
  return x


def _grad_boundary_fwd(x):
  return x, None


def _grad_boundary_bwd(_, g):
  one = jnp.maximum((g.reshape(-1)[0] != 0).astype(jnp.int32), 1)  # always 1, read at run time
  return (jax.lax.fori_loop(0, one, lambda i, c: c * one.astype(c.dtype), g),)


grad_boundary.defvjp(_grad_boundary_fwd, _grad_boundary_bwd)


def run_blocks(blocks, x_BxNxD, stream: str, *, scan: bool = False, segments=None,
               grad_boundaries: bool = False):
  """x through `blocks` in order: unrolled, or as one jax.lax.scan over their stacked weights.

  The scan compiles one block body instead of len(blocks): the parameters keep their per-block
  layout (checkpoints and converters are unchanged) and are stacked inside the step, which
  costs a copy of the blocks' weights per call. Numerically the same computation.
  segments: None or packed rows' packing.Segments; attention stays within each segment.
  grad_boundaries: unrolled, each block's input passes grad_boundary (CPU: see there).
  """
  b, n, d = x_BxNxD.shape
  x = constrain(x_BxNxD.reshape(b * n, d), ROWS)
  if not scan or len(blocks) < 2:
    for block in blocks:
      x = block.rows(grad_boundary(x) if grad_boundaries else x, b, stream, segments)
    return x.reshape(b, n, d)
  graphdef, _ = nnx.split(blocks[0])
  stacked = jax.tree.map(lambda *ws: jnp.stack(ws), *(nnx.split(blk)[1] for blk in blocks))

  def body(x, state):
    return nnx.merge(graphdef, state).forward(x, b, stream, segments), None
  return jax.lax.scan(checkpointed(body, blocks[0].remat), x, stacked)[0].reshape(b, n, d)
