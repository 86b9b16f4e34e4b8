"""The trainer: AVSiam pretraining with periodic checkpoints and zero-shot retrieval eval."""
from __future__ import annotations

import functools
import json
import os
import signal
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils

from avsiam_jax import checkpoint, masking, pretraining, sharding
from avsiam_jax.data import demo, pipeline, records
from avsiam_jax.evaluators import retrieval
from avsiam_jax.models.avsiam import AVSiam, AVSiamSpec
from avsiam_jax.models.vit import encoder_spec

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class ConfigError(ValueError):
  """A config or dataset problem found before any compute."""


# ----- Config -------------------------------------------------------------------------------

def model_spec(config) -> AVSiamSpec:
  m = config.model
  enc = encoder_spec(
      m.variant, image_size=m.image_size, audio_frames=m.audio_frames, mel_bins=m.mel_bins,
      audio_patch_mode=m.audio_patch_mode, audio_posemb_init=m.audio_posemb_init,
      modality_norms=m.modality_norms, double_tokens=m.double_tokens,
      separate_audio_patch=m.separate_audio_patch, block_norm_eps=m.block_norm_eps,
      final_norm_eps=m.final_norm_eps)
  enc.video_grid, enc.audio_grid  # pylint: disable=pointless-statement  # validates sizes
  return AVSiamSpec(encoder=enc, mm_depth=m.mm_depth, decoder_width=m.decoder_width,
                    decoder_depth=m.decoder_depth, decoder_heads=m.decoder_heads,
                    decoder_norm_eps=m.decoder_norm_eps)


def check_config(config, num_devices: int) -> None:
  """Everything that can be checked before any compute; raises ValueError naming the field."""
  if config.mode != "pretrain":
    raise ValueError(f"config.mode: {config.mode!r} is not supported; use 'pretrain'")
  if config.model.dtype not in DTYPES:
    raise ValueError(f"config.model.dtype must be one of {sorted(DTYPES)}, got {config.model.dtype!r}")
  model_spec(config)
  ratios = tuple(config.pretrain.mask_ratios)
  if not ratios:
    raise ValueError("config.pretrain.mask_ratios is empty")
  for r in ratios + (config.pretrain.mae_mask_ratio,):
    masking.kept_count(1000, r)
  if config.pretrain.tau <= 0:
    raise ValueError(f"config.pretrain.tau must be positive, got {config.pretrain.tau}")
  mesh_shape = sharding.mesh_shape(config.mesh, num_devices)
  data_shards = mesh_shape[0] * mesh_shape[1]
  if data_shards % jax.process_count():
    raise ValueError(f"config.mesh: data x fsdp = {data_shards} must be a multiple of the "
                     f"{jax.process_count()} processes, each of which feeds its own slice of "
                     "the batch (keep the tensor axis within a host)")
  shards = config.mesh.batch_shards or data_shards
  for name, value in (("batch_size", config.batch_size),
                      ("eval.batch_size", config.eval.batch_size)):
    if value <= 0 or value % data_shards:
      raise ValueError(f"config.{name} {value} must be a positive multiple of the {data_shards} "
                       "devices that split the batch (mesh data x fsdp)")
  try:
    masking.check_groups(config.batch_size, len(ratios), shards)
  except ValueError as e:
    raise ValueError(f"config.batch_size: {e}") from None
  if config.optim.decay_every_epochs <= 0:
    raise ValueError(f"config.optim.decay_every_epochs must be positive, got "
                     f"{config.optim.decay_every_epochs}")
  if not config.total_steps and config.epochs <= 0:
    raise ValueError("set config.epochs or config.total_steps to a positive number")
  if config.model_init and not os.path.exists(config.model_init):
    raise ValueError(f"config.model_init: {config.model_init!r} does not exist")
  if config.model_init_format not in ("converted", "vitjax", "timm", "avsiam"):
    raise ValueError("config.model_init_format must be converted, vitjax, timm or avsiam, got "
                     f"{config.model_init_format!r}")
  if not 0 <= config.eval.frame < 10:
    raise ValueError(f"config.eval.frame must be in [0, 10), got {config.eval.frame}")


def dataset_dir(config, workdir: str) -> str:
  if config.data.demo:
    return os.path.join(workdir, "demo_dataset")
  if not config.data.dir:
    raise ValueError(
        "config.data.dir is not set: build a dataset with `python -m data_prep.build ... "
        "--out DATASET_DIR` and pass --config.data.dir=DATASET_DIR")
  if not os.path.isdir(config.data.dir):
    raise FileNotFoundError(f"config.data.dir: dataset directory {config.data.dir!r} does not "
                            "exist; build one with `python -m data_prep.build`")
  return config.data.dir


# ----- Optimizer ----------------------------------------------------------------------------

def lr_schedule(config, steps_per_epoch: int):
  """Step decay in epochs: lr x rate at decay_start_epoch, and every decay_every_epochs after."""
  o = config.optim

  def schedule(step):
    epoch = step // steps_per_epoch
    decays = jnp.where(epoch >= o.decay_start_epoch,
                       (epoch - o.decay_start_epoch) // o.decay_every_epochs + 1, 0)
    return o.lr * o.decay_rate ** decays.astype(jnp.float32)
  return schedule


def make_optimizer(config, schedule) -> optax.GradientTransformation:
  o = config.optim
  # torch.optim.Adam's weight_decay is an L2 term added to the gradient before the moments.
  return optax.chain(optax.add_decayed_weights(o.weight_decay),
                     optax.scale_by_adam(b1=o.b1, b2=o.b2, eps=1e-8),
                     optax.scale_by_learning_rate(schedule))


# ----- Model state --------------------------------------------------------------------------

def create_state(config, spec: AVSiamSpec, tx, key):
  model = AVSiam(spec, rngs=nnx.Rngs(params=key), dtype=DTYPES[config.model.dtype])
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  return {"params": params, "opt": {n: tx.init(params) for n in pretraining.loss_names(config)},
          "step": jnp.zeros((), jnp.int32)}


def state_shardings(config, spec, tx, mesh, abs_model):
  """Abstract state (no allocation) and its shardings: params by logical axes, moments alike."""
  param_sh = sharding.param_shardings(nnx.state(abs_model, nnx.Param), mesh, dict(config.mesh.rules))
  shapes = jax.eval_shape(functools.partial(create_state, config, spec, tx), jax.random.key(0))
  repl = sharding.replicated(mesh)
  opt_sh = {n: optax.tree_map_params(tx, lambda _, s: s, shapes["opt"][n], param_sh,
                                     transform_non_params=lambda _: repl)
            for n in pretraining.loss_names(config)}
  return shapes, {"params": param_sh, "opt": opt_sh, "step": repl}


# ----- Update step --------------------------------------------------------------------------

class TrainFns(NamedTuple):
  init: Callable       # key -> state
  step: Callable       # (state, batch, key) -> (state, metrics); state donated
  embed: Callable      # (params, batch) -> (audio features, video features)
  abstract_state: Any  # ShapeDtypeStructs with shardings, for restoring
  graphdef: Any        # the model's structure; nnx.merge(graphdef, params) rebuilds it
  batch_shards: int    # the masking layout


def make_train_fns(config, mesh, steps_per_epoch: int) -> TrainFns:
  """Compiled init/step/embed functions with the state sharded on `mesh` as config says."""
  spec = model_spec(config)
  schedule = lr_schedule(config, steps_per_epoch)
  tx = make_optimizer(config, schedule)
  abs_model = nnx.eval_shape(
      lambda: AVSiam(spec, rngs=nnx.Rngs(0), dtype=DTYPES[config.model.dtype]))
  shapes, shardings = state_shardings(config, spec, tx, mesh, abs_model)
  graphdef = nnx.graphdef(abs_model)
  batch_sh, repl = sharding.batch_sharding(mesh), sharding.replicated(mesh)
  shards = config.mesh.batch_shards or sharding.batch_shards(mesh)
  init = jax.jit(functools.partial(create_state, config, spec, tx), out_shardings=shardings)
  step = jax.jit(
      functools.partial(pretraining.train_step, graphdef=graphdef, tx=tx, schedule=schedule, config=config,
                        batch_shards=shards),
      in_shardings=(shardings, batch_sh, repl), out_shardings=(shardings, repl),
      donate_argnums=(0,))
  embed = jax.jit(functools.partial(pretraining.embed_step, graphdef=graphdef),
                  in_shardings=(shardings["params"], batch_sh))
  return TrainFns(init, step, embed, checkpoint.abstract_with_shardings(shapes, shardings),
                  graphdef, shards)


def load_init_weights(config, state, fns: TrainFns):
  """Places converted pretrained weights into a fresh state (only when not resuming)."""
  from avsiam_jax.weights import load  # pylint: disable=g-import-not-at-top
  params = load.init_params(config.model_init, config.model_init_format, model_spec(config),
                            jax.device_get(state["params"]))
  shardings = jax.tree.map(lambda a: a.sharding, fns.abstract_state["params"])
  params = jax.tree.map(lambda x, s: jax.make_array_from_callback(x.shape, s, lambda i: x[i]),
                        params, shardings)
  logging.info("Initialized from %s (%s)", config.model_init, config.model_init_format)
  # Adam moments of the fresh state are zero, so only the parameters change.
  return dict(state, params=params)


# ----- Evaluation ---------------------------------------------------------------------------

def evaluate_retrieval(config, ds_dir, state, embed_fn, mesh) -> dict[str, float]:
  it = pipeline.make_eval_iterator(
      ds_dir, config.data.eval_split, batch_size=config.eval.batch_size // jax.process_count(),
      audio_frames=config.model.audio_frames, image_size=config.model.image_size,
      process_index=jax.process_index(), process_count=jax.process_count(),
      max_examples=config.eval.max_clips)
  feats_a, feats_v = [], []
  for batch in it:
    mask = batch["mask"]
    # One frame per clip, picked on the host so the other nine never reach the devices.
    inputs = sharding.global_batch(
        {"audio": batch["audio"], "video": batch["video"][:, config.eval.frame]}, mesh)
    fa, fv = embed_fn(state["params"], inputs)
    fa, fv, mask = multihost_utils.process_allgather((fa, fv, mask), tiled=True)
    feats_a.append(np.asarray(fa)[np.asarray(mask)])
    feats_v.append(np.asarray(fv)[np.asarray(mask)])
  return retrieval.retrieval_metrics(np.concatenate(feats_a), np.concatenate(feats_v))


# ----- Logging ------------------------------------------------------------------------------

class Logger:
  """Progress lines on every process's log, TensorBoard scalars from process 0 only."""

  def __init__(self, workdir: str, total_steps: int, batch_size: int):
    self.total_steps, self.batch_size = total_steps, batch_size
    self.writer = None
    if jax.process_index() == 0:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self.writer = SummaryWriter(os.path.join(workdir, "tensorboard"))
    self.t0, self.s0 = time.time(), None

  def scalars(self, step: int, values: dict[str, float]) -> None:
    if self.writer:
      for k, v in values.items():
        self.writer.add_scalar(k, v, step)
      self.writer.flush()

  def progress(self, step: int, metrics: dict[str, float]) -> None:
    now = time.time()
    speed = "warming up"
    if self.s0 is None:  # the first interval includes compilation: time from here on
      self.t0, self.s0 = now, step
    elif step > self.s0:
      rate = (step - self.s0) * self.batch_size / max(now - self.t0, 1e-9)
      eta = (self.total_steps - step) * self.batch_size / rate
      speed = f"{rate:.1f} samples/s | ETA {time.strftime('%H:%M:%S', time.gmtime(eta))}"
      metrics = dict(metrics, samples_per_sec=rate)
    self.scalars(step, metrics)
    logging.info("step %d/%d | loss %.4f (contrastive %.4f, reconstruction %.4f) | %s", step,
                 self.total_steps, metrics["loss"], metrics["contrastive"],
                 metrics["reconstruction"], speed)


class StopRequest:
  """SIGTERM (preemption) asks the loop to save at the next step boundary and return.

  With several processes JAX's own preemption service catches the signal and agrees on a
  step, so every process saves the same step.
  """

  def __init__(self):
    self.requested = False
    if jax.process_count() == 1:
      signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    logging.warning("SIGTERM: saving a checkpoint at the next step boundary, then stopping")
    self.requested = True

  def __call__(self, step: int) -> bool:
    if jax.process_count() > 1:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.requested


# ----- Main ---------------------------------------------------------------------------------

def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Pretrains per `config`, resuming from `workdir` if it holds a checkpoint."""
  # Set-up: every check before any compute.
  try:
    check_config(config, jax.device_count())
  except ValueError as e:
    raise ConfigError(str(e)) from e
  spec = model_spec(config)
  mesh = sharding.make_mesh(config.mesh)
  n_params = sum(x.size for x in jax.tree.leaves(
      nnx.state(nnx.eval_shape(lambda: AVSiam(spec, rngs=nnx.Rngs(0))), nnx.Param)))
  logging.info("AVSiam %s: %.1fM parameters; mesh %s", config.model.variant, n_params / 1e6,
               dict(mesh.shape))
  try:
    ds_dir = dataset_dir(config, workdir)
  except (ValueError, FileNotFoundError) as e:
    raise ConfigError(str(e)) from e
  os.makedirs(workdir, exist_ok=True)
  if config.data.demo and jax.process_index() == 0:
    demo.ensure_demo_dataset(ds_dir, config.data.demo_train_clips, config.data.demo_eval_clips,
                             seed=config.seed)
  multihost_utils.sync_global_devices("dataset ready")

  # Input pipeline.
  info = records.read_info(ds_dir)
  num_train = info["splits"][config.data.train_split]["num_examples"]
  steps_per_epoch = num_train // config.batch_size
  if steps_per_epoch == 0:
    raise ConfigError(f"config.batch_size {config.batch_size} exceeds the {num_train} training "
                     f"clips in {ds_dir}")
  if not config.total_steps:
    with config.unlocked():
      config.total_steps = config.epochs * steps_per_epoch
  train_iter = pipeline.make_pretrain_iterator(
      ds_dir, config.data.train_split, batch_size=config.batch_size // jax.process_count(),
      audio_frames=config.model.audio_frames, image_size=config.model.image_size,
      seed=config.seed, time_shift=config.data.time_shift, process_index=jax.process_index(),
      process_count=jax.process_count(), worker_count=config.data.worker_count)

  # Model, optimizer, sharded state and compiled steps.
  fns = make_train_fns(config, mesh, steps_per_epoch)
  init_key, step_key = jax.random.split(jax.random.key(config.seed))
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"),
                                 every_steps=config.checkpoint_every_steps,
                                 keep=config.keep_checkpoints)
  latest = ckpt.latest_step()
  if latest is not None:
    state, data_state = ckpt.restore(latest, fns.abstract_state)
    train_iter.set_state(data_state)
    logging.info("Resumed from step %d in %s", latest, workdir)
  else:
    state = fns.init(init_key)
    if config.model_init:
      state = load_init_weights(config, state, fns)

  # Train loop.
  logger = Logger(workdir, config.total_steps, config.batch_size)
  stop = StopRequest()
  step = int(state["step"])
  results: dict[str, Any] = {}
  while step < config.total_steps:
    host_batch = next(train_iter)
    batch = sharding.global_batch({k: host_batch[k] for k in ("audio", "video")}, mesh)
    state, metrics = fns.step(state, batch, step_key)
    step += 1
    if step % config.log_every_steps == 0 or step == config.total_steps:
      logger.progress(step, jax.tree.map(float, jax.device_get(metrics)))
    if config.eval.every_steps and step % config.eval.every_steps == 0:
      results = evaluate_retrieval(config, ds_dir, state, fns.embed, mesh)
      logger.scalars(step, {f"retrieval/{k}": v for k, v in results.items()})
    stopping = stop(step)
    if ckpt.due(step) or step == config.total_steps or stopping:
      ckpt.save(step, state, train_iter.get_state())
    if stopping:
      ckpt.close()
      logging.info("Stopped at step %d; rerun the same command to resume", step)
      return {"step": step, "preempted": True}

  results = evaluate_retrieval(config, ds_dir, state, fns.embed, mesh)
  logger.scalars(step, {f"retrieval/{k}": v for k, v in results.items()})
  ckpt.close()
  results = dict(results, step=step)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "results.json"), "w") as f:
      json.dump(results, f, indent=1)
  logging.info("Zero-shot retrieval on %d held-out clips: V->A R@1 %.1f R@5 %.1f | "
               "A->V R@1 %.1f R@5 %.1f", results["num_clips"], results["v2a_r1"],
               results["v2a_r5"], results["a2v_r1"], results["a2v_r5"])
  return results
