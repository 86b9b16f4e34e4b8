"""Trainer: the loss goes down, sharding does not change the numbers, checkpoints resume exactly."""
import dataclasses
import json
import os

import jax
import numpy as np
import pytest

from avsiam_jax import checkpoint, sharding, train
from avsiam_jax.config import ConfigError, parse
from tests.conftest import build  # also imported by tests/multihost_worker.py
from configs import demo as demo_config


def tiny_config(batch=40):
  """The demo config at test size; 40 clips split into 5 ratio groups on 8 virtual devices."""
  c = demo_config.get_config("mode=pretrain")
  c.model.variant = "test"
  c.model.image_size = 32
  c.model.audio_frames = 32
  c.model.decoder_width = 16
  c.model.decoder_depth = 1
  c.model.decoder_heads = 2
  c.batch_size = batch
  c.total_steps = 20
  c.optim.lr = 1e-3
  c.eval.batch_size = 16
  return c


def fixed_batch(batch, seed=0):
  """Per-clip levels shared by audio and video plus a little noise: learnable by both losses."""
  rng = np.random.default_rng(seed)
  level = rng.normal(size=(batch, 1, 1))
  audio = level + 0.1 * rng.normal(size=(batch, 32, 128))
  video = level[..., None] * np.array([1.0, -0.5, 0.3]) + 0.1 * rng.normal(size=(batch, 32, 32, 3))
  return {"audio": audio.astype(np.float32), "video": video.astype(np.float32)}


def run_steps(config, num_devices, n, batch):
  _, mesh, _, fns = build(config, num_devices)
  state = fns.init(jax.random.key(0))
  metrics = []
  for _ in range(n):
    state, m = fns.step(state, sharding.global_batch(batch, mesh), jax.random.key(1))
    metrics.append(jax.device_get(m))
  return state, metrics


@pytest.mark.parametrize("separate", [False, True])
def test_steps_on_a_fixed_batch_lower_the_loss(separate):
  config = tiny_config(batch=10)
  config.pretrain.separate_optimizers = separate
  _, metrics = run_steps(config, 1, 12, fixed_batch(10))
  for name in ("contrastive", "reconstruction"):
    first, last = metrics[0][name], np.mean([m[name] for m in metrics[-3:]])
    assert last < 0.9 * first, (name, first, last)


def test_eight_devices_match_one_device():
  assert jax.device_count() >= 8
  config = tiny_config(batch=24)
  config.pretrain.mask_ratios = (0.0, 0.2, 0.6)  # three groups keep the compile short
  config.mesh.batch_shards = 8  # the same masking layout on both meshes
  batch = fixed_batch(24)
  # Two full steps through the trainer's compiled step: the losses agree, the second one after
  # a sharded optimizer update. (Every gradient leaf on this and other meshes is compared in
  # test_sharding.test_mesh_matches_one_device.)
  _, m1 = run_steps(config, 1, 2, batch)
  state8, m8 = run_steps(config, 8, 2, batch)
  for a, b in zip(m1, m8):
    for k in ("contrastive", "reconstruction", "grad_norm_total"):
      np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-5)
  assert state8["params"]["encoder"]["patch_bias"].sharding.mesh.size == 8


def test_save_restore_next_step_identical(tmp_path):
  config = tiny_config(batch=10)
  _, mesh, _, fns = build(config)
  batch = sharding.global_batch(fixed_batch(10), mesh)
  key = jax.random.key(7)
  state, _ = fns.step(fns.init(jax.random.key(0)), batch, key)
  ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"), every_steps=1, keep=2)
  assert ckpt.save(1, state, {"epoch": 0, "position": 10})
  ckpt.close()
  expected, m_expected = fns.step(state, batch, key)

  ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"), every_steps=1, keep=2)
  assert ckpt.latest_step() == 1
  restored, data_state = ckpt.restore(1, fns.abstract_state)
  assert data_state == {"epoch": 0, "position": 10}
  assert int(restored["step"]) == 1
  got, m_got = fns.step(restored, batch, key)
  assert float(m_got["loss"]) == float(m_expected["loss"])
  for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(got)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bad_configs_fail_before_compute(tmp_path):
  config = tiny_config(batch=48)  # 6 per device: not 5 groups
  with pytest.raises(ConfigError, match="mask-ratio groups"):
    train.run(config, str(tmp_path))
  config = tiny_config()
  config.model.variant = "X/16"
  with pytest.raises(ConfigError, match="unknown ViT variant"):
    train.run(config, str(tmp_path))
  config = tiny_config()
  config.data.demo = False
  config.data.dir = str(tmp_path / "missing")
  with pytest.raises(ConfigError, match="missing"):
    train.run(config, str(tmp_path))
  assert not os.listdir(tmp_path)  # nothing was written


def test_demo_end_to_end_and_resume(tmp_path):
  config = tiny_config()
  config.data.demo_train_clips = 40
  config.data.demo_eval_clips = 10
  config.total_steps = None
  config.epochs = 4
  config.checkpoint_every_steps = 2
  workdir = str(tmp_path / "w")
  results = train.run(config, workdir)
  assert results["step"] == 4
  with open(os.path.join(workdir, "results.json")) as f:
    saved = json.load(f)
  saved = saved["retrieval"]
  assert saved["num_clips"] == 10
  for k in ("v2a_r1", "v2a_r5", "a2v_r1", "a2v_r5"):
    assert 0 <= saved[k] <= 100
  assert saved["v2a_r5"] >= saved["v2a_r1"]
  assert os.listdir(os.path.join(workdir, "tensorboard"))

  # A longer run in the same workdir resumes at step 4 and trains only the new steps.
  config = tiny_config()
  config.data.demo_train_clips = 40
  config.data.demo_eval_clips = 10
  config.total_steps = 6
  config.checkpoint_every_steps = 2
  results = train.run(config, workdir)
  assert results["step"] == 6
  steps = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
  assert steps[-1] == 6 and 4 in steps


def fake_timm_vit(path, d=32, depth=2, mlp=64, p=16, tokens=4, seed=0):
  """A timm-format ViT state dict (the 'test' variant's sizes) written as safetensors."""
  from safetensors.numpy import save_file
  rng = np.random.default_rng(seed)
  r = lambda *s: rng.normal(size=s).astype(np.float32)
  sd = {"patch_embed.proj.weight": r(d, 3, p, p), "patch_embed.proj.bias": r(d),
        "cls_token": r(1, 1, d), "pos_embed": r(1, 1 + tokens, d),
        "norm.weight": r(d), "norm.bias": r(d), "head.weight": r(10, d), "head.bias": r(10)}
  for i in range(depth):
    b = f"blocks.{i}."
    sd.update({b + "norm1.weight": r(d), b + "norm1.bias": r(d), b + "norm2.weight": r(d),
               b + "norm2.bias": r(d), b + "attn.qkv.weight": r(3 * d, d),
               b + "attn.qkv.bias": r(3 * d), b + "attn.proj.weight": r(d, d),
               b + "attn.proj.bias": r(d), b + "mlp.fc1.weight": r(mlp, d),
               b + "mlp.fc1.bias": r(mlp), b + "mlp.fc2.weight": r(d, mlp), b + "mlp.fc2.bias": r(d)})
  save_file(sd, path)
  return sd


def test_model_init_from_timm_weights(tmp_path):
  sd = fake_timm_vit(str(tmp_path / "vit.safetensors"))
  config = tiny_config()
  config.model_init, config.model_init_format = str(tmp_path / "vit.safetensors"), "timm"
  _, mesh, task, fns = build(config, jax.device_count())
  state = train.fresh_state(task, fns, jax.random.key(0))
  enc = state["params"]["encoder"]
  np.testing.assert_array_equal(enc["video_posemb"], sd["pos_embed"][0, 1:])
  np.testing.assert_array_equal(enc["patch_kernel"], sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0))
  for stream in ("a", "v"):  # per-modality norms both start from the one pretrained norm
    np.testing.assert_array_equal(enc["blocks"][1]["norm1"][stream]["scale"], sd["blocks.1.norm1.weight"])
    np.testing.assert_array_equal(enc["norm"][stream]["bias"], sd["norm.bias"])
  np.testing.assert_array_equal(state["params"]["mm_blocks"][1]["mlp"]["fc1"]["kernel"],
                                sd["blocks.1.mlp.fc1.weight"].T)
  assert enc["patch_kernel"].sharding == fns.abstract_state["params"]["encoder"]["patch_kernel"].sharding
  state, metrics = fns.step(state, sharding.global_batch(fixed_batch(40), mesh), jax.random.key(1))
  assert np.isfinite(float(metrics["loss"]))

  config.model_init = str(tmp_path / "missing.npz")
  with pytest.raises(ConfigError, match="config.model_init"):
    parse(config, jax.device_count())


def test_compile_cache_defaults_to_the_workdir(tmp_path):
  spec = parse(tiny_config(), 8)
  before = jax.config.jax_compilation_cache_dir
  try:
    path = train.use_compile_cache(spec, str(tmp_path), environ={})
    assert path == str(tmp_path / "compile_cache") == jax.config.jax_compilation_cache_dir
    # The environment (the test session's shared cache, a cluster's) wins; "none" is off.
    assert train.use_compile_cache(spec, str(tmp_path),
                                   environ={"JAX_COMPILATION_CACHE_DIR": "/c"}) == "/c"
    off = dataclasses.replace(spec, compile_cache_dir="none")
    jax.config.update("jax_compilation_cache_dir", before)
    assert train.use_compile_cache(off, str(tmp_path), environ={}) is None
    assert jax.config.jax_compilation_cache_dir == before
  finally:
    jax.config.update("jax_compilation_cache_dir", before)
