"""Per-clip preprocessing and augmentation in numpy (runs inside the Grain pipeline).

Every random function takes an explicit `np.random.Generator`, so a clip's
augmentation depends only on the generator the pipeline derives for it.

Order of the audio path, as in the released AVSiam/CAV-MAE loaders:
  raw fbank -> pad/cut to `frames` -> [mixup] -> [SpecAugment] -> normalize
  -> [random time shift: uniform noise, then circular roll].
The released loaders add the noise after normalization (so its scale is in
normalized units); we keep that order.
"""
from __future__ import annotations

import io
from typing import Sequence

import numpy as np
from PIL import Image

from avsiam_jax.data import fbank as fbank_lib

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
# uint8 pixel -> normalized value in one multiply-add: (p/255 - mean)/std.
_PIX_SCALE = (1.0 / (255.0 * IMAGENET_STD)).astype(np.float32)
_PIX_OFFSET = (-IMAGENET_MEAN / IMAGENET_STD).astype(np.float32)


# ---------------------------------------------------------------- video ----

def decode_frame(jpeg: bytes, image_size: int = 224) -> np.ndarray:
  """JPEG bytes -> uint8 (S, S, 3); bilinear resize only if the size differs."""
  with Image.open(io.BytesIO(jpeg)) as img:
    if img.mode != "RGB":
      img = img.convert("RGB")
    if img.size != (image_size, image_size):
      img = img.resize((image_size, image_size), Image.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


def normalize_image(pixels: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
  """uint8 or [0,255] float pixels (..., 3) -> ImageNet-normalized float32 (into `out`)."""
  out = np.multiply(pixels, _PIX_SCALE, out=out, dtype=np.float32)
  out += _PIX_OFFSET
  return out


# ---------------------------------------------------------------- audio ----

def pad_or_cut(fbank: np.ndarray, frames: int) -> np.ndarray:
  """float16/32 (T, 128) -> a writable float32 copy (frames, 128), padded or cut at the end."""
  return fbank_lib.pad_or_cut(fbank, frames).astype(np.float32)


def time_shift(fbank: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Released augmentation: x + U(0,1)[T,F] * U(0,1) / 10, then roll by randint(-T, T)."""
  t, f = fbank.shape
  noise = rng.random((t, f), dtype=np.float32)
  noise *= np.float32(rng.random() / 10)
  fbank = fbank + noise
  return np.roll(fbank, int(rng.integers(-t, t)), axis=0)


def _mask_span(rng: np.random.Generator, max_width: int, size: int) -> tuple[int, int]:
  # torchaudio mask_along_axis: value = U*max; start = int(U*(size - value)); end = start + int(value).
  value = rng.random() * max_width
  start = int(rng.random() * (size - value))
  return start, start + int(value)


def spec_augment(fbank: np.ndarray, rng: np.random.Generator, freqm: int, timem: int
                 ) -> np.ndarray:
  """One frequency mask (< freqm bins) and one time mask (< timem frames), set to 0, in place.

  0 disables a mask. Applied to the raw (unnormalized) fbank, like the released code.
  """
  t, f = fbank.shape
  if freqm > 0:
    lo, hi = _mask_span(rng, min(freqm, f), f)
    fbank[:, lo:hi] = 0.0
  if timem > 0:
    lo, hi = _mask_span(rng, min(timem, t), t)
    fbank[lo:hi, :] = 0.0
  return fbank


# --------------------------------------------------------------- labels ----

def multi_hot(labels: Sequence[int], num_classes: int) -> np.ndarray:
  y = np.zeros((num_classes,), np.float32)
  y[np.asarray(labels, np.int64)] = 1.0
  return y


def smooth_labels(y: np.ndarray, eps: float) -> np.ndarray:
  """Standard label smoothing y*(1-eps) + eps/C.

  (The released loaders set positives to 1-eps without the +eps/C; the
  difference is eps/C, 0.0002 for AudioSet.) Linear, so applying it after mixup
  equals mixing smoothed targets.
  """
  c = y.shape[-1]
  return (y * np.float32(1.0 - eps) + np.float32(eps / c)).astype(np.float32)


def class_balanced_weights(example_labels: Sequence[Sequence[int]], num_classes: int
                           ) -> np.ndarray:
  """Sample weights of the released class-balanced sampler.

  Class weight 1000/(count+0.01) over the split; a clip's weight is the sum over
  its labels (a clip without labels gets 0 and is never drawn).
  """
  counts = np.zeros((num_classes,), np.float64)
  for labels in example_labels:
    np.add.at(counts, np.asarray(labels, np.int64), 1.0)
  class_w = 1000.0 / (counts + 0.01)
  return np.array([class_w[np.asarray(l, np.int64)].sum() for l in example_labels],
                  np.float64)
