"""The model fields trained weights are tied to: one table, and every list and check made from it.

Each row is a spec field (models.vit.EncoderSpec or models.avsiam.AVSiamSpec), the config.model
key that sets it, and
  kind  "shape":   decides which parameters exist and their shapes; always tied
        "trained": changes the numbers, not the parameters (an eps, a quirk); tied where the
                   weights were trained with it
        "init":    how weights converted from an image ViT were derived (the audio posemb
                   resize); tied only there (trained weights hold the result)
  part  "encoder": the encoder and multimodal blocks, which every model has
        "pretrain": the pretraining model's other parameters (a classifier has none)
  legacy  the value implied by records and config.json files written before the field existed

Adding a model switch that weights depend on: a row here, the spec field, the config key.
Fields outside the table (remat, scan, attention, grad_boundaries, dtype) are free: a run sets
its own.
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

from avsiam_jax.models.vit import encoder_spec
from avsiam_jax.weights.common import SpecMismatch


class Field(NamedTuple):
  key: str   # config.model.<key>
  kind: str
  part: str
  legacy: Any = None  # None: every record and config.json holds the field


FIELDS = {
    # The variant's sizes.
    "width": Field("variant", "shape", "encoder"),
    "depth": Field("variant", "shape", "encoder"),
    "mlp": Field("variant", "shape", "encoder"),
    "heads": Field("variant", "shape", "encoder"),
    "patch": Field("variant", "shape", "encoder"),
    "image_size": Field("image_size", "shape", "encoder"),
    "audio_frames": Field("audio_frames", "shape", "encoder"),
    "mel_bins": Field("mel_bins", "shape", "encoder"),
    "audio_patch_mode": Field("audio_patch_mode", "shape", "encoder"),
    "audio_posemb_init": Field("audio_posemb_init", "init", "encoder"),
    "modality_norms": Field("modality_norms", "shape", "encoder"),
    "double_tokens": Field("double_tokens", "trained", "encoder"),
    "separate_audio_patch": Field("separate_audio_patch", "shape", "encoder"),
    "block_norm_eps": Field("block_norm_eps", "trained", "encoder"),
    "final_norm_eps": Field("final_norm_eps", "trained", "encoder"),
    "mm_depth": Field("mm_depth", "shape", "encoder"),
    "decoder_width": Field("decoder_width", "shape", "pretrain"),
    "decoder_depth": Field("decoder_depth", "shape", "pretrain"),
    "decoder_heads": Field("decoder_heads", "shape", "pretrain"),
    "decoder_norm_eps": Field("decoder_norm_eps", "trained", "pretrain"),
    # Models built before the switch had the norm.
    "mm_norm": Field("mm_norm", "shape", "pretrain", legacy=True),
}
KINDS = ("shape", "trained", "init")
PARTS = ("encoder", "pretrain")


def fields(kinds=KINDS, parts=PARTS) -> tuple[str, ...]:
  """The spec fields of `kinds` and `parts`, in table order."""
  return tuple(f for f, row in FIELDS.items() if row.kind in kinds and row.part in parts)


# Trained encoder and multimodal-block weights (any run directory, a released encoder).
ENCODER = fields(("shape", "trained"), ("encoder",))
# Weights converted from an image ViT: the pretraining model's shapes and the posemb resize.
FROM_VIT = fields(("shape", "init"))


def keys(spec_fields) -> tuple[str, ...]:
  """The config.model keys of `spec_fields`, once each."""
  return tuple(dict.fromkeys(FIELDS[f].key for f in spec_fields))


def config_key(field: str) -> str:
  """The trainer's config key for a spec field (any spec field, in the table or not)."""
  return f"config.model.{FIELDS[field].key if field in FIELDS else field}"


def legacy(spec_fields) -> dict:
  """{field: value} implied by a record that lacks one of `spec_fields`."""
  return {f: FIELDS[f].legacy for f in spec_fields if FIELDS[f].legacy is not None}


def spec_switches(spec) -> dict:
  """Every encoder and AVSiam field, flat (the record written next to a converted checkpoint)."""
  out = dataclasses.asdict(spec.encoder)
  out.update({k: v for k, v in dataclasses.asdict(spec).items() if k != "encoder"})
  return out


def config_switches(model_config) -> dict:
  """The table's spec fields a config.model section (a run's config.json) sets, flat like
  `spec_switches`; fields an older config lacks are left out."""
  out = {f: model_config[row.key] for f, row in FIELDS.items()
         if row.key != "variant" and row.key in model_config}
  if "variant" in model_config:
    enc = encoder_spec(model_config["variant"])
    out.update({f: getattr(enc, f) for f, row in FIELDS.items() if row.key == "variant"})
  return out


def check_switches(recorded: dict, spec, spec_fields, why: str) -> None:
  """Raises SpecMismatch naming the config key of the first of `spec_fields` whose `recorded`
  value the model `spec` does not have."""
  now = spec_switches(spec)
  for f in spec_fields:
    if f in recorded and now.get(f) != recorded[f]:
      raise SpecMismatch(f"{why}: set {config_key(f)} = {recorded[f]!r} (it is {now.get(f)!r}; "
                         f"field {f!r})")
