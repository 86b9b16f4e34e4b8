"""Pretraining update: multi-ratio contrastive loss plus masked reconstruction."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from avsiam_jax import losses, masking


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


def check_accumulation(config, batch_shards: int) -> None:
  """Fails unless every (shard, ratio group) splits evenly into config.accum_steps micro-batches."""
  accum = config.accum_steps
  if not isinstance(accum, int) or accum < 1:
    raise ValueError(f"config.accum_steps must be a positive integer, got {accum!r}")
  groups = len(config.pretrain.mask_ratios)
  masking.check_groups(config.batch_size, groups, batch_shards)
  g = config.batch_size // batch_shards // groups
  if g % accum:
    raise ValueError(
        f"config.accum_steps {accum} does not divide the {g} examples of each mask-ratio group "
        f"on each data shard (batch {config.batch_size} / {batch_shards} shards / {groups} "
        "ratios); micro-batches must take equal parts of every group")


def accumulated_losses_and_grads(params, graphdef, batch, key, config, batch_shards: int,
                                 which: str):
  """((loss, parts), grads) of pretrain_losses, over config.accum_steps micro-batches.

  The masks are drawn for the full batch as pretrain_losses draws them; micro-batch m takes
  rows [m * r / M, (m + 1) * r / M) of each shard's r rows of every ratio group (contrastive)
  or of the batch (reconstruction). InfoNCE needs the whole batch's features: a forward-only
  pass collects them, the loss gives their gradients, and a second pass backpropagates each
  micro-batch's slice of those gradients. The reconstruction loss, normalized by a masked-patch
  count that is the same for every example, is the mean of the micro-batch losses.
  """
  accum, p = config.accum_steps, config.pretrain
  model = nnx.merge(graphdef, params)
  k_a, k_v, k_rec = jax.random.split(key, 3)
  b = batch["audio"].shape[0]
  micro = lambda x, m: masking.micro_rows(x, m, accum, batch_shards)
  steps = jnp.arange(accum)
  with_c = which in ("total", "contrastive")
  with_r = which in ("total", "reconstruction")
  inputs = {"a": batch["audio"], "v": batch["video"]}
  ratios = tuple(p.mask_ratios)
  parts = {}

  if with_c:
    masks = {mod: masking.multi_ratio_masks(k, b, model.num_tokens(mod), ratios, batch_shards)
             for mod, k in (("a", k_a), ("v", k_v))}

    def micro_features(params, m):
      """{modality: [(S * g / M, D) per group]} of micro-batch m."""
      model = nnx.merge(graphdef, params)
      out = {}
      for mod, (perm, noise) in masks.items():
        noise_m = tuple(None if z is None else micro(z, m) for z in noise)
        out[mod] = model.group_features(inputs[mod], mod, masking.micro_groups(perm, m, accum),
                                        noise_m, ratios)
      return out

    # Forward only: nothing is kept for a backward pass.
    _, feats = jax.lax.scan(lambda c, m: (c, micro_features(params, m)), None, steps)
    full = {mod: masking.untake_groups([masking.join_micro(f, batch_shards) for f in feats[mod]],
                                       masks[mod][0]) for mod in masks}
    parts["contrastive"], (dfa, dfv) = jax.value_and_grad(
        losses.contrastive_loss, argnums=(0, 1))(full["a"], full["v"], p.tau)
    # Feature gradients in group order, so micro-batch m's are micro(., m) of each group.
    d_groups = {mod: [masking.take_group(d, masks[mod][0], k) for k in range(len(ratios))]
                for mod, d in (("a", dfa), ("v", dfv))}

  if with_r:
    noise_rec = model.reconstruction_noise(k_rec, b)

  def micro_objective(params, m):
    """Its gradient is micro-batch m's share of the full batch's; aux: its reconstruction loss."""
    total, rec = 0.0, jnp.zeros((), jnp.float32)
    if with_c:
      feats = micro_features(params, m)
      for mod in feats:
        for f, d in zip(feats[mod], d_groups[mod]):
          total += jnp.vdot(f, micro(d, m))
    if with_r:
      model = nnx.merge(graphdef, params)
      rec = model.reconstruction_loss(
          micro(inputs["a"], m), micro(inputs["v"], m), None, mask_ratio=p.mae_mask_ratio,
          stop_gradient=p.mae_stop_gradient, noise={k: micro(z, m) for k, z in noise_rec.items()})
      total += rec / accum
    return total, rec

  def accumulate(grads, m):
    g, rec = jax.grad(micro_objective, has_aux=True)(params, m)
    return jax.tree.map(jnp.add, grads, g), rec

  grads, recs = jax.lax.scan(accumulate, jax.tree.map(jnp.zeros_like, params), steps)
  if with_r:
    parts["reconstruction"] = jnp.mean(recs)
  return (sum(parts.values()), parts), grads


def train_step(state, batch, base_key, *, graphdef, tx, schedule, config, batch_shards):
  key = jax.random.fold_in(base_key, state["step"])
  params, opt, metrics = state["params"], dict(state["opt"]), {}
  if config.accum_steps == 1:
    grad_fn = jax.value_and_grad(pretrain_losses, has_aux=True)
  else:
    grad_fn = accumulated_losses_and_grads
  for name in loss_names(config):
    # With separate optimizers the reconstruction step sees the contrastive update, as released.
    (loss, parts), grads = grad_fn(params, graphdef, batch, key, config, batch_shards, name)
    updates, opt[name] = tx.update(grads, opt[name], params)
    params = optax.apply_updates(params, updates)
    metrics.update(parts)
    metrics[f"grad_norm_{name}"] = optax.tree.norm(grads)
  metrics["loss"] = sum(metrics[k] for k in ("contrastive", "reconstruction"))
  metrics["lr"] = schedule(state["step"])
  return {"params": params, "opt": opt, "step": state["step"] + 1}, metrics


def eval_step(params, batch, *, graphdef, frame: int):
  """Unmasked pooled features, the video's from one of its frames, for zero-shot retrieval."""
  model = nnx.merge(graphdef, params)
  return {"feat_a": model.features(batch["audio"], "a"),
          "feat_v": model.features(batch["video"][:, frame], "v")}
