"""Training losses: contrastive and reconstruction (pretraining), classification (finetuning)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

# Classification losses by name: 'bce' sigmoid (multi-label, AudioSet), 'ce' softmax
# (single-label, VGGSound).
CLASSIFICATION_LOSSES = ("bce", "ce")
# InfoNCE directions: 'symmetric' (the release: the mean of audio->video and video->audio) or
# 'audio_to_video' (the paper's Eq. 1: each audio against every video).
CONTRASTIVE_DIRECTIONS = ("symmetric", "audio_to_video")
# Evaluation scores: 'loss' (those the loss trains, `probabilities`) or 'sigmoid' for every
# loss (the release's evaluation, also for its cross-entropy runs).
EVAL_SCORES = ("loss", "sigmoid")


def l2_normalize(x, eps: float = 1e-12):
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps))


def contrastive_loss(audio_BxD, video_BxD, tau: float, direction: str = "symmetric"):
  """InfoNCE on cosine similarity / tau; negatives are the rest of the (global) batch.

  direction (CONTRASTIVE_DIRECTIONS): 'symmetric', the mean of both directions, or
  'audio_to_video', each audio's softmax over the videos only.
  """
  if direction not in CONTRASTIVE_DIRECTIONS:
    raise ValueError(f"contrastive direction must be one of {CONTRASTIVE_DIRECTIONS}, got "
                     f"{direction!r}")
  a = l2_normalize(audio_BxD.astype(jnp.float32))
  v = l2_normalize(video_BxD.astype(jnp.float32))
  logits = a @ v.T / tau
  a2v = -jnp.mean(jnp.diagonal(jax.nn.log_softmax(logits, axis=1)))
  if direction == "audio_to_video":
    return a2v
  v2a = -jnp.mean(jnp.diagonal(jax.nn.log_softmax(logits, axis=0)))
  return (a2v + v2a) / 2


def masked_mse(pred_BxNxP, target_BxNxP, mask_BxN):
  """Per-patch MSE averaged over masked patches only."""
  per_patch = jnp.mean(jnp.square(pred_BxNxP.astype(jnp.float32) - target_BxNxP), axis=-1)
  return jnp.sum(per_patch * mask_BxN) / jnp.maximum(jnp.sum(mask_BxN), 1.0)


def classification_losses(logits_BxC, labels_BxC, kind: str):
  """Per-clip losses (B,): 'bce' sigmoid BCE averaged over classes; 'ce' softmax cross-entropy."""
  labels_BxC = labels_BxC.astype(jnp.float32)
  if kind == "bce":
    return optax.sigmoid_binary_cross_entropy(logits_BxC, labels_BxC).mean(axis=-1)
  if kind == "ce":
    # Soft targets, so mixup and label smoothing carry through.
    return optax.softmax_cross_entropy(logits_BxC, labels_BxC)
  raise ValueError(f"classification loss must be one of {CLASSIFICATION_LOSSES}, got {kind!r}")


def classification_loss(logits_BxC, labels_BxC, kind: str):
  """The mean over clips of `classification_losses`."""
  return classification_losses(logits_BxC, labels_BxC, kind).mean()


def probabilities(logits, kind: str):
  """The scores a classification loss trains: sigmoid ('bce') or softmax ('ce')."""
  return jax.nn.sigmoid(logits) if kind == "bce" else jax.nn.softmax(logits, axis=-1)


def eval_probabilities(logits, kind: str, scores: str = "loss"):
  """Evaluation scores (EVAL_SCORES): the loss's (`probabilities`) or a sigmoid for any loss."""
  if scores not in EVAL_SCORES:
    raise ValueError(f"evaluation scores must be one of {EVAL_SCORES}, got {scores!r}")
  return jax.nn.sigmoid(logits) if scores == "sigmoid" else probabilities(logits, kind)
