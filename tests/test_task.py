"""The task interface: the three tasks declare it, and train() runs a task it has never heard
of."""
import json
import os

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from avsiam_jax import optim, pretraining, selection, train
from avsiam_jax.config import parse
from avsiam_jax.models import layers
from avsiam_jax.task import Task
from tests.test_finetune import finetune_config
from tests.test_train import tiny_config


def test_the_tasks_are_tasks(demo_dataset):
  pre = train.make_task(parse(tiny_config(), 1), "pretrain")
  fine = train.make_task(parse(finetune_config(demo_dataset), 1), "finetune", 4)
  ret = train.make_task(parse(tiny_config(), 1), "retrieval_finetune")
  for task in (pre, fine, ret):
    assert isinstance(task, Task), type(task).__name__
    assert task.selection_metric in selection.METRICS
  assert (pre.selection_metric, fine.selection_metric, ret.selection_metric) == (
      "mean_r1", "top1", "a2v_r1")
  assert not pre.random_init_warning and "init_checkpoint" in fine.random_init_warning
  assert "init_checkpoint" in ret.random_init_warning
  # Each trains its own section's schedule and objective.
  assert ret.schedule == ret.spec.retrieval.schedule != pre.schedule
  assert ret.objective.weights == {"contrastive": 1.0, "reconstruction": 0.0}


class ToyModel(nnx.Module):
  """Pooled raw inputs, one projection per modality: compiles in a blink."""

  def __init__(self, mel_bins: int, *, rngs: nnx.Rngs):
    self.a = layers.Dense(mel_bins, 8, axes=(None, None), rngs=rngs)
    self.v = layers.Dense(3, 8, axes=(None, None), rngs=rngs)

  def __call__(self, audio_BxTxF, video_BxHxWx3):
    return self.a(layers.mean_pool(audio_BxTxF)), self.v(video_BxHxWx3.mean(axis=(1, 2)))


class ToyTask(pretraining.PretrainTask):
  """A third objective (pretraining's data and weights; its own name, model, optimizer, steps,
  logs and selection loss) that the loop must run without knowing it."""

  name = "toy"
  selection_metric = "a2v_r1"  # not pretraining's: the loop must ask the task
  random_init_warning = "toy: from scratch"

  def model(self, rngs):
    return ToyModel(self.spec.model.encoder.mel_bins, rngs=rngs)

  def opt_groups(self, param_keys):
    return {"toy_adam": tuple(param_keys)}

  def train_step(self, state, batch, key, *, graphdef, groups, schedule):
    del key

    def loss_fn(params):
      fa, fv = nnx.merge(graphdef, params)(batch["audio"], batch["video"])
      return jnp.mean(jnp.square(fa - fv))
    loss, grads = jax.value_and_grad(loss_fn)(state["params"])
    params, opt = optim.apply_group(groups["toy_adam"], grads, state["opt"]["toy_adam"],
                                    state["params"])
    metrics = {"loss": loss, "toy_grad_norm": optax.tree.norm(grads),
               "lr": schedule(state["step"])}
    return {"params": params, "opt": {"toy_adam": opt}, "step": state["step"] + 1}, metrics

  def eval_step(self, params, batch, *, graphdef):
    fa, fv = nnx.merge(graphdef, params)(batch["audio"], batch["video"][:, self.spec.eval.frame])
    return {"feat_a": fa, "feat_v": fv}

  def log_fields(self, metrics):
    return f"toy loss {metrics['loss']:.4f}"


def test_train_runs_a_new_task_from_the_registry(demo_dataset, tmp_path, monkeypatch, caplog):
  assert isinstance(ToyTask(parse(tiny_config(), 1)), Task)
  monkeypatch.setitem(train.TASKS, "pretrain", ToyTask)
  scored = []
  score = selection.score
  monkeypatch.setattr(selection, "score", lambda results, metric: scored.append(metric) or score(
      results, metric))
  config = tiny_config(batch=40)
  config.data.demo, config.data.dir = False, demo_dataset
  config.total_steps, config.eval.every_epoch = None, True
  config.epochs, config.log_every_steps = 2, 1
  workdir = str(tmp_path / "toy")
  # absl's logger: an earlier test in this process may have set its level above INFO.
  with caplog.at_level("INFO", logger="absl"):
    results = train.train(parse(config, jax.device_count()), workdir)
  assert results["step"] == 2  # 40 clips, batch 40
  assert scored == ["a2v_r1"] * 2
  assert results["model_selection"]["metric"] == "retrieval/a2v_r1"
  assert "toy: from scratch" in caplog.text
  with open(os.path.join(workdir, "results.json")) as f:
    assert json.load(f)["retrieval"]["num_clips"] == 10
  progress = [r.getMessage() for r in caplog.records if "toy loss" in r.getMessage()]
  assert progress, caplog.text
