"""Retrieval finetuning (paper Table 3a): the pretrained encoder trained on the contrastive loss
alone over a training split (no labels), selected every epoch by audio->video R@1 on the eval
split, as a trainer task.

It is pretraining's objective with config.retrieval's ratios, temperature and schedule and no
reconstruction (RunSpec.retrieval: reconstruction_weight 0, so the decoder neither runs nor
changes, and the multimodal blocks stay as loaded). It starts from the encoder and multimodal
blocks of the run config.finetune.init_checkpoint (a pretraining run, or any run of this
project) or from config.model_init; its run directory is an AVSiam run like pretraining's, for
mode=eval, embed, or classification finetuning.
"""
from __future__ import annotations

from avsiam_jax import finetuning
from avsiam_jax.models.classifier import PRETRAINED
from avsiam_jax.pretraining import PretrainTask


class RetrievalFinetuneTask(PretrainTask):
  """Contrastive finetuning of a pretrained encoder for audio-visual retrieval."""

  name = "retrieval_finetune"
  title = "Retrieval finetuning"
  about = "the contrastive loss alone from the pretrained encoder, then retrieval"
  stage = "retrieval_finetune"
  selection_metric = "a2v_r1"  # Table 3a reports audio->video R@1
  random_init_warning = ("Retrieval finetuning from random weights: set "
                         "config.finetune.init_checkpoint")

  def check_sources(self) -> None:
    finetuning.check_init_checkpoint(self.spec)

  def init_source(self) -> str:
    """Where the encoder comes from ("": random weights)."""
    return self.spec.finetune.init_checkpoint or self.spec.model_init

  def init_params(self, params: dict, key) -> dict:
    """`params` with the encoder and multimodal blocks of the run init_checkpoint, or with
    model_init placed in; the rest (the decoder, unused here) stays as drawn from `key`."""
    if not self.spec.finetune.init_checkpoint:
      return super().init_params(params, key)
    source = finetuning.pretrained_avsiam_params(self.spec, key)
    return {**params, **{k: source[k] for k in PRETRAINED}}
