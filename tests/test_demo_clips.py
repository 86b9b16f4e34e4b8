"""Tests of the synthetic demo dataset writer."""
import csv
import json
import os

import av
import numpy as np
import pytest

from avsiam_jax.data import demo_clips as dc
from avsiam_jax.data.media import decode_clip

N_CLIPS = 8


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
  out = tmp_path_factory.mktemp("demo")
  json_path, csv_path = dc.write_demo_videos(out, N_CLIPS, num_classes=4, seed=3)
  return out, json_path, csv_path, dc.demo_clip_specs(N_CLIPS, 4, seed=3)


def test_json_and_csv_format(demo):
  out, json_path, csv_path, specs = demo
  assert os.path.isabs(json_path) and os.path.isabs(csv_path)
  with open(csv_path) as f:
    assert f.readline().strip() == "index,mid,display_name"
    f.seek(0)
    rows = list(csv.DictReader(f))
  assert [r["index"] for r in rows] == ["0", "1", "2", "3"]
  assert [r["mid"] for r in rows] == [f"/m/demo{k}" for k in range(4)]
  assert rows[0]["display_name"] == "red hum"
  assert len({r["display_name"] for r in rows}) == 4
  assert '0,/m/demo0,"red hum"' in open(csv_path).read()

  data = json.load(open(json_path))["data"]
  assert len(data) == N_CLIPS
  mids = {r["mid"] for r in rows}
  for entry, spec in zip(data, specs):
    assert set(entry) == {"video_id", "wav", "video_path", "labels"}
    assert entry["wav"] == entry["video_path"] and os.path.isfile(entry["video_path"])
    assert entry["video_id"] == spec.video_id
    assert set(entry["labels"].split(",")) <= mids
    assert entry["labels"] == f"/m/demo{spec.class_index}"
  assert not [p for p in os.listdir(os.path.join(out, "videos")) if p.endswith(".part")]


def test_streams_vary(demo):
  _, json_path, _, specs = demo
  data = json.load(open(json_path))["data"]
  seen = set()
  for entry, spec in zip(data, specs):
    with av.open(entry["video_path"]) as c:
      v, a = c.streams.video[0], c.streams.audio[0]
      assert (v.codec_context.width, v.codec_context.height) == (256, 224)
      assert v.codec_context.name in ("h264", "mpeg4") and a.codec_context.name == "aac"
      assert a.codec_context.sample_rate == spec.sample_rate
      seen.add((a.codec_context.sample_rate, a.codec_context.layout.nb_channels))
  assert seen == {(16000, 1), (16000, 2), (22050, 1), (22050, 2)}


def _dominant_hz(wave, sr=16000):
  spec = np.abs(np.fft.rfft(wave * np.hanning(len(wave))))
  return np.fft.rfftfreq(len(wave), 1 / sr)[spec.argmax()]


def _am_rate(wave, sr=16000):
  # Envelope: rectify, average in 10 ms blocks, then the 1-6 Hz spectral peak.
  env = np.abs(wave[: len(wave) // 160 * 160]).reshape(-1, 160).mean(axis=1)
  env = env - env.mean()
  n = 4096  # zero-pad for a finer frequency grid
  spec = np.abs(np.fft.rfft(env * np.hanning(len(env)), n))
  f = np.fft.rfftfreq(n, 1 / 100)
  band = (f > 1.0) & (f < 6.0)
  return f[band][spec[band].argmax()]


def test_content_carries_class_and_identity(demo):
  _, json_path, _, specs = demo
  data = json.load(open(json_path))["data"]
  palette = np.array([s[1] for s in dc.CLASS_STYLES[:4]], float)
  peaks = []
  for entry, spec in zip(data, specs):
    clip = decode_clip(entry["video_path"], num_frames=4, image_size=224)
    assert clip.waveform.shape[0] == pytest.approx(48000, abs=1024)

    # class colour: the background dominates the mean colour
    mean = clip.frames.reshape(-1, 3).astype(float).mean(axis=0)
    assert np.abs(palette - mean).sum(axis=1).argmin() == spec.class_index
    assert np.abs(mean - palette[spec.class_index]).max() < 25

    # identity in the picture: white disk centre tracks u and v (+-6 px wobble)
    for frame in clip.frames:
      ys, xs = np.nonzero(frame.min(axis=2) > 220)
      assert len(xs) == pytest.approx(np.pi * spec.radius ** 2, rel=0.15)
      x_lo = dc.DISK_RADIUS + 12  # crop removes 16 px from each side
      y_lo = dc.DISK_RADIUS + 12
      span = dc.HEIGHT - 2 * (dc.DISK_RADIUS + 12)
      assert xs.mean() == pytest.approx(x_lo + spec.u * span, abs=8)
      assert ys.mean() == pytest.approx(y_lo + spec.v * span, abs=8)
    assert clip.frames.std(axis=0).mean() > 1  # frames are not all equal

    # identity in the sound: pitch from u (noise band is +-6 % wide), AM rate from v
    tol = 0.07 if dc.CLASS_STYLES[spec.class_index][2] == "noise" else 0.02
    assert _dominant_hz(clip.waveform) == pytest.approx(spec.pitch_hz, rel=tol)
    assert _am_rate(clip.waveform) == pytest.approx(spec.am_rate_hz, abs=0.5)
    assert 0.05 < np.abs(clip.waveform).max() <= 1.0
    peaks.append((spec.amplitude, np.quantile(np.abs(clip.waveform), 0.999)))
  # Loudness follows u across clips, mono and stereo alike (the mean of the channels keeps the
  # level): the clip is scaled to its amplitude peak, which the codec blurs, so a high quantile
  # (RMS depends on the timbre too).
  assert np.corrcoef(np.array(peaks).T)[0, 1] > 0.9


def test_specs_deterministic_and_balanced():
  a = dc.demo_clip_specs(40, 4, seed=1)
  assert a == dc.demo_clip_specs(40, 4, seed=1)
  assert a != dc.demo_clip_specs(40, 4, seed=2)
  assert np.bincount([s.class_index for s in a]).tolist() == [10] * 4
  assert all(250 <= s.pitch_hz <= 4000 for s in a)
  with pytest.raises(ValueError):
    dc.demo_clip_specs(4, num_classes=len(dc.CLASS_STYLES) + 1)


def test_same_seed_same_files(tmp_path):
  j1, _ = dc.write_demo_videos(tmp_path / "a", 2, seconds=1.0, seed=5)
  j2, _ = dc.write_demo_videos(tmp_path / "b", 2, seconds=1.0, seed=5)
  for e1, e2 in zip(json.load(open(j1))["data"], json.load(open(j2))["data"]):
    assert open(e1["video_path"], "rb").read() == open(e2["video_path"], "rb").read()
