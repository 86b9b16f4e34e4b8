"""AVSep: the separate-encoder baseline of the paper's Table 5.

Everything as AVSiam except that audio gets an encoder of its own; `encoder` serves video (and
seeds the multimodal blocks, as in AVSiam). Both encoders keep the spec's per-modality norms,
so each holds a set it never uses; that keeps the parameter count at exactly AVSiam's plus one
encoder.
"""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from avsiam_jax.models.avsiam import AVSiam, AVSiamSpec
from avsiam_jax.models.vit import Encoder


class AVSep(AVSiam):

  def __init__(self, spec: AVSiamSpec, *, rngs: nnx.Rngs, dtype=jnp.float32):
    super().__init__(spec, rngs=rngs, dtype=dtype)
    # Made last, so the shared parts get the same initial weights as AVSiam from the same rngs.
    self.audio_encoder = Encoder(spec.encoder, rngs=rngs, dtype=dtype)

  def encoder_for(self, modality: str) -> Encoder:
    return self.audio_encoder if modality == "a" else self.encoder
