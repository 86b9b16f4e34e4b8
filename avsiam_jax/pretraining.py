"""Pretraining update: multi-ratio contrastive loss plus masked reconstruction."""
from __future__ import annotations

import jax
import optax
from flax import nnx

from avsiam_jax import losses


def loss_names(config) -> tuple[str, ...]:
  """One optimizer state per entry: both losses together, or one per loss as released."""
  return ("contrastive", "reconstruction") if config.pretrain.separate_optimizers else ("total",)


def pretrain_losses(params, graphdef, batch, key, config, batch_shards: int, which: str):
  """which: 'total', 'contrastive' or 'reconstruction'. Returns (loss, parts)."""
  model = nnx.merge(graphdef, params)
  p = config.pretrain
  k_a, k_v, k_rec = jax.random.split(key, 3)
  parts = {}
  if which in ("total", "contrastive"):
    ratios = tuple(p.mask_ratios)
    fa = model.multi_ratio_features(batch["audio"], "a", k_a, ratios, batch_shards)
    fv = model.multi_ratio_features(batch["video"], "v", k_v, ratios, batch_shards)
    parts["contrastive"] = losses.contrastive_loss(fa, fv, p.tau)
  if which in ("total", "reconstruction"):
    parts["reconstruction"] = model.reconstruction_loss(
        batch["audio"], batch["video"], k_rec, mask_ratio=p.mae_mask_ratio,
        stop_gradient=p.mae_stop_gradient)
  return sum(parts.values()), parts


def train_step(state, batch, base_key, *, graphdef, tx, schedule, config, batch_shards):
  key = jax.random.fold_in(base_key, state["step"])
  params, opt, metrics = state["params"], dict(state["opt"]), {}
  for name in loss_names(config):
    # With separate optimizers the reconstruction step sees the contrastive update, as released.
    grad_fn = jax.value_and_grad(pretrain_losses, has_aux=True)
    (loss, parts), grads = grad_fn(params, graphdef, batch, key, config, batch_shards, name)
    updates, opt[name] = tx.update(grads, opt[name], params)
    params = optax.apply_updates(params, updates)
    metrics.update(parts)
    metrics[f"grad_norm_{name}"] = optax.tree.norm(grads)
  metrics["loss"] = sum(metrics[k] for k in ("contrastive", "reconstruction"))
  metrics["lr"] = schedule(state["step"])
  return {"params": params, "opt": opt, "step": state["step"] + 1}, metrics


def embed_step(params, batch, *, graphdef):
  """Unmasked pooled audio and video features (one frame per clip) for retrieval."""
  model = nnx.merge(graphdef, params)
  return model.features(batch["audio"], "a"), model.features(batch["video"], "v")
