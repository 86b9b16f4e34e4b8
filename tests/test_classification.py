import math
import statistics
import warnings

import jax.numpy as jnp
import numpy as np
import pytest
from sklearn import metrics

from avsiam_jax.evaluators import classification as cls


def _data(seed, n=60, c=12, levels=None):
  rng = np.random.default_rng(seed)
  scores = rng.random((n, c))
  if levels:  # few distinct values: many ties
    scores = np.round(scores * levels) / levels
  targets = (rng.random((n, c)) < 0.3).astype(np.int64)
  targets[:, 0] = 0            # no positive
  targets[:, 1] = 1            # no negative
  targets[:3, 2] = 0
  targets[3:, 2] = 0           # no positive either
  targets[0, 3], targets[1:, 3] = 1, 0  # one positive
  return scores, targets


def _sk(fn, s, y):
  out = np.full(y.shape[1], np.nan)
  for c in range(y.shape[1]):
    if 0 < y[:, c].sum() < len(y) or (fn is metrics.average_precision_score and y[:, c].any()):
      out[c] = fn(y[:, c], s[:, c])
  return out


@pytest.mark.parametrize("levels", [None, 4, 1])
@pytest.mark.parametrize("seed", [0, 1])
def test_ap_and_auc_match_sklearn(seed, levels):
  s, y = _data(seed, levels=levels)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    ap_ref = _sk(metrics.average_precision_score, s, y)
    auc_ref = _sk(metrics.roc_auc_score, s, y)
  ap = cls.average_precision_per_class(s, y)
  auc = cls.auc_per_class(s, y)
  np.testing.assert_array_equal(np.isnan(ap), np.isnan(ap_ref))
  np.testing.assert_array_equal(np.isnan(auc), np.isnan(auc_ref))
  np.testing.assert_allclose(ap, ap_ref, atol=1e-6, equal_nan=True)
  np.testing.assert_allclose(auc, auc_ref, atol=1e-6, equal_nan=True)
  assert math.isclose(cls.mean_average_precision(s, y), np.nanmean(ap_ref), abs_tol=1e-6)
  assert math.isclose(cls.mean_auc(s, y), np.nanmean(auc_ref), abs_tol=1e-6)


def test_float32_ties_and_single_column():
  s, y = _data(3, levels=8)
  s32 = s.astype(np.float32)
  ref = metrics.average_precision_score(y[:, 5], s32[:, 5])
  assert math.isclose(cls.average_precision_per_class(s32[:, 5], y[:, 5])[0], ref, abs_tol=1e-6)
  ref = metrics.roc_auc_score(y[:, 5], s32[:, 5])
  assert math.isclose(cls.auc_per_class(s32[:, 5], y[:, 5])[0], ref, abs_tol=1e-6)


def test_d_prime():
  # Independent reference: the standard library's float64 normal quantile.
  aucs = (1e-6, 0.01, 0.02425, 0.3, 0.5, 0.6, 0.75, 0.9, 0.97, 0.99, 1 - 1e-6)
  for auc in aucs:
    ref = math.sqrt(2) * statistics.NormalDist().inv_cdf(auc)
    assert math.isclose(cls.d_prime(auc), ref, rel_tol=1e-9, abs_tol=1e-12), auc
    assert isinstance(cls.d_prime(auc), float)
  out = cls.d_prime(np.array(aucs))
  assert out.shape == (len(aucs),)
  np.testing.assert_allclose(
      out, [math.sqrt(2) * statistics.NormalDist().inv_cdf(a) for a in aucs], rtol=1e-9)
  assert cls.d_prime(0.5) == 0.0
  assert cls.d_prime(1.0) == math.inf and cls.d_prime(0.0) == -math.inf
  assert math.isnan(cls.d_prime(1.5))
  # A value worked out by hand: sqrt(2) * 1.28155 for AUC 0.9.
  assert round(cls.d_prime(0.9), 3) == 1.812


def test_top1_and_metrics_dict():
  rng = np.random.default_rng(0)
  s = rng.random((50, 7))
  labels = rng.integers(0, 7, 50)
  onehot = np.eye(7)[labels]
  soft = onehot * 0.9 + 0.1 / 7
  acc = np.mean(s.argmax(1) == labels)
  assert cls.top1_accuracy(s, onehot) == acc == cls.top1_accuracy(s, soft)
  out = cls.classification_metrics(s, onehot)
  assert set(out) == {"mAP", "AUC", "d_prime", "top1", "num_clips", "num_classes_scored"}
  assert out["num_clips"] == 50 and out["num_classes_scored"] == 7
  assert math.isclose(out["mAP"], metrics.average_precision_score(onehot, s), abs_tol=1e-6)
  assert math.isclose(out["AUC"], metrics.roc_auc_score(onehot, s), abs_tol=1e-6)
  assert math.isclose(out["d_prime"], cls.d_prime(out["AUC"]))
  assert out["top1"] == acc
  # Soft targets threshold at 0.5 for AP/AUC, so smoothing leaves the scores unchanged.
  assert cls.classification_metrics(s, soft) == out


def test_metrics_skip_classes_without_positives():
  s, y = _data(0)
  out = cls.classification_metrics(s, y)
  assert out["num_classes_scored"] == y.shape[1] - 2
  with pytest.raises(ValueError):
    cls.classification_metrics(s, y[:, :3].T)


def test_aggregate_frames():
  rng = np.random.default_rng(0)
  p = rng.random((4, 10, 6)).astype(np.float32)
  agg = cls.aggregate_frames(p)
  np.testing.assert_allclose(agg, p.mean(axis=1), rtol=1e-6)
  np.testing.assert_allclose(cls.aggregate_frames(p[:, rng.permutation(10)]), agg, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(cls.aggregate_frames(jnp.asarray(p))), agg, rtol=1e-6)
  mask = np.ones((4, 10), bool)
  mask[1, 7:] = False
  mask[2] = False
  masked = cls.aggregate_frames(p, mask)
  np.testing.assert_allclose(masked[[0, 3]], agg[[0, 3]], rtol=1e-6)
  np.testing.assert_allclose(masked[1], p[1, :7].mean(0), rtol=1e-6)
  np.testing.assert_array_equal(masked[2], 0)
  perm = rng.permutation(10)
  np.testing.assert_allclose(cls.aggregate_frames(p[:, perm], mask[:, perm]), masked, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(cls.aggregate_frames(jnp.asarray(p), jnp.asarray(mask))),
                             masked, rtol=1e-6)
