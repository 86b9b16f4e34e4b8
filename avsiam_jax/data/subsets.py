"""Retrieval subsets: the clips of a split that zero-shot retrieval is scored on.

The paper's R@k figures use CAV-MAE's subsets (AudioSet eval: 1,725 clips, VGGSound test:
1,545; 5 per class), not a split's first clips. A subset file, RETRIEVAL_DIR/<name>.json, holds
the split, the clips' record indices and ids, and the rule that chose them:

  per_class  for each class in index order, the first `per_class` clips of the split (record
             order) that carry the class and were not chosen for an earlier class; a clip thus
             counts for one class only, and a class with fewer clips gets what there is.
  ids        the clips of a given list of ids, in the list's order.

`python -m data_prep.retrieval_subset` writes one; `--config.eval.retrieval_subset=NAME` uses
it (results.json names the set under retrieval/set).
"""
from __future__ import annotations

import json
import os
from typing import Any, Sequence

from avsiam_jax.data import pipeline, records

RETRIEVAL_DIR = "retrieval_subsets"


def path(dataset_dir: str, name: str) -> str:
  return os.path.join(dataset_dir, RETRIEVAL_DIR, f"{name}.json")


def split_ids(dataset_dir: str, split: str) -> list[str]:
  """The clip ids of a split in record order (reads every record once)."""
  source = records.open_split(dataset_dir, split)
  return [source[i]["id"] for i in range(len(source))]


def per_class(labels: Sequence[Sequence[int]], num_classes: int, k: int) -> list[int]:
  """Record indices by the per_class rule (see the module docstring), class by class."""
  by_class: dict[int, list[int]] = {c: [] for c in range(num_classes)}
  for i, clip_labels in enumerate(labels):
    for c in clip_labels:
      by_class[int(c)].append(i)
  chosen, taken = [], set()
  for c in range(num_classes):
    picked = [i for i in by_class[c] if i not in taken][:k]
    chosen += picked
    taken.update(picked)
  return chosen


def build(dataset_dir: str, split: str, name: str, *, k: int = 5,
          ids: Sequence[str] | None = None) -> dict[str, Any]:
  """Writes the subset `name` of `split` (per_class with k, or the given ids); returns it."""
  info = records.read_info(dataset_dir)
  if split not in info["splits"]:
    raise ValueError(f"{dataset_dir}: no split {split!r} (has {sorted(info['splits'])})")
  all_ids = split_ids(dataset_dir, split)
  if ids is None:
    if k <= 0:
      raise ValueError(f"per_class must be positive, got {k}")
    num_classes = len(info.get("label_names", []))
    if not num_classes:
      raise ValueError(f"{dataset_dir}: the dataset has no labels to choose clips per class")
    indices = per_class(pipeline.split_example_labels(dataset_dir, split), num_classes, k)
    rule = (f"per_class {k}: for each class in index order, the first {k} clips of the split "
            "(record order) carrying it that no earlier class took")
  else:
    where = {clip_id: i for i, clip_id in enumerate(all_ids)}
    missing = [clip_id for clip_id in ids if clip_id not in where]
    if missing:
      raise ValueError(f"{len(missing)} of the {len(ids)} ids are not in split {split!r} of "
                       f"{dataset_dir}, e.g. {missing[:3]}")
    if len(set(ids)) != len(ids):
      raise ValueError("the id list repeats ids")
    indices = [where[clip_id] for clip_id in ids]
    rule = f"ids: {len(ids)} clips from a given list"
  subset = {"name": name, "split": split, "rule": rule, "num_clips": len(indices),
            "indices": indices, "ids": [all_ids[i] for i in indices]}
  os.makedirs(os.path.dirname(path(dataset_dir, name)), exist_ok=True)
  with open(path(dataset_dir, name), "w") as f:
    json.dump(subset, f, indent=1)
  return subset


def load(dataset_dir: str, name: str, split: str) -> dict[str, Any]:
  """A subset written by `build`, checked against the split it is used on."""
  p = path(dataset_dir, name)
  if not os.path.exists(p):
    raise FileNotFoundError(f"config.eval.retrieval_subset: {p} does not exist; write it with "
                            f"`python -m data_prep.retrieval_subset --dataset {dataset_dir} "
                            f"--split {split} --name {name}`")
  with open(p) as f:
    subset = json.load(f)
  if subset["split"] != split:
    raise ValueError(f"config.eval.retrieval_subset: {p} is a subset of split "
                     f"{subset['split']!r}, but the eval split is {split!r}")
  return subset
