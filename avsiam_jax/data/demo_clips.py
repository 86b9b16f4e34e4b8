"""A small synthetic audio-visual dataset of real video files (for the demo).

Each clip is an mp4 (h264 or mpeg4 video, aac audio) in which both the
picture and the sound carry
  * the class k: background colour <-> timbre (sine / odd harmonics /
    harmonic stack / band-limited noise bursts), and
  * a per-clip identity (u, v): the horizontal position and the size of a white
    disk <-> the pitch (log scale 250-4000 Hz, so it spans many mel bins) and the
    loudness; the disk's vertical position <-> the amplitude-modulation rate,
so that matching a clip's audio to its own video is learnable by a tiny ViT
from a 128-bin mel spectrogram and a small (64x64) frame.

Audio sample rate (16 / 22.05 kHz) and layout (mono / stereo) vary across
clips so that the decoder's resampling path is exercised; frames are 256x224 so
that the centre crop is exercised too.  Output is deterministic for a seed.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Callable

import av
import numpy as np

WIDTH, HEIGHT = 256, 224
PITCH_LO, PITCH_HI = 250.0, 4000.0
# Size and loudness both grow with u: a cue a mean-pooled ViT picks up in a few hundred steps,
# while position <-> pitch takes longer to learn.
AMPLITUDE_LO, AMPLITUDE_HI = 0.12, 0.5
DISK_RADIUS_LO, DISK_RADIUS = 18, 44
# (colour name, background RGB, timbre, word used in the display name).
# Backgrounds are kept darkish so the white disk always has high contrast.
CLASS_STYLES = (
    ("red", (190, 30, 30), "sine", "hum"),
    ("green", (30, 150, 50), "odd", "buzz"),
    ("blue", (40, 60, 200), "stack", "drone"),
    ("yellow", (170, 150, 20), "noise", "hiss"),
    ("purple", (120, 40, 150), "sine", "hum"),
    ("cyan", (20, 140, 150), "odd", "buzz"),
    ("orange", (200, 100, 20), "stack", "drone"),
    ("gray", (100, 100, 100), "noise", "hiss"),
)
# (sample rate, layout) cycled over clips.
AUDIO_FORMATS = ((16000, "mono"), (22050, "stereo"), (16000, "stereo"), (22050, "mono"))


@dataclass(frozen=True)
class DemoClipSpec:
  index: int
  video_id: str
  class_index: int
  u: float  # disk x position and size <-> pitch and loudness
  v: float  # disk y position <-> AM rate
  pitch_hz: float
  am_rate_hz: float
  radius: float
  amplitude: float
  sample_rate: int
  layout: str


def class_display_name(k: int) -> str:
  colour, _, _, word = CLASS_STYLES[k]
  return f"{colour} {word}"


def class_mid(k: int) -> str:
  return f"/m/demo{k}"


def demo_clip_specs(num_clips: int, num_classes: int = 4, seed: int = 0) -> list[DemoClipSpec]:
  """The per-clip parameters `write_demo_videos` renders (for tests/inspection)."""
  if not 1 <= num_classes <= len(CLASS_STYLES):
    raise ValueError(f"num_classes must be in 1..{len(CLASS_STYLES)}")
  rng = np.random.default_rng(seed)
  classes = rng.permutation(np.arange(num_clips) % num_classes)  # balanced
  uv = rng.uniform(0.0, 1.0, size=(num_clips, 2))
  specs = []
  for i in range(num_clips):
    u, v = float(uv[i, 0]), float(uv[i, 1])
    sr, layout = AUDIO_FORMATS[i % len(AUDIO_FORMATS)]
    specs.append(DemoClipSpec(
        index=i, video_id=f"demo_{i:05d}", class_index=int(classes[i]), u=u, v=v,
        pitch_hz=PITCH_LO * (PITCH_HI / PITCH_LO) ** u, am_rate_hz=1.5 + 3.0 * v,
        radius=DISK_RADIUS_LO + (DISK_RADIUS - DISK_RADIUS_LO) * u,
        amplitude=AMPLITUDE_LO + (AMPLITUDE_HI - AMPLITUDE_LO) * u,
        sample_rate=sr, layout=layout))
  return specs


# ---------------------------------------------------------------- rendering


def _sound(spec: DemoClipSpec, seconds: float, rng) -> np.ndarray:
  sr, f = spec.sample_rate, spec.pitch_hz
  n = int(round(seconds * sr))
  t = np.arange(n) / sr
  top = min(sr / 2, 8000.0) * 0.9  # no harmonics above the 16 kHz Nyquist
  timbre = CLASS_STYLES[spec.class_index][2]
  phase = rng.uniform(0, 2 * np.pi)
  if timbre == "sine":
    x = np.sin(2 * np.pi * f * t + phase)
  elif timbre in ("odd", "stack"):
    ks = range(1, 16, 2) if timbre == "odd" else range(1, 9)
    x = np.zeros(n)
    for k in ks:
      if k * f >= top:
        break
      w = 1.0 / k if timbre == "odd" else 0.7 ** (k - 1)
      x += w * np.sin(2 * np.pi * k * f * t + k * phase)
  else:  # noise band of +-6 % around the pitch, shaped in the FFT domain
    spec_ = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n, 1 / sr)
    spec_[(freqs < f / 1.06) | (freqs > f * 1.06)] = 0
    x = np.fft.irfft(spec_, n)
  am = np.sin(2 * np.pi * spec.am_rate_hz * t + rng.uniform(0, 2 * np.pi))
  if timbre == "noise":  # bursts: gate on/off at the AM rate, 10 ms ramps
    gate = (am > -0.2).astype(np.float64)
    ramp = max(1, int(0.01 * sr))
    env = 0.1 + 0.9 * np.convolve(gate, np.ones(ramp) / ramp, mode="same")
  else:
    env = 0.6 + 0.4 * am
  x = x * env
  x *= spec.amplitude / (np.max(np.abs(x)) + 1e-9)
  channels = 1 if spec.layout == "mono" else 2
  out = x[None, :] + 0.01 * rng.standard_normal((channels, n))
  return np.clip(out, -1, 1).astype(np.float32)


class _Painter:
  def __init__(self):
    self.yy, self.xx = np.mgrid[0:HEIGHT, 0:WIDTH]

  def frames(self, spec: DemoClipSpec, seconds: float, fps: int, rng):
    bg = np.array(CLASS_STYLES[spec.class_index][1], np.int16)
    # Keep the largest disk inside the 224x224 centre crop, even with the wobble.
    x_lo, x_hi = (WIDTH - HEIGHT) // 2 + DISK_RADIUS + 12, (WIDTH + HEIGHT) // 2 - DISK_RADIUS - 12
    y_lo, y_hi = DISK_RADIUS + 12, HEIGHT - DISK_RADIUS - 12
    cx0 = x_lo + spec.u * (x_hi - x_lo)
    cy0 = y_lo + spec.v * (y_hi - y_lo)
    ph = rng.uniform(0, 2 * np.pi, size=2)
    for j in range(int(round(seconds * fps))):
      s = 2 * np.pi * j / (seconds * fps)
      cx, cy = cx0 + 6 * np.sin(s + ph[0]), cy0 + 6 * np.sin(s + ph[1])
      img = np.empty((HEIGHT, WIDTH, 3), np.int16)
      img[:] = bg
      img[(self.xx - cx) ** 2 + (self.yy - cy) ** 2 < spec.radius ** 2] = 255
      # 4x4-block grey noise: visible, yet cheap to render and encode.
      noise = rng.integers(-8, 9, size=(HEIGHT // 4, WIDTH // 4, 1), dtype=np.int16)
      img += noise.repeat(4, axis=0).repeat(4, axis=1)
      yield np.clip(img, 0, 255).astype(np.uint8)


def _video_codec() -> str:
  try:
    av.Codec("libx264", "w")
    return "libx264"
  except Exception:  # builds without x264
    return "mpeg4"


def _write_clip(path, spec, seconds, fps, painter, seed):
  rng = np.random.default_rng([seed, spec.index])
  vcodec = _video_codec()
  tmp = path + ".part"
  with av.open(tmp, "w", format="mp4") as c:
    vs = c.add_stream(vcodec, rate=fps)
    vs.width, vs.height, vs.pix_fmt = WIDTH, HEIGHT, "yuv420p"
    if vcodec == "libx264":
      vs.options = {"preset": "ultrafast", "crf": "23"}  # 4x faster than veryfast
    else:
      vs.bit_rate = 1_000_000
    vs.codec_context.thread_count = 1  # tiny frames: threads only add overhead
    as_ = c.add_stream("aac", rate=spec.sample_rate, layout=spec.layout)
    as_.bit_rate = 64_000
    for img in painter.frames(spec, seconds, fps, rng):
      c.mux(vs.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
    c.mux(vs.encode(None))
    wave = _sound(spec, seconds, rng)
    frame = av.AudioFrame.from_ndarray(wave, format="fltp", layout=spec.layout)
    frame.sample_rate, frame.pts = spec.sample_rate, 0
    c.mux(as_.encode(frame))  # PyAV splits it into codec-sized frames
    c.mux(as_.encode(None))
  os.replace(tmp, path)


def write_demo_videos(out_dir, num_clips: int, num_classes: int = 4, seconds: float = 3.0,
                      fps: int = 10, seed: int = 0,
                      progress: Callable[[int], None] | None = None) -> tuple[str, str]:
  """Writes `num_clips` mp4 files plus a dataset JSON and a label CSV.

  Returns (json_path, csv_path).  The JSON is written last, so its presence
  means every video is complete.  `progress(n)` is called after the n-th clip.
  """
  out_dir = os.path.abspath(os.fspath(out_dir))
  video_dir = os.path.join(out_dir, "videos")
  os.makedirs(video_dir, exist_ok=True)
  specs = demo_clip_specs(num_clips, num_classes, seed)
  painter = _Painter()
  data = []
  for spec in specs:
    path = os.path.join(video_dir, spec.video_id + ".mp4")
    _write_clip(path, spec, seconds, fps, painter, seed)
    data.append({"video_id": spec.video_id, "wav": path, "video_path": path,
                 "labels": class_mid(spec.class_index)})
    if progress:
      progress(len(data))

  csv_path = os.path.join(out_dir, "demo_class_labels_indices.csv")
  with open(csv_path, "w") as f:
    f.write("index,mid,display_name\n")
    for k in range(num_classes):
      f.write(f'{k},{class_mid(k)},"{class_display_name(k)}"\n')
  json_path = os.path.join(out_dir, "demo_data.json")
  tmp = json_path + ".part"
  with open(tmp, "w") as f:
    json.dump({"data": data}, f, indent=1)
  os.replace(tmp, json_path)
  return json_path, csv_path
