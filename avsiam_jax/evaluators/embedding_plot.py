"""t-SNE of audio and visual embeddings, drawn per class into a PNG (cf. the paper's Figure 4).

The t-SNE is exact (every pair contributes to every gradient), in numpy and float64. The O(N^2)
work per step runs over blocks of pairs small enough to stay in cache and avoids threaded BLAS
(matrix products with 3 columns): on a busy or many-core machine thread handoffs cost more than
the arithmetic.
"""
from __future__ import annotations

import colorsys
import math
from collections import Counter

import numpy as np
from PIL import Image, ImageDraw, ImageFont

_EXAGGERATION = 12.0
_BLOCK_BYTES = 1 << 20  # one block of float64 pair values; small enough to stay in cache


def _block_rows(n):
  return max(8, _BLOCK_BYTES // (8 * max(n, 1)))


def _check_matrix(x, name):
  x = np.asarray(x)
  if x.ndim != 2:
    raise ValueError(f"{name} must be 2-D (N, D), got shape {x.shape}")
  if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
    raise ValueError(f"{name} must be numeric, got dtype {x.dtype}")
  x = x.astype(np.float64)
  if not np.all(np.isfinite(x)):
    raise ValueError(f"{name} has non-finite values (NaN or inf)")
  return x


def _effective_perplexity(perplexity, n):
  # A point has n - 1 neighbours; a perplexity near that leaves nothing to choose between.
  return float(min(perplexity, max(1.0, (n - 1) / 3.0)))


def _conditional_rows(d2, target_h, tol=1e-5, max_steps=100):
  """p(j|i) for a block of rows of squared distances (self already set to +inf).

  Safeguarded Newton on log(beta) per row: dH/dlog(beta) = -beta^2 Var_p(d), bracketed so
  that a bad step falls back to bisection.
  """
  d = d2 - np.min(d2, axis=1, keepdims=True)  # shift per row: p is unchanged, exp won't underflow
  self_mask = ~np.isfinite(d)
  d[self_mask] = 0.0
  rows = len(d)
  # First guess: beta = 1 / (shifted distance to about the perplexity-th neighbour).
  k = min(max(int(round(math.exp(target_h))), 1), d.shape[1] - 1)
  t = -np.log(np.maximum(np.partition(d, k, axis=1)[:, k], 1e-300))  # t = log(beta)
  lo = np.full(rows, -np.inf)
  hi = np.full(rows, np.inf)
  active = np.arange(rows)
  p = np.empty_like(d)
  for _ in range(max_steps):
    da = d[active]
    beta = np.exp(t[active])
    e = np.exp(-da * beta[:, None])
    e[self_mask[active]] = 0.0
    s = e.sum(1)
    e /= s[:, None]
    mean = np.einsum("ij,ij->i", e, da)
    var = np.maximum(np.einsum("ij,ij->i", e, da * da) - mean * mean, 0.0)
    h = np.log(s) + beta * mean
    p[active] = e
    err = h - target_h
    done = np.abs(err) < tol
    # Entropy falls as beta grows: too high -> beta is a lower bound, and vice versa.
    ta = t[active]
    lo[active] = np.where(err > 0, ta, lo[active])
    hi[active] = np.where(err <= 0, ta, hi[active])
    slope = beta * beta * var
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
      step = ta + np.clip(err / slope, -2.0, 2.0)  # far from the root H is nearly flat
    la, ha = lo[active], hi[active]
    inside = np.isfinite(step) & (step > la) & (step < ha)
    bisect = np.where(np.isfinite(la) & np.isfinite(ha), 0.5 * (la + ha),
                      np.where(np.isfinite(la), la + 1.0, ha - 1.0))
    t[active] = np.where(inside, step, bisect)
    active = active[~done]
    if len(active) == 0:
      break
  return p


def joint_probabilities(x_NxD, perplexity=30.0):
  """Symmetric t-SNE input affinities P (N, N), summing to 1, zero diagonal."""
  x = _check_matrix(x_NxD, "x")
  n = len(x)
  if n < 2:
    raise ValueError(f"t-SNE needs at least 2 points, got {n}")
  target_h = math.log(_effective_perplexity(perplexity, n))
  sq = np.einsum("ij,ij->i", x, x)
  cond = np.empty((n, n))
  rows = 256  # distance blocks big enough for an efficient matrix product
  for s in range(0, n, rows):
    e = min(n, s + rows)
    d2 = sq[s:e, None] + sq[None, :] - 2.0 * (x[s:e] @ x.T)
    np.maximum(d2, 0.0, out=d2)
    d2[np.arange(e - s), np.arange(s, e)] = np.inf
    cond[s:e] = _conditional_rows(d2, target_h)
  p = cond + cond.T
  p /= p.sum()
  return p


def _pca_init(x, seed):
  xc = x - x.mean(0)
  # Eigenvectors of the smaller Gram/covariance matrix give the top two directions.
  if xc.shape[1] <= xc.shape[0]:
    w, v = np.linalg.eigh(xc.T @ xc)
    y = xc @ v[:, ::-1][:, :2]
  else:
    w, v = np.linalg.eigh(xc @ xc.T)
    y = v[:, ::-1][:, :2] * np.sqrt(np.maximum(w[::-1][:2], 0.0))
  if y.shape[1] < 2:
    y = np.pad(y, ((0, 0), (0, 2 - y.shape[1])))
  # Eigenvector signs are arbitrary: fix them so the layout doesn't flip between machines.
  flip = np.sign(y[np.argmax(np.abs(y), axis=0), [0, 1]])
  y = y * np.where(flip == 0, 1.0, flip)
  scale = np.std(y[:, 0])
  y = y / scale * 1e-4 if scale > 1e-12 else np.zeros_like(y)
  # Tiny seeded jitter: separates points PCA puts on a line or on top of each other.
  y += np.random.default_rng(seed).normal(scale=1e-6, size=y.shape)
  return y


def _gradient(p, y, exaggeration):
  """KL gradient for layout y (N, 2).

  grad_i = 4 sum_j (a p_ij - w_ij / Z) w_ij (y_i - y_j),  w_ij = 1 / (1 + |y_i - y_j|^2),
  a = exaggeration, Z = sum over pairs of w. Each pair is computed once (blocks of rows,
  columns from the block's first row on) and feeds both of its points through row and column
  sums. Z is only known at the end, so the attractive (p w) and repulsive (w^2) sums are kept
  apart.
  """
  n = len(y)
  y0, y1 = np.ascontiguousarray(y[:, 0]), np.ascontiguousarray(y[:, 1])
  basis = np.stack([np.ones(n), y0, y1])  # (3, N)
  # [rep, attr] x [sum_j m_ij, sum_j m_ij y_j0, sum_j m_ij y_j1], m = w^2 and p w.
  acc = np.zeros((2, 3, n))
  z = 0.0
  block = _BLOCK_BYTES // 8
  buf = np.empty(2 * max(block, n))
  s = 0
  while s < n:
    m = n - s
    e = s + max(1, min(m, block // m))  # rows shrink with width, so blocks keep their size
    c = e - s
    pair = buf[:2 * c * m].reshape(2, c, m)
    w, t = pair[0], pair[1]
    np.subtract(y0[s:e, None], y0[None, s:], out=w)
    np.multiply(w, w, out=w)
    np.subtract(y1[s:e, None], y1[None, s:], out=t)
    np.multiply(t, t, out=t)
    w += t
    w += 1.0
    np.divide(1.0, w, out=w)
    w[:, :c] = np.triu(w[:, :c], 1)  # pairs below the diagonal (and self) come elsewhere
    z += w.sum()
    np.multiply(p[s:e, s:], w, out=t)
    np.multiply(w, w, out=w)
    # Row sums: one dot product per contiguous row (short BLAS dots, not split over threads).
    acc[:, :, s:e] += np.vecdot(pair[:, None], basis[None, :, None, s:])
    # Column sums accumulate row by row.
    acc[:, 0, s:] += pair.sum(1)
    acc[:, 1, s:] += np.einsum("xij,i->xj", pair, y0[s:e])
    acc[:, 2, s:] += np.einsum("xij,i->xj", pair, y1[s:e])
    s = e
  z = max(2.0 * z, 1e-300)
  attr, rep = acc[1].T, acc[0].T
  g = exaggeration * (attr[:, :1] * y - attr[:, 1:]) - (rep[:, :1] * y - rep[:, 1:]) / z
  return 4.0 * g


def kl_divergence(p_NxN, y_Nx2):
  """KL(P || Q) of a layout, with Q the normalized Student-t kernel over its pairs."""
  p = np.asarray(p_NxN, np.float64)
  y = np.asarray(y_Nx2, np.float64)
  n = len(y)
  if y.shape != (n, 2) or p.shape != (n, n):
    raise ValueError(f"need P (N, N) and a layout (N, 2), got {p.shape} and {y.shape}")
  y0, y1 = y[:, 0], y[:, 1]
  z = 0.0
  cross = 0.0  # sum p_ij log(1 + d_ij^2) = -sum p_ij log w_ij
  rows = _block_rows(n)
  for s in range(0, n, rows):
    e = min(n, s + rows)
    d2 = (y0[s:e, None] - y0[None, :]) ** 2 + (y1[s:e, None] - y1[None, :]) ** 2
    w = 1.0 / (1.0 + d2)
    w[np.arange(e - s), np.arange(s, e)] = 0.0
    z += w.sum()
    cross += np.sum(p[s:e] * np.log1p(d2))
  pos = p[p > 0]
  return float(np.sum(pos * np.log(pos)) + cross + pos.sum() * math.log(z))


def tsne(x_NxD, *, perplexity=30.0, iterations=1000, seed=0, return_kl=False):
  """Exact t-SNE to 2-D. Returns y (N, 2), or (y, final KL divergence) with return_kl.

  Gaussian input affinities with each point's bandwidth found for the perplexity (clamped to
  (N - 1) / 3 for small N), Student-t output kernel, early exaggeration (x12) for the first
  min(250, iterations / 4) steps, then gradient descent with momentum and per-parameter gains.
  Starts from the top two principal components scaled to std 1e-4, so results are stable
  and depend on the seed only through a tiny jitter. iterations=0 returns that start.
  """
  x = _check_matrix(x_NxD, "x")
  n = len(x)
  if n < 2:
    raise ValueError(f"t-SNE needs at least 2 points, got {n}")
  if iterations < 0:
    raise ValueError(f"iterations must be >= 0, got {iterations}")
  p = joint_probabilities(x, perplexity)
  y = _pca_init(x, seed)
  lr = max(n / _EXAGGERATION / 4.0, 50.0)
  early = min(250, iterations // 4)
  update = np.zeros_like(y)
  gains = np.ones_like(y)
  for it in range(iterations):
    exaggerated = it < early
    momentum = 0.5 if exaggerated else 0.8
    grad = _gradient(p, y, _EXAGGERATION if exaggerated else 1.0)
    # Per-coordinate gains grow while descent keeps its direction and shrink after an overshoot
    # (the gradient then points the way the last step went).
    same = np.sign(grad) == np.sign(update)
    gains = np.maximum(np.where(same, gains * 0.8, gains + 0.2), 0.01)
    update = momentum * update - lr * gains * grad
    y = y + update
    y -= y.mean(0)
  if return_kl:
    return y, kl_divergence(p, y)
  return y


# Ten well-separated colours; further classes get evenly spread hues.
_PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
            (140, 86, 75), (227, 119, 194), (25, 25, 112), (188, 189, 34), (23, 190, 207))
_UNLABELLED = (120, 120, 120)  # no grey in the palette, so it can't be mistaken for a class
_LEGEND_WIDTH = 220


def _colour(i):
  if i < len(_PALETTE):
    return _PALETTE[i]
  r, g, b = colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.75, 0.85)
  return int(r * 255), int(g * 255), int(b * 255)


def _font(size):
  try:
    return ImageFont.load_default(size=size)
  except TypeError:  # Pillow without sized default fonts
    return ImageFont.load_default()


def _fit(draw, text, font, width):
  """text, cut with '...' so it fits in width pixels."""
  if draw.textlength(text, font=font) <= width:
    return text
  while text and draw.textlength(text + "...", font=font) > width:
    text = text[:-1]
  return text.rstrip() + "..."


def _class_name(label_names, c):
  try:
    return str(label_names[c])
  except (IndexError, KeyError, TypeError):
    return f"class {c}"


def _l2_normalize(x):
  return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _plot_box(width, height):
  """(left, top, right, bottom) of the map; the legend sits to its right, text above and below."""
  pad = 16
  return pad, 44, width - _LEGEND_WIDTH - pad, height - pad - 14


def _circle(draw, cx, cy, r, colour):
  draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)


def _triangle(draw, cx, cy, r, colour):
  draw.polygon(((cx, cy - r), (cx - 0.87 * r, cy + 0.5 * r), (cx + 0.87 * r, cy + 0.5 * r)),
               outline=colour, width=1)


def plot_embeddings(audio_NxD, video_NxD, labels_N, label_names, path, *, max_classes=10,
                    title="", max_clips=1750, perplexity=30.0, seed=0, size=(900, 700)):
  """Joint t-SNE of L2-normalized audio and video embeddings, drawn by class to a PNG.

  Keeps the clips whose label (int class id, -1 = none) is among the max_classes most frequent
  (ties to the lower id); with no labelled clip at all, every clip is drawn in grey. At most
  max_clips of those (a seeded random subset) go into one t-SNE over their audio and video rows,
  so both modalities share one map; the t-SNE is exact, O(clips^2) in time and memory (the
  default cap: about 30 s and 100 MB for P). Audio: filled circles; video: outlined triangles; one
  colour per class. Returns path.
  """
  audio = _check_matrix(audio_NxD, "audio embeddings")
  video = _check_matrix(video_NxD, "video embeddings")
  if audio.shape != video.shape:
    raise ValueError(f"audio {audio.shape} and video {video.shape} embeddings differ in shape")
  n = len(audio)
  if n < 5:
    raise ValueError(f"need at least 5 clips to plot, got {n}")
  labels = np.asarray(labels_N)
  if labels.shape != (n,):
    raise ValueError(f"labels must have shape ({n},), got {labels.shape}")
  if not np.issubdtype(labels.dtype, np.integer):
    if not (np.issubdtype(labels.dtype, np.floating) and np.all(np.isfinite(labels))
            and np.all(labels == np.round(labels))):
      raise ValueError(f"labels must be integer class ids, got dtype {labels.dtype}")
  labels = labels.astype(np.int64)
  if max_classes < 1 or max_clips < 1:
    raise ValueError(f"max_classes ({max_classes}) and max_clips ({max_clips}) must be >= 1")
  if size[0] < _LEGEND_WIDTH + 200 or size[1] < 200:
    raise ValueError(f"image size {size} too small for map and legend")

  counts = Counter(int(c) for c in labels if c >= 0)
  classes = sorted(counts, key=lambda c: (-counts[c], c))[:max_classes]
  keep = np.isin(labels, classes) if classes else np.ones(n, bool)
  idx = np.flatnonzero(keep)
  if len(idx) > max_clips:
    idx = np.sort(np.random.default_rng(seed).choice(idx, max_clips, replace=False))
  m = len(idx)
  x = np.concatenate([_l2_normalize(audio[idx]), _l2_normalize(video[idx])])
  y = tsne(x, perplexity=perplexity, seed=seed)

  width, height = size
  image = Image.new("RGB", (width, height), (255, 255, 255))
  draw = ImageDraw.Draw(image)
  title_font, font, small = _font(18), _font(13), _font(11)
  box = _plot_box(width, height)
  pad = box[0]
  draw.rectangle(box, outline=(200, 200, 200))
  if title:
    draw.text((pad, 12), _fit(draw, title, title_font, width - 2 * pad), fill=(0, 0, 0),
              font=title_font)
  draw.text((pad, height - pad - 10),
            f"t-SNE, perplexity {_effective_perplexity(perplexity, 2 * m):g}, {m} clips",
            fill=(110, 110, 110), font=small)

  # One scale for both axes, so distances on the map are not stretched.
  marker = 4
  lo, hi = y.min(0), y.max(0)
  span = max(float(np.max(hi - lo)), 1e-12)
  inner_w, inner_h = box[2] - box[0] - 4 * marker, box[3] - box[1] - 4 * marker
  scale = min(inner_w, inner_h) / span
  centre = (lo + hi) / 2
  px = (box[0] + box[2]) / 2 + (y[:, 0] - centre[0]) * scale
  py = (box[1] + box[3]) / 2 - (y[:, 1] - centre[1]) * scale

  colour_of = {c: _colour(i) for i, c in enumerate(classes)}
  point_labels = np.concatenate([labels[idx], labels[idx]])
  # Random drawing order, so no class or modality is always the one on top.
  for k in np.random.default_rng(seed).permutation(2 * m):
    colour = colour_of.get(int(point_labels[k]), _UNLABELLED)
    (_circle if k < m else _triangle)(draw, px[k], py[k], marker if k >= m else 3, colour)

  lx, ly = width - _LEGEND_WIDTH + 4, box[1]
  text_w = _LEGEND_WIDTH - 36
  black = (0, 0, 0)
  _circle(draw, lx + 8, ly + 8, 4, black)
  draw.text((lx + 22, ly), "audio (filled circle)", fill=black, font=font)
  _triangle(draw, lx + 8, ly + 28, 6, black)
  draw.text((lx + 22, ly + 20), "video (outlined triangle)", fill=black, font=font)
  ly += 50
  entries = [(colour_of[c], _class_name(label_names, c)) for c in classes] or [
      (_UNLABELLED, "no labels")]
  for colour, name in entries:
    if ly > height - 40:
      draw.text((lx + 22, ly), "...", fill=black, font=font)
      break
    draw.rectangle((lx + 3, ly + 3, lx + 13, ly + 13), fill=colour)
    draw.text((lx + 22, ly), _fit(draw, name, font, text_w), fill=black, font=font)
    ly += 20
  image.save(path, format="PNG")
  return path
