"""Retrieval finetuning (mode=retrieval_finetune): from a pretraining run, contrastive steps raise
R@1 on the clips they train on, the epoch of the best audio->video R@1 is kept, and mode=eval
reads the run back; the Table 3a preset."""
import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from avsiam_jax import checkpoint, train
from avsiam_jax.config import ConfigError, parse
from avsiam_jax.models.avsiam import AVSiam
from configs import base
from tests.test_train import tiny_config


def retrieval_config(data_dir, init_checkpoint, mode="retrieval_finetune"):
  """Retrieval on the 40 training clips themselves: what contrastive steps fit."""
  c = tiny_config()
  c.mode = mode
  c.data.demo, c.data.dir, c.data.eval_split = False, data_dir, "train"
  c.finetune.init_checkpoint = init_checkpoint
  c.data.time_shift = False  # trained as evaluated (but for the random frame)
  r = c.retrieval
  r.batch_size, r.lr, r.epochs = 40, 1e-3, 8  # one step per epoch
  r.decay_start_epoch = 100
  c.eval.every_epoch, c.eval.early_stop_epochs = True, 0
  c.eval.max_clips = c.eval.retrieval_clips = 0
  c.eval.batch_size = 40
  return c


def test_retrieval_finetuning_raises_r1_and_keeps_the_best_epoch(tmp_path, demo_dataset,
                                                                 pretrained_run, caplog):
  pretrained = pretrained_run["work"]
  config = retrieval_config(demo_dataset, pretrained)
  # The starting encoder on the same clips.
  start = train.run(retrieval_config(demo_dataset, "", mode="eval"), pretrained)["retrieval"]
  assert start["num_clips"] == 40
  work = str(tmp_path / "ret")
  with caplog.at_level("INFO", logger="absl"):  # absl's level may be raised by an earlier test
    results = train.run(config, work)
  assert f"Initialized from {pretrained}" in caplog.text
  assert "reconstruction" not in caplog.text.split("Compiling the train step")[-1]
  sel = results["model_selection"]
  assert sel["metric"] == "retrieval/a2v_r1"
  r = results["retrieval"]
  assert r["a2v_r1"] == pytest.approx(sel["best_score"]) and r["num_clips"] == 40
  # Measured: A->V R@1 7.5 -> 17.5 (3 -> 7 of 40 clips), V->A 0 -> 12.5, A->V median rank
  # 14.5 -> 4.5; each check below leaves a margin of several clips.
  assert r["a2v_r1"] > start["a2v_r1"] and r["v2a_r1"] > start["v2a_r1"], (start, r)
  assert r["a2v_median_rank"] < start["a2v_median_rank"] - 4, (start, r)
  assert r["a2v_r1"] >= results["last_step"]["retrieval"]["a2v_r1"]
  with open(os.path.join(work, checkpoint.CONFIG_FILE)) as f:
    assert json.load(f)["mode"] == "retrieval_finetune"

  # The multimodal blocks came from the pretraining run and no loss reached them.
  abstract = nnx.to_pure_dict(nnx.state(nnx.eval_shape(
      lambda: AVSiam(parse(config, 1).model, rngs=nnx.Rngs(0))), nnx.Param))
  stored = [jax.device_get(checkpoint.restore_params(checkpoint.load_run(d), {
      k: abstract[k] for k in ("encoder", "mm_blocks")})) for d in (pretrained, work)]
  for a, b in zip(jax.tree.leaves(stored[0]["mm_blocks"]), jax.tree.leaves(stored[1]["mm_blocks"])):
    np.testing.assert_array_equal(a, b)
  assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(stored[0]["encoder"]),
                                                      jax.tree.leaves(stored[1]["encoder"])))

  # mode=eval picks the task from the run's config.json: the latest checkpoint's figures.
  again = train.run(retrieval_config(demo_dataset, "", mode="eval"), work)
  for k, v in results["last_step"]["retrieval"].items():
    assert again["retrieval"][k] == (v if isinstance(v, str) else pytest.approx(v, abs=1e-6)), k


def test_the_table_3a_preset_parses():
  c = base.get_config("mode=retrieval_finetune,dataset=msrvtt")
  c.finetune.init_checkpoint = os.path.dirname(__file__)  # exists; read only when training
  spec = parse(c, 8)
  assert spec.mode == "retrieval_finetune" and spec.eval.every_epoch
  assert spec.eval.max_clips == spec.eval.retrieval_clips == 0  # all 2,990 test clips
  r = spec.retrieval
  assert (r.contrastive_weight, r.reconstruction_weight, r.ratios("a"), r.ratios("v")) == (
      1.0, 0.0, (0.0,), (0.0,))
  assert r.schedule.batch_size == 256 and r.schedule.lr == 5e-5
  assert spec.schedule("retrieval_finetune") == r.schedule
  with pytest.raises(ValueError, match="dataset=msrvtt: has no classification recipe"):
    base.get_config("mode=finetune,dataset=msrvtt")
  c.retrieval.batch_size = 12
  with pytest.raises(ConfigError, match=r"config\.retrieval\.batch_size: 12"):
    parse(c, 8)
  c.retrieval.batch_size, c.finetune.init_checkpoint = 256, "/nonexistent/run"
  with pytest.raises(ConfigError, match=r"config\.finetune\.init_checkpoint: '/nonexistent"):
    parse(c, 8)
