"""Model selection: the best epoch kept, and the early-stop counter of either rule."""
import json
import os

import numpy as np
import pytest

from avsiam_jax import selection
from avsiam_jax.config import ConfigError, parse
from tests.test_train import tiny_config

# A single-label run (top-1 selects the epoch): per epoch (top-1, audio-visual mAP).
EPOCHS = [(0.50, 0.50), (0.60, 0.40), (0.70, 0.45), (0.65, 0.60), (0.60, 0.55), (0.55, 0.50)]


def _results(top1, mAP):
  return {"audio-visual": {"top1": top1, "mAP": mAP}, "retrieval": {"v2a_r1": 0, "a2v_r1": 0}}


def _run(workdir, rule, patience=2, epochs=EPOCHS):
  """Epochs fed to a new tracker until it stops: (the epoch it stopped after or None, tracker)."""
  best = selection.BestTracker(workdir, patience, rule)
  for epoch, (top1, mAP) in enumerate(epochs, start=1):
    results = _results(top1, mAP)
    best.update(10 * epoch, epoch, results, selection.score(results, "top1"),
                {"x": np.full(2, epoch, np.float32)}, {"epoch": epoch})
    if best.stop:
      return epoch, best
  return None, best


def test_the_two_early_stop_rules_stop_at_different_epochs(tmp_path):
  # Patience 2. Top-1 gains at epochs 2 and 3, then none: the selection rule stops after 5.
  # The mAP falls at 2 and 3 (two epochs without a gain): the release's rule stops after 3.
  stopped, best = _run(str(tmp_path / "sel"), "selection")
  assert stopped == 5 and best.state["best_epoch"] == 3 and best.epochs_without_gain == 2
  best.close()
  stopped, best = _run(str(tmp_path / "map"), "mAP")
  # The best epoch is still top-1's; only the counter differs.
  assert stopped == 3 and best.state["best_epoch"] == 3
  assert best.state["best_mAP"] == 0.5 and best.epochs_without_gain == 2
  assert best.summary(True)["early_stop_metric"] == "mAP"
  best.close()
  # Patience 0 never stops.
  stopped, best = _run(str(tmp_path / "never"), "mAP", patience=0)
  assert stopped is None and best.state["best_epoch"] == 3
  best.close()


def test_a_restart_keeps_counting_from_selection_json(tmp_path):
  work = str(tmp_path / "w")
  stopped, best = _run(work, "mAP", epochs=EPOCHS[:2])  # mAP: one epoch without a gain
  assert stopped is None
  best.close()
  with open(os.path.join(work, "best", "selection.json")) as f:
    stored = json.load(f)
  assert stored["best_mAP"] == 0.5 and stored["epochs_since_best_mAP"] == 1
  again = selection.BestTracker(work, 2, "mAP")
  assert again.epochs_without_gain == 1
  results = _results(*EPOCHS[2])
  again.update(30, 3, results, selection.score(results, "top1"), {"x": np.zeros(2, np.float32)},
               {})
  assert again.stop and again.state["best_epoch"] == 3
  again.close()


def test_older_selection_json_loads(tmp_path):
  """Written before the mAP counter: it counts on from the best epoch's figures."""
  work = str(tmp_path / "old")
  os.makedirs(os.path.join(work, "best"))
  old = {"best_step": 20, "best_epoch": 2, "metric": "audio-visual/top1", "best_score": 0.6,
         "best_results": _results(0.6, 0.4), "epochs_since_best": 1}
  with open(os.path.join(work, "best", "selection.json"), "w") as f:
    json.dump(old, f)
  for rule in ("selection", "mAP"):
    best = selection.BestTracker(work, 2, rule)
    assert best.state["best_mAP"] == 0.4 and best.epochs_without_gain == 1
    assert best.state["best_score"] == 0.6 and not best.stop
    best.close()
  with pytest.raises(ValueError, match="early_stop_metric"):
    selection.BestTracker(work, 2, "top1")


def test_early_stop_metric_config():
  c = tiny_config()
  assert parse(c, 1).eval.early_stop_metric == "selection"
  c.eval.early_stop_metric = "mAP"
  assert parse(c, 1).eval.early_stop_metric == "mAP"
  c.eval.early_stop_metric = "top1"
  with pytest.raises(ConfigError, match=r"config\.eval\.early_stop_metric: must be one of"):
    parse(c, 1)
