"""Retrieval subsets: the per-class rule, id lists, and the evaluator scoring only the subset."""
import json

import jax
import numpy as np
import pytest

from avsiam_jax import sharding
from avsiam_jax.config import parse
from avsiam_jax.data import pipeline, subsets
from avsiam_jax.evaluators import retrieval
from avsiam_jax.evaluators.evaluator import Evaluator
from conftest import data_file
from data_prep import retrieval_subset
from tests.test_train import tiny_config


def test_per_class_rule_counts_each_clip_once():
  labels = [[0], [0, 1], [1], [1], [2], [0], [1, 2]]
  # class 0: clips 0, 1; class 1: 2, 3 (1 is taken); class 2: 4, 6.
  assert subsets.per_class(labels, 3, 2) == [0, 1, 2, 3, 4, 6]
  assert subsets.per_class(labels, 4, 1) == [0, 1, 4]  # class 3 has no clip


def test_build_per_class_and_from_ids(demo_dataset, tmp_path, capsys):
  labels = pipeline.split_example_labels(demo_dataset, "eval")
  ids = subsets.split_ids(demo_dataset, "eval")
  subset = subsets.build(demo_dataset, "eval", "two_per_class", k=2)
  # Independently: per class, the first two clips (record order) whose label is that class.
  want = [i for c in range(4) for i in [j for j, l in enumerate(labels) if l == [c]][:2]]
  assert subset["indices"] == want and subset["ids"] == [ids[i] for i in want]
  with open(subsets.path(demo_dataset, "two_per_class")) as f:
    assert json.load(f) == subset
  # A given id list, through the CLI.
  id_file = tmp_path / "ids.txt"
  id_file.write_text("\n".join([ids[3], ids[0]]) + "\n")
  retrieval_subset.main(["--dataset", demo_dataset, "--split", "eval", "--name", "given",
                         "--ids", str(id_file)])
  assert "2 clips of split 'eval'" in capsys.readouterr().out
  assert subsets.load(demo_dataset, "given", "eval")["indices"] == [3, 0]
  with pytest.raises(ValueError, match="none of the 2 ids of a given list is in split 'eval'"):
    subsets.build(demo_dataset, "eval", "bad", ids=["nope", "gone"])
  with pytest.raises(ValueError, match="a subset of split 'eval'"):
    subsets.load(demo_dataset, "given", "train")
  with pytest.raises(FileNotFoundError, match="data_prep.retrieval_subset"):
    subsets.load(demo_dataset, "missing", "eval")


def test_evaluator_scores_retrieval_on_the_subset(demo_dataset):
  subsets.build(demo_dataset, "eval", "one_per_class", k=1)
  config = tiny_config()
  config.data.dir, config.eval.batch_size = demo_dataset, 8
  config.eval.max_clips = config.eval.retrieval_clips = 0
  config.eval.retrieval_subset = "one_per_class"
  spec = parse(config, 8)
  mesh = sharding.make_mesh(spec.mesh, jax.devices())

  def features(params, batch):  # a stand-in model: pooled raw inputs
    del params
    return {"feat_a": batch["audio"].mean(axis=1)[:, :16],
            "feat_v": batch["video"][:, 5].mean(axis=(1, 2)).repeat(6, axis=-1)[:, :16]}
  evaluator = Evaluator(spec, demo_dataset, jax.jit(features), mesh)
  outs = evaluator.outputs(None)
  results = evaluator(None)
  rows = subsets.load(demo_dataset, "one_per_class", "eval")["indices"]
  want = retrieval.retrieval_metrics(outs["feat_a"][rows], outs["feat_v"][rows])
  got = results["retrieval"]
  assert got["num_clips"] == len(rows) == len({l[0] for l in pipeline.split_example_labels(
      demo_dataset, "eval")})  # one clip per class present
  assert "one_per_class" in got["set"] and "per_class 1" in got["set"]
  for k, v in want.items():
    assert got[k] == pytest.approx(v), k
  # Without a subset: the first eval.retrieval_clips clips.
  config.eval.retrieval_subset, config.eval.retrieval_clips = "", 6
  results = Evaluator(parse(config, 8), demo_dataset, jax.jit(features), mesh)(None)
  assert results["retrieval"]["num_clips"] == 6
  assert results["retrieval"]["set"] == "the first 6 of the 10 clips of 'eval'"
  np.testing.assert_allclose(
      results["retrieval"]["v2a_r1"],
      retrieval.retrieval_metrics(outs["feat_a"][:6], outs["feat_v"][:6])["v2a_r1"])
  # A listed subset with an id the split lacks: scored on the clips found, the list counted.
  ids = subsets.split_ids(demo_dataset, "eval")
  subsets.build(demo_dataset, "eval", "listed", ids=[ids[4], "gone", ids[1], ids[8]])
  config.eval.retrieval_subset = "listed"
  got = Evaluator(parse(config, 8), demo_dataset, jax.jit(features), mesh)(None)["retrieval"]
  assert (got["num_clips"], got["listed_clips"], got["split_clips"]) == (3, 4, 10)
  want = retrieval.retrieval_metrics(outs["feat_a"][[4, 1, 8]], outs["feat_v"][[4, 1, 8]])
  for k, v in want.items():
    assert got[k] == pytest.approx(v), k


def test_cavmae_list_with_missing_ids(demo_dataset, tmp_path, capsys):
  # CAV-MAE's list format: three of its AudioSet entries (not in this dataset, as expired
  # YouTube clips are not in a real one) around three clips the split has.
  with open(data_file("cavmae_sample", "sample_json_as.json")) as f:
    absent = json.load(f)["data"][:3]
  ids = subsets.split_ids(demo_dataset, "eval")
  present = [dict(absent[0], video_id=ids[i]) for i in (7, 2, 5)]
  listed = [absent[0], present[0], present[1], absent[1], present[2], absent[2]]
  list_path = tmp_path / "audioset_eval_5_per_class_for_retrieval_cleaned.json"
  list_path.write_text(json.dumps({"data": listed}))
  assert retrieval_subset.main(["--dataset", demo_dataset, "--split", "eval", "--name", "cavmae",
                                "--ids", str(list_path)]) == 0
  out = capsys.readouterr()
  assert "3 clips of split 'eval'" in out.out and "3 of the 6 clips listed" in out.out
  assert "3 listed ids are not in the split" in out.err
  subset = subsets.load(demo_dataset, "cavmae", "eval")
  assert subset["indices"] == [7, 2, 5] and subset["ids"] == [ids[i] for i in (7, 2, 5)]
  assert subset["listed"] == {"source": str(list_path), "num_listed": 6, "num_found": 3,
                              "num_repeated": 0, "missing": [a["video_id"] for a in absent]}
  # A list the split shares nothing with is refused, naming it.
  list_path.write_text(json.dumps({"data": absent}))
  with pytest.raises(ValueError, match=f"none of the 3 ids of {list_path} is in split 'eval'"):
    subsets.build(demo_dataset, "eval", "none", list_path=str(list_path))
  list_path.write_text(json.dumps({"clips": absent}))
  with pytest.raises(ValueError, match="field 'data'"):
    subsets.build(demo_dataset, "eval", "bad", list_path=str(list_path))
