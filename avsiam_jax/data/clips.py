"""Model inputs of one media file for inference, as evaluation sees the file's stored record.

A file is decoded and stored as the dataset builder stores a clip (examples.py: 10 frames at
224 px as JPEG, the fbank of the first 10 s as float16), then put through the eval pipeline's
own transforms (pipeline.eval_audio / eval_video) at the model's `audio_frames` and
`image_size`; its frames are made square as the run's dataset's were (`frame_resize`: the
dataset_info's frames.resize, kept in the run's config.json as data.frame_resize), sampled from
the same span (`frame_span`, frames.span) and its audio down-mixed the same way (`downmix`,
fbank.downmix; "mean" where the run does not say). A file
without usable audio (no stream, silent, under 1 s) is used visual-only, one without video
audio-only.

`prepare_windows` does the same for every window of a whole file (media.decode_windows: 10 s
every 10 s by default), each window as a clip of its own, with its own fallback.
"""
from __future__ import annotations

import dataclasses
from typing import Iterator

import numpy as np

from avsiam_jax.data import examples, media, pipeline, records
from avsiam_jax.modalities import AUDIO_ONLY, AUDIO_VISUAL, VISUAL_ONLY

# media.ClipError reason -> (modality still usable, why); other reasons fail the clip.
_FALLBACK = {
    "no_audio": (VISUAL_ONLY, "no audio stream"),
    "silent_audio": (VISUAL_ONLY, "silent audio track"),
    "audio_too_short": (VISUAL_ONLY, f"audio shorter than {media.MIN_AUDIO_SECONDS:g} s"),
    "no_video": (AUDIO_ONLY, "no video stream"),
    "no_frames": (AUDIO_ONLY, "no decodable video frame"),
}


@dataclasses.dataclass
class PreparedClip:
  path: str
  audio: np.ndarray | None  # (audio_frames, 128) float32, normalized
  video: np.ndarray | None  # (10, S, S, 3) float32, ImageNet-normalized
  modality: str  # AUDIO_VISUAL, AUDIO_ONLY or VISUAL_ONLY
  reason: str  # why a modality is missing; "" for audio-visual


def _decode(path, frame_resize, downmix, frame_span):
  """(frames uint8 or None, waveform or None, modality, reason), decoded as the builder does."""
  try:
    clip = examples.decode_clip(path, frame_resize, downmix, frame_span)
    return clip.frames, clip.waveform, AUDIO_VISUAL, ""
  except media.ClipError as e:
    if e.reason not in _FALLBACK:
      raise
    modality, reason = _FALLBACK[e.reason]
  try:
    if modality == VISUAL_ONLY:
      return examples.decode_frames(path, frame_resize, frame_span), None, modality, reason
    return None, examples.decode_audio(path, downmix), modality, reason
  except media.ClipError as e:
    # Neither modality is usable: say why for both.
    raise media.ClipError(e.path, e.reason, f"{e.detail or e.reason}; and {reason}") from None


def prepare_clip(path, *, audio_frames: int, image_size: int, frame_resize: str = "crop",
                 downmix: str = "mean", frame_span: str = "first") -> PreparedClip:
  """Model inputs of one media file; raises media.ClipError (file and reason) if unusable."""
  path = str(path)
  frames, wave, modality, reason = _decode(path, frame_resize, downmix, frame_span)
  audio = video = None
  if wave is not None:
    audio = pipeline.eval_audio({"id": path, "fbank": examples.stored_fbank(wave)}, audio_frames)
  if frames is not None:
    video = pipeline.eval_video({"id": path, "frames": examples.stored_frames(frames)},
                                image_size)
  return PreparedClip(path, audio, video, modality, reason)


NONE = "none"  # the modality of a window with neither usable


@dataclasses.dataclass
class PreparedWindow(PreparedClip):
  start: float = 0.0  # seconds from the start of the file
  seconds: float = records.MAX_SECONDS  # its length (the last window may be shorter)


def _window_inputs(path, w: media.Window, audio_frames, image_size) -> PreparedWindow:
  """A window's model inputs and modality; a window with neither has modality NONE."""
  audio = video = None
  if w.waveform is not None:
    audio = pipeline.eval_audio({"id": path, "fbank": examples.stored_fbank(w.waveform)},
                                audio_frames)
  if w.frames is not None:
    video = pipeline.eval_video({"id": path, "frames": examples.stored_frames(w.frames)},
                                image_size)
  why = {e.reason: _FALLBACK[e.reason] for e in (w.video_error, w.audio_error) if e is not None}
  if audio is not None and video is not None:
    modality, reason = AUDIO_VISUAL, ""
  elif audio is not None or video is not None:
    modality, reason = next(iter(why.values()))
  else:
    modality, reason = NONE, "; and ".join(r for _, r in why.values())
  return PreparedWindow(path, audio, video, modality, reason, w.start, w.seconds)


def prepare_windows(path, *, audio_frames: int, image_size: int,
                    window: float = records.MAX_SECONDS, hop: float | None = None,
                    frame_resize: str = "crop", downmix: str = "mean",
                    frame_span: str = "first") -> Iterator[PreparedWindow]:
  """Model inputs of every window of a media file (windows of `window` s every `hop` s, the
  last one shorter), made one window at a time as they are taken (a long file's float inputs
  are not all held at once); raises media.ClipError at once if the file, or every window of
  it, is unusable."""
  path = str(path)
  windows = media.decode_windows(path, window, hop, num_frames=records.NUM_FRAMES,
                                 image_size=records.FRAME_SIZE, sample_rate=records.SAMPLE_RATE,
                                 frame_resize=frame_resize, downmix=downmix,
                                 frame_span=frame_span)
  if all(w.frames is None and w.waveform is None for w in windows):
    e, other = windows[0].audio_error, windows[0].video_error  # as prepare_clip: why for both
    raise media.ClipError(path, e.reason,
                          f"{e.detail or e.reason}; and {_FALLBACK[other.reason][1]}")
  return (_window_inputs(path, w, audio_frames, image_size) for w in windows)
