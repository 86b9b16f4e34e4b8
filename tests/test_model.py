"""Model shapes for every variant (abstractly) and the audio/video input paths."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from avsiam_jax import pretraining
from avsiam_jax.models import vit
from avsiam_jax.models.avsiam import AVSiam, AVSiamSpec

def random_params(make, seed=0):
  """(graphdef, pure-dict params) of the model `make()` builds, filled from numpy: normal(0, 0.05),
  LayerNorm scales around 1. Seconds faster on CPU than compiling the model's own initializers."""
  abstract = nnx.eval_shape(make)
  rng = np.random.default_rng(seed)
  fill = lambda path, s: (rng.normal(size=s.shape, scale=0.05)
                          + (path[-1].key == "scale")).astype(np.float32)
  return nnx.graphdef(abstract), jax.tree_util.tree_map_with_path(
      fill, nnx.to_pure_dict(nnx.state(abstract, nnx.Param)))


# variant -> (timm ViT parameters without head, audio tokens, video tokens)
EXPECTED = {"B/16": (85_798_656, 512, 196), "L/16": (303_301_632, 512, 196),
            "H/14": (630_764_800, 657, 256)}


@pytest.mark.parametrize("variant", ["test", "tiny", "Ti/16", "S/16", "B/16", "L/16", "H/14"])
def test_shapes_abstract(variant):
  spec = AVSiamSpec(vit.encoder_spec(variant))
  model = nnx.eval_shape(lambda: AVSiam(spec, rngs=nnx.Rngs(0)))
  enc = spec.encoder
  audio = jax.ShapeDtypeStruct((2, 1024, 128), jnp.float32)
  video = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
  graphdef, state = nnx.split(model)
  def run(state, a, v):
    m = nnx.merge(graphdef, state)
    noise = pretraining.reconstruction_noise(m, jax.random.key(0), 2)
    return (m.encoder(a, "a"), m.encoder(v, "v"), m.features(a, "a"),
            pretraining.reconstruction_loss(m, a, v, noise, mask_ratio=0.75, stop_gradient=True))
  ta, tv, fa, rec = jax.eval_shape(run, state, audio, video)
  assert ta.shape == (2, enc.num_audio_tokens, enc.width)
  assert tv.shape == (2, enc.num_video_tokens, enc.width)
  assert fa.shape == (2, enc.width) and rec.shape == ()
  if variant in EXPECTED:
    n = sum(x.size for x in jax.tree.leaves(nnx.state(model.encoder, nnx.Param)))
    timm_count, na, nv = EXPECTED[variant]
    # Independent count: ViT without CLS/head = patch + posemb + blocks + final norm.
    d, depth, mlp = enc.width, enc.depth, enc.mlp
    block = 4 * d * d + 4 * d + 2 * d * mlp + mlp + d + 2 * 2 * 2 * d  # attn, mlp, 2x2 norms
    analytic = enc.patch ** 2 * 3 * d + d + (nv + na) * d + depth * block + 2 * 2 * d
    assert n == analytic
    # timm's count less CLS token and its posemb, plus the audio posemb and the second set of
    # per-modality norms.
    d = enc.width
    assert n == timm_count - 2 * d + na * d + depth * 2 * 2 * d + 2 * d
    assert (enc.num_audio_tokens, enc.num_video_tokens) == (na, nv)


def test_audio_tokens_are_frequency_major():
  spec = vit.encoder_spec("test", audio_frames=64, mel_bins=32)  # grid (2, 4)
  fbank = np.arange(64 * 32, dtype=np.float32).reshape(1, 64, 32)  # (T, F)
  patches = np.asarray(vit.patchify_audio(jnp.asarray(fbank), spec))
  assert patches.shape == (1, 8, 256)
  img = fbank[0].T  # (F, T)
  for token in range(8):
    f, t = divmod(token, 4)
    np.testing.assert_array_equal(patches[0, token], img[16 * f:16 * f + 16, 16 * t:16 * t + 16].ravel())


@pytest.mark.parametrize("mode,grid", [("floor", (9, 73)), ("pad", (10, 74))])
def test_h14_audio_patchification(mode, grid):
  spec = vit.encoder_spec("H/14", audio_patch_mode=mode)
  assert spec.audio_grid == grid
  fbank = np.random.default_rng(0).normal(size=(1, 1024, 128)).astype(np.float32)
  patches = np.asarray(vit.patchify_audio(jnp.asarray(fbank), spec))
  assert patches.shape == (1, grid[0] * grid[1], 14 * 14)
  img = fbank[0].T
  if mode == "pad":
    img = np.pad(img, ((0, 140 - 128), (0, 1036 - 1024)))
  # The last token covers the bottom-right corner that is kept (floor) or zero-padded (pad).
  f, t = grid[0] - 1, grid[1] - 1
  np.testing.assert_array_equal(patches[0, -1], img[14 * f:14 * f + 14, 14 * t:14 * t + 14].ravel())
  if mode == "pad":
    assert np.all(patches[0, -1].reshape(14, 14)[128 - 14 * f:] == 0)


def test_bad_audio_patch_mode():
  with pytest.raises(ValueError, match="audio_patch_mode"):
    vit.encoder_spec("H/14", audio_patch_mode="crop").audio_grid


def test_audio_patch_kernel_is_rgb_mean():
  spec = AVSiamSpec(vit.encoder_spec("test", image_size=32, audio_frames=32, mel_bins=32),
                    decoder_width=16, decoder_depth=1, decoder_heads=2)
  model = AVSiam(spec, rngs=nnx.Rngs(0))
  k = np.asarray(model.encoder.patch_kernel[...])  # (p, p, 3, D)
  np.testing.assert_allclose(np.asarray(model.encoder.patch_kernel_for("a")),
                             k.mean(axis=2).reshape(-1, k.shape[-1]), rtol=1e-6)
  # A grey audio patch through the mean kernel equals a grey RGB patch through the RGB kernel.
  grey = np.random.default_rng(0).normal(size=(16, 16)).astype(np.float32)
  rgb = np.repeat(grey[..., None], 3, axis=-1).reshape(-1)
  np.testing.assert_allclose(grey.reshape(-1) @ np.asarray(model.encoder.patch_kernel_for("a")),
                             rgb @ k.reshape(-1, k.shape[-1]) / 3, rtol=1e-4, atol=1e-5)


def test_audio_posemb_resize():
  src = np.random.default_rng(0).normal(size=(196, 8)).astype(np.float32)
  out = np.asarray(vit.resize_posemb(src, (14, 14), (8, 64), "nearest1d"))
  np.testing.assert_array_equal(out, src[[p * 196 // 512 for p in range(512)]])
  out2 = np.asarray(vit.resize_posemb(src, (14, 14), (8, 64), "bilinear2d"))
  assert out2.shape == (512, 8)
  # Bilinear of a constant grid is that constant.
  const = np.ones((196, 8), np.float32)
  np.testing.assert_allclose(vit.resize_posemb(const, (14, 14), (8, 64), "bilinear2d"), 1, rtol=1e-6)


def test_multimodal_blocks_start_as_last_encoder_blocks():
  spec = AVSiamSpec(vit.encoder_spec("test", image_size=32, audio_frames=32, mel_bins=32),
                    decoder_width=16, decoder_depth=1, decoder_heads=2)
  model = AVSiam(spec, rngs=nnx.Rngs(0))
  for mm, src in zip(model.mm_blocks, model.encoder.blocks[-2:]):
    np.testing.assert_array_equal(mm.attn.qkv[...], src.attn.qkv[...])
    np.testing.assert_array_equal(mm.mlp.fc2.kernel[...], src.mlp.fc2.kernel[...])
  # Copies, not aliases: changing one leaves the other.
  model.mm_blocks[0].attn.qkv[...] = model.mm_blocks[0].attn.qkv[...] + 1
  assert not np.allclose(model.mm_blocks[0].attn.qkv[...], model.encoder.blocks[-2].attn.qkv[...])


def test_token_doubling_switch():
  kw = dict(image_size=32, audio_frames=32, mel_bins=32)
  x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
  outs = []
  for double in (False, True):
    enc = vit.Encoder(vit.encoder_spec("test", double_tokens=double, **kw), rngs=nnx.Rngs(0))
    outs.append(np.asarray(enc.project_patches(enc.patches(jnp.asarray(x), "v"), "v")))
  np.testing.assert_allclose(outs[1], 2 * outs[0], rtol=1e-6)


def _small_model(dtype=jnp.float32):
  spec = AVSiamSpec(vit.encoder_spec("test", image_size=32, audio_frames=32, mel_bins=32),
                    decoder_width=16, decoder_depth=1, decoder_heads=2)
  return AVSiam(spec, rngs=nnx.Rngs(0), dtype=dtype)


@pytest.mark.parametrize("stop_gradient", [True, False])
def test_reconstruction_stop_gradient(stop_gradient):
  model = _small_model()
  graphdef, params = nnx.split(model, nnx.Param)
  rng = np.random.default_rng(0)
  audio = jnp.asarray(rng.normal(size=(2, 32, 32)), jnp.float32)
  video = jnp.asarray(rng.normal(size=(2, 32, 32, 3)), jnp.float32)
  def loss(params):
    m = nnx.merge(graphdef, params)
    return pretraining.reconstruction_loss(
        m, audio, video, pretraining.reconstruction_noise(m, jax.random.key(0), 2),
        mask_ratio=0.5, stop_gradient=stop_gradient)
  grads = nnx.to_pure_dict(jax.grad(loss)(params))
  enc_norm = sum(float(jnp.abs(g).sum()) for g in jax.tree.leaves(grads["encoder"]))
  mm_norm = sum(float(jnp.abs(g).sum()) for g in jax.tree.leaves(grads["mm_blocks"]))
  assert mm_norm > 0
  assert (enc_norm == 0) == stop_gradient


def test_mm_norm_switch(monkeypatch):
  """mm_norm off (the release): no such parameters, and the decoder embeds the multimodal
  blocks' output itself; on, a LayerNorm of it (float64 numpy)."""
  from avsiam_jax.models import layers  # pylint: disable=g-import-not-at-top
  enc = vit.encoder_spec("test", image_size=32, audio_frames=32, mel_bins=32)
  spec = lambda on: AVSiamSpec(enc, decoder_width=16, decoder_depth=1, decoder_heads=2,
                               mm_norm=on)
  graphdef_on, params = random_params(lambda: AVSiam(spec(True), rngs=nnx.Rngs(0)))
  graphdef_off = nnx.graphdef(nnx.eval_shape(lambda: AVSiam(spec(False), rngs=nnx.Rngs(0))))
  off = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: AVSiam(spec(False),
                                                                 rngs=nnx.Rngs(0))), nnx.Param))
  assert "mm_norm" in params and "mm_norm" not in off
  assert set(off) == set(params) - {"mm_norm"}
  params_off = {k: v for k, v in params.items() if k != "mm_norm"}

  seen = {}
  run_blocks, dense = layers.run_blocks, layers.Dense.__call__
  def record_blocks(blocks, x, *args, **kw):
    y = run_blocks(blocks, x, *args, **kw)
    if blocks is seen["model"].mm_blocks:
      seen["mm_out"] = y
    return y
  def record_dense(self, x):
    if self is seen["model"].decoder_embed:
      seen["decoder_in"] = x
    return dense(self, x)
  monkeypatch.setattr(layers, "run_blocks", record_blocks)
  monkeypatch.setattr(layers.Dense, "__call__", record_dense)
  rng = np.random.default_rng(0)
  audio = jnp.asarray(rng.normal(size=(2, 32, 32)), jnp.float32)
  video = jnp.asarray(rng.normal(size=(2, 32, 32, 3)), jnp.float32)

  def run(graphdef, q):
    seen["model"] = m = nnx.merge(graphdef, q)
    loss = pretraining.reconstruction_loss(
        m, audio, video, pretraining.reconstruction_noise(m, jax.random.key(0), 2),
        mask_ratio=0.5, stop_gradient=True)
    return loss, seen["mm_out"], seen["decoder_in"]
  loss_on, mm_on, dec_on = jax.jit(run, static_argnums=0)(graphdef_on, params)
  loss_off, mm_off, dec_off = jax.jit(run, static_argnums=0)(graphdef_off, params_off)
  np.testing.assert_array_equal(dec_off, mm_off)
  np.testing.assert_array_equal(mm_on, mm_off)  # the same blocks, the same input
  x = np.asarray(mm_on, np.float64)
  eps = enc.final_norm_eps
  norm = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps)
  want = norm * params["mm_norm"]["scale"] + params["mm_norm"]["bias"]
  np.testing.assert_allclose(dec_on, want, rtol=1e-4, atol=1e-5)
  assert np.abs(np.asarray(dec_on) - x).max() > 0.1
  assert np.isfinite(float(loss_on)) and np.isfinite(float(loss_off))


def test_bfloat16_compute_close_to_float32():
  rng = np.random.default_rng(0)
  video = jnp.asarray(rng.normal(size=(2, 32, 32, 3)), jnp.float32)
  f32 = _small_model().features(video, "v")
  bf16_model = _small_model(jnp.bfloat16)
  assert bf16_model.encoder.patch_kernel[...].dtype == jnp.float32  # weights stay float32
  bf16 = bf16_model.features(video, "v")
  assert bf16.dtype == jnp.float32
  np.testing.assert_allclose(bf16, f32, atol=0.05, rtol=0.05)
  assert not np.array_equal(bf16, f32)


def _pretrain_config(**pretrain):
  from configs import common  # pylint: disable=g-import-not-at-top
  config = common.get_common_config()
  config.pretrain.mask_ratios = (0.0, 0.5)
  config.pretrain.pack_groups = False  # one encoder call per group: the reference layout
  config.pretrain.update(pretrain)
  return config


def _small_spec(**encoder):
  enc = vit.encoder_spec("test", image_size=32, audio_frames=64, mel_bins=32, **encoder)
  return AVSiamSpec(enc, decoder_width=16, decoder_depth=1, decoder_heads=2)


def _batch(b=4):
  rng = np.random.default_rng(0)
  return {"audio": jnp.asarray(rng.normal(size=(b, 64, 32)), jnp.float32),
          "video": jnp.asarray(rng.normal(size=(b, 32, 32, 3)), jnp.float32)}


def _loss_and_grads(model, config, batch):
  """The pretraining loss and its gradients, jitted over nnx.merge(graphdef, params) as trained."""
  from avsiam_jax.config import parse  # pylint: disable=g-import-not-at-top
  spec = dataclasses.replace(parse(config, 1).pretrain, batch_shards=1)
  graphdef, params = nnx.split(model, nnx.Param)
  params = nnx.to_pure_dict(params)
  def loss(params):
    return pretraining.objective(nnx.merge(graphdef, params), batch, jax.random.key(1),
                                 spec)(params)[0]
  compiled = jax.jit(jax.value_and_grad(loss)).lower(params).compile()
  value, grads = compiled(params)
  return value, grads, jax.make_jaxpr(loss)(params).jaxpr, compiled.as_text()


def _count_checkpoints(jaxpr) -> int:
  """Checkpointed (rematerialized) calls in a forward jaxpr, nested jaxprs included."""
  from jax.extend import core  # pylint: disable=g-import-not-at-top
  n = sum(eqn.primitive.name in ("checkpoint", "remat2") for eqn in jaxpr.eqns)
  return n + sum(_count_checkpoints(sub) for sub in core.subjaxprs(jaxpr))


@pytest.fixture(scope="module")
def unrolled():
  """The reference the remat and scan variants are compared with: (loss, grads, jaxpr, hlo)."""
  config = _pretrain_config(mae_stop_gradient=False)  # reconstruction grads reach the encoder too
  return _loss_and_grads(AVSiam(_small_spec(), rngs=nnx.Rngs(0)), config, _batch())


def test_remat_same_loss_and_gradients(unrolled):
  config = _pretrain_config(mae_stop_gradient=False)
  loss0, grads0, jaxpr0, hlo0 = unrolled
  loss1, grads1, jaxpr1, hlo1 = _loss_and_grads(
      AVSiam(_small_spec(remat=True), rngs=nnx.Rngs(0)), config, _batch())
  np.testing.assert_allclose(loss1, loss0, rtol=1e-6, atol=1e-6)
  assert jax.tree.structure(grads0) == jax.tree.structure(grads1)
  for g0, g1 in zip(jax.tree.leaves(grads0), jax.tree.leaves(grads1)):
    np.testing.assert_allclose(g1, g0, rtol=1e-5, atol=1e-5 * max(1.0, np.abs(g0).max()))
  assert sum(float(jnp.abs(g).sum()) for g in jax.tree.leaves(grads1["encoder"]["blocks"])) > 0
  # Remat is really on: one checkpointed call per encoder block call (2 modalities x 2 ratio
  # groups for the contrastive loss, 2 modalities for reconstruction) and per multimodal block,
  # plus the decoder blocks where the model passes the switch on to them.
  spec = _small_spec()
  n = spec.encoder.depth * (2 * 2 + 2) + spec.mm_depth
  assert _count_checkpoints(jaxpr0) == 0
  assert _count_checkpoints(jaxpr1) in (n, n + spec.decoder_depth)
  # ... and the compiled backward pass recomputes instead of reading saved activations.
  assert "rematted_computation" in hlo1 and "rematted_computation" not in hlo0


def test_grad_boundaries_same_loss_and_gradients(unrolled):
  """CPU's materialized residual gradients (layers.grad_boundary): the same loss and gradients,
  and the compiled backward pass really holds the loops."""
  config = _pretrain_config(mae_stop_gradient=False)
  loss0, grads0, _, hlo0 = unrolled
  loss1, grads1, _, hlo1 = _loss_and_grads(
      AVSiam(_small_spec(grad_boundaries=True), rngs=nnx.Rngs(0)), config, _batch())
  np.testing.assert_allclose(loss1, loss0, rtol=1e-6, atol=1e-6)
  for (path, g0), (_, g1) in zip(jax.tree_util.tree_leaves_with_path(grads0),
                                 jax.tree_util.tree_leaves_with_path(grads1)):
    np.testing.assert_allclose(g1, g0, rtol=1e-5, atol=1e-6 * max(1.0, np.abs(g0).max()),
                               err_msg=jax.tree_util.keystr(path))
  spec = _small_spec()
  assert hlo1.count(" while(") - hlo0.count(" while(") >= spec.encoder.depth


def _primitives(jaxpr) -> set[str]:
  from jax.extend import core  # pylint: disable=g-import-not-at-top
  names = {eqn.primitive.name for eqn in jaxpr.eqns}
  for sub in core.subjaxprs(jaxpr):
    names |= _primitives(sub)
  return names


@pytest.mark.parametrize("remat", ["none", "dots", "full"])
def test_scanned_blocks_same_loss_and_gradients(remat, unrolled):
  config = _pretrain_config(mae_stop_gradient=False)
  batch = _batch()
  loss0, grads0, jaxpr0, _ = unrolled
  loss1, grads1, jaxpr1, _ = _loss_and_grads(
      AVSiam(_small_spec(scan=True, remat=remat), rngs=nnx.Rngs(0)), config, batch)
  np.testing.assert_allclose(loss1, loss0, rtol=1e-5, atol=1e-5)
  assert jax.tree.structure(grads0) == jax.tree.structure(grads1)  # the per-block layout
  for (path, g0), (_, g1) in zip(jax.tree_util.tree_leaves_with_path(grads0),
                                 jax.tree_util.tree_leaves_with_path(grads1)):
    np.testing.assert_allclose(g1, g0, rtol=1e-5, atol=1e-5 * max(1.0, np.abs(g0).max()),
                               err_msg=jax.tree_util.keystr(path))
  assert "scan" not in _primitives(jaxpr0) and "scan" in _primitives(jaxpr1)
  assert (_count_checkpoints(jaxpr1) > 0) == (remat != "none")


def test_chunked_attention_same_loss_and_gradients(unrolled, monkeypatch):
  """The whole pretraining loss with attention looped over chunks of (batch, head) pairs and
  recomputed in the backward pass, against the dense attention of the reference."""
  from avsiam_jax.models import layers  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(layers, "CHUNK_SCORES", 64)  # these tiny sequences: several chunks
  config = _pretrain_config(mae_stop_gradient=False)
  loss0, grads0, jaxpr0, _ = unrolled
  loss1, grads1, jaxpr1, _ = _loss_and_grads(
      AVSiam(_small_spec(attention="chunked"), rngs=nnx.Rngs(0)), config, _batch())
  np.testing.assert_allclose(loss1, loss0, rtol=1e-5, atol=1e-5)
  for (path, g0), (_, g1) in zip(jax.tree_util.tree_leaves_with_path(grads0),
                                 jax.tree_util.tree_leaves_with_path(grads1)):
    np.testing.assert_allclose(g1, g0, rtol=1e-5, atol=1e-5 * max(1.0, np.abs(g0).max()),
                               err_msg=jax.tree_util.keystr(path))
  assert "scan" not in _primitives(jaxpr0) and "scan" in _primitives(jaxpr1)


def _count(jaxpr, primitive: str) -> int:
  from jax.extend import core  # pylint: disable=g-import-not-at-top
  n = sum(eqn.primitive.name == primitive for eqn in jaxpr.eqns)
  return n + sum(_count(sub, primitive) for sub in core.subjaxprs(jaxpr))


@pytest.mark.parametrize("scan,attention", [(False, "dense"), (True, "dense"),
                                            (False, "chunked")])
def test_packed_groups_same_loss_and_gradients(scan, attention, unrolled, monkeypatch):
  """Ratio groups packed into rows (one encoder call per modality, attention within each
  example: masked rows for dense, slices for chunked) against one call per group: the same
  loss and gradients."""
  from avsiam_jax.models import layers  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(layers, "CHUNK_SCORES", 64)  # these tiny sequences: several chunks
  loss0, grads0, jaxpr0, _ = unrolled
  config = _pretrain_config(mae_stop_gradient=False, pack_groups=True)
  loss1, grads1, jaxpr1, _ = _loss_and_grads(
      AVSiam(_small_spec(scan=scan, attention=attention), rngs=nnx.Rngs(0)), config, _batch())
  np.testing.assert_allclose(loss1, loss0, rtol=1e-5, atol=1e-5)
  for (path, g0), (_, g1) in zip(jax.tree_util.tree_leaves_with_path(grads0),
                                 jax.tree_util.tree_leaves_with_path(grads1)):
    np.testing.assert_allclose(g1, g0, rtol=1e-5, atol=1e-5 * max(1.0, np.abs(g0).max()),
                               err_msg=jax.tree_util.keystr(path))
  if attention == "dense" and not scan:
    # One whole encoder pass fewer per modality, attention's products included (one masked
    # pair per row instead of one per segment).
    block = AVSiam(_small_spec(), rngs=nnx.Rngs(0)).encoder.blocks[0]
    per_block = _count(jax.make_jaxpr(lambda x: block(x, "a"))(jnp.zeros((2, 3, 32))).jaxpr,
                       "dot_general")
    depth = _small_spec().encoder.depth
    assert _count(jaxpr1, "dot_general") == _count(jaxpr0, "dot_general") - 2 * depth * per_block


def test_scanned_classifier_same_logits():
  from avsiam_jax.models.classifier import (AVSiamClassifier,  # pylint: disable=g-import-not-at-top
                                            ClassifierSpec)
  b = _batch()
  logits = []
  for scan in (False, True):
    enc = _small_spec(scan=scan).encoder
    model = AVSiamClassifier(ClassifierSpec(enc, num_classes=5), rngs=nnx.Rngs(0))
    logits.append(nnx.jit(lambda m, a, v: m(audio=a, video=v))(model, b["audio"], b["video"]))
  np.testing.assert_allclose(logits[1], logits[0], rtol=1e-5, atol=1e-5)


def test_avsep_is_avsiam_with_its_own_audio_encoder():
  from avsiam_jax.models.avsep import AVSep  # pylint: disable=g-import-not-at-top
  spec, config, batch = _small_spec(), _pretrain_config(), _batch()
  siam, sep = AVSiam(spec, rngs=nnx.Rngs(0)), AVSep(spec, rngs=nnx.Rngs(0))
  count = lambda m: sum(x.size for x in jax.tree.leaves(nnx.state(m, nnx.Param)))
  assert count(sep) == count(siam) + count(siam.encoder)
  assert sep.encoder_for("v") is sep.encoder and sep.encoder_for("a") is sep.audio_encoder

  loss_siam, grads_siam, _, _ = _loss_and_grads(siam, config, batch)
  loss_sep, _, _, _ = _loss_and_grads(sep, config, batch)
  assert abs(float(loss_sep) - float(loss_siam)) > 1e-4  # a different audio encoder
  # With the video encoder's weights in the audio encoder, AVSep computes AVSiam's loss, and
  # the shared encoder's gradient is the sum of the two encoders' gradients.
  nnx.update(sep.audio_encoder, nnx.state(sep.encoder))
  loss_copy, grads_copy, _, _ = _loss_and_grads(sep, config, batch)
  np.testing.assert_allclose(loss_copy, loss_siam, rtol=1e-6)
  summed = jax.tree.map(jnp.add, grads_copy["encoder"], grads_copy["audio_encoder"])
  for g0, g1 in zip(jax.tree.leaves(grads_siam["encoder"]), jax.tree.leaves(summed)):
    np.testing.assert_allclose(g1, g0, rtol=1e-5, atol=1e-6)
  # Audio alone drives the audio encoder, video alone the other: unused posembs get no gradient.
  assert float(jnp.abs(grads_copy["audio_encoder"]["video_posemb"]).sum()) == 0
  assert float(jnp.abs(grads_copy["encoder"]["audio_posemb"]).sum()) == 0
