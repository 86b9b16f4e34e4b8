"""Finetuning: losses, the mixed-modality draw, learning-rate multipliers, evaluation outputs,
and pretrain -> finetune -> eval through the trainer."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from avsiam_jax import finetuning, sharding, train
from avsiam_jax.config import ConfigError, parse
from conftest import build
from avsiam_jax.evaluators import classification
from configs import common
from tests.test_train import tiny_config


def finetune_config(data_dir, **finetune):
  c = tiny_config()
  c.mode = "finetune"
  c.data.demo, c.data.dir = False, data_dir
  f = c.finetune
  f.batch_size, f.total_steps, f.loss, f.freqm, f.timem = 16, 3, "ce", 8, 8
  for k, v in finetune.items():
    f[k] = v
  c.eval.max_clips = c.eval.retrieval_clips = 0
  c.checkpoint_every_steps = 3
  return c


@pytest.fixture(scope="module")
def dataset(demo_dataset):
  return demo_dataset


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, dataset):
  """A pretraining run of two steps: what finetuning starts from."""
  pre = tiny_config()
  pre.data.demo, pre.data.dir, pre.total_steps = False, dataset, 2
  pre_dir = str(tmp_path_factory.mktemp("pre"))
  train.run(pre, pre_dir)
  return pre_dir


def test_modality_draw_frequencies():
  keys = jax.random.split(jax.random.key(0), 20000)
  branches = np.asarray(jax.vmap(lambda k: finetuning.branch_index(k, (0.5, 0.25, 0.25)))(keys))
  freq = np.bincount(branches, minlength=3) / len(branches)
  # Binomial standard deviation at n=20000 is about 0.0035.
  np.testing.assert_allclose(freq, [0.5, 0.25, 0.25], atol=0.015)
  only_audio = jax.vmap(lambda k: finetuning.branch_index(k, (0.0, 1.0, 0.0)))(keys[:100])
  assert set(np.asarray(only_audio).tolist()) == {1}


def test_first_adam_step_scales_with_lr_multipliers(dataset):
  # Adam's first update is lr * g / (|g| + eps) = lr * sign(g): its size shows each group's lr.
  config = finetune_config(dataset, lr=1e-3, head_lr_mult=100.0, mm_lr_mult=3.0)
  config.optim.weight_decay = 0.0
  _, mesh, _, fns = build(config, 8, num_classes=4)
  state = fns.init(jax.random.key(0))
  before = jax.device_get(state["params"])
  rng = np.random.default_rng(0)
  batch = sharding.global_batch({
      "audio": rng.normal(size=(16, 32, 128)).astype(np.float32),
      "video": rng.normal(size=(16, 32, 32, 3)).astype(np.float32),
      "labels": np.eye(4, dtype=np.float32)[rng.integers(4, size=16)]}, mesh)
  # A key whose first draw is the audio-visual branch, so all three groups get gradients.
  key = next(k for k in range(100) if int(finetuning.branch_index(
      jax.random.fold_in(jax.random.key(k), 0), config.finetune.modality_mix)) == 0)
  state, metrics = fns.step(state, batch, jax.random.key(key))
  assert int(metrics["branch"]) == 0
  after = jax.device_get(state["params"])
  for group, mult in (("encoder", 1.0), ("mm_blocks", 3.0), ("head_av", 100.0)):
    delta = np.concatenate([np.abs(a - b).ravel() for a, b in zip(
        jax.tree.leaves(after[group]), jax.tree.leaves(before[group]))])
    moved = delta[delta > 0]
    np.testing.assert_allclose(np.median(moved), 1e-3 * mult, rtol=1e-3, err_msg=group)


def test_clip_outputs_match_per_frame_calls_and_ignore_frame_order(dataset):
  config = finetune_config(dataset, loss="bce")
  model = finetuning.FinetuneTask(parse(config, 8), 5).model(nnx.Rngs(params=0))
  rng = np.random.default_rng(1)
  audio = jnp.asarray(rng.normal(size=(2, 32, 128)), jnp.float32)
  frames = jnp.asarray(rng.normal(size=(2, 3, 32, 32, 3)), jnp.float32)
  logits, feats = model.clip_outputs(audio, frames)
  for f in range(3):
    np.testing.assert_allclose(logits["av"][:, f], model(audio, frames[:, f]), rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(logits["v"][:, f], model(None, frames[:, f]), rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(logits["a"], model(audio, None), rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(feats["a"], model.encoder(audio, "a").mean(axis=1), rtol=1e-5,
                             atol=1e-6)

  graphdef, params = nnx.split(model, nnx.Param)
  params = nnx.to_pure_dict(params)
  batch = {"audio": audio, "video": frames}
  out = finetuning.classifier_eval_step(params, batch, graphdef=graphdef, kind="bce", frame=1)
  shuffled = finetuning.classifier_eval_step(params, dict(batch, video=frames[:, ::-1]),
                                             graphdef=graphdef, kind="bce", frame=1)
  for k in ("probs_a", "probs_v", "probs_av"):
    np.testing.assert_allclose(out[k], shuffled[k], rtol=1e-5, atol=1e-6)
  want = classification.aggregate_frames(np.asarray(jax.nn.sigmoid(logits["av"])))
  np.testing.assert_allclose(out["probs_av"], want, rtol=1e-5, atol=1e-6)


def test_pretrain_finetune_eval(tmp_path, dataset, pretrained):
  config = finetune_config(dataset, init_checkpoint=pretrained)
  work = str(tmp_path / "ft")
  results = train.run(config, work)
  assert results["step"] == 3
  for name in ("audio", "visual", "audio-visual"):
    for k in ("mAP", "AUC", "d_prime", "top1"):
      assert np.isfinite(results[name][k]), (name, k)
    assert results[name]["num_clips"] == 10
  assert results["retrieval"]["num_clips"] == 10
  with open(os.path.join(work, "label_names.json")) as f:
    assert len(json.load(f)) == 4
  assert os.path.getsize(os.path.join(work, "embeddings.png")) > 0

  # Standalone evaluation of the finetuned run gives the same figures.
  config.mode = "eval"
  again = train.run(config, work)
  for name in ("audio", "visual", "audio-visual", "retrieval"):
    for k, v in results[name].items():
      if isinstance(v, str):
        assert again[name][k] == v, (name, k)
      else:
        assert again[name][k] == pytest.approx(v, rel=1e-4, abs=1e-6), (name, k)
  assert os.path.exists(os.path.join(work, "eval_eval.json"))


def test_finetune_starts_from_the_pretrained_encoder(dataset, pretrained):
  config = finetune_config(dataset, init_checkpoint=pretrained)
  spec, _, task, fns = build(config, 8, num_classes=4)
  state = train.fresh_state(task, fns, jax.random.key(0))
  source = finetuning.pretrained_avsiam_params(spec, jax.random.key(0))
  got = jax.device_get(state["params"])
  for group in ("encoder", "mm_blocks"):
    for a, b in zip(jax.tree.leaves(got[group]), jax.tree.leaves(source[group])):
      np.testing.assert_array_equal(a, b)
  fresh = jax.device_get(fns.init(jax.random.key(0))["params"])
  for a, b in zip(jax.tree.leaves(got["head_av"]), jax.tree.leaves(fresh["head_av"])):
    np.testing.assert_array_equal(a, b)


def test_config_arg_fills_paper_tables():
  c = common.get_config("L/16", "mode=finetune,dataset=vggsound")
  f = c.finetune
  assert (c.mode, f.lr, f.head_lr_mult, f.decay_rate, f.loss, f.balanced) == (
      "finetune", 5e-6, 50, 0.5, "ce", True)
  assert f.batch_size == 16 * 8
  assert f.mm_lr_mult == 1.0  # VGGSound: multimodal blocks at the base rate, as released
  for dataset in ("as20k", "as2m"):  # AudioSet: at 100x, as released
    assert common.get_config("B/16", f"mode=finetune,dataset={dataset}").finetune.mm_lr_mult == 100
  assert common.get_config("B/16", "mode=finetune").finetune.mm_lr_mult == 1.0  # custom
  c = common.get_config("B/16", "mode=finetune,dataset=as20k")
  assert (c.finetune.lr, c.finetune.head_lr_mult, c.finetune.loss, c.finetune.balanced) == (
      1e-4, 100, "bce", False)
  with pytest.raises(ValueError, match="dataset"):
    common.get_config("B/16", "mode=finetune,dataset=imagenet")
  with pytest.raises(ValueError, match="mode"):
    common.get_config("B/16", "mode=distill")


def test_bad_finetune_configs_fail_before_compute(tmp_path, dataset):
  for key, value, match in (("loss", "mse", "finetune.loss"),
                            ("modality_mix", (0.5, 0.5, 0.5), "modality_mix"),
                            ("batch_size", 12, "finetune.batch_size"),
                            ("init_checkpoint", str(tmp_path / "nope"), "init_checkpoint")):
    config = finetune_config(dataset, **{key: value})
    with pytest.raises(ConfigError, match=match):
      train.run(config, str(tmp_path / "w"))
  config = finetune_config(dataset)
  config.mode = "eval"
  with pytest.raises(ConfigError, match="config.json"):
    train.run(config, str(tmp_path / "empty"))
  assert not os.path.exists(tmp_path / "w")


def test_every_epoch_keeps_the_best_epoch_and_stops_early(tmp_path, dataset, pretrained):
  # lr 0: every epoch scores the same, so the first stays the best and the second, without a
  # gain, stops the run (patience 1).
  config = finetune_config(dataset, init_checkpoint=pretrained, lr=0.0, total_steps=None,
                           epochs=5)
  config.eval.every_epoch, config.eval.early_stop_epochs = True, 1
  work = str(tmp_path / "ft")
  results = train.run(config, work)
  spe = 40 // 16  # training clips / batch
  sel = results["model_selection"]
  assert sel["best_step"] == spe and sel["best_epoch"] == 1 and sel["stopped_early"]
  assert sel["metric"] == "audio-visual/top1"  # single-label (ce)
  assert results["step"] == 2 * spe and results["last_step"]["step"] == 2 * spe
  assert results["audio-visual"]["top1"] == pytest.approx(sel["best_score"])
  with open(os.path.join(work, "results.json")) as f:
    assert json.load(f)["model_selection"]["best_step"] == spe
  # The best epoch is a run directory of its own.
  from avsiam_jax import checkpoint, inference  # pylint: disable=import-outside-toplevel
  assert checkpoint.load_run(sel["checkpoint"]).step == spe
  assert inference.Predictor.load(sel["checkpoint"]).label_names
  # A restart does not train on after the early stop.
  assert train.run(config, work)["step"] == 2 * spe
