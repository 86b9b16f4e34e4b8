"""Finetuning: losses, the mixed-modality draw, learning-rate multipliers, evaluation outputs,
and pretrain -> finetune -> eval through the trainer."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from avsiam_jax import finetuning, losses, optim, sharding, train
from avsiam_jax.config import ConfigError, parse
from avsiam_jax.models.classifier import AVSiamClassifier
from conftest import build
from avsiam_jax.evaluators import classification
from configs import common
from tests.test_model import random_params
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
def pretrained(pretrained_run):
  """A pretraining run of two steps (on the demo clips, without labels): what finetuning
  starts from."""
  return pretrained_run["work"]


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
  # mode=eval evaluates the selected epoch, as results.json reports it, not the latest step;
  # a step directory names another checkpoint (the results go to the run directory).
  config.mode = "eval"
  chosen = train.run(config, work)
  assert chosen["step"] == spe and "selected" in chosen["checkpoint"]["which"]
  assert chosen["audio-visual"]["top1"] == pytest.approx(sel["best_score"])
  assert train.run(config, os.path.join(work, "checkpoints", str(2 * spe)))["step"] == 2 * spe
  with open(os.path.join(work, "eval_eval.json")) as f:
    assert json.load(f)["checkpoint"]["dir"] == os.path.join(work, "checkpoints", str(2 * spe))


# ----- modality draws per part of the batch (finetune.modality_shards) ----------------------

def _classifier(config, num_classes=4):
  spec = parse(config, 1)
  task = finetuning.FinetuneTask(spec, num_classes)
  return spec, task, random_params(lambda: task.model(nnx.Rngs(0)))


def _finetune_batch(n, num_classes=4, seed=0):
  rng = np.random.default_rng(seed)
  return {"audio": rng.normal(size=(n, 32, 128)).astype(np.float32),
          "video": rng.normal(size=(n, 32, 32, 3)).astype(np.float32),
          "labels": np.eye(num_classes, dtype=np.float32)[rng.integers(num_classes, size=n)]}


def test_modality_shards_mean_of_part_losses():
  shards, mix, loss = 3, (0.4, 0.3, 0.3), "bce"
  config = finetune_config("unused", loss=loss, modality_shards=shards, modality_mix=mix,
                           batch_size=12)
  spec, _, (graphdef, params) = _classifier(config)
  assert spec.finetune.modality_shards == shards
  batch = _finetune_batch(12)
  # A key whose three parts draw the three branches, from keys split off it.
  key = next(k for k in (jax.random.key(i) for i in range(100))
             if len(set(np.asarray(finetuning.branch_draws(k, mix, shards)).tolist())) == 3)
  branches = np.asarray(finetuning.branch_draws(key, mix, shards))
  want_branches = [int(finetuning.branch_index(k, mix)) for k in jax.random.split(key, shards)]
  assert branches.tolist() == want_branches

  def reference(q):
    """Each part through the model call of its branch: the per-part losses."""
    model = nnx.merge(graphdef, q)
    out = []
    for part, b in enumerate(branches.tolist()):
      rows = slice(4 * part, 4 * part + 4)
      a, v = batch["audio"][rows], batch["video"][rows]
      call = (lambda: model(a, v), lambda: model(a, None), lambda: model(None, v))[b]
      out.append(losses.classification_loss(call(), batch["labels"][rows], loss))
    return out

  def mean_of_parts(q):
    parts = reference(q)
    return sum(parts) / shards, parts

  def both(q):
    got = jax.value_and_grad(finetuning.finetune_loss)(q, graphdef, batch, branches, loss)
    return (got, *jax.grad(mean_of_parts, has_aux=True)(q))
  (got_loss, got_grads), want_grads, parts = jax.device_get(
      jax.jit(both)(params))
  # The mean of the per-part losses, in float64.
  np.testing.assert_allclose(got_loss, np.mean(np.asarray(parts, np.float64)), rtol=1e-6,
                             atol=1e-6)
  for path, g in jax.tree_util.tree_leaves_with_path(got_grads):
    w = want_grads
    for k in path:
      w = w[k.key]
    np.testing.assert_allclose(g, w, rtol=0, atol=1e-5, err_msg=jax.tree_util.keystr(path))
  # Every head got a gradient: each branch was drawn.
  for head in finetuning.HEADS:
    assert float(np.abs(got_grads[head]["dense"]["kernel"]).max()) > 0, head


@pytest.mark.parametrize("shards", [1, 4])
def test_modality_draws_of_the_train_step(monkeypatch, shards):
  """The step draws from its key folded with the step: one branch (1), or one per part from
  keys split off it; the metrics and the log line report them."""
  mix = (0.4, 0.3, 0.3)
  config = finetune_config("unused", modality_shards=shards, modality_mix=mix)
  spec, task, (graphdef, params) = _classifier(config)
  seen = []

  def fake_loss(q, graphdef, batch, branch, kind):  # a loss that is the branches, no model
    seen.append(jnp.shape(branch))
    return sum(jnp.sum(x) for x in jax.tree.leaves(q)) * 0 + jnp.sum(
        (branch + 1) * 10.0 ** jnp.arange(jnp.size(branch)))
  monkeypatch.setattr(finetuning, "finetune_loss", fake_loss)
  groups = optim.make_groups(spec.optim, lambda s: 0.0, {"total": tuple(params)})
  state = {"params": params, "opt": {"total": groups["total"].tx.init(params)},
           "step": jnp.asarray(3, jnp.int32)}
  base = jax.random.key(7)
  step = jax.jit(lambda s, b: task.train_step(s, b, base, graphdef=graphdef, groups=groups,
                                              schedule=lambda s: 0.0))
  _, metrics = jax.device_get(step(state, _finetune_batch(16)))
  key = jax.random.fold_in(base, 3)
  if shards == 1:
    assert seen == [()]
    branch = int(finetuning.branch_index(key, mix))
    assert float(metrics["loss"]) == branch + 1 and int(metrics["branch"]) == branch
    assert not any(k.startswith("parts/") for k in metrics)
    assert task.log_fields(metrics) == f"this step {finetuning.BRANCHES[branch]}"
    return
  assert seen == [(shards,)]
  branches = [int(finetuning.branch_index(k, mix)) for k in jax.random.split(key, shards)]
  assert float(metrics["loss"]) == sum((b + 1) * 10 ** i for i, b in enumerate(branches))
  assert int(metrics["branch"]) == branches[0]
  counts = {name: int(metrics[f"parts/{name}"]) for name in finetuning.BRANCHES}
  assert list(counts.values()) == np.bincount(branches, minlength=3).tolist()
  assert task.log_fields(jax.tree.map(float, metrics)) == (
      "this step's parts " + ", ".join(f"{k} {v}" for k, v in counts.items()))


@pytest.mark.parametrize("value,message", [
    (3, r"config\.finetune\.modality_shards: 3 does not divide the finetuning batch of 16"),
    (0, r"config\.finetune\.modality_shards: must be a positive integer"),
    (True, r"config\.finetune\.modality_shards: must be a positive integer")])
def test_bad_modality_shards(value, message):
  with pytest.raises(ConfigError, match=message):
    parse(finetune_config("unused", modality_shards=value), 8)


# ----- evaluation scores (finetune.eval_scores) ---------------------------------------------

def test_eval_scores_sigmoid_changes_top1_through_the_eval_step(monkeypatch):
  # Two kinds of frames, five each: (3, 0) and (-10, -5). Softmax per frame, then the mean,
  # favours class 1 (0.48 vs 0.52); a sigmoid per frame favours class 0 (0.48 vs 0.25).
  frames = np.array([[3.0, 0.0]] * 5 + [[-10.0, -5.0]] * 5)  # (10, 2)
  logits = {"a": frames[:1], "v": frames[None], "av": frames[None, ::-1]}
  feats = {"a": np.zeros((1, 8), np.float32), "v": np.zeros((1, 10, 8), np.float32)}
  monkeypatch.setattr(AVSiamClassifier, "clip_outputs", lambda self, audio, video: (
      {k: jnp.asarray(x, jnp.float32) for k, x in logits.items()}, feats))
  batch = {"audio": np.zeros((1, 32, 128), np.float32),
           "video": np.zeros((1, 10, 32, 32, 3), np.float32)}
  label = np.array([[0.0, 1.0]])
  sigmoid = lambda x: 1 / (1 + np.exp(-x))
  softmax = lambda x: np.exp(x) / np.exp(x).sum(-1, keepdims=True)
  top1 = {}
  for scores, fn in (("loss", softmax), ("sigmoid", sigmoid)):
    config = finetune_config("unused", loss="ce", eval_scores=scores)
    spec, task, (graphdef, params) = _classifier(config, num_classes=2)
    assert spec.finetune.eval_scores == scores
    out = jax.device_get(task.eval_step(params, batch, graphdef=graphdef))
    np.testing.assert_allclose(out["probs_av"], fn(frames[::-1]).mean(0, keepdims=True),
                               rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(out["probs_v"], fn(frames).mean(0, keepdims=True), rtol=1e-5,
                               atol=1e-7)
    np.testing.assert_allclose(out["probs_a"], fn(frames[:1]), rtol=1e-5, atol=1e-7)
    top1[scores] = classification.top1_accuracy(out["probs_av"], label)
  assert top1 == {"loss": 1.0, "sigmoid": 0.0}
  with pytest.raises(ConfigError, match=r"config\.finetune\.eval_scores: must be one of"):
    parse(finetune_config("unused", eval_scores="softmax"), 8)
