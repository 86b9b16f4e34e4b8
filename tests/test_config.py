"""config.parse: the ConfigDict checked once into frozen specs, every error naming its field."""
import dataclasses
import json
import os
import re
import subprocess
import sys

import pytest

from avsiam_jax import config as config_lib
from avsiam_jax.config import ConfigError, parse
from avsiam_jax.weights import provenance
from configs import base, demo, huge, large

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_specs_carry_the_config_and_are_frozen():
  c = base.get_config("mode=finetune,dataset=as20k")
  spec = parse(c, num_devices=8)
  assert spec.model.encoder.width == 768 and spec.model.encoder.patch == 16
  assert spec.mesh.shape == (8, 1, 1) and spec.mesh.batch_shards == 8
  assert spec.finetune.schedule.batch_size == c.finetune.batch_size == 32
  assert spec.pretrain.schedule.batch_size == c.batch_size
  assert spec.pretrain.mask_ratios == (0.0, 0.2, 0.4, 0.6, 0.8)
  assert spec.finetune.modality_mix == (0.5, 0.25, 0.25)
  # Model-size configs compute in bfloat16 (float32 parameters); the CPU demo in float32.
  assert spec.dtype == "bfloat16" and parse(demo.get_config(), 1).dtype == "float32"
  with pytest.raises(dataclasses.FrozenInstanceError):
    spec.seed = 1  # pytype: disable=not-writable
  # The recorded config is the given one, round-tripped through JSON.
  assert json.loads(json.dumps(spec.record())) == json.loads(c.to_json_best_effort())


def test_stages_of_pretrain_plus_finetune(tmp_path):
  spec = parse(demo.get_config(), num_devices=1)
  assert spec.mode == "pretrain+finetune"
  pre, ft = (spec.stage(n, str(tmp_path)) for n in ("pretrain", "finetune"))
  assert (pre.mode, ft.mode) == ("pretrain", "finetune")
  # One demo dataset for both stages; finetuning starts from the pretraining stage.
  assert pre.data.dir == ft.data.dir == os.path.join(str(tmp_path), "demo_dataset")
  assert ft.finetune.init_checkpoint == os.path.join(str(tmp_path), "pretrain")
  assert ft.record()["finetune"]["init_checkpoint"] == ft.finetune.init_checkpoint
  assert ft.record()["mode"] == "finetune" and spec.mode == "pretrain+finetune"


@pytest.mark.parametrize("field,value,message", [
    ("mode", "distill", r"config\.mode: 'distill' is not one of"),
    ("model.dtype", "float16", r"config\.model\.dtype: must be one of"),
    ("model.variant", "X/16", r"config\.model: unknown ViT variant"),
    ("model.image_size", 100, r"config\.model: image_size 100 is not divisible by patch 16"),
    ("model_init_format", "onnx", r"config\.model_init_format: must be one of"),
    ("model_init", "/nonexistent/w.npz", r"config\.model_init: '/nonexistent/w.npz' does not"),
    ("pretrain.mask_ratios", (0.0, 1.0), r"config\.pretrain\.mask_ratios: a mask ratio must "
                                          r"be in \[0, 1\), got 1.0"),
    ("pretrain.mae_mask_ratio", -0.1, r"config\.pretrain\.mae_mask_ratio"),
    ("pretrain.tau", 0.0, r"config\.pretrain\.tau: must be positive"),
    ("batch_size", 44, r"config\.batch_size: .*multiple of the 8 devices"),
    ("optim.decay_every_epochs", 0, r"config\.optim\.decay_every_epochs: must be positive"),
    ("accum_steps", 3, r"config\.accum_steps: 3 does not divide"),
    ("eval.batch_size", 12, r"config\.eval\.batch_size: 12 must be a positive multiple"),
    ("eval.frame", 10, r"config\.eval\.frame: must be in \[0, 10\)"),
    ("finetune.decay_every_epochs", 0, r"config\.finetune\.decay_every_epochs: must be"),
    ("eval.max_clips", -1, r"config\.eval\.max_clips: must be >= 0"),
    ("mesh.tensor", 3, r"config\.mesh: .*does not divide the 8 devices"),
    ("finetune.loss", "mse", r"config\.finetune\.loss: must be 'bce'"),
    ("pretrain.contrastive", "video_to_audio", r"config\.pretrain\.contrastive: must be one of "
                                               r"\('symmetric', 'audio_to_video'\)"),
    ("finetune.modality_shards", 3, r"config\.finetune\.modality_shards: 3 does not divide"),
    ("finetune.eval_scores", "softmax", r"config\.finetune\.eval_scores: must be one of "
                                        r"\('loss', 'sigmoid'\)"),
    ("eval.early_stop_metric", "top1", r"config\.eval\.early_stop_metric: must be one of "
                                       r"\('selection', 'mAP'\)"),
    ("pretrain.video_mask_ratios", (0.5, 1.0), r"config\.pretrain\.video_mask_ratios: a mask "
                                               r"ratio must be in \[0, 1\), got 1.0"),
    ("pretrain.audio_mask_ratios", (0.0, 0.5, 0.75), r"config\.batch_size: per-shard batch 200 "
     r".* 3 mask-ratio groups of config\.pretrain\.audio_mask_ratios; .* multiple of 120"),
    ("pretrain.reconstruction_weight", -1.0, r"config\.pretrain\.contrastive_weight: .* must be "
                                             r">= 0, not both 0"),
    ("pretrain.contrastive_weight", 0.0, r"config\.pretrain\.contrastive_weight: 0 with "
                                         r"config\.pretrain\.mae_stop_gradient=True trains no"),
])
def test_each_bad_field_is_named(field, value, message):
  c = base.get_config("mode=pretrain+finetune")  # both stages' checks
  section, _, name = field.rpartition(".")
  setattr(c[section] if section else c, name, value)
  with pytest.raises(ConfigError, match=message):
    parse(c, num_devices=8)


@pytest.mark.parametrize("field,value,message", [
    ("retrieval.tau", 0.0, r"config\.retrieval\.tau: must be positive"),
    ("retrieval.mask_ratios", (), r"config\.retrieval\.mask_ratios: is empty"),
    ("retrieval.contrastive", "video", r"config\.retrieval\.contrastive: must be one of"),
    ("retrieval.decay_every_epochs", 0, r"config\.retrieval\.decay_every_epochs: must be"),
    ("retrieval.mask_ratios", (0.0, 0.5, 0.75), r"config\.retrieval\.batch_size: per-shard "
                                                r"batch 32 .* 3 mask-ratio groups"),
])
def test_each_bad_retrieval_field_is_named(field, value, message):
  c = base.get_config("mode=retrieval_finetune")
  c.pretrain.contrastive_weight = c.pretrain.reconstruction_weight = 0.0  # not this stage's
  section, _, name = field.rpartition(".")
  setattr(c[section], name, value)
  with pytest.raises(ConfigError, match=message):
    parse(c, num_devices=8)


def test_stage_checks_only_for_the_stages_the_mode_runs():
  c = base.get_config()  # pretraining
  c.finetune.batch_size = 12  # not a multiple of 8 devices: finetuning would fail
  parse(c, num_devices=8)
  c.mode = "pretrain+finetune"
  with pytest.raises(ConfigError, match=r"config\.finetune\.batch_size: 12"):
    parse(c, num_devices=8)


def test_processes_must_split_the_batch_axes():
  c = base.get_config()
  c.mesh.data, c.mesh.tensor = 2, 4
  with pytest.raises(ConfigError, match="multiple of the 4 processes"):
    parse(c, num_devices=8, process_count=4)


def test_dataset_dir_errors_name_the_field(tmp_path):
  c = base.get_config()
  with pytest.raises(ConfigError, match=r"config\.data\.dir: is not set"):
    config_lib.dataset_dir(parse(c, 8), str(tmp_path))
  c.data.dir = str(tmp_path / "nope")
  with pytest.raises(ConfigError, match="does not exist"):
    config_lib.dataset_dir(parse(c, 8), str(tmp_path))


def test_finetuning_epochs_in_samples():
  # The released AS-2M / VGGSound runs: each GPU a full-length weighted sampler per epoch; the
  # Base table (Table 9) trains on 4 GPUs.
  for dataset, length in (("as20k", 1.0), ("as2m", 4.0), ("vggsound", 4.0), ("custom", 1.0)):
    spec = parse(base.get_config(f"mode=finetune,dataset={dataset}"), 8)
    assert spec.finetune.schedule.epoch_length == length, dataset
  s = parse(base.get_config("mode=finetune,dataset=vggsound"), 8).finetune.schedule
  assert s.batch_size == 128 and s.steps_per_epoch(1000) == 4000 // 128
  assert dataclasses.replace(s, epoch_length=1.0).steps_per_epoch(1000) == 1000 // 128
  c = base.get_config("mode=finetune")
  c.finetune.epoch_length = 0.0
  with pytest.raises(ConfigError, match=r"config\.finetune\.epoch_length: must be positive"):
    parse(c, 8)


# The paper's Tables 9-11, finetuning: per-GPU batch x GPUs.
PAPER_BATCHES = {
    "B/16": {"as20k": (8, 4), "as2m": (32, 4), "vggsound": (32, 4)},
    "L/16": {"as20k": (8, 4), "as2m": (16, 8), "vggsound": (16, 8)},
    "H/14": {"as20k": (4, 8), "as2m": (4, 8), "vggsound": (4, 8)},
}


@pytest.mark.parametrize("module", [base, large, huge])
def test_balanced_epochs_are_the_paper_gpu_counts(module):
  variant = module.get_config().model.variant
  for dataset, (per_gpu, gpus) in PAPER_BATCHES[variant].items():
    f = module.get_config(f"mode=finetune,dataset={dataset}").finetune
    assert f.batch_size == per_gpu * gpus, (variant, dataset)
    # A balanced epoch is GPUs x N draws (each GPU a full-length sampler); a plain one N.
    assert f.epoch_length == (gpus if dataset != "as20k" else 1.0), (variant, dataset)
    assert f.balanced == (dataset != "as20k")


def test_config_files_import_no_jax():
  """Loading a config file imports the names it checks against, not JAX, Flax or TFDS."""
  code = ("import sys; from configs import base; base.get_config('mode=finetune,dataset=as20k'); "
          "print(sorted(m for m in ('jax', 'flax', 'tensorflow', 'tensorflow_datasets') "
          "if m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       check=True)
  assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("section,key", [
    ("pretrain", "pack_groups"), ("pretrain", "video_mask_ratios"),
    ("pretrain", "reconstruction_weight"), ("retrieval", "tau"), ("retrieval", "total_steps"),
    ("finetune", "epoch_length"), ("eval", "every_epoch"),
    ("eval", "early_stop_epochs"), ("data", "demo_train_clips"), ("compile_only", "num_classes"),
    ("mesh", "batch_shards"), ("", "compile_cache_dir")])
def test_no_second_defaults(section, key):
  """configs/common.py defines every key once (the demo's too) and parse falls back on none."""
  c = base.get_config()
  node = c[section] if section else c
  assert key in node
  del node[key]
  with pytest.raises(AttributeError, match=key):
    parse(c, num_devices=8)


def _run_dir(path, config_text):
  path.mkdir()
  (path / "config.json").write_text(config_text)
  return str(path)


def test_parse_reads_no_weights_and_unreadable_ones_stop_the_run(tmp_path):
  """The provenance step, not parse, reads the weights' records; a broken one is an error with
  its path, not skipped."""
  c = base.get_config()
  c.model_init = str(tmp_path)  # format "converted"
  meta = tmp_path / "avsiam_init.json"
  meta.write_text("{not json")
  spec = parse(c, 8)
  with pytest.raises(ConfigError, match=rf"config\.model_init: {re.escape(str(meta))}: cannot be"):
    provenance.from_weights(spec)
  c = base.get_config("mode=finetune")
  c.finetune.init_checkpoint = _run_dir(tmp_path / "broken", "")
  spec = parse(c, 8)
  with pytest.raises(ConfigError, match=r"config\.finetune\.init_checkpoint: .*"
                     + re.escape(os.path.join("broken", "config.json")) + ": cannot be read"):
    provenance.from_weights(spec)


def test_the_model_fields_of_a_run_directory_are_taken_and_checked(tmp_path):
  c = base.get_config("mode=finetune")
  c.finetune.init_checkpoint = _run_dir(
      tmp_path / "run", json.dumps({"model": {"image_size": 112, "dtype": "float32"}}))
  given = parse(c, 8)
  spec = provenance.from_weights(given)
  assert given.model.encoder.image_size == 224 and spec.model.encoder.image_size == 112
  assert spec.model_from_weights == {"source": c.finetune.init_checkpoint,
                                     "changed": {"image_size": (224, 112)}}
  assert spec.dtype == "bfloat16" and spec.record()["model"]["image_size"] == 112  # dtype free
  # The fields taken are checked as parse checks the config's own.
  c.finetune.init_checkpoint = _run_dir(tmp_path / "bad",
                                        json.dumps({"model": {"image_size": 100}}))
  with pytest.raises(ConfigError, match=r"config\.model: image_size 100 is not divisible"):
    provenance.from_weights(parse(c, 8))
