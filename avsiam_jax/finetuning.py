"""Finetuning: the classifier on the pretrained encoder, trained on a random input modality per
step (audio-visual, audio-only or visual-only), or per part of the step's batch
(finetune.modality_shards), as a trainer task."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from avsiam_jax import checkpoint, losses, optim
from avsiam_jax.config import ConfigError, FinetuneSpec, RunSpec
from avsiam_jax.data import pipeline
from avsiam_jax.evaluators.classification import aggregate_frames
from avsiam_jax.modalities import BRANCHES  # by branch index, as branch_index draws them
from avsiam_jax.models.avsiam import AVSiam
from avsiam_jax.models.classifier import (PRETRAINED, AVSiamClassifier, ClassifierSpec,
                                           load_pretrained)
from avsiam_jax.task import Task
from avsiam_jax.weights import load, signature

HEADS = ("head_a", "head_v", "head_av")


def classifier_spec(spec: RunSpec, num_classes: int) -> ClassifierSpec:
  return ClassifierSpec(encoder=spec.model.encoder, num_classes=num_classes,
                        mm_depth=spec.model.mm_depth)


def lr_multipliers(params: dict, f: FinetuneSpec) -> dict:
  """Per-parameter learning-rate factor: heads x head_lr_mult, multimodal blocks x mm_lr_mult."""
  factor = {**{h: f.head_lr_mult for h in HEADS}, "mm_blocks": f.mm_lr_mult}
  return {k: jax.tree.map(lambda _, m=factor.get(k, 1.0): m, v) for k, v in params.items()}


def branch_index(key, modality_mix):
  """0 audio-visual, 1 audio-only, 2 visual-only, drawn with probabilities modality_mix."""
  return jnp.searchsorted(jnp.cumsum(jnp.asarray(modality_mix[:2])), jax.random.uniform(key),
                          side="right")


def branch_draws(key, modality_mix, shards: int):
  """A step's branches: one index (shards 1, as branch_index), else (shards,), one per
  consecutive part of the batch, each drawn from its own key split from `key`."""
  if shards == 1:
    return branch_index(key, modality_mix)
  return jax.vmap(lambda k: branch_index(k, modality_mix))(jax.random.split(key, shards))


def finetune_loss(params, graphdef, batch, branch, kind: str):
  """The loss of the drawn branch; with one branch per part (branch of shape (N,)), the mean
  over the N equal parts of each part's loss with its branch (DDP's mean over GPUs)."""
  model = nnx.merge(graphdef, params)
  audio, video = batch["audio"], batch["video"]
  if jnp.ndim(branch) == 0:
    logits = jax.lax.switch(branch, [lambda: model(audio, video), lambda: model(audio, None),
                                     lambda: model(None, video)])
    return losses.classification_loss(logits, batch["labels"], kind)
  # One pass gives every clip all three logits; each clip keeps its part's. Equal parts: the
  # mean over clips is the mean of the part means.
  av, a, v = model.branch_logits(audio, video)
  rows = jnp.repeat(branch, audio.shape[0] // branch.shape[0])[:, None]
  logits = jnp.where(rows == 0, av, jnp.where(rows == 1, a, v))
  return losses.classification_loss(logits, batch["labels"], kind)


def train_step(state, batch, base_key, *, graphdef, groups, schedule, f: FinetuneSpec):
  branch = branch_draws(jax.random.fold_in(base_key, state["step"]), f.modality_mix,
                        f.modality_shards)
  loss, grads = jax.value_and_grad(finetune_loss)(state["params"], graphdef, batch, branch,
                                                  f.loss)
  params, opt = optim.apply_group(groups["total"], grads, state["opt"]["total"],
                                  state["params"])
  metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": schedule(state["step"])}
  if f.modality_shards == 1:
    metrics["branch"] = branch
  else:
    # The first part's branch, and how many parts drew each.
    metrics["branch"] = branch[0]
    metrics.update({f"parts/{name}": jnp.sum(branch == i) for i, name in enumerate(BRANCHES)})
  return {"params": params, "opt": {"total": opt}, "step": state["step"] + 1}, metrics


def classifier_eval_step(params, batch, *, graphdef, kind: str, frame: int,
                         scores: str = "loss"):
  """Clip probabilities per input (frames aggregated) and the retrieval features; scores
  (losses.EVAL_SCORES): the loss `kind`'s, or a sigmoid for any loss, taken per frame."""
  model = nnx.merge(graphdef, params)
  logits, feats = model.clip_outputs(batch["audio"], batch["video"])
  probs = lambda x: losses.eval_probabilities(x, kind, scores)
  return {"probs_a": probs(logits["a"]),
          "probs_v": aggregate_frames(probs(logits["v"])),
          "probs_av": aggregate_frames(probs(logits["av"])),
          "feat_a": feats["a"], "feat_v": feats["v"][:, frame]}


def pretrained_avsiam_params(spec: RunSpec, key) -> dict:
  """Host params to start from, at least `encoder` and `mm_blocks`: those of the run
  finetune.init_checkpoint (a pretraining run, or a classifier: a finetuning run or a converted
  released one, whose heads are not used), or the weights of model_init placed into a fresh
  pretraining model drawn from `key` (it fills what the file lacks)."""
  if spec.finetune.init_checkpoint:
    run = checkpoint.load_run(spec.finetune.init_checkpoint)
    # Stored leaves the model would not ask for (e.g. a separate audio projection) go unread:
    # the run's recorded switches must be the model's.
    signature.check_switches(signature.config_switches(run.config.get("model") or {}),
                             spec.model, signature.ENCODER,
                             f"{run.workdir} was trained with other model settings")
    abstract = nnx.to_pure_dict(nnx.state(nnx.eval_shape(
        lambda: AVSiam(spec.model, rngs=nnx.Rngs(0))), nnx.Param))
    return jax.device_get(checkpoint.restore_params(run, {k: abstract[k] for k in PRETRAINED}))
  return load.init_params(spec.model_init, spec.model_init_format, spec.model,
                          load.fresh_params(spec.model, key))


def check_init_checkpoint(spec: RunSpec) -> None:
  """ConfigError, before any compute, when config.finetune.init_checkpoint is set and is not a
  readable run."""
  if spec.finetune.init_checkpoint:
    try:
      checkpoint.load_run(spec.finetune.init_checkpoint)
    except checkpoint.CheckpointError as e:
      raise ConfigError(f"config.finetune.init_checkpoint: {e}") from e


class FinetuneTask(Task):
  """The classifier for the trainer (train.py): model, optimizer groups, steps, input, logs."""

  name = "finetune"
  title = "Finetuning"
  about = "the classifier from the pretrained weights, then classification"
  batch_keys = ("audio", "video", "labels")
  uses_labels = True
  random_init_warning = "Finetuning from random weights: set config.finetune.init_checkpoint"

  def __init__(self, spec: RunSpec, num_classes: int):
    self.spec, self.num_classes = spec, num_classes
    self.schedule = spec.finetune.schedule
    self.selection_metric = "top1" if spec.finetune.loss == "ce" else "mAP"

  @classmethod
  def eval_spec(cls, spec: RunSpec, run_config) -> RunSpec:
    """The run's loss says what its logits mean; finetune.eval_scores stays the command's."""
    loss = run_config.get("finetune", {}).get("loss", spec.finetune.loss)
    return dataclasses.replace(spec, finetune=dataclasses.replace(spec.finetune, loss=loss))

  def model(self, rngs: nnx.Rngs) -> AVSiamClassifier:
    return AVSiamClassifier(classifier_spec(self.spec, self.num_classes), rngs=rngs,
                            dtype=self.spec.compute_dtype)

  def opt_groups(self, param_keys) -> dict[str, tuple[str, ...]]:
    return {"total": tuple(param_keys)}  # one optimizer; per-group rates by lr_multipliers

  def lr_multipliers(self, params):
    return lr_multipliers(params, self.spec.finetune)

  def train_step(self, state, batch, key, *, graphdef, groups, schedule):
    return train_step(state, batch, key, graphdef=graphdef, groups=groups, schedule=schedule,
                      f=self.spec.finetune)

  def eval_step(self, params, batch, *, graphdef):
    f = self.spec.finetune
    return classifier_eval_step(params, batch, graphdef=graphdef, kind=f.loss,
                                frame=self.spec.eval.frame, scores=f.eval_scores)

  def train_iterator(self, ds_dir: str, **common):
    f = self.spec.finetune
    return pipeline.make_finetune_iterator(
        ds_dir, self.spec.data.train_split, mixup=f.mixup, label_smoothing=f.label_smoothing,
        freqm=f.freqm, timem=f.timem, balanced=f.balanced, **common)

  def log_fields(self, metrics) -> str:
    if f"parts/{BRANCHES[0]}" in metrics:  # modality_shards > 1
      return "this step's parts " + ", ".join(f"{name} {int(metrics[f'parts/{name}'])}"
                                              for name in BRANCHES)
    return f"this step {BRANCHES[int(metrics['branch'])]}"

  def check_sources(self) -> None:
    check_init_checkpoint(self.spec)

  def init_source(self) -> str:
    """Where the encoder and multimodal blocks come from ("": random weights)."""
    return self.spec.finetune.init_checkpoint or self.spec.model_init

  def init_params(self, params: dict, key) -> dict:
    """`params` with the encoder and multimodal blocks of the pretraining source; the heads stay
    as drawn from `key`."""
    return load_pretrained(params, pretrained_avsiam_params(self.spec, key))
