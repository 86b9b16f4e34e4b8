"""Evaluation throughput in clips/s: the compiled eval steps, and the tiny one end to end.

  python -m benchmarks.eval_throughput [--repeats 3] [--base_batch 4] [--quick]

Rows, for the tiny demo config and Base (B/16, 224 px, 1024 audio frames):
  classifier  finetuned model on a clip: audio encoded once, all 10 frames encoded, 10
              audio-visual fusions through the multimodal blocks, three heads (what mode=eval
              and `predict` run per clip);
  retrieval   pretrained model: audio and the middle frame encoded (zero-shot retrieval).
Device time only (random inputs already on the device; the fastest of --repeats calls after a
warm-up). The tiny classifier also runs end to end: the eval pipeline reading the demo dataset
from disk (JPEG decoding, fbank normalization) plus the step. Section "Eval throughput" of
docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import jax
import numpy as np

from avsiam_jax import sharding, state, train
from avsiam_jax.config import parse
from avsiam_jax.data import demo, pipeline, records
from benchmarks.report import command, write_section
from configs import base, demo as demo_config

NUM_CLASSES = 527


def make_config(name: str, mode: str, batch: int):
  config = {"tiny": demo_config, "Base": base}[name].get_config(f"mode={mode}")
  config.model.dtype = "float32"  # the CPU figures: float32 (bfloat16 is slower on CPU)
  config.eval.batch_size = batch
  config.mesh.data = 1  # one device: the per-device figure
  return config


def random_batch(config, mesh):
  m, b = config.model, config.eval.batch_size
  rng = np.random.default_rng(0)
  return sharding.global_batch({
      "audio": rng.normal(size=(b, m.audio_frames, m.mel_bins)).astype(np.float32),
      "video": rng.normal(size=(b, pipeline.NUM_FRAMES, m.image_size, m.image_size, 3)
                          ).astype(np.float32)}, mesh)


def build(config, num_classes: int):
  """The trainer's compiled functions for config.mode's stage on one device."""
  spec = parse(config, 1)
  mesh = sharding.make_mesh(spec.mesh, devices=jax.devices()[:1])
  return mesh, state.make_train_fns(train.make_task(spec, spec.mode, num_classes), mesh, 1)


def device_rate(config, repeats: int) -> float:
  mesh, fns = build(config, NUM_CLASSES if config.mode == "finetune" else 0)
  params = fns.init(jax.random.key(0))["params"]
  batch = random_batch(config, mesh)
  jax.block_until_ready(fns.eval_step(params, batch))  # compile + warm-up
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fns.eval_step(params, batch))
    times.append(time.perf_counter() - t0)
  return config.eval.batch_size / min(times)


def end_to_end_rate(config, repeats: int) -> tuple[float, int]:
  """Tiny classifier over the demo eval split read from disk: pipeline + step, clips/s."""
  with tempfile.TemporaryDirectory() as tmp:
    ds = demo.ensure_demo_dataset(os.path.join(tmp, "ds"), config.eval.batch_size, 200, seed=0)
    mesh, fns = build(config, len(records.read_info(ds)["label_names"]))
    params = fns.init(jax.random.key(0))["params"]
    best, clips = 0.0, 0
    for r in range(repeats + 1):
      it = pipeline.make_eval_iterator(ds, "eval", batch_size=config.eval.batch_size,
                                       audio_frames=config.model.audio_frames,
                                       image_size=config.model.image_size)
      t0, clips = time.perf_counter(), 0
      for batch in it:
        out = fns.eval_step(params, sharding.global_batch(
            {"audio": batch["audio"], "video": batch["video"]}, mesh))
        clips += int(batch["mask"].sum())
      jax.block_until_ready(out)
      if r:  # the first pass compiles
        best = max(best, clips / (time.perf_counter() - t0))
    return best, clips


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--tiny_batch", type=int, default=40)
  parser.add_argument("--base_batch", type=int, default=4)
  parser.add_argument("--quick", action="store_true", help="tiny only")
  args = parser.parse_args()

  load = os.getloadavg()[0]
  rows = []
  for name, batch in [("tiny", args.tiny_batch)] + ([] if args.quick else
                                                     [("Base", args.base_batch)]):
    for mode, what in (("finetune", "classifier (10 frames, 3 heads)"),
                       ("pretrain", "retrieval (audio + 1 frame)")):
      rate = device_rate(make_config(name, mode, batch), args.repeats)
      rows.append((name, what, batch, f"{rate:.2f}"))
      print(rows[-1], flush=True)
  rate, clips = end_to_end_rate(make_config("tiny", "finetune", args.tiny_batch), args.repeats)
  rows.append(("tiny", f"classifier, end to end from disk ({clips} clips)", args.tiny_batch,
               f"{rate:.2f}"))

  dev = jax.devices()[0]
  lines = [f"`{command()}`", "",
           f"Device: {dev.device_kind} ({dev.platform}), one device, {os.cpu_count()} CPUs, "
           f"jax {jax.__version__}; float32; load average before: {load:.1f}. Device rows: the "
           f"fastest of {args.repeats} calls on one random batch after a warm-up.", "",
           "| config | eval step | batch | clips/s |", "|---|---|---|---|"]
  lines += [f"| {' | '.join(map(str, r))} |" for r in rows]
  write_section("Eval throughput", "\n".join(lines) + "\n")


if __name__ == "__main__":
  main()
