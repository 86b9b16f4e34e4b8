"""Clip-level classification metrics: mAP, ROC AUC, d-prime, top-1; frame aggregation.

AP and AUC follow sklearn's definitions (tied scores form one threshold) but are computed here
in numpy, all classes at once; d-prime uses scipy's normal quantile.
"""
from __future__ import annotations

import math

import numpy as np
from scipy.stats import norm


def _as_2d(scores_NxC, targets_NxC):
  s = np.asarray(scores_NxC)
  if not np.issubdtype(s.dtype, np.floating):
    s = s.astype(np.float64)
  y = np.asarray(targets_NxC, np.float64)
  if s.ndim == 1:
    s, y = s[:, None], y[:, None]
  if s.shape != y.shape or s.ndim != 2:
    raise ValueError(f"scores {s.shape} and targets {y.shape} must both be (N, C)")
  if len(s) == 0:
    raise ValueError("no clips to score")
  return s, y


def _ranked(scores_NxC, targets_NxC):
  """Per class, clips sorted by descending score, with each clip's tie-group bounds.

  Returns (y, start, end): sorted binary targets and, for each sorted position, the first and
  last position of the group of clips sharing its score.
  """
  s, y = _as_2d(scores_NxC, targets_NxC)
  order = np.argsort(-s, axis=0, kind="stable")
  s = np.take_along_axis(s, order, axis=0)
  y = np.take_along_axis(y, order, axis=0) > 0.5
  n = len(s)
  pos = np.broadcast_to(np.arange(n)[:, None], s.shape)
  new = np.ones(s.shape, bool)
  new[1:] = s[1:] != s[:-1]
  last = np.ones(s.shape, bool)
  last[:-1] = new[1:]
  start = np.maximum.accumulate(np.where(new, pos, 0), axis=0)
  end = np.minimum.accumulate(np.where(last, pos, n)[::-1], axis=0)[::-1]
  return y, start, end


def average_precision_per_class(scores_NxC, targets_NxC) -> np.ndarray:
  """(C,) sklearn average precision; NaN for classes without a positive clip.

  AP = sum over thresholds of (recall gain) * precision; a positive's recall gain is taken at
  the precision of its whole tie group, which is sklearn's step-wise sum.
  """
  y, _, end = _ranked(scores_NxC, targets_NxC)
  tps = np.cumsum(y, axis=0)
  precision = tps / (np.arange(1, len(y) + 1)[:, None])
  prec_at_end = np.take_along_axis(precision, end, axis=0)
  npos = y.sum(axis=0)
  with np.errstate(invalid="ignore", divide="ignore"):
    ap = (y * prec_at_end).sum(axis=0) / npos
  # sklearn returns 0 (with a warning) for these; skipping them keeps mAP meaningful.
  return np.where(npos > 0, ap, np.nan)


def auc_per_class(scores_NxC, targets_NxC) -> np.ndarray:
  """(C,) ROC AUC (Mann-Whitney: ties count one half); NaN where a class lacks either label."""
  y, start, end = _ranked(scores_NxC, targets_NxC)
  neg = ~y
  fps = np.cumsum(neg, axis=0)
  nneg = fps[-1]
  # Negatives scored strictly above, and at or above, each clip's score.
  above = np.take_along_axis(fps, start, axis=0) - np.take_along_axis(neg, start, axis=0)
  at_or_above = np.take_along_axis(fps, end, axis=0)
  wins = nneg - 0.5 * (above + at_or_above)
  npos = y.sum(axis=0)
  with np.errstate(invalid="ignore", divide="ignore"):
    auc = (y * wins).sum(axis=0) / (npos * nneg)
  return np.where((npos > 0) & (nneg > 0), auc, np.nan)


def mean_average_precision(scores_NxC, targets_NxC) -> float:
  """Mean AP over classes that have a positive clip (NaN if none has)."""
  ap = average_precision_per_class(scores_NxC, targets_NxC)
  return float(np.nanmean(ap)) if np.isfinite(ap).any() else math.nan


def mean_auc(scores_NxC, targets_NxC) -> float:
  auc = auc_per_class(scores_NxC, targets_NxC)
  return float(np.nanmean(auc)) if np.isfinite(auc).any() else math.nan


def d_prime(auc):
  """sqrt(2) * Phi^-1(AUC): the separation of two unit normals that yields this AUC."""
  out = math.sqrt(2.0) * np.asarray(norm.ppf(auc), np.float64)
  return float(out) if out.ndim == 0 else out


def top1_accuracy(scores_NxC, targets_NxC) -> float:
  """Fraction of clips whose top score is the target's top class (one-hot or soft targets)."""
  s, y = _as_2d(scores_NxC, targets_NxC)
  return float(np.mean(s.argmax(axis=1) == y.argmax(axis=1)))


def classification_metrics(scores_NxC, targets_NxC) -> dict[str, float]:
  """mAP, mean AUC, d-prime of the mean AUC (as AST/CAV-MAE report it), top-1, all fractions.

  `targets` may be soft (label smoothing, mixup): a class counts as positive above 0.5.
  """
  s, y = _as_2d(scores_NxC, targets_NxC)
  ap = average_precision_per_class(s, y)
  auc = mean_auc(s, y)
  return {
      "mAP": float(np.nanmean(ap)) if np.isfinite(ap).any() else math.nan,
      "AUC": auc,
      "d_prime": d_prime(auc) if math.isfinite(auc) else math.nan,
      "top1": top1_accuracy(s, y),
      "num_clips": len(s),
      "num_classes_scored": int(np.isfinite(ap).sum()),
  }


def aggregate_frames(probs_BxFxC, mask_BxF=None):
  """Clip probabilities as the mean of per-frame probabilities over the valid frames.

  Works on numpy and jax arrays alike (array methods only), so it can run inside a jitted step.
  A clip with no valid frame gets zeros.
  """
  if not hasattr(probs_BxFxC, "ndim"):
    probs_BxFxC = np.asarray(probs_BxFxC)
  if probs_BxFxC.ndim != 3:
    raise ValueError(f"expected (B, F, C) probabilities, got shape {probs_BxFxC.shape}")
  if mask_BxF is None:
    return probs_BxFxC.mean(axis=1)
  if not hasattr(mask_BxF, "ndim"):
    mask_BxF = np.asarray(mask_BxF)
  m = mask_BxF.astype(probs_BxFxC.dtype)[..., None]
  return (probs_BxFxC * m).sum(axis=1) / m.sum(axis=1).clip(1)
