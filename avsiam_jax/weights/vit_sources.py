"""Pretrained image ViTs (Google vit_jax / big_vision .npz, timm state dicts) in one layout.

`read_vitjax` and `read_timm` turn a flat tensor dict into `ViTWeights` (our layouts: HWIO patch
kernel, q/k/v stacked as (D, 3, H, K), out as (H, K, D), Dense kernels (in, out)). Name
variants handled (checked against timm's `_load_weights` and big_vision's `vit.load`):

  vit_jax (original in21k ViT-B_16.npz, AugReg files): `embedding/{kernel,bias}`, `cls`,
    `Transformer/posembed_input/pos_embedding` (CLS position first),
    `Transformer/encoderblock_{i}/{LayerNorm_0, MultiHeadDotProductAttention_1/{query,key,value,
    out}, LayerNorm_2, MlpBlock_3/Dense_{0,1}}`, `Transformer/encoder_norm`, `head`,
    `pre_logits`; optionally under `opt/target/` (Flax-optimizer checkpoints).
  big_vision: the same tree under `params/` (or a sub-model such as `params/img/`), blocks
    `LayerNorm_0, MultiHeadDotProductAttention_0, LayerNorm_1, MlpBlock_0`, posemb at
    `pos_embedding` (no CLS position: the CLS token has none) or the older
    `Transformer/pos_embedding`; scanned blocks stacked as `Transformer/encoderblock/...` with a
    leading depth axis; bfloat16 arrays stored as 2-byte voids.
  timm: `patch_embed.proj` (OIHW), `cls_token`, `pos_embed`, `blocks.{i}.{norm1, attn.qkv (fused
    q,k,v rows), attn.proj, norm2, mlp.fc1, mlp.fc2}`, `norm`, `head`, `pre_logits.fc`; a DDP
    `module.` prefix is removed.
"""
from __future__ import annotations

import dataclasses
import math
import re

import numpy as np

from avsiam_jax.weights.common import Source, WeightError, strip_prefix

BLOCK_FIELDS = ("norm1_scale", "norm1_bias", "qkv", "qkv_bias", "out", "out_bias",
                "norm2_scale", "norm2_bias", "fc1_kernel", "fc1_bias", "fc2_kernel", "fc2_bias")


@dataclasses.dataclass
class ViTWeights:
  """An image ViT in our layouts; `src` maps each field to the source key it came from."""
  fmt: str
  patch_kernel: np.ndarray             # (p, p, 3, D)
  patch_bias: np.ndarray               # (D,)
  posemb: np.ndarray                   # (N, D): patch positions only
  blocks: list[dict[str, np.ndarray]]  # BLOCK_FIELDS per block
  norm_scale: np.ndarray
  norm_bias: np.ndarray
  cls: np.ndarray | None               # (D,) CLS token entering block 0 (its posemb added)
  head: tuple[np.ndarray, np.ndarray] | None   # (D, C) kernel, (C,) bias
  src: dict[str, str]
  block_src: list[dict[str, str]]
  dropped: dict[str, str]

  @property
  def width(self) -> int:
    return self.patch_kernel.shape[-1]

  @property
  def patch(self) -> int:
    return self.patch_kernel.shape[0]


def split_cls_posemb(pos_1xNxD: np.ndarray, has_cls: bool) -> tuple[np.ndarray | None, np.ndarray]:
  """(CLS position or None, patch positions); the CLS position exists iff N = g*g + 1."""
  pos = pos_1xNxD.reshape(-1, pos_1xNxD.shape[-1])
  n = pos.shape[0]
  if has_cls and math.isqrt(n - 1) ** 2 == n - 1:
    return pos[0], pos[1:]
  if math.isqrt(n) ** 2 == n:
    return None, pos
  raise WeightError(f"position embedding with {n} entries is neither a square grid nor a "
                    "square grid plus a CLS position")


# ----- Google vit_jax / big_vision ----------------------------------------------------------

def _find_prefix(keys) -> str:
  cands = sorted({k[:-len("embedding/kernel")] for k in keys
                  if k == "embedding/kernel" or k.endswith("/embedding/kernel")})
  if len(cands) != 1:
    raise WeightError("cannot find the ViT's patch embedding: expected exactly one key ending in "
                      f"'embedding/kernel', found {cands or 'none'}")
  return cands[0]


def read_vitjax(flat: dict[str, np.ndarray]) -> ViTWeights:
  prefix = _find_prefix(flat)
  s = Source(flat, "vit_jax npz")
  for k in s.keys():
    if not k.startswith(prefix):
      s.drop(k, f"outside the image model {prefix!r} (optimizer state or another tower)")
  P = prefix
  src: dict[str, str] = {}

  def take(name, key, shape=None):
    src[name] = key
    return s.take(key, shape)

  kernel = take("patch_kernel", P + "embedding/kernel")
  if kernel.ndim != 4 or kernel.shape[0] != kernel.shape[1] or kernel.shape[2] != 3:
    raise WeightError(f"{P}embedding/kernel has shape {kernel.shape}; expected (p, p, 3, D)")
  d = kernel.shape[-1]
  bias = take("patch_bias", P + "embedding/bias", (d,))

  pos_keys = [P + k for k in ("Transformer/posembed_input/pos_embedding",
                              "Transformer/pos_embedding", "pos_embedding") if P + k in s]
  if len(pos_keys) != 1:
    raise WeightError(f"expected one position embedding under {P!r}, found {pos_keys or 'none'} "
                      "(fixed sin-cos posembs are not supported)")
  pos_key = pos_keys[0]
  pos = s.take(pos_key)
  src["posemb"] = pos_key
  cls = None
  if P + "cls" in s:
    cls = s.peek(P + "cls").reshape(d)
    s.drop(P + "cls", "CLS token: the encoder has none")
  cls_pos, pos = split_cls_posemb(pos, cls is not None)
  if cls_pos is not None:
    s.dropped[pos_key + "[0]"] = "CLS position: the encoder has no CLS token"
    cls = cls + cls_pos

  scanned = P + "Transformer/encoderblock/LayerNorm_0/scale" in s
  if scanned:
    depth = s.shape(P + "Transformer/encoderblock/LayerNorm_0/scale")[0]
    roots, idx = [P + "Transformer/encoderblock/"] * depth, list(range(depth))
  else:
    nums = {int(m.group(1)) for k in s.keys()
            if (m := re.match(re.escape(P) + r"Transformer/encoderblock_(\d+)/", k))}
    depth = len(nums)
    if nums != set(range(depth)):
      raise WeightError(f"encoder block indices {sorted(nums)} are not 0..{depth - 1}")
    roots, idx = [P + f"Transformer/encoderblock_{i}/" for i in range(depth)], [None] * depth
  if depth == 0:
    raise WeightError(f"no encoder blocks under {P}Transformer/")
  if roots[0] + "MultiHeadDotProductAttention_1/query/kernel" in s:
    mha, ln2, mlp = "MultiHeadDotProductAttention_1", "LayerNorm_2", "MlpBlock_3"   # vit_jax
  else:
    mha, ln2, mlp = "MultiHeadDotProductAttention_0", "LayerNorm_1", "MlpBlock_0"   # big_vision

  cache: dict[str, np.ndarray] = {}

  def block_take(root, i, name):
    key = root + name
    if i is None:
      return key, s.take(key)
    if key not in cache:
      cache[key] = s.take(key)
      if cache[key].shape[0] != depth:
        raise WeightError(f"scanned key {key!r} has leading axis {cache[key].shape[0]}, "
                          f"expected depth {depth}")
    return f"{key}[{i}]", cache[key][i]

  blocks, block_src = [], []
  for root, i in zip(roots, idx):
    b, bs = {}, {}
    def put(field, name, shape):
      bs[field], b[field] = block_take(root, i, name)
      if b[field].shape != shape:
        raise WeightError(f"{bs[field]!r} has shape {b[field].shape}, expected {shape}")
    q_shape = block_take(root, i, f"{mha}/query/kernel")[1].shape
    if len(q_shape) != 3 or q_shape[0] != d:
      raise WeightError(f"{root}{mha}/query/kernel has shape {q_shape}; expected (D, heads, K)")
    h, k = q_shape[1:]
    for n, ln in (("norm1", "LayerNorm_0"), ("norm2", ln2)):
      put(f"{n}_scale", f"{ln}/scale", (d,))
      put(f"{n}_bias", f"{ln}/bias", (d,))
    qkv_k, qkv_b, names_k, names_b = [], [], [], []
    for t in ("query", "key", "value"):
      kk, vk = block_take(root, i, f"{mha}/{t}/kernel")
      kb, vb = block_take(root, i, f"{mha}/{t}/bias")
      if vk.shape != (d, h, k) or vb.shape != (h, k):
        raise WeightError(f"{kk!r}/{kb!r} have shapes {vk.shape}/{vb.shape}, "
                          f"expected {(d, h, k)}/{(h, k)}")
      qkv_k.append(vk); qkv_b.append(vb); names_k.append(kk); names_b.append(kb)
    b["qkv"], bs["qkv"] = np.stack(qkv_k, axis=1), "+".join(names_k)
    b["qkv_bias"], bs["qkv_bias"] = np.stack(qkv_b, axis=0), "+".join(names_b)
    put("out", f"{mha}/out/kernel", (h, k, d))
    put("out_bias", f"{mha}/out/bias", (d,))
    m = block_take(root, i, f"{mlp}/Dense_0/kernel")[1].shape[-1]
    put("fc1_kernel", f"{mlp}/Dense_0/kernel", (d, m))
    put("fc1_bias", f"{mlp}/Dense_0/bias", (m,))
    put("fc2_kernel", f"{mlp}/Dense_1/kernel", (m, d))
    put("fc2_bias", f"{mlp}/Dense_1/bias", (d,))
    blocks.append(b)
    block_src.append(bs)

  norm_scale = take("norm_scale", P + "Transformer/encoder_norm/scale", (d,))
  norm_bias = take("norm_bias", P + "Transformer/encoder_norm/bias", (d,))
  head = None
  if P + "head/kernel" in s:
    head = (s.peek(P + "head/kernel"), s.peek(P + "head/bias"))
  for name, why in (("head/", "classifier head"),
                    ("pre_logits/", "pre-logits (representation) layer"),
                    ("MAPHead_0/", "attention-pooling head")):
    s.drop_prefix(P + name, f"{why}: not part of the encoder")
  dropped = s.finish()
  return ViTWeights("vitjax", kernel, bias, pos, blocks, norm_scale, norm_bias, cls, head, src,
                    block_src, dropped)


# ----- timm ---------------------------------------------------------------------------------

def read_timm(flat: dict[str, np.ndarray], heads: int) -> ViTWeights:
  """`heads` comes from the model spec: timm's fused qkv does not record it."""
  s = Source(strip_prefix(flat, "module."), "timm state dict")
  src: dict[str, str] = {}

  def take(name, key, shape=None):
    src[name] = key
    return s.take(key, shape)

  w = take("patch_kernel", "patch_embed.proj.weight")
  if w.ndim != 4 or w.shape[1] != 3 or w.shape[2] != w.shape[3]:
    raise WeightError(f"'patch_embed.proj.weight' has shape {w.shape}; expected (D, 3, p, p)")
  d = w.shape[0]
  if d % heads:
    raise WeightError(f"width {d} is not divisible by {heads} heads (config.model.variant)")
  kernel = w.transpose(2, 3, 1, 0)
  bias = take("patch_bias", "patch_embed.proj.bias", (d,))
  cls = None
  if "cls_token" in s:
    cls = s.peek("cls_token").reshape(d)
    s.drop("cls_token", "CLS token: the encoder has none")
  pos = take("posemb", "pos_embed")
  cls_pos, pos = split_cls_posemb(pos, cls is not None)
  if cls_pos is not None:
    s.dropped["pos_embed[0]"] = "CLS position: the encoder has no CLS token"
    cls = cls + cls_pos

  nums = {int(m.group(1)) for key in s.keys() if (m := re.match(r"blocks\.(\d+)\.", key))}
  depth = len(nums)
  if depth == 0 or nums != set(range(depth)):
    raise WeightError(f"timm block indices {sorted(nums)} are not 0..{depth - 1}")
  blocks, block_src = [], []
  for i in range(depth):
    b, bs = timm_block(s, f"blocks.{i}.", d, heads, ("",))
    blocks.append(b)
    block_src.append(bs)
  norm_scale = take("norm_scale", "norm.weight", (d,))
  norm_bias = take("norm_bias", "norm.bias", (d,))
  head = None
  if "head.weight" in s:
    head = (s.peek("head.weight").T, s.peek("head.bias"))
  s.drop_prefix("head.", "classifier head: not part of the encoder")
  s.drop_prefix("pre_logits.", "pre-logits (representation) layer: not part of the encoder")
  dropped = s.finish()
  return ViTWeights("timm", kernel, bias, pos, blocks, norm_scale, norm_bias, cls, head, src,
                    block_src, dropped)


def timm_block(s: Source, root: str, d: int, heads: int, norm_suffixes=("",)):
  """One timm-layout block (`root` ends in '.') in our layouts, with `norm1{sfx}`/`norm2{sfx}`
  LayerNorms for each suffix (released AVSiam blocks have norm1_a, norm1_v, ...)."""
  k = d // heads
  b, bs = {}, {}
  def t(field, key, shape):
    bs[field] = root + key
    return s.take(root + key, shape)
  m = s.shape(root + "mlp.fc1.weight")[0]
  for sfx in norm_suffixes:
    for n in ("norm1", "norm2"):
      b[f"{n}{sfx}_scale"] = t(f"{n}{sfx}_scale", f"{n}{sfx}.weight", (d,))
      b[f"{n}{sfx}_bias"] = t(f"{n}{sfx}_bias", f"{n}{sfx}.bias", (d,))
  b["qkv"] = t("qkv", "attn.qkv.weight", (3 * d, d)).T.reshape(d, 3, heads, k)
  b["qkv_bias"] = t("qkv_bias", "attn.qkv.bias", (3 * d,)).reshape(3, heads, k)
  b["out"] = t("out", "attn.proj.weight", (d, d)).T.reshape(heads, k, d)
  b["out_bias"] = t("out_bias", "attn.proj.bias", (d,))
  b["fc1_kernel"] = t("fc1_kernel", "mlp.fc1.weight", (m, d)).T
  b["fc1_bias"] = t("fc1_bias", "mlp.fc1.bias", (m,))
  b["fc2_kernel"] = t("fc2_kernel", "mlp.fc2.weight", (d, m)).T
  b["fc2_bias"] = t("fc2_bias", "mlp.fc2.bias", (d,))
  return b, bs
