"""t-SNE of audio and visual embeddings, drawn per class into a PNG (cf. the paper's Figure 4).

The t-SNE is scikit-learn's (Barnes-Hut, O(N log N) per step), started from the top principal
components with a fixed random_state, so a seed always gives the same map. It runs on one thread:
its steps are short, and on a busy or many-core machine thread handoffs cost more than they save
(200 points: under a second on one thread, several times that on two threads of a loaded
two-core machine).
"""
from __future__ import annotations

import colorsys
from collections import Counter

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from sklearn.manifold import TSNE
from threadpoolctl import threadpool_limits

from avsiam_jax import paths

_MIN_ITERATIONS = 250  # scikit-learn's lower bound on max_iter


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
  # A point has n - 1 neighbours; a perplexity near that leaves nothing to choose between
  # (scikit-learn also needs it below n).
  return float(min(perplexity, max(1.0, (n - 1) / 3.0)))


def tsne(x_NxD, *, perplexity=30.0, iterations=1000, seed=0, return_kl=False):
  """t-SNE to 2-D. Returns y (N, 2), or (y, final KL divergence) with return_kl.

  scikit-learn's TSNE with the perplexity clamped to (N - 1) / 3 for small N, started from the
  top two principal components (random_state=seed), so a seed gives the same map every run.
  iterations is scikit-learn's max_iter: at least 250.
  """
  x = _check_matrix(x_NxD, "x")
  n = len(x)
  if n < 2:
    raise ValueError(f"t-SNE needs at least 2 points, got {n}")
  if iterations < _MIN_ITERATIONS:
    raise ValueError(f"iterations must be >= {_MIN_ITERATIONS}, got {iterations}")
  # The PCA start needs two components, and divides by the spread: identical points would give
  # NaN, which crashes the Barnes-Hut step. Those cases start from a seeded random layout.
  pca = min(x.shape) >= 2 and np.ptp(x, axis=0).max() > 0
  model = TSNE(n_components=2, perplexity=_effective_perplexity(perplexity, n),
               init="pca" if pca else "random", max_iter=iterations, random_state=seed)
  with threadpool_limits(limits=1):
    y = model.fit_transform(x).astype(np.float64)
  if return_kl:
    return y, float(model.kl_divergence_)
  return y


# Ten well-separated colours; further classes get evenly spread hues.
_PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
            (140, 86, 75), (227, 119, 194), (25, 25, 112), (188, 189, 34), (23, 190, 207))
_UNLABELLED = (120, 120, 120)  # no grey in the palette, so it can't be mistaken for a class
# A dataset without classes (MSR-VTT): the two modalities in two colours outside the palette.
_AUDIO_COLOUR, _VIDEO_COLOUR = (0, 90, 200), (230, 80, 0)
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
  (ties to the lower id); with no labelled clip at all (an unlabeled dataset), every clip, and
  the colours tell audio from video instead of classes. At most max_clips of those (a seeded
  random subset) go into one t-SNE over their audio and video rows, so both modalities share
  one map (the default cap: about 20 s). Audio: filled circles; video: outlined triangles; one
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
    if classes:
      colour = colour_of.get(int(point_labels[k]), _UNLABELLED)
    else:
      colour = _AUDIO_COLOUR if k < m else _VIDEO_COLOUR
    (_circle if k < m else _triangle)(draw, px[k], py[k], marker if k >= m else 3, colour)

  lx, ly = width - _LEGEND_WIDTH + 4, box[1]
  text_w = _LEGEND_WIDTH - 36
  black = (0, 0, 0)
  _circle(draw, lx + 8, ly + 8, 4, black if classes else _AUDIO_COLOUR)
  draw.text((lx + 22, ly), "audio (filled circle)", fill=black, font=font)
  _triangle(draw, lx + 8, ly + 28, 6, black if classes else _VIDEO_COLOUR)
  draw.text((lx + 22, ly + 20), "video (outlined triangle)", fill=black, font=font)
  ly += 50
  if not classes:
    draw.text((lx + 22, ly), "no class labels", fill=(110, 110, 110), font=font)
  entries = [(colour_of[c], _class_name(label_names, c)) for c in classes]
  for colour, name in entries:
    if ly > height - 40:
      draw.text((lx + 22, ly), "...", fill=black, font=font)
      break
    draw.rectangle((lx + 3, ly + 3, lx + 13, ly + 13), fill=colour)
    draw.text((lx + 22, ly), _fit(draw, name, font, text_w), fill=black, font=font)
    ly += 20
  with paths.path(path).open("wb") as f:  # a local file or a gs:// object
    image.save(f, format="PNG")
  return path
