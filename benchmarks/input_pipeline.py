"""Input-pipeline throughput on a synthetic on-disk dataset.

  python -m benchmarks.input_pipeline [--clips 512] [--batch 32] [--batches 40]

Builds `clips` clips (10 JPEG frames of 224x224 smooth random images, a
1024x128 fbank, 1-3 labels of 527) in a temp dir, then measures samples/s of
the pretraining, finetuning and eval iterators for several worker_count settings
(image_size 224, audio_frames 1024). The first batches (start-up) are excluded.
It also times data_prep.build on real (demo) video files with 1 and 2 workers, and the
batched JAX fbank against the numpy one on 10 s waveforms.
The tables go to docs/benchmarks.md (section "Input pipeline").
"""
from __future__ import annotations

import argparse
import io
import os
import tempfile
import time

import numpy as np
from PIL import Image

from avsiam_jax.data import demo_clips, fbank, pipeline, records
from benchmarks.report import command, write_section
from data_prep import build

NUM_CLASSES = 527


def _frame(rng: np.random.Generator) -> bytes:
  # Smooth content + mild noise: JPEG sizes close to real video frames (~15-30 KB).
  low = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
  img = Image.fromarray(low).resize((224, 224), Image.BICUBIC)
  arr = np.asarray(img, np.int16) + rng.integers(-8, 9, (224, 224, 3))
  buf = io.BytesIO()
  Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
  return buf.getvalue()


def build_dataset(path: str, clips: int, shards: int = 4, seed: int = 0) -> float:
  """Writes the synthetic dataset; returns its mean record size in KB."""
  rng = np.random.default_rng(seed)
  frames_pool = [_frame(rng) for _ in range(50)]  # reuse frames: building stays quick
  total, splits = 0, []
  per = -(-clips // shards)
  for s in range(shards):
    examples = []
    for i in range(s * per, min(clips, (s + 1) * per)):
      frames = [frames_pool[j] for j in rng.integers(0, len(frames_pool), 10)]
      fbank = rng.normal(-5.0, 4.5, (1024, 128)).astype(np.float16)
      labels = rng.choice(NUM_CLASSES, rng.integers(1, 4), replace=False).astype(np.int32)
      examples.append(dict(id=f"clip{i:05d}", frames=frames, fbank=fbank, labels=labels))
      total += sum(map(len, frames)) + fbank.nbytes
    splits.append(examples)
  records.write_dataset(path, {"train": splits},
                        label_ids=[f"class{c}" for c in range(NUM_CLASSES)])
  return total / clips / 1024


def measure(make, batch: int, batches: int, warmup: int) -> float:
  it = make()
  for _ in range(warmup):
    next(it)
  t0 = time.perf_counter()
  for _ in range(batches):
    next(it)
  dt = time.perf_counter() - t0
  it.close()
  return batches * batch / dt


def measure_data_prep(tmp: str, clips: int) -> list[tuple[int, float]]:
  """clips/s of data_prep.build over `clips` 3 s demo videos (decode, fbank, JPEG, write)."""
  json_path, csv_path = demo_clips.write_demo_videos(os.path.join(tmp, "videos"), clips)
  out = []
  for workers in (1, 2):
    t0 = time.perf_counter()
    build.build(json_path, os.path.join(tmp, f"built{workers}"), labels=csv_path,
                workers=workers, verbose=False)
    out.append((workers, clips / (time.perf_counter() - t0)))
  return out


def measure_fbank(batch: int = 32, seconds: float = 10.0, repeats: int = 3) -> tuple[float, float]:
  """Waveforms/s: the numpy fbank one by one, and the jitted JAX fbank on a batch."""
  import jax  # pylint: disable=g-import-not-at-top
  wav = np.random.default_rng(0).uniform(-0.5, 0.5, (batch, int(seconds * 16000)))
  wav = wav.astype(np.float32)
  t0 = time.perf_counter()
  for _ in range(repeats):
    for w in wav:
      fbank.fbank(w)
  numpy_rate = repeats * batch / (time.perf_counter() - t0)
  jax.block_until_ready(fbank.fbank_jax(wav))  # compile
  t0 = time.perf_counter()
  for _ in range(repeats):
    jax.block_until_ready(fbank.fbank_jax(wav))
  return numpy_rate, repeats * batch / (time.perf_counter() - t0)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--clips", type=int, default=512)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--batches", type=int, default=40)
  parser.add_argument("--warmup", type=int, default=4)
  parser.add_argument("--workers", type=str, default="0,1,2")
  parser.add_argument("--prep_clips", type=int, default=60)
  args = parser.parse_args()
  workers = [int(w) for w in args.workers.split(",")]
  with tempfile.TemporaryDirectory() as tmp:
    t0 = time.perf_counter()
    kb = build_dataset(tmp, args.clips)
    setup = (f"dataset: {args.clips} clips, {kb:.0f} KB/clip, built in "
             f"{time.perf_counter() - t0:.1f} s; {os.cpu_count()} CPUs; batch {args.batch}; "
             f"load average before: {os.getloadavg()[0]:.1f} (other work skews the numbers)")
    print(setup)
    rows = []
    for name, make_fn, extra in [
        ("pretrain", pipeline.make_pretrain_iterator, {}),
        ("finetune", pipeline.make_finetune_iterator, {}),
        ("finetune balanced", pipeline.make_finetune_iterator, {"balanced": True}),
    ]:
      for w in workers:
        make = lambda: make_fn(tmp, "train", batch_size=args.batch, worker_count=w, **extra)  # noqa: E731
        rows.append((name, w, measure(make, args.batch, args.batches, args.warmup)))
        print(f"  {name:18s} worker_count={w}: {rows[-1][2]:7.1f} samples/s", flush=True)
    for w in workers:
      make = lambda: pipeline.make_eval_iterator(tmp, "train", batch_size=args.batch,  # noqa: E731
                                                 worker_count=w)
      batches = min(args.batches, args.clips // args.batch - args.warmup)
      rows.append(("eval (10 frames)", w, measure(make, args.batch, batches, args.warmup)))
      print(f"  {'eval (10 frames)':18s} worker_count={w}: {rows[-1][2]:7.1f} samples/s", flush=True)
    prep = measure_data_prep(tmp, args.prep_clips)
  numpy_rate, jax_rate = measure_fbank()
  table = ["| pipeline | worker_count | samples/s |", "|---|---|---|"]
  table += [f"| {name} | {w} | {sps:.0f} |" for name, w, sps in rows]
  table += ["", f"data_prep.build on {args.prep_clips} demo videos (3 s, mp4):", "",
            "| workers | clips/s |", "|---|---|"]
  table += [f"| {w} | {cps:.1f} |" for w, cps in prep]
  table += ["", "Kaldi fbank of 10 s waveforms (batch of 32 for JAX, on this CPU):", "",
            "| implementation | waveforms/s |", "|---|---|",
            f"| numpy, one at a time | {numpy_rate:.0f} |", f"| JAX, batched, jitted | {jax_rate:.0f} |",
            f"| JAX / numpy | {jax_rate / numpy_rate:.2f}x |"]
  write_section("Input pipeline", f"`{command()}`\n\n{setup}\n\n" + "\n".join(table) + "\n")


if __name__ == "__main__":
  main()
