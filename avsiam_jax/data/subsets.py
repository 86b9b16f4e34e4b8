"""Retrieval subsets: the clips of a split that zero-shot retrieval is scored on.

The paper's R@k figures use CAV-MAE's subsets (AudioSet eval: 1,725 clips, VGGSound test:
1,545; "5 per class"), not a split's first clips. A subset file, RETRIEVAL_DIR/<name>.json,
holds the split, the clips' record indices and ids, and the rule that chose them:

  per_class  for each class in index order, the first `per_class` clips of the split (record
             order) that carry the class and were not chosen for an earlier class; a clip thus
             counts for one class only, and a class with fewer clips gets what there is. On
             AudioSet's eval split this gives about 2,635 clips (527 classes), not CAV-MAE's
             1,725; on VGGSound's test split 1,545 (309 x 5), CAV-MAE's count.
  ids        the clips of a given list, in the list's order: a text file of ids, one a line,
             or a CAV-MAE dataset JSON ({"data": [{"video_id", ...}]}, such as CAV-MAE's
             audioset_eval_5_per_class_for_retrieval_cleaned.json and
             vgg_test_5_per_class_for_retrieval_cleaned.json). Listed ids the split lacks
             (clips that could not be downloaded or decoded) are left out and counted: the
             file's `listed` gives the list, num_listed, num_found and the missing ids (an id
             listed twice counts once: num_repeated).

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


def read_ids(list_path: str) -> list[str]:
  """The clip ids of a list file: a CAV-MAE dataset JSON's data[].video_id, or one id a line."""
  try:
    with open(list_path, encoding="utf-8") as f:
      text = f.read()
  except OSError as e:
    raise FileNotFoundError(f"{list_path}: cannot read the id list: {e}") from None
  if not text.lstrip().startswith("{"):
    return [line.strip() for line in text.splitlines() if line.strip()]
  try:
    doc = json.loads(text)
  except ValueError as e:
    raise ValueError(f"{list_path}: cannot read the JSON id list: {e}") from None
  data = doc.get("data") if isinstance(doc, dict) else None
  if not isinstance(data, list):
    raise ValueError(f"{list_path}: field 'data' (CAV-MAE's list of clips) missing at the top "
                     "level")
  ids = []
  for n, item in enumerate(data):
    clip = item.get("video_id") if isinstance(item, dict) else None
    if not isinstance(clip, str) or not clip.strip():
      raise ValueError(f"{list_path}: data[{n}] field 'video_id' missing, empty or not a string")
    ids.append(clip.strip())
  return ids


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
          ids: Sequence[str] | None = None, list_path: str | None = None) -> dict[str, Any]:
  """Writes the subset `name` of `split` (per_class with k, or the given ids, or the ids of
  the list file `list_path`); returns it."""
  if list_path is not None:
    if ids is not None:
      raise ValueError("give ids or list_path, not both")
    ids = read_ids(list_path)
  info = records.read_info(dataset_dir)
  if split not in info["splits"]:
    raise ValueError(f"{dataset_dir}: no split {split!r} (has {sorted(info['splits'])})")
  all_ids = split_ids(dataset_dir, split)
  if ids is None:
    if k <= 0:
      raise ValueError(f"per_class must be positive, got {k}")
    num_classes = len(info.get("label_names", []))
    if not num_classes:
      raise ValueError(f"{dataset_dir}: the dataset has no labels to choose clips per class; "
                       "name the clips with a list (--ids), or score the whole split")
    indices = per_class(pipeline.split_example_labels(dataset_dir, split), num_classes, k)
    rule = (f"per_class {k}: for each class in index order, the first {k} clips of the split "
            "(record order) carrying it that no earlier class took")
  else:
    num_listed, repeated = len(ids), len(ids) - len(set(ids))
    ids = list(dict.fromkeys(ids))  # a repeated id counts once, where it first appears
    where = {clip_id: i for i, clip_id in enumerate(all_ids)}
    missing = [clip_id for clip_id in ids if clip_id not in where]
    indices = [where[clip_id] for clip_id in ids if clip_id in where]
    source = list_path or "a given list"
    if not indices:
      raise ValueError(f"none of the {num_listed} ids of {source} is in split {split!r} of "
                       f"{dataset_dir}, e.g. {missing[:3]}")
    rule = (f"ids: {len(indices)} of the {num_listed} clips listed in {source}"
            + (f" ({len(missing)} not in the split)" if missing else ""))
    listed = {"source": source, "num_listed": num_listed, "num_found": len(indices),
              "num_repeated": repeated, "missing": missing}
  subset = {"name": name, "split": split, "rule": rule, "num_clips": len(indices),
            "indices": indices, "ids": [all_ids[i] for i in indices]}
  if ids is not None:
    subset["listed"] = listed
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
