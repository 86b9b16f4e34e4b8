"""Attention implementations against a float64 numpy softmax attention, and their selection."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from avsiam_jax.config import ConfigError, parse
from avsiam_jax.models import layers
from configs import demo


def _numpy_attention(q, k, v):
  q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
  logits = q @ np.swapaxes(k, -1, -2) / np.sqrt(q.shape[-1])
  p = np.exp(logits - logits.max(-1, keepdims=True))
  return (p / p.sum(-1, keepdims=True)) @ v


def _qkv(b, h, l, k, seed=0):
  rng = np.random.default_rng(seed)
  # Scaled so that some scores are large: the softmax is far from uniform.
  return tuple(jnp.asarray(rng.normal(size=(b, h, l, k)) * 2, jnp.float32) for _ in range(3))


# (4, 3, 600, 16): 600 x 600 scores per head, so chunks of 2 of the 12 (batch, head) pairs (six
# loop steps); (1, 5, 7, 8): one chunk of all five.
@pytest.mark.parametrize("shape", [(4, 3, 600, 16), (1, 5, 7, 8)])
@pytest.mark.parametrize("impl", ["dense", "chunked"])
def test_attention_matches_float64(impl, shape):
  q, k, v = _qkv(*shape)
  y = jax.jit(layers.ATTENTION[impl])(q, k, v)
  np.testing.assert_allclose(y, _numpy_attention(q, k, v), rtol=1e-5, atol=1e-5)


def test_chunked_gradients_match_jax_attention():
  """Gradients of chunked (recomputed per chunk) and dense attention against JAX's own."""
  q, k, v = _qkv(4, 3, 600, 16, seed=1)
  w = jnp.asarray(np.random.default_rng(2).normal(size=q.shape), jnp.float32)
  swap = lambda t: jnp.swapaxes(t, 1, 2)
  fns = {"jax": lambda q, k, v: swap(jax.nn.dot_product_attention(swap(q), swap(k), swap(v))),
         "dense": layers.dense_attention, "chunked": layers.chunked_attention}
  grads = {name: jax.jit(jax.grad(lambda q, k, v: jnp.sum(f(q, k, v) * w), argnums=(0, 1, 2)))(
      q, k, v) for name, f in fns.items()}
  for name in ("dense", "chunked"):
    for g, ref in zip(grads[name], grads["jax"]):
      np.testing.assert_allclose(g, ref, rtol=1e-5, atol=1e-5 * float(jnp.abs(ref).max()))


def test_chunked_attention_loops_over_chunks():
  q, k, v = _qkv(4, 3, 600, 16)
  jaxpr = jax.make_jaxpr(layers.chunked_attention)(q, k, v).jaxpr
  loops = [e for e in jaxpr.eqns if e.primitive.name == "scan"]
  assert len(loops) == 1 and loops[0].params["length"] == 6


@pytest.mark.parametrize("platform,dtype,want", [
    ("cpu", jnp.float32, "chunked"), ("cpu", jnp.bfloat16, "chunked"),
    ("gpu", jnp.bfloat16, "cudnn"), ("gpu", jnp.float32, "dense"),
    ("tpu", jnp.bfloat16, "dense")])
def test_auto_attention_per_platform(platform, dtype, want):
  assert layers.resolve_attention("auto", platform, dtype) == want
  assert layers.resolve_attention("dense", platform, dtype) == "dense"


def test_config_resolves_attention():
  c = demo.get_config()
  assert parse(c, 1, platform="cpu").model.encoder.attention == "chunked"
  assert parse(c, 1, platform="tpu").model.encoder.attention == "dense"
  c.model.attention = "flash"
  with pytest.raises(ConfigError, match="config.model: attention must be one of"):
    parse(c, 1)


def _numpy_masked_attention(q, k, v, allowed):
  q, k, v = (np.asarray(jnp.asarray(t, jnp.float32), np.float64) for t in (q, k, v))
  logits = np.where(allowed[:, None], q @ np.swapaxes(k, -1, -2) / np.sqrt(q.shape[-1]), -np.inf)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  return (p / p.sum(-1, keepdims=True)) @ v


@pytest.mark.parametrize("masked", [False, True])
def test_bfloat16_dense_attention_against_float64(masked):
  """16-bit dense attention (TPU's) stores its shifted scores in 16 bits: still within two
  bfloat16 steps of the output's scale from float64 on the same rounded inputs, with large
  scores (std about 16), whole rows or two segments per row. Scores rounded to 16 bits before
  the shift miss this by about 8x."""
  rng = np.random.default_rng(3)
  q, k = (jnp.asarray(rng.normal(size=(2, 4, 256, 64)) * 4, jnp.bfloat16) for _ in range(2))
  v = jnp.asarray(rng.normal(size=(2, 4, 256, 64)), jnp.bfloat16)
  ids = np.repeat([0, 1], [100, 156])
  allowed = np.broadcast_to(ids[:, None] == ids[None, :] if masked else True, (2, 256, 256))
  y = jax.jit(layers.dense_attention)(q, k, v, jnp.asarray(allowed))
  want = _numpy_masked_attention(q, k, v, allowed)
  assert y.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(y, np.float32), want, rtol=0,
                             atol=2 * 2 ** -8 * np.abs(want).max())
