"""Pretraining: the multi-ratio contrastive loss plus masked reconstruction, as a trainer task.

The batch layout lives here, not in the model: examples are split into mask-ratio groups inside
each of `batch_shards` data shards (masking.py), and gradient accumulation takes equal rows of
every group. The model only embeds, encodes and pools.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from avsiam_jax import losses, masking, optim, packing
from avsiam_jax.config import PretrainSpec, RunSpec
from avsiam_jax.data import pipeline
from avsiam_jax.models.avsiam import AVSiam
from avsiam_jax.weights import load


# The parameter subtrees the contrastive loss reaches (AVSep: the audio encoder too).
ENCODERS = ("encoder", "audio_encoder")


def group_features(model, x, modality: str, perm_SxGxg, noise, ratios: Sequence[float], *,
                   pack: bool, tokens=None):
  """Pooled features per ratio group, [(S * g, D)] in take_group order.

  perm and noise as from masking.multi_ratio_masks, or one micro-batch's rows of them. `tokens`:
  model.embed(x) of the full batch, so each group gathers its tokens; None: each group embeds
  only its own rows of x (a micro-batch). pack: one encoder call over the groups packed into
  rows (packing.py) instead of one call per group; the same features.
  """
  n = model.num_tokens(modality)
  kept = []
  for k, ratio in enumerate(ratios):
    if tokens is not None:
      group = masking.take_group(tokens, perm_SxGxg, k)
    else:
      group = model.embed(masking.take_group(x, perm_SxGxg, k), modality)
    if noise[k] is not None:
      group, _, _ = masking.keep_by_noise(noise[k], group, masking.kept_count(n, ratio))
    kept.append(group)
  if not pack:
    return [model.pool(model.encode(group, modality)) for group in kept]
  shards, _, g = perm_SxGxg.shape
  plan = packing.make_plan([t.shape[1] for t in kept], g)
  rows = model.encode(packing.pack(kept, plan, shards), modality,
                      packing.segments(plan, shards))
  return packing.pooled_groups(rows, plan, shards)


def multi_ratio_features(model, x, modality: str, key, ratios: Sequence[float],
                         batch_shards: int, pack: bool):
  """Pooled features (B, D) of the whole batch, each ratio group masked at its own ratio."""
  perm, noise = masking.multi_ratio_masks(key, x.shape[0], model.num_tokens(modality), ratios,
                                          batch_shards)
  groups = group_features(model, x, modality, perm, noise, ratios, pack=pack,
                          tokens=model.embed(x, modality))
  return masking.untake_groups(groups, perm)


def pretrain_losses(params, graphdef, batch, key, p: PretrainSpec, which: str):
  """which: 'total', 'contrastive' or 'reconstruction'. Returns (loss, parts)."""
  model = nnx.merge(graphdef, params)
  k_a, k_v, k_rec = jax.random.split(key, 3)
  parts = {}
  if which in ("total", "contrastive"):
    fa = multi_ratio_features(model, batch["audio"], "a", k_a, p.mask_ratios, p.batch_shards,
                              p.pack_groups)
    fv = multi_ratio_features(model, batch["video"], "v", k_v, p.mask_ratios, p.batch_shards,
                              p.pack_groups)
    parts["contrastive"] = losses.contrastive_loss(fa, fv, p.tau, p.contrastive)
  if which in ("total", "reconstruction"):
    parts["reconstruction"] = model.reconstruction_loss(
        batch["audio"], batch["video"], k_rec, mask_ratio=p.mae_mask_ratio,
        stop_gradient=p.mae_stop_gradient)
  return sum(parts.values()), parts


def accumulated_losses_and_grads(params, graphdef, batch, key, p: PretrainSpec, which: str):
  """((loss, parts), grads) of pretrain_losses, over p.accum_steps micro-batches.

  The masks are drawn for the full batch as pretrain_losses draws them; micro-batch m takes
  rows [m * r / M, (m + 1) * r / M) of each shard's r rows of every ratio group (contrastive)
  or of the batch (reconstruction). InfoNCE needs the whole batch's features: a forward-only
  pass collects them, the loss gives their gradients, and a second pass backpropagates each
  micro-batch's slice of those gradients. The reconstruction loss, normalized by a masked-patch
  count that is the same for every example, is the mean of the micro-batch losses.
  """
  accum, batch_shards = p.accum_steps, p.batch_shards
  model = nnx.merge(graphdef, params)
  k_a, k_v, k_rec = jax.random.split(key, 3)
  b = batch["audio"].shape[0]
  micro = lambda x, m: masking.micro_rows(x, m, accum, batch_shards)
  steps = jnp.arange(accum)
  with_c = which in ("total", "contrastive")
  with_r = which in ("total", "reconstruction")
  inputs = {"a": batch["audio"], "v": batch["video"]}
  ratios = p.mask_ratios
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
        out[mod] = group_features(model, inputs[mod], mod, masking.micro_groups(perm, m, accum),
                                  noise_m, ratios, pack=p.pack_groups)
      return out

    # Forward only: nothing is kept for a backward pass.
    _, feats = jax.lax.scan(lambda c, m: (c, micro_features(params, m)), None, steps)
    full = {mod: masking.untake_groups([masking.join_micro(f, batch_shards) for f in feats[mod]],
                                       masks[mod][0]) for mod in masks}
    parts["contrastive"], (dfa, dfv) = jax.value_and_grad(
        losses.contrastive_loss, argnums=(0, 1))(full["a"], full["v"], p.tau, p.contrastive)
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


def opt_groups(param_keys, p: PretrainSpec) -> dict[str, tuple[str, ...]]:
  """The top-level parameters each optimizer updates: all for one optimizer; with one per loss,
  the encoders for the contrastive loss and the rest (plus the encoders when the reconstruction
  gradient is not stopped) for reconstruction: the parameters each loss reaches."""
  keys = tuple(param_keys)
  if not p.separate_optimizers:
    return {"total": keys}
  encoders = tuple(k for k in keys if k in ENCODERS)
  rest = tuple(k for k in keys if k not in ENCODERS)
  return {"contrastive": encoders,
          "reconstruction": rest if p.mae_stop_gradient else keys}


def train_step(state, batch, base_key, *, graphdef, groups, schedule, p: PretrainSpec):
  key = jax.random.fold_in(base_key, state["step"])
  params, opt, metrics = state["params"], dict(state["opt"]), {}
  if p.accum_steps == 1:
    grad_fn = jax.value_and_grad(pretrain_losses, has_aux=True)
  else:
    grad_fn = accumulated_losses_and_grads
  for name, group in groups.items():
    # With separate optimizers the reconstruction step sees the contrastive update, as released.
    (loss, parts), grads = grad_fn(params, graphdef, batch, key, p, name)
    params, opt[name] = optim.apply_group(group, grads, opt[name], params)
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


class PretrainTask:
  """AVSiam pretraining for the trainer (train.py): model, optimizers, steps, input, logs."""

  name = "pretrain"
  batch_keys = ("audio", "video")

  def __init__(self, spec: RunSpec):
    self.spec = spec
    self.schedule = spec.pretrain.schedule

  def model(self, rngs: nnx.Rngs) -> AVSiam:
    return AVSiam(self.spec.model, rngs=rngs, dtype=self.spec.compute_dtype)

  def opt_groups(self, param_keys) -> dict[str, tuple[str, ...]]:
    return opt_groups(param_keys, self.spec.pretrain)

  def lr_multipliers(self, params):
    del params
    return None

  def train_step(self, state, batch, key, *, graphdef, groups, schedule):
    return train_step(state, batch, key, graphdef=graphdef, groups=groups, schedule=schedule,
                      p=self.spec.pretrain)

  def eval_step(self, params, batch, *, graphdef):
    return eval_step(params, batch, graphdef=graphdef, frame=self.spec.eval.frame)

  def train_iterator(self, ds_dir: str, **common):
    return pipeline.make_pretrain_iterator(ds_dir, self.spec.data.train_split, **common)

  @staticmethod
  def log_fields(metrics) -> str:
    return ", ".join(f"{k} {metrics[k]:.4f}" for k in ("contrastive", "reconstruction"))

  def init_source(self) -> str:
    """Where pretrained weights come from ("": a fresh model)."""
    return self.spec.model_init

  def init_params(self, params: dict, key) -> dict:
    """`params` (the fresh state's, drawn from `key`) with config.model_init placed in."""
    del key  # the state's own params are that draw
    return load.init_params(self.spec.model_init, self.spec.model_init_format, self.spec.model,
                            params)
