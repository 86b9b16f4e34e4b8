"""Tests of avsiam_jax.data.media on real and generated media files."""
import os
import pickle

import av
import iscc_samples  # real media (CC-BY-4.0), a test requirement
import numpy as np
import pytest
from PIL import Image

from avsiam_jax.data import media
from avsiam_jax.data.media import ClipError, decode_audio, decode_clip, decode_frames

SAMPLES = os.path.join(os.path.dirname(iscc_samples.__file__), "files", "video")


def _has_encoder(name):
  try:
    av.Codec(name, "w")
    return True
  except Exception:
    return False


def _digits_frame(i, h=48, w=64):
  """Uniform frame whose colour encodes index i (two base-16 digits)."""
  img = np.empty((h, w, 3), np.uint8)
  img[..., 0] = 8 + 16 * (i // 16)
  img[..., 1] = 8 + 16 * (i % 16)
  img[..., 2] = 128
  return img


def _read_digits(frames):
  rgb = frames.reshape(len(frames), -1, 3).mean(axis=1)
  return [int(round((r - 8) / 16)) * 16 + int(round((g - 8) / 16)) for r, g, _ in rgb]


def _moving_frame(i, h=48, w=64):
  img = np.zeros((h, w, 3), np.uint8)
  img[..., 2] = np.linspace(0, 255, w, dtype=np.uint8)[None, :]
  img[:, (5 * i) % w, :] = 255
  return img


def _sine(freq=440.0, amp=0.3):
  return lambda t: amp * np.sin(2 * np.pi * freq * t)


def write_media(path, *, fmt=None, vcodec="libx264", acodec="aac", seconds=2.0, fps=10,
                sample_rate=16000, layout="mono", audio_seconds=None, frame_fn=_moving_frame,
                wave_fn=_sine(), voptions=None, container_options=None, size=(64, 48)):
  """Writes a small test file; vcodec/acodec None leaves that stream out."""
  with av.open(str(path), "w", format=fmt, options=container_options or {}) as c:
    vs = a = None
    if vcodec:
      vs = c.add_stream(vcodec, rate=fps)
      vs.width, vs.height, vs.pix_fmt = size[0], size[1], "yuv420p"
      if voptions:
        vs.options = voptions
    if acodec:
      a = c.add_stream(acodec, rate=sample_rate, layout=layout)
    if vs is not None:
      for i in range(int(round(seconds * fps))):
        frame = av.VideoFrame.from_ndarray(frame_fn(i, size[1], size[0]), format="rgb24")
        c.mux(vs.encode(frame))
      c.mux(vs.encode(None))
    if a is not None:
      n = int(round((seconds if audio_seconds is None else audio_seconds) * sample_rate))
      t = np.arange(n) / sample_rate
      ch = av.AudioLayout(layout).nb_channels
      wave = np.broadcast_to(wave_fn(t), (ch, n)).astype(np.float32)
      frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(wave), format="fltp", layout=layout)
      frame.sample_rate, frame.pts = sample_rate, 0
      c.mux(a.encode(frame))
      c.mux(a.encode(None))
  return str(path)


def _dominant_hz(wave, sr=16000):
  spec = np.abs(np.fft.rfft(wave * np.hanning(len(wave))))
  return np.fft.rfftfreq(len(wave), 1 / sr)[spec.argmax()]


def _check_clip(clip, num_frames=10, size=224):
  assert clip.frames.shape == (num_frames, size, size, 3)
  assert clip.frames.dtype == np.uint8
  assert clip.waveform.dtype == np.float32 and clip.waveform.ndim == 1
  assert np.abs(clip.waveform).max() <= 1.0
  assert np.abs(clip.waveform).max() > 0.01  # not silent
  assert clip.duration == pytest.approx(len(clip.waveform) / 16000)
  assert len(np.unique(clip.frames.reshape(num_frames, -1).mean(axis=1).round(2))) > 1


# ------------------------------------------------------------ real files

# All of these have an audio track (checked with PyAV); demo.gif / demo.m1v have none.
@pytest.mark.parametrize("name", ["demo.mp4", "demo.webm", "demo.mkv", "demo.avi", "demo.mov"])
def test_iscc_samples_decode(name):
  clip = decode_clip(os.path.join(SAMPLES, name))
  _check_clip(clip)
  assert clip.waveform.shape == (160000,)  # the files are 60 s long: capped at 10 s
  assert clip.frames.std(axis=0).mean() > 5  # frames differ from each other


def test_iscc_samples_agree_across_containers():
  # Same content muxed differently must give (nearly) the same frames.
  a = decode_clip(os.path.join(SAMPLES, "demo.mp4"), image_size=64).frames.astype(float)
  b = decode_clip(os.path.join(SAMPLES, "demo.mkv"), image_size=64).frames.astype(float)
  assert np.abs(a - b).mean() < 3


@pytest.mark.parametrize("name", ["demo.gif", "demo.m1v"])
def test_iscc_samples_without_audio(name):
  path = os.path.join(SAMPLES, name)
  with pytest.raises(ClipError) as e:
    decode_clip(path)
  assert e.value.reason == "no_audio"
  frames = decode_frames(path, num_frames=4, image_size=32)
  assert frames.shape == (4, 32, 32, 3)


# ------------------------------------------------------------ generated files

CONTAINERS = [
    # (file name, vcodec, acodec, sample rate, layout)
    ("clip.mp4", "libx264", "aac", 22050, "stereo"),
    ("clip.webm", "libvpx-vp9", "libopus", 48000, "stereo"),
    ("clip.mkv", "libx264", "flac", 44100, "mono"),
    ("clip.avi", "mpeg4", "libmp3lame", 44100, "stereo"),
    ("clip.mov", "mpeg4", "pcm_s16le", 8000, "mono"),
]


@pytest.mark.parametrize("name,vcodec,acodec,sr,layout", CONTAINERS)
def test_containers(tmp_path, name, vcodec, acodec, sr, layout):
  for codec in (vcodec, acodec):
    if not _has_encoder(codec):
      pytest.skip(f"encoder {codec} not in this PyAV build")
  opts = {"deadline": "realtime", "cpu-used": "8"} if vcodec == "libvpx-vp9" else None
  path = write_media(tmp_path / name, vcodec=vcodec, acodec=acodec, sample_rate=sr,
                     layout=layout, seconds=2.0, voptions=opts)
  clip = decode_clip(path)
  _check_clip(clip)
  assert abs(len(clip.waveform) - 32000) <= 2048  # codec padding / priming
  assert _dominant_hz(clip.waveform) == pytest.approx(440, abs=5)


@pytest.mark.parametrize("layout", ["mono", "stereo", "5.1"])
@pytest.mark.parametrize("sr", [8000, 22050, 44100, 48000])
def test_resampling_to_16k_mono(tmp_path, sr, layout):
  path = write_media(tmp_path / "a.mkv", acodec="pcm_s16le", sample_rate=sr, layout=layout,
                     seconds=1.5, wave_fn=_sine(440.0, 0.25))
  wave = decode_clip(path, num_frames=2, image_size=16).waveform
  assert wave.dtype == np.float32 and wave.ndim == 1
  assert abs(len(wave) - 24000) <= 16  # pcm: exact up to resampler rounding
  assert 0.05 < np.abs(wave).max() <= 1.0
  assert _dominant_hz(wave) == pytest.approx(440, abs=3)


def test_one_channel_only_stereo(tmp_path):
  # The downmix must keep a sound that lives in the left channel only.
  wave_fn = lambda t: np.stack([0.3 * np.sin(2 * np.pi * 1000 * t), 0 * t])
  path = write_media(tmp_path / "a.mkv", acodec="pcm_s16le", sample_rate=44100,
                     layout="stereo", wave_fn=wave_fn)
  wave = decode_audio(path)
  assert _dominant_hz(wave) == pytest.approx(1000, abs=3)


def test_max_seconds_caps_audio(tmp_path):
  path = write_media(tmp_path / "a.mkv", acodec="pcm_s16le", sample_rate=22050, seconds=4.0)
  assert len(decode_clip(path, max_seconds=2.5).waveform) == 40000
  assert len(decode_audio(path, sample_rate=8000, max_seconds=1.25)) == 10000


LOSSLESS = {"qp": "0", "preset": "ultrafast"}


@pytest.mark.parametrize("n_frames,max_seconds,num_frames", [
    (37, 10.0, 10),   # fewer than 10 s: all 37 frames count
    (7, 10.0, 10),    # fewer frames than requested: repeats
    (250, 10.0, 10),  # 25 s clip: only the first 100 frames (10 s) count
    (37, 2.0, 10),
    (37, 10.0, 16),
])
def test_frame_index_rule(tmp_path, n_frames, max_seconds, num_frames):
  path = write_media(tmp_path / "f.mp4", seconds=n_frames / 10, fps=10, frame_fn=_digits_frame,
                     voptions=LOSSLESS, audio_seconds=max(1.5, n_frames / 10))
  frames = decode_clip(path, num_frames=num_frames, image_size=16, max_seconds=max_seconds).frames
  total = min(n_frames, int(round(max_seconds * 10)))
  assert _read_digits(frames) == [int(i * total / num_frames) for i in range(num_frames)]


@pytest.mark.parametrize("estimate", [None, 1, 5, 500])
def test_frame_index_rule_with_wrong_estimate(tmp_path, monkeypatch, estimate):
  # A wrong frame-count guess must only cost a second pass, never change frames.
  path = write_media(tmp_path / "f.mp4", seconds=3.7, frame_fn=_digits_frame, voptions=LOSSLESS)
  monkeypatch.setattr(media, "_estimate_total", lambda *a: estimate)
  frames = decode_frames(path, num_frames=10, image_size=16)
  assert _read_digits(frames) == [int(i * 37 / 10) for i in range(10)]


def test_resize_and_centre_crop(tmp_path):
  # 128x64 frame: left/right quarters red, centre half green -> crop is all green.
  def frame_fn(i, h, w):
    img = np.zeros((h, w, 3), np.uint8)
    img[..., 0] = 255
    img[:, w // 4: 3 * w // 4] = (0, 255, 0)
    return img
  path = write_media(tmp_path / "c.mp4", frame_fn=frame_fn, size=(128, 64), voptions=LOSSLESS)
  frames = decode_frames(path, num_frames=2, image_size=32)
  assert frames.shape == (2, 32, 32, 3)
  inner = frames[:, :, 2:-2].reshape(-1, 3).mean(axis=0)
  assert inner[1] > 200 and inner[0] < 40


def _pattern_frame(i, h, w):
  """A non-square frame with detail everywhere: crop and squash disagree on it."""
  y, x = np.mgrid[:h, :w]
  img = np.stack([(x * 255) // (w - 1), (y * 255) // (h - 1), ((x // 4 + y // 4) % 2) * 200
                  + 10 * i], axis=-1)
  return img.astype(np.uint8)


def _crop_reference(img, size):
  """CAV-MAE's way: short side to `size` (bilinear, antialiased), then centre crop."""
  w, h = img.size
  nw, nh = max(size, round(w * size / min(w, h))), max(size, round(h * size / min(w, h)))
  img = img.resize((nw, nh), Image.BILINEAR)
  left, top = (nw - size) // 2, (nh - size) // 2
  return np.asarray(img.crop((left, top, left + size, top + size)))


def _squash_reference(img, size):
  """The released AVSiam code's way: the whole frame to size x size, bicubic."""
  return np.asarray(img.resize((size, size), Image.BICUBIC))


def test_square_image_crop_and_squash():
  img = Image.fromarray(_pattern_frame(0, 48, 80))
  squash = media.square_image(img, 32, "squash")
  crop = media.square_image(img, 32)  # crop is the default
  assert squash.shape == crop.shape == (32, 32, 3) and squash.dtype == np.uint8
  np.testing.assert_array_equal(squash, _squash_reference(img, 32))
  np.testing.assert_array_equal(crop, _crop_reference(img, 32))
  np.testing.assert_array_equal(media.square_image(img, 32, "crop"), crop)
  assert np.abs(squash.astype(int) - crop).mean() > 10
  with pytest.raises(ValueError, match="'stretch'"):
    media.square_image(img, 32, "stretch")


def test_decoded_frames_crop_and_squash(tmp_path):
  path = write_media(tmp_path / "p.mp4", seconds=1.0, fps=10, frame_fn=_pattern_frame,
                     size=(80, 48), voptions=LOSSLESS)
  with av.open(path) as c:  # the full-size decoded frames, independently of media.py
    full = [f.to_image() for f in c.decode(video=0)]
  assert len(full) == 10  # 10 frames sampled from 10: every one, in order
  squash = decode_frames(path, num_frames=10, image_size=32, frame_resize="squash")
  crop = decode_clip(path, num_frames=10, image_size=32).frames
  np.testing.assert_array_equal(squash, np.stack([_squash_reference(f, 32) for f in full]))
  np.testing.assert_array_equal(crop, np.stack([_crop_reference(f, 32) for f in full]))
  np.testing.assert_array_equal(
      decode_clip(path, num_frames=10, image_size=32, frame_resize="squash").frames, squash)
  assert np.abs(squash.astype(int) - crop).mean() > 10


def test_bad_frame_resize_is_named(tmp_path):
  path = write_media(tmp_path / "p.mp4", seconds=1.0)
  for decode in (decode_clip, decode_frames):
    with pytest.raises(ValueError, match="frame_resize 'bicubic'.*'crop', 'squash'"):
      decode(path, frame_resize="bicubic")


def test_jpeg_roundtrip():
  img = np.zeros((40, 50, 3), np.uint8)
  img[:, :25] = (200, 30, 30)
  img[:, 25:] = (20, 40, 220)
  out = media.decode_jpeg(media.encode_jpeg(img, quality=95))
  assert out.shape == img.shape and out.dtype == np.uint8
  assert np.abs(out.astype(int) - img).mean() < 4
  with pytest.raises(ValueError):
    media.encode_jpeg(img.astype(np.float32))


def test_clip_error_pickles():
  e = pickle.loads(pickle.dumps(ClipError("/x/y.mp4", "no_audio", "no audio stream")))
  assert (e.path, e.reason) == ("/x/y.mp4", "no_audio")
  assert "/x/y.mp4" in str(e) and "no_audio" in str(e)


# ------------------------------------------------------------ bad inputs


def _truncate(path, frac=0.1):
  data = open(path, "rb").read()
  out = path + ".cut.mp4"
  open(out, "wb").write(data[: int(len(data) * frac)])
  return out


def _bad_cases(tmp_path):
  rng = np.random.default_rng(0)
  (tmp_path / "random.mp4").write_bytes(rng.integers(0, 256, 100_000, dtype=np.uint8).tobytes())
  (tmp_path / "empty.mp4").write_bytes(b"")
  (tmp_path / "text.mp4").write_text("hello, not a video\n")
  good = write_media(tmp_path / "good.mp4", seconds=3.0)
  return {
      "missing": (str(tmp_path / "nope.mp4"), "missing_file"),
      "directory": (str(tmp_path), "missing_file"),
      "random_bytes": (str(tmp_path / "random.mp4"), "unreadable"),
      "empty": (str(tmp_path / "empty.mp4"), "unreadable"),
      "text": (str(tmp_path / "text.mp4"), "unreadable"),
      # moov atom at the end (PyAV default): the cut file cannot be opened.
      "truncated": (_truncate(good), "unreadable"),
      "no_audio": (write_media(tmp_path / "v.mp4", acodec=None), "no_audio"),
      "no_video": (write_media(tmp_path / "a.m4a", fmt="mp4", vcodec=None), "no_video"),
      "no_video_wav": (write_media(tmp_path / "a.wav", vcodec=None, acodec="pcm_s16le"),
                       "no_video"),
      "silent": (write_media(tmp_path / "s.mp4", wave_fn=lambda t: 0 * t), "silent_audio"),
      "short_audio": (write_media(tmp_path / "sh.mp4", seconds=3.0, audio_seconds=0.5),
                      "audio_too_short"),
  }


BAD = ["missing", "directory", "random_bytes", "empty", "text", "truncated", "no_audio",
       "no_video", "no_video_wav", "silent", "short_audio"]


@pytest.fixture(scope="module")
def bad_cases(tmp_path_factory):
  return _bad_cases(tmp_path_factory.mktemp("bad"))


@pytest.mark.parametrize("case", BAD)
def test_bad_inputs(bad_cases, case):
  path, reason = bad_cases[case]
  with pytest.raises(ClipError) as e:
    decode_clip(path)
  assert e.value.reason == reason
  assert e.value.path == path
  assert reason in str(e.value) and os.path.basename(path) in str(e.value)


def test_helpers_need_only_their_stream(bad_cases):
  frames = decode_frames(bad_cases["no_audio"][0], num_frames=3, image_size=16)
  assert frames.shape == (3, 16, 16, 3)
  assert abs(len(decode_audio(bad_cases["no_video"][0])) - 32000) <= 2048  # aac padding
  with pytest.raises(ClipError) as e:
    decode_frames(bad_cases["no_video"][0])
  assert e.value.reason == "no_video"
  with pytest.raises(ClipError) as e:
    decode_audio(bad_cases["no_audio"][0])
  assert e.value.reason == "no_audio"


def test_truncated_file_with_index_up_front(tmp_path):
  # With the index (moov) at the front, a cut file still decodes the frames
  # that survive; they are sampled from what decodes (rule: only zero
  # decodable frames is an error).
  path = write_media(tmp_path / "long.mp4", seconds=20.0, frame_fn=_digits_frame,
                     voptions=LOSSLESS, container_options={"movflags": "faststart"})
  cut = _truncate(path)
  frames = decode_frames(cut, num_frames=10, image_size=16)
  idx = _read_digits(frames)
  assert frames.shape == (10, 16, 16, 3)
  assert idx == sorted(idx) and idx[0] == 0 and idx[-1] < 90  # fewer than 100 frames
  with pytest.raises(ClipError) as e:
    decode_clip(cut)  # the audio that survives is too short
  assert e.value.reason in ("audio_too_short", "no_frames", "unreadable")


# ------------------------------------------------------------ down-mix
# References are analytic: the channels written, mixed in numpy. FFmpeg's own mono down-mix
# (the earlier decoder) gives (L+R)/sqrt(2) for stereo, which every test here tells apart.

LAYOUTS = {1: "mono", 2: "stereo", 6: "5.1"}


def _signal(n, sr=16000, seed=0, amp=1.0):
  """Two tones plus a little noise, |x| < 0.7 * amp: every mel band has energy."""
  t = np.arange(n) / sr
  noise = np.random.default_rng(seed).standard_normal(n)
  x = 0.4 * np.sin(2 * np.pi * 440 * t) + 0.2 * np.sin(2 * np.pi * 1234 * t + seed) + 0.02 * noise
  return (amp * x).astype(np.float32)


def _write_wav(path, channels, sample_rate=16000):
  """A float32 WAV holding `channels` (C, N) exactly (pcm_f32le)."""
  channels = np.ascontiguousarray(channels, np.float32)
  layout = LAYOUTS[len(channels)]
  with av.open(str(path), "w", format="wav") as c:
    a = c.add_stream("pcm_f32le", rate=sample_rate, layout=layout)
    frame = av.AudioFrame.from_ndarray(channels, format="fltp", layout=layout)
    frame.sample_rate, frame.pts = sample_rate, 0
    c.mux(a.encode(frame))
    c.mux(a.encode(None))
  return str(path)


def _rms(x):
  return float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))


def test_stereo_wav_decodes_to_the_mean_of_its_channels(tmp_path):
  x = _signal(24000)
  path = _write_wav(tmp_path / "s.wav", [x, 0.5 * x])
  wave = decode_audio(path)
  want = 0.75 * x  # (L + R) / 2; FFmpeg's mono mix gave 1.06 x
  assert wave.shape == want.shape and wave.dtype == np.float32
  assert abs(_rms(wave) / _rms(want) - 1) < 1e-4
  np.testing.assert_allclose(wave, want, atol=1e-6)
  np.testing.assert_array_equal(decode_audio(path, downmix="mean"), wave)


def test_stereo_track_of_a_video_decodes_to_the_mean(tmp_path):
  # decode_clip on an mkv (video + 16-bit PCM stereo): quantization error <= 2**-15.
  wave_fn = lambda t: np.stack([_signal(len(t)), 0.5 * _signal(len(t))])
  path = write_media(tmp_path / "s.mkv", acodec="pcm_s16le", layout="stereo", seconds=1.5,
                     wave_fn=wave_fn)
  want = 0.75 * _signal(24000)
  clip = decode_clip(path, num_frames=2, image_size=16)
  assert clip.waveform.shape == want.shape
  assert abs(_rms(clip.waveform) / _rms(want) - 1) < 1e-4
  np.testing.assert_allclose(clip.waveform, want, atol=1e-4)
  first = decode_clip(path, num_frames=2, image_size=16, downmix="first").waveform
  np.testing.assert_allclose(first, _signal(24000), atol=1e-4)


@pytest.mark.parametrize("downmix", ["mean", "first"])
def test_mono_is_unchanged(tmp_path, downmix):
  x = _signal(20000)
  np.testing.assert_array_equal(decode_audio(_write_wav(tmp_path / "m.wav", [x]),
                                             downmix=downmix), x)


def test_51_decodes_to_the_mean_of_its_six_channels(tmp_path):
  # Six different channels (LFE included): FFmpeg's 5.1 -> mono matrix weighs them unequally.
  chans = np.stack([_signal(20000, seed=k, amp=0.3 + 0.1 * k) for k in range(6)])
  path = _write_wav(tmp_path / "s.wav", chans)
  want = chans.mean(axis=0)
  wave = decode_audio(path)
  assert abs(_rms(wave) / _rms(want) - 1) < 1e-4
  np.testing.assert_allclose(wave, want, atol=1e-6)
  np.testing.assert_array_equal(decode_audio(path, downmix="first"), chans[0])


def test_first_keeps_the_left_channel(tmp_path):
  x, y = _signal(20000, seed=1), _signal(20000, seed=2, amp=0.5)
  path = _write_wav(tmp_path / "s.wav", [x, y])
  np.testing.assert_array_equal(decode_audio(path, downmix="first"), x)
  np.testing.assert_allclose(decode_audio(path), (x + y) / 2, atol=1e-6)


def test_fbank_of_stereo_is_the_fbank_of_the_mean(tmp_path):
  from avsiam_jax.data.fbank import fbank  # pylint: disable=import-outside-toplevel
  x = _signal(32000)
  got = fbank(decode_audio(_write_wav(tmp_path / "s.wav", [x, 0.5 * x])))
  want = fbank(0.75 * x)
  np.testing.assert_allclose(got, want, atol=1e-4)
  # The earlier mix, (L+R)/sqrt(2) = sqrt(2) times the mean: log-mels ln 2 higher (in bands
  # above the energy floor; the lowest mel filters hold no FFT bin).
  earlier = fbank((x + 0.5 * x) / np.sqrt(2, dtype=np.float32))
  above = want > -10
  assert above.mean() > 0.9
  np.testing.assert_allclose((earlier - want)[above], np.log(2), atol=1e-3)


def test_44k_stereo_resampled_keeps_the_mean_level(tmp_path):
  n = 44100 * 3 // 2
  x, y = _signal(n, 44100, seed=3), _signal(n, 44100, seed=4, amp=0.6)
  stereo = decode_audio(_write_wav(tmp_path / "s.wav", [x, y], 44100))
  mono = decode_audio(_write_wav(tmp_path / "m.wav", [(x + y) / 2], 44100))
  assert stereo.shape == mono.shape and abs(len(stereo) - 24000) <= 16
  assert abs(_rms(stereo) / _rms(mono) - 1) < 1e-3
  np.testing.assert_allclose(stereo, mono, atol=1e-5)  # resampling is linear


def test_layout_change_mid_stream_mixes_each_chunk():
  # Stereo, then mono, then stereo frames: each chunk is mixed in its own layout.
  x = _signal(3000)

  def frame(chans, sr):
    f = av.AudioFrame.from_ndarray(np.ascontiguousarray(chans, np.float32), format="fltp",
                                   layout=LAYOUTS[len(chans)])
    f.sample_rate = sr
    return f

  for sr in (16000, 44100):
    audio = media._AudioCollector(16000, 10.0)  # pylint: disable=protected-access
    for chans in ([x, 0.5 * x], [x], [x, 0 * x]):
      audio.add(frame(chans, sr))
    wave = audio.finish()
    if sr == 16000:
      np.testing.assert_allclose(wave, np.concatenate([0.75 * x, x, 0.5 * x]), atol=1e-7)
    else:
      assert abs(len(wave) - 3 * 3000 * 16000 / 44100) <= 64
  first = media._AudioCollector(16000, 10.0, "first")  # pylint: disable=protected-access
  first.add(frame([0.5 * x, x], 16000))
  np.testing.assert_array_equal(first.finish(), 0.5 * x)


def test_bad_downmix_is_named_before_decoding(tmp_path):
  for path in (_write_wav(tmp_path / "m.wav", [_signal(20000)]), str(tmp_path / "nope.wav")):
    with pytest.raises(ValueError, match="downmix 'sum': expected one of 'mean', 'first'"):
      decode_audio(path, downmix="sum")
    with pytest.raises(ValueError, match="downmix 'sum'"):
      decode_clip(path, downmix="sum")
  with pytest.raises(ValueError, match="downmix 'sum'"):
    media.downmix_channels(np.zeros((2, 4)), "sum")


# ------------------------------------------------------------ frame span


def test_whole_frame_span_samples_the_whole_video(tmp_path):
  # 20 s at 10 fps, frame colour = frame index; the audio stays the first 10 s.
  path = write_media(tmp_path / "long.mp4", seconds=20.0, frame_fn=_digits_frame,
                     voptions=LOSSLESS)
  clip = decode_clip(path, num_frames=10, image_size=16, frame_span="whole")
  want = np.linspace(0, 199, 10).astype(int).tolist()
  assert _read_digits(clip.frames) == want and want[-1] == 199
  assert clip.waveform.shape == (160000,)
  first = decode_clip(path, num_frames=10, image_size=16)  # the default: the first 10 s
  assert _read_digits(first.frames) == [int(i * 100 / 10) for i in range(10)]
  assert _read_digits(decode_frames(path, num_frames=10, image_size=16,
                                    frame_span="whole")) == want


@pytest.mark.parametrize("estimate", [None, 5, 500])
def test_whole_frame_span_with_wrong_estimate(tmp_path, monkeypatch, estimate):
  path = write_media(tmp_path / "f.mp4", seconds=12.3, frame_fn=_digits_frame, voptions=LOSSLESS)
  monkeypatch.setattr(media, "_estimate_total", lambda *a: estimate)
  frames = decode_frames(path, num_frames=10, image_size=16, frame_span="whole")
  assert _read_digits(frames) == np.linspace(0, 122, 10).astype(int).tolist()


def test_frame_indices_rules():
  assert media.frame_indices(200, 10) == list(range(0, 200, 20))
  assert media.frame_indices(200, 10, "whole") == [0, 22, 44, 66, 88, 110, 132, 154, 176, 199]
  assert media.frame_indices(3, 5, "whole") == [0, 0, 1, 1, 2]  # repeats
  assert media.frame_indices(7, 1, "whole") == [0]
  with pytest.raises(ValueError, match="frame_span 'all': expected one of 'first', 'whole'"):
    media.frame_indices(7, 1, "all")
