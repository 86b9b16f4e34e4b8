"""data_prep.build: inputs, bad clips, record contents, resume, multi-process, real media."""
import json
import os
import shutil
import subprocess
import sys

import av
import numpy as np
import pytest
from PIL import Image

from avsiam_jax.data import examples, media, records
from avsiam_jax.data.fbank import fbank
from conftest import data_file
from data_prep import build as B


# ---------------------------------------------------------------- media made here


def _tone(sr, channels, seconds, amplitude, freq=440.0):
  t = np.arange(int(round(sr * seconds))) / sr
  x = amplitude * np.sin(2 * np.pi * freq * t)
  return np.repeat(x[None], channels, 0).astype(np.float32)


def write_media(path, seconds=1.5, video=True, color=(200, 40, 40), audio=True, sr=16000,
                layout="mono", audio_seconds=None, amplitude=0.3, fmt=None):
  """A small clip: 64x48 solid-colour video at 10 fps and/or a sine tone."""
  layouts = {"mono": 1, "stereo": 2, "5.1": 6}
  with av.open(path, "w", format=fmt) as c:
    if video:
      vs = c.add_stream("mpeg4", rate=10)
      vs.width, vs.height, vs.pix_fmt = 64, 48, "yuv420p"
    if audio:
      codec = {"wav": "pcm_s16le", "flac": "flac"}.get(fmt or os.path.splitext(path)[1][1:], "aac")
      as_ = c.add_stream(codec, rate=sr, layout=layout)
    if video:
      img = np.zeros((48, 64, 3), np.uint8)
      img[:] = color
      for _ in range(int(seconds * 10)):
        c.mux(vs.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
      c.mux(vs.encode(None))
    if audio:
      wave = _tone(sr, layouts[layout], audio_seconds or seconds, amplitude)
      if codec != "aac":
        wave = (wave * 32767).astype(np.int16)
        frame = av.AudioFrame.from_ndarray(wave.T.reshape(1, -1).copy(), format="s16", layout=layout)
      else:
        frame = av.AudioFrame.from_ndarray(wave, format="fltp", layout=layout)
      frame.sample_rate, frame.pts = sr, 0
      c.mux(as_.encode(frame))
      c.mux(as_.encode(None))
  return path


def write_label_csv(path, mids):
  with open(path, "w") as f:
    f.write("index,mid,display_name\n")
    for i, m in enumerate(mids):
      f.write(f'{i},{m},"name {m}"\n')
  return path


def read_split(out, split="train"):
  """{shard file: [records]} of a built split, read through TFDS's data source."""
  s = records.read_info(out)["splits"][split]
  source = records.open_split(out, split)
  clips = [source[i] for i in range(len(source))]
  ends = np.cumsum(s["shard_lengths"])
  return {name: clips[end - n:end] for name, n, end in zip(s["shards"], s["shard_lengths"], ends)}


def all_records(out, split="train"):
  return [r for rs in read_split(out, split).values() for r in rs]


def skipped_by_id(report):
  return {s["id"]: s["reason"] for s in report["skipped"]}


# ---------------------------------------------------------------- bad inputs table

MIDS = ["/m/a", "/m/b", "/m/c"]


@pytest.fixture(scope="module")
def table(tmp_path_factory):
  """A CAV-MAE JSON with good clips in many audio formats and one of each bad case."""
  d = str(tmp_path_factory.mktemp("table"))
  m = lambda name, **kw: write_media(os.path.join(d, name), **kw)
  good = {  # id -> (entry, labels)
      "g16k_mono": (dict(video_path=m("g1.mp4", sr=16000)), "/m/a", [0]),
      "g8k_mono": (dict(video_path=m("g2.mp4", sr=8000, color=(20, 200, 20))), "/m/b", [1]),
      "g44k_stereo": (dict(video_path=m("g3.mkv", sr=44100, layout="stereo")), "/m/c,/m/a", [0, 2]),
      "g48k_51": (dict(video_path=m("g4.mp4", sr=48000, layout="5.1")), "", []),
      # Separate audio file, video without audio.
      "gsep_wav": (dict(video_path=m("g5.mp4", audio=False),
                        wav=m("g5.wav", video=False, sr=22050, layout="stereo")), "/m/b", [1]),
  }
  # A CAV-MAE frame folder: frame_{i}/<id>.jpg plus a flac.
  frames_root = os.path.join(d, "frames")
  for i in range(10):
    os.makedirs(os.path.join(frames_root, f"frame_{i}"))
    img = np.zeros((240, 320, 3), np.uint8)
    img[:] = (30, 30, 200)
    Image.fromarray(img).save(os.path.join(frames_root, f"frame_{i}", "gframes.jpg"))
  good["gframes"] = (dict(video_path=frames_root + "/", wav=m("gf.flac", video=False, sr=32000)),
                     "/m/c", [2])

  truncated = m("trunc.mp4", seconds=2.0)
  with open(truncated, "r+b") as f:
    f.truncate(os.path.getsize(truncated) // 3)
  garbage = os.path.join(d, "garbage.mp4")
  with open(garbage, "wb") as f:
    f.write(b"this is not a video" * 100)
  bad = {  # id -> (entry, labels, expected reason)
      "missing": (dict(video_path=os.path.join(d, "nope.mp4")), "/m/a", "missing_file"),
      "truncated": (dict(video_path=truncated), "/m/a", "unreadable"),
      "garbage": (dict(video_path=garbage), "/m/a", "unreadable"),
      "no_audio": (dict(video_path=m("na.mp4", audio=False)), "/m/a", "no_audio"),
      "no_video": (dict(video_path=m("nv.m4a", video=False, fmt="mp4")), "/m/a", "no_video"),
      "silent": (dict(video_path=m("si.mp4", amplitude=0.0)), "/m/a", "silent_audio"),
      "short_audio": (dict(video_path=m("sh.mp4", audio_seconds=0.5)), "/m/a", "audio_too_short"),
      "unknown_label": (dict(video_path=os.path.join(d, "g1.mp4")), "/m/a,/m/zzz", "unknown_label"),
      "frames_missing": (dict(video_path=os.path.join(d, "noframes") + "/",
                              wav=os.path.join(d, "gf.flac")), "/m/a", "missing_file"),
  }
  data = []
  for vid, (entry, labels, _) in list(good.items()) + list(bad.items()):
    path = entry["video_path"]
    data.append({"video_id": vid, "wav": entry.get("wav", path), "video_path": path,
                 "labels": labels})
  # A later entry with an id already used: the first one is kept.
  data.append({"video_id": "g16k_mono", "wav": "", "video_path": os.path.join(d, "g2.mp4"),
               "labels": "/m/b"})
  json_path = os.path.join(d, "data.json")
  with open(json_path, "w") as f:
    json.dump({"data": data}, f)
  labels_csv = write_label_csv(os.path.join(d, "labels.csv"), MIDS)
  out = os.path.join(d, "dataset")
  report = B.build(json_path, out, labels=labels_csv, num_shards=3, workers=2, verbose=False)
  return dict(dir=d, json=json_path, labels=labels_csv, out=out, report=report, good=good,
              bad=bad, data=data)


def test_bad_inputs_are_reported_and_never_written(table):
  report = table["report"]
  expected = {vid: reason for vid, (_, _, reason) in table["bad"].items()}
  got = skipped_by_id(report)
  dup = [s for s in report["skipped"] if s["reason"] == "duplicate_id"]
  assert len(dup) == 1 and dup[0]["id"] == "g16k_mono"
  assert {k: v for k, v in got.items() if k != "g16k_mono"} == expected
  assert report["finalized"] and report["num_skipped"] == len(expected) + 1
  for s in report["skipped"]:
    assert s["path"] and s["message"]
  written = {r["id"] for r in all_records(table["out"])}
  assert written == set(table["good"])
  # The report on disk says the same, and the info counts match.
  on_disk = json.load(open(os.path.join(table["out"], B.REPORT_FILE)))["splits"]["train"]
  assert on_disk["skipped"] == report["skipped"]
  assert on_disk["skipped_by_reason"]["unreadable"] == 2
  info = records.read_info(table["out"])
  assert info["splits"]["train"]["num_examples"] == len(table["good"])
  assert info["splits"]["train"]["num_skipped"] == len(expected) + 1
  assert info["label_ids"] == MIDS and info["label_names"] == [f"name {m}" for m in MIDS]
  assert info["fbank"]["sample_rate"] == 16000 and info["fbank"]["num_mel_bins"] == 128
  assert info["fbank"]["max_frames"] == 1024 and info["frames"] == {
      "num": 10, "size": 224, "format": "jpeg", "resize": "crop", "span": "first"}
  assert info["fbank"]["downmix"] == "mean"  # the defaults, recorded
  assert (on_disk["downmix"], on_disk["frame_span"]) == ("mean", "first")


def test_good_records_have_the_right_fields(table):
  recs = {r["id"]: r for r in all_records(table["out"])}
  for vid, (entry, _, labels) in table["good"].items():
    r = recs[vid]
    assert set(r) == {"id", "frames", "fbank", "labels"}
    assert r["labels"].dtype == np.int32 and r["labels"].tolist() == labels
    assert len(r["frames"]) == 10
    for jpg in r["frames"]:
      img = media.decode_jpeg(jpg)
      assert img.shape == (224, 224, 3)
    # Expected audio: the separate file if any, else the video's track.
    wav = entry.get("wav")
    if wav:
      wave = media.decode_audio(wav)
    else:
      wave = media.decode_clip(entry["video_path"]).waveform
    want = fbank(wave)[:1024]
    assert r["fbank"].dtype == np.float16 and r["fbank"].shape == want.shape
    assert r["fbank"].shape[1] == 128 and 90 < r["fbank"].shape[0] <= 1024
    np.testing.assert_allclose(r["fbank"].astype(np.float32), want, rtol=2e-3, atol=2e-3)
  # Frames keep the source colour (frame folder: blue; 8 kHz clip: green).
  assert np.abs(media.decode_jpeg(recs["gframes"]["frames"][0]).mean((0, 1)) - (30, 30, 200)).max() < 8
  assert np.abs(media.decode_jpeg(recs["g8k_mono"]["frames"][9]).mean((0, 1)) - (20, 200, 20)).max() < 12


def test_max_frames_cuts_fbank(table, tmp_path):
  data = {"data": [e for e in table["data"] if e["video_id"] == "g16k_mono"][:1]}
  path = tmp_path / "one.json"
  path.write_text(json.dumps(data))
  B.build(str(path), str(tmp_path / "ds"), labels=table["labels"], max_frames=50, verbose=False)
  (r,) = all_records(str(tmp_path / "ds"))
  assert r["fbank"].shape == (50, 128)
  assert records.read_info(str(tmp_path / "ds"))["fbank"]["max_frames"] == 50


# ---------------------------------------------------------------- malformed input


@pytest.mark.parametrize("content, needle", [
    ("{not json", "cannot read dataset JSON"),
    ('{"items": []}', "'data'"),
    ('{"data": [{"video_id": "a", "wav": "", "labels": ""}]}', "data[0] field 'video_path'"),
    ('{"data": [{"video_id": "", "wav": "", "video_path": "x.mp4", "labels": ""}]}',
     "data[0] field 'video_id' is empty"),
    ('{"data": [{"video_id": "a", "wav": "", "video_path": "x.mp4", "labels": 3}]}',
     "data[0] field 'labels'"),
])
def test_malformed_json_is_an_error_before_any_work(tmp_path, content, needle):
  path = tmp_path / "bad.json"
  path.write_text(content)
  labels = write_label_csv(str(tmp_path / "l.csv"), MIDS)
  with pytest.raises(B.InputError) as e:
    B.build(str(path), str(tmp_path / "ds"), labels=labels, verbose=False)
  assert str(path) in str(e.value) and needle in str(e.value)
  assert not (tmp_path / "ds").exists()


@pytest.mark.parametrize("content, needle", [
    ("idx,mid,name\n0,/m/a,A\n", "header index,mid,display_name"),
    ("index,mid,display_name\nx,/m/a,A\n", "line 2: field 'index'"),
    ("index,mid,display_name\n0,/m/a,A\n0,/m/b,B\n", "line 3: field 'index' 0 repeated"),
    ("index,mid,display_name\n0,/m/a,A\n1,,B\n", "line 3: field 'mid' is empty"),
    ("index,mid,display_name\n0,/m/a,A\n2,/m/b,B\n", "field 'index' must run"),
])
def test_malformed_label_csv(tmp_path, content, needle):
  (tmp_path / "l.csv").write_text(content)
  (tmp_path / "d.json").write_text('{"data": []}')
  with pytest.raises(B.InputError) as e:
    B.build(str(tmp_path / "d.json"), str(tmp_path / "ds"), labels=str(tmp_path / "l.csv"),
            verbose=False)
  assert "l.csv" in str(e.value) and needle in str(e.value)


def test_malformed_folder_csv_and_missing_labels_flag(tmp_path):
  (tmp_path / "v").mkdir()
  (tmp_path / "f.csv").write_text("file,labels\na.mp4,dog,bark\n")
  with pytest.raises(B.InputError, match=r"f\.csv, line 2: expected 2 fields"):
    B.build(str(tmp_path / "v"), str(tmp_path / "ds"), labels=str(tmp_path / "f.csv"))
  (tmp_path / "d.json").write_text('{"data": []}')
  with pytest.raises(B.InputError, match="needs --labels"):
    B.build(str(tmp_path / "d.json"), str(tmp_path / "ds"))


@pytest.mark.parametrize("header", ["video_id,labels", "filename,label", "# YTID,positive_labels",
                                    "video_id"])
def test_folder_csv_with_another_header_is_refused(tmp_path, header, capsys):
  (tmp_path / "v").mkdir()
  (tmp_path / "v" / "a.mp4").write_bytes(b"")  # never decoded: refused before
  labels = tmp_path / "f.csv"
  labels.write_text(f"{header}\na.mp4,dog\n")
  args = ["--input", str(tmp_path / "v"), "--out", str(tmp_path / "ds"), "--labels", str(labels)]
  assert B.main(args) == 2
  (err,) = capsys.readouterr().err.strip().splitlines()  # one line, no traceback
  assert err.startswith(f"error: {labels}, line 1: header {header!r}") and "'file,labels'" in err
  assert not (tmp_path / "ds").exists()


def test_headerless_folder_csv_and_clips_named_like_columns(tmp_path):
  folder = tmp_path / "v"
  folder.mkdir()
  for name in ("id.mp4", "b.mp4"):
    (folder / name).write_bytes(b"")
  labels = tmp_path / "f.csv"
  # No header: the first row is a clip, also where it is named like a column or is missing.
  for first, want in [("id,dog", ("id", None)), ("b.mp4,labels", ("b", None)),
                      ("gone.mp4,dog", ("gone", "missing_file"))]:
    labels.write_text(f"{first}\nb,cat\n")
    entries, _, _ = B.load_input(str(folder), str(labels))
    assert (entries[0].id, entries[0].skip and entries[0].skip["reason"]) == want
    assert len(entries) == 2


def test_second_split_must_share_the_vocabulary(table, tmp_path):
  out = str(tmp_path / "ds")
  shutil.copytree(table["out"], out)
  other = write_label_csv(str(tmp_path / "other.csv"), MIDS[:2] + ["/m/new"])
  with pytest.raises(B.InputError, match="label vocabulary differs"):
    B.build(table["json"], out, labels=other, split="test", verbose=False)
  assert not os.path.exists(os.path.join(out, B.STATE_DIR, "test"))
  # Same vocabulary: a second split is added, the first one kept.
  data = {"data": [e for e in table["data"] if e["video_id"] in ("g16k_mono", "missing")][:2]}
  (tmp_path / "t.json").write_text(json.dumps(data))
  B.build(str(tmp_path / "t.json"), out, labels=table["labels"], split="test", verbose=False)
  info = records.read_info(out)
  assert set(info["splits"]) == {"train", "test"}
  assert info["splits"]["test"]["num_examples"] == 1
  rep = json.load(open(os.path.join(out, B.REPORT_FILE)))["splits"]
  assert rep["test"]["skipped_by_reason"] == {"missing_file": 1}
  assert rep["train"]["num_examples"] == len(table["good"])


def test_second_split_must_share_the_frame_resize(table, tmp_path):
  out = str(tmp_path / "ds")
  shutil.copytree(table["out"], out)
  assert records.read_info(out)["frames"]["resize"] == "crop"  # the default
  with pytest.raises(B.InputError, match="frame_resize='crop', this run asks 'squash'"):
    B.build(table["json"], out, labels=table["labels"], split="test", frame_resize="squash",
            verbose=False)
  assert not os.path.exists(os.path.join(out, B.STATE_DIR, "test"))
  # A dataset built before the option has no entry: it was cropped.
  info = records.read_info(out)
  del info["frames"]["resize"]
  records.write_info(out, info)
  with pytest.raises(B.InputError, match="frame_resize='crop', this run asks 'squash'"):
    B.build(table["json"], out, labels=table["labels"], split="test", frame_resize="squash",
            verbose=False)


def test_bad_frame_resize_is_named(table, tmp_path):
  with pytest.raises(B.InputError, match="frame_resize 'stretch'"):
    B.build(table["json"], str(tmp_path / "ds"), labels=table["labels"],
            frame_resize="stretch", verbose=False)
  assert not os.path.exists(tmp_path / "ds")
  with pytest.raises(SystemExit) as e:  # argparse's choices
    B.main(["--input", table["json"], "--labels", table["labels"], "--out",
            str(tmp_path / "ds"), "--frame_resize", "stretch"])
  assert e.value.code == 2
  with pytest.raises(ValueError, match="frame_resize 'stretch'"):
    records.format_info(1024, "stretch")
  with pytest.raises(ValueError, match="frame_resize 'stretch'"):
    examples.make_example("x", str(tmp_path / "missing.mp4"), frame_resize="stretch")


def test_frame_folder_follows_frame_resize(tmp_path):
  y, x = np.mgrid[:240, :320]
  img = np.stack([x * 255 // 319, y * 255 // 239, (x // 8 % 2) * 255], -1).astype(np.uint8)
  path = str(tmp_path / "f.jpg")
  Image.fromarray(img).save(path)
  ref = Image.open(path).convert("RGB")
  np.testing.assert_array_equal(examples.square_frame(path, "squash"),
                                np.asarray(ref.resize((224, 224), Image.BICUBIC)))
  crop = ref.resize((299, 224), Image.BILINEAR).crop((37, 0, 261, 224))
  np.testing.assert_array_equal(examples.square_frame(path), np.asarray(crop))


# ---------------------------------------------------------------- resume, processes


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
  from avsiam_jax.data.demo_clips import write_demo_videos
  d = str(tmp_path_factory.mktemp("demo"))
  json_path, csv_path = write_demo_videos(d, 6, seconds=1.5)
  return json_path, csv_path


def test_resume_keeps_finished_shards(demo, tmp_path):
  json_path, csv_path = demo
  out = str(tmp_path / "ds")
  B.build(json_path, out, labels=csv_path, num_shards=3, verbose=False)
  before = read_split(out)
  names = sorted(before)
  mtimes = {n: os.stat(os.path.join(out, n)).st_mtime_ns for n in names}
  # As if killed while writing shard 1: final file gone, a partial .tmp left.
  os.remove(os.path.join(out, names[1]))
  with open(os.path.join(out, names[1]) + ".tmp", "wb") as f:
    f.write(b"partial")
  report = B.build(json_path, out, labels=csv_path, num_shards=3, verbose=False)
  assert report["finalized"] and report["num_examples"] == 6
  after = read_split(out)
  assert not os.path.exists(os.path.join(out, names[1]) + ".tmp")
  for n in names:
    assert [r["id"] for r in after[n]] == [r["id"] for r in before[n]]
    for a, b in zip(after[n], before[n]):
      assert a["frames"] == b["frames"] and np.array_equal(a["fbank"], b["fbank"])
  assert os.stat(os.path.join(out, names[0])).st_mtime_ns == mtimes[names[0]]
  assert os.stat(os.path.join(out, names[2])).st_mtime_ns == mtimes[names[2]]
  # Other settings on the same split: refused rather than mixed.
  with pytest.raises(B.InputError, match="num_shards"):
    B.build(json_path, out, labels=csv_path, num_shards=2, verbose=False)


def test_two_processes_build_disjoint_shards(demo, tmp_path):
  json_path, csv_path = demo
  out = str(tmp_path / "ds")
  r0 = B.build(json_path, out, labels=csv_path, num_shards=4, process_index=0, process_count=2,
               verbose=False)
  assert not r0["finalized"]
  assert r0["shards"] == [records.shard_name("ds", "train", i, 4) for i in (0, 2)]
  assert not os.path.exists(os.path.join(out, records.INFO_FILE))
  present = sorted(f for f in os.listdir(out) if ".array_record-" in f)
  assert present == r0["shards"]
  r1 = B.build(json_path, out, labels=csv_path, num_shards=4, process_index=1, process_count=2,
               workers=2, verbose=False)
  assert r1["finalized"] and r1["num_examples"] == 6
  shards = read_split(out)
  assert len(shards) == 4
  ids = [r["id"] for n in sorted(shards) for r in shards[n]]
  want = [e["video_id"] for e in json.load(open(json_path))["data"]]
  assert ids == want  # disjoint, complete, contiguous ranges in input order
  labels = [r["labels"].tolist() for n in sorted(shards) for r in shards[n]]
  assert records.read_info(out)["splits"]["train"]["example_labels"] == labels
  # --finalize alone rebuilds the info from the shards and per-shard reports.
  os.remove(os.path.join(out, records.INFO_FILE))
  assert B.main(["--out", out, "--finalize"]) == 0
  assert records.read_info(out)["splits"]["train"]["num_examples"] == 6
  os.remove(os.path.join(out, sorted(shards)[3]))
  assert B.main(["--out", out, "--finalize"]) == 1


def test_resume_with_another_frame_resize_is_refused(demo, tmp_path):
  json_path, csv_path = demo
  out = str(tmp_path / "ds")
  kw = dict(labels=csv_path, num_shards=2, process_count=2, verbose=False)
  assert not B.build(json_path, out, process_index=0, **kw)["finalized"]
  with pytest.raises(B.InputError, match="frame_resize 'crop' before, 'squash' now"):
    B.build(json_path, out, process_index=1, frame_resize="squash", **kw)
  assert not os.path.exists(os.path.join(out, records.shard_name("ds", "train", 1, 2)))
  # A plan written before the option was a crop build: the default resumes it.
  plan_path = os.path.join(out, B.STATE_DIR, "train", "plan.json")
  plan = json.load(open(plan_path))
  del plan["frame_resize"]
  json.dump(plan, open(plan_path, "w"))
  assert B.build(json_path, out, process_index=1, **kw)["finalized"]
  assert records.read_info(out)["frames"]["resize"] == "crop"


# ---------------------------------------------------------------- real inputs


def test_cavmae_sample_json_parses_and_every_clip_is_missing(tmp_path):
  out = str(tmp_path / "ds")
  code = B.main(["--input", data_file("cavmae_sample", "sample_json_as.json"),
                 "--labels", data_file("cavmae_sample", "class_labels_indices_as.csv"),
                 "--out", out, "--split", "eval"])
  assert code == 0
  report = json.load(open(os.path.join(out, B.REPORT_FILE)))["splits"]["eval"]
  assert report["num_examples"] == 0 and report["num_skipped"] == 1725
  assert report["skipped_by_reason"] == {"missing_file": 1725}
  first = report["skipped"][0]
  assert first["id"] == "--4gqARaEJE" and first["path"].startswith("/data/sls/audioset/")
  info = records.read_info(out)
  assert len(info["label_ids"]) == 527 and info["label_names"][0] == "Speech"
  assert info["splits"]["eval"]["num_skipped"] == 1725


def test_real_media_folder_input(tmp_path):
  import iscc_samples  # pylint: disable=import-outside-toplevel
  src = os.path.join(os.path.dirname(iscc_samples.__file__), "files", "video")
  folder = tmp_path / "videos"
  (folder / "sub").mkdir(parents=True)
  # The package names every file demo.*: give them distinct ids.
  for name, link in [("demo.mp4", "a.mp4"), ("demo.webm", "sub/b.webm"), ("demo.gif", "c.gif"),
                     ("demo.mkv", "unlisted.mkv")]:
    os.symlink(os.path.join(src, name), folder / link)
  (folder / "notes.txt").write_text("not media")
  labels = tmp_path / "labels.csv"
  labels.write_text('file,labels\na.mp4,"speech,music"\nsub/b,music\nc.gif,speech\n'
                    "gone.mp4,speech\na,music\n")
  out = str(tmp_path / "ds")
  report = B.build(str(folder), out, labels=str(labels), verbose=False)
  assert skipped_by_id(report) == {"c": "no_audio", "gone": "missing_file", "a": "duplicate_id"}
  info = records.read_info(out)
  assert info["label_ids"] == ["music", "speech"] == info["label_names"]
  recs = {r["id"]: r for r in all_records(out)}
  assert set(recs) == {"a", "sub/b"}
  assert recs["a"]["labels"].tolist() == [0, 1] and recs["sub/b"]["labels"].tolist() == [0]
  for r in recs.values():
    assert r["fbank"].shape == (998, 128)  # 10 s at 16 kHz
    assert media.decode_jpeg(r["frames"][5]).shape == (224, 224, 3)


def _squash_reference(path):
  """The released AVSiam frames of a video, by PyAV and PIL alone: the record's frame sampling
  (first 10 s, int(i * total / 10)), each whole frame resized to 224 x 224, bicubic."""
  with av.open(path) as c:
    stream = c.streams.video[0]
    kept, origin = [], None
    for frame in c.decode(stream):
      origin = frame.time if origin is None else origin
      if frame.time - origin >= records.MAX_SECONDS - 1e-3:
        break
      kept.append(frame.to_image())
  idx = [int(i * len(kept) / records.NUM_FRAMES) for i in range(records.NUM_FRAMES)]
  return [np.asarray(kept[i].resize((224, 224), Image.BICUBIC)) for i in idx]


def test_squash_build_records_it_and_stores_squashed_frames(tmp_path):
  import iscc_samples  # pylint: disable=import-outside-toplevel
  src = os.path.join(os.path.dirname(iscc_samples.__file__), "files", "video", "demo.mp4")
  folder = tmp_path / "videos"
  folder.mkdir()
  os.symlink(src, folder / "a.mp4")
  out = str(tmp_path / "ds")
  assert B.main(["--input", str(folder), "--out", out, "--frame_resize", "squash"]) == 0
  info = records.read_info(out)
  assert info["frames"]["resize"] == "squash"
  plan = json.load(open(os.path.join(out, B.STATE_DIR, "train", "plan.json")))
  assert plan["frame_resize"] == "squash"
  (record,) = all_records(out)
  ref = _squash_reference(src)
  assert record["frames"] == [media.encode_jpeg(f) for f in ref]
  # Not the default's frames: a 16:9 video's crop drops its sides.
  cropped = examples.stored_frames(examples.decode_frames(src))
  assert record["frames"] != cropped
  assert np.abs(media.decode_jpeg(cropped[5]).astype(int) - ref[5]).mean() > 5


def test_folder_without_csv_takes_every_file(tmp_path):
  folder = tmp_path / "v"
  folder.mkdir()
  write_media(str(folder / "x.mp4"))
  write_media(str(folder / "x.mkv"))  # same id as x.mp4: a duplicate
  (folder / "list.csv").write_text("ignored")
  report = B.build(str(folder), str(tmp_path / "ds"), verbose=False)
  assert report["num_examples"] == 1 and skipped_by_id(report) == {"x": "duplicate_id"}
  assert records.read_info(str(tmp_path / "ds"))["label_ids"] == []


def test_cli_help_documents_the_folder_csv():
  out = subprocess.run([sys.executable, "-m", "data_prep.build", "--help"], capture_output=True,
                       text=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       check=True).stdout
  assert "file,labels" in out and "--finalize" in out and "--process_index" in out
  assert "--frame_resize {crop,squash}" in out
  assert "--downmix {mean,first}" in out and "--frame_span {first,whole}" in out


def test_unexpected_error_stops_the_build_naming_the_clip(demo, tmp_path, monkeypatch):
  json_path, csv_path = demo

  def boom(*args, **kwargs):
    raise ZeroDivisionError("bug")

  monkeypatch.setattr(examples, "decode_media", boom)
  with pytest.raises(RuntimeError, match="(?s)clip 'demo_00000'.*ZeroDivisionError"):
    B.build(json_path, str(tmp_path / "ds"), labels=csv_path, verbose=False)
  assert not os.path.exists(tmp_path / "ds" / records.INFO_FILE)
  shards = [f for f in os.listdir(tmp_path / "ds") if ".array_record-" in f]
  assert not [f for f in shards if not f.endswith(".tmp")]


def _jax_loaded():
  return "jax" in sys.modules


def test_workers_do_not_import_jax(demo):
  import multiprocessing
  json_path, csv_path = demo
  entries, _, _ = B.load_input(json_path, csv_path)
  with multiprocessing.get_context("spawn").Pool(1) as pool:
    status, _ = pool.apply(B.process_clip, (entries[0], 1024))
    assert status == "ok"
    assert not pool.apply(_jax_loaded)


def test_folder_split_reuses_the_dataset_vocabulary(tmp_path):
  folder = tmp_path / "v"
  folder.mkdir()
  write_media(str(folder / "a.mp4"))
  write_media(str(folder / "b.mp4"))
  out = str(tmp_path / "ds")
  (tmp_path / "train.csv").write_text('a.mp4,"dog,cat"\nb,emu\n')
  B.build(str(folder), out, labels=str(tmp_path / "train.csv"), verbose=False)
  (tmp_path / "test.csv").write_text("file,labels\nb.mp4,dog\n")
  B.build(str(folder), out, labels=str(tmp_path / "test.csv"), split="test", verbose=False)
  assert records.read_info(out)["label_ids"] == ["cat", "dog", "emu"]
  assert [r["labels"].tolist() for r in all_records(out, "test")] == [[1]]
  (tmp_path / "bad.csv").write_text("b.mp4,zebra\n")
  with pytest.raises(B.InputError, match="only in the input: \\['zebra'\\]"):
    B.build(str(folder), out, labels=str(tmp_path / "bad.csv"), split="val", verbose=False)


class _CrashingEntry(B.Entry):
  """Kills the worker process that unpickles it, like a segfault in a decoder."""

  def __setstate__(self, state):
    os._exit(3)


def test_a_dead_worker_fails_the_build_instead_of_hanging(demo):
  import dataclasses
  import multiprocessing
  from concurrent import futures
  entries, _, _ = B.load_input(*demo)
  crash = _CrashingEntry(**dataclasses.asdict(entries[1]))
  with futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
    with pytest.raises(RuntimeError, match="worker process died.*'demo_00001'"):
      list(B._results([entries[0], crash, entries[2]], 1024, pool, window=2))


# ---------------------------------------------------------------- down-mix and frame span


def _stereo_clip(path, seconds=1.5, sr=16000):
  """Video + 16-bit PCM stereo with L = x, R = x / 2; returns x (float32, as stored)."""
  t = np.arange(int(sr * seconds)) / sr
  x = (0.4 * np.sin(2 * np.pi * 440 * t) + 0.2 * np.sin(2 * np.pi * 1500 * t)).astype(np.float32)
  pcm = np.round(np.stack([x, 0.5 * x]) * 32767).astype(np.int16)
  with av.open(path, "w") as c:
    vs = c.add_stream("mpeg4", rate=10)
    vs.width, vs.height, vs.pix_fmt = 64, 48, "yuv420p"
    as_ = c.add_stream("pcm_s16le", rate=sr, layout="stereo")
    for _ in range(int(seconds * 10)):
      c.mux(vs.encode(av.VideoFrame.from_ndarray(np.full((48, 64, 3), 90, np.uint8), "rgb24")))
    c.mux(vs.encode(None))
    frame = av.AudioFrame.from_ndarray(pcm.T.reshape(1, -1).copy(), format="s16", layout="stereo")
    frame.sample_rate, frame.pts = sr, 0
    c.mux(as_.encode(frame))
    c.mux(as_.encode(None))
  return pcm / np.float32(32768)


@pytest.fixture(scope="module")
def stereo(tmp_path_factory):
  d = tmp_path_factory.mktemp("stereo")
  (d / "v").mkdir()
  left, right = _stereo_clip(str(d / "v" / "s.mkv"))
  return str(d / "v"), left, right


def test_downmix_build_option_and_record(stereo, tmp_path):
  folder, left, right = stereo
  got = {}
  for downmix in ("mean", "first"):
    out = str(tmp_path / downmix)
    args = ["--input", folder, "--out", out] + (["--downmix", downmix] if downmix != "mean" else [])
    assert B.main(args) == 0
    (r,) = all_records(out)
    got[downmix] = r["fbank"].astype(np.float32)
    info = records.read_info(out)
    assert info["fbank"]["downmix"] == downmix and info["frames"]["span"] == "first"
    report = json.load(open(os.path.join(out, B.REPORT_FILE)))["splits"]["train"]
    assert (report["downmix"], report["frame_span"]) == (downmix, "first")
    plan = json.load(open(os.path.join(out, B.STATE_DIR, "train", "plan.json")))
    assert plan["downmix"] == downmix
  # Against the channels written: the mean (released AVSiam) or the left one (CAV-MAE).
  np.testing.assert_allclose(got["mean"], fbank((left + right) / 2), rtol=2e-3, atol=2e-3)
  np.testing.assert_allclose(got["first"], fbank(left), rtol=2e-3, atol=2e-3)
  with pytest.raises(SystemExit) as e:  # argparse's choices
    B.main(["--input", folder, "--out", str(tmp_path / "x"), "--downmix", "sum"])
  assert e.value.code == 2
  with pytest.raises(B.InputError, match="downmix 'sum': expected one of 'mean', 'first'"):
    B.build(folder, str(tmp_path / "x"), downmix="sum", verbose=False)
  with pytest.raises(B.InputError, match="frame_span 'all': expected one of 'first', 'whole'"):
    B.build(folder, str(tmp_path / "x"), frame_span="all", verbose=False)
  assert not os.path.exists(tmp_path / "x")


def test_second_split_must_share_downmix_and_frame_span(stereo, tmp_path):
  folder = stereo[0]
  out = str(tmp_path / "ds")
  B.build(folder, out, verbose=False)
  with pytest.raises(B.InputError, match="downmix='mean', this run asks downmix='first'"):
    B.build(folder, out, split="test", downmix="first", verbose=False)
  with pytest.raises(B.InputError, match="frame_span='first', this run asks 'whole'"):
    B.build(folder, out, split="test", frame_span="whole", verbose=False)
  assert not os.path.exists(os.path.join(out, B.STATE_DIR, "test"))
  # A dataset built before the option holds the earlier mix, which no flag reproduces.
  info = records.read_info(out)
  del info["fbank"]["downmix"], info["frames"]["span"]
  records.write_info(out, info)
  with pytest.raises(B.InputError, match=r"earlier down-mix \(L\+R\)/sqrt\(2\).*rebuild every "
                     r"split with `python -m data_prep.build \.\.\. --out "):
    B.build(folder, out, split="test", verbose=False)


def test_processes_and_finalize_carry_downmix_and_frame_span(demo, tmp_path):
  json_path, csv_path = demo
  out = str(tmp_path / "ds")
  kw = dict(labels=csv_path, num_shards=2, process_count=2, verbose=False)
  assert not B.build(json_path, out, process_index=0, downmix="first", frame_span="whole",
                     **kw)["finalized"]
  with pytest.raises(B.InputError, match="downmix 'first' before, 'mean' now"):
    B.build(json_path, out, process_index=1, frame_span="whole", **kw)
  with pytest.raises(B.InputError, match="frame_span 'whole' before, 'first' now"):
    B.build(json_path, out, process_index=1, downmix="first", **kw)
  assert B.build(json_path, out, process_index=1, downmix="first", frame_span="whole",
                 **kw)["finalized"]
  os.remove(os.path.join(out, records.INFO_FILE))
  os.remove(os.path.join(out, B.REPORT_FILE))
  assert B.main(["--out", out, "--finalize"]) == 0
  info = records.read_info(out)
  assert (info["fbank"]["downmix"], info["frames"]["span"]) == ("first", "whole")
  report = json.load(open(os.path.join(out, B.REPORT_FILE)))["splits"]["train"]
  assert (report["downmix"], report["frame_span"]) == ("first", "whole")
  # A plan from before the options: its shards hold the earlier mix. Resuming with the new
  # default is refused; finalizing them records no downmix (readers then warn).
  plan_path = os.path.join(out, B.STATE_DIR, "train", "plan.json")
  plan = json.load(open(plan_path))
  del plan["downmix"], plan["frame_span"]
  json.dump(plan, open(plan_path, "w"))
  os.remove(os.path.join(out, records.INFO_FILE))
  with pytest.raises(B.InputError, match="downmix None before, 'mean' now"):
    B.build(json_path, out, process_index=1, **kw)
  assert B.main(["--out", out, "--finalize"]) == 0
  info = records.read_info(out)
  assert "downmix" not in info["fbank"] and info["frames"]["span"] == "first"


def _write_timed_clip(path, seconds=20.0, fps=10):
  """A video whose frame colour tells its second (red = 10 + 12 * second), with a tone."""
  with av.open(path, "w") as c:
    vs = c.add_stream("mpeg4", rate=fps)
    vs.width, vs.height, vs.pix_fmt = 64, 48, "yuv420p"
    vs.options = {"qscale": "2"}
    as_ = c.add_stream("aac", rate=16000, layout="mono")
    for i in range(int(seconds * fps)):
      img = np.full((48, 64, 3), 60, np.uint8)
      img[..., 0] = 10 + 12 * (i // fps)
      c.mux(vs.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
    c.mux(vs.encode(None))
    frame = av.AudioFrame.from_ndarray(_tone(16000, 1, seconds, 0.3), format="fltp",
                                       layout="mono")
    frame.sample_rate, frame.pts = 16000, 0
    c.mux(as_.encode(frame))
    c.mux(as_.encode(None))
  return path


def test_whole_frame_span_samples_past_10_seconds(tmp_path):
  folder = tmp_path / "v"
  folder.mkdir()
  _write_timed_clip(str(folder / "long.mp4"))
  seconds = {}
  for span in ("first", "whole"):
    out = str(tmp_path / span)
    assert B.main(["--input", str(folder), "--out", out, "--frame_span", span]) == 0
    assert records.read_info(out)["frames"]["span"] == span
    (r,) = all_records(out)
    red = [media.decode_jpeg(f)[..., 0].mean() for f in r["frames"]]
    seconds[span] = [int(round((v - 10) / 12)) for v in red]
    assert r["fbank"].shape == (998, 128)  # the audio: the first 10 s either way
  # first: frames 0, 10, ..., 90 (seconds 0..9); whole: linspace(0, 199, 10) (seconds 0..19).
  assert seconds["first"] == list(range(10))
  assert seconds["whole"] == [i // 10 for i in np.linspace(0, 199, 10).astype(int)]
  assert seconds["whole"][-1] == 19
