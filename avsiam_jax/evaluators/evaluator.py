"""The evaluation the trainer runs: zero-shot retrieval, and classification for a classifier,
over a dataset's eval split; optionally a plot of the embeddings by class (by modality on a
dataset without labels)."""
from __future__ import annotations

import collections
from typing import Any, Callable

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from avsiam_jax import sharding
from avsiam_jax.config import RunSpec
from avsiam_jax.data import pipeline, records, subsets
from avsiam_jax.evaluators import classification, retrieval

# Eval output suffix ("probs_a", ...) -> the name of its results.
RESULT_NAMES = {"a": "audio", "v": "visual", "av": "audio-visual"}


class Evaluator:
  """Calls an eval step over the eval split (each process reads its slice) and scores it.

  eval_fn(params, batch) returns per-clip outputs: "feat_a"/"feat_v" (retrieval) and, from a
  classifier, "probs_a"/"probs_v"/"probs_av".
  """

  def __init__(self, spec: RunSpec, ds_dir: str, eval_fn: Callable, mesh):
    self.spec, self.ds_dir, self.eval_fn, self.mesh = spec, ds_dir, eval_fn, mesh
    self.info = records.read_info(ds_dir)
    self.subset, self._warned = None, False
    if spec.eval.retrieval_subset:
      self.subset = subsets.load(ds_dir, spec.eval.retrieval_subset, spec.data.eval_split)

  def retrieval_rows(self, num_clips: int) -> tuple[np.ndarray, dict[str, Any]]:
    """The evaluated clips retrieval is scored on, and the set's record: how they were chosen
    (set), the clips of the split (split_clips) and, where a list named the set, how many it
    listed (listed_clips)."""
    split = self.spec.data.eval_split
    split_info = self.info["splits"][split]
    record: dict[str, Any] = {"split_clips": split_info["num_examples"]}
    if self.subset is not None:
      rows = np.asarray(self.subset["indices"], np.int64)
      if rows.size and rows.max() >= num_clips:
        raise ValueError(f"retrieval subset {self.subset['name']!r} needs clip {rows.max()} of "
                         f"split {split!r}, but only {num_clips} were evaluated (eval.max_clips)")
      record["set"] = f"subset {self.subset['name']!r} of {split!r}: {self.subset['rule']}"
      if self.subset.get("listed"):
        record["listed_clips"] = self.subset["listed"]["num_listed"]
      return rows, record
    n = min(self.spec.eval.retrieval_clips or num_clips, num_clips)
    if n < record["split_clips"]:
      # A cap, not a protocol: said in the results, and logged once.
      if not self._warned:
        self._warned = True
        logging.warning("zero-shot retrieval on the first %d of the %d clips of split %r "
                        "(eval.max_clips / eval.retrieval_clips; 0: all)", n,
                        record["split_clips"], split)
      record["set"] = f"the first {n} of the {record['split_clips']} clips of {split!r}"
    else:
      record["set"] = f"all {n} clips of {split!r}"
      if split_info.get("listed"):  # a split built from a list (MSR-VTT's test split)
        record["listed_clips"] = split_info["listed"]["num_listed"]
    return np.arange(n), record

  def outputs(self, params) -> dict[str, np.ndarray]:
    """Every eval clip's outputs and labels, gathered from all processes, padding dropped."""
    e, enc = self.spec.eval, self.spec.model.encoder
    it = pipeline.make_eval_iterator(
        self.ds_dir, self.spec.data.eval_split, batch_size=e.batch_size // jax.process_count(),
        audio_frames=enc.audio_frames, image_size=enc.image_size,
        process_index=jax.process_index(), process_count=jax.process_count(),
        max_examples=e.max_clips or None)
    outs = collections.defaultdict(list)
    for batch in it:
      out = self.eval_fn(params, sharding.global_batch(
          {"audio": batch["audio"], "video": batch["video"]}, self.mesh))
      out, mask, labels = multihost_utils.process_allgather(
          (out, batch["mask"], batch["labels"]), tiled=True)
      mask = np.asarray(mask)
      for k, v in dict(out, labels=labels).items():
        outs[k].append(np.asarray(v)[mask])
    return {k: np.concatenate(v) for k, v in outs.items()}

  def __call__(self, params, *, plot_path: str | None = None, title: str = "") -> dict[str, Any]:
    """Retrieval over eval.retrieval_subset or the first eval.retrieval_clips clips,
    classification over all evaluated clips."""
    outs = self.outputs(params)
    rows, chosen = self.retrieval_rows(len(outs["feat_a"]))
    results: dict[str, Any] = {"retrieval": dict(
        retrieval.retrieval_metrics(outs["feat_a"][rows], outs["feat_v"][rows]), **chosen),
                               "dataset": self.ds_dir}
    for key, name in RESULT_NAMES.items():
      if f"probs_{key}" in outs:
        results[name] = classification.classification_metrics(outs[f"probs_{key}"],
                                                               outs["labels"])
    if plot_path and jax.process_index() == 0:
      from avsiam_jax.evaluators import embedding_plot  # pylint: disable=import-outside-toplevel
      labels = outs["labels"][rows]
      # A dataset without labels (no classes): every clip -1, coloured by modality.
      primary = (np.where(labels.max(axis=1) > 0, labels.argmax(axis=1), -1) if labels.shape[1]
                 else np.full(len(rows), -1))
      embedding_plot.plot_embeddings(
          outs["feat_a"][rows], outs["feat_v"][rows], primary, self.info.get("label_names", []),
          plot_path, max_classes=self.spec.eval.plot_classes,
          title=f"{title}: audio and visual embeddings of the {self.spec.data.eval_split} clips")
    return results


def flat_scalars(results: dict[str, Any], prefix: str = "eval") -> dict[str, float]:
  """{"eval/retrieval/v2a_r1": ...}: the finite numbers of nested results, for TensorBoard."""
  out = {}
  for k, v in results.items():
    if isinstance(v, dict):
      out.update(flat_scalars(v, f"{prefix}/{k}"))
    elif isinstance(v, (int, float)) and np.isfinite(v):
      out[f"{prefix}/{k}"] = float(v)
  return out


def summary(results: dict[str, Any]) -> str:
  """One log line of the headline figures."""
  r = results["retrieval"]
  parts = [f"zero-shot retrieval on {r['num_clips']} clips: V->A R@1 {r['v2a_r1']:.1f} "
           f"R@5 {r['v2a_r5']:.1f} | A->V R@1 {r['a2v_r1']:.1f} R@5 {r['a2v_r5']:.1f}"]
  for name in RESULT_NAMES.values():
    if name in results:
      c = results[name]
      parts.append(f"{name}: mAP {100 * c['mAP']:.1f} top-1 {100 * c['top1']:.1f}")
  return "; ".join(parts)
