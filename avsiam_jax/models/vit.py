"""The shared ViT encoder: one set of weights for audio spectrograms and video frames.

Inputs: video frames (B, H, W, 3) and audio fbank (B, T, F) with T time frames and F mel bins.
The spectrogram is transposed to an (F, T) one-channel image, so audio tokens are
frequency-major (token = f * T_grid + t), as in the released models.
"""
from __future__ import annotations

import dataclasses
import math

import einops
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from avsiam_jax.models import layers

# width, depth, mlp, heads, patch
VARIANTS = {
    "test": (32, 2, 64, 2, 16),     # unit tests
    "tiny": (128, 4, 512, 4, 16),   # the CPU demo
    "Ti": (192, 12, 768, 3, 16),
    "S": (384, 12, 1536, 6, 16),
    "B": (768, 12, 3072, 12, 16),
    "L": (1024, 24, 4096, 16, 16),
    "H": (1280, 32, 5120, 16, 14),
}


@dataclasses.dataclass(frozen=True)
class EncoderSpec:
  width: int
  depth: int
  mlp: int
  heads: int
  patch: int
  image_size: int = 224
  audio_frames: int = 1024
  mel_bins: int = 128
  audio_patch_mode: str = "floor"     # "floor": drop the edge remainder; "pad": zero-pad up
  audio_posemb_init: str = "nearest1d"  # "nearest1d" (released) or "bilinear2d"
  modality_norms: bool = True         # separate LayerNorms per modality (released)
  double_tokens: bool = False         # released quirk: x = x + x before the blocks
  separate_audio_patch: bool = False  # released: audio projection trained apart (from the mean)
  block_norm_eps: float = 1e-5
  final_norm_eps: float = 1e-6
  # Recompute block activations in the backward pass (encoder, multimodal and decoder blocks):
  # same numbers, more compute, less memory where the compiler keeps to it (README);
  # layers.REMAT_POLICIES ("none", "dots", "full").
  remat: str = "none"
  # Run each stack of blocks as one jax.lax.scan (layers.run_blocks): one block body to compile.
  scan: bool = False
  # Attention implementation of every block (layers.ATTENTION; config "auto" resolves it).
  attention: str = "dense"
  # Materialize the residual stream's gradient at every unrolled block (layers.grad_boundary):
  # config resolves it for CPU backends, where XLA's fusion would recompute it.
  grad_boundaries: bool = False

  @property
  def video_grid(self) -> tuple[int, int]:
    if self.image_size % self.patch:
      raise ValueError(f"image_size {self.image_size} is not divisible by patch {self.patch}")
    g = self.image_size // self.patch
    return g, g

  @property
  def audio_grid(self) -> tuple[int, int]:
    """(frequency, time) patch grid of the transposed spectrogram."""
    rnd = {"floor": math.floor, "pad": math.ceil}.get(self.audio_patch_mode)
    if rnd is None:
      raise ValueError(f"audio_patch_mode must be 'floor' or 'pad', got {self.audio_patch_mode!r}")
    return rnd(self.mel_bins / self.patch), rnd(self.audio_frames / self.patch)

  @property
  def num_video_tokens(self) -> int:
    return math.prod(self.video_grid)

  @property
  def num_audio_tokens(self) -> int:
    return math.prod(self.audio_grid)

  @property
  def streams(self) -> tuple[str, ...]:
    return ("a", "v") if self.modality_norms else ("x",)

  def stream(self, modality: str) -> str:
    return modality if self.modality_norms else "x"


def encoder_spec(variant: str, **overrides) -> EncoderSpec:
  """`variant` is a table name with an optional patch size, e.g. "B/16", "H/14" or "test"."""
  name, _, patch = variant.partition("/")
  if name not in VARIANTS:
    raise ValueError(f"unknown ViT variant {variant!r}; known: {sorted(VARIANTS)}")
  width, depth, mlp, heads, default_patch = VARIANTS[name]
  return EncoderSpec(width=width, depth=depth, mlp=mlp, heads=heads,
                     patch=int(patch) if patch else default_patch, **overrides)


def patchify_video(x_BxHxWx3, p: int):
  """(B, H, W, C) -> (B, H/p * W/p, p*p*C), patches row-major, pixels (row, col, channel)."""
  return einops.rearrange(x_BxHxWx3, "b (gh ph) (gw pw) c -> b (gh gw) (ph pw c)", ph=p, pw=p)


def audio_image(fbank_BxTxF, spec: EncoderSpec):
  """(B, T, F) fbank -> (B, F', T', 1) image cut ("floor") or zero-padded ("pad") to the grid."""
  gf, gt = spec.audio_grid
  x = einops.rearrange(fbank_BxTxF, "b t f -> b f t 1")
  hf, wt = gf * spec.patch, gt * spec.patch
  f, t = x.shape[1], x.shape[2]
  x = x[:, :min(f, hf), :min(t, wt)]
  return jnp.pad(x, ((0, 0), (0, max(0, hf - f)), (0, max(0, wt - t)), (0, 0)))


def patchify_audio(fbank_BxTxF, spec: EncoderSpec):
  return patchify_video(audio_image(fbank_BxTxF, spec), spec.patch)


def resize_posemb(posemb_NxD: np.ndarray | jax.Array, src_grid, dst_grid, method: str):
  """Audio posemb from the image one: 1-D nearest over flattened positions, or 2-D bilinear."""
  n_dst = math.prod(dst_grid)
  if method == "nearest1d":
    # Position p takes image position floor(p * N_src / N_dst), as the released code does.
    idx = (np.arange(n_dst) * math.prod(src_grid)) // n_dst
    return posemb_NxD[idx]
  if method == "bilinear2d":
    d = posemb_NxD.shape[-1]
    grid = jnp.asarray(posemb_NxD).reshape(*src_grid, d)
    return jax.image.resize(grid, (*dst_grid, d), "bilinear").reshape(n_dst, d)
  raise ValueError(f"audio_posemb_init must be 'nearest1d' or 'bilinear2d', got {method!r}")


class Encoder(nnx.Module):
  """ViT encoder without CLS token; outputs final-normed tokens per modality."""

  def __init__(self, spec: EncoderSpec, *, rngs: nnx.Rngs, dtype=jnp.float32):
    d, p = spec.width, spec.patch
    self.spec = spec
    self.dtype = dtype
    init = nnx.initializers.lecun_normal()
    self.patch_kernel = nnx.Param(init(rngs.params(), (p, p, 3, d), jnp.float32),
                                  logical_axes=(None, None, None, "embed"))
    self.patch_bias = layers.param(rngs, layers.zeros, (d,), ("embed",))
    if spec.separate_audio_patch:
      self.audio_patch_kernel = nnx.Param(self.patch_kernel[...].mean(axis=2, keepdims=True),
                                          logical_axes=(None, None, None, "embed"))
      self.audio_patch_bias = nnx.Param(self.patch_bias[...], logical_axes=("embed",))
    pos_init = nnx.initializers.normal(0.02)
    self.video_posemb = layers.param(rngs, pos_init, (spec.num_video_tokens, d), (None, "embed"))
    audio_pos = resize_posemb(self.video_posemb[...], spec.video_grid, spec.audio_grid,
                              spec.audio_posemb_init)
    self.audio_posemb = nnx.Param(jnp.asarray(audio_pos), logical_axes=(None, "embed"))
    self.blocks = nnx.List([
        layers.Block(d, spec.heads, spec.mlp, streams=spec.streams, eps=spec.block_norm_eps,
                     rngs=rngs, dtype=dtype, remat=spec.remat, attention=spec.attention)
        for _ in range(spec.depth)])
    self.norm = nnx.Dict({s: layers.LayerNorm(d, eps=spec.final_norm_eps, rngs=rngs, dtype=dtype)
                          for s in spec.streams})

  def patch_kernel_for(self, modality: str):
    """(p*p*C, D) projection; audio uses the mean over the RGB input channels (one projection)."""
    if modality == "a" and self.spec.separate_audio_patch:
      k = self.audio_patch_kernel[...]
    else:
      k = self.patch_kernel[...]
      if modality == "a":
        k = k.mean(axis=2, keepdims=True)
    return k.reshape(-1, k.shape[-1])

  def patch_bias_for(self, modality: str):
    if modality == "a" and self.spec.separate_audio_patch:
      return self.audio_patch_bias[...]
    return self.patch_bias[...]

  def patches(self, x, modality: str):
    if modality == "a":
      return patchify_audio(x, self.spec)
    return patchify_video(x, self.spec.patch)

  def project_patches(self, patches_BxNxP, modality: str):
    """Patch projection plus position embedding: (B, N, p*p*C) -> (B, N, D) tokens."""
    dt = self.dtype
    x = patches_BxNxP.astype(dt) @ self.patch_kernel_for(modality).astype(dt)
    pos = self.audio_posemb if modality == "a" else self.video_posemb
    x = x + self.patch_bias_for(modality).astype(dt) + pos[...].astype(dt)
    if self.spec.double_tokens:
      x = x + x
    return layers.constrain(x, layers.TOKENS)

  def encode_tokens(self, x_BxNxD, modality: str, segments=None):
    """Blocks and final norm over (possibly masked, possibly packed) embedded tokens."""
    s = self.spec.stream(modality)
    x_BxNxD = layers.run_blocks(self.blocks, x_BxNxD, s, scan=self.spec.scan, segments=segments,
                                  grad_boundaries=self.spec.grad_boundaries)
    return self.norm[s](x_BxNxD)

  def __call__(self, x, modality: str):
    """Unmasked encoding of raw inputs: (B, N, D) tokens."""
    return self.encode_tokens(self.project_patches(self.patches(x, modality), modality),
                              modality)


def multimodal_blocks(encoder: Encoder, depth: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
  """Joint audio-visual blocks, started as copies of the encoder's last blocks (video norms).

  They follow the encoder's `remat` and `attention` switches: same width, and they see both
  modalities' tokens.
  """
  spec = encoder.spec
  if depth > spec.depth:
    raise ValueError(f"{depth} multimodal blocks exceed encoder depth {spec.depth}")
  blocks = nnx.List([
      layers.Block(spec.width, spec.heads, spec.mlp, streams=("x",), eps=spec.block_norm_eps,
                   rngs=rngs, dtype=dtype, remat=spec.remat, attention=spec.attention)
      for _ in range(depth)])
  v = spec.stream("v")
  for mm, src in zip(blocks, encoder.blocks[spec.depth - depth:]):
    nnx.update(mm.attn, nnx.state(src.attn))
    nnx.update(mm.mlp, nnx.state(src.mlp))
    nnx.update(mm.norm1["x"], nnx.state(src.norm1[v]))
    nnx.update(mm.norm2["x"], nnx.state(src.norm2[v]))
  return blocks
