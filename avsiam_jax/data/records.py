"""The on-disk dataset: ArrayRecord shards of msgpack-encoded clips plus dataset_info.json.

Layout of a dataset directory:
  dataset_info.json                        label names/ids and, per split, its shard files
  <split>-00000-of-00004.array_record      one record per clip

A record is a msgpack map (examples.py makes it from a clip's media):
  id:     str
  frames: list of JPEG bytes (NUM_FRAMES = 10 frames, FRAME_SIZE = 224 px square, RGB), made
          square as dataset_info's frames.resize says (one of FRAME_RESIZES)
  fbank:  float16 array (T, NUM_MEL_BINS = 128), raw log-mel (not normalized) of the first
          MAX_SECONDS = 10 s of SAMPLE_RATE = 16 kHz mono audio; T <= max_frames (dataset_info)
  labels: int32 array of class indices (possibly empty)
Arrays travel as {"dtype", "shape", "data"} so the format needs nothing but msgpack.
"""
from __future__ import annotations

import json
import os
from typing import Any, Iterable

import msgpack
import numpy as np
from array_record.python import array_record_module

# The fbank's own settings are the record's: one definition, in fbank.py.
from avsiam_jax.data.fbank import NUM_MEL_BINS, SAMPLE_RATE

FORMAT_VERSION = 1
NUM_FRAMES = 10  # frames per clip
FRAME_SIZE = 224  # stored frames are FRAME_SIZE x FRAME_SIZE
MAX_SECONDS = 10.0  # audio and video kept from the start of a clip
MAX_FBANK_FRAMES = 1024  # default cap on stored fbank frames (10 s give 998)
# How a frame becomes FRAME_SIZE square (media.square_image): "crop" resizes the short side
# (bilinear, antialiased) and centre-crops, CAV-MAE's preprocessing; "squash" resizes the whole
# frame (bicubic, aspect ratio lost), as the released AVSiam code. Crop is the default: it keeps
# the aspect ratio, and another default would change every stored dataset and the demo's figures.
FRAME_RESIZES = ("crop", "squash")
INFO_FILE = "dataset_info.json"
_ARRAY_KEY = "__ndarray__"


def _pack_default(obj):
  if isinstance(obj, np.ndarray):
    return {_ARRAY_KEY: True, "dtype": obj.dtype.str, "shape": list(obj.shape),
            "data": np.ascontiguousarray(obj).tobytes()}
  raise TypeError(f"cannot encode {type(obj).__name__} in a record")


def _unpack_hook(obj):
  if obj.get(_ARRAY_KEY):
    return np.frombuffer(obj["data"], dtype=np.dtype(obj["dtype"])).reshape(obj["shape"])
  return obj


def encode_example(example: dict[str, Any]) -> bytes:
  return msgpack.packb(example, default=_pack_default, use_bin_type=True)


def decode_example(data: bytes) -> dict[str, Any]:
  return msgpack.unpackb(data, object_hook=_unpack_hook, raw=False)


def shard_name(split: str, index: int, count: int) -> str:
  return f"{split}-{index:05d}-of-{count:05d}.array_record"


def write_shard(path: str, examples: Iterable[dict[str, Any]]) -> int:
  """Writes one shard atomically (temp file, then rename); returns the record count."""
  tmp = path + ".tmp"
  writer = array_record_module.ArrayRecordWriter(tmp, "group_size:1")
  n = 0
  for example in examples:
    writer.write(encode_example(example))
    n += 1
  writer.close()
  os.replace(tmp, path)
  return n


def check_frame_resize(frame_resize: str) -> str:
  """`frame_resize` itself, or ValueError naming it unless it is one of FRAME_RESIZES."""
  if frame_resize not in FRAME_RESIZES:
    raise ValueError(f"frame_resize {frame_resize!r}: expected one of "
                     f"{', '.join(map(repr, FRAME_RESIZES))}")
  return frame_resize


def format_info(max_frames: int, frame_resize: str = "crop") -> dict[str, Any]:
  """The "fbank" and "frames" entries of dataset_info.json: how the records were made."""
  return {
      "fbank": {"sample_rate": SAMPLE_RATE, "num_mel_bins": NUM_MEL_BINS,
                "max_frames": max_frames, "max_seconds": MAX_SECONDS, "dtype": "float16"},
      "frames": {"num": NUM_FRAMES, "size": FRAME_SIZE, "format": "jpeg",
                 "resize": check_frame_resize(frame_resize)},
  }


def read_info(dataset_dir: str) -> dict[str, Any]:
  path = os.path.join(dataset_dir, INFO_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"{path} not found: {dataset_dir!r} is not a dataset built by `python -m data_prep.build`")
  with open(path) as f:
    info = json.load(f)
  if info.get("format_version") != FORMAT_VERSION:
    raise ValueError(f"{path}: format_version {info.get('format_version')!r}, "
                     f"this code reads {FORMAT_VERSION}")
  return info


def write_info(dataset_dir: str, info: dict[str, Any]) -> None:
  info = dict(info, format_version=FORMAT_VERSION)
  tmp = os.path.join(dataset_dir, INFO_FILE + ".tmp")
  with open(tmp, "w") as f:
    json.dump(info, f, indent=1)
  os.replace(tmp, os.path.join(dataset_dir, INFO_FILE))


def split_paths(dataset_dir: str, split: str) -> list[str]:
  """Shard paths of a split, checked to exist."""
  info = read_info(dataset_dir)
  if split not in info["splits"]:
    raise ValueError(f"{dataset_dir}: no split {split!r}; it has {sorted(info['splits'])}")
  paths = [os.path.join(dataset_dir, s) for s in info["splits"][split]["shards"]]
  missing = [p for p in paths if not os.path.exists(p)]
  if missing:
    raise FileNotFoundError(f"{dataset_dir}: split {split!r} lists missing shard {missing[0]}")
  return paths
