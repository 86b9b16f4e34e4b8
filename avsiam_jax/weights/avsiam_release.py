"""Released AVSiam PyTorch checkpoints (GenjiB/AVSiam) into the model's pure-dict params.

Key names are those of the released `CAVMAE_BASE` (pretraining) and `CAVMAEFT_BASE`
(finetuning) modules, saved from DDP (`module.` prefix):

  {bb}.patch_embed.proj, {bb}.patch_embed_a.proj (1 input channel), {bb}.cls_token,
  {bb}.pos_embed (1, 1+Nv, D), {bb}.pos_embed_a (1, Na, D), {bb}.norm (video), {bb}.norm_a,
  {bb}.head (the timm ImageNet head, unused),
  {bb}.blocks.i.{norm1, norm1_a, norm1_v, attn.qkv, attn.proj, norm2, norm2_a, norm2_v, mlp.fc1,
  mlp.fc2}, my_blocks.i.* (the same modules registered twice), my_patch_embed(_a).proj (unused),
  ast_base.* (pretraining: a deep copy of the backbone used only by the released MAE pass for
  audio), mm_layer_1/2.* (blocks; the released code runs them with the `_a` norms),
  decoder_embed, decoder_pos_embed_a/v, mask_token, decoder_modality_a/v, decoder_blocks.k.*
  (run with norm1/norm2), decoder_norm, decoder_pred_a/v. Finetuned files (CAVMAEFT_BASE) have no
  decoder nor ast_base and add the heads mlp_head_a (audio), mlp_head (video), mlp_head_mm
  (audio-visual), each Sequential(LayerNorm, Linear), and mlp_head_mm_v2 (never called).
  bb is vit_base (verified in the released source); vit_large / vit_huge are accepted by
  analogy (the released .pyc files of the unreleased Large/Huge models name them) but no
  checkpoint of those sizes has been published.

Reproduced exactly (the released retrieval/finetuning encoder path): tokens doubled before the
blocks (double_tokens=True), per-modality norms with eps 1e-5, final norms with eps 1e-6, the
trained audio posemb, the multimodal blocks, the decoder (eps 1e-5) and, into the classifier,
the three heads. With `separate_audio_patch` (the release default) the trained audio patch
projection is stored as it is; a model without one takes it only if it equals the RGB kernel's
channel mean (or, told so, drops it), its bias folded into the audio posemb.
"""
from __future__ import annotations

import re

import numpy as np

from avsiam_jax.models.avsiam import AVSiamSpec
from avsiam_jax.weights.common import (Source, SpecMismatch, Target, WeightError, require,
                                       strip_prefix)
from avsiam_jax.weights import signature
from avsiam_jax.weights.place import put_block
from avsiam_jax.weights.vit_sources import timm_block

BACKBONES = ("vit_base", "vit_large", "vit_huge")
DECODER_FRESH = ("decoder_embed", "mask_token", "decoder_posemb", "modality_token",
                 "decoder_blocks", "decoder_norm", "decoder_pred")
RELEASE_SWITCHES = {"double_tokens": True, "modality_norms": True, "block_norm_eps": 1e-5,
                    "final_norm_eps": 1e-6}
RELEASE_DECODER_EPS = 1e-5
# Classifier head -> released module, and its input width in encoder widths.
HEADS = (("head_a", "mlp_head_a", 1), ("head_v", "mlp_head", 1), ("head_av", "mlp_head_mm", 2))
_WHY = {
    "double_tokens": "the released model adds the patch embedding to itself (x + norm_pre(x), "
                     "norm_pre = identity)",
    "modality_norms": "the released blocks keep separate audio/video LayerNorms",
    "block_norm_eps": "the released blocks use torch's default LayerNorm eps",
    "final_norm_eps": "the released final norms are timm's (eps 1e-6)",
}


def _indices(s: Source, pattern: str) -> list[int]:
  nums = {int(m.group(1)) for k in s.keys() if (m := re.match(pattern, k))}
  if nums != set(range(len(nums))):
    raise WeightError(f"indices {sorted(nums)} of {pattern!r} are not 0..{len(nums) - 1}")
  return sorted(nums)


def num_classes(flat: dict[str, np.ndarray]) -> int:
  """Classes scored by a released finetuned state dict's heads; WeightError if it has none."""
  flat = strip_prefix(flat, "module.")
  shapes = {h: flat[f"{h}.1.weight"].shape for _, h, _ in HEADS if f"{h}.1.weight" in flat}
  if not shapes:
    raise WeightError("the state dict has no classification heads (mlp_head_a, mlp_head, "
                      "mlp_head_mm): it is not a finetuned AVSiam classifier")
  counts = {h: s[0] for h, s in shapes.items()}
  if len(shapes) < len(HEADS) or len(set(counts.values())) != 1:
    raise WeightError(f"the released heads do not score one set of classes: {counts}")
  return next(iter(counts.values()))


def has_heads(flat: dict[str, np.ndarray]) -> bool:
  return any(k.startswith(("mlp_head", "module.mlp_head")) for k in flat)


def place_release(flat: dict[str, np.ndarray], spec: AVSiamSpec, params: dict, *,
                  allow_lossy_audio_patch: bool = False) -> tuple[dict, dict]:
  """New pure dict from a released state dict; also {'dropped', 'notes', 'fresh', 'required'}.

  `params` is the pretraining model's (AVSiam) or the classifier's (AVSiamClassifier, its heads
  filled from the finetuned file's): the target's parameters decide what is placed. 'required'
  lists the spec fields the result depends on.
  """
  enc = spec.encoder
  s = Source(strip_prefix(flat, "module."), "released AVSiam state dict")
  bbs = sorted({k.split(".")[0] for k in s.keys()} & set(BACKBONES))
  if len(bbs) != 1:
    raise WeightError(f"expected one backbone prefix among {BACKBONES}, found {bbs or 'none'}")
  B = bbs[0] + "."
  for f, v in RELEASE_SWITCHES.items():
    require(getattr(enc, f), v, f"config.model.{f}", _WHY[f])
  shape = s.shape(B + "patch_embed.proj.weight")
  d, p = shape[0], enc.patch
  if d != enc.width or shape[2:] != (p, p):
    raise SpecMismatch(f"{B}patch_embed.proj.weight has shape {shape} but the model has width "
                       f"{enc.width}, patch {p}: set config.model.variant")
  t = Target(params)
  notes = []

  # Patch embeddings.
  kernel = s.take(B + "patch_embed.proj.weight", (d, 3, p, p)).transpose(2, 3, 1, 0)
  bias = s.take(B + "patch_embed.proj.bias", (d,))
  t.put("encoder/patch_kernel", kernel, B + "patch_embed.proj.weight")
  t.put("encoder/patch_bias", bias, B + "patch_embed.proj.bias")
  akey = B + "patch_embed_a.proj.weight"
  audio_kernel = s.peek(akey)
  if audio_kernel.shape != (d, 1, p, p):
    raise WeightError(f"{akey!r} has shape {audio_kernel.shape}, expected {(d, 1, p, p)}")
  mean_rgb = kernel.mean(axis=2, keepdims=True)
  err = float(np.max(np.abs(audio_kernel.transpose(2, 3, 1, 0) - mean_rgb)))
  tol = 1e-6 * max(1.0, float(np.max(np.abs(mean_rgb))))
  if "encoder/audio_patch_kernel" in t:   # a model with a separate audio projection
    t.put("encoder/audio_patch_kernel", s.take(akey).transpose(2, 3, 1, 0), akey)
  elif err <= tol:
    s.take(akey)
    notes.append(f"{akey} equals the RGB channel mean of the patch kernel (max diff {err:.2e})")
  elif allow_lossy_audio_patch:
    s.drop(akey, f"LOSSY: the trained audio patch kernel differs from the RGB channel mean by "
                 f"up to {err:.3g}; the model derives the audio kernel from the RGB one")
    notes.append(f"LOSSY: {akey} dropped (max diff {err:.3g} from the RGB channel mean)")
  else:
    raise WeightError(
        f"{akey!r}: the released audio patch kernel differs from the channel mean of the RGB "
        f"kernel by up to {err:.3g}, and the model has one shared kernel. Converting would change "
        "the audio outputs; pass allow_lossy_audio_patch=True (CLI --allow-lossy-audio-patch) to "
        "drop it anyway")
  audio_bias = s.take(B + "patch_embed_a.proj.bias", (d,))

  # Position embeddings (the audio patch bias is folded into the audio posemb).
  nv, na = enc.num_video_tokens, enc.num_audio_tokens
  pos = s.take(B + "pos_embed")
  if pos.shape != (1, 1 + nv, d):
    raise SpecMismatch(f"{B}pos_embed has shape {pos.shape}, the model needs {(1, 1 + nv, d)}: "
                       "set config.model.image_size")
  t.put("encoder/video_posemb", pos[0, 1:], B + "pos_embed")
  s.dropped[B + "pos_embed[0]"] = "CLS position: unused by the released model"
  pos_a = s.take(B + "pos_embed_a")
  if pos_a.shape != (1, na, d):
    raise SpecMismatch(f"{B}pos_embed_a has {pos_a.shape[1]} audio positions, the model "
                       f"{na} (grid {enc.audio_grid}): set config.model.audio_frames, "
                       "config.model.mel_bins or config.model.audio_patch_mode")
  if "encoder/audio_patch_bias" in t:
    t.put("encoder/audio_patch_bias", audio_bias, B + "patch_embed_a.proj.bias")
    t.put("encoder/audio_posemb", pos_a[0], B + "pos_embed_a")
  else:
    t.put("encoder/audio_posemb", pos_a[0] + (audio_bias - bias),
          f"{B}pos_embed_a + {B}patch_embed_a.proj.bias - {B}patch_embed.proj.bias")
    notes.append("audio patch bias folded into encoder/audio_posemb (bias_a - bias_rgb added)")
  s.drop(B + "cls_token", "CLS token: unused by the released model")

  # Encoder blocks and final norms.
  heads = enc.heads
  depth = len(_indices(s, re.escape(B) + r"blocks\.(\d+)\."))
  if depth != enc.depth:
    raise SpecMismatch(f"the source has {depth} encoder blocks, the model {enc.depth}: set "
                       "config.model.variant")
  for i in range(depth):
    root = f"{B}blocks.{i}."
    b, bs = timm_block(s, root, d, heads, ("_a", "_v"))
    put_block(t, f"encoder/blocks/{i}", b, bs, {"a": "_a", "v": "_v"})
    for n in ("norm1", "norm2"):
      for w in ("weight", "bias"):
        s.drop(f"{root}{n}.{w}", "the block's original norm: unused by the audio/video paths")
  for stream, name in (("v", "norm"), ("a", "norm_a")):
    t.put(f"encoder/norm/{stream}/scale", s.take(f"{B}{name}.weight", (d,)), f"{B}{name}.weight")
    t.put(f"encoder/norm/{stream}/bias", s.take(f"{B}{name}.bias", (d,)), f"{B}{name}.bias")
  s.drop_prefix(B + "head.", "the timm ImageNet head: unused")

  # Duplicates and unused modules.
  for k in s.keys():
    if k.startswith("my_blocks."):
      twin = B + "blocks." + k[len("my_blocks."):]
      if twin not in s or not np.array_equal(s.flat[k], s.flat[twin]):
        raise WeightError(f"{k!r} should duplicate {twin!r} (the same module) but does not")
      s.drop(k, f"duplicate of {twin}")
  s.drop_prefix("my_patch_embed_a.", "unused module left at its initial value")
  s.drop_prefix("my_patch_embed.", "unused module left at its initial value")
  if s.drop_prefix("ast_base.", "the released MAE pass's separate audio copy of the backbone; "
                                "this model shares one encoder"):
    notes.append("ast_base.* dropped: the released reconstruction branch encoded audio with a "
                 "separate backbone copy; here both branches share the encoder")
  if "head_a/dense/kernel" in t:
    _place_heads(s, t, d)
    s.drop_prefix("mlp_head_mm_v2.", "a head the released forward never calls")
    notes.append("heads: mlp_head_a -> head_a, mlp_head -> head_v, mlp_head_mm -> head_av")
  else:
    s.drop_prefix("mlp_head", "finetuning classification head: the model has none")

  # Multimodal layers: the released code runs them with their audio-stream norms.
  mm = sorted({int(m_.group(1)) for k in s.keys() if (m_ := re.match(r"mm_layer_(\d+)\.", k))})
  if mm != list(range(1, len(mm) + 1)):
    raise WeightError(f"multimodal layers mm_layer_{mm} are not numbered 1..{len(mm)}")
  require(len(mm), spec.mm_depth, "config.model.mm_depth", f"the source has {len(mm)} mm layers")
  for j, i in enumerate(mm):
    root = f"mm_layer_{i}."
    b, bs = timm_block(s, root, d, heads, ("_a",))
    put_block(t, f"mm_blocks/{j}", b, bs, {"x": "_a"})
    for n in ("norm1", "norm1_v", "norm2", "norm2_v"):
      for w in ("weight", "bias"):
        s.drop(f"{root}{n}.{w}", "norm unused by the released multimodal layers (they use _a)")
  if "mm_norm/scale" in t:
    t.keep_fresh("mm_norm")

  required = list(signature.ENCODER)
  if "decoder_embed/kernel" not in t:   # the classifier
    for prefix in ("decoder_", "mask_token"):
      s.drop_prefix(prefix, "the classifier has no decoder")
  elif "decoder_embed.weight" in s:
    require(spec.decoder_norm_eps, RELEASE_DECODER_EPS, "config.model.decoder_norm_eps",
            "the released decoder LayerNorms use torch's default eps")
    _place_decoder(s, spec, t, d)
    required += signature.fields(("shape", "trained"), ("pretrain",))
    if "mm_norm/scale" in t:
      notes.append("mm_norm starts fresh: the released pretraining model feeds the multimodal "
                   "layers' output to decoder_embed without a LayerNorm")
    else:
      notes.append("no mm_norm (model.mm_norm off): the multimodal layers feed decoder_embed "
                   "directly, as released")
  else:
    for p_ in DECODER_FRESH:
      t.keep_fresh(p_)
    # The fresh decoder is stored with these shapes, and mm_norm or not.
    required += signature.fields(("shape",), ("pretrain",))
    notes.append("no decoder in the source (a finetuned checkpoint): decoder fresh")
  return t.result(), {"dropped": s.finish(), "notes": notes, "fresh": sorted(t.fresh),
                      "required": required}


def _place_heads(s: Source, t: Target, d: int) -> None:
  """The released heads, Sequential(LayerNorm, Linear), into the classifier's Head modules."""
  for ours, theirs, k in HEADS:
    n = t.shape(f"{ours}/dense/kernel")[1]
    for w, name in (("weight", "scale"), ("bias", "bias")):
      key = f"{theirs}.0.{w}"
      t.put(f"{ours}/norm/{name}", s.take(key, (k * d,)), key)
    key = f"{theirs}.1.weight"
    t.put(f"{ours}/dense/kernel", s.take(key, (n, k * d)).T, key)
    key = f"{theirs}.1.bias"
    t.put(f"{ours}/dense/bias", s.take(key, (n,)), key)


def _place_decoder(s: Source, spec: AVSiamSpec, t: Target, d: int) -> None:
  enc, dw = spec.encoder, spec.decoder_width
  w = s.take("decoder_embed.weight")
  if w.shape != (dw, d):
    raise SpecMismatch(f"decoder_embed.weight has shape {w.shape}, the model {(dw, d)}: set "
                       "config.model.decoder_width")
  t.put("decoder_embed/kernel", w.T, "decoder_embed.weight")
  t.put("decoder_embed/bias", s.take("decoder_embed.bias", (dw,)), "decoder_embed.bias")
  for m, n in (("a", enc.num_audio_tokens), ("v", enc.num_video_tokens)):
    key = f"decoder_pos_embed_{m}"
    t.put(f"decoder_posemb/{m}", s.take(key, (1, n, dw))[0], key)
    key = f"decoder_modality_{m}"
    t.put(f"modality_token/{m}", s.take(key, (1, 1, dw)).reshape(dw), key)
  t.put("mask_token", s.take("mask_token", (1, 1, dw)).reshape(dw), "mask_token")
  depth = len(_indices(s, r"decoder_blocks\.(\d+)\."))
  require(depth, spec.decoder_depth, "config.model.decoder_depth",
          f"the source has {depth} decoder blocks")
  if dw % spec.decoder_heads:
    raise SpecMismatch(f"decoder width {dw} is not divisible by {spec.decoder_heads} heads: set "
                       "config.model.decoder_heads")
  for k in range(depth):
    root = f"decoder_blocks.{k}."
    b, bs = timm_block(s, root, dw, spec.decoder_heads, ("",))
    put_block(t, f"decoder_blocks/{k}", b, bs, {"x": ""})
    for n in ("norm1_a", "norm1_v", "norm2_a", "norm2_v"):
      for w_ in ("weight", "bias"):
        s.drop(f"{root}{n}.{w_}", "norm unused by the released decoder (it uses norm1/norm2)")
  t.put("decoder_norm/scale", s.take("decoder_norm.weight", (dw,)), "decoder_norm.weight")
  t.put("decoder_norm/bias", s.take("decoder_norm.bias", (dw,)), "decoder_norm.bias")
  p = enc.patch
  for m, c in (("a", 1), ("v", 3)):
    key = f"decoder_pred_{m}"
    t.put(f"decoder_pred/{m}/kernel", s.take(key + ".weight", (p * p * c, dw)).T, key + ".weight")
    t.put(f"decoder_pred/{m}/bias", s.take(key + ".bias", (p * p * c,)), key + ".bias")
