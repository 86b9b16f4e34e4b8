"""Training losses: contrastive and reconstruction (pretraining), classification (finetuning)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

# Classification losses by name: 'bce' sigmoid (multi-label, AudioSet), 'ce' softmax
# (single-label, VGGSound).
CLASSIFICATION_LOSSES = ("bce", "ce")


def l2_normalize(x, eps: float = 1e-12):
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps))


def contrastive_loss(audio_BxD, video_BxD, tau: float):
  """Symmetric InfoNCE on cosine similarity / tau; negatives are the rest of the (global) batch."""
  a = l2_normalize(audio_BxD.astype(jnp.float32))
  v = l2_normalize(video_BxD.astype(jnp.float32))
  logits = a @ v.T / tau
  a2v = -jnp.mean(jnp.diagonal(jax.nn.log_softmax(logits, axis=1)))
  v2a = -jnp.mean(jnp.diagonal(jax.nn.log_softmax(logits, axis=0)))
  return (a2v + v2a) / 2


def masked_mse(pred_BxNxP, target_BxNxP, mask_BxN):
  """Per-patch MSE averaged over masked patches only."""
  per_patch = jnp.mean(jnp.square(pred_BxNxP.astype(jnp.float32) - target_BxNxP), axis=-1)
  return jnp.sum(per_patch * mask_BxN) / jnp.maximum(jnp.sum(mask_BxN), 1.0)


def classification_loss(logits_BxC, labels_BxC, kind: str):
  """'bce': sigmoid BCE averaged over classes and clips; 'ce': softmax cross-entropy."""
  labels_BxC = labels_BxC.astype(jnp.float32)
  if kind == "bce":
    return optax.sigmoid_binary_cross_entropy(logits_BxC, labels_BxC).mean()
  if kind == "ce":
    # Soft targets, so mixup and label smoothing carry through.
    return optax.softmax_cross_entropy(logits_BxC, labels_BxC).mean()
  raise ValueError(f"classification loss must be one of {CLASSIFICATION_LOSSES}, got {kind!r}")


def probabilities(logits, kind: str):
  """The scores a classification loss trains: sigmoid ('bce') or softmax ('ce')."""
  return jax.nn.sigmoid(logits) if kind == "bce" else jax.nn.softmax(logits, axis=-1)
