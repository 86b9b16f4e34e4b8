"""Gradient accumulation: micro-batches give the full batch's losses, gradients and update."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dataclasses

from avsiam_jax import masking, pretraining, sharding
from avsiam_jax.config import ConfigError, parse
from conftest import build
from test_train import fixed_batch, tiny_config

TOL = dict(rtol=1e-5, atol=1e-5)


def _params_and_graphdef(config):
  _, _, _, fns = build(config)
  return fns.init(jax.random.key(0))["params"], fns.graphdef


def _losses_and_grads(config, params, graphdef, batch, batch_shards):
  """Plain autodiff when accum_steps is 1, two passes over micro-batches otherwise."""
  spec = dataclasses.replace(parse(config, 1).pretrain, batch_shards=batch_shards)
  run = jax.jit(lambda p, b: pretraining.losses_and_grads(p, graphdef, b, jax.random.key(1),
                                                          spec))
  return jax.device_get(run(params, batch))


def test_micro_rows_partition_every_shard_and_group():
  s, m = 2, 4
  x = jnp.arange(2 * 5 * 8)  # 2 shards of 5 groups x 8
  parts = [masking.micro_rows(x, i, m, s) for i in range(m)]
  np.testing.assert_array_equal(masking.join_micro(jnp.stack(parts), s), x)
  # Micro-batch 1 holds rows 10..19 of each shard's 40, not the batch's rows 20..39.
  np.testing.assert_array_equal(parts[1], np.r_[10:20, 50:60])

  perm = masking.group_permutation(jax.random.key(0), 40, 5, s)  # (2, 5, 4)
  micro = np.stack([masking.micro_groups(perm, i, 2) for i in range(2)])  # (2, S, G, 2)
  np.testing.assert_array_equal(np.concatenate(list(micro), axis=-1), perm)
  # A group's micro-batch rows are the same examples as micro_rows of that group.
  group = masking.take_group(jnp.arange(40), perm, 3)
  np.testing.assert_array_equal(masking.micro_rows(group, 1, 2, s),
                                masking.take_group(jnp.arange(40), micro[1], 3))


def test_micro_batches_match_the_full_batch():
  config = tiny_config(batch=40)
  params, graphdef = _params_and_graphdef(config)
  batch = fixed_batch(40)
  (loss1, parts1), grads1 = _losses_and_grads(config, params, graphdef, batch, 1)
  assert sum(float(np.abs(g).sum()) for g in jax.tree.leaves(grads1["encoder"])) > 0
  for accum in (2,):
    config.accum_steps = accum
    (loss, parts), grads = _losses_and_grads(config, params, graphdef, batch, 1)
    np.testing.assert_allclose(loss, loss1, **TOL)
    for k in ("contrastive", "reconstruction"):
      np.testing.assert_allclose(parts[k], parts1[k], **TOL)
    assert jax.tree.structure(grads) == jax.tree.structure(grads1)
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
      g1 = grads1
      for p in path:
        g1 = g1[p.key]
      np.testing.assert_allclose(g, g1, **TOL,
                                 err_msg=f"accum {accum} {jax.tree_util.keystr(path)}")


def _compare_params(new, ref, old, lr):
  """One Adam step: equal, except where float noise in exactly-zero gradients (the attention
  key bias) decides a step of up to lr either way (Adam divides the gradient by its size)."""
  for path, a in jax.tree_util.tree_leaves_with_path(new):
    b, o = ref, old
    for p in path:
      b, o = b[p.key], o[p.key]
    a, b, o = (np.asarray(x) for x in (a, b, o))
    name = jax.tree_util.keystr(path)
    if name.endswith("['qkv_bias']"):
      assert np.all(np.abs(a - o) <= lr * 1.001), name
      a, b = np.delete(a, 1, axis=0), np.delete(b, 1, axis=0)  # query and value biases
    np.testing.assert_allclose(a, b, **TOL, err_msg=name)


def test_sharded_train_step_matches_the_full_batch():
  # Parameters sharded over fsdp x tensor; the batch over 2 fsdp shards of 20: 4 per group.
  # Separate optimizers: both single-loss paths, one after the other.
  config = tiny_config(batch=40)
  config.pretrain.separate_optimizers = True
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, 2, 2
  results = {}
  for accum in (1, 4):
    config.accum_steps = accum
    spec, mesh, _, fns = build(config, 4)
    assert spec.pretrain.batch_shards == 2
    batch = sharding.global_batch(fixed_batch(40), mesh)
    state = fns.init(jax.random.key(0))
    old = jax.device_get(state["params"])
    new, metrics = fns.step(state, batch, jax.random.key(1))
    results[accum] = jax.device_get((new["params"], metrics))
  (p1, m1), (p4, m4) = results[1], results[4]
  assert set(m4) == set(m1)
  for k in m1:
    np.testing.assert_allclose(m4[k], m1[k], **TOL, err_msg=k)
  _compare_params(p4, p1, old, config.optim.lr)
  # The step moved the encoder.
  assert np.abs(p1["encoder"]["patch_kernel"] - old["encoder"]["patch_kernel"]).max() > 1e-4


def test_compiled_size_does_not_grow_with_accum_steps():
  config = tiny_config(batch=40)
  spec, _, _, fns = build(config)
  params = jax.eval_shape(fns.init, jax.random.key(0))["params"]
  batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), fixed_batch(40))
  sizes = []
  for accum in (2, 4):
    config.accum_steps = accum
    p_spec = dataclasses.replace(spec.pretrain, accum_steps=accum)
    jaxpr = jax.make_jaxpr(lambda p, b: pretraining.losses_and_grads(
        p, fns.graphdef, b, jax.random.key(1), p_spec))(params, batch)
    sizes.append(len(jaxpr.jaxpr.eqns))
    assert "scan" in {e.primitive.name for e in jaxpr.jaxpr.eqns}
  assert sizes[0] == sizes[1]


def test_check_accumulation():
  config = tiny_config(batch=40)  # 5 ratio groups
  for accum, shards in ((1, 8), (2, 1), (4, 1), (8, 1), (4, 2), (2, 4)):
    config.accum_steps, config.mesh.batch_shards = accum, shards
    assert parse(config, 8).pretrain.accum_steps == accum
  for accum, shards in ((3, 1), (4, 4), (16, 1), (0, 1), (-2, 1), (2, 8)):
    config.accum_steps, config.mesh.batch_shards = accum, shards
    with pytest.raises(ConfigError, match=r"config\.accum_steps"):
      parse(config, 8)
