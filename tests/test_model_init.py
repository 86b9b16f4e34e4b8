"""Starting from weights: whatever a source lacks is drawn as a fresh model draws it, and a
parameter left all-zero where its initializer is not zeros stops the run at start-up."""
import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from avsiam_jax import sharding, train
from avsiam_jax.config import ConfigError, model_spec
from avsiam_jax.models import vit
from avsiam_jax.models.avsiam import AVSiam
from avsiam_jax.weights import convert, load
from conftest import build, data_file
from tests.test_train import fake_timm_vit, fixed_batch, tiny_config
from tests.test_weights import DW, fake_release, flat

SEED = 3  # the run's seed


def golden_config(monkeypatch, path, fmt):
  """The trainer's config for the golden timm / vit_jax ViT (width 192, 2 blocks, 224 px)."""
  monkeypatch.setitem(vit.VARIANTS, "golden", (192, 2, 768, 3, 16))
  c = tiny_config(batch=10)
  c.model.variant, c.model.image_size, c.model.block_norm_eps = "golden", 224, 1e-6
  c.model_init, c.model_init_format = path, fmt
  return c


def release_config(path):
  """The trainer's config for the fake released AVSiam of test_weights."""
  c = tiny_config(batch=10)
  m = c.model
  m.image_size, m.audio_frames, m.mel_bins = 32, 64, 32
  m.double_tokens = m.separate_audio_patch = True
  m.decoder_width, m.decoder_depth, m.decoder_heads, m.decoder_norm_eps = DW, 1, 2, 1e-5
  c.model_init, c.model_init_format = path, "avsiam"
  return c


def source_case(name, monkeypatch, tmp_path):
  """(config, the prefixes of the parameters its source does not hold)."""
  if name == "avsiam":
    path = str(tmp_path / "release.safetensors")
    save_file(fake_release(), path)
    return release_config(path), ("mm_norm",)  # the released pretraining file holds the decoder
  fmt = "vitjax" if name == "vitjax" else "timm"
  src = data_file("golden", "timm_vit", "vit_tiny2_vitjax.npz" if fmt == "vitjax"
                  else "vit_tiny2_timm.safetensors")
  config = golden_config(monkeypatch, src, fmt)
  if name == "converted":  # converted at another seed: the run's own seed must win
    out = str(tmp_path / "converted")
    convert.convert(src, fmt, out, spec=model_spec(config.model), seed=11)
    config.model_init, config.model_init_format = out, "converted"
  return config, ("mm_norm", "decoder", "mask_token", "modality_token")


def start(config, seed=SEED):
  _, mesh, task, fns = build(config)
  return fns, mesh, train.fresh_state(task, fns, jax.random.key(seed))


@pytest.mark.parametrize("source", ["timm", "vitjax", "avsiam", "converted"])
def test_what_the_source_lacks_is_a_fresh_models(source, monkeypatch, tmp_path):
  config, fresh_prefixes = source_case(source, monkeypatch, tmp_path)
  _, _, state = start(config)
  got = flat(jax.device_get(state["params"]))
  # The reference: the model built eagerly from the run's key, as create_state builds it.
  model = AVSiam(model_spec(config.model), rngs=nnx.Rngs(params=jax.random.key(SEED)))
  want = flat(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  fresh_paths = [p for p in want if p.startswith(fresh_prefixes)]
  assert "mm_norm/scale" in fresh_paths
  for path in fresh_paths:
    np.testing.assert_allclose(got[path], want[path], rtol=1e-6, atol=1e-7, err_msg=path)
  for path, v in got.items():
    if path.endswith("scale"):
      assert np.all(v != 0), path
  load.check_initialized(state["params"])


def test_two_steps_from_a_source_file_train_the_decoder(tmp_path):
  config = tiny_config(batch=10)
  fake_timm_vit(str(tmp_path / "vit.safetensors"))
  config.model_init, config.model_init_format = str(tmp_path / "vit.safetensors"), "timm"
  fns, mesh, state = start(config)
  before = flat(jax.device_get(state["params"]))
  for _ in range(2):
    state, _ = fns.step(state, sharding.global_batch(fixed_batch(10), mesh), jax.random.key(1))
  after = flat(jax.device_get(state["params"]))
  for path in ("decoder_embed/kernel", "decoder_blocks/0/mlp/fc1/kernel",
               "decoder_blocks/0/attn/qkv", "decoder_pred/a/kernel", "decoder_pred/v/kernel",
               "mask_token", "mm_norm/scale"):
    assert np.abs(after[path] - before[path]).max() > 0, path


def test_zeroed_layernorm_scale_is_named():
  spec = model_spec(tiny_config().model)
  params = load.fresh_params(spec)
  load.check_initialized(params)  # biases and modality tokens start at zero: allowed
  params["mm_norm"]["scale"] = np.zeros_like(params["mm_norm"]["scale"])
  with pytest.raises(load.WeightError, match="'mm_norm/scale' is all zero"):
    load.check_initialized(params)
  params = load.fresh_params(spec)
  fc2 = params["decoder_blocks"][0]["mlp"]["fc2"]
  fc2["kernel"] = np.zeros_like(fc2["kernel"])
  with pytest.raises(load.WeightError, match="decoder_blocks/0/mlp/fc2/kernel"):
    load.check_initialized(params)


def test_startup_stops_on_a_source_with_a_zero_layernorm(tmp_path, demo_dataset):
  sd = fake_timm_vit(str(tmp_path / "vit.safetensors"))
  sd["norm.weight"] = np.zeros_like(sd["norm.weight"])
  save_file(sd, str(tmp_path / "vit.safetensors"))
  config = tiny_config()
  config.data.demo, config.data.dir = False, demo_dataset
  config.model_init, config.model_init_format = str(tmp_path / "vit.safetensors"), "timm"
  with pytest.raises(ConfigError, match="encoder/norm/a/scale"):
    train.run(config, str(tmp_path / "run"))
  assert not (tmp_path / "run" / "checkpoints").exists() or not any(
      (tmp_path / "run" / "checkpoints").iterdir())
