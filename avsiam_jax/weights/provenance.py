"""The model a run's weights fix: config.parse reads no files, so where a run starts (train.run,
train.evaluate_run, compile_only.run) its spec passes through here.

Weights trained or converted with some value of a field in signature.py load only into a model
with that value, so a run takes those fields from the weights' own record, whatever the config
says, and logs each one it changed (RunSpec.model_from_weights). A record that cannot be read
stops the run, naming the file.
"""
from __future__ import annotations

from avsiam_jax import checkpoint
from avsiam_jax import config as config_lib
from avsiam_jax.config import ConfigError, RunSpec
from avsiam_jax.weights import load, signature

# The config.model keys a run directory's weights fix: its encoder and multimodal blocks, all a
# finetuning run or mode=eval reads of it (dtype, remat, scan stay the run's own).
RUN_KEYS = signature.keys(signature.ENCODER)


def from_weights(spec: RunSpec) -> RunSpec:
  """`spec` with the model fields of the weights its training starts from: a finetuning run's
  (classification or retrieval) finetune.init_checkpoint (any run directory: a pretraining run,
  a converted classifier), else a converted model_init directory."""
  stages = config_lib.STAGES[spec.mode]
  init_checkpoint = spec.finetune.init_checkpoint
  if len(stages) == 1 and stages[0] in config_lib.FROM_RUN_STAGES and init_checkpoint:
    try:
      run_config = checkpoint.run_config(init_checkpoint)
    except checkpoint.CheckpointError as e:
      raise ConfigError(f"config.finetune.init_checkpoint: {e}") from e
    return from_run(spec, run_config, init_checkpoint)
  if stages and spec.model_init and spec.model_init_format == "converted":
    try:
      fixed = load.recorded_model_config(spec.model_init)
    except load.WeightError as e:
      raise ConfigError(f"config.model_init: {e}") from e
    return _take(spec, fixed, spec.model_init)
  return spec


def from_run(spec: RunSpec, run_config, workdir: str) -> RunSpec:
  """`spec` with the model fields of the run in `workdir`, whose config.json is `run_config`."""
  model = run_config.get("model") or {}
  # A config.json written before a key was added lacks it.
  return _take(spec, {k: model[k] for k in RUN_KEYS if k in model}, workdir)


def _take(spec: RunSpec, fixed: dict, source: str) -> RunSpec:
  model = dict(spec.source["model"])
  changed = {k: (model.get(k), v) for k, v in fixed.items() if model.get(k) != v}
  model.update(fixed)
  return config_lib.with_model(spec, model, {"source": source, "changed": changed})
