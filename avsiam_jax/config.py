"""Run settings: the ConfigDict of configs/*.py, turned once at start-up into frozen specs.

`parse(config, num_devices)` runs every check that needs no compute and raises ConfigError
naming the config field; it reads no run directory or weights record (weights/provenance.py,
called where a run starts, takes the model fields of the weights it starts from). Everything
after it (trainer, tasks, step functions, models) takes the specs below, never the ConfigDict.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import jax
import jax.numpy as jnp

from avsiam_jax import losses, paths
from avsiam_jax.data import records
from avsiam_jax.models import layers
from avsiam_jax.models.avsiam import AVSiamSpec
from avsiam_jax.models.vit import EncoderSpec, encoder_spec
from avsiam_jax.vocab import (BATCH_AXES, DTYPE_NAMES, EARLY_STOP_METRICS, FROM_RUN_STAGES,
                              MESH_AXES, MODES, STAGES)
from avsiam_jax.weights import signature
from avsiam_jax.weights.load import FORMATS as WEIGHT_FORMATS

DTYPES = {name: getattr(jnp, name) for name in DTYPE_NAMES}
_ENCODER_SPEC_FIELDS = {f.name for f in dataclasses.fields(EncoderSpec)}


class ConfigError(ValueError):
  """A config or dataset problem found before any compute."""


@dataclasses.dataclass(frozen=True)
class Schedule:
  """One stage's length and step-decay learning rate (decay x rate at start, start+every, ...)."""
  lr: float
  decay_start_epoch: int
  decay_rate: float
  decay_every_epochs: int
  epochs: int
  total_steps: int | None  # overrides epochs
  batch_size: int          # global
  epoch_length: float = 1.0  # samples per epoch, in training-split lengths

  def steps_per_epoch(self, num_train: int) -> int:
    """Steps of one epoch of epoch_length x num_train samples (at least one)."""
    return max(1, int(round(self.epoch_length * num_train)) // self.batch_size)


@dataclasses.dataclass(frozen=True)
class OptimSpec:
  """Adam with torch's L2 weight decay (added to the gradient), for both stages."""
  b1: float
  b2: float
  weight_decay: float


@dataclasses.dataclass(frozen=True)
class PretrainSpec:
  """A contrastive (+ reconstruction) objective: pretraining's, or retrieval finetuning's."""
  mask_ratios: tuple[float, ...]        # the shared set, as given
  audio_mask_ratios: tuple[float, ...]  # each modality's ratio groups (the shared set if unset)
  video_mask_ratios: tuple[float, ...]
  contrastive_weight: float             # L = w_c L_c + w_rec L_rec; 0 leaves a loss out
  reconstruction_weight: float
  tau: float
  mae_mask_ratio: float
  mae_stop_gradient: bool
  separate_optimizers: bool
  accum_steps: int
  batch_shards: int  # data shards the ratio groups are formed in (the masking layout)
  schedule: Schedule
  pack_groups: bool  # ratio groups packed into rows: one encoder call per modality
  contrastive: str   # losses.CONTRASTIVE_DIRECTIONS

  def ratios(self, modality: str) -> tuple[float, ...]:
    """The mask ratios of a modality's groups ("a" or "v")."""
    return self.audio_mask_ratios if modality == "a" else self.video_mask_ratios

  @property
  def weights(self) -> dict[str, float]:
    """{loss name: its weight in the total} (pretraining.LOSSES)."""
    return {"contrastive": self.contrastive_weight,
            "reconstruction": self.reconstruction_weight}


@dataclasses.dataclass(frozen=True)
class FinetuneSpec:
  dataset: str
  init_checkpoint: str  # the run finetuning (classification or retrieval) starts from, or ""
  loss: str             # losses.CLASSIFICATION_LOSSES
  head_lr_mult: float
  mm_lr_mult: float
  balanced: bool
  mixup: float
  label_smoothing: float
  freqm: int
  timem: int
  modality_mix: tuple[float, float, float]  # audio-visual, audio-only, visual-only
  modality_shards: int  # consecutive parts of the batch, each with its own modality draw
  eval_scores: str      # losses.EVAL_SCORES
  schedule: Schedule


@dataclasses.dataclass(frozen=True)
class MeshSpec:
  shape: tuple[int, int, int]  # MESH_AXES sizes, -1 resolved
  rules: tuple[tuple[str, Any], ...]  # logical parameter axis -> mesh axis

  @property
  def batch_shards(self) -> int:
    return self.shape[0] * self.shape[1]


@dataclasses.dataclass(frozen=True)
class DataSpec:
  dir: str  # "" with demo: WORKDIR/demo_dataset
  train_split: str
  eval_split: str
  time_shift: bool
  worker_count: int
  demo: bool
  demo_train_clips: int
  demo_eval_clips: int


@dataclasses.dataclass(frozen=True)
class EvalSpec:
  every_steps: int
  max_clips: int        # 0: all
  retrieval_clips: int  # 0: all evaluated clips
  batch_size: int
  frame: int
  plot_classes: int
  retrieval_subset: str = ""  # a subset of the eval split (data/subsets.py) for retrieval
  every_epoch: bool = False   # evaluate each epoch, keep the best (model selection)
  early_stop_epochs: int = 0  # with every_epoch: stop after this many epochs without a gain
  early_stop_metric: str = "selection"  # EARLY_STOP_METRICS: a gain of what


@dataclasses.dataclass(frozen=True)
class CompileSpec:
  topology: str     # "" or a TPU topology as jax.experimental.topologies takes it, "v5p:2x2x1"
  num_classes: int  # classifier heads to compile when no dataset is read


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """Everything a run needs, checked."""
  mode: str
  seed: int
  variant: str  # config.model.variant, e.g. "B/16"
  model: AVSiamSpec
  dtype: str
  model_init: str
  model_init_format: str
  optim: OptimSpec
  pretrain: PretrainSpec
  finetune: FinetuneSpec
  retrieval: PretrainSpec  # retrieval finetuning's objective: contrastive only
  mesh: MeshSpec
  data: DataSpec
  eval: EvalSpec
  compile_only: CompileSpec
  compile_cache_dir: str  # "" WORKDIR/compile_cache, "none" off
  checkpoint_every_steps: int
  keep_checkpoints: int
  log_every_steps: int
  # The config as given (plain dicts), recorded in the run's config.json with this spec's stage;
  # its model section holds the switches taken from the weights the run starts from.
  source: dict = dataclasses.field(repr=False, compare=False, default_factory=dict)
  # Those switches (weights/provenance.py): {"source": path, "changed": {key: (given, taken)}}.
  model_from_weights: dict = dataclasses.field(repr=False, compare=False, default_factory=dict)

  @property
  def compute_dtype(self):
    return DTYPES[self.dtype]

  def schedule(self, stage: str) -> Schedule:
    if stage == "finetune":
      return self.finetune.schedule
    return self.objective(stage).schedule

  def objective(self, stage: str) -> PretrainSpec:
    """The contrastive objective a stage trains: config.pretrain's or config.retrieval's."""
    return {"pretrain": self.pretrain, "retrieval_finetune": self.retrieval}[stage]

  def record(self) -> dict:
    """The config.json of a run: the given config with the fields a stage driver set."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in self.source.items()}
    out["mode"] = self.mode
    out.setdefault("data", {})["dir"] = self.data.dir
    out.setdefault("finetune", {})["init_checkpoint"] = self.finetune.init_checkpoint
    return out

  def stage(self, name: str, workdir: str) -> "RunSpec":
    """The spec of one stage of pretrain+finetune run in workdir/<name>: both stages share the
    demo dataset, and finetuning starts from the pretraining stage unless told otherwise."""
    data, finetune = self.data, self.finetune
    if data.demo and not data.dir:
      data = dataclasses.replace(data, dir=os.path.join(workdir, "demo_dataset"))
    if name == "finetune" and not (finetune.init_checkpoint or self.model_init):
      finetune = dataclasses.replace(finetune,
                                     init_checkpoint=os.path.join(workdir, "pretrain"))
    return dataclasses.replace(self, mode=name, data=data, finetune=finetune)


# ----- Parsing ------------------------------------------------------------------------------

def _fail(field: str, message: str):
  raise ConfigError(f"config.{field}: {message}")


def model_spec(model, platform: str | None = None, num_devices: int = 1) -> AVSiamSpec:
  """The AVSiam spec of a config's `model` section (a ConfigDict or a plain dict), with its
  attention implementation and grad_boundaries resolved for `num_devices` devices of `platform`
  (default: JAX's default backend)."""
  m = model
  # The fields weights are tied to: every spec field but remat, scan, attention and
  # grad_boundaries. The .get defaults serve the config.json of older run directories, which
  # lack keys added since (configs/common.py defines them all).
  tied = {f: m[row.key] if row.legacy is None else m.get(row.key, row.legacy)
          for f, row in signature.FIELDS.items() if row.key != "variant"}
  try:
    platform = platform or jax.default_backend()
    attention = layers.resolve_attention(m.get("attention", "auto"), platform,
                                         DTYPES.get(m.get("dtype", "float32"), jnp.float32),
                                         num_devices)
    enc = encoder_spec(
        m["variant"], **{f: v for f, v in tied.items() if f in _ENCODER_SPEC_FIELDS},
        remat=layers.remat_policy(m["remat"]), scan=bool(m.get("scan", False)),
        attention=attention, grad_boundaries=platform == "cpu")
    _ = enc.video_grid, enc.audio_grid  # sizes that do not split into patches fail here
  except ValueError as e:
    raise ConfigError(f"config.model: {e}") from None
  return AVSiamSpec(encoder=enc,
                    **{f: v for f, v in tied.items() if f not in _ENCODER_SPEC_FIELDS})


def with_model(spec: RunSpec, model: dict, from_weights: dict) -> RunSpec:
  """`spec` with another config.model section `model` (a plain dict), checked as `parse` checks
  it; what `spec` resolved for its devices (attention, grad_boundaries) stays. `from_weights`:
  where the model fields came from (RunSpec.model_from_weights)."""
  new = model_spec(dict(model, attention=spec.model.encoder.attention))
  new = dataclasses.replace(new, encoder=dataclasses.replace(
      new.encoder, grad_boundaries=spec.model.encoder.grad_boundaries))
  return dataclasses.replace(spec, model=new, variant=model["variant"],
                             source=dict(spec.source, model=model),
                             model_from_weights=from_weights)


def mesh_shape(mesh, num_devices: int) -> tuple[int, int, int]:
  """config.mesh sizes with one -1 resolved to the remaining devices; the product checked."""
  shape = [int(mesh[a]) for a in MESH_AXES]
  named = dict(zip(MESH_AXES, shape))
  if shape.count(-1) > 1:
    _fail("mesh", f"at most one axis may be -1, got {named}")
  if any(s == 0 or s < -1 for s in shape):
    _fail("mesh", f"axis sizes must be positive or -1, got {named}")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if num_devices % known:
      _fail("mesh", f"{named} does not divide the {num_devices} devices present")
    shape[shape.index(-1)] = num_devices // known
  if math.prod(shape) != num_devices:
    _fail("mesh", f"{dict(zip(MESH_AXES, shape))} needs {math.prod(shape)} devices, "
          f"{num_devices} are present")
  return tuple(shape)


def _schedule(c, prefix: str, data_shards: int, check: bool) -> Schedule:
  """Pretraining's schedule (prefix "": config.batch_size, config.epochs, config.optim.lr, ...),
  finetuning's (prefix "finetune.": all fields in config.finetune) or retrieval finetuning's
  ("retrieval.")."""
  lr_section, lr_prefix = (c, prefix) if prefix else (c.optim, "optim.")
  s = Schedule(lr=float(lr_section.lr), decay_start_epoch=int(lr_section.decay_start_epoch),
               decay_rate=float(lr_section.decay_rate),
               decay_every_epochs=int(lr_section.decay_every_epochs),
               epochs=int(c.epochs), total_steps=c.total_steps, batch_size=int(c.batch_size),
               epoch_length=float(c.epoch_length) if prefix == "finetune." else 1.0)
  if check:
    if s.epoch_length <= 0:
      _fail(f"{prefix}epoch_length", f"must be positive, got {s.epoch_length}")
    if s.batch_size <= 0 or s.batch_size % data_shards:
      _fail(f"{prefix}batch_size", f"{s.batch_size} must be a positive multiple of the "
            f"{data_shards} devices that split the batch (mesh data x fsdp)")
    if s.decay_every_epochs <= 0:
      _fail(f"{lr_prefix}decay_every_epochs", f"must be positive, got {s.decay_every_epochs}")
    if not s.total_steps and s.epochs <= 0:
      _fail(f"{prefix}epochs", f"set config.{prefix}epochs or config.{prefix}total_steps to a "
            "positive number")
  return s


def _ratio_set(values) -> tuple[float, ...]:
  return tuple(float(r) for r in values or ())


def _pretrain(c, data_shards: int, check: bool) -> PretrainSpec:
  p = c.pretrain
  shared = _ratio_set(p.mask_ratios)
  spec = PretrainSpec(
      mask_ratios=shared, audio_mask_ratios=_ratio_set(p.audio_mask_ratios) or shared,
      video_mask_ratios=_ratio_set(p.video_mask_ratios) or shared,
      contrastive_weight=float(p.contrastive_weight),
      reconstruction_weight=float(p.reconstruction_weight),
      tau=float(p.tau), mae_mask_ratio=float(p.mae_mask_ratio),
      mae_stop_gradient=bool(p.mae_stop_gradient),
      separate_optimizers=bool(p.separate_optimizers), accum_steps=c.accum_steps,
      batch_shards=int(c.mesh.batch_shards or data_shards),
      schedule=_schedule(c, "", data_shards, check), pack_groups=bool(p.pack_groups),
      contrastive=str(p.contrastive))
  if not check:
    return spec
  ratio_fields = {m: f"pretrain.{m}_mask_ratios" if p[f"{m}_mask_ratios"] else
                  "pretrain.mask_ratios" for m in ("audio", "video")}
  _check_objective(spec, "pretrain.", "batch_size", ratio_fields)
  if not 0.0 <= spec.mae_mask_ratio < 1.0:
    _fail("pretrain.mae_mask_ratio", f"a mask ratio must be in [0, 1), got {spec.mae_mask_ratio}")
  weights = spec.weights
  if any(w < 0 for w in weights.values()) or not any(weights.values()):
    _fail("pretrain.contrastive_weight", f"({spec.contrastive_weight}) and "
          f"config.pretrain.reconstruction_weight ({spec.reconstruction_weight}) must be >= 0, "
          "not both 0")
  if not spec.contrastive_weight and spec.mae_stop_gradient:
    _fail("pretrain.contrastive_weight", "0 with config.pretrain.mae_stop_gradient=True trains "
          "no encoder (the reconstruction gradient stops before the multimodal blocks); set "
          "mae_stop_gradient=False for reconstruction alone")
  return spec


def _retrieval(c, data_shards: int, check: bool) -> PretrainSpec:
  """Retrieval finetuning's objective: config.retrieval's ratios, temperature and schedule, the
  contrastive loss alone (its decoder does no work); layout switches as pretraining's."""
  r, p = c.retrieval, c.pretrain
  ratios = _ratio_set(r.mask_ratios)
  spec = PretrainSpec(
      mask_ratios=ratios, audio_mask_ratios=ratios, video_mask_ratios=ratios,
      contrastive_weight=1.0, reconstruction_weight=0.0, tau=float(r.tau),
      mae_mask_ratio=float(p.mae_mask_ratio), mae_stop_gradient=bool(p.mae_stop_gradient),
      separate_optimizers=False, accum_steps=c.accum_steps,
      batch_shards=int(c.mesh.batch_shards or data_shards),
      schedule=_schedule(r, "retrieval.", data_shards, check), pack_groups=bool(p.pack_groups),
      contrastive=str(r.contrastive))
  if check:
    _check_objective(spec, "retrieval.", "retrieval.batch_size",
                     {"audio": "retrieval.mask_ratios", "video": "retrieval.mask_ratios"})
  return spec


def _check_objective(spec: PretrainSpec, prefix: str, batch_field: str,
                     ratio_fields: dict[str, str]) -> None:
  """The checks of a contrastive objective: direction, temperature, each modality's ratio set
  (config field ratio_fields[modality]) and how its groups split the batch and micro-batches."""
  if spec.contrastive not in losses.CONTRASTIVE_DIRECTIONS:
    _fail(f"{prefix}contrastive", f"must be one of {losses.CONTRASTIVE_DIRECTIONS}, got "
          f"{spec.contrastive!r}")
  if spec.tau <= 0:
    _fail(f"{prefix}tau", f"must be positive, got {spec.tau}")
  sets = {ratio_fields[m]: spec.ratios(m[0]) for m in ("audio", "video")}
  for field, ratios in sets.items():
    if not ratios:
      _fail(field, "is empty")
    for r in ratios:
      if not 0.0 <= r < 1.0:
        _fail(field, f"a mask ratio must be in [0, 1), got {r}")
  accum, shards, batch = spec.accum_steps, spec.batch_shards, spec.schedule.batch_size
  if not isinstance(accum, int) or isinstance(accum, bool) or accum < 1:
    _fail("accum_steps", f"must be a positive integer, got {accum!r}")
  # Both modalities' groups split every shard; a batch that fits both is a multiple of this.
  multiple = math.lcm(*(len(r) for r in sets.values())) * shards
  if batch % shards:
    _fail(batch_field, f"{batch} is not divisible by its {shards} data shards "
          "(config.mesh.batch_shards)")
  for field, ratios in sets.items():
    if batch // shards % len(ratios):
      _fail(batch_field, f"per-shard batch {batch // shards} (batch {batch} / {shards} shards) is "
            f"not divisible by the {len(ratios)} mask-ratio groups of config.{field}; use a "
            f"batch that is a multiple of {multiple}")
    g = batch // shards // len(ratios)
    if g % accum:
      _fail("accum_steps", f"{accum} does not divide the {g} examples of each mask-ratio group "
            f"on each data shard (batch {batch} / {shards} shards / {len(ratios)} ratios of "
            f"config.{field}); micro-batches must take equal parts of every group")


def _finetune(c, data_shards: int, check: bool) -> FinetuneSpec:
  f = c.finetune
  spec = FinetuneSpec(
      dataset=f.dataset, init_checkpoint=f.init_checkpoint, loss=f.loss,
      head_lr_mult=float(f.head_lr_mult), mm_lr_mult=float(f.mm_lr_mult),
      balanced=bool(f.balanced), mixup=float(f.mixup), label_smoothing=float(f.label_smoothing),
      freqm=int(f.freqm), timem=int(f.timem),
      modality_mix=tuple(float(p) for p in f.modality_mix), modality_shards=f.modality_shards,
      eval_scores=f.eval_scores, schedule=_schedule(f, "finetune.", data_shards, check))
  if spec.loss not in losses.CLASSIFICATION_LOSSES:
    _fail("finetune.loss", "must be 'bce' (multi-label) or 'ce' (single-label), got "
          f"{spec.loss!r}")
  if spec.eval_scores not in losses.EVAL_SCORES:
    _fail("finetune.eval_scores", f"must be one of {losses.EVAL_SCORES} ('loss': sigmoid for "
          f"bce, softmax for ce), got {spec.eval_scores!r}")
  if not check:
    return spec
  mix = spec.modality_mix
  if len(mix) != 3 or min(mix) < 0 or abs(sum(mix) - 1) > 1e-6:
    _fail("finetune.modality_mix", "must be three probabilities (audio-visual, audio-only, "
          f"visual-only) summing to 1, got {mix}")
  n, batch = spec.modality_shards, spec.schedule.batch_size
  if not isinstance(n, int) or isinstance(n, bool) or n < 1:
    _fail("finetune.modality_shards", f"must be a positive integer (1: one modality draw per "
          f"step), got {n!r}")
  if batch % n:
    _fail("finetune.modality_shards", f"{n} does not divide the finetuning batch of {batch} "
          "(config.finetune.batch_size); each part draws its modality for an equal share")
  if spec.head_lr_mult <= 0 or spec.mm_lr_mult < 0:
    _fail("finetune.head_lr_mult", f"({spec.head_lr_mult}) must be positive and "
          f"config.finetune.mm_lr_mult ({spec.mm_lr_mult}) non-negative")
  return spec


def _eval(c, data_shards: int) -> EvalSpec:
  e = c.eval
  spec = EvalSpec(every_steps=int(e.every_steps), max_clips=int(e.max_clips),
                  retrieval_clips=int(e.retrieval_clips), batch_size=int(e.batch_size),
                  frame=int(e.frame), plot_classes=int(e.plot_classes),
                  retrieval_subset=str(e.retrieval_subset), every_epoch=bool(e.every_epoch),
                  early_stop_epochs=int(e.early_stop_epochs),
                  early_stop_metric=str(e.early_stop_metric))
  if spec.early_stop_epochs < 0:
    _fail("eval.early_stop_epochs", f"must be >= 0 (0: never), got {spec.early_stop_epochs}")
  if spec.early_stop_metric not in EARLY_STOP_METRICS:
    _fail("eval.early_stop_metric", f"must be one of {EARLY_STOP_METRICS} ('mAP': epochs since "
          f"the best audio-visual mAP, as released), got {spec.early_stop_metric!r}")
  if spec.batch_size <= 0 or spec.batch_size % data_shards:
    _fail("eval.batch_size", f"{spec.batch_size} must be a positive multiple of the "
          f"{data_shards} devices that split the batch (mesh data x fsdp)")
  if not 0 <= spec.frame < records.NUM_FRAMES:
    _fail("eval.frame", f"must be in [0, {records.NUM_FRAMES}), got {spec.frame}")
  for name in ("max_clips", "retrieval_clips"):
    if getattr(spec, name) < 0:
      _fail(f"eval.{name}", f"must be >= 0 (0: all), got {getattr(spec, name)}")
  return spec


def _compile_only(c) -> CompileSpec:
  co = c.compile_only
  spec = CompileSpec(topology=str(co.topology), num_classes=int(co.num_classes))
  if spec.topology and ":" not in spec.topology:
    _fail("compile_only.topology", f"{spec.topology!r} is not a TPU topology such as "
          "'v5p:2x2x1' or 'v5e:4x4'")
  if spec.num_classes <= 0:
    _fail("compile_only.num_classes", f"must be positive, got {spec.num_classes}")
  return spec


def _data(c) -> DataSpec:
  d = c.data
  return DataSpec(dir=d.dir, train_split=d.train_split, eval_split=d.eval_split,
                  time_shift=bool(d.time_shift), worker_count=int(d.worker_count),
                  demo=bool(d.demo), demo_train_clips=int(d.demo_train_clips),
                  demo_eval_clips=int(d.demo_eval_clips))


def parse(config, num_devices: int, process_count: int = 1,
          platform: str | None = None) -> RunSpec:
  """The checked specs of `config` for `num_devices` devices fed by `process_count` processes
  on `platform` (default: JAX's default backend).

  The schedule and batch checks of a stage run only when config.mode trains that stage.
  """
  c = config
  if c.mode not in MODES:
    _fail("mode", f"{c.mode!r} is not one of {MODES}")
  if c.model.dtype not in DTYPES:
    _fail("model.dtype", f"must be one of {sorted(DTYPES)}, got {c.model.dtype!r}")
  model = model_spec(c.model, platform, num_devices)
  shape = mesh_shape(c.mesh, num_devices)
  mesh = MeshSpec(shape=shape, rules=tuple(dict(c.mesh.rules).items()))
  data_shards = mesh.batch_shards
  if data_shards % process_count:
    _fail("mesh", f"data x fsdp = {data_shards} must be a multiple of the {process_count} "
          "processes, each of which feeds its own slice of the batch (keep the tensor axis "
          "within a host)")
  stages = STAGES[c.mode]
  if c.model_init and not paths.exists(c.model_init):
    _fail("model_init", f"{c.model_init!r} does not exist")
  init_checkpoint = c.finetune.init_checkpoint
  if (set(stages) & set(FROM_RUN_STAGES) and init_checkpoint
      and not paths.exists(init_checkpoint)):
    _fail("finetune.init_checkpoint", f"{init_checkpoint!r} does not exist")
  if c.model_init_format not in WEIGHT_FORMATS:
    _fail("model_init_format", f"must be one of {WEIGHT_FORMATS}, got {c.model_init_format!r}")
  return RunSpec(
      mode=c.mode, seed=int(c.seed), variant=c.model.variant, model=model,
      dtype=c.model.dtype, model_init=c.model_init, model_init_format=c.model_init_format,
      optim=OptimSpec(b1=float(c.optim.b1), b2=float(c.optim.b2),
                      weight_decay=float(c.optim.weight_decay)),
      pretrain=_pretrain(c, data_shards, "pretrain" in stages),
      finetune=_finetune(c, data_shards, "finetune" in stages),
      retrieval=_retrieval(c, data_shards, "retrieval_finetune" in stages),
      mesh=mesh, data=_data(c), eval=_eval(c, data_shards), compile_only=_compile_only(c),
      compile_cache_dir=str(c.compile_cache_dir),
      checkpoint_every_steps=int(c.checkpoint_every_steps),
      keep_checkpoints=int(c.keep_checkpoints), log_every_steps=int(c.log_every_steps),
      source=c.to_dict())


def dataset_dir(spec: RunSpec, workdir: str) -> str:
  """The dataset a run reads: config.data.dir, or the demo's in the workdir."""
  if spec.data.demo:
    return spec.data.dir or os.path.join(workdir, "demo_dataset")
  if not spec.data.dir:
    _fail("data.dir", "is not set: build a dataset with `python -m data_prep.build ... --out "
          "DATASET_DIR` and pass --config.data.dir=DATASET_DIR")
  if not os.path.isdir(spec.data.dir):
    _fail("data.dir", f"dataset directory {spec.data.dir!r} does not exist; build one with "
          "`python -m data_prep.build`")
  return spec.data.dir
