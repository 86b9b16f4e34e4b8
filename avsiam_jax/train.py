"""The trainer: AVSiam pretraining and finetuning in one loop, and standalone evaluation.

config.mode:
  pretrain            contrastive + reconstruction losses; zero-shot retrieval eval
  finetune            the classifier on the pretrained encoder; classification + retrieval eval
  eval                the workdir's latest checkpoint on the eval split
  pretrain+finetune   both stages, into WORKDIR/pretrain and WORKDIR/finetune (the demo)
"""
from __future__ import annotations

import collections
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

from avsiam_jax import checkpoint, finetuning, masking, pretraining, sharding
from avsiam_jax.data import demo, pipeline, records
from avsiam_jax.evaluators import classification, retrieval
from avsiam_jax.models.avsiam import AVSiam, AVSiamSpec
from avsiam_jax.models.classifier import AVSiamClassifier, ClassifierSpec, load_pretrained
from avsiam_jax.models.vit import encoder_spec
from avsiam_jax.weights import load

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
MODES = ("pretrain", "finetune", "eval", "pretrain+finetune")
CONFIG_FILE, LABELS_FILE = "config.json", "label_names.json"
STAGE_TITLES = {
    "pretrain": "pretraining (contrastive + masked reconstruction), then zero-shot retrieval",
    "finetune": "finetuning the classifier from the pretrained weights, then classification"}
# Result names of the three classifier inputs.
INPUTS = {"a": "audio", "v": "visual", "av": "audio-visual"}


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
      final_norm_eps=m.final_norm_eps, remat=m.remat)
  enc.video_grid, enc.audio_grid  # pylint: disable=pointless-statement  # validates sizes
  return AVSiamSpec(encoder=enc, mm_depth=m.mm_depth, decoder_width=m.decoder_width,
                    decoder_depth=m.decoder_depth, decoder_heads=m.decoder_heads,
                    decoder_norm_eps=m.decoder_norm_eps)


def classifier_spec(config, num_classes: int) -> ClassifierSpec:
  return ClassifierSpec(encoder=model_spec(config).encoder, num_classes=num_classes,
                        mm_depth=config.model.mm_depth)


def is_finetune(config) -> bool:
  return config.mode == "finetune"


class Stage(NamedTuple):
  """The schedule of the stage config.mode names: pretraining's or finetuning's fields."""
  lr: float
  decay_start_epoch: int
  decay_rate: float
  decay_every_epochs: int
  epochs: int
  total_steps: int | None
  batch_size: int


def stage(config, mode: str | None = None) -> Stage:
  if (mode or config.mode) == "finetune":
    f = config.finetune
    return Stage(f.lr, f.decay_start_epoch, f.decay_rate, f.decay_every_epochs, f.epochs,
                 f.total_steps, f.batch_size)
  o = config.optim
  return Stage(o.lr, o.decay_start_epoch, o.decay_rate, o.decay_every_epochs, config.epochs,
               config.total_steps, config.batch_size)


def _check_schedule(prefix: str, s: Stage, data_shards: int) -> None:
  if s.batch_size <= 0 or s.batch_size % data_shards:
    raise ValueError(f"config.{prefix}batch_size {s.batch_size} must be a positive multiple of "
                     f"the {data_shards} devices that split the batch (mesh data x fsdp)")
  if s.decay_every_epochs <= 0:
    raise ValueError(f"config.{prefix}decay_every_epochs must be positive, got "
                     f"{s.decay_every_epochs}")
  if not s.total_steps and s.epochs <= 0:
    raise ValueError(f"set config.{prefix}epochs or config.{prefix}total_steps to a positive "
                     "number")


def check_config(config, num_devices: int) -> None:
  """Everything that can be checked before any compute; raises ValueError naming the field."""
  if config.mode not in MODES:
    raise ValueError(f"config.mode: {config.mode!r} is not one of {MODES}")
  if config.model.dtype not in DTYPES:
    raise ValueError(f"config.model.dtype must be one of {sorted(DTYPES)}, got {config.model.dtype!r}")
  model_spec(config)
  mesh_shape = sharding.mesh_shape(config.mesh, num_devices)
  data_shards = mesh_shape[0] * mesh_shape[1]
  if data_shards % jax.process_count():
    raise ValueError(f"config.mesh: data x fsdp = {data_shards} must be a multiple of the "
                     f"{jax.process_count()} processes, each of which feeds its own slice of "
                     "the batch (keep the tensor axis within a host)")
  if config.eval.batch_size <= 0 or config.eval.batch_size % data_shards:
    raise ValueError(f"config.eval.batch_size {config.eval.batch_size} must be a positive "
                     f"multiple of the {data_shards} devices that split the batch (mesh data x fsdp)")
  if config.mode in ("pretrain", "pretrain+finetune"):
    _check_pretrain(config, data_shards)
  if config.mode in ("finetune", "pretrain+finetune"):
    _check_finetune(config, data_shards)
  if config.model_init and not os.path.exists(config.model_init):
    raise ValueError(f"config.model_init: {config.model_init!r} does not exist")
  if config.model_init_format not in ("converted", "vitjax", "timm", "avsiam"):
    raise ValueError("config.model_init_format must be converted, vitjax, timm or avsiam, got "
                     f"{config.model_init_format!r}")
  if not 0 <= config.eval.frame < pipeline.NUM_FRAMES:
    raise ValueError(f"config.eval.frame must be in [0, {pipeline.NUM_FRAMES}), got "
                     f"{config.eval.frame}")
  for name in ("max_clips", "retrieval_clips"):
    if config.eval[name] < 0:
      raise ValueError(f"config.eval.{name} must be >= 0 (0: all), got {config.eval[name]}")


def _check_pretrain(config, data_shards: int) -> None:
  ratios = tuple(config.pretrain.mask_ratios)
  if not ratios:
    raise ValueError("config.pretrain.mask_ratios is empty")
  for r in ratios + (config.pretrain.mae_mask_ratio,):
    masking.kept_count(1000, r)
  if config.pretrain.tau <= 0:
    raise ValueError(f"config.pretrain.tau must be positive, got {config.pretrain.tau}")
  _check_schedule("", stage(config, "pretrain"), data_shards)
  shards = config.mesh.batch_shards or data_shards
  try:
    masking.check_groups(config.batch_size, len(ratios), shards)
  except ValueError as e:
    raise ValueError(f"config.batch_size: {e}") from None
  pretraining.check_accumulation(config, shards)


def _check_finetune(config, data_shards: int) -> None:
  f = config.finetune
  if f.loss not in ("bce", "ce"):
    raise ValueError(f"config.finetune.loss must be 'bce' (multi-label) or 'ce' (single-label), "
                     f"got {f.loss!r}")
  mix = tuple(f.modality_mix)
  if len(mix) != 3 or min(mix) < 0 or abs(sum(mix) - 1) > 1e-6:
    raise ValueError("config.finetune.modality_mix must be three probabilities (audio-visual, "
                     f"audio-only, visual-only) summing to 1, got {mix}")
  if f.head_lr_mult <= 0 or f.mm_lr_mult < 0:
    raise ValueError(f"config.finetune.head_lr_mult ({f.head_lr_mult}) must be positive and "
                     f"mm_lr_mult ({f.mm_lr_mult}) non-negative")
  _check_schedule("finetune.", stage(config, "finetune"), data_shards)
  if f.init_checkpoint and not os.path.exists(f.init_checkpoint):
    raise ValueError(f"config.finetune.init_checkpoint: {f.init_checkpoint!r} does not exist")


def dataset_dir(config, workdir: str) -> str:
  if config.data.demo:
    return config.data.dir or os.path.join(workdir, "demo_dataset")
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
  s = stage(config)

  def schedule(step):
    epoch = step // steps_per_epoch
    decays = jnp.where(epoch >= s.decay_start_epoch,
                       (epoch - s.decay_start_epoch) // s.decay_every_epochs + 1, 0)
    return s.lr * s.decay_rate ** decays.astype(jnp.float32)
  return schedule


def make_optimizer(config, schedule, params) -> optax.GradientTransformation:
  """Adam with torch's L2 weight decay; finetuning scales the heads' and MM blocks' steps."""
  o = config.optim
  # torch.optim.Adam's weight_decay is an L2 term added to the gradient before the moments.
  parts = [optax.add_decayed_weights(o.weight_decay),
           optax.scale_by_adam(b1=o.b1, b2=o.b2, eps=1e-8),
           optax.scale_by_learning_rate(schedule)]
  if is_finetune(config):
    parts.append(finetuning.scale_by_multipliers(finetuning.lr_multipliers(params, config)))
  return optax.chain(*parts)


# ----- Model state --------------------------------------------------------------------------

def build_model(config, num_classes: int, rngs: nnx.Rngs):
  dtype = DTYPES[config.model.dtype]
  if is_finetune(config):
    return AVSiamClassifier(classifier_spec(config, num_classes), rngs=rngs, dtype=dtype)
  return AVSiam(model_spec(config), rngs=rngs, dtype=dtype)


def opt_names(config) -> tuple[str, ...]:
  return ("total",) if is_finetune(config) else pretraining.loss_names(config)


def create_state(config, num_classes: int, tx, key):
  model = build_model(config, num_classes, nnx.Rngs(params=key))
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  return {"params": params, "opt": {n: tx.init(params) for n in opt_names(config)},
          "step": jnp.zeros((), jnp.int32)}


def state_shardings(config, num_classes, tx, mesh, abs_model):
  """Abstract state (no allocation) and its shardings: params by logical axes, moments alike."""
  param_sh = sharding.param_shardings(nnx.state(abs_model, nnx.Param), mesh, dict(config.mesh.rules))
  shapes = jax.eval_shape(functools.partial(create_state, config, num_classes, tx),
                          jax.random.key(0))
  repl = sharding.replicated(mesh)
  opt_sh = {n: optax.tree_map_params(tx, lambda _, s: s, shapes["opt"][n], param_sh,
                                     transform_non_params=lambda _: repl)
            for n in opt_names(config)}
  return shapes, {"params": param_sh, "opt": opt_sh, "step": repl}


class TrainFns(NamedTuple):
  init: Callable       # key -> state
  step: Callable       # (state, batch, key) -> (state, metrics); state donated
  evaluate: Callable   # (params, eval batch) -> dict of per-clip outputs (features, probabilities)
  abstract_state: Any  # ShapeDtypeStructs with shardings, for restoring
  graphdef: Any        # the model's structure; nnx.merge(graphdef, params) rebuilds it
  batch_shards: int    # the masking layout


def make_train_fns(config, mesh, steps_per_epoch: int, num_classes: int = 0) -> TrainFns:
  """Compiled init/step/evaluate functions with the state sharded on `mesh` as config says."""
  schedule = lr_schedule(config, steps_per_epoch)
  abs_model = nnx.eval_shape(lambda: build_model(config, num_classes, nnx.Rngs(0)))
  tx = make_optimizer(config, schedule, nnx.to_pure_dict(nnx.state(abs_model, nnx.Param)))
  shapes, shardings = state_shardings(config, num_classes, tx, mesh, abs_model)
  graphdef = nnx.graphdef(abs_model)
  batch_sh, repl = sharding.batch_sharding(mesh), sharding.replicated(mesh)
  shards = config.mesh.batch_shards or sharding.batch_shards(mesh)
  if is_finetune(config):
    step_fn = functools.partial(finetuning.train_step, graphdef=graphdef, tx=tx,
                                schedule=schedule, config=config)
    eval_fn = functools.partial(finetuning.classifier_eval_step, graphdef=graphdef,
                                kind=config.finetune.loss, frame=config.eval.frame)
  else:
    step_fn = functools.partial(pretraining.train_step, graphdef=graphdef, tx=tx,
                                schedule=schedule, config=config, batch_shards=shards)
    eval_fn = functools.partial(pretraining.eval_step, graphdef=graphdef,
                                frame=config.eval.frame)
  init = jax.jit(functools.partial(create_state, config, num_classes, tx), out_shardings=shardings)
  step = jax.jit(step_fn, in_shardings=(shardings, batch_sh, repl), out_shardings=(shardings, repl),
                 donate_argnums=(0,))
  evaluate = jax.jit(eval_fn, in_shardings=(shardings["params"], batch_sh))
  return TrainFns(init, step, evaluate, checkpoint.abstract_with_shardings(shapes, shardings),
                  graphdef, shards)


def _place(params: dict, fns: TrainFns) -> dict:
  shardings = jax.tree.map(lambda a: a.sharding, fns.abstract_state["params"])
  return jax.tree.map(lambda x, s: jax.make_array_from_callback(x.shape, s, lambda i: x[i]),
                      params, shardings)


def pretrained_avsiam_params(config, key) -> dict:
  """Host params of the pretraining model to start from: a pretraining run's, or the weights of
  config.model_init placed into a fresh model drawn from `key` (it fills what the file lacks)."""
  from avsiam_jax import inference  # pylint: disable=g-import-not-at-top
  if is_finetune(config) and config.finetune.init_checkpoint:
    abstract = nnx.to_pure_dict(nnx.state(nnx.eval_shape(
        lambda: AVSiam(model_spec(config), rngs=nnx.Rngs(0))), nnx.Param))
    return jax.device_get(inference.restore_params(
        inference.load_run(config.finetune.init_checkpoint), abstract))
  spec = model_spec(config)
  return load.init_params(config.model_init, config.model_init_format, spec,
                          load.fresh_params(spec, key))


def load_init_weights(config, state, fns: TrainFns, key):
  """Places pretrained weights into a fresh state (only when not resuming).

  Pretraining takes converted weights (config.model_init); finetuning takes the encoder and
  multimodal blocks of a pretraining run (config.finetune.init_checkpoint) or of converted
  weights, and starts its heads fresh. Whatever the source lacks keeps the values a fresh model
  draws from `key`, the key `state` was initialized with.
  """
  params = jax.device_get(state["params"])
  if is_finetune(config):
    params = load_pretrained(params, pretrained_avsiam_params(config, key))
  else:  # the state's own fresh params are that draw
    params = load.init_params(config.model_init, config.model_init_format, model_spec(config),
                              params)
  logging.info("Initialized from %s", (config.finetune.init_checkpoint if is_finetune(config)
                                       else "") or config.model_init)
  # Adam moments of the fresh state are zero, so only the parameters change.
  return dict(state, params=_place(params, fns))


# ----- Evaluation ---------------------------------------------------------------------------

def evaluate(config, ds_dir: str, params, eval_fn, mesh, *, plot_path: str | None = None
             ) -> dict[str, Any]:
  """Classification (classifier only) over the eval clips and zero-shot retrieval over the first
  eval.retrieval_clips of them; optionally a PNG of the embeddings by class."""
  it = pipeline.make_eval_iterator(
      ds_dir, config.data.eval_split, batch_size=config.eval.batch_size // jax.process_count(),
      audio_frames=config.model.audio_frames, image_size=config.model.image_size,
      process_index=jax.process_index(), process_count=jax.process_count(),
      max_examples=config.eval.max_clips or None)
  outs = collections.defaultdict(list)
  for batch in it:
    out = eval_fn(params, sharding.global_batch(
        {"audio": batch["audio"], "video": batch["video"]}, mesh))
    out, mask, labels = multihost_utils.process_allgather(
        (out, batch["mask"], batch["labels"]), tiled=True)
    mask = np.asarray(mask)
    for k, v in dict(out, labels=labels).items():
      outs[k].append(np.asarray(v)[mask])
  outs = {k: np.concatenate(v) for k, v in outs.items()}
  n = config.eval.retrieval_clips or len(outs["feat_a"])
  results: dict[str, Any] = {
      "retrieval": retrieval.retrieval_metrics(outs["feat_a"][:n], outs["feat_v"][:n])}
  for key, name in INPUTS.items():
    if f"probs_{key}" in outs:
      results[name] = classification.classification_metrics(outs[f"probs_{key}"], outs["labels"])
  if plot_path and jax.process_index() == 0:
    from avsiam_jax.evaluators import embedding_plot  # pylint: disable=g-import-not-at-top
    labels = outs["labels"][:n]
    primary = np.where(labels.max(axis=1) > 0, labels.argmax(axis=1), -1)
    embedding_plot.plot_embeddings(
        outs["feat_a"][:n], outs["feat_v"][:n], primary,
        records.read_info(ds_dir).get("label_names", []), plot_path,
        max_classes=config.eval.plot_classes,
        title=f"{config.mode}: audio and visual embeddings of the {config.data.eval_split} clips")
  return results


def flat_scalars(results: dict[str, Any], prefix: str = "eval") -> dict[str, float]:
  out = {}
  for k, v in results.items():
    if isinstance(v, dict):
      out.update(flat_scalars(v, f"{prefix}/{k}"))
    elif isinstance(v, (int, float)) and np.isfinite(v):
      out[f"{prefix}/{k}"] = float(v)
  return out


def summary(results: dict[str, Any]) -> str:
  r = results["retrieval"]
  parts = [f"zero-shot retrieval on {r['num_clips']} clips: V->A R@1 {r['v2a_r1']:.1f} "
           f"R@5 {r['v2a_r5']:.1f} | A->V R@1 {r['a2v_r1']:.1f} R@5 {r['a2v_r5']:.1f}"]
  for name in INPUTS.values():
    if name in results:
      c = results[name]
      parts.append(f"{name}: mAP {100 * c['mAP']:.1f} top-1 {100 * c['top1']:.1f}")
  return "; ".join(parts)


def _write_json(path: str, obj) -> None:
  if jax.process_index() == 0:
    with open(path, "w") as f:
      json.dump(obj, f, indent=1)


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
    self.scalars(step, {f"train/{k}": v for k, v in metrics.items()})
    parts = ", ".join(f"{k} {metrics[k]:.4f}" for k in ("contrastive", "reconstruction")
                      if k in metrics)
    if "branch" in metrics:
      parts = f"this step {finetuning.BRANCHES[int(metrics['branch'])]}"
    logging.info("step %d/%d | loss %.4f (%s) | %s", step, self.total_steps, metrics["loss"],
                 parts, speed)


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

def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """What main.py calls: the stage or stages config.mode names."""
  try:
    check_config(config, jax.device_count())
  except ValueError as e:
    raise ConfigError(str(e)) from e
  if config.mode == "eval":
    return evaluate_run(config, workdir)
  if config.mode != "pretrain+finetune":
    return train_and_evaluate(config, workdir)
  stages = {}
  for i, name in enumerate(("pretrain", "finetune")):
    logging.info("Stage %d of 2: %s", i + 1, STAGE_TITLES[name])
    c = ml_collections.ConfigDict(config.to_dict())
    c.mode = name
    if c.data.demo and not c.data.dir:  # both stages use one demo dataset
      c.data.dir = os.path.join(workdir, "demo_dataset")
    if name == "finetune" and not (c.finetune.init_checkpoint or c.model_init):
      c.finetune.init_checkpoint = os.path.join(workdir, "pretrain")
    stages[name] = train_and_evaluate(c, os.path.join(workdir, name))
    if stages[name].get("preempted"):
      return stages[name]
  _write_json(os.path.join(workdir, "results.json"), stages)
  logging.info("Pretraining: %s", summary(stages["pretrain"]))
  logging.info("Finetuning: %s", summary(stages["finetune"]))
  return stages


def _prepare(config, workdir: str):
  """Checks, mesh, dataset: everything before any compute. Returns (mesh, dataset dir, info)."""
  try:
    check_config(config, jax.device_count())
    ds_dir = dataset_dir(config, workdir)
  except (ValueError, FileNotFoundError) as e:
    raise ConfigError(str(e)) from e
  mesh = sharding.make_mesh(config.mesh)
  os.makedirs(workdir, exist_ok=True)
  if config.data.demo and jax.process_index() == 0:
    demo.ensure_demo_dataset(ds_dir, config.data.demo_train_clips, config.data.demo_eval_clips,
                             seed=config.seed)
  multihost_utils.sync_global_devices("dataset ready")
  info = records.read_info(ds_dir)
  if is_finetune(config) and not info.get("label_names"):
    raise ConfigError(f"{ds_dir}: the dataset has no label names; finetuning needs labels")
  if is_finetune(config) and config.finetune.init_checkpoint:
    from avsiam_jax import inference  # pylint: disable=g-import-not-at-top
    try:
      inference.load_run(config.finetune.init_checkpoint)
    except inference.CheckpointError as e:
      raise ConfigError(f"config.finetune.init_checkpoint: {e}") from e
  return mesh, ds_dir, info


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Pretrains or finetunes per `config.mode`, resuming from `workdir` if it holds a checkpoint."""
  # Set-up: every check before any compute.
  if config.mode not in ("pretrain", "finetune"):
    raise ConfigError(f"config.mode {config.mode!r}: train_and_evaluate runs pretrain or "
                      "finetune; use run() for the others")
  mesh, ds_dir, info = _prepare(config, workdir)
  label_names = info.get("label_names", []) if is_finetune(config) else []
  num_classes = len(label_names)
  st = stage(config)
  _write_json(os.path.join(workdir, CONFIG_FILE), json.loads(config.to_json_best_effort()))
  if label_names:
    _write_json(os.path.join(workdir, LABELS_FILE), label_names)

  # Input pipeline.
  num_train = info["splits"][config.data.train_split]["num_examples"]
  steps_per_epoch = num_train // st.batch_size
  if steps_per_epoch == 0:
    raise ConfigError(f"batch size {st.batch_size} exceeds the {num_train} training clips in "
                      f"{ds_dir}")
  total_steps = st.total_steps or st.epochs * steps_per_epoch
  common = dict(batch_size=st.batch_size // jax.process_count(),
                audio_frames=config.model.audio_frames, image_size=config.model.image_size,
                seed=config.seed, time_shift=config.data.time_shift,
                process_index=jax.process_index(), process_count=jax.process_count(),
                worker_count=config.data.worker_count)
  if is_finetune(config):
    f = config.finetune
    train_iter = pipeline.make_finetune_iterator(
        ds_dir, config.data.train_split, mixup=f.mixup, label_smoothing=f.label_smoothing,
        freqm=f.freqm, timem=f.timem, balanced=f.balanced, **common)
  else:
    train_iter = pipeline.make_pretrain_iterator(ds_dir, config.data.train_split, **common)
  batch_keys = ("audio", "video", "labels") if is_finetune(config) else ("audio", "video")

  # Model, optimizer, sharded state and compiled steps.
  fns = make_train_fns(config, mesh, steps_per_epoch, num_classes)
  n_params = sum(x.size for x in jax.tree.leaves(fns.abstract_state["params"]))
  logging.info("%s %s: %.1fM parameters; mesh %s; %d steps of batch %d", config.mode,
               config.model.variant, n_params / 1e6, dict(mesh.shape), total_steps, st.batch_size)
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
    if config.model_init or (is_finetune(config) and config.finetune.init_checkpoint):
      state = load_init_weights(config, state, fns, init_key)
    elif is_finetune(config):
      logging.warning("Finetuning from random weights: set config.finetune.init_checkpoint")
  try:
    load.check_initialized(state["params"])
  except load.WeightError as e:
    raise ConfigError(f"{workdir}: {e}") from e

  # Train loop.
  logging.info("Compiling the train step, then training from step %d; a progress line every "
               "%d steps", int(state["step"]), config.log_every_steps)
  logger = Logger(workdir, total_steps, st.batch_size)
  stop = StopRequest()
  step = int(state["step"])
  while step < total_steps:
    host_batch = next(train_iter)
    batch = sharding.global_batch({k: host_batch[k] for k in batch_keys}, mesh)
    state, metrics = fns.step(state, batch, step_key)
    step += 1
    if step % config.log_every_steps == 0 or step == total_steps:
      logger.progress(step, jax.tree.map(float, jax.device_get(metrics)))
    if config.eval.every_steps and step % config.eval.every_steps == 0:
      logger.scalars(step, flat_scalars(
          evaluate(config, ds_dir, state["params"], fns.evaluate, mesh)))
    stopping = stop(step)
    if ckpt.due(step) or step == total_steps or stopping:
      ckpt.save(step, state, train_iter.get_state())
    if stopping:
      ckpt.close()
      logging.info("Stopped at step %d; rerun the same command to resume", step)
      return {"step": step, "preempted": True}

  logging.info("Evaluating step %d on the %s split", step, config.data.eval_split)
  results = evaluate(config, ds_dir, state["params"], fns.evaluate, mesh,
                     plot_path=os.path.join(workdir, "embeddings.png"))
  logger.scalars(step, flat_scalars(results))
  ckpt.close()
  results = dict(results, step=step)
  _write_json(os.path.join(workdir, "results.json"), results)
  logging.info("Step %d, %s", step, summary(results))
  return results


def evaluate_run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """mode=eval: the latest checkpoint of the run in `workdir` on the configured eval split."""
  from avsiam_jax import inference  # pylint: disable=g-import-not-at-top
  try:
    run = inference.load_run(workdir)
  except inference.CheckpointError as e:
    raise ConfigError(f"mode=eval needs --workdir to be a training run: {e}") from e
  config = ml_collections.ConfigDict(config.to_dict())
  config.mode = "finetune" if run.config.mode == "finetune" else "pretrain"
  mesh, ds_dir, info = _prepare(config, workdir)
  num_classes = len(info.get("label_names", [])) if is_finetune(config) else 0
  fns = make_train_fns(config, mesh, 1, num_classes)
  params = _place(jax.device_get(inference.restore_params(run, fns.abstract_state["params"])),
                  fns)
  results = evaluate(config, ds_dir, params, fns.evaluate, mesh,
                     plot_path=os.path.join(workdir, "embeddings.png"))
  results = dict(results, step=run.step, split=config.data.eval_split)
  Logger(workdir, run.step, 1).scalars(run.step, flat_scalars(results))
  _write_json(os.path.join(workdir, f"eval_{config.data.eval_split}.json"), results)
  logging.info("Checkpoint step %d on %s: %s", run.step, config.data.eval_split, summary(results))
  return results
