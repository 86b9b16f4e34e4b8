"""Pretraining updates: each optimizer steps only the parameters its loss reaches."""
import jax
import numpy as np
import optax

from avsiam_jax import optim, pretraining, sharding
from tests.conftest import build
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
      grads = jax.grad(lambda p: pretraining.pretrain_losses(
          p, fns.graphdef, batch, key, spec.pretrain, name)[0])(params)
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
