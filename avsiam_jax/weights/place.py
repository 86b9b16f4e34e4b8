"""The AVSiam initialization from an image ViT, on the model's pure-dict params.

One RGB patch kernel (the audio path uses its channel mean on the fly, so nothing is stored for
audio); audio posemb = the configured resize of the image posemb; per-modality LayerNorms
copied from the single pretrained ones; multimodal blocks copied from the last encoder blocks
(video-stream norms, as `vit.multimodal_blocks`); `mm_norm` (when the model has one) and the
decoder keep their fresh values from `params`.
"""
from __future__ import annotations

import numpy as np

from avsiam_jax.models.avsiam import AVSiamSpec
from avsiam_jax.models.vit import resize_posemb
from avsiam_jax.weights.common import SpecMismatch, Target
from avsiam_jax.weights.vit_sources import ViTWeights

# Parameters that the AVSiam initialization always leaves fresh (from `params`).
FRESH_FROM_VIT = ("mm_norm", "decoder_embed", "mask_token", "decoder_posemb", "modality_token",
                  "decoder_blocks", "decoder_norm", "decoder_pred")

ATTN_MLP = {"attn/qkv": "qkv", "attn/qkv_bias": "qkv_bias", "attn/out": "out",
            "attn/out_bias": "out_bias", "mlp/fc1/kernel": "fc1_kernel", "mlp/fc1/bias": "fc1_bias",
            "mlp/fc2/kernel": "fc2_kernel", "mlp/fc2/bias": "fc2_bias"}


def put_block(t: Target, path: str, b: dict, bs: dict, streams: dict[str, str]) -> None:
  """Block fields into `path`; `streams` maps each target norm stream to a source norm suffix."""
  for tp, f in ATTN_MLP.items():
    t.put(f"{path}/{tp}", b[f], bs[f])
  for stream, sfx in streams.items():
    for n in ("norm1", "norm2"):
      t.put(f"{path}/{n}/{stream}/scale", b[f"{n}{sfx}_scale"], bs[f"{n}{sfx}_scale"])
      t.put(f"{path}/{n}/{stream}/bias", b[f"{n}{sfx}_bias"], bs[f"{n}{sfx}_bias"])


def check_vit_shapes(vit: ViTWeights, spec: AVSiamSpec) -> None:
  enc = spec.encoder
  b0 = vit.blocks[0]
  got = {"width": vit.width, "patch": vit.patch, "depth": len(vit.blocks),
         "mlp": b0["fc1_kernel"].shape[1], "heads": b0["qkv"].shape[2]}
  for f, v in got.items():
    if getattr(enc, f) != v:
      raise SpecMismatch(f"the source ViT has {f} {v} but the model has {getattr(enc, f)}: set "
                         f"config.model.variant to the source's size (e.g. B/16, L/16, H/14)")
  n = vit.posemb.shape[0]
  if n != enc.num_video_tokens:
    raise SpecMismatch(f"the source has {n} patch positions, the model {enc.num_video_tokens} "
                       f"(grid {enc.video_grid}): set config.model.image_size to the source's "
                       "resolution")


def place_vit(vit: ViTWeights, spec: AVSiamSpec, params: dict) -> tuple[dict, dict]:
  """New pure dict with the ViT placed in; also {'notes': [...]} describing what was derived."""
  enc = spec.encoder
  check_vit_shapes(vit, spec)
  t = Target(params)
  t.put("encoder/patch_kernel", vit.patch_kernel, vit.src["patch_kernel"])
  t.put("encoder/patch_bias", vit.patch_bias, vit.src["patch_bias"])
  if "encoder/audio_patch_kernel" in t:   # a model with a separate audio projection
    t.put("encoder/audio_patch_kernel", vit.patch_kernel.mean(axis=2, keepdims=True),
          vit.src["patch_kernel"] + " (RGB channel mean)")
  if "encoder/audio_patch_bias" in t:
    t.put("encoder/audio_patch_bias", vit.patch_bias, vit.src["patch_bias"])
  t.put("encoder/video_posemb", vit.posemb, vit.src["posemb"])
  audio_pos = np.asarray(resize_posemb(vit.posemb, enc.video_grid, enc.audio_grid,
                                       enc.audio_posemb_init))
  t.put("encoder/audio_posemb", audio_pos, f"{vit.src['posemb']} ({enc.audio_posemb_init} resize)")
  same = {s: "" for s in enc.streams}
  for i, (b, bs) in enumerate(zip(vit.blocks, vit.block_src)):
    put_block(t, f"encoder/blocks/{i}", b, bs, same)
  for s in enc.streams:
    t.put(f"encoder/norm/{s}/scale", vit.norm_scale, vit.src["norm_scale"])
    t.put(f"encoder/norm/{s}/bias", vit.norm_bias, vit.src["norm_bias"])
  first = enc.depth - spec.mm_depth
  for j in range(spec.mm_depth):
    b, bs = vit.blocks[first + j], vit.block_src[first + j]
    put_block(t, f"mm_blocks/{j}", b, {k: f"{v} (copy for mm block {j})" for k, v in bs.items()},
              {"x": ""})
  for p in FRESH_FROM_VIT:
    t.keep_fresh(p, optional=p == "mm_norm")
  notes = [
      "audio patch kernel: mean over the RGB input channels of encoder/patch_kernel, computed by "
      "the model on the fly (nothing stored)",
      f"audio posemb: {enc.audio_posemb_init} resize of the {enc.video_grid} image posemb to the "
      f"{enc.audio_grid} audio grid",
      "per-modality LayerNorms: copies of the single pretrained ones" if enc.modality_norms
      else "single LayerNorm stream 'x'",
      f"mm_blocks: copies of encoder blocks {list(range(first, enc.depth))}",
      "fresh: " + ", ".join(FRESH_FROM_VIT)]
  return t.result(), {"notes": notes, "fresh": sorted(t.fresh)}
