"""Retrieval recall and median rank against a brute-force loop."""
import numpy as np
import pytest

from avsiam_jax.evaluators import retrieval


def brute_force(q, g, k):
  hits, ranks = 0, []
  for i in range(len(q)):
    sims = [np.dot(q[i], g[j]) / np.linalg.norm(q[i]) / np.linalg.norm(g[j]) for j in range(len(g))]
    order = sorted(range(len(g)), key=lambda j: (-sims[j], j == i))  # ties rank the match last
    rank = order.index(i) + 1
    ranks.append(rank)
    hits += rank <= k
  return 100 * hits / len(q), float(np.median(ranks))


@pytest.mark.parametrize("seed", [0, 1])
def test_recall_matches_brute_force(seed):
  rng = np.random.default_rng(seed)
  a = rng.normal(size=(40, 8))
  v = a + rng.normal(scale=1.5, size=(40, 8))
  m = retrieval.retrieval_metrics(a, v)
  for k in (1, 5, 10):
    assert m[f"v2a_r{k}"] == pytest.approx(brute_force(v, a, k)[0])
    assert m[f"a2v_r{k}"] == pytest.approx(brute_force(a, v, k)[0])
  assert m["v2a_median_rank"] == brute_force(v, a, 1)[1]
  assert m["num_clips"] == 40


def test_perfect_and_tied_features():
  a = np.eye(5)
  assert retrieval.retrieval_metrics(a, 3 * a)["a2v_r1"] == 100
  # All-equal features: every match ties with every other item and ranks last.
  m = retrieval.retrieval_metrics(np.ones((5, 3)), np.ones((5, 3)))
  assert m["v2a_r1"] == 0 and m["v2a_median_rank"] == 5


def test_mismatched_sets_are_an_error():
  with pytest.raises(ValueError, match="matching"):
    retrieval.retrieval_metrics(np.ones((3, 2)), np.ones((4, 2)))


def test_query_blocks_give_the_same_ranks():
  rng = np.random.default_rng(2)
  a = rng.integers(1, 3, size=(37, 3)).astype(float)  # 8 distinct rows: ties
  v = a + rng.normal(scale=0.5, size=(37, 3))
  whole = retrieval.ranks(v, a, block=len(v))
  assert not np.array_equal(whole, np.arange(1, 38))
  for block in (1, 5, 36):
    np.testing.assert_array_equal(retrieval.ranks(v, a, block=block), whole)
  hits = [100.0 * np.mean(whole <= k) for k in (1, 5, 10)]
  assert hits == [pytest.approx(brute_force(v, a, k)[0]) for k in (1, 5, 10)]
