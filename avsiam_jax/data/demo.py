"""The demo dataset: synthetic videos -> the same records (examples.py) as real data."""
from __future__ import annotations

import csv
import itertools
import json
import multiprocessing
import os
import time
from concurrent import futures

from absl import logging

from avsiam_jax import utils
from avsiam_jax.data import demo_clips, examples, records


def _has_splits(dataset_dir: str, splits) -> bool:
  try:
    info = records.read_info(dataset_dir)
  except FileNotFoundError:
    return False
  if "downmix" not in info["fbank"]:
    # Made before the down-mix fix: its stereo clips are 1.41x too loud. Made again.
    logging.info("%s: made with the earlier audio down-mix; making it again", dataset_dir)
    return False
  return all(s in info["splits"] for s in splits)


def _read_labels(csv_path: str) -> tuple[list[str], list[str]]:
  """(mids, display names) in index order, from demo_clips' index,mid,display_name CSV."""
  with open(csv_path, newline="", encoding="utf-8") as f:
    rows = sorted(csv.DictReader(f), key=lambda r: int(r["index"]))
  return [r["mid"] for r in rows], [r["display_name"] for r in rows]


def ensure_demo_dataset(dataset_dir: str, train_clips: int, eval_clips: int, *, seed: int = 0,
                        workers: int | None = None) -> str:
  """Builds `train` and `eval` splits into dataset_dir unless they are there already.

  One shard per split, named and filled as `python -m data_prep.build` would; the records are
  made in `workers` processes (default: up to 2).
  """
  if _has_splits(dataset_dir, ("train", "eval")):
    return dataset_dir
  video_dir = dataset_dir + "_videos"
  total = train_clips + eval_clips
  logging.info("Making the demo dataset: writing %d short mp4 clips to %s", total, video_dir)
  start = time.time()
  json_path, csv_path = demo_clips.write_demo_videos(video_dir, total, seed=seed,
                                                     progress=_progress(total, "written"))
  logging.info("Making their records (decode, fbank, JPEG frames) in %s", dataset_dir)
  with open(json_path) as f:
    data = json.load(f)["data"]
  label_ids, label_names = _read_labels(csv_path)
  index = {mid: i for i, mid in enumerate(label_ids)}
  labels = [sorted({index[m.strip()] for m in item["labels"].split(",") if m.strip()})
            for item in data]
  # The video file carries the audio track too: no separate audio file.
  clips = [(item["video_id"], item["video_path"], l) for item, l in zip(data, labels)]
  # One BLAS thread in the workers, even where the user set more: the fbank's float32 sums
  # round differently with several threads, which flips a few float16 values; with one, the
  # demo's records are the dataset builder's (its workers' default), bit for bit.
  with utils.one_blas_thread(force=True), futures.ProcessPoolExecutor(
      workers or min(2, os.cpu_count() or 1),
      mp_context=multiprocessing.get_context("spawn")) as pool:
    made = _logged(pool.map(_make_example, clips, chunksize=4), total)
    # One shard per split, consumed in order from the one stream of records.
    records.write_dataset(dataset_dir, {"train": [itertools.islice(made, train_clips)],
                                        "eval": [itertools.islice(made, eval_clips)]},
                          label_ids=label_ids, label_names=label_names)
  logging.info("  train: %d clips, eval: %d clips", train_clips, eval_clips)
  logging.info("Demo dataset ready in %.0f s", time.time() - start)
  return dataset_dir


def _make_example(clip):
  clip_id, video, labels = clip
  return examples.make_example(clip_id, video, labels=labels)


def _logged(made, total):
  log = _progress(total, "made into records")
  for n, example in enumerate(made, 1):
    log(n)
    yield example


def _progress(total: int, stage: str):
  """A callback that logs clip n of `total` every 100 clips, with an ETA."""
  start = time.time()

  def log(n):
    if n % 100 == 0 and n < total:
      eta = (total - n) * (time.time() - start) / n
      logging.info("  %d/%d clips %s | ETA %s", n, total, stage, _clock(eta))

  return log


def _clock(seconds: float) -> str:
  return time.strftime("%H:%M:%S", time.gmtime(seconds))
