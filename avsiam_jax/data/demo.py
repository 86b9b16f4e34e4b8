"""The demo dataset: synthetic videos -> data_prep.build -> the same on-disk format as real data."""
from __future__ import annotations

import json
import os
import time

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
  total = train_clips + eval_clips
  logging.info("Making the demo dataset: writing %d short mp4 clips to %s", total, video_dir)
  start = time.time()

  def progress(n):
    if n % 100 == 0 and n < total:
      eta = (total - n) * (time.time() - start) / n
      logging.info("  %d/%d clips written | ETA %s", n, total, _clock(eta))
  json_path, csv_path = demo_clips.write_demo_videos(video_dir, total, seed=seed,
                                                     progress=progress)
  logging.info("Building the dataset from the clips (data_prep.build: decode, fbank, frames) "
               "into %s", dataset_dir)
  with open(json_path) as f:
    data = json.load(f)["data"]
  for split, part in (("train", data[:train_clips]), ("eval", data[train_clips:])):
    split_json = os.path.join(video_dir, f"{split}.json")
    with open(split_json, "w") as f:
      json.dump({"data": part}, f)
    report = build.build(split_json, dataset_dir, labels=csv_path, split=split,
                         workers=workers or min(2, os.cpu_count() or 1), verbose=False)
    logging.info("  %s: %d clips, %d skipped", split, report["num_examples"],
                 report["num_skipped"])
  logging.info("Demo dataset ready in %.0f s", time.time() - start)
  return dataset_dir


def _clock(seconds: float) -> str:
  return time.strftime("%H:%M:%S", time.gmtime(seconds))
