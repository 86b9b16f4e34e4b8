"""Multi-ratio masking invariants."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from avsiam_jax import masking, pretraining
from avsiam_jax.models import vit
from avsiam_jax.models.avsiam import AVSiam, AVSiamSpec

RATIOS = (0.0, 0.2, 0.4, 0.6, 0.8)


def test_kept_counts_match_released():
  assert [masking.kept_count(196, r) for r in RATIOS] == [196, 156, 117, 78, 39]
  assert [masking.kept_count(512, r) for r in RATIOS] == [512, 409, 307, 204, 102]
  assert masking.kept_count(100, 0.7) == 30  # 100 * 0.3 is 29.999... in floats


@pytest.mark.parametrize("batch,shards", [(10, 1), (20, 2), (40, 8)])
def test_groups_partition_each_shard(batch, shards):
  perm = np.asarray(masking.group_permutation(jax.random.key(0), batch, 5, shards))
  local = batch // shards
  assert perm.shape == (shards, 5, local // 5)
  for s in range(shards):
    assert sorted(perm[s].ravel()) == list(range(local))  # every example in exactly one group


def test_take_untake_roundtrip():
  x = jnp.arange(40 * 3, dtype=jnp.float32).reshape(40, 3)
  perm = masking.group_permutation(jax.random.key(1), 40, 5, 4)
  groups = [masking.take_group(x, perm, k) for k in range(5)]
  assert all(g.shape == (8, 3) for g in groups)
  # Shard s's part of every group comes from shard s's slice of the batch.
  for g in groups:
    rows = np.asarray(g[:, 0] // 3).astype(int).reshape(4, 2)
    assert np.all(rows // 10 == np.arange(4)[:, None])
  np.testing.assert_array_equal(masking.untake_groups(groups, perm), x)


def test_fresh_permutation_each_key():
  a = masking.group_permutation(jax.random.key(0), 40, 5, 1)
  b = masking.group_permutation(jax.random.key(1), 40, 5, 1)
  assert not np.array_equal(a, b)


def test_keep_by_noise_distinct_and_restorable():
  x = jnp.arange(6 * 50, dtype=jnp.float32).reshape(6, 50, 1)
  noise = masking.mask_noise(jax.random.key(0), 6, 50)
  kept, ids_keep, ids_restore = masking.keep_by_noise(noise, x, 20)
  assert kept.shape == (6, 20, 1)
  for row in np.asarray(ids_keep):
    assert len(set(row.tolist())) == 20
  np.testing.assert_array_equal(kept[..., 0], np.take_along_axis(np.asarray(x[..., 0]), ids_keep, 1))
  mask = np.asarray(masking.masked_positions(ids_restore, 20))
  assert np.all(mask.sum(1) == 30)
  for m, ids in zip(mask, np.asarray(ids_keep)):
    assert np.all(m[ids] == 0)


def test_bad_batch_is_a_clear_error():
  with pytest.raises(ValueError, match="not divisible by the 5 mask-ratio groups"):
    masking.check_groups(12, 5, 1)
  with pytest.raises(ValueError, match="data shards"):
    masking.check_groups(10, 5, 4)
  with pytest.raises(ValueError, match="mask ratio"):
    masking.kept_count(10, 1.0)


@pytest.mark.parametrize("pack", [False, True])
def test_multi_ratio_features_restore_order(pack):
  """Each example's pooled feature equals encoding it alone with the tokens its group kept,
  whether the groups run one call each or packed into rows (one example per group and shard:
  every row is a lone example or two, padded)."""
  spec = AVSiamSpec(vit.encoder_spec("test", image_size=32, audio_frames=32, mel_bins=32),
                    decoder_width=16, decoder_depth=1, decoder_heads=2)
  model = AVSiam(spec, rngs=nnx.Rngs(0))
  video = jax.random.normal(jax.random.key(2), (10, 32, 32, 3))
  key = jax.random.key(3)
  out = np.asarray(pretraining.multi_ratio_features(model, video, "v", key, RATIOS, 2, pack))

  # Recompute by hand, example by example, from the same random draws.
  enc = model.encoder
  tokens = enc.project_patches(enc.patches(video, "v"), "v")
  key_perm, key_mask = jax.random.split(key)
  perm = np.asarray(masking.group_permutation(key_perm, 10, 5, 2))
  for k, ratio in enumerate(RATIOS):
    group = masking.take_group(tokens, jnp.asarray(perm), k)
    keep = masking.kept_count(4, ratio)
    if keep < 4:
      noise = masking.mask_noise(jax.random.fold_in(key_mask, k), group.shape[0], 4)
      group, _, _ = masking.keep_by_noise(noise, group, keep)
    for j, (s, i) in enumerate((s, i) for s in range(2) for i in perm[s, k]):
      ref = enc.encode_tokens(group[j:j + 1], "v").mean(axis=1)[0]
      np.testing.assert_allclose(out[s * 5 + i], ref, rtol=1e-5, atol=1e-5)
  # And the ratio-0 group gives exactly the unmasked features for its examples.
  full = np.asarray(model.features(video, "v"))
  for s in range(2):
    i = perm[s, 0, 0]
    np.testing.assert_allclose(out[s * 5 + i], full[s * 5 + i], rtol=1e-5, atol=1e-5)
