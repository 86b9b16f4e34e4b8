"""MSR-VTT-shaped data (a video folder, videodatainfo JSONs, an id list) -> a dataset without
labels -> pretraining on unlabeled clips, zero-shot retrieval on every test clip, embeddings;
classification refused on it."""
import glob
import json
import os

import numpy as np
import pytest
from PIL import Image

from avsiam_jax import embed, train
from avsiam_jax.config import ConfigError
from avsiam_jax.data import records
from avsiam_jax.evaluators import embedding_plot, retrieval
from configs import common
from data_prep import build as B
from tests.test_data_prep import write_media
from tests.test_train import tiny_config

TRAIN_VAL, TEST = range(0, 8), range(8, 16)  # demo videos as video0 ... video15
NO_SOUND, MISSING = "video16", "video17"  # listed for test: a video without sound, no file


def _videodatainfo(path, splits):
  with open(path, "w") as f:
    json.dump({"info": {"year": 2016}, "videos": [
        {"category": 0, "url": "", "video_id": vid, "start time": 0.0, "end time": 3.0,
         "split": split, "id": int(vid[5:])} for vid, split in splits]}, f)
  return str(path)


@pytest.fixture(scope="module")
def msrvtt(demo_dataset, tmp_path_factory):
  """MSR-VTT's layout (TrainValVideo/, TestVideo/, its two videodatainfo JSONs) over demo videos,
  built into split test (both JSONs) and train (a text id list)."""
  root = tmp_path_factory.mktemp("msrvtt")
  # The demo dataset's source videos (demo.ensure_demo_dataset keeps them beside it).
  demo_videos = sorted(glob.glob(os.path.join(demo_dataset + "_videos", "videos", "*.mp4")))
  for sub, ids in (("TrainValVideo", TRAIN_VAL), ("TestVideo", TEST)):
    os.makedirs(root / sub)
    for i in ids:
      os.symlink(demo_videos[i], root / sub / f"video{i}.mp4")
  write_media(str(root / "TestVideo" / f"{NO_SOUND}.mp4"), audio=False)
  train_val = _videodatainfo(root / "train_val_videodatainfo.json",
                             [(f"video{i}", "train" if i < 6 else "validate") for i in TRAIN_VAL])
  test = _videodatainfo(root / "test_videodatainfo.json",
                        [(f"video{i}", "test") for i in TEST] + [(NO_SOUND, "test"),
                                                                 (MISSING, "test")])
  id_list = root / "train_list.txt"
  id_list.write_text("video0\nvideo1\n\nvideo2\nvideo3\n")
  out = str(root / "ds")
  reports = {
      "test": B.build(str(root), out, split="test", split_list=[train_val, test],
                      verbose=False),
      "train": B.build(str(root), out, split="train", split_list=[str(id_list)],
                       verbose=False)}
  return dict(root=root, out=out, reports=reports, json=[train_val, test], id_list=str(id_list))


def test_split_lists_build_the_listed_clips_and_report_the_rest(msrvtt):
  test = msrvtt["reports"]["test"]
  assert test["finalized"] and test["num_examples"] == len(TEST)
  assert {s["id"]: s["reason"] for s in test["skipped"]} == {NO_SOUND: "no_audio",
                                                             MISSING: "missing_file"}
  assert test["listed"] == {"files": msrvtt["json"], "num_listed": len(TEST) + 2,
                            "num_built": len(TEST)}
  with open(os.path.join(msrvtt["out"], B.REPORT_FILE)) as f:
    assert json.load(f)["splits"]["test"]["listed"]["num_built"] == len(TEST)
  info = records.read_info(msrvtt["out"])
  assert info["label_ids"] == info["label_names"] == []
  assert info["splits"]["test"]["listed"] == {
      "files": ["train_val_videodatainfo.json", "test_videodatainfo.json"],
      "num_listed": len(TEST) + 2}
  source = records.open_split(msrvtt["out"], "test")
  # The list's ids and order, wherever the files are; no labels.
  assert [source[i]["id"] for i in range(len(source))] == [f"video{i}" for i in TEST]
  assert all(source[i]["labels"].size == 0 for i in range(len(source)))
  train_ids = records.open_split(msrvtt["out"], "train")
  assert [train_ids[i]["id"] for i in range(4)] == ["video0", "video1", "video2", "video3"]
  assert msrvtt["reports"]["train"]["listed"]["num_listed"] == 4


def test_bad_split_lists_are_refused_before_any_work(msrvtt, tmp_path):
  root, (train_val, test) = str(msrvtt["root"]), msrvtt["json"]
  out = str(tmp_path / "ds")
  with pytest.raises(B.InputError, match=r"list no video of that split; they have test \(10\), "
                     r"train \(6\), validate \(2\)"):
    B.build(root, out, split="eval", split_list=[train_val, test], verbose=False)
  other = _videodatainfo(tmp_path / "other.json", [("video3", "test")])
  with pytest.raises(B.InputError, match=r"videos\[0\]: video 'video3' is in split 'test', but "):
    B.build(root, out, split="test", split_list=[train_val, other], verbose=False)
  csv_like = tmp_path / "jsfusion.csv"
  csv_like.write_text("key,vid_key,video_id,sentence\nret0,msr7020,video7020,a man\n")
  with pytest.raises(B.InputError, match="jsfusion.csv, line 1: .* is not one clip id"):
    B.build(root, out, split_list=[str(csv_like)], verbose=False)
  header = tmp_path / "ids.txt"
  header.write_text("video_id\nvideo1\n")
  with pytest.raises(B.InputError, match="ids.txt, line 1: 'video_id' is a column name"):
    B.build(root, out, split_list=[str(header)], verbose=False)
  with pytest.raises(B.InputError, match="a listed split has no labels"):
    B.build(root, out, labels=msrvtt["id_list"], split_list=[msrvtt["id_list"]], verbose=False)
  with pytest.raises(B.InputError, match="--split_list chooses clips of a folder input"):
    B.build(train_val, out, split_list=[msrvtt["id_list"]], verbose=False)
  broken = tmp_path / "broken.json"
  broken.write_text('{"videos": [{"video_id": "video1"}]}')
  with pytest.raises(B.InputError, match=r"broken.json: videos\[0\] field 'split' missing"):
    B.build(root, out, split_list=[str(broken)], verbose=False)
  assert not os.path.exists(out)


def test_pretraining_without_labels_and_zero_shot_retrieval_on_every_test_clip(
    unlabeled_dataset, pretrained_run, msrvtt, tmp_path):
  assert records.read_info(unlabeled_dataset)["label_names"] == []
  r = pretrained_run["results"]["retrieval"]
  assert r["num_clips"] == r["split_clips"] == 10 and r["set"] == "all 10 clips of 'eval'"
  with Image.open(os.path.join(pretrained_run["work"], "embeddings.png")) as image:
    colours = {tuple(c) for c in np.asarray(image.convert("RGB")).reshape(-1, 3).tolist()}
  assert {embedding_plot._AUDIO_COLOUR, embedding_plot._VIDEO_COLOUR} <= colours  # by modality
  # mode=eval, as for a named protocol: the base configs score every clip of the split.
  paper = common.get_config("B/16", "mode=eval").eval
  config = tiny_config()
  config.mode, config.data.demo = "eval", False
  config.data.dir, config.data.eval_split = msrvtt["out"], "test"
  config.eval.max_clips, config.eval.retrieval_clips = paper.max_clips, paper.retrieval_clips
  train.run(config, pretrained_run["work"])
  with open(os.path.join(pretrained_run["work"], "eval_test.json")) as f:
    saved = json.load(f)
  r = saved["retrieval"]
  assert r["num_clips"] == r["split_clips"] == msrvtt["reports"]["test"]["num_examples"]
  assert r["listed_clips"] == len(TEST) + 2 and r["set"] == f"all {len(TEST)} clips of 'test'"
  assert saved["split"] == "test" and saved["dataset"] == msrvtt["out"]
  assert "audio" not in saved  # no classification without labels

  # The same figures from the video files through `python -m avsiam_jax.embed`.
  files = [str(msrvtt["root"] / "TestVideo" / f"video{i}.mp4") for i in TEST]
  out = str(tmp_path / "emb.npz")
  assert embed.main(["--checkpoint", pretrained_run["work"], "--out", out] + files) == 0
  z = np.load(out)
  want = retrieval.retrieval_metrics(z["audio"], z["video"])
  for k in ("v2a_r1", "v2a_r5", "v2a_r10", "v2a_median_rank", "a2v_r1", "a2v_r5", "a2v_r10",
            "a2v_median_rank"):
    assert r[k] == pytest.approx(want[k]), k
  # A file without sound: embedded from its frames, reported as such.
  assert embed.main(["--checkpoint", pretrained_run["work"], "--out", out,
                     str(msrvtt["root"] / "TestVideo" / f"{NO_SOUND}.mp4")]) == 0
  z = np.load(out)
  assert z["has_audio"].tolist() == [False] and z["has_video"].tolist() == [True]


@pytest.mark.parametrize("mode", ["finetune", "pretrain+finetune"])
def test_classification_on_a_dataset_without_labels_is_refused_before_compute(
    unlabeled_dataset, tmp_path, mode):
  config = tiny_config()
  config.mode, config.data.demo, config.data.dir = mode, False, unlabeled_dataset
  with pytest.raises(ConfigError, match=f"{unlabeled_dataset}: the dataset has no labels"):
    train.run(config, str(tmp_path / "w"))
  assert not glob.glob(str(tmp_path / "w" / "**" / "checkpoints"), recursive=True)
  assert not glob.glob(str(tmp_path / "w" / "**" / "config.json"), recursive=True)
