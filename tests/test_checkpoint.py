"""Checkpoints: restoring onto another mesh, and refusing a checkpoint of another model."""
import os

import jax
import numpy as np
import pytest

from avsiam_jax import checkpoint, sharding
from conftest import build
from tests.test_train import fixed_batch, tiny_config


def mesh_config(shape, **model):
  config = tiny_config()
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = shape
  config.mesh.batch_shards = 8  # the masking layout does not depend on the mesh
  for k, v in model.items():
    setattr(config.model, k, v)
  return config


def setup(shape, **model):
  _, mesh, _, fns = build(mesh_config(shape, **model), int(np.prod(shape)))
  return mesh, fns


def place(host_tree, abstract):
  return jax.tree.map(lambda x, a: jax.device_put(x, a.sharding), host_tree, abstract)


def zeros_state(abstract):
  return place(jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract), abstract)


def save(directory, step, state, data_state):
  ckpt = checkpoint.Checkpointer(directory, every_steps=1, keep=2)
  assert ckpt.save(step, state, data_state)
  ckpt.close()


def test_restore_onto_a_different_mesh(tmp_path):
  _, fns8 = setup((2, 4, 1))
  # Real initial parameters and made-up Adam moments, so every leaf holds distinct numbers.
  rng = np.random.default_rng(0)
  def fill(path, x):
    names = {getattr(k, "name", None) for k in path}  # namedtuple fields of the Adam state
    if "mu" in names:
      return rng.normal(scale=1e-3, size=x.shape).astype(x.dtype)
    if "nu" in names:
      return (rng.normal(scale=1e-3, size=x.shape) ** 2).astype(x.dtype)
    if x.ndim == 0:  # the step and Adam's count
      return np.asarray(3, x.dtype)
    return x
  host = jax.tree_util.tree_map_with_path(fill, jax.device_get(fns8.init(jax.random.key(0))))
  state8 = place(host, fns8.abstract_state)
  assert state8["params"]["encoder"]["patch_kernel"].sharding.mesh.size == 8
  assert np.all(host["opt"]["total"][1].nu["encoder"]["patch_kernel"] > 0)
  save(str(tmp_path / "ckpt"), 3, state8, {"epoch": 0, "position": 120})

  mesh4, fns4 = setup((2, 1, 2))
  ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"), every_steps=1, keep=2)
  assert ckpt.latest_step() == 3
  restored, data_state = ckpt.restore(3, fns4.abstract_state)
  ckpt.close()
  assert data_state == {"epoch": 0, "position": 120}
  flat = jax.tree_util.tree_leaves_with_path
  for (path, got), (_, want), (_, a) in zip(flat(restored), flat(host),
                                            flat(fns4.abstract_state)):
    np.testing.assert_array_equal(np.asarray(got), want, err_msg=jax.tree_util.keystr(path))
    assert got.sharding == a.sharding, path
    assert got.sharding.mesh.size == 4
  # The tensor axis really splits something on the new mesh.
  qkv = restored["params"]["encoder"]["blocks"][0]["attn"]["qkv"]
  assert "tensor" in qkv.sharding.spec and qkv.addressable_shards[0].data.shape != qkv.shape

  # A step from the restored state equals one from the saved values placed on this mesh.
  batch = sharding.global_batch(fixed_batch(40), mesh4)
  step = fns4.step.lower(restored, batch, jax.random.key(1)).compile()  # the trainer's step
  got, m_got = step(restored, batch, jax.random.key(1))
  want, m_want = step(place(host, fns4.abstract_state), batch, jax.random.key(1))
  assert int(got["step"]) == 4 and np.isfinite(float(m_got["loss"]))
  assert float(m_got["loss"]) == float(m_want["loss"])
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def refuse_reading(ckpt, monkeypatch):
  """The mismatch must be found from the metadata, before orbax reads any array."""
  def restore(*args, **kwargs):
    raise AssertionError("arrays were read")
  monkeypatch.setattr(ckpt.manager, "restore", restore)


def test_checkpoint_of_another_variant_is_refused(tmp_path, monkeypatch):
  _, tiny = setup((8, 1, 1), variant="tiny")
  _, test = setup((8, 1, 1), variant="test")
  directory = str(tmp_path / "ckpt")
  save(directory, 5, zeros_state(tiny.abstract_state), {"epoch": 0})
  ckpt = checkpoint.Checkpointer(directory, every_steps=1, keep=2)
  refuse_reading(ckpt, monkeypatch)
  with pytest.raises(ValueError) as e:
    ckpt.restore(5, test.abstract_state)
  msg = str(e.value)
  assert os.path.join(os.path.abspath(directory), "5") in msg and "variant" in msg
  # The first differing parameter by name, with both shapes.
  stored = jax.tree_util.tree_leaves_with_path(tiny.abstract_state["params"])
  wanted = jax.tree_util.tree_leaves_with_path(test.abstract_state["params"])
  path, old, new = next((p, a, b) for (p, a), (_, b) in zip(stored, wanted) if a.shape != b.shape)
  name = "params/" + "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
  assert f"{name} has shape {old.shape} in the checkpoint but {new.shape} in the model" in msg
  ckpt.close()


@pytest.mark.parametrize("saved,restored,words", [
    (1, 2, "has no params/mm_blocks/1/"),        # the model grew: keys missing
    (2, 1, "holds params/mm_blocks/1/"),         # the model shrank: keys left over
])
def test_missing_or_extra_keys_are_refused(tmp_path, monkeypatch, saved, restored, words):
  _, old = setup((8, 1, 1), mm_depth=saved)
  _, new = setup((8, 1, 1), mm_depth=restored)
  directory = str(tmp_path / "ckpt")
  save(directory, 1, zeros_state(old.abstract_state), {})
  ckpt = checkpoint.Checkpointer(directory, every_steps=1, keep=2)
  refuse_reading(ckpt, monkeypatch)
  with pytest.raises(ValueError, match="mm_depth") as e:
    ckpt.restore(1, new.abstract_state)
  assert words in str(e.value) and directory in str(e.value)
  ckpt.close()
