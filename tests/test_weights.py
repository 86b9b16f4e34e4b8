"""Weight conversion: timm / vit_jax goldens, name variants, the audio path, released AVSiam."""
import dataclasses
import json
import math
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from avsiam_jax import checkpoint
from avsiam_jax.config import parse
from avsiam_jax.models import vit
from avsiam_jax.models.avsiam import AVSiam, AVSiamSpec
from avsiam_jax.weights import convert, load, provenance, signature, vit_sources
from avsiam_jax.weights.common import SpecMismatch, WeightError, read_tensors
from conftest import data_file
from tests.test_train import tiny_config
from configs import common

GOLDEN = os.path.dirname(data_file("golden", "timm_vit", "meta.json"))
TIMM = data_file("golden", "timm_vit", "vit_tiny2_timm.safetensors")
VITJAX = data_file("golden", "timm_vit", "vit_tiny2_vitjax.npz")
SOURCES = {"timm": TIMM, "vitjax": VITJAX}


# ----- helpers ------------------------------------------------------------------------------

def golden_spec(**enc_overrides):
  # The golden ViT: width 192, depth 2, 3 heads, patch 16, 224 px; timm's LayerNorm eps 1e-6.
  enc = vit.EncoderSpec(width=192, depth=2, mlp=768, heads=3, patch=16,
                        **{"block_norm_eps": 1e-6, **enc_overrides})
  return AVSiamSpec(enc, decoder_width=32, decoder_depth=1, decoder_heads=2)


def fresh(spec, seed=0):
  model = AVSiam(spec, rngs=nnx.Rngs(seed))
  return model, nnx.to_pure_dict(nnx.state(model, nnx.Param))


def set_params(model, pure):
  state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(state, pure)
  nnx.update(model, state)


def flat(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    p = f"{prefix}{k}"
    out.update(flat(v, p + "/") if isinstance(v, dict) else {p: np.asarray(v)})
  return out


def tokens_with_cls(encoder, images_nhwc, cls_1x1xD):
  """timm's forward_features from our pieces: embed, prepend CLS (+ its posemb), blocks, norm."""
  x = encoder.project_patches(encoder.patches(images_nhwc, "v"), "v")
  cls = jnp.broadcast_to(jnp.asarray(cls_1x1xD), (x.shape[0], 1, x.shape[-1]))
  x = jnp.concatenate([cls, x], axis=1)
  for block in encoder.blocks:
    x = block(x, "v")
  return np.asarray(encoder.norm["v"](x))


@pytest.fixture(scope="module")
def golden():
  g = {n: np.load(os.path.join(GOLDEN, f"{n}.npy")) for n in ("images_nchw", "tokens", "logits")}
  g["timm"] = load_file(TIMM)
  with np.load(VITJAX) as f:
    g["npz"] = {k: f[k] for k in f.files}
  g["images"] = g["images_nchw"].transpose(0, 2, 3, 1)
  return g


@pytest.fixture(scope="module")
def golden_model():
  return fresh(golden_spec())


# ----- goldens ------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["timm", "vitjax"])
def test_golden_tokens_and_logits(fmt, golden, golden_model):
  model, params = golden_model
  spec = golden_spec()
  set_params(model, load.init_params(SOURCES[fmt], fmt, spec, params))
  sd = golden["timm"]
  cls = sd["cls_token"] + sd["pos_embed"][:, :1]     # the source's CLS as timm adds it
  tokens = tokens_with_cls(model.encoder, golden["images"], cls)
  assert tokens.shape == golden["tokens"].shape == (2, 197, 192)
  err_tokens = np.abs(tokens - golden["tokens"]).max()
  logits = tokens[:, 0] @ sd["head.weight"].T + sd["head.bias"]
  err_logits = np.abs(logits - golden["logits"]).max()
  print(f"{fmt}: max abs error tokens {err_tokens:.3g}, logits {err_logits:.3g}")
  assert err_tokens < 1e-5 and err_logits < 1e-5
  # The encoder's own video path is the same computation without the CLS token.
  enc = model.encoder
  x = enc.project_patches(enc.patches(golden["images"], "v"), "v")
  for block in enc.blocks:
    x = block(x, "v")
  np.testing.assert_array_equal(np.asarray(enc(golden["images"], "v")),
                                np.asarray(enc.norm["v"](x)))


def test_timm_and_vitjax_give_identical_params(golden_model):
  _, params = golden_model
  spec = golden_spec()
  a = flat(load.init_params(TIMM, "timm", spec, params))
  b = flat(load.init_params(VITJAX, "vitjax", spec, params))
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  # Per-modality norms are copies; mm blocks copy the last encoder blocks; decoder stays fresh.
  eq = np.testing.assert_array_equal
  eq(a["encoder/blocks/0/norm1/a/scale"], a["encoder/blocks/0/norm1/v/scale"])
  eq(a["mm_blocks/0/attn/qkv"], a["encoder/blocks/0/attn/qkv"])
  eq(a["mm_blocks/1/mlp/fc2/kernel"], a["encoder/blocks/1/mlp/fc2/kernel"])
  fresh_flat = flat(params)
  for k in a:
    if k.startswith(("decoder", "mask_token", "modality_token", "mm_norm")):
      np.testing.assert_array_equal(a[k], fresh_flat[k], err_msg=k)


def test_dropped_keys_listed(golden_model):
  _, params = golden_model
  _, info = load.convert_source(VITJAX, "vitjax", golden_spec(), params)
  assert set(info["dropped"]) == {"cls", "head/kernel", "head/bias",
                                  "Transformer/posembed_input/pos_embedding[0]"}
  _, info = load.convert_source(TIMM, "timm", golden_spec(), params)
  assert set(info["dropped"]) == {"cls_token", "head.weight", "head.bias", "pos_embed[0]"}


# ----- vit_jax / big_vision name variants ---------------------------------------------------

def _big_vision_names(npz, prefix, *, scanned=False, pos="pos_embedding"):
  """The golden vit_jax file renamed the way big_vision names (and optionally scans) it."""
  out = {}
  pos_all = npz["Transformer/posembed_input/pos_embedding"]
  cls = npz["cls"]
  if pos == "pos_embedding":   # current big_vision: posemb added before CLS; CLS has none
    out[prefix + "pos_embedding"] = pos_all[:, 1:]
    out[prefix + "cls"] = cls + pos_all[:, :1]
  else:                         # older big_vision: Transformer/pos_embedding with CLS position
    out[prefix + pos] = pos_all
    out[prefix + "cls"] = cls
  ren = {"MultiHeadDotProductAttention_1": "MultiHeadDotProductAttention_0",
         "LayerNorm_2": "LayerNorm_1", "MlpBlock_3": "MlpBlock_0"}
  blocks = {}
  for k, v in npz.items():
    if k in ("cls", "Transformer/posembed_input/pos_embedding"):
      continue
    if k.startswith("Transformer/encoderblock_"):
      i, rest = k[len("Transformer/encoderblock_"):].split("/", 1)
      for a, b in ren.items():
        rest = rest.replace(a, b)
      if scanned:
        blocks.setdefault(rest, {})[int(i)] = v
        continue
      k = f"Transformer/encoderblock_{i}/{rest}"
    out[prefix + k] = v
  for rest, per in blocks.items():
    out[prefix + "Transformer/encoderblock/" + rest] = np.stack([per[i] for i in sorted(per)])
  return out


VARIANTS = {
    "opt_target": lambda z: {**{"opt/target/" + k: v for k, v in z.items()},
                             "opt/state/step": np.zeros((), np.int32)},
    "big_vision": lambda z: _big_vision_names(z, "params/"),
    "big_vision_scan_img": lambda z: {**_big_vision_names(z, "params/img/", scanned=True),
                                      "params/txt/Embed_0/embedding": np.zeros((3, 4), np.float32)},
    "big_vision_old_posemb": lambda z: _big_vision_names(z, "", pos="Transformer/pos_embedding"),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_vitjax_name_variants(variant, golden, golden_model, tmp_path):
  _, params = golden_model
  spec = golden_spec()
  path = str(tmp_path / "v.npz")
  np.savez(path, **VARIANTS[variant](golden["npz"]))
  want = flat(load.init_params(VITJAX, "vitjax", spec, params))
  got = flat(load.init_params(path, "vitjax", spec, params))
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  # The CLS token entering block 0 is the same in every naming.
  w = vit_sources.read_vitjax(read_tensors(path))
  sd = golden["timm"]
  np.testing.assert_allclose(w.cls, (sd["cls_token"] + sd["pos_embed"][:, :1]).reshape(-1),
                             atol=1e-7)


def test_bfloat16_void_npz(tmp_path):
  import ml_dtypes
  a = np.linspace(-2, 2, 12, dtype=np.float32).astype(ml_dtypes.bfloat16)
  np.savez(tmp_path / "b.npz", x=a.view("V2"))
  got = read_tensors(str(tmp_path / "b.npz"))["x"]
  np.testing.assert_array_equal(got.astype(np.float32), a.astype(np.float32))


def test_vit_shape_mismatch_names_config_key():
  spec = AVSiamSpec(vit.EncoderSpec(width=192, depth=3, mlp=768, heads=3, patch=16),
                    decoder_depth=1, decoder_width=32, decoder_heads=2)
  with pytest.raises(SpecMismatch, match=r"config\.model\.variant"):
    load.init_params(TIMM, "timm", spec, fresh(spec)[1])
  spec = golden_spec(image_size=192)
  with pytest.raises(SpecMismatch, match=r"config\.model\.image_size"):
    load.init_params(VITJAX, "vitjax", spec, fresh(spec)[1])


def test_every_target_leaf_must_be_filled(golden_model):
  _, params = golden_model
  bad = {**params, "encoder": {**params["encoder"], "extra": np.zeros(3, np.float32)}}
  with pytest.raises(WeightError, match="encoder/extra"):
    load.init_params(TIMM, "timm", golden_spec(), bad)


def test_unexpected_source_key_is_an_error(golden, golden_model, tmp_path):
  _, params = golden_model
  sd = dict(golden["timm"])
  sd["fc_norm.weight"] = np.ones(192, np.float32)
  save_file(sd, str(tmp_path / "x.safetensors"))
  with pytest.raises(WeightError, match="fc_norm.weight"):
    load.init_params(str(tmp_path / "x.safetensors"), "timm", golden_spec(), params)
  sd = dict(golden["timm"])
  sd["blocks.1.mlp.fc1.bias"] = np.zeros(5, np.float32)
  save_file(sd, str(tmp_path / "y.safetensors"))
  with pytest.raises(WeightError, match=r"blocks\.1\.mlp\.fc1\.bias"):
    load.init_params(str(tmp_path / "y.safetensors"), "timm", golden_spec(), params)


# ----- the audio path -----------------------------------------------------------------------

def test_audio_path_against_numpy(golden, golden_model):
  model, params = golden_model
  spec = golden_spec()
  new = load.init_params(TIMM, "timm", spec, params)
  set_params(model, new)
  sd = golden["timm"]
  d, p = 192, 16
  pos_v = sd["pos_embed"][0, 1:]
  gf, gt = spec.encoder.audio_grid                       # (8, 64)
  idx = np.array([math.floor(i * 196 / (gf * gt)) for i in range(gf * gt)])
  np.testing.assert_array_equal(np.asarray(new["encoder"]["audio_posemb"]), pos_v[idx])
  # Patch embedding of a (T=1024, F=128) fbank, as the released conv on the (F, T) image does it.
  fbank = np.random.default_rng(0).normal(size=(1, 1024, 128)).astype(np.float32)
  w_mean = sd["patch_embed.proj.weight"].astype(np.float64).mean(axis=1)   # (D, p, p)
  img = fbank[0].T.astype(np.float64)                                       # (F, T)
  patches = img.reshape(gf, p, gt, p).transpose(0, 2, 1, 3).reshape(gf * gt, p * p)
  want = patches @ w_mean.reshape(d, p * p).T + sd["patch_embed.proj.bias"] + pos_v[idx]
  enc = model.encoder
  got = np.asarray(enc.project_patches(enc.patches(fbank, "a"), "a"))[0]
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)


def test_audio_posemb_bilinear_option(golden_model):
  spec = golden_spec(audio_posemb_init="bilinear2d")
  new = load.init_params(TIMM, "timm", spec, fresh(spec)[1])
  pos_v = new["encoder"]["video_posemb"]
  want = vit.resize_posemb(pos_v, (14, 14), spec.encoder.audio_grid, "bilinear2d")
  np.testing.assert_allclose(new["encoder"]["audio_posemb"], np.asarray(want), atol=1e-7)
  near = vit.resize_posemb(pos_v, (14, 14), spec.encoder.audio_grid, "nearest1d")
  assert np.abs(new["encoder"]["audio_posemb"] - near).max() > 1e-3


# ----- released AVSiam checkpoints ----------------------------------------------------------

D, P, M, DW, NV, NA = 32, 16, 64, 16, 4, 8   # tiny: 32 px frames (2x2), 64x32 fbank (2x4)


def release_spec(**enc_overrides):
  kw = {"image_size": 32, "audio_frames": 64, "mel_bins": 32, "double_tokens": True,
        "separate_audio_patch": True, **enc_overrides}
  return AVSiamSpec(vit.encoder_spec("test", **kw), decoder_width=DW, decoder_depth=1,
                    decoder_heads=2, decoder_norm_eps=1e-5)


def fake_release(seed=0, *, finetuned=False, na=NA, num_classes=7):
  """A released-AVSiam state dict (key names and layouts of the PyTorch modules), tiny sizes:
  `na` audio positions, `num_classes` classes in a finetuned file's heads."""
  rng = np.random.default_rng(seed)
  def r(*shape, scale=0.2, loc=0.0):
    return (loc + scale * rng.normal(size=shape)).astype(np.float32)
  def block(root, dim, mlp):
    out = {}
    for n in ("norm1", "norm1_a", "norm1_v", "norm2", "norm2_a", "norm2_v"):
      out[f"{root}{n}.weight"], out[f"{root}{n}.bias"] = r(dim, loc=1.0), r(dim)
    out.update({f"{root}attn.qkv.weight": r(3 * dim, dim), f"{root}attn.qkv.bias": r(3 * dim),
                f"{root}attn.proj.weight": r(dim, dim), f"{root}attn.proj.bias": r(dim),
                f"{root}mlp.fc1.weight": r(mlp, dim), f"{root}mlp.fc1.bias": r(mlp),
                f"{root}mlp.fc2.weight": r(dim, mlp), f"{root}mlp.fc2.bias": r(dim)})
    return out
  def backbone(bb):
    w = r(D, 3, P, P, scale=0.05)
    sd = {f"{bb}.cls_token": r(1, 1, D), f"{bb}.pos_embed": r(1, 1 + NV, D),
          f"{bb}.patch_embed.proj.weight": w, f"{bb}.patch_embed.proj.bias": r(D),
          f"{bb}.patch_embed_a.proj.weight": w.mean(axis=1, keepdims=True),
          f"{bb}.patch_embed_a.proj.bias": r(D), f"{bb}.pos_embed_a": r(1, na, D),
          f"{bb}.norm.weight": r(D, loc=1.0), f"{bb}.norm.bias": r(D),
          f"{bb}.norm_a.weight": r(D, loc=1.0), f"{bb}.norm_a.bias": r(D),
          f"{bb}.head.weight": r(5, D), f"{bb}.head.bias": r(5)}
    for i in range(2):
      sd.update(block(f"{bb}.blocks.{i}.", D, M))
    return sd
  sd = backbone("vit_base")
  sd.update({"my_" + k[len("vit_base."):]: v for k, v in sd.items()
             if k.startswith("vit_base.blocks.")})
  sd.update({"my_patch_embed.proj.weight": r(D, 3, P, P), "my_patch_embed.proj.bias": r(D),
             "my_patch_embed_a.proj.weight": r(D, 1, P, P), "my_patch_embed_a.proj.bias": r(D)})
  sd.update(block("mm_layer_1.", D, M))
  sd.update(block("mm_layer_2.", D, M))
  if finetuned:
    heads = (("mlp_head", D), ("mlp_head_a", D), ("mlp_head_mm", 2 * D), ("mlp_head_mm_v2", D))
    for h, din in heads:
      sd.update({f"{h}.0.weight": r(din, loc=1.0), f"{h}.0.bias": r(din),
                 f"{h}.1.weight": r(num_classes, din), f"{h}.1.bias": r(num_classes)})
  else:
    sd.update({k.replace("vit_base.", "ast_base.", 1): r(*v.shape)
               for k, v in backbone("vit_base").items()})
    sd.update({"decoder_embed.weight": r(DW, D), "decoder_embed.bias": r(DW),
               "decoder_pos_embed_a": r(1, na, DW), "decoder_pos_embed_v": r(1, NV, DW),
               "mask_token": r(1, 1, DW), "decoder_modality_a": r(1, 1, DW),
               "decoder_modality_v": r(1, 1, DW), "decoder_norm.weight": r(DW, loc=1.0),
               "decoder_norm.bias": r(DW), "decoder_pred_a.weight": r(P * P, DW),
               "decoder_pred_a.bias": r(P * P), "decoder_pred_v.weight": r(3 * P * P, DW),
               "decoder_pred_v.bias": r(3 * P * P)})
    sd.update(block("decoder_blocks.0.", DW, 4 * DW))
  return {"module." + k: v for k, v in sd.items()}   # saved from DDP


# A float64 numpy re-implementation of the released PyTorch forward passes.
_erf = np.vectorize(math.erf)


def _ln(x, sd, key, eps):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * sd[key + ".weight"] + sd[key + ".bias"]


def _lin(x, sd, key):
  return x @ sd[key + ".weight"].T + sd[key + ".bias"]


def _block(x, sd, root, n1, n2, heads, eps=1e-5):
  b, n, d = x.shape
  k = d // heads
  qkv = _lin(_ln(x, sd, root + n1, eps), sd, root + "attn.qkv").reshape(b, n, 3, heads, k)
  q, kk, v = (qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))
  a = q @ kk.transpose(0, 1, 3, 2) / math.sqrt(k)
  a = np.exp(a - a.max(-1, keepdims=True))
  a /= a.sum(-1, keepdims=True)
  x = x + _lin((a @ v).transpose(0, 2, 1, 3).reshape(b, n, d), sd, root + "attn.proj")
  h = _lin(_ln(x, sd, root + n2, eps), sd, root + "mlp.fc1")
  return x + _lin(0.5 * h * (1 + _erf(h / math.sqrt(2))), sd, root + "mlp.fc2")


def _conv_patches(img_bxcxhxw, w_oxcxpxp, bias):
  b, c, h, w = img_bxcxhxw.shape
  x = img_bxcxhxw.reshape(b, c, h // P, P, w // P, P).transpose(0, 2, 4, 1, 3, 5)
  return x.reshape(b, (h // P) * (w // P), c * P * P) @ w_oxcxpxp.reshape(len(bias), -1).T + bias


def released_forward(sd, fbank_bxtxf, imgs_bxcxhxw):
  """Released retrieval path (audio and video tokens) and the two multimodal layers."""
  sd = {k[len("module."):]: v.astype(np.float64) for k, v in sd.items()}
  a = fbank_bxtxf.astype(np.float64)[:, None].transpose(0, 1, 3, 2)          # (B, 1, F, T)
  a = _conv_patches(a, sd["vit_base.patch_embed_a.proj.weight"],
                    sd["vit_base.patch_embed_a.proj.bias"])
  a = a + sd["vit_base.pos_embed_a"]
  a = a + a                                                                   # x + norm_pre(x)
  v = _conv_patches(imgs_bxcxhxw.astype(np.float64), sd["vit_base.patch_embed.proj.weight"],
                    sd["vit_base.patch_embed.proj.bias"])
  v = v + sd["vit_base.pos_embed"][:, 1:]
  v = v + v
  for i in range(2):
    a = _block(a, sd, f"vit_base.blocks.{i}.", "norm1_a", "norm2_a", 2)
    v = _block(v, sd, f"vit_base.blocks.{i}.", "norm1_v", "norm2_v", 2)
  a, v = _ln(a, sd, "vit_base.norm_a", 1e-6), _ln(v, sd, "vit_base.norm", 1e-6)
  av = np.concatenate([a, v], axis=1)
  for layer in ("mm_layer_1.", "mm_layer_2."):
    av = _block(av, sd, layer, "norm1_a", "norm2_a", 2)
  return a, v, av, sd


def _inputs(seed=1):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(2, 64, 32)).astype(np.float32),
          rng.normal(size=(2, 3, 32, 32)).astype(np.float32))


def test_release_converts_and_reproduces_outputs(tmp_path):
  src = fake_release()
  path = str(tmp_path / "release.safetensors")
  save_file(src, path)
  spec = release_spec()
  model, params = fresh(spec)
  new, info = load.convert_source(path, "avsiam", spec, params)
  set_params(model, new)
  fbank, imgs = _inputs()
  a_ref, v_ref, av_ref, sd = released_forward(src, fbank, imgs)
  enc = model.encoder
  a = np.asarray(enc(fbank, "a"))
  v = np.asarray(enc(imgs.transpose(0, 2, 3, 1), "v"))
  np.testing.assert_allclose(a, a_ref, atol=2e-5, rtol=0)
  np.testing.assert_allclose(v, v_ref, atol=2e-5, rtol=0)
  av = jnp.concatenate([a, v], axis=1)
  for block in model.mm_blocks:
    av = block(av, "x")
  np.testing.assert_allclose(np.asarray(av), av_ref, atol=5e-5, rtol=0)
  # Decoder: layouts, and one block against the released one (norm1/norm2, eps 1e-5).
  eq = np.testing.assert_array_equal
  eq(new["decoder_pred"]["v"]["kernel"], src["module.decoder_pred_v.weight"].T)
  eq(new["decoder_posemb"]["a"], src["module.decoder_pos_embed_a"][0])
  eq(new["modality_token"]["v"], src["module.decoder_modality_v"].reshape(-1))
  y = np.random.default_rng(2).normal(size=(2, NA + NV, DW)).astype(np.float32)
  want = _block(y.astype(np.float64), sd, "decoder_blocks.0.", "norm1", "norm2", 2)
  np.testing.assert_allclose(np.asarray(model.decoder_blocks[0](y, "x")), want, atol=2e-5, rtol=0)
  # Every source key is used or listed as dropped; the fresh mm_norm is the only fresh leaf.
  dropped = info["dropped"]
  assert "vit_base.cls_token" in dropped and "vit_base.head.weight" in dropped
  n_ast = sum(k.startswith("module.ast_base.") for k in src)
  assert n_ast > 0 and sum(k.startswith("ast_base.") for k in dropped) == n_ast
  assert dropped["my_blocks.0.attn.qkv.weight"].startswith("duplicate")
  np.testing.assert_array_equal(new["mm_norm"]["scale"], params["mm_norm"]["scale"])


def test_release_finetuned_checkpoint(tmp_path):
  src = fake_release(3, finetuned=True)
  path = str(tmp_path / "ft.npz")
  np.savez(path, **src)
  spec = release_spec()
  model, params = fresh(spec)
  new, info = load.convert_source(path, "avsiam", spec, params)
  assert "mlp_head_mm.1.weight" in info["dropped"]
  fresh_flat, new_flat = flat(params), flat(new)
  for k in new_flat:
    if k.startswith(("decoder", "mask_token", "modality_token")):
      np.testing.assert_array_equal(new_flat[k], fresh_flat[k], err_msg=k)
  set_params(model, new)
  fbank, imgs = _inputs()
  a_ref, _, _, _ = released_forward(src, fbank, imgs)
  np.testing.assert_allclose(np.asarray(model.encoder(fbank, "a")), a_ref, atol=2e-5, rtol=0)


def _release_case(tmp_path, edit, spec=None, **kw):
  src = fake_release()
  edit(src)
  path = str(tmp_path / "r.safetensors")
  save_file(src, path)
  spec = spec or release_spec()
  return load.convert_source(path, "avsiam", spec, fresh(spec)[1], **kw)


def test_release_errors_name_the_key(tmp_path):
  def extra(sd): sd["module.vit_base.fc_norm.weight"] = np.ones(D, np.float32)
  def missing(sd): del sd["module.vit_base.norm_a.bias"]
  def shape(sd): sd["module.vit_base.pos_embed_a"] = np.zeros((1, NA + 1, D), np.float32)
  def twin(sd): sd["module.my_blocks.1.mlp.fc2.bias"] = sd["module.my_blocks.1.mlp.fc2.bias"] + 1
  def audio(sd): sd["module.vit_base.patch_embed_a.proj.weight"] = (
      sd["module.vit_base.patch_embed_a.proj.weight"] + 0.01)
  with pytest.raises(WeightError, match=r"vit_base\.fc_norm\.weight"):
    _release_case(tmp_path, extra)
  with pytest.raises(WeightError, match=r"vit_base\.norm_a\.bias"):
    _release_case(tmp_path, missing)
  with pytest.raises(SpecMismatch, match=r"config\.model\.audio_frames"):
    _release_case(tmp_path, shape)
  with pytest.raises(WeightError, match=r"my_blocks\.1\.mlp\.fc2\.bias"):
    _release_case(tmp_path, twin)
  shared = release_spec(separate_audio_patch=False)
  with pytest.raises(WeightError, match=r"vit_base\.patch_embed_a\.proj\.weight"):
    _release_case(tmp_path, audio, spec=shared)
  _, info = _release_case(tmp_path, audio, spec=shared, allow_lossy_audio_patch=True)
  assert info["dropped"]["vit_base.patch_embed_a.proj.weight"].startswith("LOSSY")
  # With its own audio projection (the released layout) the trained kernel converts as is.
  params, _ = _release_case(tmp_path, audio)
  assert params["encoder"]["audio_patch_kernel"].shape == (16, 16, 1, D)
  for field in ("double_tokens", "modality_norms", "block_norm_eps"):
    bad = {"double_tokens": False, "modality_norms": False, "block_norm_eps": 1e-6}[field]
    with pytest.raises(SpecMismatch, match=rf"config\.model\.{field}"):
      _release_case(tmp_path, lambda sd: None, spec=release_spec(**{field: bad}))


# ----- the converted directory and the CLI --------------------------------------------------

def test_cli_convert_then_load(tmp_path, capsys):
  src = fake_release()
  path = str(tmp_path / "release.safetensors")
  save_file(src, path)
  out = str(tmp_path / "converted")
  rc = convert.main(["--format", "avsiam", "--src", path, "--variant", "test", "--out", out,
                     "--image-size", "32", "--audio-frames", "64", "--mel-bins", "32",
                     "--decoder-width", str(DW), "--decoder-depth", "1", "--decoder-heads", "2"])
  assert rc == 0
  printed = capsys.readouterr().out
  # The directory carries its switches: no --config.model.* flag to pass.
  assert "double_tokens=True" in printed and "decoder_norm_eps=1e-05" in printed
  assert "--config.model." not in printed
  meta = json.load(open(os.path.join(out, "avsiam_init.json")))
  assert meta["source_format"] == "avsiam" and meta["switches"]["double_tokens"] is True
  assert "decoder_norm_eps" in meta["required"]
  assert meta["dropped"]["vit_base.cls_token"]
  spec = release_spec()
  _, params = fresh(spec, seed=5)
  got = flat(load.init_params(out, "converted", spec, params))
  want = flat(load.init_params(path, "avsiam", spec, params))
  assert got.keys() == want.keys() and meta["fresh"] == ["mm_norm/bias", "mm_norm/scale"]
  for k in want:  # the fresh leaves too: both come from `params`, not the conversion's seed 0
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  with pytest.raises(SpecMismatch, match=r"config\.model\.double_tokens"):
    bad = release_spec(double_tokens=False)
    load.init_params(out, "converted", bad, fresh(bad)[1])


def test_mm_norm_is_a_recorded_switch(tmp_path):
  """Converted pretraining weights record model.mm_norm (off: the released architecture, whose
  file then fills every leaf); a model with the other value is refused, naming the key."""
  path = str(tmp_path / "release.safetensors")
  save_file(fake_release(), path)
  args = ["--format", "avsiam", "--src", path, "--variant", "test", "--image-size", "32",
          "--audio-frames", "64", "--mel-bins", "32", "--decoder-width", str(DW),
          "--decoder-depth", "1", "--decoder-heads", "2"]
  dirs = {on: str(tmp_path / f"mm_norm_{on}") for on in (True, False)}
  assert convert.main(args + ["--out", dirs[True]]) == 0
  assert convert.main(args + ["--out", dirs[False], "--no-mm-norm"]) == 0
  specs = {on: dataclasses.replace(release_spec(), mm_norm=on) for on in (True, False)}
  got = {}
  for on, out in dirs.items():
    meta = json.load(open(os.path.join(out, "avsiam_init.json")))
    assert "mm_norm" in meta["required"] and meta["switches"]["mm_norm"] is on
    assert meta["fresh"] == (["mm_norm/bias", "mm_norm/scale"] if on else [])
    assert load.recorded_model_config(out)["mm_norm"] is on
    got[on] = flat(load.init_params(out, "converted", specs[on], fresh(specs[on])[1]))
    with pytest.raises(SpecMismatch, match=rf"config\.model\.mm_norm = {on} \(it is {not on}"):
      load.init_params(out, "converted", specs[not on], fresh(specs[not on])[1])
  # The same released weights either way; only the norm differs.
  assert set(got[True]) - set(got[False]) == {"mm_norm/bias", "mm_norm/scale"}
  for k, v in got[False].items():
    np.testing.assert_array_equal(v, got[True][k], err_msg=k)
  # A run starting from the directory takes the switch (config.parse reads no record).
  c = tiny_config()
  c.model_init = dirs[False]
  assert parse(c, 1).model.mm_norm is True
  spec = provenance.from_weights(parse(c, 1))
  assert spec.model.mm_norm is False and spec.model_from_weights["changed"]["mm_norm"] == (
      True, False)
  assert "mm_norm" not in nnx.state(nnx.eval_shape(lambda: AVSiam(spec.model,
                                                                  rngs=nnx.Rngs(0))), nnx.Param)
  # A record written before the switch held the norm: it is checked as mm_norm=True.
  meta_path = os.path.join(dirs[True], "avsiam_init.json")
  meta = json.load(open(meta_path))
  del meta["switches"]["mm_norm"]
  meta["required"].remove("mm_norm")
  json.dump(meta, open(meta_path, "w"))
  assert load.recorded_model_config(dirs[True])["mm_norm"] is True
  with pytest.raises(SpecMismatch, match=r"config\.model\.mm_norm = True"):
    load.init_params(dirs[True], "converted", specs[False], fresh(specs[False])[1])


def test_convert_golden_to_directory(tmp_path):
  spec = golden_spec()
  out = str(tmp_path / "g")
  meta = convert.convert(TIMM, "timm", out, spec=spec, seed=1)
  assert "cls_token" in meta["dropped"]
  _, params = fresh(spec, seed=2)
  got = flat(load.init_params(out, "converted", spec, params))
  want = flat(load.init_params(TIMM, "timm", spec, params))
  for k in want:
    if k.startswith(("encoder", "mm_blocks")):
      np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  with pytest.raises(FileExistsError):
    convert.convert(TIMM, "timm", out, spec=spec)
  other = golden_spec(audio_posemb_init="bilinear2d")
  with pytest.raises(SpecMismatch, match=r"config\.model\.audio_posemb_init"):
    load.init_params(out, "converted", other, params)


def test_torch_files_need_torch_only_when_read(tmp_path):
  try:
    import torch  # noqa: F401
    pytest.skip("torch is installed")
  except ImportError:
    pass
  path = tmp_path / "x.pth"
  path.write_bytes(b"not really")
  with pytest.raises(ImportError, match="needs PyTorch"):
    read_tensors(str(path))


def test_separate_audio_projection_is_filled_when_the_model_has_one(tmp_path):
  """Forward compatibility: a model with encoder/audio_patch_{kernel,bias} gets them stored."""
  src = fake_release()
  akey = "module.vit_base.patch_embed_a.proj.weight"
  src[akey] = src[akey] + 0.01
  path = str(tmp_path / "r.safetensors")
  save_file(src, path)
  spec = release_spec()
  _, params = fresh(spec)
  params["encoder"]["audio_patch_kernel"] = np.zeros((P, P, 1, D), np.float32)
  params["encoder"]["audio_patch_bias"] = np.zeros((D,), np.float32)
  new, _ = load.convert_source(path, "avsiam", spec, params)
  eq = np.testing.assert_array_equal
  eq(new["encoder"]["audio_patch_kernel"], src[akey].transpose(2, 3, 1, 0))
  eq(new["encoder"]["audio_patch_bias"], src["module.vit_base.patch_embed_a.proj.bias"])
  eq(new["encoder"]["audio_posemb"], src["module.vit_base.pos_embed_a"][0])
  spec = golden_spec()
  _, params = fresh(spec)
  params["encoder"]["audio_patch_kernel"] = np.zeros((16, 16, 1, 192), np.float32)
  params["encoder"]["audio_patch_bias"] = np.zeros((192,), np.float32)
  new = load.init_params(TIMM, "timm", spec, params)
  w = load_file(TIMM)["patch_embed.proj.weight"]
  np.testing.assert_allclose(new["encoder"]["audio_patch_kernel"][..., 0, :],
                             w.mean(axis=1).transpose(1, 2, 0), atol=1e-7)


def test_one_table_of_the_fields_weights_are_tied_to():
  """signature.FIELDS holds every spec field but the free ones, each set by a config.model key,
  and the lists made from it are those spelt out before it."""
  spec_fields = ({f.name for f in dataclasses.fields(vit.EncoderSpec)}
                 | {f.name for f in dataclasses.fields(AVSiamSpec)} - {"encoder"})
  assert set(signature.FIELDS) == spec_fields - {"remat", "scan", "attention", "grad_boundaries"}
  model = common.get_common_config().model
  for f, row in signature.FIELDS.items():
    assert row.key in model and row.kind in signature.KINDS and row.part in signature.PARTS, f
  variant = ("width", "depth", "mlp", "heads", "patch")
  assert signature.ENCODER == variant + (
      "image_size", "audio_frames", "mel_bins", "audio_patch_mode", "modality_norms",
      "double_tokens", "separate_audio_patch", "block_norm_eps", "final_norm_eps", "mm_depth")
  assert set(signature.FROM_VIT) == set(variant) | {
      "image_size", "audio_frames", "mel_bins", "audio_patch_mode", "modality_norms", "mm_depth",
      "decoder_width", "decoder_depth", "decoder_heads", "audio_posemb_init",
      "separate_audio_patch", "mm_norm"}
  assert provenance.RUN_KEYS == ("variant",) + signature.ENCODER[len(variant):]
  # A checkpoint of another model: the hint names every key that shapes the train state.
  for key in ("variant", "image_size", "mm_depth", "mm_norm", "decoder_width",
              "separate_audio_patch"):
    assert key in checkpoint.HINT, key


def test_frame_resize_flag_takes_both_spellings():
  base = ["--format", "avsiam", "--src", "x.pth", "--variant", "B/16", "--out", "o"]
  assert convert.parser().parse_args(base).frame_resize == "squash"  # the release's
  for flag in ("--frame_resize", "--frame-resize"):  # data_prep.build's, and this tool's style
    assert convert.parser().parse_args(base + [flag, "crop"]).frame_resize == "crop"
