"""Packed ratio groups: the row layout, the round trip back to groups, segment-restricted attention."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from avsiam_jax import masking, packing
from avsiam_jax.models import layers

RATIOS = (0.0, 0.2, 0.4, 0.6, 0.8)


@pytest.mark.parametrize("tokens", [512, 196, 657, 256])  # B/16 and H/14 audio, video
def test_paper_ratios_pack_into_rows_of_equal_length(tokens):
  lengths = [masking.kept_count(tokens, r) for r in RATIOS]
  plan = packing.make_plan(lengths, per_group=4)
  # Five calls become one over 2.5 rows per example-of-a-group, padded by under 1 %.
  assert plan.rows_per_shard * 2 == 5 * 4
  assert plan.padding < 0.01 * 4 * sum(lengths)
  assert plan.length < tokens + min(lengths) + 2


def _ids(segs, plan, shards):
  """(S * R, L) segment number of every token of packed rows, -1 on padding, from Segments."""
  if segs is None:  # one whole example per row
    return np.zeros((shards * plan.rows_per_shard, plan.length), int)
  ids = np.full((segs.shards, segs.rows, segs.length), -1)
  for r0, rows, spans in segs.blocks:
    for i, (a, b) in enumerate(zip(np.cumsum((0,) + spans[:-1]), np.cumsum(spans))):
      ids[:, r0:r0 + rows, a:b] = i
  return ids.reshape(-1, segs.length)


@pytest.mark.parametrize("lengths,single", [((10, 9, 8), False), ((10, 9, 1), True)])
def test_odd_middle_group_pairs_with_itself_only_when_that_pads_less(lengths, single):
  plan = packing.make_plan(lengths, per_group=4)
  assert ((1,) in plan.sets) == single and ((1, 1) in plan.sets) == (not single)
  other = packing.make_plan(lengths, per_group=1)  # one example: nothing to pair it with
  assert (1,) in other.sets
  for p in (plan, other):  # the padding the plan reports is what its rows hold
    ones = [jnp.ones((p.per_group, n, 1)) for n in lengths]
    assert int((packing.pack(ones, p, 1) == 0).sum()) == p.padding


def _tagged_groups(lengths, per_group, shards, dim=3):
  """Group k's (S * g, n_k, dim) tokens: random, so every token is distinct."""
  rng = np.random.default_rng(sum(lengths) + per_group + shards)
  return [rng.normal(size=(shards * per_group, n, dim)).astype(np.float32) for n in lengths]


CASES = [((5, 4, 3, 2, 1), 3, 2), ((5, 4, 3, 2, 1), 4, 1), ((7,), 2, 2), ((6, 3), 1, 3),
         ((4, 4, 4, 4, 4, 4), 2, 1), ((512, 409, 307, 204, 102), 2, 2)]


@pytest.mark.parametrize("lengths,per_group,shards", CASES)
def test_pack_then_pool_gives_each_examples_mean(lengths, per_group, shards):
  groups = _tagged_groups(lengths, per_group, shards)
  plan = packing.make_plan(lengths, per_group)
  rows = packing.pack([jnp.asarray(x) for x in groups], plan, shards)
  assert rows.shape == (shards * plan.rows_per_shard, plan.length, 3)
  pooled = packing.pooled_groups(rows, plan, shards, layers.mean_pool)
  for x, y in zip(groups, pooled):
    np.testing.assert_allclose(y, x.astype(np.float64).mean(axis=1), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("lengths,per_group,shards", CASES)
def test_segments_hold_whole_examples_of_their_own_shard(lengths, per_group, shards):
  groups = _tagged_groups(lengths, per_group, shards)
  plan = packing.make_plan(lengths, per_group)
  rows = np.asarray(packing.pack([jnp.asarray(x) for x in groups], plan, shards))
  segs = packing.segments(plan, shards)
  ids = _ids(segs, plan, shards)
  assert ids.shape == rows.shape[:2]
  if segs is not None:  # the ids the masked (dense) attention uses
    np.testing.assert_array_equal(packing.segment_ids(segs), ids)
  assert np.all(rows[ids == -1] == 0)
  # Every example of every group is one segment of one row of its shard, tokens in order.
  found = set()
  for r, (row, seg) in enumerate(zip(rows, ids)):
    for s in set(seg.tolist()) - {-1}:
      tokens = row[seg == s]
      hits = [(k, i) for k, x in enumerate(groups) for i in range(len(x))
              if x[i].shape == tokens.shape and np.array_equal(x[i], tokens)]
      if not hits:  # the zero example filling an odd self-paired set
        assert np.all(tokens == 0)
        continue
      (k, i), = hits
      assert i // per_group == r // plan.rows_per_shard  # stays in its shard
      found.add((k, i))
  assert found == {(k, i) for k, x in enumerate(groups) for i in range(len(x))}
  # Attention is restricted unless every row is one whole example.
  whole = all(len(s) == 1 for s in plan.sets) and plan.padding == 0
  assert (packing.segments(plan, shards) is None) == whole


def _numpy_segment_attention(q, k, v, ids):
  """Each segment of each row attended on its own, float64; zero on padding."""
  q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
  out = np.zeros_like(q)
  for b in range(q.shape[0]):
    for s in set(ids[b].tolist()) - {-1}:
      idx = np.flatnonzero(ids[b] == s)
      qs, ks, vs = q[b][:, idx], k[b][:, idx], v[b][:, idx]
      logits = qs @ np.swapaxes(ks, -1, -2) / np.sqrt(q.shape[-1])
      p = np.exp(logits - logits.max(-1, keepdims=True))
      out[b][:, idx] = (p / p.sum(-1, keepdims=True)) @ vs
  return out


@pytest.mark.parametrize("impl", ["dense", "chunked"])
def test_attention_stays_inside_segments(impl, monkeypatch):
  plan = packing.make_plan((25, 10, 4), per_group=3)  # rows 25+4 and 10+10, padding
  monkeypatch.setattr(layers, "CHUNK_SCORES", 2 * 25 * 25)  # loops over the longest segment
  segs = packing.segments(plan, shards=2)
  b, l = 2 * plan.rows_per_shard, plan.length
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=(b, 3, l, 8)) * 2, jnp.float32) for _ in range(3))
  fn = lambda q, k, v: layers.segmented_attention(layers.ATTENTION[impl], q, k, v, segs)
  y = np.asarray(jax.jit(fn)(q, k, v))
  ids = _ids(segs, plan, 2)
  ref = _numpy_segment_attention(q, k, v, ids)
  if impl == "dense":  # a masked row: padding attends among itself, its outputs never used
    y = np.where(ids[:, None, :, None] == -1, 0, y)
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
