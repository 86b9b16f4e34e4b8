r"""Converts pretrained weights into a checkpoint the trainer can start from.

  python -m avsiam_jax.weights.convert --format vitjax|timm|avsiam --src PATH --variant B/16 \
      --out DIR [model switches, see --help]

DIR receives `params/` (an Orbax pytree of the full AVSiam model's pure-dict params: encoder,
multimodal blocks, decoder) and `avsiam_init.json` (variant, source, the spec switches used,
the source keys dropped on purpose and why). Train from it with
  --config.model_init=DIR --config.model_init_format=converted
The run takes the model switches DIR was made for from it (no `--config.model.*` flags needed).

A released finetuned AVSiam classifier (`--format avsiam` with its `mlp_head*` heads) becomes a
finetuning run directory with `--labels CSV`: DIR/config.json (the model switches and the loss,
`--loss bce|ce`, by default bce for 527 classes (AudioSet) and ce for 309 (VGGSound)),
DIR/label_names.json and DIR/checkpoints/0 (encoder, multimodal blocks, the three heads), which
`python -m avsiam_jax.predict --checkpoint DIR` reads and finetuning starts from
(`--config.finetune.init_checkpoint=DIR`). `--drop-heads` converts only its encoder instead.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import os
import sys

import numpy as np

from avsiam_jax import paths, trees, utils
from avsiam_jax.data import records
from avsiam_jax.models.avsiam import AVSiamSpec
from avsiam_jax.models.vit import EncoderSpec, encoder_spec
from avsiam_jax.weights import avsiam_release, load, signature
from avsiam_jax.weights.common import WeightError, read_tensors

# Encoder switches the released AVSiam checkpoints need (the CLI's defaults for --format avsiam).
# The release trains its audio patch projection apart; keep it unless told to drop it.
RELEASE_DEFAULTS = dict(avsiam_release.RELEASE_SWITCHES, separate_audio_patch=True)
# The released finetuning losses by class count: AudioSet (multi-label), VGGSound (single-label).
RELEASE_LOSSES = {527: "bce", 309: "ce"}
# The released AVSiam squashes every frame to 224 x 224 (see README, "Where we differ").
RELEASE_FRAME_RESIZE = "squash"


def _str_keys(tree: dict) -> dict:
  return {str(k): _str_keys(v) if isinstance(v, dict) else v for k, v in tree.items()}


def _empty_out(out: str, overwrite: bool) -> str:
  """The absolute output directory (or gs:// URL), empty; FileExistsError if it is not and
  not `overwrite`, OSError naming a bucket that cannot be written."""
  out = paths.absolute(out)
  p = paths.path(out)
  if p.is_dir() and any(p.iterdir()):
    if not overwrite:
      raise FileExistsError(f"{out!r} exists and is not empty (pass overwrite=True / --overwrite)")
    p.rmtree()
  paths.makedirs(out)
  paths.check_writable(out)
  return out


def _record(src, fmt, spec, variant, seed, new, info) -> dict:
  return {
      "variant": variant,
      "source_format": fmt,
      "source_path": os.path.abspath(src),
      "seed": seed,
      "switches": signature.spec_switches(spec),
      "required": info["required"],
      "config_overrides": config_overrides(spec),
      "num_params": int(sum(np.size(v) for v in trees.flatten(new).values())),
      "notes": info.get("notes", []),
      "dropped": info["dropped"],
      # Leaves the source does not hold: a run starting from DIR draws them from its own seed.
      "fresh": info["fresh"],
  }


def convert(src: str, fmt: str, out: str, *, spec: AVSiamSpec, variant: str | None = None,
            seed: int = 0, allow_lossy_audio_patch: bool = False, overwrite: bool = False,
            drop_heads: bool = False) -> dict:
  """Writes DIR/params (Orbax) and DIR/avsiam_init.json; returns the JSON record.

  A finetuned released file (heads) needs `drop_heads` here: `convert_classifier` keeps them.
  """
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  flat = read_tensors(src)
  if fmt == "avsiam" and avsiam_release.has_heads(flat) and not drop_heads:
    raise WeightError(
        f"{src!r} is a finetuned classifier (mlp_head* heads): pass --labels CSV to convert it "
        "with its heads into a run directory for prediction and finetuning, or --drop-heads to "
        "keep only its encoder and multimodal blocks (a pretraining start)")
  params = load.fresh_params(spec, seed)
  new, info = load.convert_source(src, fmt, spec, params, tensors=flat,
                                  allow_lossy_audio_patch=allow_lossy_audio_patch)
  out = _empty_out(out, overwrite)
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(os.path.join(out, load.PARAMS_DIR), _str_keys(new))
  meta = _record(src, fmt, spec, variant, seed, new, info)
  utils.write_json(os.path.join(out, load.META_FILE), meta)
  return meta


def read_label_names(path: str) -> list[str]:
  """Class names in index order: a CAV-MAE / AudioSet label CSV (index,mid,display_name, in any
  column order) or a plain list, one name a line."""
  with open(path, encoding="utf-8") as f:
    text = f.read()
  lines = [l.strip() for l in text.splitlines() if l.strip()]
  if not lines:
    raise WeightError(f"{path!r}: no class names")
  header = [h.strip() for h in next(csv.reader([lines[0]]))]
  if not {"index", "display_name"} <= set(header):
    return lines
  rows = {}
  for n, row in enumerate(csv.DictReader(io.StringIO(text)), start=2):
    try:
      i = int(row["index"])
    except (TypeError, ValueError):
      raise WeightError(f"{path!r}, line {n}: index {row['index']!r} is not an integer") from None
    if i in rows:
      raise WeightError(f"{path!r}, line {n}: index {i} repeated")
    rows[i] = (row["display_name"] or "").strip()
  if sorted(rows) != list(range(len(rows))):
    raise WeightError(f"{path!r}: the indices must run 0..{len(rows) - 1} without gaps")
  return [rows[i] for i in range(len(rows))]


def run_config(spec: AVSiamSpec, variant: str, loss: str, frame_resize: str) -> dict:
  """The config.json of a converted classifier: what inference and finetuning read from a run."""
  model = {k: v for k, v in signature.spec_switches(spec).items()
           if signature.config_key(k) != "config.model.variant"}
  model.update(variant=variant, dtype="float32", remat="none", scan=False)
  return {"mode": "finetune", "seed": 0, "model": model,
          "finetune": {"loss": loss, "init_checkpoint": ""},
          "data": {"frame_resize": frame_resize}}


def convert_classifier(src: str, out: str, *, spec: AVSiamSpec, variant: str, labels: str,
                       loss: str | None = None, frame_resize: str = RELEASE_FRAME_RESIZE,
                       overwrite: bool = False) -> dict:
  """A released finetuned classifier as a finetuning run directory (see the module docstring);
  returns the conversion record, also written to DIR/avsiam_init.json."""
  # pylint: disable=import-outside-toplevel
  from flax import nnx
  from avsiam_jax import checkpoint, losses
  from avsiam_jax.models.classifier import AVSiamClassifier, ClassifierSpec
  names = read_label_names(labels)
  flat = read_tensors(src)
  n = avsiam_release.num_classes(flat)
  if n != len(names):
    raise WeightError(f"the heads of {src!r} score {n} classes, {labels!r} names {len(names)}")
  loss = loss or RELEASE_LOSSES.get(n)
  if loss not in losses.CLASSIFICATION_LOSSES:
    raise WeightError(f"{n} classes is neither AudioSet (527, multi-label) nor VGGSound (309, "
                      "single-label): give the loss the classifier was finetuned with, --loss "
                      "bce (sigmoid scores) or --loss ce (softmax)")
  records.check_frame_resize(frame_resize)
  cspec = ClassifierSpec(encoder=spec.encoder, num_classes=n, mm_depth=spec.mm_depth)
  # Every leaf comes from the file, so the shapes are all the target needs.
  target = nnx.to_pure_dict(nnx.state(nnx.eval_shape(
      lambda: AVSiamClassifier(cspec, rngs=nnx.Rngs(0))), nnx.Param))
  new, info = load.convert_source(src, "avsiam", spec, target, tensors=flat)
  out = _empty_out(out, overwrite)
  utils.write_json(os.path.join(out, checkpoint.CONFIG_FILE),
                   run_config(spec, variant, loss, frame_resize))
  utils.write_json(os.path.join(out, checkpoint.LABELS_FILE), names)
  ckpt = checkpoint.Checkpointer(os.path.join(out, "checkpoints"), every_steps=0, keep=1)
  ckpt.save(0, {"params": new, "step": np.int32(0)}, {"converted_from": os.path.abspath(src)})
  ckpt.close()
  meta = dict(_record(src, "avsiam", spec, variant, 0, new, info), layout="run", loss=loss,
              num_classes=n, labels=os.path.abspath(labels), frame_resize=frame_resize)
  utils.write_json(os.path.join(out, load.META_FILE), meta)
  return meta


def config_overrides(spec: AVSiamSpec) -> dict[str, object]:
  """Trainer config keys whose value must differ from the default to match `spec`."""
  base = AVSiamSpec(encoder=EncoderSpec(**{f: getattr(spec.encoder, f) for f in
                                           ("width", "depth", "mlp", "heads", "patch")}))
  now, default = signature.spec_switches(spec), signature.spec_switches(base)
  return {signature.config_key(k): v for k, v in now.items() if v != default[k]}


def spec_from_args(a: argparse.Namespace) -> AVSiamSpec:
  release = a.format == "avsiam"
  def pick(name, fallback):
    v = getattr(a, name)
    return fallback if v is None else v
  enc_defaults = {f.name: f.default for f in dataclasses.fields(EncoderSpec)
                  if f.default is not dataclasses.MISSING}
  if release:
    enc_defaults.update(RELEASE_DEFAULTS)
  enc = encoder_spec(
      a.variant, image_size=a.image_size, audio_frames=a.audio_frames, mel_bins=a.mel_bins,
      audio_patch_mode=a.audio_patch_mode, audio_posemb_init=a.audio_posemb_init,
      modality_norms=pick("modality_norms", enc_defaults["modality_norms"]),
      double_tokens=pick("double_tokens", enc_defaults["double_tokens"]),
      separate_audio_patch=pick("separate_audio_patch", enc_defaults["separate_audio_patch"]),
      block_norm_eps=pick("block_norm_eps", enc_defaults["block_norm_eps"]),
      final_norm_eps=pick("final_norm_eps", enc_defaults["final_norm_eps"]))
  dec_eps = pick("decoder_norm_eps", avsiam_release.RELEASE_DECODER_EPS if release
                 else AVSiamSpec.decoder_norm_eps)
  return AVSiamSpec(encoder=enc, mm_depth=a.mm_depth, decoder_width=a.decoder_width,
                    decoder_depth=a.decoder_depth, decoder_heads=a.decoder_heads,
                    decoder_norm_eps=dec_eps, mm_norm=a.mm_norm)


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m avsiam_jax.weights.convert", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--format", required=True, choices=load.SOURCE_FORMATS)
  p.add_argument("--src", required=True, help="source weight file")
  p.add_argument("--variant", required=True, help="B/16, L/16, H/14 (or test, tiny, Ti, S)")
  p.add_argument("--out", required=True, help="output directory")
  p.add_argument("--seed", type=int, default=0, help="seed of the fresh parameters (decoder)")
  p.add_argument("--overwrite", action="store_true")
  p.add_argument("--allow-lossy-audio-patch", action="store_true",
                 help="avsiam: drop a trained audio patch kernel that differs from the RGB mean")
  g = p.add_argument_group("finetuned classifiers (--format avsiam with mlp_head* heads)")
  g.add_argument("--labels", help="class names: a CAV-MAE label CSV (index,mid,display_name) or "
                 "one name a line; writes a run directory with the heads")
  g.add_argument("--loss", choices=("bce", "ce"), help="the loss it was finetuned with (default: "
                 "bce for 527 classes, ce for 309)")
  # Spelled as data_prep.build's flag; the hyphenated spelling of this command's others works too.
  g.add_argument("--frame_resize", "--frame-resize", dest="frame_resize",
                 choices=records.FRAME_RESIZES, default=RELEASE_FRAME_RESIZE,
                 help="how inference makes frames square (default: squash, as released)")
  g.add_argument("--drop-heads", action="store_true",
                 help="convert only the encoder and multimodal blocks (a pretraining start)")
  g = p.add_argument_group("model switches (mirror config.model.*)")
  g.add_argument("--image-size", type=int, default=224)
  g.add_argument("--audio-frames", type=int, default=1024)
  g.add_argument("--mel-bins", type=int, default=128)
  g.add_argument("--audio-patch-mode", default="floor", choices=("floor", "pad"))
  g.add_argument("--audio-posemb-init", default="nearest1d", choices=("nearest1d", "bilinear2d"))
  g.add_argument("--modality-norms", action=argparse.BooleanOptionalAction, default=None)
  g.add_argument("--double-tokens", action=argparse.BooleanOptionalAction, default=None,
                 help="default: on for --format avsiam (released quirk), else off")
  g.add_argument("--separate-audio-patch", action=argparse.BooleanOptionalAction, default=None,
                 help="default: on for --format avsiam (released), else off")
  g.add_argument("--block-norm-eps", type=float, default=None)
  g.add_argument("--final-norm-eps", type=float, default=None)
  g.add_argument("--mm-depth", type=int, default=2)
  g.add_argument("--decoder-width", type=int, default=512)
  g.add_argument("--decoder-depth", type=int, default=8)
  g.add_argument("--decoder-heads", type=int, default=16)
  g.add_argument("--decoder-norm-eps", type=float, default=None,
                 help="default: 1e-5 for --format avsiam (released), else 1e-6")
  g.add_argument("--mm-norm", action=argparse.BooleanOptionalAction, default=True,
                 help="a LayerNorm between the multimodal blocks and the decoder (the released "
                 "model has none: --no-mm-norm); default on, a fresh one for --format avsiam")
  return p


def main(argv=None) -> int:
  a = parser().parse_args(argv)
  try:
    spec = spec_from_args(a)
  except ValueError as e:  # the model switches do not make a model (e.g. an unknown variant)
    parser().error(str(e))
  if a.labels:
    if a.format != "avsiam" or a.drop_heads:
      parser().error("--labels converts a finetuned AVSiam classifier: --format avsiam, without "
                     "--drop-heads")
    meta = convert_classifier(a.src, a.out, spec=spec, variant=a.variant, labels=a.labels,
                              loss=a.loss, frame_resize=a.frame_resize, overwrite=a.overwrite)
  else:
    meta = convert(a.src, a.format, a.out, spec=spec, variant=a.variant, seed=a.seed,
                   allow_lossy_audio_patch=a.allow_lossy_audio_patch, overwrite=a.overwrite,
                   drop_heads=a.drop_heads)
  out = paths.absolute(a.out)
  print(f"wrote {out}: {meta['num_params']:,} parameters from {a.format} {a.src}")
  for n in meta["notes"]:
    print(f"  note: {n}")
  print(f"  {len(meta['dropped'])} source keys dropped on purpose (listed in "
        f"{os.path.join(out, load.META_FILE)})")
  taken = load.recorded_model_config(out)
  print("  model switches recorded (a run starting from it takes them): "
        + ", ".join(f"{k}={v}" for k, v in taken.items()))
  if a.labels:
    print(f"  a finetuning run directory: {meta['num_classes']} classes, loss {meta['loss']}")
    print(f"predict with:\n  python -m avsiam_jax.predict --checkpoint {out} VIDEO...")
    print(f"finetune from it with:\n  --config.finetune.init_checkpoint={out}")
  else:
    print(f"train with:\n  --config.model_init={out} --config.model_init_format=converted")
  return 0


if __name__ == "__main__":
  # A bad source file or output directory in one line; main() itself raises them for callers.
  sys.exit(utils.cli_errors(WeightError, OSError)(main)())
