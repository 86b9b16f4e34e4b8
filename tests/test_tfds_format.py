"""The TFDS format: a dataset built from real media opens with TFDS in a process without
TensorFlow, every field as the source clip decodes; the pipelines give what they gave before
the format change; the earlier format is refused, then converted; the TFDS builder module."""
import hashlib
import json
import os
import subprocess
import sys

import msgpack
import numpy as np
import pytest
from array_record.python import array_record_module

from tensorflow_datasets.proto import tf_example_pb2

from avsiam_jax.data import examples, media, pipeline, records
from data_prep import build as B
from data_prep import convert, tfds_builder
from test_pipeline import N_MAIN, _main_examples, _write

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# sha256 of the batches below, computed by the pipelines before the format change (msgpack
# records read by Grain's ArrayRecordDataSource) on test_pipeline's main dataset.
GOLDEN = {
    "pretrain": "737d16da911e109a67b22eec81600d1f76e466d45236900c780a65141cf81115",
    "finetune": "833c2da03181eb57a8c3c0fc9c825cc49a720c7f6c8299851cad059cd43b7aef",
    "finetune_balanced": "d7732c8e607440655eda6e141106099f82081368627598a746685efaf6c58d39",
    "eval": "8629485951019aa1c123a85872a411ff4bf58745368a9eaad698a1a692c74dd1",
}


def _digest(batches):
  h = hashlib.sha256()
  for b in batches:
    for k in sorted(b):
      h.update(k.encode())
      h.update(str(b[k].dtype).encode())
      h.update(str(b[k].shape).encode())
      h.update(np.ascontiguousarray(b[k]).tobytes())
  return h.hexdigest()


def _pipeline_digests(path):
  kw = dict(audio_frames=64, image_size=32)
  cases = {
      "pretrain": lambda: pipeline.make_pretrain_iterator(
          path, "train", batch_size=3, seed=5, process_index=1, process_count=2, **kw),
      "finetune": lambda: pipeline.make_finetune_iterator(
          path, "train", batch_size=3, seed=7, mixup=0.6, **kw),
      "finetune_balanced": lambda: pipeline.make_finetune_iterator(
          path, "train", batch_size=2, seed=2, balanced=True, **kw),
      "eval": lambda: pipeline.make_eval_iterator(
          path, "train", batch_size=4, process_index=1, process_count=2, **kw),
  }
  out = {}
  for name, make in cases.items():
    it = make()
    out[name] = _digest([next(it) for _ in range(2 if name == "eval" else 5)])
    it.close()
  return out


# ---------------------------------------------------------------- real media, read by TFDS


@pytest.fixture(scope="module")
def real(tmp_path_factory):
  """Two real videos built by data_prep.build into DATA_DIR/clips/1.0.0 (2 shards)."""
  import iscc_samples  # pylint: disable=import-outside-toplevel
  src = os.path.join(os.path.dirname(iscc_samples.__file__), "files", "video")
  root = tmp_path_factory.mktemp("tfds")
  folder = root / "videos"
  folder.mkdir()
  videos = {"a": os.path.join(src, "demo.mp4"), "b": os.path.join(src, "demo.webm")}
  for clip_id, path in videos.items():
    os.symlink(path, folder / (clip_id + os.path.splitext(path)[1]))
  (root / "labels.csv").write_text('file,labels\na.mp4,"speech,music"\nb.webm,music\n')
  out = root / "data" / "clips" / "1.0.0"
  report = B.build(str(folder), str(out), labels=str(root / "labels.csv"), num_shards=2,
                   verbose=False)
  assert report["num_examples"] == 2
  return {"out": str(out), "data_dir": str(root / "data"), "videos": videos,
          "labels": {"a": [0, 1], "b": [0]}}


_READER = r"""
import importlib.util, json, sys
# The requirements hold no TensorFlow: this process reads the dataset without it.
assert importlib.util.find_spec("tensorflow") is None, "TensorFlow is installed here"
import numpy as np
import tensorflow_datasets as tfds
out, data_dir, dump = sys.argv[1:]
builder = tfds.builder_from_directory(out)
by_dir = builder.as_data_source("train")
by_name = tfds.data_source("clips", split="train", data_dir=data_dir, download=False)
arrays = {}
for i in range(len(by_dir)):
  ex, again = by_dir[i], by_name[i]
  clip_id = ex["id"].decode()
  assert again["id"].decode() == clip_id
  arrays[clip_id + "/frames"] = np.stack(ex["frames"])
  arrays[clip_id + "/fbank"] = ex["fbank"]
  arrays[clip_id + "/labels"] = np.asarray(ex["labels"])
  assert np.array_equal(np.stack(again["frames"]), arrays[clip_id + "/frames"])
np.savez(dump, **arrays)
json.dump({"names": builder.info.features["labels"].feature.names,
           "avsiam": builder.info.metadata["avsiam"],
           "num_shards": builder.info.splits["train"].num_shards,
           "tensorflow": "tensorflow" in sys.modules}, open(dump + ".json", "w"))
"""


def test_tfds_opens_a_built_dataset_without_tensorflow(real, tmp_path):
  dump = str(tmp_path / "dump.npz")
  run = subprocess.run([sys.executable, "-c", _READER, real["out"], real["data_dir"], dump],
                       cwd=ROOT, capture_output=True, text=True, check=False)
  assert run.returncode == 0, run.stderr[-3000:]
  got = np.load(dump)
  side = json.load(open(dump + ".json"))
  assert not side["tensorflow"] and side["num_shards"] == 2
  assert side["names"] == ["music", "speech"]  # the class ids
  assert side["avsiam"]["label_names"] == ["music", "speech"]
  assert side["avsiam"]["frames"]["resize"] == "crop"
  assert side["avsiam"]["splits"]["train"]["example_labels"] == [[0, 1], [0]]
  for clip_id, path in real["videos"].items():
    clip = examples.decode_clip(path)  # the source clip, decoded again
    np.testing.assert_array_equal(got[clip_id + "/fbank"], examples.stored_fbank(clip.waveform))
    assert got[clip_id + "/fbank"].dtype == np.float16
    frames = got[clip_id + "/frames"]
    assert frames.shape == (records.NUM_FRAMES, 224, 224, 3) and frames.dtype == np.uint8
    for t in range(records.NUM_FRAMES):
      # TFDS's JPEG decoding of the stored frame is ours, and near the source frame.
      np.testing.assert_array_equal(frames[t], media.decode_jpeg(media.encode_jpeg(clip.frames[t])))
      assert np.abs(frames[t].astype(int) - clip.frames[t]).mean() < 4
    assert got[clip_id + "/labels"].tolist() == real["labels"][clip_id]


def test_the_pipelines_reader_gives_what_tfds_decodes(real):
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  source = records.open_split(real["out"], "train")
  decoded = tfds.builder_from_directory(real["out"]).as_data_source("train")
  assert len(source) == len(decoded) == 2
  for i, clip_id in enumerate(("a", "b")):
    got, ref = source[i], decoded[i]
    assert got["id"] == ref["id"].decode() == clip_id
    assert got["labels"].tolist() == list(ref["labels"]) == real["labels"][clip_id]
    np.testing.assert_array_equal(got["fbank"], ref["fbank"])
    source_clip = examples.decode_clip(real["videos"][clip_id])
    assert got["frames"] == examples.stored_frames(source_clip.frames)
    for t in range(records.NUM_FRAMES):
      np.testing.assert_array_equal(media.decode_jpeg(got["frames"][t]), ref["frames"][t])


# ---------------------------------------------------------------- before and after the change


def test_pipelines_give_what_they_gave_before_the_format_change(tmp_path):
  path = _write(str(tmp_path / "ds"), _main_examples(), N_MAIN, store_labels=True)
  assert _pipeline_digests(path) == GOLDEN


def _write_earlier_format(path, clips, num_classes, shards=2):
  """A dataset as the earlier code wrote it: msgpack records, its own dataset_info.json."""

  def pack(obj):
    if isinstance(obj, np.ndarray):
      return {"__ndarray__": True, "dtype": obj.dtype.str, "shape": list(obj.shape),
              "data": obj.tobytes()}
    raise TypeError(type(obj))

  os.makedirs(path)
  per, names = -(-len(clips) // shards), []
  for s in range(shards):
    names.append(f"train-{s:05d}-of-{shards:05d}.array_record")
    writer = array_record_module.ArrayRecordWriter(os.path.join(path, names[-1]), "group_size:1")
    for clip in clips[s * per:(s + 1) * per]:
      writer.write(msgpack.packb(clip, default=pack, use_bin_type=True))
    writer.close()
  info = {"label_names": [f"c{c}" for c in range(num_classes)],
          "splits": {"train": {"shards": names, "num_examples": len(clips),
                               "example_labels": [c["labels"].tolist() for c in clips]}},
          "format_version": 1}
  with open(os.path.join(path, records.INFO_FILE), "w") as f:
    json.dump(info, f)
  return path


def test_earlier_format_is_refused_then_converted_in_place(tmp_path, capsys):
  path = _write_earlier_format(str(tmp_path / "old"), _main_examples(), N_MAIN)
  command = f"python -m data_prep.convert --dataset {path}"
  with pytest.raises(records.FormatError, match="earlier format") as e:
    pipeline.make_pretrain_iterator(path, "train", batch_size=2)
  assert command in str(e.value)
  with pytest.raises(B.InputError, match="earlier format"):
    B.build(str(tmp_path), path, verbose=False)
  assert convert.main(["--dataset", path]) == 0
  assert sorted(os.listdir(path)) == sorted(
      ["dataset_info.json", "features.json", "labels.labels.txt", "metadata.json",
       "old-train.array_record-00000-of-00002", "old-train.array_record-00001-of-00002"])
  assert _pipeline_digests(path) == GOLDEN
  # Its stereo sources were mixed by the earlier rule: nothing claims the channel mean.
  assert "downmix" not in records.read_info(path)["fbank"]
  assert convert.main(["--dataset", path]) == 0  # a second run changes nothing
  assert "already in the current" in capsys.readouterr().out


# ---------------------------------------------------------------- the TFDS builder module


def test_tfds_builder_module_writes_what_data_prep_build_writes(real, tmp_path):
  manual = tmp_path / "manual"
  manual.mkdir()
  (manual / tfds_builder.LABELS_FILE).write_text(
      "index,mid,display_name\n0,/m/music,Music\n1,/m/speech,Speech\n")
  mids = {"a": "/m/speech,/m/music", "b": "/m/music"}
  data = [{"video_id": k, "wav": "", "video_path": real["videos"][k], "labels": mids[k]}
          for k in ("a", "b")]
  data.append({"video_id": "gone", "wav": "", "video_path": "gone.mp4", "labels": ""})
  (manual / "train.json").write_text(json.dumps({"data": data}))
  path = tfds_builder.prepare("audioset_clips", str(manual), str(tmp_path / "tfds"))
  assert path == str(tmp_path / "tfds" / "audioset_clips" / "crop" / "1.0.0")
  info = records.read_info(path)
  assert info["label_ids"] == ["/m/music", "/m/speech"]
  assert info["label_names"] == ["Music", "Speech"]
  assert set(info["splits"]) == {"train"}  # no eval.json: no eval split
  assert info["splits"]["train"]["example_labels"] == [[0, 1], [0]]
  assert info["splits"]["train"]["num_skipped"] == 1
  built, ours = records.open_split(path, "train"), records.open_split(real["out"], "train")
  assert [built[i]["id"] for i in range(2)] == ["a", "b"]
  for i in range(2):
    assert built[i]["frames"] == ours[i]["frames"]
    np.testing.assert_array_equal(built[i]["fbank"], ours[i]["fbank"])


def test_a_dataset_of_other_features_or_metadata_is_refused_naming_the_file(tmp_path):
  path = _write(str(tmp_path / "ds"), _main_examples()[:2], 2, shards=1)
  features_json = os.path.join(path, records.FEATURES_FILE)
  text = open(features_json).read()
  assert text.count('"float16"') == 1  # the fbank's dtype
  open(features_json, "w").write(text.replace('"float16"', '"float32"'))
  with pytest.raises(records.FormatError, match=f"{features_json}: feature 'fbank'"):
    pipeline.make_eval_iterator(path, "train", batch_size=2)
  open(features_json, "w").write(text)
  assert len(records.open_split(path, "train")) == 2
  json.dump({"other": 1}, open(os.path.join(path, records.METADATA_FILE), "w"))
  with pytest.raises(records.FormatError, match="metadata.json: no 'avsiam' entry"):
    records.read_info(path)


def test_an_unlabeled_dataset_without_the_labels_feature_reads_as_one_without_labels(tmp_path):
  # Another tool's unlabeled dataset: no "labels" feature, no vocabulary in the metadata.
  clips = [dict(e, labels=np.zeros(0, np.int32)) for e in _main_examples()[:3]]
  path = _write(str(tmp_path / "ds"), clips, 0, shards=1)
  features_json = os.path.join(path, records.FEATURES_FILE)
  features = json.load(open(features_json))
  del features["featuresDict"]["features"]["labels"]
  json.dump(features, open(features_json, "w"))
  meta_path = os.path.join(path, records.METADATA_FILE)
  meta = json.load(open(meta_path))
  del meta["avsiam"]["label_ids"], meta["avsiam"]["label_names"]
  json.dump(meta, open(meta_path, "w"))
  shard = os.path.join(path, records.read_info(path)["splits"]["train"]["shards"][0])
  reader = array_record_module.ArrayRecordReader(shard)
  protos = [tf_example_pb2.Example.FromString(r) for r in reader.read_all()]
  reader.close()
  writer = array_record_module.ArrayRecordWriter(shard, "group_size:1")
  for proto in protos:
    del proto.features.feature["labels"]
    writer.write(proto.SerializeToString())
  writer.close()
  info = records.read_info(path)
  assert info["label_ids"] == info["label_names"] == []
  clip = records.open_split(path, "train")[1]
  assert clip["id"] == "clip1" and clip["labels"].dtype == np.int32 and clip["labels"].size == 0
  batch = next(pipeline.make_eval_iterator(path, "train", batch_size=3, audio_frames=16,
                                           image_size=16))
  assert batch["labels"].shape == (3, 0) and batch["mask"].all()
