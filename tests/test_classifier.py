"""Finetuning classifier: head shapes, loading pretrained encoder/mm blocks by name."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from avsiam_jax.models import vit
from avsiam_jax.models.avsiam import AVSiam, AVSiamSpec
from avsiam_jax.models.classifier import AVSiamClassifier, ClassifierSpec, load_pretrained

ENC = vit.encoder_spec("test", image_size=32, audio_frames=32, mel_bins=32)
C = 5


def _inputs(b=3, seed=0):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.normal(size=(b, 32, 32)), jnp.float32),
          jnp.asarray(rng.normal(size=(b, 32, 32, 3)), jnp.float32))


def _params(module):
  return nnx.to_pure_dict(nnx.state(module, nnx.Param))


def _avsiam(seed, enc=ENC):
  return AVSiam(AVSiamSpec(enc, decoder_width=32, decoder_depth=1, decoder_heads=2),
                rngs=nnx.Rngs(seed))


@pytest.fixture(scope="module")
def models():
  """Built once: eager construction costs seconds on CPU."""
  pre = _avsiam(1)
  pre_init = _params(pre)
  # Perturb the mm blocks so they no longer equal the encoder's tail they were copied from.
  nnx.update(pre.mm_blocks, jax.tree.map(lambda x: x + 0.01, nnx.state(pre.mm_blocks, nnx.Param)))
  same_seed = _params(AVSiamClassifier(ClassifierSpec(ENC, C), rngs=nnx.Rngs(1)))
  model = AVSiamClassifier(ClassifierSpec(ENC, C), rngs=nnx.Rngs(2))
  fresh = _params(model)
  state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(state, load_pretrained(fresh, _params(pre)))
  nnx.update(model, state)
  return dict(pre=pre, pre_init=pre_init, same_seed=same_seed, model=model, fresh=fresh)


def test_logit_shapes_per_mode(models):
  model = models["model"]
  a, v = _inputs()
  assert model(audio=a).shape == (3, C)
  assert model(video=v).shape == (3, C)
  assert model(audio=a, video=v).shape == (3, C)
  assert model.head_input(audio=a, video=v).shape == (3, 2 * ENC.width)
  with pytest.raises(ValueError):
    model()


def test_mm_init_matches_pretraining_model(models):
  # Same seed, same construction order: encoder and initialized mm blocks coincide.
  for name in ("encoder", "mm_blocks"):
    jax.tree.map(np.testing.assert_array_equal, models["same_seed"][name],
                 models["pre_init"][name])


def test_load_pretrained_features_match_avsiam(models):
  pre, model = models["pre"], models["model"]
  a, v = _inputs()
  np.testing.assert_allclose(model.head_input(audio=a), pre.features(a, "a"), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(model.head_input(video=v), pre.features(v, "v"), rtol=1e-5, atol=1e-6)
  # Audio-visual: concatenated tokens through the pretraining model's mm blocks, pooled per part.
  ta, tv = pre.encoder(a, "a"), pre.encoder(v, "v")
  x = jnp.concatenate([ta, tv], axis=1)
  for block in pre.mm_blocks:
    x = block(x, "x")
  n = ta.shape[1]
  pooled = jnp.concatenate([x[:, :n].mean(1), x[:, n:].mean(1)], axis=-1)
  np.testing.assert_allclose(model.head_input(audio=a, video=v), pooled, rtol=1e-5, atol=1e-6)
  h = model.head_av
  logits = h.dense(h.norm(pooled))
  np.testing.assert_allclose(model(audio=a, video=v), logits, rtol=1e-5, atol=1e-6)


def test_load_pretrained_leaves_heads_fresh(models):
  pre, model, fresh = models["pre"], models["model"], models["fresh"]
  now = _params(model)
  assert set(now) == {"encoder", "mm_blocks", "head_a", "head_v", "head_av"}
  for head in ("head_a", "head_v", "head_av"):
    jax.tree.map(np.testing.assert_array_equal, now[head], fresh[head])
  jax.tree.map(np.testing.assert_array_equal, now["mm_blocks"], _params(pre.mm_blocks))
  # The classifier's own (different-seed) encoder was replaced.
  assert not np.array_equal(fresh["encoder"]["patch_kernel"], now["encoder"]["patch_kernel"])


def test_load_pretrained_names_mismatch(models):
  pre, params = models["pre_init"], models["fresh"]
  bad = jax.tree.map(lambda x: x, pre)
  bad["mm_blocks"][1]["mlp"]["fc1"]["kernel"] = jnp.zeros((ENC.width, ENC.mlp + 1))
  with pytest.raises(ValueError, match="mm_blocks/1/mlp/fc1/kernel"):
    load_pretrained(params, bad)
  missing = jax.tree.map(lambda x: x, pre)
  del missing["encoder"]["norm"]["v"]
  with pytest.raises(ValueError, match="encoder/norm/v/(scale|bias)"):
    load_pretrained(params, missing)
  enc48 = vit.encoder_spec("test", image_size=48, audio_frames=32, mel_bins=32)
  other = _params(nnx.eval_shape(lambda: _avsiam(1, enc48)))
  with pytest.raises(ValueError, match="encoder/video_posemb"):
    load_pretrained(params, other)


def test_eval_shape_b16_audioset():
  spec = ClassifierSpec(vit.encoder_spec("B/16"), 527)
  model = nnx.eval_shape(lambda: AVSiamClassifier(spec, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(model)
  audio = jax.ShapeDtypeStruct((2, 1024, 128), jnp.float32)
  video = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)

  def run(state, a, v):
    m = nnx.merge(graphdef, state)
    return m(audio=a), m(video=v), m(audio=a, video=v)

  outs = jax.eval_shape(run, state, audio, video)
  assert [o.shape for o in outs] == [(2, 527)] * 3
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  assert params["head_av"]["dense"]["kernel"].shape == (1536, 527)
  assert params["head_a"]["norm"]["scale"].shape == (768,)
