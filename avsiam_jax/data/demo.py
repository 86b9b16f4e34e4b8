"""The demo dataset: synthetic videos -> data_prep.build -> the same on-disk format as real data."""
from __future__ import annotations

import json
import os

from absl import logging

from avsiam_jax.data import demo_clips, records


def _has_splits(dataset_dir: str, splits) -> bool:
  try:
    info = records.read_info(dataset_dir)
  except FileNotFoundError:
    return False
  return all(s in info["splits"] for s in splits)


def ensure_demo_dataset(dataset_dir: str, train_clips: int, eval_clips: int, *, seed: int = 0,
                        workers: int | None = None) -> str:
  """Builds `train` and `eval` splits into dataset_dir unless they are there already."""
  from data_prep import build  # pylint: disable=g-import-not-at-top

  if _has_splits(dataset_dir, ("train", "eval")):
    return dataset_dir
  video_dir = dataset_dir + "_videos"
  logging.info("Writing %d demo videos to %s", train_clips + eval_clips, video_dir)
  json_path, csv_path = demo_clips.write_demo_videos(video_dir, train_clips + eval_clips, seed=seed)
  with open(json_path) as f:
    data = json.load(f)["data"]
  for split, part in (("train", data[:train_clips]), ("eval", data[train_clips:])):
    split_json = os.path.join(video_dir, f"{split}.json")
    with open(split_json, "w") as f:
      json.dump({"data": part}, f)
    build.build(split_json, dataset_dir, labels=csv_path, split=split,
                workers=workers or min(2, os.cpu_count() or 1))
  return dataset_dir
