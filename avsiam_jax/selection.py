"""Model selection as the released finetuning does it: evaluate every epoch, keep the best
epoch's checkpoint and figures, stop after a number of epochs without improvement (of the
selection metric, or of the audio-visual mAP as the release counts).

The best checkpoint is a run directory of its own, WORKDIR/best (config.json, label names,
checkpoints/<step>), so `Predictor.load(WORKDIR/best)` and finetuning from it work as for any
run. The tracker's state (WORKDIR/best/selection.json) survives a restart.
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax

from avsiam_jax import checkpoint, paths, utils
from avsiam_jax.config import EARLY_STOP_METRICS


# A task's selection_metric -> the figure of an epoch's results it names.
METRICS = {
    "mAP": ("audio-visual/mAP", lambda r: r["audio-visual"]["mAP"]),  # multi-label classifier
    "top1": ("audio-visual/top1", lambda r: r["audio-visual"]["top1"]),  # single-label
    "a2v_r1": ("retrieval/a2v_r1", lambda r: r["retrieval"]["a2v_r1"]),  # Table 3a's figure
    "mean_r1": ("retrieval/mean_r1",
                lambda r: (r["retrieval"]["v2a_r1"] + r["retrieval"]["a2v_r1"]) / 2),
}


def score(results: dict[str, Any], metric: str) -> tuple[str, float]:
  """(name, value) of the figure that selects the model: METRICS[metric] of `results`."""
  if metric not in METRICS:
    raise ValueError(f"selection metric must be one of {tuple(METRICS)}, got {metric!r}")
  name, value = METRICS[metric]
  return name, float(value(results))


def av_map(results: dict[str, Any]) -> float | None:
  """The audio-visual mAP of an epoch's results; None for a model without one (pretraining)."""
  av = results.get("audio-visual") if results else None
  return None if av is None else float(av["mAP"])


class BestTracker:
  """Per-epoch results in, the best epoch's checkpoint and results kept.

  early_stop_metric "mAP" counts patience from the best audio-visual mAP; results without one
  (a pretraining stage) count on the selection metric.
  """

  def __init__(self, workdir: str, patience: int, early_stop_metric: str = "selection"):
    if early_stop_metric not in EARLY_STOP_METRICS:
      raise ValueError(f"early_stop_metric must be one of {EARLY_STOP_METRICS}, got "
                       f"{early_stop_metric!r}")
    self.workdir = workdir
    self.dir = os.path.join(workdir, "best")
    self.path = os.path.join(self.dir, "selection.json")
    self.patience = patience
    self.early_stop_metric = early_stop_metric
    self.state = {"best_step": None, "best_epoch": None, "metric": None, "best_score": None,
                  "best_results": None, "epochs_since_best": 0, "best_mAP": None,
                  "epochs_since_best_mAP": 0}
    if paths.exists(self.path):
      stored = json.loads(paths.path(self.path).read_text())
      if "best_mAP" not in stored:
        # Written before the mAP counter: the best epoch's mAP and its count are what is known.
        stored.update(best_mAP=av_map(stored.get("best_results")),
                      epochs_since_best_mAP=stored.get("epochs_since_best", 0))
      self.state = stored
    self.ckpt = checkpoint.Checkpointer(os.path.join(self.dir, "checkpoints"), every_steps=0,
                                        keep=1)

  def update(self, step: int, epoch: int, results: dict[str, Any], metric: tuple[str, float],
             train_state, data_state) -> bool:
    """Records an epoch's results; saves its checkpoint if it is the best so far."""
    name, value = metric
    best = self.state["best_score"]
    improved = best is None or value > best
    if improved:
      self.ckpt.save(step, train_state, data_state)
      self.ckpt.manager.wait_until_finished()
      if jax.process_index() == 0:
        for f in (checkpoint.CONFIG_FILE, checkpoint.LABELS_FILE):
          src = paths.path(self.workdir) / f
          if src.exists():
            src.copy(paths.path(self.dir) / f, overwrite=True)
      self.state.update(best_step=step, best_epoch=epoch, metric=name, best_score=value,
                        best_results=results, epochs_since_best=0)
    else:
      self.state["epochs_since_best"] += 1
    m = av_map(results)
    if m is not None:
      if self.state["best_mAP"] is None or m > self.state["best_mAP"]:
        self.state.update(best_mAP=m, epochs_since_best_mAP=0)
      else:
        self.state["epochs_since_best_mAP"] += 1
    utils.write_json(self.path, self.state)  # process 0
    return improved

  @property
  def epochs_without_gain(self) -> int:
    """The early-stop counter: epochs since the best of early_stop_metric."""
    if self.early_stop_metric == "mAP" and self.state["best_mAP"] is not None:
      return self.state["epochs_since_best_mAP"]
    return self.state["epochs_since_best"]

  @property
  def stop(self) -> bool:
    return 0 < self.patience <= self.epochs_without_gain

  def summary(self, stopped_early: bool) -> dict[str, Any]:
    """What results.json says about the selection."""
    return {"every_epoch": True, "metric": self.state["metric"],
            "best_step": self.state["best_step"], "best_epoch": self.state["best_epoch"],
            "best_score": self.state["best_score"], "early_stop_epochs": self.patience,
            "early_stop_metric": self.early_stop_metric,
            "stopped_early": stopped_early, "checkpoint": self.dir,
            "note": "figures of the best epoch on the eval split, which also selected it"}

  def close(self) -> None:
    self.ckpt.close()
