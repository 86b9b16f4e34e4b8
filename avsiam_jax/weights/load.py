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

from avsiam_jax import paths, trees
from avsiam_jax.models.avsiam import AVSiam, AVSiamSpec
from avsiam_jax.weights import avsiam_release, place, signature, vit_sources
from avsiam_jax.weights.common import SpecMismatch, WeightError, read_tensors

SOURCE_FORMATS = ("vitjax", "timm", "avsiam")  # files of other projects
FORMATS = ("converted",) + SOURCE_FORMATS     # and directories written by convert
META_FILE = "avsiam_init.json"
PARAMS_DIR = "params"


def fresh_params(spec: AVSiamSpec, seed=0) -> dict:
  """A freshly initialized model's pure-dict params (host numpy); `seed` is an int or a JAX key
  (a run's init key gives the draw its train state starts from)."""
  import jax  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  model = AVSiam(spec, rngs=nnx.Rngs(params=seed))
  return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def convert_source(path: str, fmt: str, spec: AVSiamSpec, params: dict, *,
                   allow_lossy_audio_patch: bool = False,
                   tensors: dict | None = None) -> tuple[dict, dict]:
  """(new pure dict, info) from a source file (or its `tensors`, already read); info: dropped
  keys, notes, fresh leaves, required spec fields."""
  if fmt not in SOURCE_FORMATS:
    raise ValueError(f"source format must be 'vitjax', 'timm' or 'avsiam', got {fmt!r}")
  flat = read_tensors(path) if tensors is None else tensors
  if fmt == "avsiam":
    new, info = avsiam_release.place_release(flat, spec, params,
                                             allow_lossy_audio_patch=allow_lossy_audio_patch)
  else:
    vit = (vit_sources.read_vitjax(flat) if fmt == "vitjax"
           else vit_sources.read_timm(flat, spec.encoder.heads))
    new, info = place.place_vit(vit, spec, params)
    info["dropped"] = vit.dropped
    info["required"] = list(signature.FROM_VIT)
  return new, info


def read_meta(directory: str) -> dict:
  meta_path = os.path.join(directory, META_FILE)  # a local path or a gs:// URL
  if not paths.path(meta_path).is_file():
    raise WeightError(f"{directory!r} is not a converted checkpoint: no {META_FILE}")
  try:
    return json.loads(paths.path(meta_path).read_text())
  except (OSError, ValueError) as e:
    raise WeightError(f"{meta_path}: cannot be read: {e}") from e


def _pretraining_model(meta: dict) -> bool:
  """Whether a record holds the pretraining model (a decoder, fresh or converted)."""
  return meta.get("layout") != "run" and "decoder_width" in meta.get("required", ())


def _parts(meta: dict) -> tuple[str, ...]:
  return signature.PARTS if _pretraining_model(meta) else ("encoder",)


def recorded_switches(meta: dict) -> dict:
  """The spec switches a converted checkpoint was made with; a switch its record predates has
  the value of the models built before it (signature.FIELDS legacy)."""
  return {**signature.legacy(signature.fields(parts=_parts(meta))), **meta.get("switches", {})}


def required_fields(meta: dict) -> list[str]:
  """The spec fields a converted checkpoint was made for: its record's list and the fields that
  decide which of its leaves exist (which older records did not all list)."""
  required = meta.get("required", ())
  fields = [*required, *signature.fields(("shape",), _parts(meta))]
  fresh = meta.get("fresh")
  # Records of the release converter from before it listed separate_audio_patch also left out
  # the eps its decoder was trained with (1e-5), when it converted the decoder.
  if (meta.get("source_format") == "avsiam" and "separate_audio_patch" not in required
      and fresh is not None and not any(p.startswith("decoder_norm/") for p in fresh)):
    fields += signature.fields(("trained",), ("pretrain",))
  return list(dict.fromkeys(fields))


def recorded_model_config(directory: str) -> dict[str, object]:
  """{config.model field: value} a converted checkpoint was made for: what a run starting from
  it takes. The variant comes only from records that name it."""
  meta = read_meta(directory)
  switches = recorded_switches(meta)
  out = {}
  for f in required_fields(meta):
    key = signature.config_key(f).removeprefix("config.model.")
    if key == "variant":
      if meta.get("variant"):
        out["variant"] = meta["variant"]
    elif f in switches:
      out[key] = switches[f]
  return out


def read_converted(directory: str) -> dict[str, np.ndarray]:
  """{path string: array} of a converted checkpoint's params."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  with ocp.StandardCheckpointer() as ckpt:
    tree = ckpt.restore(os.path.join(paths.absolute(directory), PARAMS_DIR))
  return {p: np.asarray(v) for p, v in trees.flatten(tree).items()}


def load_converted(directory: str, spec: AVSiamSpec, params: dict) -> dict:
  meta = read_meta(directory)
  if meta.get("layout") == "run":
    raise WeightError(
        f"{directory!r} is a converted classifier (a finetuning run directory): finetune from it "
        "with config.finetune.init_checkpoint, or predict with python -m avsiam_jax.predict; "
        "to start pretraining from its encoder, convert the file with --drop-heads")
  signature.check_switches(recorded_switches(meta), spec, required_fields(meta),
                           f"{directory!r} was converted with other model settings")
  stored = read_converted(directory)
  targets = trees.flatten(params)
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
  # Leaves the source did not hold come from `params` (the run's own fresh model), so the run's
  # seed draws them; directories written before "fresh" was recorded keep their stored draw.
  fresh = set(meta.get("fresh", ()))
  values = {k: np.asarray(v) if k in fresh else
            stored[k].astype(np.dtype(getattr(v, "dtype", np.float32)), copy=False)
            for k, v in targets.items()}
  return trees.rebuild(params, values)


def init_params(path: str, fmt: str, spec: AVSiamSpec, params: dict, *,
                allow_lossy_audio_patch: bool = False) -> dict:
  """`params` with pretrained weights placed in (see the module docstring).

  Every parameter the source does not hold (decoder, mask token, mm_norm, ...) is taken from
  `params`, which must therefore be a freshly initialized model's, not zeros or an abstract tree.
  """
  if fmt not in FORMATS:
    raise ValueError(f"model_init_format must be one of {FORMATS}, got {fmt!r}")
  if fmt == "converted":
    return load_converted(path, spec, params)
  return convert_source(path, fmt, spec, params,
                        allow_lossy_audio_patch=allow_lossy_audio_patch)[0]


def _zero_init(path: str) -> bool:
  """Whether the model initializes the parameter at `path` to zeros (biases, modality tokens)."""
  return path.rsplit("/", 1)[-1].endswith("bias") or path.startswith("modality_token/")


def check_initialized(params: dict) -> None:
  """Raises WeightError naming the first parameter that is all zero though its initializer is
  not zeros (a LayerNorm scale, a kernel, a position embedding, ...): such a parameter silences
  its branch (a zero mm_norm scale gives the decoder zero input and zero kernel gradients)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  flat = trees.flatten(params)
  checked = {p: v for p, v in flat.items() if not _zero_init(p)}
  # One reduction per leaf where the arrays live (sharded on device, or host numpy).
  zero = jax.device_get(jax.jit(lambda t: {k: jnp.all(v == 0) for k, v in t.items()})(checked))
  dead = sorted(p for p, z in zero.items() if z)
  if dead:
    more = f" (and {len(dead) - 1} more, e.g. {dead[1:4]})" if len(dead) > 1 else ""
    raise WeightError(f"parameter {dead[0]!r} is all zero after initialization{more}; its "
                      "initializer is not zeros, so a weight source or loader left it unset")


__all__ = ["FORMATS", "SOURCE_FORMATS", "SpecMismatch", "WeightError", "check_initialized",
           "convert_source", "fresh_params", "init_params", "load_converted", "read_converted",
           "read_meta", "recorded_model_config", "recorded_switches", "required_fields"]
