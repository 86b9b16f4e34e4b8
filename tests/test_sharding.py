"""Mesh equivalence: data, FSDP and tensor parallelism give the one-device numbers."""
import itertools
import re

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from avsiam_jax import pretraining, sharding
from avsiam_jax.config import ConfigError, parse
from conftest import build
from tests.test_train import fixed_batch, tiny_config

# (data, fsdp, tensor) over the 8 virtual devices.
MESHES = [(8, 1, 1), (2, 4, 1), (2, 2, 2)]
BATCH = 40  # 5 ratio groups x 8 shards
STEP_KEY = jax.random.key(2)
def make_config(shape):
  config = tiny_config(batch=BATCH)
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = shape
  # Groups are formed per batch shard: the same layout on every mesh, the one-device one too.
  config.mesh.batch_shards = 8
  return config


def setup(shape):
  config = make_config(shape)
  spec, mesh, _, fns = build(config, int(np.prod(shape)))
  return spec, mesh, fns


def place(host_tree, abstract):
  return jax.tree.map(lambda x, a: jax.device_put(x, a.sharding), host_tree, abstract)


def run_step(shape, state0=None):
  """One real train step from the same initial state; returns host copies."""
  spec, mesh, fns = setup(shape)
  # Placing the reference's initial state skips compiling init again for every mesh.
  state = fns.init(jax.random.key(0)) if state0 is None else place(state0, fns.abstract_state)
  state0 = jax.device_get(state)
  batch = sharding.global_batch(fixed_batch(BATCH), mesh)
  step = fns.step.lower(state, batch, STEP_KEY).compile()
  new_state, metrics = step(state, batch, STEP_KEY)
  shardings = jax.tree.map(lambda a: a.sharding, new_state)
  return {"spec": spec, "mesh": mesh, "fns": fns, "state0": state0,
          "shardings": shardings, "state": jax.device_get(new_state),
          "metrics": jax.device_get(metrics), "hlo": step.as_text()}


def adam_gradient(result):
  """The gradient the step fed to Adam: after one step mu = (1 - b1) * (g + wd * params)."""
  o = result["spec"].optim
  mu = result["state"]["opt"]["total"][1].mu
  return jax.tree.map(lambda m, p: m.astype(np.float64) / (1 - o.b1) - o.weight_decay * p,
                      mu, result["state0"]["params"])


def gathered_activations(result) -> list[str]:
  """The compiled step's all-gathers that are not of a parameter (by element count: whole or
  gathered over some of its sharded axes, in any shape; the audio patch kernel is the RGB
  mean of the image one), the contrastive features of all clips (InfoNCE) excepted."""
  mesh, spec = result["mesh"], result["spec"]
  sizes = set()
  for a in jax.tree.leaves(result["fns"].abstract_state["params"]):
    parts = [[d] + ([d // mesh.shape[ax] for ax in (
        (axes,) if isinstance(axes, str) else axes)] if axes else [])
             for d, axes in zip(a.shape, tuple(a.sharding.spec) + (None,) * a.ndim)]
    sizes.update(int(np.prod(p)) for p in itertools.product(*parts))
  sizes |= {n // 3 for n in sizes if n % 3 == 0}  # the audio patch kernel
  sizes.add(BATCH * spec.model.encoder.width)  # the features
  out = []
  for dtype, dims in re.findall(r"= (\w+)\[([\d,]*)\]\S* all-gather\(", result["hlo"]):
    shape = [int(x) for x in dims.split(",") if x]
    if int(np.prod(shape)) not in sizes:
      out.append(f"{dtype}{shape}")
  return out


def leaves(tree):
  return [(jax.tree_util.keystr(p), np.asarray(x))
          for p, x in jax.tree_util.tree_leaves_with_path(tree)]


@pytest.fixture(scope="module")
def reference():
  assert jax.device_count() >= 8
  return run_step((1, 1, 1))


def test_step_gradient_is_the_pretraining_loss_gradient(reference):
  """Ties the step to the pretraining objective, so the mesh tests below compare its gradient."""
  spec, mesh, fns = reference["spec"], reference["mesh"], reference["fns"]
  param_sh = jax.tree.map(lambda a: a.sharding, fns.abstract_state["params"])
  key = jax.random.fold_in(STEP_KEY, 0)  # the step folds in its step number

  def loss_fn(params, batch):
    return pretraining.objective(nnx.merge(fns.graphdef, params), batch, key,
                                 spec.pretrain)(params)[0]
  fn = jax.jit(jax.value_and_grad(loss_fn),
               in_shardings=(param_sh, sharding.batch_sharding(mesh)),
               out_shardings=(sharding.replicated(mesh), param_sh))
  params = place(reference["state0"]["params"], fns.abstract_state["params"])
  batch = sharding.global_batch(fixed_batch(BATCH), mesh)
  loss, grads = jax.device_get(fn(params, batch))
  np.testing.assert_allclose(loss, reference["metrics"]["loss"], rtol=1e-6)
  for (path, g), (_, want) in zip(leaves(adam_gradient(reference)), leaves(grads)):
    np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-6 * np.abs(want).max() + 1e-12,
                               err_msg=path)


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "x".join(map(str, s)))
def test_mesh_matches_one_device(shape, reference):
  got = run_step(shape, reference["state0"])
  # The updated state stays on the mesh, each array as the trainer lays it out.
  want_sh = jax.tree.map(lambda a: a.sharding, got["fns"].abstract_state)
  for sh, want in zip(jax.tree.leaves(got["shardings"]), jax.tree.leaves(want_sh)):
    assert tuple(sh.mesh.devices.shape) == shape and sh == want

  # Loss and gradient.
  for k in ("loss", "contrastive", "reconstruction", "grad_norm_total", "lr"):
    np.testing.assert_allclose(got["metrics"][k], reference["metrics"][k], rtol=1e-5, err_msg=k)
  grads, ref_grads = leaves(adam_gradient(got)), leaves(adam_gradient(reference))
  for (path, g), (_, want) in zip(grads, ref_grads):
    np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-5 * np.abs(want).max() + 1e-12,
                               err_msg=path)

  # The updated parameters. Adam's first step is lr * g / (|g| + eps): where the gradient is
  # float noise around an exact zero (e.g. the key bias, to which softmax is blind) the step
  # may be anything up to lr. Every entry with a real gradient lands where one device put it.
  assert int(got["state"]["step"]) == 1
  lr = float(reference["metrics"]["lr"])
  for (path, p), (_, want), (_, g) in zip(leaves(got["state"]["params"]),
                                          leaves(reference["state"]["params"]), ref_grads):
    real = np.abs(g) > 1e-3 * np.abs(g).max()
    assert real.mean() > 0.5 or not np.abs(g).max(), path  # most entries are compared
    np.testing.assert_allclose(p[real], want[real], rtol=1e-5, atol=1e-7, err_msg=path)
    assert np.all(np.abs(p - want) <= 2 * lr * (1 + 1e-5)), path

  # Activations stay where the rules put them (examples over data x fsdp, heads and MLP
  # hidden units over tensor): the partitioner gathers weights, never activations.
  assert "all-gather" in got["hlo"] or shape[1] * shape[2] == 1
  assert not gathered_activations(got), gathered_activations(got)


def test_fsdp_and_tensor_axes_really_shard(reference):
  _, _, fns = setup((1, 4, 2))
  state = place(reference["state0"], fns.abstract_state)
  specs = {path: a.sharding.spec for path, a in jax.tree_util.tree_leaves_with_path(state["params"])}
  split = [s for s in specs.values() if any(ax is not None for ax in s)]
  assert split and len(split) < len(specs)  # some parameters split, biases etc. replicated
  assert any("fsdp" in s for s in split) and any("tensor" in s for s in split)
  # A split parameter holds a different part of itself on each device.
  qkv = state["params"]["encoder"]["blocks"][0]["attn"]["qkv"]
  assert qkv.sharding.spec == P("fsdp", None, "tensor", None)
  d, three, heads, head_dim = qkv.shape
  for shard in qkv.addressable_shards:
    assert shard.data.shape == (d // 4, three, heads // 2, head_dim)
  assert len({tuple((s.start, s.stop) for s in sh.index) for sh in qkv.addressable_shards}) == 8
  # Adam moments follow their parameters.
  mu = state["opt"]["total"][1].mu
  assert mu["encoder"]["blocks"][0]["attn"]["qkv"].sharding.spec == qkv.sharding.spec


@pytest.fixture
def no_compile():
  """Fails the test if anything is compiled: config errors must come before any compute."""
  seen = []
  def listener(event, duration, **kwargs):
    if event == "/jax/core/compile/backend_compile_duration":
      seen.append(duration)
  jax.monitoring.register_event_duration_secs_listener(listener)
  yield
  jax.monitoring.unregister_event_duration_listener(listener)
  assert not seen, f"{len(seen)} compilations"


@pytest.mark.parametrize("shape,batch,message", [
    # More devices than there are.
    ((4, 4, 1), 40, r"config.mesh: .*needs 16 devices, 8 are present"),
    # Two axes to infer.
    ((-1, -1, 2), 40, r"config.mesh: at most one axis may be -1"),
    # -1 cannot fill the devices left.
    ((3, -1, 1), 40, r"config.mesh: .*does not divide the 8 devices"),
    # 36 clips over data x fsdp = 2 x 4 devices.
    ((2, 4, 1), 36, r"config.batch_size: 36 must be a positive multiple of the 8 devices"),
    # 6 clips per shard cannot form the 5 mask-ratio groups.
    ((2, 4, 1), 48, r"config.batch_size: per-shard batch 6 .* 5 mask-ratio groups.* "
                    r"multiple of 40"),
], ids=["mesh_too_big", "two_minus_one", "minus_one_remainder", "batch_vs_shards",
        "batch_vs_groups"])
def test_bad_mesh_or_batch_fails_before_compute(shape, batch, message, no_compile):
  config = tiny_config(batch=batch)
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = shape
  with pytest.raises(ConfigError, match=message):
    parse(config, 8)


def test_good_mesh_passes_the_checks(no_compile):
  for shape in MESHES + [(1, 4, 2), (-1, 2, 1)]:
    config = tiny_config(batch=BATCH)
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = shape
    parse(config, 8)
