"""Decoding raw video files (any container/codec FFmpeg reads) with PyAV.

`decode_clip` returns `num_frames` RGB frames sampled uniformly from the first
`max_seconds` of video (`frame_span` "first") or from the whole video stream
("whole"), and the first `max_seconds` of audio as 16 kHz mono float32;
`square_image` makes each frame square (`frame_resize`: one of
records.FRAME_RESIZES).  Every way a file can be unusable raises `ClipError`
with a short, stable `reason` code so that data pipelines can count and skip
bad clips.  `decode_windows` cuts a whole file into windows of `window` seconds
every `hop` seconds (`window_starts`), each sampled as `decode_clip` samples a
clip, in one pass over the file.

Audio is resampled in its own channel layout, then down-mixed here (`downmix`,
one of records.DOWNMIXES): "mean" averages the channels (the released AVSiam
loader's ``waveform.mean(0)``), "first" keeps channel 0 (CAV-MAE's ``sox remix
1``). FFmpeg's own mono down-mix is not used: it sums stereo at 1/sqrt(2) per
channel, (L+R)/sqrt(2), 1.41x louder than the mean.

Edge-case rules (kept stable because callers depend on them):
  * frame indices are ``int(i * total / num_frames)`` where ``total`` counts
    decoded frames whose time (relative to the first frame) is below
    ``max_seconds`` ("first"); with "whole", ``total`` counts every decoded
    frame and the indices are ``np.linspace(0, total - 1, num_frames)`` cast
    to int (the released AVSiam loader's, without its random offset). A clip
    with fewer than ``num_frames`` frames repeats frames; only ``total == 0``
    is an error ('no_frames').
  * a damaged / truncated file that still yields frames and >= 1 s of audio is
    returned as is (whatever decodes is used); packets that fail to decode are
    skipped.
  * a file that opens but yields neither frames nor audio samples, or has no
    audio/video stream at all, is 'unreadable'.
  * cover art (attached pictures, e.g. in mp3/m4a) does not count as video.
  * checks run in this order: missing_file, unreadable, no_video, no_audio,
    no_frames, audio_too_short, silent_audio.
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass

import av
import numpy as np
from PIL import Image

# The allowed settings live with the stored format, which records them.
from avsiam_jax.data.records import check_downmix, check_frame_resize, check_frame_span

REASONS = (
    "missing_file",
    "unreadable",
    "no_audio",
    "no_video",
    "silent_audio",
    "audio_too_short",
    "no_frames",
)
SILENCE_THRESHOLD = 1e-4  # max |sample| below this counts as silent
MIN_AUDIO_SECONDS = 1.0
_TIME_EPS = 1e-3  # guards the max_seconds cut against pts rounding
# Frames kept around the estimated frame count in the single-pass decode; if
# the real count falls outside, a second (video-only) pass fetches the frames.
_ESTIMATE_SLACK = 2


class ClipError(Exception):
  """A media file cannot be used; `reason` is one of `REASONS`."""

  def __init__(self, path, reason: str, detail: str = ""):
    self.path = os.fspath(path) if path is not None else None
    self.reason = reason
    self.detail = detail
    msg = f"{self.path}: {reason}"
    super().__init__(f"{msg} ({detail})" if detail else msg)

  def __reduce__(self):
    # Custom __init__ args: needed so the error survives multiprocessing.
    return (ClipError, (self.path, self.reason, self.detail))


@dataclass
class Clip:
  frames: np.ndarray  # (num_frames, S, S, 3) uint8
  waveform: np.ndarray  # (N,) float32 in [-1, 1], mono at sample_rate
  duration: float  # seconds of audio decoded


# ---------------------------------------------------------------- helpers


def _open(path):
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise ClipError(path, "missing_file", "no such file")
  try:
    return av.open(path, metadata_errors="ignore")
  except (av.FFmpegError, OSError, ValueError, UnicodeDecodeError) as e:
    raise ClipError(path, "unreadable", f"cannot open: {e}") from None


def _pick_stream(streams):
  """First default-disposition stream, else the first; skips cover art and
  streams FFmpeg has no decoder for."""
  cands = [s for s in streams if s.codec_context is not None
           and not (s.disposition & av.stream.Disposition.attached_pic)]
  if not cands:
    return None
  for s in cands:
    if s.disposition & av.stream.Disposition.default:
      return s
  return cands[0]


def _streams(container, path, want_video, want_audio):
  vs = _pick_stream(container.streams.video)
  as_ = _pick_stream(container.streams.audio)
  if vs is None and as_ is None:
    raise ClipError(path, "unreadable", "no audio or video stream")
  if want_video and vs is None:
    raise ClipError(path, "no_video", "no video stream")
  if want_audio and as_ is None:
    raise ClipError(path, "no_audio", "no audio stream")
  if want_video:
    vs.thread_type = "AUTO"
  else:
    vs = None
  if want_audio:
    as_.thread_type = "AUTO"
  else:
    as_ = None
  return vs, as_


def _frame_rate(vs):
  for r in (vs.average_rate, vs.guessed_rate, vs.base_rate):
    if r and float(r) > 0:
      return float(r)
  return None


def _estimate_total(container, vs, max_seconds):
  """Best guess of the frame count in the first max_seconds (None = unknown; max_seconds may be
  inf: the whole stream)."""
  rate = _frame_rate(vs)
  dur = None
  if vs.duration and vs.time_base:
    dur = float(vs.duration * vs.time_base)
  elif container.duration:
    dur = container.duration / av.time_base
  if vs.frames and dur and dur <= max_seconds:
    return int(vs.frames)
  if rate is None or dur is None:
    return None
  return max(1, int(round(min(dur, max_seconds) * rate)))


def frame_indices(total: int, num_frames: int, frame_span: str = "first") -> list[int]:
  """Uniform frame sampling rule shared by all decoders (see the module docstring)."""
  if check_frame_span(frame_span) == "whole":
    # The released loader's rule: first and last frame included.
    return [int(i) for i in np.linspace(0, total - 1, num_frames)]
  return [int(i * total / num_frames) for i in range(num_frames)]


def _video_seconds(max_seconds, frame_span):
  """The time span whose frames count: the first max_seconds, or all of the stream."""
  return float("inf") if frame_span == "whole" else max_seconds


def _candidate_indices(est, num_frames, frame_span):
  lo, hi = max(1, est - _ESTIMATE_SLACK), est + _ESTIMATE_SLACK
  return {i for t in range(lo, hi + 1) for i in frame_indices(t, num_frames, frame_span)}


class _VideoSampler:
  """Counts frames inside the time span and keeps the ones that may be needed."""

  def __init__(self, vs, max_seconds, keep):
    self.rate = _frame_rate(vs) or 30.0
    self.max_seconds = max_seconds
    self.keep = keep  # set of indices, or None to keep every frame
    self.kept = {}
    self.total = 0
    self.origin = None
    self.done = False

  def add(self, frame):
    t = frame.time
    if t is None:  # no timestamps: assume a constant rate
      t = self.total / self.rate
    if self.origin is None:
      self.origin = t
    if t - self.origin >= self.max_seconds - _TIME_EPS:
      self.done = True
      return
    if self.keep is None or self.total in self.keep:
      self.kept[self.total] = frame
    self.total += 1


def downmix_channels(a: np.ndarray, downmix: str = "mean") -> np.ndarray:
  """(channels, N) -> (N,) float32: the mean of the channels, or the first channel."""
  a = np.asarray(a, np.float32)
  if check_downmix(downmix) == "first" or a.shape[0] == 1:
    return a[0]
  return a.mean(axis=0, dtype=np.float32)


class _AudioCollector:
  def __init__(self, sample_rate, max_seconds, downmix="mean"):
    self.sample_rate = sample_rate
    # None: the whole track (decode_windows).
    self.max_samples = (None if max_seconds == float("inf")
                        else int(round(max_seconds * sample_rate)))
    self.downmix = downmix
    self.resampler = None
    self.chunks = []
    self.n = 0
    self.done = False

  def _new_resampler(self):
    # Planar float in the source's own layout (layout None keeps it): the down-mix is ours.
    return av.AudioResampler(format="fltp", layout=None, rate=self.sample_rate)

  def _take(self, frames):
    for f in frames:
      if f is None:  # passthrough resampler echoes the flush sentinel
        continue
      # fltp: (channels, N). Mixed per chunk: the layout may change mid-stream.
      a = downmix_channels(f.to_ndarray(), self.downmix)
      self.chunks.append(a)
      self.n += a.shape[0]
    if self.max_samples is not None and self.n >= self.max_samples:
      self.done = True

  def add(self, frame):
    if self.resampler is None:
      self.resampler = self._new_resampler()
    try:
      out = self.resampler.resample(frame)
    except ValueError:  # format/layout/rate changed mid-stream
      self._take(self.resampler.resample(None))
      self.resampler = self._new_resampler()
      out = self.resampler.resample(frame)
    self._take(out)

  def finish(self):
    if self.resampler is not None and not self.done:
      self._take(self.resampler.resample(None))
    if not self.chunks:
      return np.zeros(0, np.float32)
    w = np.concatenate(self.chunks)[: self.max_samples].astype(np.float32, copy=False)
    # The mean of channels stays in [-1, 1], but resampling overshoot and float sources need not.
    return np.clip(w, -1.0, 1.0)


def _decode_packet(stream, packet):
  try:
    return stream.codec_context.decode(packet)
  except (av.FFmpegError, ValueError):  # damaged packet: skip it
    return []


def _run(container, vs, as_, sampler, audio):
  """One demux pass over the wanted streams, stopping once both are done."""
  sinks = {s: k for s, k in ((vs, sampler), (as_, audio)) if s is not None}

  def feed(stream, packet):
    sink = sinks[stream]
    for f in _decode_packet(stream, packet):
      sink.add(f)
      if sink.done:
        break

  try:
    for packet in container.demux(*sinks):
      # PyAV treats an empty packet as end-of-stream and then refuses all
      # later packets, but some demuxers (ogg/theora) emit empty packets
      # mid-stream for repeated frames: skip them and flush explicitly.
      if packet.size == 0:
        continue
      if not sinks[packet.stream].done:
        feed(packet.stream, packet)
      if all(k.done for k in sinks.values()):
        return
  except (av.FFmpegError, EOFError, ValueError):
    pass  # truncated/corrupt container: keep whatever decoded so far
  for stream, sink in sinks.items():
    if not sink.done:
      feed(stream, None)  # drain frames buffered in the decoder


def square_image(img: Image.Image, image_size: int, frame_resize: str = "crop") -> np.ndarray:
  """An RGB PIL image -> (image_size, image_size, 3) uint8.

  "crop": short side resized to image_size (bilinear, antialiased), then centre crop.
  "squash": the whole image resized to image_size x image_size (bicubic).
  """
  if check_frame_resize(frame_resize) == "squash":
    return np.asarray(img.resize((image_size, image_size), Image.BICUBIC), dtype=np.uint8)
  w, h = img.size
  scale = image_size / min(w, h)
  nw, nh = max(image_size, round(w * scale)), max(image_size, round(h * scale))
  img = img.resize((nw, nh), Image.BILINEAR)
  left, top = (nw - image_size) // 2, (nh - image_size) // 2
  img = img.crop((left, top, left + image_size, top + image_size))
  return np.asarray(img, dtype=np.uint8)


def _second_pass(path, indices, video_seconds):
  """Re-decode video only, keeping exactly `indices` (estimate was off)."""
  with _open(path) as c:
    vs, _ = _streams(c, path, True, False)
    sampler = _VideoSampler(vs, video_seconds, set(indices))
    _run(c, vs, None, sampler, None)
  return sampler


def _decode(path, num_frames, image_size, sample_rate, max_seconds, want_video, want_audio,
            frame_resize="crop", downmix="mean", frame_span="first"):
  path = os.fspath(path)
  if num_frames < 1 or image_size < 1 or sample_rate < 1 or max_seconds <= 0:
    raise ValueError("num_frames, image_size, sample_rate, max_seconds must be positive")
  # Setting errors before any decoding.
  check_frame_resize(frame_resize)
  check_downmix(downmix)
  check_frame_span(frame_span)
  video_seconds = _video_seconds(max_seconds, frame_span)
  with _open(path) as c:
    vs, as_ = _streams(c, path, want_video, want_audio)
    sampler = audio = None
    if vs is not None:
      est = _estimate_total(c, vs, video_seconds)
      if est is None:
        # Unknown count: keep every frame of the first max_seconds, but only count a whole
        # stream (a long video's frames would not fit in memory); a second pass fetches them.
        keep = set() if frame_span == "whole" else None
      else:
        keep = _candidate_indices(est, num_frames, frame_span)
      sampler = _VideoSampler(vs, video_seconds, keep)
    if as_ is not None:
      audio = _AudioCollector(sample_rate, max_seconds, downmix)
    _run(c, vs, as_, sampler, audio)
    wave = audio.finish() if audio is not None else None

    frames = None
    if sampler is not None:
      if sampler.total == 0 and (wave is None or wave.size == 0):
        raise ClipError(path, "unreadable", "nothing could be decoded")
      if sampler.total == 0:
        raise ClipError(path, "no_frames", "video stream has no decodable frame")
      idx = frame_indices(sampler.total, num_frames, frame_span)
      if any(i not in sampler.kept for i in idx):
        sampler = _second_pass(path, idx, video_seconds)
        if not sampler.kept:
          raise ClipError(path, "no_frames", "no frame decoded on second pass")
        # Some decoders (e.g. theora with frame threads on a damaged
        # stream) are not repeatable: fall back to the nearest frame.
        have = np.array(sorted(sampler.kept))
        idx = [int(have[np.abs(have - i).argmin()]) for i in idx]
      frames = np.stack([square_image(sampler.kept[i].to_image(), image_size, frame_resize)
                         for i in idx])

  if wave is not None:
    if wave.size == 0 and frames is None:
      raise ClipError(path, "unreadable", "nothing could be decoded")
    if wave.size < MIN_AUDIO_SECONDS * sample_rate:
      raise ClipError(path, "audio_too_short",
                      f"{wave.size / sample_rate:.3f} s of audio < {MIN_AUDIO_SECONDS} s")
    if float(np.max(np.abs(wave))) < SILENCE_THRESHOLD:
      raise ClipError(path, "silent_audio", f"max |sample| < {SILENCE_THRESHOLD}")
  return frames, wave


# ---------------------------------------------------------------- windows


def window_starts(duration: float, window: float, hop: float) -> list[float]:
  """Start times (s) of the windows covering a file of `duration` seconds.

  Windows start at 0, hop, 2 hop, ... up to the first one that reaches the end of the file; a
  last window shorter than MIN_AUDIO_SECONDS (a tail of under 1 s) is dropped, unless it is
  the only one.
  """
  if window <= 0 or hop <= 0:
    raise ValueError(f"window and hop must be positive, got {window} and {hop}")
  starts, k = [0.0], 1
  while starts[-1] + window < duration - _TIME_EPS:
    start = float(k * hop)
    if start >= duration - _TIME_EPS or duration - start < MIN_AUDIO_SECONDS:
      break
    starts.append(start)
    k += 1
  return starts


@dataclass
class Window:
  """One window of a file: its frames and waveform, or why a modality is missing there."""
  start: float  # seconds from the start of the file
  seconds: float  # its length: the window's, or less for the last one
  frames: np.ndarray | None  # (num_frames, S, S, 3) uint8
  waveform: np.ndarray | None  # (N,) float32
  video_error: ClipError | None
  audio_error: ClipError | None


class _WindowSampler:
  """Counts the frames of every window in one pass (window k: [k hop, k hop + window) seconds
  from the first frame) and keeps those its sampling may need, found from an estimate of its
  frame count; a closed window's frames are made square at once, the rest dropped."""

  def __init__(self, vs, window, hop, num_frames, frame_span, image_size, frame_resize,
               duration):
    self.rate = _frame_rate(vs) or 30.0
    self.time_base = vs.time_base
    self.window, self.hop, self.duration = window, hop, duration
    self.num_frames, self.frame_span = num_frames, frame_span
    self.image_size, self.frame_resize = image_size, frame_resize
    self.total = 0
    self.origin = self.last = None
    self.first, self.count, self.keep = {}, {}, {}  # per open window
    self.kept = {}  # global frame index -> frame
    self.frames = {}  # window -> (num_frames, S, S, 3) uint8
    self.missing = {}  # window -> global indices the estimate did not keep
    self.done = False  # never: the whole stream is read

  def _estimate(self, k):
    seconds = self.window
    if self.duration:
      seconds = min(seconds, max(self.duration - k * self.hop, 0.0))
    return max(1, int(round(seconds * self.rate)))

  def _windows_at(self, t):
    out, k = [], int((t + _TIME_EPS) // self.hop)
    while k >= 0 and t < k * self.hop + self.window - _TIME_EPS:
      out.append(k)
      k -= 1
    return out

  def _close(self, k):
    first, count = self.first.pop(k), self.count.pop(k)
    del self.keep[k]
    wanted = [first + i for i in frame_indices(count, self.num_frames, self.frame_span)]
    if all(g in self.kept for g in wanted):
      self.frames[k] = np.stack([
          square_image(self.kept[g].to_image(), self.image_size, self.frame_resize)
          for g in wanted])
    else:
      self.missing[k] = wanted

  def _prune(self):
    lo = min(self.first.values(), default=self.total)
    for g in [g for g in self.kept if g < lo]:
      del self.kept[g]

  def add(self, frame):
    t = frame.time
    if t is None or t != t:  # frames drained from a threaded decoder can lack a time base
      t = (float(frame.pts * self.time_base) if frame.pts is not None and self.time_base
           else self.total / self.rate)  # no timestamps: assume a constant rate
    if self.origin is None:
      self.origin = t
    t -= self.origin
    g, self.last = self.total, t
    self.total += 1
    for k in [k for k in self.first if t >= k * self.hop + self.window - _TIME_EPS]:
      self._close(k)
    for k in self._windows_at(t):
      if k not in self.first:
        self.first[k], self.count[k] = g, 0
        self.keep[k] = _candidate_indices(self._estimate(k), self.num_frames, self.frame_span)
      if self.count[k] in self.keep[k]:
        self.kept[g] = frame
      self.count[k] += 1
    self._prune()

  def finish(self, path):
    for k in list(self.first):
      self._close(k)
    self.kept.clear()
    if self.missing:  # some estimate was off: fetch exactly those frames
      wanted = sorted({g for w in self.missing.values() for g in w})
      sampler = _second_pass(path, wanted, float("inf"))
      have = np.array(sorted(sampler.kept))
      for k, w in self.missing.items():
        if have.size:
          # As decode_clip: the nearest frame where a decoder does not repeat itself.
          w = [int(have[np.abs(have - g).argmin()]) for g in w]
          self.frames[k] = np.stack([
              square_image(sampler.kept[g].to_image(), self.image_size, self.frame_resize)
              for g in w])
      self.missing.clear()

  @property
  def seconds(self) -> float:
    return 0.0 if self.last is None else self.last + 1.0 / self.rate


def decode_windows(path, window: float = 10.0, hop: float | None = None, num_frames: int = 10,
                   image_size: int = 224, sample_rate: int = 16000, frame_resize: str = "crop",
                   downmix: str = "mean", frame_span: str = "first") -> list[Window]:
  """A whole file as windows of `window` seconds every `hop` (default: `window`) seconds.

  Each window is sampled as decode_clip samples a clip of its own: `num_frames` frames by
  `frame_span`'s rule among the frames inside it, and its audio samples. The windows are those
  of window_starts over the longer of the two streams; the last may be shorter. A window
  without frames or usable audio there says why (video_error, audio_error: ClipErrors as
  decode_clip raises them); a file that cannot be opened or yields nothing raises ClipError.
  The whole audio track and 10 frames per window are held in memory.
  """
  path = os.fspath(path)
  hop = window if hop is None else hop
  if window <= 0 or hop <= 0 or num_frames < 1 or image_size < 1 or sample_rate < 1:
    raise ValueError("window, hop, num_frames, image_size, sample_rate must be positive")
  check_frame_resize(frame_resize)
  check_downmix(downmix)
  check_frame_span(frame_span)
  with _open(path) as c:
    vs, as_ = _pick_stream(c.streams.video), _pick_stream(c.streams.audio)
    if vs is None and as_ is None:
      raise ClipError(path, "unreadable", "no audio or video stream")
    sampler = audio = None
    if vs is not None:
      vs.thread_type = "AUTO"
      dur = None
      if vs.duration and vs.time_base:
        dur = float(vs.duration * vs.time_base)
      elif c.duration:
        dur = c.duration / av.time_base
      sampler = _WindowSampler(vs, window, hop, num_frames, frame_span, image_size,
                               frame_resize, dur)
    if as_ is not None:
      as_.thread_type = "AUTO"
      audio = _AudioCollector(sample_rate, float("inf"), downmix)
    _run(c, vs, as_, sampler, audio)
  wave = audio.finish() if audio is not None else None
  if (sampler is None or sampler.total == 0) and (wave is None or wave.size == 0):
    raise ClipError(path, "unreadable", "nothing could be decoded")
  if sampler is not None:
    sampler.finish(path)
  duration = max(0.0 if sampler is None else sampler.seconds,
                 0.0 if wave is None else wave.size / sample_rate)
  out = []
  for start in window_starts(duration, window, hop):
    k = int(round(start / hop))
    seconds = min(window, duration - start)
    frames = video_error = None
    if sampler is None:
      video_error = ClipError(path, "no_video", "no video stream")
    elif k in sampler.frames:
      frames = sampler.frames[k]
    elif sampler.total == 0:
      video_error = ClipError(path, "no_frames", "video stream has no decodable frame")
    else:
      video_error = ClipError(path, "no_frames",
                              f"no video frame in {start:g}-{start + seconds:g} s")
    piece = audio_error = None
    if wave is None:
      audio_error = ClipError(path, "no_audio", "no audio stream")
    else:
      piece = wave[int(round(start * sample_rate)):int(round((start + window) * sample_rate))]
      if piece.size < MIN_AUDIO_SECONDS * sample_rate:
        audio_error = ClipError(
            path, "audio_too_short",
            f"{piece.size / sample_rate:.3f} s of audio < {MIN_AUDIO_SECONDS} s")
      elif float(np.max(np.abs(piece))) < SILENCE_THRESHOLD:
        audio_error = ClipError(path, "silent_audio", f"max |sample| < {SILENCE_THRESHOLD}")
      if audio_error is not None:
        piece = None
    out.append(Window(start, seconds, frames, piece, video_error, audio_error))
  return out


# ---------------------------------------------------------------- public API


def decode_clip(path, num_frames: int = 10, image_size: int = 224,
                sample_rate: int = 16000, max_seconds: float = 10.0,
                frame_resize: str = "crop", downmix: str = "mean",
                frame_span: str = "first") -> Clip:
  """Frames + audio of a video file; raises ClipError if either is unusable.

  `downmix`: one of records.DOWNMIXES; `frame_span`: one of records.FRAME_SPANS (the audio is
  the first max_seconds either way).
  """
  frames, wave = _decode(path, num_frames, image_size, sample_rate, max_seconds, True, True,
                         frame_resize, downmix, frame_span)
  return Clip(frames=frames, waveform=wave, duration=wave.size / sample_rate)


def decode_frames(path, num_frames: int = 10, image_size: int = 224,
                  max_seconds: float = 10.0, frame_resize: str = "crop",
                  frame_span: str = "first") -> np.ndarray:
  """(num_frames, S, S, 3) uint8 frames; the audio track is ignored."""
  frames, _ = _decode(path, num_frames, image_size, 16000, max_seconds, True, False,
                      frame_resize, frame_span=frame_span)
  return frames


def decode_audio(path, sample_rate: int = 16000, max_seconds: float = 10.0,
                 downmix: str = "mean") -> np.ndarray:
  """(N,) float32 mono waveform; the video track (if any) is ignored."""
  _, wave = _decode(path, 1, 1, sample_rate, max_seconds, False, True, downmix=downmix)
  return wave


def encode_jpeg(frame: np.ndarray, quality: int = 90) -> bytes:
  frame = np.asarray(frame)
  if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
    raise ValueError(f"expected (H, W, 3) uint8, got {frame.shape} {frame.dtype}")
  buf = io.BytesIO()
  Image.fromarray(frame, "RGB").save(buf, format="JPEG", quality=quality)
  return buf.getvalue()


def decode_jpeg(data: bytes) -> np.ndarray:
  with Image.open(io.BytesIO(data)) as img:
    return np.asarray(img.convert("RGB"), dtype=np.uint8)
