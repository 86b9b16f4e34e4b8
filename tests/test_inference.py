"""Inference: run-dir loading, clip preparation vs the eval pipeline, Predictor, Embedder, CLIs."""
import json
import os
import shutil
import subprocess
import sys

import av
import iscc_samples  # real media (CC-BY-4.0), a test requirement
import jax
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from avsiam_jax import checkpoint, embed, inference, predict
from avsiam_jax.config import model_spec
from avsiam_jax.data import clips, media, pipeline
from avsiam_jax.models.avsiam import AVSiam
from avsiam_jax.models.classifier import AVSiamClassifier, ClassifierSpec
from configs import demo
from data_prep import build

SAMPLES = os.path.join(os.path.dirname(iscc_samples.__file__), "files", "video")
MP4 = os.path.join(SAMPLES, "demo.mp4")
GIF = os.path.join(SAMPLES, "demo.gif")  # no audio stream
LABELS = ["dog", "cat", "bird"]
FRAMES, SIZE = 128, 32


def _config(mode, loss=None):
  c = demo.get_config()
  c.mode = mode
  c.model.update(variant="test", image_size=SIZE, audio_frames=FRAMES, decoder_width=32,
                 decoder_depth=1, decoder_heads=2)
  if loss is not None:
    if "finetune" not in c:
      c.finetune = ml_collections.ConfigDict()
    c.finetune.loss = loss
  return c


def _random_params(abstract, seed):
  """numpy values for every parameter: quicker than an initializer's compile, and heads that
  score classes differently (fresh heads would give near-equal scores)."""
  rng = np.random.default_rng(seed)

  def value(path, s):
    x = rng.normal(0.0, 0.1, s.shape).astype(s.dtype)
    return x + 1 if path[-1].key == "scale" else x

  return jax.tree_util.tree_map_with_path(value, abstract)


def _write_run(workdir, config, make_model, steps, labels=None):
  """A run dir in the trainer's layout; returns {step: (model, params)}."""
  os.makedirs(workdir)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort())
  if labels is not None:
    with open(os.path.join(workdir, "label_names.json"), "w") as f:
      json.dump(labels, f)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), every_steps=1, keep=5)
  graphdef, abstract = nnx.split(nnx.eval_shape(make_model))
  out = {}
  for step in steps:
    params = _random_params(nnx.to_pure_dict(abstract), step)
    state = jax.tree.map(lambda x: x, abstract)  # a fresh State to fill
    nnx.replace_by_pure_dict(state, params)
    # An Adam state in numpy (no compile): the restore must skip it.
    zeros = jax.tree.map(np.zeros_like, params)
    opt = (optax.ScaleByAdamState(np.zeros((), np.int32), zeros, zeros), optax.EmptyState())
    ckpt.save(step, {"params": params, "opt": {"contrastive": opt}, "step": np.int32(step)},
              {"next_position": step})
    out[step] = (nnx.merge(graphdef, state), params)
  ckpt.close()
  return out


def _classifier_maker(config):
  spec = ClassifierSpec(encoder=model_spec(config.model).encoder, num_classes=len(LABELS),
                        mm_depth=config.model.mm_depth)
  return lambda: AVSiamClassifier(spec, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("runs")
  bce, ce, pre = _config("finetune", "bce"), _config("finetune", "ce"), _config("pretrain")
  return {
      "bce": (str(root / "bce"), _write_run(str(root / "bce"), bce, _classifier_maker(bce),
                                            [3, 5], LABELS)),
      "ce": (str(root / "ce"), _write_run(str(root / "ce"), ce, _classifier_maker(ce), [1],
                                          LABELS)),
      "pre": (str(root / "pre"), _write_run(
          str(root / "pre"), pre, lambda: AVSiam(model_spec(pre.model), rngs=nnx.Rngs(0)), [2])),
  }


@pytest.fixture(scope="module")
def media_files(tmp_path_factory):
  d = tmp_path_factory.mktemp("media")
  wav = str(d / "tone.wav")  # audio only
  with av.open(wav, "w") as c:
    s = c.add_stream("pcm_s16le", rate=16000, layout="mono")
    t = np.arange(32000) / 16000
    x = (0.3 * np.sin(2 * np.pi * 440 * t) * 32767).astype(np.int16)[None]
    frame = av.AudioFrame.from_ndarray(x, format="s16", layout="mono")
    frame.sample_rate = 16000
    c.mux(s.encode(frame))
    c.mux(s.encode(None))
  silent = str(d / "silent.mkv")  # video plus an all-zero audio track
  with av.open(silent, "w") as c:
    vs = c.add_stream("mpeg4", rate=10)
    vs.width, vs.height, vs.pix_fmt = 64, 48, "yuv420p"
    s = c.add_stream("pcm_s16le", rate=16000, layout="mono")
    for i in range(15):
      img = np.full((48, 64, 3), 10 * i, np.uint8)
      c.mux(vs.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
    c.mux(vs.encode(None))
    frame = av.AudioFrame.from_ndarray(np.zeros((1, 24000), np.int16), format="s16",
                                       layout="mono")
    frame.sample_rate = 16000
    c.mux(s.encode(frame))
    c.mux(s.encode(None))
  broken = str(d / "broken.mp4")
  with open(broken, "wb") as f:
    f.write(np.random.default_rng(0).integers(0, 256, 50_000, dtype=np.uint8).tobytes())
  return {"wav": wav, "silent": silent, "broken": broken}


def _write_lossless(path, frames, audio, fps=25, rate=16000):
  """FFV1 video (each frame coded alone, losslessly) and PCM audio: a file cut into parts
  decodes to exactly the parts' frames and samples."""
  with av.open(path, "w") as c:
    vs = c.add_stream("ffv1", rate=fps)
    vs.width, vs.height, vs.pix_fmt = frames.shape[2], frames.shape[1], "yuv444p"
    s = c.add_stream("pcm_s16le", rate=rate, layout="mono")
    for f in frames:
      c.mux(vs.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
    c.mux(vs.encode(None))
    for i in range(0, audio.size, rate // 10):
      frame = av.AudioFrame.from_ndarray(audio[None, i:i + rate // 10], format="s16",
                                         layout="mono")
      frame.sample_rate = rate
      c.mux(s.encode(frame))
    c.mux(s.encode(None))
  return path


PARTS = [(0, 10), (10, 20), (20, 25)]  # seconds: two whole windows and a shorter last one


@pytest.fixture(scope="module")
def long_file(tmp_path_factory):
  """A 25 s file (64 x 48 frames whose colour and bar move, a tone whose pitch changes every
  10 s, silent from 10 to 20 s) and its three parts as files of their own."""
  d, fps, rate = tmp_path_factory.mktemp("long"), 25, 16000
  frames = np.zeros((25 * fps, 48, 64, 3), np.uint8)
  for i in range(len(frames)):
    frames[i] = (7 * i) % 256
    frames[i, :, i % 64] = 255
  t = np.arange(25 * rate) / rate
  audio = 0.3 * np.sin(2 * np.pi * (300 + 200 * (t // 10)) * t) * ((t < 10) | (t >= 20))
  audio = (audio * 32767).astype(np.int16)
  parts = [_write_lossless(str(d / f"part{k}.mkv"), frames[a * fps:b * fps],
                           audio[a * rate:b * rate]) for k, (a, b) in enumerate(PARTS)]
  return _write_lossless(str(d / "long.mkv"), frames, audio), parts


@pytest.fixture(scope="module")
def predictor(runs):
  return inference.Predictor.load(runs["bce"][0])


# The classifier's own call, compiled (op-by-op eager dispatch compiles every op: slower).
_av = nnx.jit(lambda m, a, v: m(audio=a, video=v))
_a = nnx.jit(lambda m, a: m(audio=a))
_v = nnx.jit(lambda m, v: m(video=v))
_features = nnx.jit(lambda m, x, modality: m.features(x, modality), static_argnums=2)
_pooled = nnx.jit(lambda enc, x, modality: enc(x, modality).mean(axis=1), static_argnums=2)


def _prep(path, frame_resize="crop", **kw):
  return clips.prepare_clip(path, audio_frames=FRAMES, image_size=SIZE, frame_resize=frame_resize,
                            **kw)


# ----- clip preparation ---------------------------------------------------------------------

@pytest.mark.parametrize("frame_resize", ["crop", "squash"])
def test_prepare_equals_eval_pipeline(tmp_path, frame_resize):
  folder = tmp_path / "videos"
  folder.mkdir()
  shutil.copy(MP4, folder / "a.mp4")
  build.build(str(folder), str(tmp_path / "ds"), frame_resize=frame_resize, verbose=False)
  batch = next(pipeline.make_eval_iterator(str(tmp_path / "ds"), "train", batch_size=1,
                                           audio_frames=FRAMES, image_size=SIZE))
  clip = _prep(folder / "a.mp4", frame_resize)
  assert (clip.modality, clip.reason) == ("audio-visual", "")
  assert clip.audio.dtype == clip.video.dtype == np.float32
  np.testing.assert_array_equal(clip.audio, batch["audio"][0])
  np.testing.assert_array_equal(clip.video, batch["video"][0])
  other = _prep(folder / "a.mp4", "squash" if frame_resize == "crop" else "crop")
  assert np.abs(other.video - clip.video).mean() > 0.05
  np.testing.assert_array_equal(other.audio, clip.audio)


def _stereo_video(path):
  """1.5 s: 15 frames of changing grey, stereo PCM with L = x, R = x / 2."""
  with av.open(path, "w") as c:
    vs = c.add_stream("mpeg4", rate=10)
    vs.width, vs.height, vs.pix_fmt = 64, 48, "yuv420p"
    s = c.add_stream("pcm_s16le", rate=16000, layout="stereo")
    for i in range(15):
      img = np.full((48, 64, 3), 10 + 15 * i, np.uint8)
      c.mux(vs.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
    c.mux(vs.encode(None))
    x = 0.3 * np.sin(2 * np.pi * 440 * np.arange(24000) / 16000)
    pcm = (np.stack([x, x / 2]) * 32767).astype(np.int16)
    frame = av.AudioFrame.from_ndarray(pcm.T.reshape(1, -1).copy(), format="s16",
                                       layout="stereo")
    frame.sample_rate = 16000
    c.mux(s.encode(frame))
    c.mux(s.encode(None))
  return path


def test_prepare_follows_the_runs_frame_resize(runs, predictor, tmp_path):
  # config.json's data.frame_resize, downmix and frame_span (the dataset's); older runs: crop,
  # the mean of the channels and the first 10 s.
  data = predictor.config.get("data", {})
  assert not {"frame_resize", "downmix", "frame_span"} & set(data)
  np.testing.assert_array_equal(predictor.prepare(MP4).video, _prep(MP4).video)
  video = _stereo_video(str(tmp_path / "stereo.mkv"))
  default = predictor.prepare(video)
  np.testing.assert_array_equal(default.audio, _prep(video, downmix="mean").audio)
  np.testing.assert_array_equal(default.video, _prep(video, frame_span="first").video)
  workdir = str(tmp_path / "run")
  shutil.copytree(runs["bce"][0], workdir)
  with open(os.path.join(workdir, "config.json")) as f:
    config = json.load(f)
  config.setdefault("data", {}).update(frame_resize="squash", downmix="first", frame_span="whole")
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(config, f)
  want = _prep(video, "squash", downmix="first", frame_span="whole")
  assert np.abs(want.audio - default.audio).mean() > 0.05  # 0.75 x vs x
  for cls in (inference.Predictor, inference.Embedder):
    got = cls.load(workdir).prepare(video)
    np.testing.assert_array_equal(got.video, want.video)
    np.testing.assert_array_equal(got.audio, want.audio)
  with pytest.raises(ValueError, match="frame_resize 'nope'"):
    _prep(MP4, "nope")
  with pytest.raises(ValueError, match="downmix 'nope'"):
    _prep(MP4, downmix="nope")


def test_prepare_fallbacks_and_errors(media_files, tmp_path):
  gif = _prep(GIF)
  assert (gif.modality, gif.reason, gif.audio) == ("visual-only", "no audio stream", None)
  assert gif.video.shape == (10, SIZE, SIZE, 3)
  wav = _prep(media_files["wav"])
  assert (wav.modality, wav.reason, wav.video) == ("audio-only", "no video stream", None)
  assert wav.audio.shape == (FRAMES, 128)
  silent = _prep(media_files["silent"])
  assert (silent.modality, silent.reason, silent.audio) == ("visual-only", "silent audio track",
                                                            None)
  assert silent.video.shape == (10, SIZE, SIZE, 3)
  with pytest.raises(media.ClipError) as e:
    _prep(media_files["broken"])
  assert e.value.reason == "unreadable" and "broken.mp4" in str(e.value)
  with pytest.raises(media.ClipError, match="missing_file"):
    _prep(tmp_path / "nope.mp4")


@pytest.mark.parametrize("duration, window, hop, want", [
    (25, 10, 10, [0, 10, 20]),  # the last window shorter
    (20, 10, 10, [0, 10]), (10.02, 10, 10, [0]), (20.5, 10, 10, [0, 10]),  # a tail < 1 s: none
    (21.2, 10, 10, [0, 10, 20]), (5, 10, 10, [0]), (0.5, 10, 10, [0]),
    (25, 10, 5, [0, 5, 10, 15]),  # overlapping: up to the first that reaches the end
    (25, 4, 10, [0, 10, 20]),  # gaps between windows
])
def test_window_starts(duration, window, hop, want):
  assert media.window_starts(duration, window, hop) == want


def test_windows_of_a_long_file_are_its_parts(long_file, tmp_path):
  """Each window of the 25 s file is prepared as its part, a file of its own, is: frames,
  padded fbank and fallback alike."""
  path, parts = long_file
  windows = list(clips.prepare_windows(path, audio_frames=1024, image_size=SIZE))
  assert [(w.start, w.seconds) for w in windows] == [(0, 10), (10, 10), (20, 5)]
  for w, part in zip(windows, parts):
    want = clips.prepare_clip(part, audio_frames=1024, image_size=SIZE)
    assert (w.modality, w.reason) == (want.modality, want.reason)
    np.testing.assert_array_equal(w.video, want.video)
    if want.audio is None:
      assert w.audio is None
    else:
      np.testing.assert_array_equal(w.audio, want.audio)
  assert [w.modality for w in windows] == ["audio-visual", "visual-only", "audio-visual"]
  # The last 5 s give 498 fbank frames, padded to 1024 as the pipeline pads a short clip.
  assert np.all(windows[2].audio[500:] == windows[2].audio[-1])
  assert not np.all(windows[2].audio[400:498] == windows[2].audio[-1])
  # Overlapping windows: the one starting at 10 s is the second part again.
  half = list(clips.prepare_windows(path, audio_frames=1024, image_size=SIZE, window=10, hop=5))
  assert [w.start for w in half] == [0, 5, 10, 15]
  np.testing.assert_array_equal(half[2].video, windows[1].video)
  np.testing.assert_array_equal(half[0].audio, windows[0].audio)
  # No window usable (no video, silent audio): the file fails at once, saying why for both.
  silent = str(tmp_path / "silent.wav")
  with av.open(silent, "w") as c:
    stream = c.add_stream("pcm_s16le", rate=16000, layout="mono")
    frame = av.AudioFrame.from_ndarray(np.zeros((1, 48000), np.int16), format="s16",
                                       layout="mono")
    frame.sample_rate = 16000
    c.mux(stream.encode(frame))
    c.mux(stream.encode(None))
  with pytest.raises(media.ClipError, match="silent_audio.*and no video stream"):
    clips.prepare_windows(silent, audio_frames=1024, image_size=SIZE)


# ----- loading ------------------------------------------------------------------------------

def _params_equal(a, b):
  return all(jax.tree.leaves(jax.tree.map(lambda x, y: np.array_equal(x, y), a, b)))


def _loaded(p):
  return nnx.to_pure_dict(p._state)  # pylint: disable=protected-access


def test_workdir_and_step_dir(runs, predictor):
  workdir, saved = runs["bce"]
  assert predictor.run.step == 5
  assert _params_equal(_loaded(predictor), saved[5][1])
  step5 = inference.Predictor.load(os.path.join(workdir, "checkpoints", "5"))
  assert _params_equal(_loaded(step5), _loaded(predictor))
  step3 = inference.Predictor.load(os.path.join(workdir, "checkpoints", "3"))
  assert step3.run.step == 3
  assert _params_equal(_loaded(step3), saved[3][1])
  assert not _params_equal(_loaded(step3), _loaded(predictor))


@pytest.mark.parametrize("where", ["nope", "checkpoints", "checkpoints/4"])
def test_bad_checkpoint_path(runs, where):
  path = os.path.join(runs["bce"][0], where)
  with pytest.raises(checkpoint.CheckpointError) as e:
    inference.Predictor.load(path)
  assert path in str(e.value)


def test_params_not_matching_config(runs, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(runs["bce"][0], workdir)
  with open(os.path.join(workdir, "label_names.json"), "w") as f:
    json.dump(LABELS + ["fish"], f)  # 4 classes, heads saved with 3
  with pytest.raises(checkpoint.CheckpointError, match="do not match") as e:
    inference.Predictor.load(workdir)
  assert os.path.join(workdir, "checkpoints", "5") in str(e.value)


def test_pretrain_refused(runs):
  with pytest.raises(checkpoint.CheckpointError, match="pretraining run.*embed"):
    inference.Predictor.load(runs["pre"][0])


# ----- prediction ---------------------------------------------------------------------------

def test_predict_audio_visual_and_visual_only(runs, predictor):
  model = runs["bce"][1][5][0]
  clip = _prep(MP4)  # the first 10 s
  p = predictor.predict(MP4, top_k=2)
  assert (p.modality, p.reason) == ("audio-visual", "")
  # 60.1 s: six windows of 10 s (the 0.1 s tail is none); the first is the first 10 s.
  assert [(w.start, w.seconds) for w in p.windows] == [(10 * k, 10) for k in range(6)]
  audio = np.repeat(clip.audio[None], 10, axis=0)
  want = np.asarray(jax.nn.sigmoid(_av(model, audio, clip.video))).mean(0)
  first = p.windows[0]
  np.testing.assert_allclose(first.probs, want, rtol=1e-5, atol=1e-6)
  assert first.probs.shape == (3,) and not np.allclose(first.probs, first.probs[0])
  order = np.argsort(-want)
  assert [n for n, _ in first.top] == [LABELS[i] for i in order[:2]]
  assert [s for _, s in first.top] == pytest.approx(want[order[:2]], rel=1e-5)
  # The whole file: the mean of the windows' probabilities.
  whole = np.mean([w.probs for w in p.windows], axis=0)
  np.testing.assert_allclose(p.probs, whole, rtol=1e-6)
  assert not np.allclose(p.probs, first.probs, rtol=1e-3)
  assert [n for n, _ in p.top] == [LABELS[i] for i in np.argsort(-whole)[:2]]

  g = predictor.predict(GIF)
  assert (g.modality, g.reason) == ("visual-only", "no audio stream")
  want = np.asarray(jax.nn.sigmoid(_v(model, _prep(GIF).video))).mean(0)
  np.testing.assert_allclose(g.probs, want, rtol=1e-5, atol=1e-6)
  assert len(g.top) == 3


def test_predict_audio_only_softmax(runs, media_files):
  model = runs["ce"][1][1][0]
  p = inference.Predictor.load(runs["ce"][0]).predict(media_files["wav"])
  assert (p.modality, p.reason) == ("audio-only", "no video stream")
  want = np.asarray(jax.nn.softmax(_a(model, _prep(media_files["wav"]).audio[None])))[0]
  np.testing.assert_allclose(p.probs, want, rtol=1e-5, atol=1e-6)
  assert p.probs.sum() == pytest.approx(1.0, abs=1e-5)


def test_predict_cli(runs, media_files, long_file, capsys):
  part = long_file[1][0]  # 10 s, audio-visual
  rc = predict.main(["--checkpoint", runs["bce"][0], "--top_k", "2", part,
                     media_files["broken"], GIF])
  out, err = capsys.readouterr()
  assert rc == 1
  assert f"{part}: audio-visual\n" in out  # one window each: no list of windows
  assert f"{GIF}: visual-only (no audio stream)\n" in out
  assert len([l for l in out.splitlines() if l.startswith("  ")]) == 4  # 2 classes x 2 files
  errors = err.strip().splitlines()
  assert len(errors) == 1 and media_files["broken"] in errors[0] and "unreadable" in errors[0]
  assert predict.main(["--checkpoint", runs["bce"][0], "--top_k", "1", GIF]) == 0


def test_predict_and_embed_cli_bad_checkpoint_is_one_line(runs, tmp_path, capsys):
  missing, out = str(tmp_path / "no"), str(tmp_path / "e.npz")
  # A pretraining run cannot classify; a missing directory is no run.
  for cli, args in [(predict, ["--checkpoint", runs["pre"][0]]),
                    (predict, ["--checkpoint", missing]),
                    (embed, ["--checkpoint", missing, "--out", out])]:
    assert cli.main(args + [MP4]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and args[1] in err[0]
  assert not os.path.exists(out)


def test_predict_module_exits_non_zero_when_a_file_fails(runs, media_files):
  # The module's own exit status; nothing is compiled, as the one file fails to decode.
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  p = subprocess.run([sys.executable, "-m", "avsiam_jax.predict", "--checkpoint",
                      runs["bce"][0], media_files["broken"]], cwd=root, capture_output=True,
                     text=True, timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert p.returncode == 1, p.stderr
  assert media_files["broken"] in p.stderr and "Traceback" not in p.stderr


# ----- embeddings ---------------------------------------------------------------------------

def test_embed_cli(runs, media_files, long_file, tmp_path, capsys):
  long, parts = long_file
  folder = tmp_path / "in"
  (folder / "sub").mkdir(parents=True)
  shutil.copy(long, folder / "sub" / "b.mkv")  # 25 s: three windows, the middle one silent
  shutil.copy(GIF, folder / "a.gif")
  shutil.copy(media_files["broken"], folder / "c.mp4")
  (folder / "notes.txt").write_text("not a video")
  out = str(tmp_path / "emb.npz")
  rc = embed.main(["--checkpoint", runs["pre"][0], "--out", out, str(folder),
                   media_files["wav"]])
  err = capsys.readouterr().err
  assert rc == 1  # c.mp4 skipped; the others are in the file
  assert "c.mp4" in err and "unreadable" in err
  z = np.load(out)
  want_paths = [str(folder / "a.gif"), str(folder / "sub" / "b.mkv"), media_files["wav"]]
  assert z["paths"].tolist() == want_paths
  assert z["audio"].shape == z["video"].shape == (3, 32)
  assert z["audio"].dtype == z["video"].dtype == np.float32
  assert z["has_audio"].tolist() == [False, True, True]
  assert z["has_video"].tolist() == [True, True, False]
  assert not z["audio"][0].any() and not z["video"][2].any()
  assert z["skipped"].shape == (1, 2) and z["skipped"][0, 0] == str(folder / "c.mp4")
  assert z["skipped"][0, 1].startswith("unreadable")

  # Windows: the GIF's one (5 s), b.mkv's three, the wav's one (2 s).
  assert z["window_file"].tolist() == [0, 1, 1, 1, 2]
  assert z["window_start"].tolist() == [0, 0, 10, 20, 0]
  assert z["window_seconds"].tolist() == pytest.approx([5, 10, 10, 5, 2])
  assert z["window_has_audio"].tolist() == [False, True, False, True, True]
  assert z["window_has_video"].tolist() == [True, True, True, True, False]
  # The retrieval eval's features (pooled audio, pooled middle frame) of each part as a file of
  # its own; a file's: the mean over its windows that have the modality.
  model = runs["pre"][1][2][0]
  for k, part in enumerate(parts):
    clip = _prep(part)
    np.testing.assert_allclose(z["window_video"][1 + k],
                               _features(model, clip.video[5][None], "v")[0], rtol=1e-5, atol=1e-5)
    if clip.audio is None:
      assert not z["window_audio"][1 + k].any()
    else:
      np.testing.assert_allclose(z["window_audio"][1 + k],
                                 _features(model, clip.audio[None], "a")[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(z["audio"][1], z["window_audio"][[1, 3]].mean(0), rtol=1e-6)
  np.testing.assert_allclose(z["video"][1], z["window_video"][1:4].mean(0), rtol=1e-6)
  for k in ("audio", "video"):  # one window each: the window is the file
    np.testing.assert_array_equal(z[k][[0, 2]], z[f"window_{k}"][[0, 4]])
  np.testing.assert_allclose(z["video"][0], _features(model, _prep(GIF).video[5][None], "v")[0],
                             rtol=1e-5, atol=1e-5)

  assert embed.main(["--checkpoint", runs["pre"][0], "--out", out,
                     media_files["broken"]]) == 1
  assert np.load(out)["paths"].shape == (0,) and np.load(out)["window_audio"].shape == (0, 32)
  assert embed.main(["--checkpoint", runs["pre"][0], "--out", out, "--hop", "5", GIF]) == 0
  assert np.load(out)["paths"].tolist() == [GIF]
  assert np.load(out)["window_start"].tolist() == [0]  # 5 s: the first window reaches the end
  with pytest.raises(SystemExit) as e:  # found before any file is embedded
    embed.main(["--checkpoint", runs["pre"][0], "--out", str(tmp_path / "no" / "e.npz"), MP4])
  assert e.value.code == 2 and str(tmp_path / "no") in capsys.readouterr().err


def test_embedder_on_finetune_run(runs, long_file):
  model = runs["bce"][1][5][0]
  part = long_file[1][0]
  a, v = inference.Embedder.load(runs["bce"][0]).embed(part)
  clip = _prep(part)
  np.testing.assert_allclose(a, _pooled(model.encoder, clip.audio[None], "a")[0],
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(v, _pooled(model.encoder, clip.video[5:6], "v")[0],
                             rtol=1e-5, atol=1e-5)


# ----- whole files in windows ---------------------------------------------------------------

def test_predict_a_long_file_window_by_window(runs, predictor, long_file, capsys):
  """Each window scores as its part does as a file; the whole file is their mean."""
  path, parts = long_file
  p = predictor.predict(path, top_k=3)
  alone = [predictor.predict(part, top_k=3) for part in parts]
  assert [len(a.windows) for a in alone] == [1, 1, 1]
  for w, a in zip(p.windows, alone):
    assert (w.modality, w.reason) == (a.modality, a.reason)
    np.testing.assert_allclose(w.probs, a.probs, rtol=1e-6, atol=1e-7)
    assert [n for n, _ in w.top] == [n for n, _ in a.top]
  np.testing.assert_allclose(p.probs, np.mean([a.probs for a in alone], axis=0), rtol=1e-6)
  assert p.modality == "mixed"
  assert p.reason == "audio-visual in 2 of 3 windows, visual-only in 1 of 3 windows"

  assert predict.main(["--checkpoint", runs["bce"][0], "--top_k", "1", path]) == 0
  out = capsys.readouterr().out.splitlines()
  assert out[0] == f"{path}: mixed ({p.reason}); 3 windows of 10 s every 10 s, the whole file:"
  assert [l for l in out if l.startswith("  [")] == [
      "  [0-10 s] audio-visual", "  [10-20 s] visual-only (silent audio track)",
      "  [20-25 s] audio-visual"]
  with pytest.raises(SystemExit) as e:  # before the checkpoint is read
    predict.main(["--checkpoint", "nowhere", "--window", "20", path])
  assert e.value.code == 2
  assert "--window/--hop: window 20 s: must be 1 to 10 s" in capsys.readouterr().err
