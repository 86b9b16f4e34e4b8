"""Grain input pipelines: pretraining, finetuning and evaluation.

All three are Grain `MapDataset`s over integer positions, batched inside the
MapDataset (so a batch is one unit of work: the output does not depend on the
number of threads or worker processes), then iterated with thread prefetch and,
if `worker_count > 0`, Grain multiprocessing (`mp_prefetch`).

Training order. One *global* stream of example indices per seed: epoch e is a
fresh shuffle of the split (or, with `balanced=True`, N weighted draws with
replacement). Process i of P takes stream positions i, i+P, i+2P, ... so, for
every epoch, the processes read disjoint examples that together cover the split,
and global batch n (the concatenation over processes of their batch n) is always
stream positions [n*G, (n+1)*G), G = batch_size * P, whatever P is.
Every random draw of a clip (frame, mixup, masks, shift) comes from
`np.random.default_rng((seed, tag, position))`: deterministic, independent of
worker_count and of how the stream is split over processes.

Evaluation. Process i gets a contiguous slice of the split; every process yields
the same number of batches (multi-host steps stay in lockstep), the missing rows
padded with mask=False, index=-1, zero features.

Iterator state (JSON; `get_state`/`set_state`, usable by grain's Orbax handler):
  train: {"kind": "pretrain"|"finetune", "seed": int, "next_position": int}
         next_position = global stream positions consumed (next_batch * G); it can
         be restored with another process count if G divides it.
  eval:  {"kind": "eval", "next_batch": int, "process_index": int,
          "process_count": int, "batch_size": int}
"""
from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any, Callable, Sequence

import grain
import numpy as np

from avsiam_jax.data import augment
from avsiam_jax.data import fbank as fbank_lib
from avsiam_jax.data import records
from avsiam_jax.data.records import NUM_FRAMES, NUM_MEL_BINS

Batch = dict[str, np.ndarray]

_STATE_VERSION = 1
# Seed tags: keep the streams of different random uses apart.
_TAG_SHUFFLE, _TAG_BALANCED, _TAG_PRETRAIN, _TAG_FINETUNE = 1, 2, 3, 4


# ---------------------------------------------------------------- dataset ---

# Dataset folders already warned about (once per process each).
_WARNED_DOWNMIX: set[str] = set()


def warn_if_earlier_downmix(dataset_dir: str, info: dict[str, Any]) -> bool:
  """Logs once per process and folder that a dataset without fbank.downmix holds stereo audio
  mixed at 1/sqrt(2) per channel; True if it has no such entry."""
  if "downmix" in info.get("fbank", {}):
    return False
  key = os.path.realpath(dataset_dir)
  if key not in _WARNED_DOWNMIX:
    _WARNED_DOWNMIX.add(key)
    logging.warning("%s", records.earlier_downmix_message(dataset_dir))
  return True


class _Split:
  """Shard paths, size and label names of one split."""

  def __init__(self, dataset_dir: str, split: str):
    self.dataset_dir, self.split = dataset_dir, split
    # TFDS's random-access data source over the split's ArrayRecord shards.
    self.source = records.open_split(dataset_dir, split)
    self.info = self.source.info
    warn_if_earlier_downmix(dataset_dir, self.info)
    self.num_classes = len(self.info.get("label_names", []))
    self.size = len(self.source)
    if self.size == 0:
      raise ValueError(f"{dataset_dir}: split {split!r} is empty")


def split_example_labels(dataset_dir: str, split: str) -> list[list[int]]:
  """Class indices of every clip of a split, in record order.

  Uses `info["splits"][split]["example_labels"]` when the dataset builder stored
  it; otherwise reads every record once (slow on big splits: store the labels).
  """
  info = records.read_info(dataset_dir)
  stored = info["splits"][split].get("example_labels")
  if stored is not None:
    return [list(map(int, l)) for l in stored]
  logging.warning("%s: split %r has no example_labels in its metadata; reading every record "
                  "for the class-balanced weights", dataset_dir, split)
  source = records.open_split(dataset_dir, split)
  return [source[i]["labels"].tolist() for i in range(len(source))]


def _seed_words(*parts: int) -> list[int]:
  return [int(p) & 0xFFFFFFFF for p in parts]


def _rng(seed: int, tag: int, position: int) -> np.random.Generator:
  return np.random.default_rng(_seed_words(seed, seed >> 32, tag, position, position >> 32))


class _WeightedDraws(grain.MapDataset):
  """Infinite (or num_epochs * N) stream of example indices drawn with replacement.

  Epoch e holds N draws from `weights` made with a generator keyed by (seed, e),
  so any position is computable on its own (random access, any process).
  """

  def __init__(self, weights: np.ndarray, seed: int, num_epochs: int | None):
    super().__init__()
    w = np.asarray(weights, np.float64)
    if w.ndim != 1 or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
      raise ValueError("class-balanced weights must be finite, >= 0, not all 0")
    self._cdf = np.cumsum(w)
    self._n = len(w)
    self._seed = seed
    self._num_epochs = num_epochs
    self._cache: dict[int, np.ndarray] = {}

  def __len__(self) -> int:
    return sys.maxsize if self._num_epochs is None else self._num_epochs * self._n

  def _epoch(self, epoch: int) -> np.ndarray:
    draws = self._cache.get(epoch)
    if draws is None:
      u = _rng(self._seed, _TAG_BALANCED, epoch).random(self._n) * self._cdf[-1]
      draws = np.minimum(np.searchsorted(self._cdf, u, side="right"), self._n - 1)
      self._cache = {epoch: draws, **{k: v for k, v in self._cache.items() if k == epoch - 1}}
    return draws

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    epoch, k = divmod(int(index), self._n)
    return int(self._epoch(epoch)[k])

  def __getstate__(self):
    return {**self.__dict__, "_cache": {}}

  def __str__(self) -> str:
    return f"_WeightedDraws(n={self._n})"


def _train_stream(size: int, seed: int, num_epochs: int | None,
                  weights: np.ndarray | None, process_index: int, process_count: int
                  ) -> grain.MapDataset:
  """This process's part of the global stream of example indices."""
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  if weights is None:
    # Hashing the seed keeps seed s epoch 1 apart from seed s+1 epoch 0
    # (grain reseeds each epoch with seed + epoch).
    shuffle_seed = int(_rng(seed, _TAG_SHUFFLE, 0).integers(2**32))
    ds = grain.MapDataset.range(size).shuffle(shuffle_seed).repeat(num_epochs)
  else:
    ds = _WeightedDraws(weights, seed, num_epochs)
  ds = ds[process_index::process_count]
  if num_epochs is not None:  # same length everywhere, so processes stop together
    ds = ds[: num_epochs * size // process_count]
  return ds


def _stack(examples: Sequence[dict[str, np.ndarray]]) -> Batch:
  return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


# --------------------------------------------------------------- examples ---

def _load(source, index: int) -> dict[str, Any]:
  return source[index]


def _audio(ex: dict[str, Any], frames: int) -> np.ndarray:
  fbank = ex["fbank"]
  if fbank.ndim != 2 or fbank.shape[1] != NUM_MEL_BINS:
    raise ValueError(f"clip {ex['id']!r}: fbank shape {fbank.shape}, want (T, 128)")
  return augment.pad_or_cut(fbank, frames)


def _num_frames(ex: dict[str, Any]) -> int:
  if not ex["frames"]:
    raise ValueError(f"clip {ex['id']!r} has no frames")
  return len(ex["frames"])


def _frame(ex: dict[str, Any], t: int, image_size: int) -> np.ndarray:
  return augment.decode_frame(ex["frames"][t], image_size)


# The eval transforms of one stored example: the one definition that the eval pipeline and
# inference (clips.py) share, so a prediction sees a file as evaluation sees its record.

def eval_audio(ex: dict[str, Any], frames: int) -> np.ndarray:
  """(frames, NUM_MEL_BINS) float32: ex["fbank"] padded or cut to `frames`, normalized."""
  return fbank_lib.normalize(_audio(ex, frames))


def eval_video(ex: dict[str, Any], image_size: int) -> np.ndarray:
  """(NUM_FRAMES, S, S, 3) float32: every frame of ex["frames"] at `image_size`, normalized."""
  if len(ex["frames"]) != NUM_FRAMES:
    raise ValueError(f"clip {ex['id']!r} has {len(ex['frames'])} frames, want {NUM_FRAMES}")
  video = np.empty((NUM_FRAMES, image_size, image_size, 3), np.float32)
  for t in range(NUM_FRAMES):
    augment.normalize_image(_frame(ex, t, image_size), out=video[t])
  return video


class _PretrainExample:
  """(local position k, example index) -> pretraining example."""

  def __init__(self, source, *, audio_frames, image_size, seed, time_shift,
               process_index, process_count):
    self.source, self.audio_frames, self.image_size = source, audio_frames, image_size
    self.seed, self.time_shift = seed, time_shift
    self.process_index, self.process_count = process_index, process_count

  def __call__(self, k: int, index: int) -> dict[str, np.ndarray]:
    rng = _rng(self.seed, _TAG_PRETRAIN, self.process_index + self.process_count * k)
    ex = _load(self.source, index)
    t = int(rng.integers(_num_frames(ex)))
    video = augment.normalize_image(_frame(ex, t, self.image_size))
    audio = fbank_lib.normalize(_audio(ex, self.audio_frames))
    if self.time_shift:
      audio = augment.time_shift(audio, rng)
    return {"audio": audio, "video": video, "index": np.int32(index)}


class _FinetuneExample:
  """(local position k, example index) -> finetuning example with mixup/SpecAugment."""

  def __init__(self, source, size, num_classes, *, audio_frames, image_size, seed, mixup,
               label_smoothing, freqm, timem, time_shift, process_index, process_count):
    self.source, self.size, self.num_classes = source, size, num_classes
    self.audio_frames, self.image_size, self.seed = audio_frames, image_size, seed
    self.mixup, self.label_smoothing = mixup, label_smoothing
    self.freqm, self.timem, self.time_shift = freqm, timem, time_shift
    self.process_index, self.process_count = process_index, process_count

  def __call__(self, k: int, index: int) -> dict[str, np.ndarray]:
    rng = _rng(self.seed, _TAG_FINETUNE, self.process_index + self.process_count * k)
    ex = _load(self.source, index)
    t = int(rng.integers(_num_frames(ex)))
    audio = _audio(ex, self.audio_frames)
    pixels = _frame(ex, t, self.image_size)
    labels = augment.multi_hot(ex["labels"], self.num_classes)
    if rng.random() < self.mixup:
      # One lambda for audio, frame and labels (the released code draws a second,
      # independent weight for the frames: a bug). Fbanks are mixed instead of
      # waveforms. The partner uses the same frame slot, as in the released code.
      lam = np.float32(rng.beta(10.0, 10.0))
      other = _load(self.source, int(rng.integers(self.size)))
      t2 = min(t, _num_frames(other) - 1)
      audio = lam * audio + (1 - lam) * _audio(other, self.audio_frames)
      pixels = lam * pixels.astype(np.float32) + (1 - lam) * _frame(other, t2, self.image_size)
      labels = lam * labels + (1 - lam) * augment.multi_hot(other["labels"], self.num_classes)
    audio = augment.spec_augment(audio, rng, self.freqm, self.timem)
    audio = fbank_lib.normalize(audio)
    if self.time_shift:
      audio = augment.time_shift(audio, rng)
    return {"audio": audio.astype(np.float32, copy=False),
            "video": augment.normalize_image(pixels),
            "labels": augment.smooth_labels(labels, self.label_smoothing),
            "index": np.int32(index)}


class _EvalExample:
  """Dataset index (or -1 for padding) -> eval example with all frames."""

  def __init__(self, source, num_classes, *, audio_frames, image_size):
    self.source, self.num_classes = source, num_classes
    self.audio_frames, self.image_size = audio_frames, image_size

  def __call__(self, index: int) -> dict[str, np.ndarray]:
    s = self.image_size
    if index < 0:
      return {"audio": np.zeros((self.audio_frames, NUM_MEL_BINS), np.float32),
              "video": np.zeros((NUM_FRAMES, s, s, 3), np.float32),
              "labels": np.zeros((self.num_classes,), np.float32),
              "mask": np.bool_(False), "index": np.int32(-1)}
    ex = _load(self.source, index)
    return {"audio": eval_audio(ex, self.audio_frames),
            "video": eval_video(ex, s),
            "labels": augment.multi_hot(ex["labels"], self.num_classes),
            "mask": np.bool_(True), "index": np.int32(index)}


class _EvalIndex:
  """Padded local position -> dataset index (-1 past this process's slice)."""

  def __init__(self, start: int, count: int):
    self.start, self.count = start, count

  def __call__(self, p: int) -> int:
    return self.start + p if p < self.count else -1


# --------------------------------------------------------------- iterator ---

class PipelineIterator(grain.DatasetIterator):
  """Iterates a MapDataset of batches; its state is just a position.

  A grain DatasetIterator (grain's Orbax CheckpointHandler JSON-serializes
  get_state()), whose state does not depend on worker_count or thread settings:
  set_state rebuilds the Grain iterator from the saved batch on.
  """

  def __init__(self, batches: grain.MapDataset, *, state_fn: Callable[[int], dict],
               restore_fn: Callable[[dict], int], worker_count: int, read_threads: int,
               prefetch_batches: int, finite: bool):
    super().__init__()
    self._finite = finite
    self._batches = batches
    self._state_fn, self._restore_fn = state_fn, restore_fn
    self._worker_count, self._read_threads = worker_count, read_threads
    self._prefetch_batches = prefetch_batches
    self._next_batch = 0
    self._it = None

  def _open(self):
    ds = self._batches[self._next_batch:] if self._next_batch else self._batches
    read = grain.ReadOptions(num_threads=self._read_threads,
                             prefetch_buffer_size=self._prefetch_batches)
    ids = ds.to_iter_dataset(read)
    if self._worker_count > 0:
      _ensure_flags_parsed()
      ids = ids.mp_prefetch(grain.MultiprocessingOptions(
          num_workers=self._worker_count, per_worker_buffer_size=self._prefetch_batches))
    self._it = iter(ids)

  def __next__(self) -> Batch:
    if self._it is None:
      self._open()
    batch = next(self._it)
    self._next_batch += 1
    return batch

  def get_state(self) -> dict[str, Any]:
    return self._state_fn(self._next_batch)

  def set_state(self, state: dict[str, Any]) -> None:
    state = json.loads(json.dumps(state))  # accept what a JSON round trip gives
    next_batch = self._restore_fn(state)
    self._close_inner()
    self._next_batch = next_batch

  def _close_inner(self):
    if self._it is not None:
      self._it.close()
      self._it = None

  def close(self) -> None:
    self._close_inner()
    super().close()

  @property
  def num_batches(self) -> int | None:
    """Total batches of one pass (None for an endless training stream).

    Deliberately not __len__: list() would use it to preallocate.
    """
    return len(self._batches) if self._finite else None


def _ensure_flags_parsed():
  # Grain's multiprocessing reads absl flags; outside an absl app (tests, notebooks,
  # scripts) nothing parsed them, so take their defaults.
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _default_threads(worker_count: int) -> int:
  # Decoding and numpy work mostly release the GIL: a few threads per process pay off.
  return 2 if worker_count > 0 else max(2, min(8, os.cpu_count() or 1))


def _train_iterator(batches, kind, seed, batch_size, process_count, worker_count, num_epochs):
  global_batch = batch_size * process_count

  def state_fn(next_batch):
    return {"version": _STATE_VERSION, "kind": kind, "seed": seed,
            "next_position": next_batch * global_batch}

  def restore_fn(state):
    if state.get("kind") != kind or state.get("seed") != seed:
      raise ValueError(f"iterator state {state} is not from a {kind} pipeline with seed {seed}")
    pos = int(state["next_position"])
    if pos % global_batch:
      raise ValueError(f"state position {pos} is not a multiple of the global batch "
                       f"{global_batch} (batch_size * process_count)")
    return pos // global_batch

  return PipelineIterator(batches, state_fn=state_fn, restore_fn=restore_fn,
                          worker_count=worker_count,
                          read_threads=_default_threads(worker_count),
                          prefetch_batches=max(2, _default_threads(worker_count)),
                          finite=num_epochs is not None)


def _check_common(batch_size, audio_frames, image_size, worker_count):
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  if audio_frames <= 0 or image_size <= 0:
    raise ValueError(f"bad audio_frames {audio_frames} / image_size {image_size}")
  if worker_count < 0:
    raise ValueError(f"worker_count must be >= 0, got {worker_count}")


# ------------------------------------------------------------------- API ----

def make_pretrain_iterator(dataset_dir: str, split: str, *, batch_size: int,
                           audio_frames: int = 1024, image_size: int = 224, seed: int = 0,
                           time_shift: bool = True, process_index: int = 0,
                           process_count: int = 1, worker_count: int = 0,
                           num_epochs: int | None = None) -> PipelineIterator:
  """Batches {'audio': f32 (B, audio_frames, 128), 'video': f32 (B, S, S, 3), 'index': i32 (B,)}.

  One random frame per clip; audio normalized, then the random time shift.
  """
  _check_common(batch_size, audio_frames, image_size, worker_count)
  data = _Split(dataset_dir, split)
  fn = _PretrainExample(data.source, audio_frames=audio_frames, image_size=image_size,
                        seed=seed, time_shift=time_shift, process_index=process_index,
                        process_count=process_count)
  ds = _train_stream(data.size, seed, num_epochs, None, process_index, process_count)
  batches = ds.map_with_index(fn).batch(batch_size, drop_remainder=True, batch_fn=_stack)
  return _train_iterator(batches, "pretrain", seed, batch_size, process_count, worker_count,
                         num_epochs)


def make_finetune_iterator(dataset_dir: str, split: str, *, batch_size: int,
                           audio_frames: int = 1024, image_size: int = 224, seed: int = 0,
                           mixup: float = 0.5, label_smoothing: float = 0.1, freqm: int = 48,
                           timem: int = 192, time_shift: bool = True, balanced: bool = False,
                           process_index: int = 0, process_count: int = 1,
                           worker_count: int = 0, num_epochs: int | None = None
                           ) -> PipelineIterator:
  """Batches {'audio', 'video' as pretraining, 'labels': f32 (B, C) soft, 'index': i32 (B,)}.

  Per clip: mixup with probability `mixup` (lambda ~ Beta(10, 10), shared by
  fbank, frame and labels), SpecAugment, normalization, time shift; labels
  smoothed as y*(1-eps) + eps/C. `balanced`: the released class-balanced
  sampler (draws with replacement, weight = sum of 1000/(count+0.01) over labels).
  """
  _check_common(batch_size, audio_frames, image_size, worker_count)
  data = _Split(dataset_dir, split)
  if data.num_classes == 0:
    raise ValueError(f"{dataset_dir}: the dataset has no label_names (metadata.json)")
  weights = None
  if balanced:
    weights = augment.class_balanced_weights(split_example_labels(dataset_dir, split),
                                             data.num_classes)
  fn = _FinetuneExample(data.source, data.size, data.num_classes, audio_frames=audio_frames,
                        image_size=image_size, seed=seed, mixup=mixup,
                        label_smoothing=label_smoothing, freqm=freqm, timem=timem,
                        time_shift=time_shift, process_index=process_index,
                        process_count=process_count)
  ds = _train_stream(data.size, seed, num_epochs, weights, process_index, process_count)
  batches = ds.map_with_index(fn).batch(batch_size, drop_remainder=True, batch_fn=_stack)
  return _train_iterator(batches, "finetune", seed, batch_size, process_count, worker_count,
                         num_epochs)


def eval_slice(size: int, process_index: int, process_count: int) -> tuple[int, int]:
  """[start, stop) of this process's contiguous part of `size` examples."""
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  base, extra = divmod(size, process_count)
  start = process_index * base + min(process_index, extra)
  return start, start + base + (process_index < extra)


def make_eval_iterator(dataset_dir: str, split: str, *, batch_size: int,
                       audio_frames: int = 1024, image_size: int = 224,
                       process_index: int = 0, process_count: int = 1,
                       max_examples: int | None = None, worker_count: int = 0
                       ) -> PipelineIterator:
  """One pass: {'audio': (B, F, 128), 'video': (B, 10, S, S, 3), 'labels': (B, C) 0/1,
  'mask': bool (B,), 'index': i32 (B,)}; padding rows have mask False, index -1.

  Every process yields ceil(ceil(N/P)/B) batches (N after max_examples).
  """
  _check_common(batch_size, audio_frames, image_size, worker_count)
  data = _Split(dataset_dir, split)
  size = data.size if max_examples is None else min(data.size, max_examples)
  start, stop = eval_slice(size, process_index, process_count)
  per_process = -(-size // process_count)
  num_batches = max(1, -(-per_process // batch_size))
  fn = _EvalExample(data.source, data.num_classes, audio_frames=audio_frames,
                    image_size=image_size)
  batches = (grain.MapDataset.range(num_batches * batch_size)
             .map(_EvalIndex(start, stop - start)).map(fn)
             .batch(batch_size, drop_remainder=True, batch_fn=_stack))
  fixed = {"process_index": process_index, "process_count": process_count,
           "batch_size": batch_size}

  def state_fn(next_batch):
    return {"version": _STATE_VERSION, "kind": "eval", "next_batch": next_batch, **fixed}

  def restore_fn(state):
    if state.get("kind") != "eval" or any(state.get(k) != v for k, v in fixed.items()):
      raise ValueError(f"iterator state {state} does not match this eval pipeline {fixed}")
    return int(state["next_batch"])

  return PipelineIterator(batches, state_fn=state_fn, restore_fn=restore_fn,
                          worker_count=worker_count,
                          read_threads=_default_threads(worker_count),
                          prefetch_batches=2, finite=True)
