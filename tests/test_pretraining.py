"""Pretraining updates: each optimizer steps only the parameters its loss reaches; the
contrastive direction; per-modality ratio sets; loss weights."""
import dataclasses

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from avsiam_jax import optim, pretraining, sharding, utils
from avsiam_jax.config import ConfigError, parse
from avsiam_jax.models.avsiam import AVSiam
from tests.conftest import build
from tests.test_losses import _np_contrastive
from tests.test_model import random_params
from tests.test_train import fixed_batch, tiny_config


def test_separate_optimizers_touch_only_what_their_loss_reaches():
  config = tiny_config(batch=4)
  config.pretrain.mask_ratios = (0.0, 0.5)  # two groups keep the compile short
  config.eval.batch_size = 4
  config.pretrain.separate_optimizers = True
  # Large L2 decay: an optimizer that stepped parameters its loss does not reach would move
  # them by about lr per step (Adam normalizes wd * theta), far beyond the tolerances below.
  config.optim.weight_decay = 0.05
  spec, mesh, task, fns = build(config)
  state = fns.init(jax.random.key(0))
  before = jax.device_get(state["params"])
  batch = sharding.global_batch(fixed_batch(4), mesh)
  new, _ = fns.step(state, batch, jax.random.key(1))
  after = jax.device_get(new["params"])

  groups = task.opt_groups(list(before))
  assert groups["contrastive"] == ("encoder",)
  assert "encoder" not in groups["reconstruction"]
  assert set(groups["contrastive"]) | set(groups["reconstruction"]) == set(before)
  # Each optimizer holds Adam moments for its own parameters only.
  for name, keys in groups.items():
    adam = new["opt"][name][1]
    assert set(adam.mu) == set(keys) and set(adam.nu) == set(keys), name

  # The reference, loss by loss: the contrastive optimizer steps the encoder with the
  # contrastive gradient; the reconstruction optimizer then steps the rest with its gradient
  # at the updated parameters. Parameters outside a group are carried over bit for bit.
  schedule = optim.lr_schedule(spec.pretrain.schedule, 10)
  opt = optim.make_groups(spec.optim, schedule, groups)
  key = jax.random.fold_in(jax.random.key(1), 0)

  @jax.jit
  def reference(params):
    for name, group in opt.items():
      owned = pretraining.loss_groups(spec.pretrain)[name]
      assert owned == (name,)
      grads = jax.grad(lambda p: pretraining.objective(
          nnx.merge(fns.graphdef, p), batch, key, spec.pretrain, owned)(p)[0])(params)
      stepped, _ = optim.apply_group(group, grads, group.tx.init(optim.subset(params,
                                                                               group.keys)),
                                     params)
      for k in params:
        if k not in group.keys:
          assert stepped[k] is params[k]  # not even copied
      params = stepped
    return params
  want = jax.device_get(reference(jax.device_put(before)))
  for path, a in jax.tree_util.tree_leaves_with_path(after):
    b = want
    for k in path:
      b = b[k.key]
    if path[-1].key == "qkv_bias":
      # The key bias: softmax is blind to it, its exact gradient is zero, and Adam's
      # g / sqrt(v) turns float noise there into steps of up to lr either way.
      a, b = a[::2], b[::2]
    # 2% of one step (lr 1e-3): a wrong step moves a parameter by about lr.
    np.testing.assert_allclose(a, b, rtol=0, atol=2e-5, err_msg=jax.tree_util.keystr(path))
  # Both losses moved their own parameters.
  for k in ("encoder", "decoder_embed", "mm_norm"):
    moved = optax.tree.norm(jax.tree.map(np.subtract, after[k], before[k]))
    assert float(moved) > 0, k


@pytest.mark.parametrize("accum", [1, 2])
def test_contrastive_direction_reaches_both_loss_paths(accum):
  """pretrain.contrastive in the full-batch loss and in gradient accumulation (which computes
  the loss apart), against float64 numpy on the features the loss compares."""
  config = tiny_config(batch=8)
  config.pretrain.mask_ratios = (0.0, 0.5)
  config.accum_steps = accum
  config.eval.batch_size = 8
  key = jax.random.key(3)
  batch = fixed_batch(8)
  spec = parse(config, 1).model
  graphdef, params = random_params(lambda: AVSiam(spec, rngs=nnx.Rngs(0)))
  specs = {}
  for direction in ("audio_to_video", "symmetric"):
    config.pretrain.contrastive = direction
    specs[direction] = parse(config, 1).pretrain
    assert specs[direction].contrastive == direction
  p = specs["symmetric"]

  def run(q, b):
    """Each direction's loss (plain autodiff or two passes over micro-batches), and the
    features as the objective draws them (the micro-batches draw the same masks)."""
    loss = lambda p: pretraining.losses_and_grads(q, graphdef, b, key, p, ("contrastive",))[0]
    got = {d: loss(p)[1]["contrastive"] for d, p in specs.items()}
    m = nnx.merge(graphdef, q)
    feats = [pretraining.multi_ratio_features(m, b[name], mod, k, p.mask_ratios, p.batch_shards,
                                              p.pack_groups)
             for name, mod, k in zip(("audio", "video"), "av", jax.random.split(key, 3))]
    return got, feats
  got, feats = jax.jit(run)(params, batch)
  feats = [np.asarray(f, np.float64) for f in feats]
  for direction, loss in got.items():
    want = _np_contrastive(*feats, p.tau, direction)
    assert abs(float(loss) - want) < 1e-4 * max(1, abs(want)), (direction, loss, want)
  assert abs(float(got["audio_to_video"]) - float(got["symmetric"])) > 1e-3


# ----- per-modality ratio sets and loss weights ----------------------------------------------

def _encoder_inputs(config, monkeypatch):
  """{modality: [(tokens shape, segments)]} of every encoder call the pretraining objective
  makes, traced (nothing compiled) for a batch of config.batch_size."""
  spec = parse(config, 1)
  calls = {"a": [], "v": []}
  encode = AVSiam.encode
  monkeypatch.setattr(AVSiam, "encode", lambda self, tokens, modality, segments=None: (
      calls[modality].append((tokens.shape, segments)) or encode(self, tokens, modality,
                                                                 segments)))
  model = nnx.eval_shape(lambda: AVSiam(spec.model, rngs=nnx.Rngs(0)))
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  b, enc = config.batch_size, spec.model.encoder
  batch = {"audio": jax.ShapeDtypeStruct((b, enc.audio_frames, enc.mel_bins), np.float32),
           "video": jax.ShapeDtypeStruct((b, enc.image_size, enc.image_size, 3), np.float32)}
  jax.eval_shape(lambda q, x: pretraining.objective(model, x, jax.random.key(0),
                                                    spec.pretrain)(q)[0], params, batch)
  return calls, spec


@pytest.mark.parametrize("pack", [False, True])
def test_each_modality_keeps_the_tokens_of_its_own_ratio_set(pack, monkeypatch):
  """Audio in 2 groups, video in 3, at different ratios: the encoder sees exactly each group's
  kept tokens (counted by hand), per group or packed; no reconstruction pass at weight 0."""
  config = tiny_config(batch=12)
  config.model.image_size = config.model.audio_frames = 64  # video 4 x 4, audio 4 x 8 patches
  config.mesh.batch_shards = 2
  config.pretrain.mask_ratios = (0.0, 0.2, 0.4, 0.6, 0.8)  # 12 does not split into 5: unused
  config.pretrain.audio_mask_ratios = (0.0, 0.5)
  config.pretrain.video_mask_ratios = (0.25, 0.5, 0.75)
  config.pretrain.reconstruction_weight = 0.0
  config.pretrain.pack_groups = pack
  calls, spec = _encoder_inputs(config, monkeypatch)
  assert (spec.model.encoder.num_audio_tokens, spec.model.encoder.num_video_tokens) == (32, 16)
  # (examples per group over both shards, kept tokens per example) by group.
  want = {"a": [(6, 32), (6, 16)], "v": [(4, 12), (4, 8), (4, 4)]}
  for mod, groups in want.items():
    if not pack:
      assert [(shape[0], shape[1]) for shape, _ in calls[mod]] == groups, mod
      assert all(seg is None for _, seg in calls[mod])
      continue
    (shape, seg), = calls[mod]  # one call for all of the modality's groups
    assert shape[0] == seg.shards * seg.rows and shape[1] == seg.length
    # Each row's segments: one example's kept tokens each, the rest of the row padding.
    segments = [n for _, rows, lengths in seg.blocks for n in lengths for _ in range(rows)]
    assert sorted(segments) == sorted(n for g, n in groups for _ in range(g // 2)), mod
    assert seg.shards * sum(segments) == sum(g * n for g, n in groups)


def test_ratio_sets_of_different_sizes_are_checked_for_both(monkeypatch):
  c = tiny_config(batch=40)  # 5 per device on 8 devices
  c.pretrain.audio_mask_ratios = (0.0, 0.5)
  with pytest.raises(ConfigError, match=r"config\.batch_size: per-shard batch 5 .* 2 mask-ratio "
                     r"groups of config\.pretrain\.audio_mask_ratios; .* multiple of 80"):
    parse(c, 8)
  c.pretrain.audio_mask_ratios, c.pretrain.video_mask_ratios = (), (0.0, 0.5)
  with pytest.raises(ConfigError, match=r"2 mask-ratio groups of config\.pretrain\.video_mask"):
    parse(c, 8)
  c.batch_size = 80
  c.accum_steps = 2  # audio: 2 per group and shard, which 2 micro-batches split; video: 5
  with pytest.raises(ConfigError, match=r"config\.accum_steps: 2 does not divide the 5 .* "
                     r"config\.pretrain\.video_mask_ratios"):
    parse(c, 8)
  c.accum_steps = 1
  p = parse(c, 8).pretrain
  assert (p.ratios("a"), p.ratios("v")) == ((0.0, 0.2, 0.4, 0.6, 0.8), (0.0, 0.5))


def _fresh_state(fns, seed=0):
  """A step's input state without compiling the model's initializers: random parameters
  (normal, 0.05) and a fresh optimizer (moments and counts 0), on the state's shardings."""
  rng = np.random.default_rng(seed)
  fill = lambda a: jax.device_put(rng.normal(size=a.shape, scale=0.05).astype(a.dtype),
                                  a.sharding)
  zeros = lambda a: jax.device_put(np.zeros(a.shape, a.dtype), a.sharding)
  return dict(jax.tree.map(zeros, fns.abstract_state),
              params=jax.tree.map(fill, fns.abstract_state["params"]))


def test_without_reconstruction_the_decoder_does_no_work_and_stays():
  """reconstruction_weight 0 (Table 8's L_c alone): fewer FLOPs in the step, no optimizer holds
  the decoder (nor the multimodal blocks), which stay bit for bit even under a large decay."""
  config = tiny_config(batch=4)
  config.pretrain.mask_ratios = (0.0, 0.5)
  config.eval.batch_size = 4
  config.optim.weight_decay = 0.05  # Adam would move any parameter it held by about lr
  flops = {}
  for weight in (1.0, 0.0):
    config.pretrain.reconstruction_weight = weight
    _, mesh, task, fns = build(config)
    state = _fresh_state(fns)
    batch = sharding.global_batch(fixed_batch(4), mesh)
    # XLA's count of the step as traced: the decoder is not in the program at weight 0.
    flops[weight] = utils.cost_of(fns.step.lower(state, batch, jax.random.key(1)))["flops"]
  assert flops[0.0] < 0.8 * flops[1.0], flops
  before = jax.device_get(state["params"])
  assert task.opt_groups(list(before)) == {"total": ("encoder",)}
  assert set(state["opt"]["total"][1].mu) == {"encoder"}
  step = fns.step.lower(state, batch, jax.random.key(1)).compile()
  assert utils.cost_of(step)["flops"] < 0.8 * flops[1.0]
  new, metrics = step(state, batch, jax.random.key(1))
  after = jax.device_get(new["params"])
  for k in before:
    if k == "encoder":
      assert float(optax.tree.norm(jax.tree.map(np.subtract, after[k], before[k]))) > 0
      continue
    for a, b in zip(jax.tree.leaves(after[k]), jax.tree.leaves(before[k])):
      np.testing.assert_array_equal(a, b, err_msg=k)
  # The log reports what was computed, and no reconstruction loss.
  metrics = jax.device_get(metrics)
  assert "reconstruction" not in metrics and metrics["loss"] == metrics["contrastive"]
  assert task.log_fields(metrics) == f"contrastive {metrics['contrastive']:.4f}"


def test_loss_weights_scale_the_loss_and_gradient():
  """L = 0.5 L_c + 0.25 L_rec against the unweighted losses' values and gradients, by plain
  autodiff and by the two passes over micro-batches."""
  config = tiny_config(batch=8)
  config.pretrain.mask_ratios = (0.0, 0.5)
  config.eval.batch_size = 8
  p = parse(config, 1).pretrain
  config.pretrain.contrastive_weight, config.pretrain.reconstruction_weight = 0.5, 0.25
  weighted = {accum: dataclasses.replace(parse(config, 1).pretrain, accum_steps=accum)
              for accum in (1, 2)}
  graphdef, params = random_params(lambda: AVSiam(parse(config, 1).model, rngs=nnx.Rngs(0)))
  key, batch = jax.random.key(3), fixed_batch(8)

  def run(q, b):
    ref = {n: pretraining.losses_and_grads(q, graphdef, b, key, p, (n,)) for n in
           pretraining.LOSSES}
    return ref, {m: pretraining.losses_and_grads(q, graphdef, b, key, w)
                 for m, w in weighted.items()}
  ref, got = jax.device_get(jax.jit(run)(params, batch))
  (c, _), g_c = ref["contrastive"]
  (r, _), g_r = ref["reconstruction"]
  tol = dict(rtol=1e-5, atol=1e-6)
  for accum, ((loss, parts), grads) in got.items():
    np.testing.assert_allclose(parts["contrastive"], c, **tol)  # parts stay unweighted
    np.testing.assert_allclose(parts["reconstruction"], r, **tol)
    np.testing.assert_allclose(loss, 0.5 * c + 0.25 * r, **tol)
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
      want = 0.5 * _at(g_c, path) + 0.25 * _at(g_r, path)
      np.testing.assert_allclose(g, want, rtol=1e-4, atol=1e-6,
                                 err_msg=f"accum {accum} {jax.tree_util.keystr(path)}")


def _at(tree, path):
  for k in path:
    tree = tree[k.key]
  return tree


def test_analytic_flops_follow_the_ratio_sets_and_weights():
  """compile_only's matmul count: unmasked and contrastive only, a step is the finetuning
  step's encoder passes (audio + one frame, forward and backward) without its multimodal
  blocks; retrieval finetuning is that step."""
  from avsiam_jax import compile_only  # pylint: disable=import-outside-toplevel
  from configs import base  # pylint: disable=import-outside-toplevel
  c = base.get_config()
  default = compile_only.analytic_flops_per_sample(parse(c, 8), "pretrain")
  c.pretrain.reconstruction_weight = 0.0
  contrastive = compile_only.analytic_flops_per_sample(parse(c, 8), "pretrain")
  c.pretrain.audio_mask_ratios = c.pretrain.video_mask_ratios = (0.0,)
  spec = parse(c, 8)
  unmasked = compile_only.analytic_flops_per_sample(spec, "pretrain")
  assert contrastive < default and contrastive < unmasked
  enc, m = spec.model.encoder, spec.model
  mm = 3 * m.mm_depth * compile_only._block_flops(  # pylint: disable=protected-access
      enc.num_audio_tokens + enc.num_video_tokens, enc.width, enc.mlp)
  finetune = compile_only.analytic_flops_per_sample(spec, "finetune")
  assert unmasked == pytest.approx(finetune - mm, rel=1e-12)
  assert compile_only.analytic_flops_per_sample(spec, "retrieval_finetune") == unmasked
