"""Losses against float64 numpy re-computations."""
import jax.numpy as jnp
import numpy as np
import pytest

from avsiam_jax import losses


def _np_contrastive(a, v, tau, direction="symmetric"):
  a = a / np.linalg.norm(a, axis=1, keepdims=True)
  v = v / np.linalg.norm(v, axis=1, keepdims=True)
  s = a @ v.T / tau
  def ce(logits):  # rows are queries; the match is on the diagonal
    m = logits.max(1, keepdims=True)
    logp = logits - m - np.log(np.exp(logits - m).sum(1, keepdims=True))
    return -np.mean(np.diag(logp))
  if direction == "audio_to_video":  # Eq. 1: each audio's softmax over the videos
    return ce(s)
  return (ce(s) + ce(s.T)) / 2


def test_contrastive_matches_float64():
  rng = np.random.default_rng(0)
  a, v = rng.normal(size=(2, 24, 16))
  v = v + 2 * a  # some signal so the loss is far from log(B)
  got = float(losses.contrastive_loss(jnp.asarray(a, jnp.float32), jnp.asarray(v, jnp.float32), 0.05))
  want = _np_contrastive(a, v, 0.05)
  assert abs(got - want) < 1e-4 * max(1, abs(want))


def test_audio_to_video_contrastive_matches_float64():
  rng = np.random.default_rng(3)
  a, v = rng.normal(size=(2, 24, 16))
  v = v + 2 * a
  a[0] += 3 * v[1]  # audio 0 also near video 1: the two directions' losses differ
  a32, v32 = jnp.asarray(a, jnp.float32), jnp.asarray(v, jnp.float32)
  got = float(losses.contrastive_loss(a32, v32, 0.05, "audio_to_video"))
  want = _np_contrastive(a, v, 0.05, "audio_to_video")
  assert abs(got - want) < 1e-4 * max(1, abs(want))
  # Not the symmetric loss, nor the video -> audio direction.
  assert abs(want - _np_contrastive(a, v, 0.05)) > 1e-2
  assert abs(got - float(losses.contrastive_loss(v32, a32, 0.05, "audio_to_video"))) > 1e-2
  np.testing.assert_allclose(losses.contrastive_loss(a32, v32, 0.05, "symmetric"),
                             losses.contrastive_loss(a32, v32, 0.05), rtol=0)
  with pytest.raises(ValueError, match="contrastive direction"):
    losses.contrastive_loss(a32, v32, 0.05, "video_to_audio")


def test_contrastive_is_symmetric_and_scale_invariant():
  rng = np.random.default_rng(1)
  a, v = (jnp.asarray(x, jnp.float32) for x in rng.normal(size=(2, 8, 4)))
  np.testing.assert_allclose(losses.contrastive_loss(a, v, 0.1), losses.contrastive_loss(v, a, 0.1),
                             rtol=1e-6)
  np.testing.assert_allclose(losses.contrastive_loss(3 * a, v, 0.1),
                             losses.contrastive_loss(a, v, 0.1), rtol=1e-5)


def test_masked_mse_only_counts_masked_patches():
  rng = np.random.default_rng(2)
  pred, target = rng.normal(size=(2, 3, 5, 4))
  mask = (rng.uniform(size=(3, 5)) > 0.5).astype(np.float32)
  want = (((pred - target) ** 2).mean(-1) * mask).sum() / mask.sum()
  got = losses.masked_mse(jnp.asarray(pred), jnp.asarray(target), jnp.asarray(mask))
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_classification_losses_match_float64_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(6, 5)).astype(np.float32)
  labels = rng.uniform(size=(6, 5)).astype(np.float32)
  x, y = logits.astype(np.float64), labels.astype(np.float64)
  bce = np.mean(-(y * np.log(1 / (1 + np.exp(-x))) + (1 - y) * np.log(1 - 1 / (1 + np.exp(-x)))))
  np.testing.assert_allclose(losses.classification_loss(logits, labels, "bce"), bce, rtol=1e-5)
  logp = x - np.log(np.exp(x).sum(axis=1, keepdims=True))
  np.testing.assert_allclose(losses.classification_loss(logits, labels, "ce"),
                             np.mean(-(y * logp).sum(axis=1)), rtol=1e-5)
  with pytest.raises(ValueError, match="classification loss"):
    losses.classification_loss(logits, labels, "mse")
