"""Pretraining: the multi-ratio contrastive loss plus masked reconstruction, as a trainer task.

The objective lives here, not in the model (which embeds, encodes, pools and decodes): the
masks, the batch layout and both losses, weighted (a loss of weight 0 is not computed). Each
modality's examples are split into its mask-ratio groups inside each of `batch_shards` data
shards (masking.py; audio and video may have different sets), and gradient accumulation takes
equal rows of every group (accumulation.py).
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from avsiam_jax import accumulation, losses, masking, optim, packing
from avsiam_jax.config import PretrainSpec, RunSpec
from avsiam_jax.data import pipeline
from avsiam_jax.models.avsiam import MODALITIES, AVSiam
from avsiam_jax.task import Task
from avsiam_jax.weights import load


LOSSES = ("contrastive", "reconstruction")
# The parameter subtrees the contrastive loss reaches (AVSep: the audio encoder too).
ENCODERS = ("encoder", "audio_encoder")


def active_losses(p: PretrainSpec) -> tuple[str, ...]:
  """The losses of nonzero weight, in LOSSES order: those the step computes."""
  return tuple(name for name in LOSSES if p.weights[name])


def loss_groups(p: PretrainSpec) -> dict[str, tuple[str, ...]]:
  """{optimizer name: the losses it steps on}: one for all, or one per loss (the release's);
  only losses of nonzero weight."""
  active = active_losses(p)
  return {name: (name,) for name in active} if p.separate_optimizers else {"total": active}


# ----- contrastive loss ---------------------------------------------------------------------

def gather_groups(x, perm_SxGxg) -> list:
  """The rows of each ratio group, [(S * g, ...)] in take_group order."""
  return [masking.take_group(x, perm_SxGxg, k) for k in range(perm_SxGxg.shape[1])]


def embed_groups(model, x, modality: str, perm_SxGxg, whole_batch: bool) -> list:
  """model.embed tokens of each ratio group's rows of x, [(S * g, N, D)]. whole_batch (perm
  covers all of x): embeds x once, then gathers, which XLA shares with the reconstruction pass's
  embedding; else (perm picks a micro-batch) embeds only the rows it gathers."""
  if whole_batch:
    return gather_groups(model.embed(x, modality), perm_SxGxg)
  return [model.embed(g, modality) for g in gather_groups(x, perm_SxGxg)]


def group_features(model, groups: Sequence, modality: str, noise, ratios: Sequence[float],
                   shards: int, *, pack: bool) -> list:
  """Pooled features [(S * g, D)] of each ratio group's embedded tokens (embed_groups), each
  masked by its noise at its ratio (no noise: all tokens kept).

  pack: one encoder call over the groups packed into rows (packing.py) instead of one call per
  group; the same features.
  """
  n = model.num_tokens(modality)
  kept = []
  for tokens, z, ratio in zip(groups, noise, ratios):
    if z is not None:
      tokens, _, _ = masking.keep_by_noise(z, tokens, masking.kept_count(n, ratio))
    kept.append(tokens)
  if not pack:
    return [model.pool(model.encode(tokens, modality)) for tokens in kept]
  plan = packing.make_plan([t.shape[1] for t in kept], kept[0].shape[0] // shards)
  rows = model.encode(packing.pack(kept, plan, shards), modality, packing.segments(plan, shards))
  return packing.pooled_groups(rows, plan, shards, model.pool)


def multi_ratio_features(model, x, modality: str, key, ratios: Sequence[float],
                         batch_shards: int, pack: bool):
  """Pooled features (B, D) of the whole batch, each ratio group masked at its own ratio."""
  perm, noise = masking.multi_ratio_masks(key, x.shape[0], model.num_tokens(modality), ratios,
                                          batch_shards)
  groups = embed_groups(model, x, modality, perm, whole_batch=True)
  feats = group_features(model, groups, modality, noise, ratios, batch_shards, pack=pack)
  return masking.untake_groups(feats, perm)


# ----- reconstruction loss ------------------------------------------------------------------

def reconstruction_noise(model, key, batch: int) -> dict:
  """{modality: (B, N)} masking noise of the reconstruction pass."""
  return {m: masking.mask_noise(jax.random.fold_in(key, i), batch, model.num_tokens(m))
          for i, m in enumerate(MODALITIES)}


def reconstruction_loss(model, audio, video, noise: dict, *, mask_ratio: float,
                        stop_gradient: bool):
  """Masked-patch MSE, audio + video, from one pass at `mask_ratio`; noise: the
  reconstruction_noise rows of these examples."""
  kept, restore, targets, masked = {}, {}, {}, {}
  for m, x in zip(MODALITIES, (audio, video)):
    targets[m] = model.encoder_for(m).patches(x, m).astype(jnp.float32)
    n_keep = masking.kept_count(model.num_tokens(m), mask_ratio)
    tokens, _, restore[m] = masking.keep_by_noise(noise[m], model.embed(x, m), n_keep)
    kept[m] = model.encode(tokens, m)
    masked[m] = masking.masked_positions(restore[m], n_keep)
  if stop_gradient:
    # The paper stops the reconstruction gradient before the multimodal layers.
    kept = jax.lax.stop_gradient(kept)
  preds = model.decode(kept["a"], kept["v"], restore["a"], restore["v"])
  return sum(losses.masked_mse(preds[m], targets[m], masked[m]) for m in MODALITIES)


# ----- the objective --------------------------------------------------------------------------

def objective(model, batch, key, p: PretrainSpec,
              names: Sequence[str] | None = None) -> accumulation.Objective:
  """The losses `names` (default: those of nonzero weight) of a batch over p.accum_steps
  micro-batches, weighted by p.weights, as a function of the params of `model` (whose
  structure and sizes it takes).

  The masks are drawn for the whole batch; micro-batch m takes rows [m * r / M, (m + 1) * r / M)
  of each shard's r rows of every ratio group (contrastive) or of the batch (reconstruction).
  The contrastive loss compares the whole batch's features; the reconstruction loss, normalized
  by a masked-patch count that is the same for every example, is the mean of the micro-batches'.
  """
  names = active_losses(p) if names is None else tuple(names)
  accum, shards = p.accum_steps, p.batch_shards
  graphdef = nnx.graphdef(model)
  k_a, k_v, k_rec = jax.random.split(key, 3)
  b = batch["audio"].shape[0]
  inputs = {"a": batch["audio"], "v": batch["video"]}
  micro = lambda x, m: masking.micro_rows(x, m, accum, shards)
  masks = {mod: masking.multi_ratio_masks(k, b, model.num_tokens(mod), p.ratios(mod), shards)
           for mod, k in (("a", k_a), ("v", k_v))}
  noise_rec = reconstruction_noise(model, k_rec, b)

  def features(params, m):
    """{modality: [(S * g / M, D) per ratio group]} of micro-batch m."""
    model = nnx.merge(graphdef, params)
    out = {}
    for mod, (perm, noise) in masks.items():
      groups = embed_groups(model, inputs[mod], mod, masking.micro_groups(perm, m, accum),
                            whole_batch=accum == 1)
      noise_m = [None if z is None else micro(z, m) for z in noise]
      out[mod] = group_features(model, groups, mod, noise_m, p.ratios(mod), shards,
                                pack=p.pack_groups)
    return out

  def contrastive(stacked):
    full = {mod: masking.untake_groups([masking.join_micro(f, shards) for f in stacked[mod]],
                                       masks[mod][0]) for mod in masks}
    return {"contrastive": losses.contrastive_loss(full["a"], full["v"], p.tau, p.contrastive)}

  def reconstruction(params, m):
    return {"reconstruction": reconstruction_loss(
        nnx.merge(graphdef, params), micro(inputs["a"], m), micro(inputs["v"], m),
        {mod: micro(z, m) for mod, z in noise_rec.items()}, mask_ratio=p.mae_mask_ratio,
        stop_gradient=p.mae_stop_gradient)}

  with_c = "contrastive" in names
  return accumulation.Objective(
      accum, features=features if with_c else None, global_losses=contrastive if with_c else None,
      local_losses=reconstruction if "reconstruction" in names else None, weights=p.weights)


def losses_and_grads(params, graphdef, batch, key, p: PretrainSpec,
                     names: Sequence[str] | None = None, keys: Sequence[str] | None = None):
  """((loss, parts), grads) of the losses `names` (see objective); grads of the top-level
  params `keys` only (default: all), the others held constant."""
  obj = objective(nnx.merge(graphdef, params), batch, key, p, names)
  if keys is None or set(keys) == set(params):
    return obj.value_and_grad(params)
  fixed = {k: v for k, v in params.items() if k not in keys}
  return obj.over(fixed).value_and_grad({k: params[k] for k in keys})


def train_step(state, batch, base_key, *, graphdef, groups, schedule, p: PretrainSpec):
  key = jax.random.fold_in(base_key, state["step"])
  params, opt, metrics = state["params"], dict(state["opt"]), {}
  owned = loss_groups(p)
  for name, group in groups.items():
    # With separate optimizers the reconstruction step sees the contrastive update, as released.
    # Gradients of the group's parameters only: a loss left out reaches nothing else.
    (_, parts), grads = losses_and_grads(params, graphdef, batch, key, p, owned[name],
                                         group.keys)
    params, opt[name] = optim.apply_group(group, grads, opt[name], params)
    metrics.update(parts)
    metrics[f"grad_norm_{name}"] = optax.tree.norm(grads)
  # Only the losses computed: a loss of weight 0 has no entry (nor a log field).
  metrics["loss"] = sum(p.weights[k] * metrics[k] for k in active_losses(p))
  metrics["lr"] = schedule(state["step"])
  return {"params": params, "opt": opt, "step": state["step"] + 1}, metrics


def eval_step(params, batch, *, graphdef, frame: int):
  """Unmasked pooled features, the video's from one of its frames, for zero-shot retrieval."""
  model = nnx.merge(graphdef, params)
  return {"feat_a": model.features(batch["audio"], "a"),
          "feat_v": model.features(batch["video"][:, frame], "v")}


class PretrainTask(Task):
  """AVSiam pretraining for the trainer (train.py): model, optimizers, steps, input, logs."""

  name = "pretrain"
  title = "Pretraining"
  about = "contrastive + masked reconstruction, then zero-shot retrieval"
  stage = "pretrain"  # the stage whose objective and schedule it trains (RunSpec.objective)
  batch_keys = ("audio", "video")
  uses_labels = False
  selection_metric = "mean_r1"  # selection.METRICS

  def __init__(self, spec: RunSpec, num_classes: int = 0):
    del num_classes  # unlabelled
    self.spec = spec
    self.objective = spec.objective(self.stage)
    self.schedule = self.objective.schedule

  def model(self, rngs: nnx.Rngs) -> AVSiam:
    return AVSiam(self.spec.model, rngs=rngs, dtype=self.spec.compute_dtype)

  def opt_groups(self, param_keys) -> dict[str, tuple[str, ...]]:
    """Per optimizer (loss_groups), the top-level parameters its losses reach: the encoders the
    contrastive loss, the rest (and the encoders unless mae_stop_gradient) reconstruction. A
    loss of weight 0 reaches nothing: without reconstruction no optimizer holds the decoder."""
    p = self.objective
    keys = tuple(param_keys)
    rest = tuple(k for k in keys if k not in ENCODERS)
    reach = {"contrastive": tuple(k for k in keys if k in ENCODERS),
             "reconstruction": rest if p.mae_stop_gradient else keys}
    return {name: tuple(k for k in keys if any(k in reach[loss] for loss in owned))
            for name, owned in loss_groups(p).items()}

  def train_step(self, state, batch, key, *, graphdef, groups, schedule):
    return train_step(state, batch, key, graphdef=graphdef, groups=groups, schedule=schedule,
                      p=self.objective)

  def eval_step(self, params, batch, *, graphdef):
    return eval_step(params, batch, graphdef=graphdef, frame=self.spec.eval.frame)

  def train_iterator(self, ds_dir: str, **common):
    return pipeline.make_pretrain_iterator(ds_dir, self.spec.data.train_split, **common)

  def log_fields(self, metrics) -> str:
    return ", ".join(f"{k} {metrics[k]:.4f}" for k in LOSSES if k in metrics)

  def init_source(self) -> str:
    """Where pretrained weights come from ("": a fresh model)."""
    return self.spec.model_init

  def init_params(self, params: dict, key) -> dict:
    """`params` (the fresh state's, drawn from `key`) with config.model_init placed in."""
    del key  # the state's own params are that draw
    return load.init_params(self.spec.model_init, self.spec.model_init_format, self.spec.model,
                            params)
