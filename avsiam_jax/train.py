"""The trainer: one loop over a task (pretraining or finetuning), and the drivers main.py calls.

  run(config, workdir)          config.mode, checked once into specs (config.py):
    pretrain                    contrastive + reconstruction losses; zero-shot retrieval eval
    finetune                    the classifier on the pretrained encoder; classification eval
    retrieval_finetune          the pretrained encoder on the contrastive loss; retrieval eval
    eval                        the workdir's selected epoch (WORKDIR/best) or latest checkpoint
    pretrain+finetune           both stages, into WORKDIR/pretrain and WORKDIR/finetune (the demo)
  train(spec, workdir)          one stage; resumes from the workdir's latest checkpoint
  evaluate_run(spec, workdir)   a finished run's checkpoint; builds no optimizer

The loop knows no task by name: a task (task.Task, implemented by pretraining.PretrainTask,
finetuning.FinetuneTask and retrieval_finetuning.RetrievalFinetuneTask) gives it its model,
optimizer groups, train and eval steps, input iterator, log fields, weight sources and
selection metric; TASKS maps a stage to its task, and run and evaluate_run choose through it.
"""
from __future__ import annotations

import os
from typing import Any

import jax
from absl import logging
from jax.experimental import multihost_utils

from avsiam_jax import (checkpoint, finetuning, paths, pretraining, progress,
                        retrieval_finetuning, selection, sharding, state, utils)
from avsiam_jax import config as config_lib
from avsiam_jax.config import ConfigError, RunSpec
from avsiam_jax.data import demo, records, subsets
from avsiam_jax.evaluators.evaluator import Evaluator, flat_scalars, summary
from avsiam_jax.task import Task
from avsiam_jax.weights import load, provenance

# Stage -> its task: (spec, num_classes) -> Task.
TASKS = {"pretrain": pretraining.PretrainTask, "finetune": finetuning.FinetuneTask,
         "retrieval_finetune": retrieval_finetuning.RetrievalFinetuneTask}


def make_task(spec: RunSpec, stage: str, num_classes: int = 0) -> Task:
  return TASKS[stage](spec, num_classes)


def parse_config(config) -> RunSpec:
  """The checked specs of a ConfigDict for the devices and processes of this run, with the model
  fields of the weights its training starts from (weights/provenance.py)."""
  return provenance.from_weights(config_lib.parse(config, jax.device_count(), jax.process_count()))


def use_compile_cache(spec: RunSpec, workdir: str, environ=os.environ) -> str | None:
  """Points JAX's persistent compilation cache at config.compile_cache_dir (default
  WORKDIR/compile_cache) unless JAX_COMPILATION_CACHE_DIR is set; returns the directory."""
  if environ.get("JAX_COMPILATION_CACHE_DIR") or spec.compile_cache_dir == "none":
    return environ.get("JAX_COMPILATION_CACHE_DIR") or None
  # A gs:// directory works too (JAX's cache goes through etils.epath): one cache for all hosts.
  path = paths.absolute(spec.compile_cache_dir or os.path.join(workdir, "compile_cache"))
  jax.config.update("jax_compilation_cache_dir", path)
  return path


def log_model_from_weights(spec: RunSpec) -> None:
  w = spec.model_from_weights
  for field, (given, taken) in w.get("changed", {}).items():
    logging.info("config.model.%s = %r, taken from %s (the config gave %r)", field, taken,
                 w["source"], given)


def run(config, workdir: str) -> dict[str, Any]:
  """What main.py calls: the stage or stages config.mode names."""
  spec = parse_config(config)
  log_model_from_weights(spec)
  use_compile_cache(spec, workdir)
  stages = config_lib.STAGES[spec.mode]
  if not stages:
    return evaluate_run(spec, workdir)
  if len(stages) == 1:
    return train(spec, workdir)
  results = {}
  for i, name in enumerate(stages):
    logging.info("Stage %d of %d, %s: %s", i + 1, len(stages), TASKS[name].title.lower(),
                 TASKS[name].about)
    results[name] = train(spec.stage(name, workdir), os.path.join(workdir, name))
    if results[name].get("preempted"):
      return results[name]
  utils.write_json(os.path.join(workdir, "results.json"), results)
  for name in stages:
    logging.info("%s: %s", TASKS[name].title, summary(results[name]))
  return results


def _dataset(spec: RunSpec, workdir: str, stage: str) -> tuple[str, dict]:
  """The dataset directory (the demo's is built here) and its info; fails before any compute."""
  _check_local_dataset(spec, workdir)
  ds_dir = config_lib.dataset_dir(spec, workdir)
  paths.makedirs(workdir)
  try:
    paths.check_writable(workdir)  # every process: each writes its checkpoint shards
  except OSError as e:
    raise ConfigError(f"--workdir {e}") from e
  if spec.data.demo and jax.process_index() == 0:
    demo.ensure_demo_dataset(ds_dir, spec.data.demo_train_clips, spec.data.demo_eval_clips,
                             seed=spec.seed)
  multihost_utils.sync_global_devices("dataset ready")
  info = records.read_info(ds_dir)
  if spec.eval.retrieval_subset:
    try:
      subset = subsets.load(ds_dir, spec.eval.retrieval_subset, spec.data.eval_split)
    except (ValueError, FileNotFoundError) as e:
      raise ConfigError(str(e)) from e
    if spec.eval.max_clips and max(subset["indices"], default=-1) >= spec.eval.max_clips:
      raise ConfigError(f"config.eval.max_clips: {spec.eval.max_clips} clips leave out part of "
                        f"retrieval subset {spec.eval.retrieval_subset!r} (it needs clip "
                        f"{max(subset['indices'])}); set it to 0 (all)")
  # A classifier needs classes; pretrain+finetune asks before its pretraining stage.
  stages = (stage, "finetune") if spec.source.get("mode") == "pretrain+finetune" else (stage,)
  if "finetune" in stages and not info.get("label_names"):
    raise ConfigError(f"{ds_dir}: the dataset has no labels (metadata.json holds no "
                      "label_names), so it cannot train or evaluate a classifier; pretraining "
                      "and zero-shot retrieval (mode=eval of a pretraining run) work on it")
  return ds_dir, info


def _check_local_dataset(spec: RunSpec, workdir: str) -> None:
  """Datasets are read from a local (or mounted) path: TFDS's ArrayRecord reader reads one clip
  at a time at random offsets, a request per clip against a bucket."""
  where = spec.data.dir or os.path.join(workdir, "demo_dataset")
  if spec.data.demo and paths.is_url(where):
    raise ConfigError(f"config.data.dir: the demo builds its dataset in the workdir (or "
                      f"config.data.dir), here the URL {where}; datasets are read from a local "
                      "path: pass --config.data.dir=/local/path (the demo builds it there)")
  if spec.data.dir and paths.is_url(spec.data.dir):
    raise ConfigError(f"config.data.dir: {spec.data.dir} is a URL; datasets are read from a "
                      "local path: copy it to each worker's disk (gcloud storage cp -r URL "
                      "/mnt/disks/) and pass that path")


def fresh_state(task: Task, fns: state.TrainFns, key) -> dict:
  """A new state drawn from `key`, with the task's pretrained weights placed in, if any.

  Whatever the weight source lacks keeps the values drawn from `key`; the fresh Adam moments
  are zero, so only the parameters change.
  """
  train_state = fns.init(key)
  if task.init_source():
    params = task.init_params(jax.device_get(train_state["params"]), key)
    train_state = dict(train_state,
                       params=state.shard_host_params(params, fns.abstract_state["params"]))
    logging.info("Initialized from %s", task.init_source())
  elif task.random_init_warning:
    logging.warning(task.random_init_warning)
  return train_state


def train(spec: RunSpec, workdir: str) -> dict[str, Any]:
  """Trains the stage spec.mode (a TASKS entry), resuming from `workdir` if it holds a
  checkpoint."""
  if spec.mode not in TASKS:
    raise ConfigError(f"config.mode {spec.mode!r}: train() runs one of {tuple(TASKS)}; use run() "
                      "for the others")
  # ----- Mesh -------------------------------------------------------------------------------
  mesh = sharding.make_mesh(spec.mesh)

  # ----- Data -------------------------------------------------------------------------------
  ds_dir, info = _dataset(spec, workdir, spec.mode)
  label_names = info["label_names"] if TASKS[spec.mode].uses_labels else []
  task = make_task(spec, spec.mode, len(label_names))
  task.check_sources()
  sched = task.schedule
  num_train = info["splits"][spec.data.train_split]["num_examples"]
  if sched.batch_size > num_train:
    raise ConfigError(f"batch size {sched.batch_size} exceeds the {num_train} training clips in "
                      f"{ds_dir}")
  steps_per_epoch = sched.steps_per_epoch(num_train)
  total_steps = sched.total_steps or sched.epochs * steps_per_epoch
  record = spec.record()
  # How the dataset's frames were made, so inference prepares files the same way.
  record["data"]["frame_resize"] = info.get("frames", {}).get("resize", "crop")
  record["data"]["frame_span"] = info.get("frames", {}).get("span", "first")
  record["data"]["downmix"] = info.get("fbank", {}).get("downmix")  # None: the earlier rule
  utils.write_json(os.path.join(workdir, checkpoint.CONFIG_FILE), record)
  if label_names:
    utils.write_json(os.path.join(workdir, checkpoint.LABELS_FILE), label_names)
  train_iter = task.train_iterator(
      ds_dir, batch_size=sched.batch_size // jax.process_count(),
      audio_frames=spec.model.encoder.audio_frames, image_size=spec.model.encoder.image_size,
      seed=spec.seed, time_shift=spec.data.time_shift, process_index=jax.process_index(),
      process_count=jax.process_count(), worker_count=spec.data.worker_count)

  # ----- Model, state and step -------------------------------------------------------------
  fns = state.make_train_fns(task, mesh, steps_per_epoch)
  n_params = sum(x.size for x in jax.tree.leaves(fns.abstract_state["params"]))
  logging.info("%s %s: %.1fM parameters; mesh %s; %d steps of batch %d", task.name,
               spec.variant, n_params / 1e6,
               dict(mesh.shape), total_steps, sched.batch_size)

  # ----- Checkpoint: resume, or start fresh (from pretrained weights if given) --------------
  init_key, step_key = jax.random.split(jax.random.key(spec.seed))
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"),
                                 every_steps=spec.checkpoint_every_steps,
                                 keep=spec.keep_checkpoints)
  latest = ckpt.latest_step()
  if latest is not None:
    train_state, data_state = ckpt.restore(latest, fns.abstract_state)
    train_iter.set_state(data_state)
    logging.info("Resumed from step %d in %s", latest, workdir)
  else:
    train_state = fresh_state(task, fns, init_key)
  try:
    load.check_initialized(train_state["params"])
  except load.WeightError as e:
    raise ConfigError(f"{workdir}: {e}") from e

  # ----- Eval -------------------------------------------------------------------------------
  evaluator = Evaluator(spec, ds_dir, fns.eval_step, mesh)
  best = selection.BestTracker(workdir, spec.eval.early_stop_epochs,
                              spec.eval.early_stop_metric) if spec.eval.every_epoch else None

  # ----- Loop -------------------------------------------------------------------------------
  logging.info("Compiling the train step, then training from step %d; a progress line every "
               "%d steps", int(train_state["step"]), spec.log_every_steps)
  logger = progress.Logger(workdir, total_steps, sched.batch_size, task.log_fields)
  stop = progress.StopRequest()
  step = int(train_state["step"])
  if best and best.stop:  # stopped early before a restart
    total_steps = step
  while step < total_steps:
    host_batch = next(train_iter)
    batch = sharding.global_batch({k: host_batch[k] for k in task.batch_keys}, mesh)
    train_state, metrics = fns.step(train_state, batch, step_key)
    step += 1
    if step % spec.log_every_steps == 0 or step == total_steps:
      logger.progress(step, jax.tree.map(float, jax.device_get(metrics)))
    if spec.eval.every_steps and step % spec.eval.every_steps == 0:
      logger.scalars(step, flat_scalars(evaluator(train_state["params"])))
    if best and step % steps_per_epoch == 0:
      epoch_results = evaluator(train_state["params"])
      logger.scalars(step, flat_scalars(epoch_results))
      metric = selection.score(epoch_results, task.selection_metric)
      if best.update(step, step // steps_per_epoch, epoch_results, metric, train_state,
                     train_iter.get_state()):
        logging.info("Epoch %d: %s %.4f, the best so far", step // steps_per_epoch, *metric)
      if best.stop:
        logging.info("Stopping early: no gain for %d epochs (early_stop_metric %s)",
                     spec.eval.early_stop_epochs, spec.eval.early_stop_metric)
        total_steps = step
    stopping = stop(step)
    if ckpt.due(step) or step == total_steps or stopping:
      ckpt.save(step, train_state, train_iter.get_state())
    if stopping:
      ckpt.close()
      logger.close()
      logging.info("Stopped at step %d; rerun the same command to resume", step)
      return {"step": step, "preempted": True}

  logging.info("Evaluating step %d on the %s split", step, spec.data.eval_split)
  results = evaluator(train_state["params"], plot_path=os.path.join(workdir, "embeddings.png"),
                      title=task.name)
  logger.scalars(step, flat_scalars(results))
  logger.close()
  ckpt.close()
  if best:
    # The released protocol reports the best epoch (selected on this same split).
    stopped_early = best.stop
    best.close()
    if best.state["best_results"] is not None:
      results = dict(best.state["best_results"], last_step=dict(results, step=step))
    results["model_selection"] = best.summary(stopped_early)
  results = dict(results, step=step)
  utils.write_json(os.path.join(workdir, "results.json"), results)
  logging.info("Step %d, %s", step, summary(results))
  return results


def eval_checkpoint(workdir: str) -> tuple[checkpoint.Run, str, str]:
  """(the checkpoint mode=eval evaluates, the run directory its results go to, which and why).

  A run directory: the epoch eval.every_epoch selected (WORKDIR/best, the figures results.json
  reports) when the run has one, else its latest checkpoint. A step directory
  WORKDIR/checkpoints/<step>: that step; its results go to WORKDIR.
  """
  try:
    named = checkpoint.load_run(workdir)
  except checkpoint.CheckpointError as e:
    raise ConfigError(f"mode=eval needs --workdir to be a training run: {e}") from e
  if os.path.abspath(named.workdir) != os.path.abspath(workdir):
    return named, named.workdir, f"step {named.step}, the step directory given"
  best_dir = os.path.join(workdir, "best")
  if os.path.exists(os.path.join(best_dir, "selection.json")):
    try:
      best = checkpoint.load_run(best_dir)
    except checkpoint.CheckpointError:
      best = None  # no epoch finished its save: the latest it is
    if best is not None:
      return best, named.workdir, (
          f"step {best.step}, the epoch eval.every_epoch selected ({best_dir}; the latest is "
          f"step {named.step}: --workdir={named.step_dir} evaluates it)")
  return named, named.workdir, f"step {named.step}, the latest checkpoint"


def evaluate_run(spec: RunSpec, workdir: str) -> dict[str, Any]:
  """mode=eval: a checkpoint of the run in `workdir` (eval_checkpoint: the selected epoch if the
  run has one, else the latest) on the configured eval split.

  The model comes from the current config, but for the switches its weights were trained with
  and what the run's task takes from its own config.json (Task.eval_spec: a classifier's loss,
  what its scores mean); the task is the run's stage (its config.json mode) in TASKS.
  """
  trained, workdir, which = eval_checkpoint(workdir)
  logging.info("mode=eval: checkpoint %s", which)
  stage = trained.config.get("mode")
  if stage not in TASKS:
    raise ConfigError(f"{trained.workdir}/{checkpoint.CONFIG_FILE}: mode {stage!r} is not a "
                      f"stage this trainer evaluates ({', '.join(TASKS)})")
  spec = provenance.from_run(spec, trained.config, workdir)
  log_model_from_weights(spec)
  ds_dir, info = _dataset(spec, workdir, stage)
  spec = TASKS[stage].eval_spec(spec, trained.config)
  task = make_task(spec, stage, len(info.get("label_names", [])))
  mesh = sharding.make_mesh(spec.mesh)
  fns = state.make_eval_fns(task, mesh)
  params = state.shard_host_params(
      jax.device_get(checkpoint.restore_params(trained, fns.abstract_params)), fns.abstract_params)
  results = Evaluator(spec, ds_dir, fns.eval_step, mesh)(
      params, plot_path=os.path.join(workdir, "embeddings.png"), title=task.name)
  results = dict(results, step=trained.step, split=spec.data.eval_split,
                 checkpoint={"dir": trained.step_dir, "which": which})
  logger = progress.Logger(workdir, trained.step, 1)
  logger.scalars(trained.step, flat_scalars(results))
  logger.close()
  utils.write_json(os.path.join(workdir, f"eval_{spec.data.eval_split}.json"), results)
  logging.info("Checkpoint step %d on %s: %s", trained.step, spec.data.eval_split,
               summary(results))
  return results
