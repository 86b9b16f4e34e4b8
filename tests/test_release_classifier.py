"""Released finetuned AVSiam classifiers: converted with their heads into a run directory that
predicts and finetunes, and every model switch a converted checkpoint needs stored and checked."""
import dataclasses
import json
import os
import shutil

import iscc_samples  # real media (CC-BY-4.0), a test requirement
import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from avsiam_jax import checkpoint, finetuning, inference, predict, train
from avsiam_jax.config import model_spec, parse
from avsiam_jax.data import records
from avsiam_jax.weights import convert, load, provenance
from avsiam_jax.weights.common import SpecMismatch, WeightError
from conftest import build
from tests.test_finetune import finetune_config
from tests.test_train import tiny_config
from tests.test_weights import (_lin, _ln, flat, fake_release, fresh, release_spec,
                                released_forward)

MP4 = os.path.join(os.path.dirname(iscc_samples.__file__), "files", "video", "demo.mp4")
# tiny_config's inputs: 32 px frames (2 x 2 patches), a 32-frame 128-bin fbank (8 x 2 patches).
SIZE, FRAMES, MELS, NA = 32, 32, 128, 16
NAMES = ["Speech", "Dog, bark", "Cat", "Bird", "Fish"]
SIZES = ["--variant", "test", "--image-size", str(SIZE), "--audio-frames", str(FRAMES),
         "--mel-bins", str(MELS)]


def write_labels(path, names, csv=True):
  """A CAV-MAE label CSV (rows out of order, quoted names) or a plain list of names."""
  with open(path, "w") as f:
    if csv:
      f.write("index,mid,display_name\n")
      for i in reversed(range(len(names))):
        f.write(f'{i},/m/{i:04d},"{names[i]}"\n')
    else:
      f.write("\n".join(names) + "\n")
  return str(path)


def convert_finetuned(tmp_path, *args, seed=3, names=NAMES, csv=True):
  src = fake_release(seed, finetuned=True, na=NA, num_classes=len(names))
  akey = "module.vit_base.patch_embed_a.proj.weight"  # trained apart from the RGB kernel
  src[akey] = src[akey] + 0.02 * np.random.default_rng(seed).normal(size=src[akey].shape)
  src[akey] = src[akey].astype(np.float32)
  path = str(tmp_path / "ft.safetensors")
  save_file(src, path)
  labels = write_labels(tmp_path / ("labels.csv" if csv else "labels.txt"), names, csv)
  out = str(tmp_path / "converted")
  assert convert.main(["--format", "avsiam", "--src", path, "--out", out, "--labels", labels,
                       *SIZES, *args]) == 0
  return src, out


def released_probs(src, audio_txf, video_fxhxwx3, loss):
  """A float64 numpy re-implementation of the released classifier (CAVMAEFT_BASE) for one
  clip: {input: (C,) scores}, per-frame scores averaged as Predictor averages them."""
  f = len(video_fxhxwx3)
  a, v, av, sd = released_forward(src, np.repeat(audio_txf[None], f, axis=0),
                                  video_fxhxwx3.transpose(0, 3, 1, 2))
  head = lambda name, x: _lin(_ln(x, sd, name + ".0", 1e-5), sd, name + ".1")
  n = a.shape[1]
  logits = {"audio-only": head("mlp_head_a", a[:1].mean(1)),
            "visual-only": head("mlp_head", v.mean(1)),
            "audio-visual": head("mlp_head_mm", np.concatenate([av[:, :n].mean(1),
                                                                av[:, n:].mean(1)], -1))}
  return {k: _scores(x, loss).mean(0) for k, x in logits.items()}


def _scores(logits, loss):
  if loss == "bce":
    return 1 / (1 + np.exp(-logits))
  e = np.exp(logits - logits.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


# ----- conversion and prediction ------------------------------------------------------------

@pytest.mark.parametrize("labels,loss", [("csv", "bce"), ("plain", "ce")])
def test_converted_classifier_scores_as_released(tmp_path, labels, loss):
  src, out = convert_finetuned(tmp_path, "--loss", loss, csv=labels == "csv")
  with open(os.path.join(out, "config.json")) as f:
    config = json.load(f)
  assert (config["mode"], config["finetune"]["loss"]) == ("finetune", loss)
  assert config["data"]["frame_resize"] == "squash"  # the released preprocessing
  meta = load.read_meta(out)
  assert meta["layout"] == "run" and meta["dropped"]["mlp_head_mm_v2.1.weight"]
  assert meta["fresh"] == []  # every classifier parameter comes from the file

  p = inference.Predictor.load(out)
  assert p.label_names == NAMES and p.loss == loss
  rng = np.random.default_rng(7)
  audio = rng.normal(size=(FRAMES, MELS)).astype(np.float32)
  video = rng.normal(size=(10, SIZE, SIZE, 3)).astype(np.float32)
  want = released_probs(src, audio, video, loss)
  got = {"audio-only": p.probabilities(audio, None), "visual-only": p.probabilities(None, video),
         "audio-visual": p.probabilities(audio, video)}
  for name in want:
    print(f"{name}: max abs difference {np.abs(got[name] - want[name]).max():.2g}")
    np.testing.assert_allclose(got[name], want[name], atol=2e-6, rtol=0, err_msg=name)
    assert np.ptp(want[name]) > 0.05, name  # the heads tell the classes apart
  if loss == "ce":
    assert got["audio-visual"].sum() == pytest.approx(1.0, abs=1e-5)


def test_predict_cli_on_a_video(tmp_path, capsys):
  _, out = convert_finetuned(tmp_path, "--loss", "bce")
  capsys.readouterr()
  assert predict.main(["--checkpoint", out, "--top_k", "3", MP4]) == 0
  lines = capsys.readouterr().out.splitlines()
  # 60 s: the whole file's top 3, then each of its 6 windows' (a span line and 3 classes).
  assert lines[0] == f"{MP4}: audio-visual; 6 windows of 10 s every 10 s, the whole file:"
  scores = [l for l in lines[1:] if not l.lstrip().startswith("[")]
  assert len(lines) == 4 + 6 * 4 and all(l.split(None, 1)[1] in NAMES for l in scores)


def test_convert_refusals(tmp_path, capsys):
  src = fake_release(3, finetuned=True, na=NA, num_classes=5)
  path = str(tmp_path / "ft.safetensors")
  save_file(src, path)
  out = str(tmp_path / "o")
  five, four = (write_labels(tmp_path / f"l{n}.csv", NAMES[:n]) for n in (5, 4))
  # A finetuned file needs --labels (or --drop-heads): its heads are not dropped silently.
  with pytest.raises(WeightError, match="--labels"):
    convert.main(["--format", "avsiam", "--src", path, "--out", out, *SIZES])
  with pytest.raises(WeightError, match="score 5 classes.*names 4"):
    convert.main(["--format", "avsiam", "--src", path, "--out", out, "--labels", four, *SIZES])
  # 5 classes is neither AudioSet nor VGGSound: the loss must be given.
  with pytest.raises(WeightError, match="--loss"):
    convert.main(["--format", "avsiam", "--src", path, "--out", out, "--labels", five, *SIZES])
  gaps = tmp_path / "gaps.csv"
  gaps.write_text("index,mid,display_name\n0,/m/a,A\n2,/m/b,B\n")
  with pytest.raises(WeightError, match="without gaps"):
    convert.read_label_names(str(gaps))
  # --drop-heads: the encoder only, a pretraining start; the heads listed as dropped.
  assert convert.main(["--format", "avsiam", "--src", path, "--out", out, "--drop-heads",
                       *SIZES]) == 0
  assert "mlp_head_a.1.weight" in load.read_meta(out)["dropped"]
  capsys.readouterr()
  with pytest.raises(checkpoint.CheckpointError, match="converted weights, not a run"):
    inference.Predictor.load(out)
  # A pretraining file has no heads to keep.
  save_file(fake_release(1, na=NA), path)
  with pytest.raises(WeightError, match="no classification heads"):
    convert.main(["--format", "avsiam", "--src", path, "--out", str(tmp_path / "p"),
                  "--labels", five, "--loss", "bce", *SIZES])


def test_label_csv_is_ordered_by_index(tmp_path):
  path = write_labels(tmp_path / "l.csv", NAMES)
  assert convert.read_label_names(path) == NAMES
  assert convert.read_label_names(write_labels(tmp_path / "l.txt", NAMES, csv=False)) == NAMES


# ----- stored switches: checked on load, taken by the trainer -------------------------------

@pytest.fixture(scope="module")
def converted_release(tmp_path_factory):
  """A released pretraining file (with its decoder) converted at test_weights' sizes."""
  d = tmp_path_factory.mktemp("release")
  path = str(d / "release.safetensors")
  save_file(fake_release(), path)
  out = str(d / "converted")
  convert.convert(path, "avsiam", out, spec=release_spec(), variant="test")
  return out


MISMATCHES = {  # a spec field, a value other than the conversion's, the config key named
    "decoder_norm_eps": (1e-6, "decoder_norm_eps"), "double_tokens": (False, "double_tokens"),
    "block_norm_eps": (1e-6, "block_norm_eps"), "final_norm_eps": (1e-5, "final_norm_eps"),
    "modality_norms": (False, "modality_norms"),
    "separate_audio_patch": (False, "separate_audio_patch"), "image_size": (48, "image_size"),
    "audio_frames": (96, "audio_frames"), "mm_depth": (1, "mm_depth"),
    "decoder_depth": (2, "decoder_depth"), "width": (64, "variant"),
}


@pytest.mark.parametrize("field", sorted(MISMATCHES))
def test_every_stored_switch_is_checked(converted_release, field):
  value, key = MISMATCHES[field]
  spec = release_spec()
  if field in ("decoder_norm_eps", "mm_depth", "decoder_depth"):
    spec = dataclasses.replace(spec, **{field: value})
  elif field == "width":
    spec = dataclasses.replace(spec, encoder=dataclasses.replace(spec.encoder, width=value,
                                                                 mlp=2 * value))
  else:
    spec = release_spec(**{field: value})
  with pytest.raises(SpecMismatch, match=rf"config\.model\.{key}\b"):
    load.init_params(converted_release, "converted", spec, fresh(spec)[1])


def test_older_records_still_check_the_decoder_eps(converted_release, tmp_path):
  """Directories converted before the decoder eps was recorded as required."""
  old = str(tmp_path / "old")
  shutil.copytree(converted_release, old)
  meta = load.read_meta(old)
  meta["required"] = [f for f in meta["required"]
                      if f not in ("decoder_norm_eps", "separate_audio_patch")]
  with open(os.path.join(old, load.META_FILE), "w") as f:
    json.dump(meta, f)
  spec = dataclasses.replace(release_spec(), decoder_norm_eps=1e-6)
  with pytest.raises(SpecMismatch, match=r"config\.model\.decoder_norm_eps"):
    load.init_params(old, "converted", spec, fresh(spec)[1])


def test_the_trainer_takes_the_switches_of_a_converted_directory(converted_release):
  c = tiny_config(batch=10)
  m = c.model
  m.image_size, m.audio_frames, m.mel_bins = 32, 64, 32
  m.decoder_width, m.decoder_depth, m.decoder_heads = 16, 1, 2
  c.model_init = converted_release  # format "converted"; no release switch set
  spec = provenance.from_weights(parse(c, 1, platform="tpu"))  # dense, as release_spec()
  assert spec.model == release_spec()
  changed = spec.model_from_weights["changed"]
  assert changed["decoder_norm_eps"] == (1e-6, 1e-5) and changed["double_tokens"] == (False, True)
  assert spec.record()["model"]["decoder_norm_eps"] == 1e-5  # the run's config.json says so
  # And the run starts from it.
  _, params = fresh(spec.model)
  load.init_params(spec.model_init, spec.model_init_format, spec.model, params)


def test_finetune_from_a_converted_classifier(tmp_path, demo_dataset):
  _, out = convert_finetuned(tmp_path, "--loss", "bce")
  config = finetune_config(demo_dataset, init_checkpoint=out, total_steps=2)
  # tiny_config's model: only the released switches differ, and the run takes them.
  spec = provenance.from_weights(parse(config, 8))
  assert spec.model.encoder.double_tokens and spec.model.encoder.separate_audio_patch
  assert set(spec.model_from_weights["changed"]) == {"double_tokens", "separate_audio_patch"}

  # The encoder and multimodal blocks come from the classifier; the heads (4 demo classes,
  # not its 5) are drawn fresh.
  spec, _, task, fns = build(config, 8, num_classes=4)
  state = jax.device_get(train.fresh_state(task, fns, jax.random.key(0))["params"])
  loaded = inference.Predictor.load(out)
  converted = flat(nnx.to_pure_dict(loaded._state))  # pylint: disable=protected-access
  got = flat(state)
  for k in converted:
    if k.startswith(("encoder/", "mm_blocks/")):
      np.testing.assert_array_equal(got[k], converted[k], err_msg=k)
  drawn = flat(jax.device_get(fns.init(jax.random.key(0))["params"]))
  np.testing.assert_array_equal(got["head_av/dense/kernel"], drawn["head_av/dense/kernel"])

  # A model that does not match the classifier's recorded switches is refused by name.
  bad = dataclasses.replace(spec.model, encoder=dataclasses.replace(
      spec.model.encoder, block_norm_eps=1e-6))
  with pytest.raises(SpecMismatch, match=r"config\.model\.block_norm_eps"):
    finetuning.pretrained_avsiam_params(dataclasses.replace(spec, model=bad), jax.random.key(0))

  # Through the trainer, without a single model flag.
  work = str(tmp_path / "ft")
  results = train.run(config, work)
  assert results["step"] == 2 and np.isfinite(results["audio-visual"]["top1"])
  with open(os.path.join(work, "config.json")) as f:
    assert json.load(f)["model"]["double_tokens"] is True
  with pytest.raises(WeightError, match="finetune.init_checkpoint"):
    load.init_params(out, "converted", model_spec(config.model), {})


def test_evaluate_a_converted_classifier(tmp_path, demo_dataset):
  """mode=eval on the converted directory: its switches and loss come from its config.json."""
  names = records.read_info(demo_dataset)["label_names"]
  _, out = convert_finetuned(tmp_path, "--loss", "ce", names=names)
  config = finetune_config(demo_dataset)
  config.mode = "eval"
  spec = parse(config, 8)
  assert not spec.model.encoder.double_tokens
  run_spec = provenance.from_run(spec, checkpoint.run_config(out), out)
  assert run_spec.model.encoder.double_tokens and run_spec.model.encoder.separate_audio_patch
  results = train.run(config, out)
  assert results["audio-visual"]["num_clips"] == 10
  assert np.isfinite(results["audio-visual"]["top1"])
  assert os.path.exists(os.path.join(out, "eval_eval.json"))
