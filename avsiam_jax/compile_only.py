"""Compile a run's train step for a TPU topology on any machine, and report what it would cost.

  python main.py --config=configs/huge.py --workdir=W --config.compile_only.topology=v5p:4x4x4

libtpu (requirements-tpu.txt) describes the slice's chips without TPUs; the real train step is
lowered with abstract inputs on a mesh of those chips and compiled for TPU. Reported per stage:
per-chip HBM (arguments, temporaries, outputs) against the chip's, lowering and compile time,
XLA's FLOPs per chip per step against the analytic count, the collectives by kind, and the TPU
cost model's step time and samples/s per chip where it gives one. No dataset is read and no
step runs. The report goes to the log and to WORKDIR/compile_only.json.
"""
from __future__ import annotations

import collections
import os
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
from absl import logging

from avsiam_jax import config as config_lib
from avsiam_jax import masking, paths, sharding, state, train, utils
from avsiam_jax.config import ConfigError, RunSpec
from avsiam_jax.weights import provenance

GiB = 2 ** 30
# HBM per chip, by the topology's chip name.
HBM_GIB = {"v4": 32, "v5e": 16, "v5litepod": 16, "v5p": 95, "v6e": 32}
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_COLLECTIVE_RE = re.compile(r"= [^=]*?\b(" + "|".join(COLLECTIVES) + r")(?:-start)?\(")


def chip_name(topology: str) -> str:
  return topology.split(":", 1)[0].lower()


def topology_devices(topology: str) -> list:
  """The chips of a TPU slice, described by libtpu (no TPU needed)."""
  try:
    from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ConfigError(f"config.compile_only.topology: {e}") from None
  # Without these libtpu probes the machine for TPU hosts and logs errors about it.
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", f"{chip_name(topology)}-8")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  # No TPU is opened, so several compile-only processes may load libtpu at once.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  try:
    return list(topologies.get_topology_desc(topology_name=topology, platform="tpu").devices)
  except Exception as e:  # pylint: disable=broad-except  # libtpu missing or a bad name
    raise ConfigError(
        f"config.compile_only.topology: cannot describe TPU topology {topology!r} ({e}); "
        "install libtpu with `pip install -r requirements-tpu.txt` and give a topology such "
        "as v5p:2x2x1, v5p:4x4x4, v5e:16x16 or v6e:8x8") from None


# ----- Analytic FLOPs ---------------------------------------------------------------------

def _block_flops(n: int, d: int, mlp: int) -> float:
  """Forward matmul FLOPs of one transformer block on n tokens of width d."""
  return 2 * n * (4 * d * d + 2 * d * mlp) + 4 * n * n * d


def _encoder_flops(enc, n_kept: int, n_all: int, channels: int) -> float:
  """Patch projection of all n_all patches, then the blocks on the n_kept that remain."""
  return 2 * n_all * enc.patch ** 2 * channels * enc.width + enc.depth * _block_flops(
      n_kept, enc.width, enc.mlp)


def analytic_flops_per_sample(spec: RunSpec, stage: str) -> float:
  """Matmul FLOPs of one train step per example (backward = 2 x forward where gradients flow).

  Pretraining (and retrieval finetuning): the contrastive pass at each of a modality's ratios
  (each on 1/G of the batch) with its backward; the reconstruction pass's encoder forward at
  the MAE ratio (its gradient stops before the multimodal blocks), then the multimodal blocks
  and the decoder with their backward; a loss of weight 0 costs nothing.
  Finetuning: the audio-visual branch (audio + one frame, then the multimodal blocks).
  """
  m, enc = spec.model, spec.model.encoder
  n = {"a": enc.num_audio_tokens, "v": enc.num_video_tokens}
  channels = {"a": 1, "v": 3}
  if stage == "finetune":
    fwd = sum(_encoder_flops(enc, n[k], n[k], channels[k]) for k in n)
    fwd += m.mm_depth * _block_flops(n["a"] + n["v"], enc.width, enc.mlp)
    return 3 * fwd
  p = spec.objective(stage)
  contrastive = sum(
      sum(_encoder_flops(enc, masking.kept_count(n[k], r), n[k], channels[k])
          for r in p.ratios(k)) / len(p.ratios(k)) for k in n)
  if not p.reconstruction_weight:
    return 3 * contrastive
  if not p.contrastive_weight:
    contrastive = 0.0
  kept = {k: masking.kept_count(n[k], p.mae_mask_ratio) for k in n}
  rec_encoder = sum(_encoder_flops(enc, kept[k], n[k], channels[k]) for k in n)
  dw, nk, nall = m.decoder_width, kept["a"] + kept["v"], n["a"] + n["v"]
  joint = (m.mm_depth * _block_flops(nk, enc.width, enc.mlp) + 2 * nk * enc.width * dw
           + m.decoder_depth * _block_flops(nall, dw, 4 * dw)
           + 2 * dw * enc.patch ** 2 * (n["a"] * 1 + n["v"] * 3))
  return 3 * contrastive + rec_encoder + 3 * joint


# ----- Compile ------------------------------------------------------------------------------

def _batch(spec: RunSpec, stage: str, mesh, num_classes: int) -> dict:
  enc, sh = spec.model.encoder, sharding.batch_sharding(mesh)
  b = spec.schedule(stage).batch_size
  batch = {"audio": jax.ShapeDtypeStruct((b, enc.audio_frames, enc.mel_bins), jnp.float32,
                                         sharding=sh),
           "video": jax.ShapeDtypeStruct((b, enc.image_size, enc.image_size, 3), jnp.float32,
                                         sharding=sh)}
  if stage == "finetune":
    batch["labels"] = jax.ShapeDtypeStruct((b, num_classes), jnp.float32, sharding=sh)
  return batch


def collectives(hlo_text: str) -> dict[str, int]:
  """Collective ops of a compiled HLO module by kind (async start/done pairs counted once)."""
  return dict(collections.Counter(_COLLECTIVE_RE.findall(hlo_text)))


def refused_temp_gib(message: str) -> float | None:
  """GiB of temporaries the TPU compiler asked for when it refused a program for lack of HBM
  ("RESOURCE_EXHAUSTED: ... HLO temporaries (99.72G) exceeds ..."); None for other errors."""
  need = re.search(r"HLO temporaries \(([\d.]+)([KMGT])\)", message)
  if "RESOURCE_EXHAUSTED" not in message or not need:
    return None
  return float(need.group(1)) * 1024.0 ** ("KMGT".index(need.group(2)) - 2)


def compile_stage(spec: RunSpec, stage: str, devices: list, on_compiled=None) -> dict[str, Any]:
  """Lowers and compiles `stage`'s train step on a mesh of `devices`; the report as a dict.
  on_compiled: called with the compiled step (benchmarks/step_profile.py reads its HLO)."""
  num_classes = spec.compile_only.num_classes if stage == "finetune" else 0
  task = train.make_task(spec, stage, num_classes)
  mesh = sharding.make_mesh(spec.mesh, devices)
  fns = state.make_train_fns(task, mesh, steps_per_epoch=1000)
  batch = _batch(spec, stage, mesh, num_classes)
  key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=sharding.replicated(mesh))
  chips = len(devices)
  per_chip_batch = task.schedule.batch_size / chips
  hbm = HBM_GIB.get(chip_name(spec.compile_only.topology))
  case = {"stage": stage, "topology": spec.compile_only.topology, "chips": chips,
          "mesh": dict(zip(config_lib.MESH_AXES, spec.mesh.shape)), "dtype": spec.dtype,
          "remat": spec.model.encoder.remat, "scan": spec.model.encoder.scan,
          "attention": spec.model.encoder.attention, "variant": spec.variant,
          "batch": task.schedule.batch_size, "batch_per_chip": per_chip_batch, "hbm_gib": hbm}
  t0 = time.perf_counter()
  lowered = fns.step.lower(fns.abstract_state, batch, key)
  t1 = time.perf_counter()
  try:
    compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as e:
    need_gib = refused_temp_gib(str(e))
    if need_gib is None:
      raise
    return {**case, "lower_s": t1 - t0, "compile_s": time.perf_counter() - t1,
            "temp_gib": need_gib, "fits": False, "error": str(e).splitlines()[0][:300]}
  t2 = time.perf_counter()
  if on_compiled is not None:
    on_compiled(compiled)
  mem, cost = compiled.memory_analysis(), utils.cost_of(compiled)
  used = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
          + mem.temp_size_in_bytes) / GiB
  analytic = analytic_flops_per_sample(spec, stage) * per_chip_batch
  seconds = cost.get("optimal_seconds", -1.0)
  report = {
      **case, "lower_s": t1 - t0, "compile_s": t2 - t1,
      "argument_gib": mem.argument_size_in_bytes / GiB, "output_gib": mem.output_size_in_bytes / GiB,
      "alias_gib": mem.alias_size_in_bytes / GiB, "temp_gib": mem.temp_size_in_bytes / GiB,
      "used_gib": used, "fits": None if hbm is None else used <= hbm,
      "flops_per_chip": cost.get("flops", float("nan")), "analytic_flops_per_chip": analytic,
      "collectives": collectives(compiled.as_text()),
      "cost_model_seconds": seconds if seconds > 0 else None,
      "samples_per_s_per_chip": per_chip_batch / seconds if seconds > 0 else None,
  }
  if spec.model.encoder.scan:
    report["note"] = ("model.scan: XLA's cost analysis counts a loop body once, so the FLOPs "
                      "and the cost model's time undercount the step")
  return report


def summary(r: dict[str, Any]) -> str:
  if "error" in r:
    return (f"{r['stage']} {r['variant']} on {r['topology']} ({r['chips']} chips, "
            f"{r['dtype']}, batch {r['batch_per_chip']:g}/chip): DOES NOT FIT: "
            f"{r['temp_gib']:.1f} GiB of temporaries for {r['hbm_gib']} GiB of HBM "
            f"(compile refused after {r['compile_s']:.0f} s)")
  fits = ("" if r["hbm_gib"] is None else
          f" of {r['hbm_gib']} GiB HBM: {'fits' if r['fits'] else 'DOES NOT FIT'} by "
          f"{abs(r['hbm_gib'] - r['used_gib']):.3g} GiB")
  speed = ("the cost model gives no step time" if r["cost_model_seconds"] is None else
           f"cost model {r['cost_model_seconds']:.3g} s/step = "
           f"{r['samples_per_s_per_chip']:.4g} samples/s per chip")
  coll = ", ".join(f"{v} {k}" for k, v in sorted(r["collectives"].items())) or "none"
  return (f"{r['stage']} {r['variant']} on {r['topology']} ({r['chips']} chips, mesh "
          f"{r['mesh']}, {r['dtype']}, batch {r['batch']} = {r['batch_per_chip']:g}/chip): "
          f"lowered in {r['lower_s']:.1f} s, compiled in {r['compile_s']:.1f} s; per chip "
          f"{r['argument_gib']:.3g} GiB arguments + {r['temp_gib']:.3g} GiB temporaries + "
          f"{r['output_gib']:.3g} GiB outputs ({r['alias_gib']:.3g} aliased) = "
          f"{r['used_gib']:.3g} GiB{fits}; {r['flops_per_chip'] / 1e9:.4g} GFLOP per chip per "
          f"step ({r['flops_per_chip'] / max(r['analytic_flops_per_chip'], 1):.2f} x the "
          f"analytic {r['analytic_flops_per_chip'] / 1e9:.4g}); collectives: {coll}; {speed}"
          + (f" ({r['note']})" if "note" in r else ""))


def run(config, workdir: str) -> dict[str, Any]:
  """The compile-only command: each stage config.mode trains, compiled for the topology."""
  topology = str(config.compile_only.topology)
  devices = topology_devices(topology)
  hosts = len({d.process_index for d in devices})
  spec = provenance.from_weights(
      config_lib.parse(config, len(devices), hosts, platform=devices[0].platform))
  train.log_model_from_weights(spec)
  stages = config_lib.STAGES[spec.mode]
  if not stages:
    raise ConfigError("config.compile_only.topology: compiles training stages; use "
                      "mode=pretrain, finetune, retrieval_finetune or pretrain+finetune")
  try:
    paths.check_writable(workdir)  # a gs:// workdir: found before the compiles, not after
  except OSError as e:
    raise ConfigError(f"--workdir {e}") from e
  logging.info("Compiling for %s: %d chips on %d hosts, no TPU needed", topology, len(devices),
               hosts)
  reports = {}
  for stage in stages:
    reports[stage] = compile_stage(spec, stage, devices)
    logging.info("%s", summary(reports[stage]))
  if jax.process_index() == 0:
    paths.makedirs(workdir)
  utils.write_json(os.path.join(workdir, "compile_only.json"), reports)
  return reports
