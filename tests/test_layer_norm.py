"""layers.layer_norm (a closed-form backward pass) against JAX's own derivative of the plain
LayerNorm formula in float64, for float32 and bfloat16 inputs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from avsiam_jax.models import layers


def _plain(x, scale, bias, eps):
  mean = x.mean(-1, keepdims=True)
  var = jnp.square(x - mean).mean(-1, keepdims=True)
  return (x - mean) / jnp.sqrt(var + eps) * scale + bias


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_layer_norm_values_and_gradients_match_float64(dtype, tol):
  rng = np.random.default_rng(0)
  # Rows off-centre and of unequal spread, as a residual stream's are; (2, 5, 48): two leading
  # axes summed over for the scale's and bias's gradients.
  x = rng.normal(size=(2, 5, 48)) * rng.uniform(0.1, 5, size=(2, 5, 1)) + 3
  scale, bias, w = rng.normal(size=48), rng.normal(size=48), rng.normal(size=(2, 5, 48))
  xd = jnp.asarray(x, dtype)

  def loss(fn, x, scale, bias, w):
    return jnp.sum(fn(x, scale, bias, 1e-6).astype(w.dtype) * w)
  got_y = jax.jit(layers.layer_norm, static_argnums=3)(xd, scale.astype(np.float32),
                                                        bias.astype(np.float32), 1e-6)
  got = jax.jit(jax.grad(lambda *a: loss(layers.layer_norm, *a), argnums=(0, 1, 2)))(
      xd, jnp.asarray(scale, jnp.float32), jnp.asarray(bias, jnp.float32),
      jnp.asarray(w, jnp.float32))
  with jax.enable_x64():
    x64 = np.asarray(xd.astype(jnp.float32), np.float64)  # the same rounded input
    want_y = _plain(jnp.asarray(x64), scale, bias, 1e-6)
    want = jax.grad(lambda *a: loss(_plain, *a), argnums=(0, 1, 2))(
        jnp.asarray(x64), jnp.asarray(scale), jnp.asarray(bias), jnp.asarray(w))
    want_y, want = np.asarray(want_y), [np.asarray(g) for g in want]
  assert got_y.dtype == jnp.float32 and got[0].dtype == dtype
  np.testing.assert_allclose(got_y, want_y, rtol=0, atol=1e-5 * np.abs(want_y).max())
  for g, ref in zip(got, want):
    np.testing.assert_allclose(np.asarray(g, np.float32), ref, rtol=0,
                               atol=tol * np.abs(ref).max())
