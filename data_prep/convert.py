"""Converts a dataset of the earlier format (msgpack records) into the TFDS format.

  python -m data_prep.convert --dataset DATASET_DIR              # in place
  python -m data_prep.convert --dataset DATASET_DIR --out NEW_DIR

The earlier format: <split>-iiiii-of-nnnnn.array_record shards of msgpack records and a
dataset_info.json with a format_version. Every record is rewritten as a tf.train.Example in
the same order, so example_labels, retrieval subsets (record indices) and report.json stay
valid. In place, the new shards are written next to the old ones, then the TFDS metadata
replaces dataset_info.json, then the old shards are removed: a conversion killed half-way
leaves the earlier dataset readable by this command, which starts again.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

import msgpack
import numpy as np
from array_record.python import array_record_module

from avsiam_jax import utils
from avsiam_jax.data import records

LEGACY_VERSION = 1
_ARRAY_KEY = "__ndarray__"  # how the earlier records stored arrays


def _legacy_array(obj):
  if obj.get(_ARRAY_KEY):
    return np.frombuffer(obj["data"], dtype=np.dtype(obj["dtype"])).reshape(obj["shape"])
  return obj


def decode_legacy(data: bytes) -> dict:
  """One record of the earlier format -> the clip dict."""
  clip = msgpack.unpackb(data, object_hook=_legacy_array, raw=False)
  return {"id": str(clip["id"]), "frames": list(clip["frames"]),
          "fbank": np.asarray(clip["fbank"], np.float16),
          "labels": np.asarray(clip["labels"], np.int32).reshape(-1)}


def read_legacy_info(dataset_dir: str) -> dict:
  path = os.path.join(dataset_dir, records.INFO_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: {dataset_dir!r} is not a dataset")
  with open(path) as f:
    info = json.load(f)
  if "format_version" not in info:
    records.read_info(dataset_dir)  # raises unless it is a dataset of the current format
    raise _AlreadyConverted(f"{dataset_dir} is already in the current (TFDS) format")
  if info["format_version"] != LEGACY_VERSION:
    raise ValueError(f"{path}: format_version {info['format_version']!r}; this command "
                     f"converts {LEGACY_VERSION}")
  return info


class _AlreadyConverted(Exception):
  pass


def _legacy_clips(path: str):
  reader = array_record_module.ArrayRecordReader(path)
  try:
    for i in range(reader.num_records()):
      try:
        yield decode_legacy(reader.read([i])[0])
      except Exception as e:  # a damaged record: name it, never skip it silently
        raise ValueError(f"{path}: record {i} is not a record of the earlier format: {e}") from e
  finally:
    reader.close()


def convert(dataset_dir: str, out: str | None = None, verbose: bool = True) -> dict:
  """Converts `dataset_dir` into `out` (default: in place); returns the new info."""
  legacy = read_legacy_info(dataset_dir)
  out = os.path.abspath(out or dataset_dir)
  in_place = out == os.path.abspath(dataset_dir)
  os.makedirs(out, exist_ok=True)
  names = legacy.get("label_names", [])
  label_ids = legacy.get("label_ids", names)
  fbank, frames = legacy.get("fbank", {}), legacy.get("frames", {})
  name, version = records.dataset_name(out)
  info = {"name": name, "version": version, "label_names": names, "label_ids": label_ids,
          "splits": {}}
  # Datasets from before the frame_resize option were cropped; the earlier format predates the
  # channel mean, so no down-mix is recorded (readers then warn about stereo sources).
  info.update(records.format_info(fbank.get("max_frames", records.MAX_FBANK_FRAMES),
                                  frames.get("resize", "crop"), downmix=fbank.get("downmix")))
  renamed = {}
  for split, s in legacy["splits"].items():
    old = list(s["shards"])
    new = [records.shard_name(name, split, i, len(old)) for i in range(len(old))]
    lengths = []
    for o, n in zip(old, new):
      lengths.append(records.write_shard(os.path.join(out, n),
                                         _legacy_clips(os.path.join(dataset_dir, o)),
                                         len(label_ids)))
      if verbose:
        print(f"[{split}] {o} -> {n}: {lengths[-1]} records", flush=True)
    if sum(lengths) != s.get("num_examples", sum(lengths)):
      raise ValueError(f"{dataset_dir}: split {split!r} has {sum(lengths)} records, its "
                       f"{records.INFO_FILE} says {s['num_examples']}")
    info["splits"][split] = {"shards": new, "shard_lengths": lengths,
                             "num_skipped": s.get("num_skipped", 0),
                             "example_labels": s.get("example_labels")}
    renamed[split] = dict(zip(old, new))
  records.write_info(out, info)  # replaces the earlier dataset_info.json last
  if in_place:
    for split, pairs in renamed.items():
      _rename_build_state(out, split, pairs, name, version)
      for o in pairs:
        os.remove(os.path.join(out, o))
  else:
    for extra in ("report.json", "retrieval_subsets"):
      src = os.path.join(dataset_dir, extra)
      if os.path.isdir(src):
        shutil.copytree(src, os.path.join(out, extra), dirs_exist_ok=True)
      elif os.path.exists(src):
        shutil.copy2(src, os.path.join(out, extra))
  _rename_in_report(out, renamed)
  if verbose:
    counts = ", ".join(f"{k} {sum(v['shard_lengths'])}" for k, v in info["splits"].items())
    print(f"{out}: converted ({counts} clips); open it with "
          f"tfds.builder_from_directory({out!r})", flush=True)
  return records.read_info(out)


def _rename_build_state(out, split, pairs, name, version):
  """A later `data_prep.build` of the split finds its plan and report parts under the new names."""
  state = os.path.join(out, ".build", split)
  plan_path = os.path.join(state, "plan.json")
  if not os.path.exists(plan_path):
    return
  with open(plan_path) as f:
    plan = json.load(f)
  plan.update(name=name, version=version, shards=[pairs.get(s, s) for s in plan["shards"]])
  for o, n in pairs.items():
    part = os.path.join(state, o + ".report.json")
    if os.path.exists(part):
      with open(part) as f:
        p = json.load(f)
      p["shard"] = n
      utils.write_json(os.path.join(state, n + ".report.json"), p, every_process=True)
      os.remove(part)
  utils.write_json(plan_path, plan, every_process=True)


def _rename_in_report(out, renamed):
  path = os.path.join(out, "report.json")
  if not os.path.exists(path):
    return
  with open(path) as f:
    report = json.load(f)
  for split, pairs in renamed.items():
    entry = report.get("splits", {}).get(split)
    if entry and "shards" in entry:
      entry["shards"] = [pairs.get(s, s) for s in entry["shards"]]
  utils.write_json(path, report, every_process=True)


@utils.cli_errors(ValueError, FileNotFoundError)
def main(argv=None):
  p = argparse.ArgumentParser(prog="python -m data_prep.convert",
                              description=__doc__.splitlines()[0])
  p.add_argument("--dataset", required=True, help="a dataset folder of the earlier format")
  p.add_argument("--out", help="write the converted dataset here (default: in place)")
  args = p.parse_args(argv)
  try:
    convert(args.dataset, args.out)
  except _AlreadyConverted as e:
    print(e)
  return 0


if __name__ == "__main__":
  sys.exit(main())
