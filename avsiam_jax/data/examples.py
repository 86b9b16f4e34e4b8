"""One clip's media -> its stored example, the record of records.py.

The dataset builder (`python -m data_prep.build`) and the demo dataset make every record with
`make_example`; inference (clips.py) decodes and stores a file with the same functions, so a
file is seen exactly as its record would be.

Media: a video file (its own audio track, or a separate audio file), or a CAV-MAE frame folder
holding folder/frame_{0..9}/<clip id>.jpg plus an audio file. `frame_resize` (one of
records.FRAME_RESIZES, "crop" by default) says how every frame is made square, `frame_span`
(records.FRAME_SPANS, "first") which part of a video file the frames are sampled from (a frame
folder's are given), `downmix` (records.DOWNMIXES, "mean") how audio becomes mono.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np
from PIL import Image

from avsiam_jax.data import fbank as fbank_lib
from avsiam_jax.data import media, records


def decode_clip(path, frame_resize: str = "crop", downmix: str = "mean",
                frame_span: str = "first") -> media.Clip:
  """Frames and audio of a video file at the record's settings; raises media.ClipError."""
  return media.decode_clip(path, num_frames=records.NUM_FRAMES, image_size=records.FRAME_SIZE,
                           sample_rate=records.SAMPLE_RATE, max_seconds=records.MAX_SECONDS,
                           frame_resize=frame_resize, downmix=downmix, frame_span=frame_span)


def decode_frames(path, frame_resize: str = "crop", frame_span: str = "first") -> np.ndarray:
  """(NUM_FRAMES, FRAME_SIZE, FRAME_SIZE, 3) uint8 frames of a video file; audio ignored."""
  return media.decode_frames(path, num_frames=records.NUM_FRAMES, image_size=records.FRAME_SIZE,
                             max_seconds=records.MAX_SECONDS, frame_resize=frame_resize,
                             frame_span=frame_span)


def decode_audio(path, downmix: str = "mean") -> np.ndarray:
  """(N,) float32 mono waveform of a media file at the record's rate and length."""
  return media.decode_audio(path, sample_rate=records.SAMPLE_RATE,
                            max_seconds=records.MAX_SECONDS, downmix=downmix)


def frame_folder_paths(folder: str, clip_id: str) -> list[str]:
  """The JPEGs of a CAV-MAE frame folder, in frame order."""
  return [os.path.join(folder, f"frame_{i}", f"{clip_id}.jpg") for i in range(records.NUM_FRAMES)]


def square_frame(path: str, frame_resize: str = "crop") -> np.ndarray:
  """An image file -> (FRAME_SIZE, FRAME_SIZE, 3) uint8, made square as a video's frames are."""
  try:
    with Image.open(path) as img:
      img = img.convert("RGB")
  except OSError as e:
    raise media.ClipError(path, "unreadable", f"bad image: {e}") from None
  return media.square_image(img, records.FRAME_SIZE, frame_resize)


def decode_media(clip_id: str, video: str, audio: str | None = None, *, frame_dir: bool = False,
                 frame_resize: str = "crop", downmix: str = "mean",
                 frame_span: str = "first") -> tuple[np.ndarray, np.ndarray]:
  """(frames uint8 (NUM_FRAMES, FRAME_SIZE, FRAME_SIZE, 3), waveform) or media.ClipError.

  `video`: a video file, or a frame folder when `frame_dir`; `audio`: a separate audio file,
  None for the video file's own track (a frame folder needs one).
  """
  # Setting errors, never a skipped clip.
  records.check_frame_resize(frame_resize)
  records.check_downmix(downmix)
  records.check_frame_span(frame_span)
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
    frames = [square_frame(p, frame_resize) for p in needed[:records.NUM_FRAMES]]
    return np.stack(frames), decode_audio(audio, downmix)
  if audio is None:
    clip = decode_clip(video, frame_resize, downmix, frame_span)
    return clip.frames, clip.waveform
  return decode_frames(video, frame_resize, frame_span), decode_audio(audio, downmix)


def stored_fbank(waveform: np.ndarray,
                 max_frames: int = records.MAX_FBANK_FRAMES) -> np.ndarray:
  """The record's fbank of a waveform: (T <= max_frames, NUM_MEL_BINS) float16."""
  return fbank_lib.fbank(waveform, sample_rate=records.SAMPLE_RATE)[:max_frames].astype(
      np.float16)


def stored_frames(frames: np.ndarray) -> list[bytes]:
  """The record's frames: one JPEG per uint8 frame."""
  return [media.encode_jpeg(f) for f in frames]


def make_example(clip_id: str, video: str, audio: str | None = None, *, frame_dir: bool = False,
                 labels: Sequence[int] = (), max_frames: int = records.MAX_FBANK_FRAMES,
                 frame_resize: str = "crop", downmix: str = "mean",
                 frame_span: str = "first") -> dict[str, Any]:
  """The record of one clip (see decode_media for the media); raises media.ClipError."""
  frames, wave = decode_media(clip_id, video, audio, frame_dir=frame_dir,
                              frame_resize=frame_resize, downmix=downmix, frame_span=frame_span)
  return {
      "id": clip_id,
      "frames": stored_frames(frames),
      "fbank": stored_fbank(wave, max_frames),
      "labels": np.asarray(labels, np.int32),
  }
