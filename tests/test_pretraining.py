"""Pretraining updates: each optimizer steps only the parameters its loss reaches; the
contrastive direction."""
import jax
import numpy as np
import optax
import pytest
from flax import nnx

from avsiam_jax import optim, pretraining, sharding
from avsiam_jax.config import parse
from avsiam_jax.models.avsiam import AVSiam
from tests.conftest import build
from tests.test_losses import _np_contrastive
from tests.test_model import random_params
from tests.test_sharding import compile_fast
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
  got, feats = compile_fast(jax.jit(run), params, batch)(params, batch)
  feats = [np.asarray(f, np.float64) for f in feats]
  for direction, loss in got.items():
    want = _np_contrastive(*feats, p.tau, direction)
    assert abs(float(loss) - want) < 1e-4 * max(1, abs(want)), (direction, loss, want)
  assert abs(float(got["audio_to_video"]) - float(got["symmetric"])) > 1e-3
