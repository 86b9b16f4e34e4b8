"""AVSiam finetuning model: the pretrained shared encoder and multimodal blocks plus three heads.

`encoder` and `mm_blocks` are named as in the pretraining model, so those parameter subtrees
load by name (`load_pretrained`); the heads start fresh when finetuning (a released finetuned
classifier's convert into them: weights/avsiam_release.py). Heads, by released name:
  head_a  (mlp_head_a):  LayerNorm + Dense on mean-pooled audio tokens;
  head_v  (mlp_head):    LayerNorm + Dense on mean-pooled video tokens;
  head_av (mlp_head_mm): LayerNorm + Dense on [mean audio part, mean video part] (2D) of the
                         concatenated tokens after the multimodal blocks.
Means are layers.mean_pool's (float32, as pretraining's features); the heads take them in the
compute dtype.
"""
from __future__ import annotations

import dataclasses

import einops
import jax
import jax.numpy as jnp
from flax import nnx

from avsiam_jax import trees
from avsiam_jax.models import layers
from avsiam_jax.models.vit import Encoder, EncoderSpec, multimodal_blocks

PRETRAINED = ("encoder", "mm_blocks")


@dataclasses.dataclass(frozen=True)
class ClassifierSpec:
  encoder: EncoderSpec
  num_classes: int
  mm_depth: int = 2
  head_norm_eps: float = 1e-5  # the released heads use torch's default LayerNorm


class Head(nnx.Module):
  def __init__(self, dim: int, num_classes: int, *, eps: float, rngs: nnx.Rngs, dtype):
    self.norm = layers.LayerNorm(dim, eps=eps, rngs=rngs, dtype=dtype)
    self.dense = layers.Dense(dim, num_classes, axes=("embed", None), rngs=rngs, dtype=dtype)

  def __call__(self, x_BxD):
    return self.dense(self.norm(x_BxD))


def _head_mean(tokens_BxNxD):
  """A head's input from tokens: their float32 mean (layers.mean_pool), in the compute dtype."""
  return layers.mean_pool(tokens_BxNxD).astype(tokens_BxNxD.dtype)


class AVSiamClassifier(nnx.Module):

  def __init__(self, spec: ClassifierSpec, *, rngs: nnx.Rngs, dtype=jnp.float32):
    enc = spec.encoder
    d = enc.width
    self.spec = spec
    self.dtype = dtype
    # Built in the same order as AVSiam, so equal seeds give equal encoder/mm parameters.
    self.encoder = Encoder(enc, rngs=rngs, dtype=dtype)
    self.mm_blocks = multimodal_blocks(self.encoder, spec.mm_depth, rngs=rngs, dtype=dtype)
    kw = dict(eps=spec.head_norm_eps, rngs=rngs, dtype=dtype)
    self.head_a = Head(d, spec.num_classes, **kw)
    self.head_v = Head(d, spec.num_classes, **kw)
    self.head_av = Head(2 * d, spec.num_classes, **kw)

  def fuse(self, a_BxNaxD, v_BxNvxD):
    """Audio and video tokens through the multimodal blocks -> [mean audio, mean video] (B, 2D)."""
    x = jnp.concatenate([a_BxNaxD, v_BxNvxD], axis=1)
    x = layers.run_blocks(self.mm_blocks, x, "x", scan=self.encoder.spec.scan,
                          grad_boundaries=self.encoder.spec.grad_boundaries)
    n = a_BxNaxD.shape[1]
    return jnp.concatenate([_head_mean(x[:, :n]), _head_mean(x[:, n:])], axis=-1)

  def head_input(self, audio=None, video=None):
    """Pooled head input: (B, D) for one modality, (B, 2D) for both, in the compute dtype."""
    if audio is None and video is None:
      raise ValueError("need audio, video or both")
    if video is None:
      return _head_mean(self.encoder(audio, "a"))
    if audio is None:
      return _head_mean(self.encoder(video, "v"))
    return self.fuse(self.encoder(audio, "a"), self.encoder(video, "v"))

  def __call__(self, audio=None, video=None):
    """Logits (B, num_classes): the audio, video or audio-visual head by what is given."""
    f = self.head_input(audio, video)
    head = self.head_a if video is None else self.head_v if audio is None else self.head_av
    return head(f).astype(jnp.float32)

  def branch_logits(self, audio, video):
    """Float32 logits (B, num_classes) of model(audio, video), model(audio, None) and
    model(None, video), in modalities.BRANCHES order, from one encoder pass per modality."""
    a, v = self.encoder(audio, "a"), self.encoder(video, "v")
    out = (self.head_av(self.fuse(a, v)), self.head_a(_head_mean(a)), self.head_v(_head_mean(v)))
    return tuple(x.astype(jnp.float32) for x in out)

  def clip_outputs(self, audio_BxTxF, frames_BxFxHxWx3):
    """Everything evaluation needs from a clip and all its frames, audio encoded once.

    Returns float32 logits {'a': (B, C), 'v': (B, F, C), 'av': (B, F, C)} (one audio-visual
    prediction per frame) and the pooled encoder features {'a': (B, D), 'v': (B, F, D)}, float32
    as pretraining's (AVSiam.features).
    """
    f = frames_BxFxHxWx3.shape[1]
    per_frame = lambda t: einops.rearrange(t, "(b f) d -> b f d", f=f)
    a = self.encoder(audio_BxTxF, "a")
    v = self.encoder(einops.rearrange(frames_BxFxHxWx3, "b f h w c -> (b f) h w c"), "v")
    feat_a, feat_v = layers.mean_pool(a), layers.mean_pool(v)
    fused = self.fuse(jnp.repeat(a, f, axis=0), v)
    logits = {"a": self.head_a(feat_a.astype(a.dtype)),
              "v": per_frame(self.head_v(feat_v.astype(v.dtype))),
              "av": per_frame(self.head_av(fused))}
    logits = jax.tree.map(lambda x: x.astype(jnp.float32), logits)
    return logits, {"a": feat_a, "v": per_frame(feat_v)}


def load_pretrained(params: dict, pretrain_params: dict) -> dict:
  """`params` with its `encoder` and `mm_blocks` subtrees taken from a pretraining AVSiam dict.

  Both are pure dicts (nnx.to_pure_dict of the nnx.Param state). Every classifier key under
  those subtrees must exist in the pretraining dict with the same shape, and nothing more (e.g.
  a separate audio patch projection the classifier would silently drop); the first key that
  differs is named in the ValueError. Heads and anything else stay as given.
  """
  for name in PRETRAINED:
    if name not in params:
      raise ValueError(f"classifier params have no {name!r} subtree")
    if name not in pretrain_params:
      raise ValueError(f"pretrained params have no {name!r} subtree")
    trees.check_compatible({name: pretrain_params[name]}, {name: params[name]}, "params",
                           what="pretrained", dtypes=False)
  # Write only after everything checked out.
  out = dict(params)
  for name in PRETRAINED:
    src = trees.flatten({name: pretrain_params[name]})
    dst = {name: params[name]}
    out[name] = trees.rebuild(dst, {k: jnp.asarray(src[k], dtype=jnp.result_type(v))
                                    for k, v in trees.flatten(dst).items()})[name]
  return out
