"""Attention implementations on CPU: forward + backward time at the shapes AVSiam-Base runs.

  python -m benchmarks.attention [--repeats 5]

Rows: the Base pretraining step's attention calls at batch 10 (the decoder's 16 heads over 708
tokens, the encoder's 12 heads over 512 audio and 196 video tokens for the unmasked group, and
the 177 kept tokens of the reconstruction pass). Columns: the fastest of `--repeats` jitted
forward + backward passes of jax.nn.dot_product_attention (its XLA path, what the model used
before) and of layers.dense_attention and layers.chunked_attention, timed in turns in one
run so that load on the machine hits all alike; speedups are against jax.nn. The table goes
to docs/benchmarks.md (section "Attention").
"""
from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from avsiam_jax.models import layers
from benchmarks.report import command, write_section

# name, (batch, heads, tokens, head_dim)
SHAPES = [("decoder (708 tokens)", (10, 16, 708, 32)), ("encoder, audio", (2, 12, 512, 64)),
          ("encoder, video", (2, 12, 196, 64)), ("reconstruction pass", (10, 12, 177, 64))]


def jax_attention(q, k, v):
  swap = lambda t: jnp.swapaxes(t, 1, 2)
  return swap(jax.nn.dot_product_attention(swap(q), swap(k), swap(v)))


IMPLS = {"jax.nn": jax_attention, "dense": layers.dense_attention,
         "chunked": layers.chunked_attention}


def fwd_bwd(fn):
  return jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v))),
                                    argnums=(0, 1, 2)))


def measure(shape, repeats: int) -> dict[str, float]:
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=shape), jnp.float32) for _ in range(3))
  fns = {name: fwd_bwd(fn) for name, fn in IMPLS.items()}
  for f in fns.values():
    jax.block_until_ready(f(q, k, v))  # compile
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, f in fns.items():
      t0 = time.perf_counter()
      jax.block_until_ready(f(q, k, v))
      times[name].append(time.perf_counter() - t0)
  return {name: min(t) for name, t in times.items()}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  load = os.getloadavg()[0]
  lines = [f"`{command()}`", "",
           f"{jax.devices()[0].platform}, {os.cpu_count()} CPUs, jax {jax.__version__}, float32; "
           f"forward + backward, fastest of {args.repeats}, implementations in turns; load "
           f"average before: {load:.1f}. The model's default on CPU is `chunked` "
           "(config.model.attention=\"auto\").", "",
           "| call | batch x heads x tokens x head_dim | jax.nn ms | dense ms | chunked ms | "
           "dense speedup | chunked speedup |", "|---|---|---|---|---|---|---|"]
  for name, shape in SHAPES:
    t = measure(shape, args.repeats)
    print(name, t, flush=True)
    lines.append(f"| {name} | {' x '.join(map(str, shape))} | {t['jax.nn'] * 1e3:.0f} | "
                 f"{t['dense'] * 1e3:.0f} | {t['chunked'] * 1e3:.0f} | "
                 f"{t['jax.nn'] / t['dense']:.2f}x | {t['jax.nn'] / t['chunked']:.2f}x |")
  write_section("Attention", "\n".join(lines) + "\n")


if __name__ == "__main__":
  main()
