"""One clip's media -> its stored example, the record of records.py.

The dataset builder (`python -m data_prep.build`) and the demo dataset make every record with
`make_example`; inference (clips.py) decodes and stores a file with the same functions, so a
file is seen exactly as its record would be.

Media: a video file (its own audio track, or a separate audio file), or a CAV-MAE frame folder
holding folder/frame_{0..9}/<clip id>.jpg plus an audio file.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np
from PIL import Image

from avsiam_jax.data import fbank as fbank_lib
from avsiam_jax.data import media, records


def decode_clip(path) -> media.Clip:
  """Frames and audio of a video file at the record's settings; raises media.ClipError."""
  return media.decode_clip(path, num_frames=records.NUM_FRAMES, image_size=records.FRAME_SIZE,
                           sample_rate=records.SAMPLE_RATE, max_seconds=records.MAX_SECONDS)


def decode_frames(path) -> np.ndarray:
  """(NUM_FRAMES, FRAME_SIZE, FRAME_SIZE, 3) uint8 frames of a video file; audio ignored."""
  return media.decode_frames(path, num_frames=records.NUM_FRAMES, image_size=records.FRAME_SIZE,
                             max_seconds=records.MAX_SECONDS)


def decode_audio(path) -> np.ndarray:
  """(N,) float32 mono waveform of a media file at the record's rate and length."""
  return media.decode_audio(path, sample_rate=records.SAMPLE_RATE,
                            max_seconds=records.MAX_SECONDS)


def frame_folder_paths(folder: str, clip_id: str) -> list[str]:
  """The JPEGs of a CAV-MAE frame folder, in frame order."""
  return [os.path.join(folder, f"frame_{i}", f"{clip_id}.jpg") for i in range(records.NUM_FRAMES)]


def square_frame(path: str) -> np.ndarray:
  """An image file -> (FRAME_SIZE, FRAME_SIZE, 3) uint8, with media.py's resize/crop rule."""
  size = records.FRAME_SIZE
  try:
    with Image.open(path) as img:
      img = img.convert("RGB")
  except OSError as e:
    raise media.ClipError(path, "unreadable", f"bad image: {e}") from None
  w, h = img.size
  scale = size / min(w, h)
  nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
  img = img.resize((nw, nh), Image.BILINEAR)
  left, top = (nw - size) // 2, (nh - size) // 2
  return np.asarray(img.crop((left, top, left + size, top + size)), np.uint8)


def decode_media(clip_id: str, video: str, audio: str | None = None, *,
                 frame_dir: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """(frames uint8 (NUM_FRAMES, FRAME_SIZE, FRAME_SIZE, 3), waveform) or media.ClipError.

  `video`: a video file, or a frame folder when `frame_dir`; `audio`: a separate audio file,
  None for the video file's own track (a frame folder needs one).
  """
  # Existence first: report a missing file without paying for any decoding.
  needed = frame_folder_paths(video, clip_id) if frame_dir else [video]
  if audio is not None:
    needed.append(audio)
  for p in needed:
    if not os.path.isfile(p):
      raise media.ClipError(p, "missing_file", "no such file")
  if frame_dir:
    if audio is None:
      raise media.ClipError(video, "no_audio", "frame folder given without a 'wav' file")
    return np.stack([square_frame(p) for p in needed[:records.NUM_FRAMES]]), decode_audio(audio)
  if audio is None:
    clip = decode_clip(video)
    return clip.frames, clip.waveform
  return decode_frames(video), decode_audio(audio)


def stored_fbank(waveform: np.ndarray,
                 max_frames: int = records.MAX_FBANK_FRAMES) -> np.ndarray:
  """The record's fbank of a waveform: (T <= max_frames, NUM_MEL_BINS) float16."""
  return fbank_lib.fbank(waveform, sample_rate=records.SAMPLE_RATE)[:max_frames].astype(
      np.float16)


def stored_frames(frames: np.ndarray) -> list[bytes]:
  """The record's frames: one JPEG per uint8 frame."""
  return [media.encode_jpeg(f) for f in frames]


def make_example(clip_id: str, video: str, audio: str | None = None, *, frame_dir: bool = False,
                 labels: Sequence[int] = (),
                 max_frames: int = records.MAX_FBANK_FRAMES) -> dict[str, Any]:
  """The record of one clip (see decode_media for the media); raises media.ClipError."""
  frames, wave = decode_media(clip_id, video, audio, frame_dir=frame_dir)
  return {
      "id": clip_id,
      "frames": stored_frames(frames),
      "fbank": stored_fbank(wave, max_frames),
      "labels": np.asarray(labels, np.int32),
  }
