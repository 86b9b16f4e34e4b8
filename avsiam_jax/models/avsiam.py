"""AVSiam pretraining model: shared encoder, two multimodal blocks, MAE decoder.

The model embeds, encodes, pools and decodes; the objectives that compose these (masking, the
contrastive and reconstruction losses) are the pretraining task's (pretraining.py). `decode`
runs the kept tokens of both modalities through the joint (multimodal) blocks, a LayerNorm
(`mm_norm`, unless spec.mm_norm is off as in the release) and the decoder, which predicts the
patches of every position.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx

from avsiam_jax.models import layers
from avsiam_jax.models.vit import Encoder, EncoderSpec, multimodal_blocks


@dataclasses.dataclass(frozen=True)
class AVSiamSpec:
  encoder: EncoderSpec
  mm_depth: int = 2
  decoder_width: int = 512
  decoder_depth: int = 8
  decoder_heads: int = 16
  decoder_norm_eps: float = 1e-6
  mm_norm: bool = True  # a LayerNorm between the multimodal blocks and the decoder (released: none)


MODALITIES = ("a", "v")


class AVSiam(nnx.Module):

  def __init__(self, spec: AVSiamSpec, *, rngs: nnx.Rngs, dtype=jnp.float32):
    enc = spec.encoder
    d, dw = enc.width, spec.decoder_width
    self.spec = spec
    self.dtype = dtype
    self.encoder = Encoder(enc, rngs=rngs, dtype=dtype)
    self.mm_blocks = multimodal_blocks(self.encoder, spec.mm_depth, rngs=rngs, dtype=dtype)
    if spec.mm_norm:
      self.mm_norm = layers.LayerNorm(d, eps=enc.final_norm_eps, rngs=rngs, dtype=dtype)
    else:
      # Its two draws all the same, so the decoder starts as with mm_norm for the same seed.
      for _ in range(2):
        rngs.params()

    # Decoder: fresh parameters.
    self.decoder_embed = layers.Dense(d, dw, axes=("embed", None), rngs=rngs, dtype=dtype)
    normal = nnx.initializers.normal(0.02)
    self.mask_token = layers.param(rngs, normal, (dw,), (None,))
    self.decoder_posemb = nnx.Dict({
        "a": layers.param(rngs, normal, (enc.num_audio_tokens, dw), (None, None)),
        "v": layers.param(rngs, normal, (enc.num_video_tokens, dw), (None, None))})
    self.modality_token = nnx.Dict({
        m: layers.param(rngs, layers.zeros, (dw,), (None,)) for m in MODALITIES})
    self.decoder_blocks = nnx.List([
        layers.Block(dw, spec.decoder_heads, 4 * dw, streams=("x",), eps=spec.decoder_norm_eps,
                     rngs=rngs, dtype=dtype, remat=enc.remat, attention=enc.attention)
        for _ in range(spec.decoder_depth)])
    self.decoder_norm = layers.LayerNorm(dw, eps=spec.decoder_norm_eps, rngs=rngs, dtype=dtype)
    p = enc.patch
    self.decoder_pred = nnx.Dict({
        "a": layers.Dense(dw, p * p, axes=(None, None), rngs=rngs, dtype=dtype),
        "v": layers.Dense(dw, p * p * 3, axes=(None, None), rngs=rngs, dtype=dtype)})

  def encoder_for(self, modality: str) -> Encoder:
    """The encoder of a modality: the same one for both (a separate-encoder baseline overrides)."""
    del modality
    return self.encoder

  # ----- encoder passes (pretraining.py composes these into its losses) ----------------------

  def num_tokens(self, modality: str) -> int:
    spec = self.encoder_for(modality).spec
    return spec.num_audio_tokens if modality == "a" else spec.num_video_tokens

  def embed(self, x, modality: str):
    """Patch tokens of raw inputs with position embeddings (B, N, D), before any block."""
    enc = self.encoder_for(modality)
    return enc.project_patches(enc.patches(x, modality), modality)

  def encode(self, tokens_BxNxD, modality: str, segments=None):
    """The encoder's blocks and final norm over (possibly masked) tokens; segments: the
    packing.Segments of packed rows, attention within each."""
    return self.encoder_for(modality).encode_tokens(tokens_BxNxD, modality, segments)

  @staticmethod
  def pool(tokens_BxNxD):
    """The feature the contrastive loss and retrieval compare: layers.mean_pool (float32)."""
    return layers.mean_pool(tokens_BxNxD)

  def features(self, x, modality: str):
    """Unmasked pooled features (B, D), float32."""
    return self.pool(self.encoder_for(modality)(x, modality))

  # ----- decoder ---------------------------------------------------------------------------

  def decode(self, kept_a, kept_v, restore_a, restore_v) -> dict:
    """Predicted patches of every position, {'a': (B, Na, p*p), 'v': (B, Nv, p*p*3)} in the
    compute dtype, from the encoded kept tokens of each modality (B, n_keep, D) and their
    restore orders (B, N) (masking.keep_by_noise): mask tokens fill the dropped positions."""
    restore = {"a": restore_a, "v": restore_v}
    x = jnp.concatenate([kept_a, kept_v], axis=1)
    x = layers.run_blocks(self.mm_blocks, x, "x", scan=self.spec.encoder.scan,
                          grad_boundaries=self.spec.encoder.grad_boundaries)
    x = self.decoder_embed(self.mm_norm(x) if self.spec.mm_norm else x)

    parts, split = [], kept_a.shape[1]
    for m, kept_m in zip(MODALITIES, (x[:, :split], x[:, split:])):
      b, n = restore[m].shape
      full = jnp.concatenate(
          [kept_m, jnp.broadcast_to(self.mask_token[...].astype(x.dtype),
                                    (b, n - kept_m.shape[1], x.shape[-1]))], axis=1)
      full = jnp.take_along_axis(full, restore[m][..., None], axis=1)
      pos = self.decoder_posemb[m][...] + self.modality_token[m][...]
      parts.append(full + pos.astype(x.dtype))
    y = jnp.concatenate(parts, axis=1)
    y = layers.run_blocks(self.decoder_blocks, y, "x", scan=self.spec.encoder.scan,
                          grad_boundaries=self.spec.encoder.grad_boundaries)
    y = self.decoder_norm(y)

    preds, offset = {}, 0
    for m in MODALITIES:
      n = restore[m].shape[1]
      preds[m] = self.decoder_pred[m](y[:, offset:offset + n])
      offset += n
    return preds
