"""What the trainer calls to start from pretrained weights: `init_params`.

    params = init_params(config.model_init, config.model_init_format, spec, params)

`params` is the freshly initialized pure dict (nnx.to_pure_dict of the model's nnx.Param
state; numpy or jax leaves); the result has the same nesting and shapes with the source's
weights placed in (host numpy leaves). Formats:
  'converted'  a directory written by `python -m avsiam_jax.weights.convert`
  'vitjax'     a Google vit_jax / big_vision .npz
  'timm'       a timm state dict (.safetensors, or .pth/.bin with torch installed)
  'avsiam'     a released AVSiam PyTorch state dict (.pth with torch, or re-saved .safetensors/.npz)
Nothing here imports the trainer or torch (torch only when a .pth is read).
"""
from __future__ import annotations

import json
import os

import numpy as np

from avsiam_jax.models.avsiam import AVSiamSpec
from avsiam_jax.weights import avsiam_release, place, vit_sources
from avsiam_jax.weights.common import (SpecMismatch, WeightError, flatten, path_str, read_tensors,
                                       rebuild)

FORMATS = ("converted", "vitjax", "timm", "avsiam")
META_FILE = "avsiam_init.json"
PARAMS_DIR = "params"

# Spec fields a converted checkpoint depends on (checked when it is loaded).
_SHAPE_FIELDS = ("width", "depth", "mlp", "heads", "patch", "image_size", "audio_frames",
                 "mel_bins", "audio_patch_mode", "modality_norms", "mm_depth", "decoder_width",
                 "decoder_depth", "decoder_heads")
REQUIRED = {
    "vitjax": _SHAPE_FIELDS + ("audio_posemb_init",),
    "timm": _SHAPE_FIELDS + ("audio_posemb_init",),
    "avsiam": _SHAPE_FIELDS + tuple(avsiam_release.RELEASE_SWITCHES),
}


def convert_source(path: str, fmt: str, spec: AVSiamSpec, params: dict, *,
                   allow_lossy_audio_patch: bool = False) -> tuple[dict, dict]:
  """(new pure dict, info) from a source file; info: dropped keys, notes, required fields."""
  if fmt not in ("vitjax", "timm", "avsiam"):
    raise ValueError(f"source format must be 'vitjax', 'timm' or 'avsiam', got {fmt!r}")
  flat = read_tensors(path)
  if fmt == "avsiam":
    new, info = avsiam_release.place_release(flat, spec, params,
                                             allow_lossy_audio_patch=allow_lossy_audio_patch)
  else:
    vit = (vit_sources.read_vitjax(flat) if fmt == "vitjax"
           else vit_sources.read_timm(flat, spec.encoder.heads))
    new, info = place.place_vit(vit, spec, params)
    info["dropped"] = vit.dropped
  info["required"] = list(REQUIRED[fmt])
  return new, info


def read_meta(directory: str) -> dict:
  meta_path = os.path.join(directory, META_FILE)
  if not os.path.isfile(meta_path):
    raise WeightError(f"{directory!r} is not a converted checkpoint: no {META_FILE}")
  with open(meta_path) as f:
    return json.load(f)


def read_converted(directory: str) -> dict[str, np.ndarray]:
  """{path string: array} of a converted checkpoint's params."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  with ocp.StandardCheckpointer() as ckpt:
    tree = ckpt.restore(os.path.join(os.path.abspath(directory), PARAMS_DIR))
  return {path_str(p): np.asarray(v) for p, v in flatten(tree).items()}


def load_converted(directory: str, spec: AVSiamSpec, params: dict) -> dict:
  meta = read_meta(directory)
  # The separate audio projection changes which parameters exist: always check it.
  required = (*meta.get("required", ()), "separate_audio_patch")
  place.check_switches(meta["switches"], spec, required,
                       f"{directory!r} was converted with other model settings")
  stored = read_converted(directory)
  targets = {path_str(p): v for p, v in flatten(params).items()}
  for key, v in targets.items():
    if key not in stored:
      raise WeightError(f"{directory!r} has no parameter {key!r}")
    if tuple(stored[key].shape) != tuple(v.shape):
      raise WeightError(f"{directory!r}: parameter {key!r} has shape {stored[key].shape}, the "
                        f"model {tuple(v.shape)} (config.model.variant?)")
  extra = sorted(set(stored) - set(targets))
  if extra:
    raise WeightError(f"{directory!r}: parameter {extra[0]!r} does not exist in the model "
                      f"({len(extra)} extra)")
  values = {k: stored[k].astype(np.dtype(getattr(v, "dtype", np.float32)), copy=False)
            for k, v in targets.items()}
  return rebuild(params, values)


def init_params(path: str, fmt: str, spec: AVSiamSpec, params: dict, *,
                allow_lossy_audio_patch: bool = False) -> dict:
  """`params` with pretrained weights placed in (see the module docstring).

  Fresh parameters (decoder, mm_norm) are taken from `params` itself, or from the converted
  checkpoint.
  """
  if fmt not in FORMATS:
    raise ValueError(f"model_init_format must be one of {FORMATS}, got {fmt!r}")
  if fmt == "converted":
    return load_converted(path, spec, params)
  return convert_source(path, fmt, spec, params,
                        allow_lossy_audio_patch=allow_lossy_audio_patch)[0]


__all__ = ["FORMATS", "SpecMismatch", "WeightError", "convert_source", "init_params",
           "load_converted", "read_converted", "read_meta"]
