"""The on-disk dataset: a TFDS-format ArrayRecord dataset that TFDS opens without TensorFlow.

Layout of a dataset directory (TFDS's own, so `tfds.builder_from_directory(DIR)` reads it):
  dataset_info.json     TFDS: name, version, file format, per split its shard lengths and bytes
  features.json         TFDS: the feature structure below; labels.labels.txt: the class ids
  metadata.json         this project's settings, under "avsiam" (see format_info, write_info)
  <name>-<split>.array_record-00000-of-00004   one tf.train.Example per clip

Features of a clip (examples.py makes them from a clip's media):
  id:     Text
  frames: Sequence(Image jpeg, length NUM_FRAMES = 10), FRAME_SIZE = 224 px square, RGB, made
          square as metadata's frames.resize says (one of FRAME_RESIZES), sampled from the span
          frames.span says (one of FRAME_SPANS; no entry: "first")
  fbank:  Tensor float16 (T, NUM_MEL_BINS = 128), raw bytes: raw log-mel (not normalized) of the
          first MAX_SECONDS = 10 s of SAMPLE_RATE = 16 kHz mono audio, down-mixed as
          fbank.downmix says (one of DOWNMIXES; no entry: the earlier rule, see EARLIER_DOWNMIX);
          T <= fbank.max_frames
  labels: Sequence(ClassLabel), class indices (possibly none); class names = the label ids
          (AudioSet mids), the display names are metadata's label_names

A dataset without labels (MSR-VTT, a folder built without a labels CSV) has the same features
with an empty vocabulary: label_ids = label_names = [] and every clip's labels empty. Readers
also take a metadata.json without label_ids/label_names and a features.json without "labels"
(another tool's unlabeled dataset) as that. Pretraining, retrieval and embeddings work on such a
dataset; classification needs labels.

In code a clip is the dict {"id": str, "frames": [JPEG bytes], "fbank": float16 array,
"labels": int32 array}: `serialize` writes it, `open_split` reads it back.

Datasets of the earlier format (msgpack records, dataset_info.json with a format_version) are
refused with the command that converts them (data_prep/convert.py).
"""
from __future__ import annotations

import functools
import json
import os
import re
from typing import Any, Iterable, Sequence

import numpy as np
from array_record.python import array_record_module
import tensorflow_datasets as tfds
from tensorflow_datasets.proto import tf_example_pb2

# The fbank's own settings are the record's: one definition, in fbank.py.
from avsiam_jax.data.fbank import NUM_MEL_BINS, SAMPLE_RATE

FORMAT_VERSION = 2  # 1: msgpack records (refused, converted by data_prep.convert)
NUM_FRAMES = 10  # frames per clip
FRAME_SIZE = 224  # stored frames are FRAME_SIZE x FRAME_SIZE
MAX_SECONDS = 10.0  # audio and video kept from the start of a clip
MAX_FBANK_FRAMES = 1024  # default cap on stored fbank frames (10 s give 998)
# How a frame becomes FRAME_SIZE square (media.square_image): "crop" resizes the short side
# (bilinear, antialiased) and centre-crops, CAV-MAE's preprocessing; "squash" resizes the whole
# frame (bicubic, aspect ratio lost), as the released AVSiam code. Crop is the default: it keeps
# the aspect ratio, and another default would change every stored dataset and the demo's figures.
FRAME_RESIZES = ("crop", "squash")
# How multi-channel audio becomes mono (media.downmix_channels): "mean" of the channels, the
# released AVSiam loader's waveform.mean(0), or the "first" channel, CAV-MAE's `sox remix 1`.
DOWNMIXES = ("mean", "first")
# Datasets whose metadata has no fbank.downmix were built with FFmpeg's mono down-mix, which
# sums stereo channels at 1/sqrt(2) each: (L+R)/sqrt(2), log-mels ln 2 higher than the mean's.
EARLIER_DOWNMIX = "(L+R)/sqrt(2)"
REBUILD_COMMAND = "python -m data_prep.build ... --out {dir}"
# Which frames of a video the NUM_FRAMES are sampled from: "first": the first MAX_SECONDS,
# int(i * total / NUM_FRAMES); "whole": the whole video, np.linspace(0, total - 1, NUM_FRAMES)
# as the released AVSiam loader (without its random offset). The audio is the first
# MAX_SECONDS either way.
FRAME_SPANS = ("first", "whole")
INFO_FILE = "dataset_info.json"
FEATURES_FILE = "features.json"
METADATA_FILE = "metadata.json"  # TFDS's MetadataDict file
METADATA_KEY = "avsiam"  # the project's entry in TFDS's metadata.json
FILE_FORMAT = "array_record"
DATASET_VERSION = "1.0.0"  # TFDS version of a dataset whose folder name is not a version
CONVERT_COMMAND = "python -m data_prep.convert --dataset {dir}"
DESCRIPTION = "Audio-visual clips: 10 JPEG frames, a Kaldi fbank (float16) and labels per clip."


class FormatError(ValueError):
  """A dataset directory this code must not read as it is."""


# ---------------------------------------------------------------- features


def features(label_ids: Sequence[str] | None) -> tfds.features.FeaturesDict:
  """The TFDS features of a clip, with `label_ids` as the class names (None: named later)."""
  for i, label in enumerate(label_ids or ()):
    if not label or "\n" in label:  # TFDS keeps class names one a line
      raise ValueError(f"label id {i} {label!r}: empty or holds a line break")
  return tfds.features.FeaturesDict({
      "id": tfds.features.Text(),
      "frames": tfds.features.Sequence(
          tfds.features.Image(shape=(FRAME_SIZE, FRAME_SIZE, 3), encoding_format="jpeg"),
          length=NUM_FRAMES),
      "fbank": tfds.features.Tensor(shape=(None, NUM_MEL_BINS), dtype=np.float16,
                                    encoding=tfds.features.Encoding.BYTES),
      "labels": tfds.features.Sequence(tfds.features.ClassLabel(
          names=None if label_ids is None else list(label_ids))),
  })


@functools.lru_cache(maxsize=8)
def _serializer(num_classes: int) -> tfds.features.FeaturesDict:
  # Class names do not enter the bytes; the count bounds the labels.
  return features([f"c{i}" for i in range(num_classes)])


def tfds_example(example: dict[str, Any]) -> dict[str, Any]:
  """One clip dict -> the values `features` encodes (frames stay the given JPEG bytes)."""
  return {"id": example["id"], "frames": [bytes(f) for f in example["frames"]],
          "fbank": np.asarray(example["fbank"], np.float16),
          "labels": np.asarray(example["labels"], np.int64).reshape(-1)}


def serialize(example: dict[str, Any], num_classes: int) -> bytes:
  """One clip dict -> its tf.train.Example bytes."""
  return _serializer(num_classes).serialize_example(tfds_example(example))


def parse_clip(record: bytes) -> dict[str, Any]:
  """A stored tf.train.Example -> the clip dict, read straight from the proto.

  What TFDS's decoding of `features` gives (tests compare the two), in a fifth of the time: the
  pipelines read one clip per sample. read_info checks that the dataset has these features.
  """
  f = tf_example_pb2.Example.FromString(record).features.feature
  try:
    fbank = np.frombuffer(f["fbank"].bytes_list.value[0], np.float16).reshape(-1, NUM_MEL_BINS)
    labels = f["labels"].int64_list.value if "labels" in f else ()  # absent: unlabeled
    return {"id": f["id"].bytes_list.value[0].decode(),
            "frames": list(f["frames"].bytes_list.value), "fbank": fbank,
            "labels": np.asarray(labels, np.int32)}
  except (KeyError, IndexError, ValueError) as e:
    raise FormatError(f"a record without the clip features ({type(e).__name__}: {e})") from None


# ---------------------------------------------------------------- shards


def dataset_name(dataset_dir: str) -> tuple[str, str]:
  """(TFDS name, version) of a new dataset in `dataset_dir`.

  DATA_DIR/NAME/X.Y.Z gives (NAME, X.Y.Z), so `tfds.data_source(NAME, data_dir=DATA_DIR)` finds
  it; any other folder gives its own name and DATASET_VERSION.
  """
  path = os.path.normpath(os.path.abspath(dataset_dir))
  base, version = os.path.basename(path), DATASET_VERSION
  if tfds.core.Version.is_valid(base):
    version, base = base, os.path.basename(os.path.dirname(path))
  name = re.sub(r"[^a-z0-9]+", "_", base.lower()).strip("_") or "avsiam"
  return (name if name[0].isalpha() else "ds_" + name), version


def shard_name(name: str, split: str, index: int, count: int) -> str:
  """TFDS's default file name of shard `index` of `count`."""
  return f"{name}-{split}.{FILE_FORMAT}-{index:05d}-of-{count:05d}"


def write_shard(path: str, examples: Iterable[dict[str, Any]], num_classes: int) -> int:
  """Writes one shard atomically (temp file, then rename); returns the record count."""
  tmp = path + ".tmp"
  writer = array_record_module.ArrayRecordWriter(tmp, "group_size:1")
  n = 0
  for example in examples:
    writer.write(serialize(example, num_classes))
    n += 1
  writer.close()
  os.replace(tmp, path)
  return n


# ---------------------------------------------------------------- metadata


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> str:
  """`value` itself, or ValueError naming the setting unless it is one of `choices`."""
  if value not in choices:
    raise ValueError(f"{name} {value!r}: expected one of {', '.join(map(repr, choices))}")
  return value


def check_frame_resize(frame_resize: str) -> str:
  return _check_choice("frame_resize", frame_resize, FRAME_RESIZES)


def check_downmix(downmix: str) -> str:
  return _check_choice("downmix", downmix, DOWNMIXES)


def check_frame_span(frame_span: str) -> str:
  return _check_choice("frame_span", frame_span, FRAME_SPANS)


def earlier_downmix_message(dataset_dir: str) -> str:
  """What a dataset without fbank.downmix holds, and how to rebuild it (pipeline logs it)."""
  return (f"{dataset_dir}: {METADATA_FILE} records no audio down-mix (fbank.downmix): the "
          f"dataset was built with the earlier rule, {EARLIER_DOWNMIX}, so stereo sources in it "
          "were mixed at 1/sqrt(2) per channel (their log-mels +ln 2 too high; mono sources are "
          f"not affected). Rebuild it with `{REBUILD_COMMAND.format(dir=dataset_dir)}` "
          "(--downmix mean, the default: the released AVSiam loader's mean of the channels)")


def format_info(max_frames: int, frame_resize: str = "crop", downmix: str | None = "mean",
                frame_span: str = "first") -> dict[str, Any]:
  """The "fbank" and "frames" entries of the metadata: how the records were made.

  `downmix` None leaves the entry out: records made with the earlier down-mix (EARLIER_DOWNMIX).
  """
  fbank = {"sample_rate": SAMPLE_RATE, "num_mel_bins": NUM_MEL_BINS, "max_frames": max_frames,
           "max_seconds": MAX_SECONDS, "dtype": "float16"}
  if downmix is not None:
    fbank["downmix"] = check_downmix(downmix)
  return {
      "fbank": fbank,
      "frames": {"num": NUM_FRAMES, "size": FRAME_SIZE, "format": "jpeg",
                 "resize": check_frame_resize(frame_resize),
                 "span": check_frame_span(frame_span)},
  }


def _refuse_legacy(dataset_dir: str) -> None:
  path = os.path.join(dataset_dir, INFO_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"{path} not found: {dataset_dir!r} is not a dataset built by `python -m data_prep.build`")
  with open(path) as f:
    raw = json.load(f)
  if "format_version" in raw:  # the earlier format's own dataset_info.json
    command = CONVERT_COMMAND.format(dir=dataset_dir)
    raise FormatError(
        f"{dataset_dir} holds a dataset in the earlier format (msgpack records, format_version "
        f"{raw['format_version']}); convert it once with `{command}`")


def _check_features(dataset_dir: str, got: tfds.features.FeaturesDict, num_classes: int):
  want = features([f"c{i}" for i in range(num_classes)])
  for key, feature in want.items():
    have = got[key] if key in got.keys() else None
    if key == "labels" and have is None and not num_classes:
      continue  # an unlabeled dataset may leave the feature out
    same = (have is not None and type(have) is type(feature)
            and have.get_serialized_info() == feature.get_serialized_info()
            and have.get_tensor_info() == feature.get_tensor_info())
    if not same:
      raise FormatError(f"{os.path.join(dataset_dir, FEATURES_FILE)}: feature {key!r} is "
                        f"{have!r}, this code reads {feature!r}")


def builder(dataset_dir: str):
  """TFDS's read-only builder of a dataset directory, after the format checks."""
  _refuse_legacy(dataset_dir)
  return tfds.builder_from_directory(dataset_dir)


def read_info(dataset_dir: str) -> dict[str, Any]:
  """The dataset's settings and splits as one dict.

  {name, version, label_names, label_ids, fbank, frames, splits: {split: {num_examples, shards,
  shard_lengths, num_skipped, example_labels (or None), and for a split built from a list of
  clips (data_prep.build --split_list) listed: {num_listed, files, split}}}}.
  """
  return _info_of(dataset_dir, builder(dataset_dir))


def _info_of(dataset_dir: str, b) -> dict[str, Any]:
  meta = (b.info.metadata or {}).get(METADATA_KEY)
  where = os.path.join(dataset_dir, METADATA_FILE)
  if not isinstance(meta, dict):
    raise FormatError(f"{where}: no {METADATA_KEY!r} entry; not a dataset written by "
                      "`python -m data_prep.build` or data_prep/tfds_builder.py")
  if meta.get("format_version") != FORMAT_VERSION:
    raise FormatError(f"{where}: format_version {meta.get('format_version')!r}, this code reads "
                      f"{FORMAT_VERSION}")
  # No vocabulary recorded: an unlabeled dataset (the module docstring).
  label_ids = list(meta.get("label_ids", meta.get("label_names", [])))
  label_names = list(meta.get("label_names", label_ids))
  if len(label_names) != len(label_ids):
    raise FormatError(f"{where}: {len(label_ids)} label_ids but {len(label_names)} label_names")
  _check_features(dataset_dir, b.info.features, len(label_ids))
  splits = {}
  for name, split in b.info.splits.items():
    extra = meta.get("splits", {}).get(name, {})
    splits[name] = {"num_examples": split.num_examples, "shards": split.filenames,
                    "shard_lengths": list(split.shard_lengths),
                    "num_skipped": extra.get("num_skipped", 0),
                    "example_labels": extra.get("example_labels")}
    if extra.get("listed") is not None:
      splits[name]["listed"] = extra["listed"]
  return {"name": b.info.name, "version": str(b.info.version),
          "label_names": label_names, "label_ids": label_ids,
          "fbank": meta["fbank"], "frames": meta["frames"], "splits": splits}


def metadata(info: dict[str, Any]) -> dict[str, Any]:
  """The project's entry of metadata.json for `info` (read_info's layout)."""
  return {"format_version": FORMAT_VERSION, "label_ids": list(info["label_ids"]),
          "label_names": list(info["label_names"]), "fbank": info["fbank"],
          "frames": info["frames"],
          "splits": {split: dict({"num_skipped": s.get("num_skipped", 0),
                                  "example_labels": s.get("example_labels")},
                                 **({"listed": s["listed"]} if s.get("listed") else {}))
                     for split, s in sorted(info["splits"].items())}}


def write_info(dataset_dir: str, info: dict[str, Any]) -> None:
  """Writes the TFDS metadata of `info` (read_info's layout; splits need shards' lengths).

  dataset_info.json is written last, so a reader sees the earlier metadata or all the new.
  """
  name, version = info["name"], info.get("version", DATASET_VERSION)
  template = tfds.core.ShardedFileTemplate(
      data_dir=tfds.core.Path(dataset_dir), template=tfds.core.naming.DEFAULT_FILENAME_TEMPLATE,
      dataset_name=name, filetype_suffix=FILE_FORMAT)
  split_infos = []
  for split, s in sorted(info["splits"].items()):
    names = [shard_name(name, split, i, len(s["shard_lengths"]))
             for i in range(len(s["shard_lengths"]))]
    if list(s["shards"]) != names:
      raise ValueError(f"{dataset_dir}: split {split!r} shards {s['shards'][:2]}... are not "
                       f"TFDS's names {names[:2]}...")
    size = sum(os.path.getsize(os.path.join(dataset_dir, n)) for n in names)
    split_infos.append(tfds.core.SplitInfo(name=split, shard_lengths=list(s["shard_lengths"]),
                                           num_bytes=size, filename_template=template))
  ds_info = tfds.core.DatasetInfo(
      builder=tfds.core.DatasetIdentity(name=name, version=tfds.core.Version(version),
                                        data_dir=dataset_dir, module_name=__name__),
      features=features(info["label_ids"]),
      description=DESCRIPTION,
      metadata=tfds.core.MetadataDict({METADATA_KEY: metadata(info)}))
  ds_info.set_file_format(FILE_FORMAT)
  ds_info.set_splits(tfds.core.SplitDict(split_infos))
  ds_info.write_to_directory(dataset_dir)


def write_dataset(dataset_dir: str, splits: dict[str, Sequence[Iterable[dict[str, Any]]]], *,
                  label_ids: Sequence[str], label_names: Sequence[str] | None = None,
                  max_frames: int = MAX_FBANK_FRAMES, frame_resize: str = "crop",
                  downmix: str | None = "mean", frame_span: str = "first",
                  store_labels: bool = True) -> dict[str, Any]:
  """Writes whole splits in one process: {split: [shard's clips, ...]}; returns the info.

  The demo, tests and benchmarks use it; data_prep.build writes the same files from many
  processes. frame_resize, downmix and frame_span record how the clips were made (format_info).
  `store_labels`: keep every clip's labels in the metadata (class-balanced sampling without
  reading every record).
  """
  os.makedirs(dataset_dir, exist_ok=True)
  name, version = dataset_name(dataset_dir)
  info = {"name": name, "version": version, "label_ids": list(label_ids),
          "label_names": list(label_ids if label_names is None else label_names), "splits": {}}
  info.update(format_info(max_frames, frame_resize, downmix, frame_span))
  for split, shards in splits.items():
    labels, lengths = [], []
    names = [shard_name(name, split, i, len(shards)) for i in range(len(shards))]

    def seen(clips):
      for clip in clips:
        labels.append(np.asarray(clip["labels"]).tolist())
        yield clip

    for shard, clips in zip(names, shards):
      lengths.append(write_shard(os.path.join(dataset_dir, shard), seen(clips), len(label_ids)))
    info["splits"][split] = {"shards": names, "shard_lengths": lengths, "num_skipped": 0,
                             "example_labels": labels if store_labels else None}
  write_info(dataset_dir, info)
  return info


# ---------------------------------------------------------------- reading


class SplitSource:
  """Random access to a split's clips (clip dicts) through TFDS's data source.

  A pickled copy (Grain's worker processes) holds the folder and split only and opens the split
  again where it is used: the metadata (every clip's labels) does not travel.
  """

  def __init__(self, dataset_dir: str, split: str):
    b = builder(dataset_dir)
    self.info = _info_of(dataset_dir, b)
    _check_split(dataset_dir, self.info, split)
    self._dir, self._split = dataset_dir, split
    self._len = self.info["splits"][split]["num_examples"]
    self._source = self._open(b)

  def _open(self, b):
    # TFDS's data source (file instructions, random access); the bytes parsed by parse_clip.
    return b.as_data_source(self._split,
                            deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)

  def __getstate__(self):
    return {"_dir": self._dir, "_split": self._split, "_len": self._len, "info": None,
            "_source": None}

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index: int) -> dict[str, Any]:
    if self._source is None:
      self._source = self._open(tfds.builder_from_directory(self._dir))
    return parse_clip(self._source[int(index)])


def open_split(dataset_dir: str, split: str) -> SplitSource:
  return SplitSource(dataset_dir, split)


def _check_split(dataset_dir: str, info: dict[str, Any], split: str) -> None:
  """Fails unless `split` exists with all its shards."""
  if split not in info["splits"]:
    raise ValueError(f"{dataset_dir}: no split {split!r}; it has {sorted(info['splits'])}")
  paths = [os.path.join(dataset_dir, s) for s in info["splits"][split]["shards"]]
  missing = [p for p in paths if not os.path.exists(p)]
  if missing:
    raise FileNotFoundError(f"{dataset_dir}: split {split!r} lists missing shard {missing[0]}")
