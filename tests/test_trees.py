"""Parameter trees by path: flattening, rebuilding and the stored-versus-wanted check."""
import jax
import numpy as np
import pytest

from avsiam_jax import trees


def test_flatten_and_rebuild_round_trip():
  tree = {"encoder": {"blocks": {0: {"w": np.ones(2)}, 1: {"w": np.zeros(3)}}}, "b": np.ones(1)}
  flat = trees.flatten(tree)
  assert sorted(flat) == ["b", "encoder/blocks/0/w", "encoder/blocks/1/w"]
  back = trees.rebuild(tree, {k: v + 1 for k, v in flat.items()})
  assert list(back["encoder"]["blocks"]) == [0, 1]  # the keys keep their types
  np.testing.assert_array_equal(back["encoder"]["blocks"][1]["w"], np.ones(3))


def test_missing_and_extra_paths_are_named():
  a = {"params": {"w": np.zeros((2, 3)), "v": np.zeros(1)}}
  b = {"params": {"w": np.zeros((2, 3))}}
  with pytest.raises(ValueError, match="checkpoint /d has no params/v .*needs; retry"):
    trees.check_compatible(b, a, "/d", "retry")
  with pytest.raises(ValueError, match="holds params/v .*lacks"):
    trees.check_compatible(a, b, "/d")
  with pytest.raises(ValueError, match=r"params/w has shape \(2, 3\) in the pretrained but"):
    trees.check_compatible(a, {"params": {"w": np.zeros((3, 2)), "v": np.zeros(1)}}, "d",
                           what="pretrained")


def test_dtype_mismatch_is_refused():
  stored = {"params": {"w": jax.ShapeDtypeStruct((2, 3), np.float32)}}
  wanted = {"params": {"w": jax.ShapeDtypeStruct((2, 3), np.dtype("bfloat16"))}}
  with pytest.raises(ValueError, match="params/w has dtype float32 in the checkpoint but "
                                       "bfloat16 in the model"):
    trees.check_compatible(stored, wanted, "/some/dir/7")
  trees.check_compatible(stored, stored, "/some/dir/7")  # equal trees pass
