"""Finetuning: the mixed-modality update and the classifier's evaluation outputs."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from avsiam_jax.evaluators.classification import aggregate_frames

HEADS = ("head_a", "head_v", "head_av")
BRANCHES = ("audio-visual", "audio-only", "visual-only")


def classification_loss(logits_BxC, labels_BxC, kind: str):
  """'bce': sigmoid BCE averaged over classes and clips (AudioSet); 'ce': softmax CE (VGGSound)."""
  labels_BxC = labels_BxC.astype(jnp.float32)
  if kind == "bce":
    return optax.sigmoid_binary_cross_entropy(logits_BxC, labels_BxC).mean()
  if kind == "ce":
    # Soft targets, so mixup and label smoothing carry through.
    return optax.softmax_cross_entropy(logits_BxC, labels_BxC).mean()
  raise ValueError(f"config.finetune.loss must be 'bce' or 'ce', got {kind!r}")


def probabilities(logits, kind: str):
  return jax.nn.sigmoid(logits) if kind == "bce" else jax.nn.softmax(logits, axis=-1)


def lr_multipliers(params: dict, config) -> dict:
  """Per-parameter learning-rate factor: heads x head_lr_mult, multimodal blocks x mm_lr_mult."""
  f = config.finetune
  factor = {**{h: f.head_lr_mult for h in HEADS}, "mm_blocks": f.mm_lr_mult}
  return {k: jax.tree.map(lambda _, m=factor.get(k, 1.0): m, v) for k, v in params.items()}


def scale_by_multipliers(multipliers: dict) -> optax.GradientTransformation:
  # Adam's update is linear in the learning rate, so scaling it equals a per-group lr.
  return optax.stateless(lambda updates, params=None: jax.tree.map(
      lambda u, m: u * m, updates, multipliers))


def branch_index(key, modality_mix):
  """0 audio-visual, 1 audio-only, 2 visual-only, drawn with probabilities modality_mix."""
  return jnp.searchsorted(jnp.cumsum(jnp.asarray(modality_mix[:2])), jax.random.uniform(key),
                          side="right")


def finetune_loss(params, graphdef, batch, branch, kind: str):
  model = nnx.merge(graphdef, params)
  audio, video = batch["audio"], batch["video"]
  logits = jax.lax.switch(branch, [lambda: model(audio, video), lambda: model(audio, None),
                                   lambda: model(None, video)])
  return classification_loss(logits, batch["labels"], kind)


def train_step(state, batch, base_key, *, graphdef, tx, schedule, config):
  branch = branch_index(jax.random.fold_in(base_key, state["step"]), config.finetune.modality_mix)
  loss, grads = jax.value_and_grad(finetune_loss)(state["params"], graphdef, batch, branch,
                                                  config.finetune.loss)
  updates, opt = tx.update(grads, state["opt"]["total"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  metrics = {"loss": loss, "branch": branch, "grad_norm": optax.tree.norm(grads),
             "lr": schedule(state["step"])}
  return {"params": params, "opt": {"total": opt}, "step": state["step"] + 1}, metrics


def classifier_eval_step(params, batch, *, graphdef, kind: str, frame: int):
  """Clip probabilities per input (frames aggregated) and the retrieval features."""
  model = nnx.merge(graphdef, params)
  logits, feats = model.clip_outputs(batch["audio"], batch["video"])
  return {"probs_a": probabilities(logits["a"], kind),
          "probs_v": aggregate_frames(probabilities(logits["v"], kind)),
          "probs_av": aggregate_frames(probabilities(logits["av"], kind)),
          "feat_a": feats["a"], "feat_v": feats["v"][:, frame]}
