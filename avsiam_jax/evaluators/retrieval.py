"""Zero-shot audio<->video retrieval from pooled features."""
from __future__ import annotations

import numpy as np

# Queries scored at once: the similarity rows of a block stay small (1024 x 20,000 float64 is
# 160 MB) whatever the set's size, so a whole AudioSet eval split can be scored.
QUERY_BLOCK = 1024


def _normalize(x):
  x = np.asarray(x, np.float64)
  return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def ranks(query_NxD, gallery_NxD, block: int = QUERY_BLOCK) -> np.ndarray:
  """1-based rank of item i's true match (gallery i) among all gallery items, by cosine.

  Ties count against the query (a tie with a wrong item ranks the true match lower).
  """
  q, g = _normalize(query_NxD), _normalize(gallery_NxD)
  out = np.empty(len(q), np.int64)
  for start in range(0, len(q), block):
    rows = np.arange(start, min(start + block, len(q)))
    sim = q[rows] @ g.T
    true = sim[np.arange(len(rows)), rows][:, None]
    # Items scored at or above the match, the match included: its rank, ties against it.
    out[rows] = np.sum(sim >= true, axis=1)
  return out


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
