"""Zero-shot audio<->video retrieval from pooled features."""
from __future__ import annotations

import numpy as np


def _normalize(x):
  x = np.asarray(x, np.float64)
  return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def ranks(query_NxD, gallery_NxD) -> np.ndarray:
  """1-based rank of item i's true match (gallery i) among all gallery items, by cosine.

  Ties count against the query (a tie with a wrong item ranks the true match lower).
  """
  sim = _normalize(query_NxD) @ _normalize(gallery_NxD).T
  true = np.diagonal(sim)[:, None]
  return 1 + np.sum(sim > true, axis=1) + np.sum((sim == true) & ~np.eye(len(sim), dtype=bool),
                                                 axis=1)


def retrieval_metrics(audio_NxD, video_NxD) -> dict[str, float]:
  """R@1/5/10 (percent) and median rank for video->audio and audio->video."""
  if len(audio_NxD) != len(video_NxD) or len(audio_NxD) == 0:
    raise ValueError(f"need matching non-empty feature sets, got {len(audio_NxD)} audio and "
                     f"{len(video_NxD)} video")
  out = {}
  for name, q, g in (("v2a", video_NxD, audio_NxD), ("a2v", audio_NxD, video_NxD)):
    r = ranks(q, g)
    for k in (1, 5, 10):
      out[f"{name}_r{k}"] = float(np.mean(r <= k) * 100)
    out[f"{name}_median_rank"] = float(np.median(r))
  out["num_clips"] = len(audio_NxD)
  return out
