r"""Converts pretrained weights into a checkpoint the trainer can start from.

  python -m avsiam_jax.weights.convert --format vitjax|timm|avsiam --src PATH --variant B/16 \
      --out DIR [model switches, see --help]

DIR receives `params/` (an Orbax pytree of the full AVSiam model's pure-dict params: encoder,
multimodal blocks, decoder) and `avsiam_init.json` (variant, source, the spec switches used,
the source keys dropped on purpose and why). Train from it with
  --config.model_init=DIR --config.model_init_format=converted
plus the `--config.model.*` switches the command prints (those that differ from the defaults).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys

import numpy as np

from avsiam_jax import trees
from avsiam_jax.models.avsiam import AVSiamSpec
from avsiam_jax.models.vit import EncoderSpec, encoder_spec
from avsiam_jax.weights import avsiam_release, load, place

# Encoder switches the released AVSiam checkpoints need (the CLI's defaults for --format avsiam).
# The release trains its audio patch projection apart; keep it unless told to drop it.
RELEASE_DEFAULTS = dict(avsiam_release.RELEASE_SWITCHES, separate_audio_patch=True)


def _str_keys(tree: dict) -> dict:
  return {str(k): _str_keys(v) if isinstance(v, dict) else v for k, v in tree.items()}


def convert(src: str, fmt: str, out: str, *, spec: AVSiamSpec, variant: str | None = None,
            seed: int = 0, allow_lossy_audio_patch: bool = False, overwrite: bool = False) -> dict:
  """Writes DIR/params (Orbax) and DIR/avsiam_init.json; returns the JSON record."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  out = os.path.abspath(out)
  if os.path.exists(out) and os.listdir(out):
    if not overwrite:
      raise FileExistsError(f"{out!r} exists and is not empty (pass overwrite=True / --overwrite)")
    shutil.rmtree(out)
  params = load.fresh_params(spec, seed)
  new, info = load.convert_source(src, fmt, spec, params,
                                  allow_lossy_audio_patch=allow_lossy_audio_patch)
  os.makedirs(out, exist_ok=True)
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(os.path.join(out, load.PARAMS_DIR), _str_keys(new))
  meta = {
      "variant": variant,
      "source_format": fmt,
      "source_path": os.path.abspath(src),
      "seed": seed,
      "switches": place.spec_switches(spec),
      "required": info["required"],
      "config_overrides": config_overrides(spec),
      "num_params": int(sum(np.size(v) for v in trees.flatten(new).values())),
      "notes": info.get("notes", []),
      "dropped": info["dropped"],
      # Leaves the source does not hold: a run starting from DIR draws them from its own seed.
      "fresh": info["fresh"],
  }
  with open(os.path.join(out, load.META_FILE), "w") as f:
    json.dump(meta, f, indent=1)
  return meta


def config_overrides(spec: AVSiamSpec) -> dict[str, object]:
  """Trainer config keys whose value must differ from the default to match `spec`."""
  base = AVSiamSpec(encoder=EncoderSpec(**{f: getattr(spec.encoder, f) for f in
                                           ("width", "depth", "mlp", "heads", "patch")}))
  now, default = place.spec_switches(spec), place.spec_switches(base)
  return {place.config_key(k): v for k, v in now.items() if v != default[k]}


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
                    decoder_norm_eps=dec_eps)


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
  return p


def main(argv=None) -> int:
  a = parser().parse_args(argv)
  spec = spec_from_args(a)
  meta = convert(a.src, a.format, a.out, spec=spec, variant=a.variant, seed=a.seed,
                 allow_lossy_audio_patch=a.allow_lossy_audio_patch, overwrite=a.overwrite)
  print(f"wrote {a.out}: {meta['num_params']:,} parameters from {a.format} {a.src}")
  for n in meta["notes"]:
    print(f"  note: {n}")
  print(f"  {len(meta['dropped'])} source keys dropped on purpose (listed in "
        f"{os.path.join(a.out, load.META_FILE)})")
  flags = [f"--config.model_init={os.path.abspath(a.out)}", "--config.model_init_format=converted",
           f"--config.model.variant={a.variant}"]
  for k, v in meta["config_overrides"].items():
    if k.startswith("config.model.") and k != "config.model.variant":
      flags.append(f"--{k}={v}")
    elif k != "config.model.variant":
      print(f"  note: {k} = {v} has no config key; the trainer uses its default")
  print("train with:\n  " + " ".join(flags))
  return 0


if __name__ == "__main__":
  sys.exit(main())
