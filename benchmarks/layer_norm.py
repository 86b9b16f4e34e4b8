"""LayerNorm on CPU: forward + backward of layers.layer_norm (its closed-form backward pass)
against JAX's derivative of the same forward, at the row counts of AVSiam-Base's step.

  python -m benchmarks.layer_norm [--repeats 7]

Rows: token rows of width 768 (the encoder's) and 512 (the decoder's) at batch 10. Both are
jitted, timed in turns in one run, the fastest of `--repeats`; the table goes to
docs/benchmarks.md (section "LayerNorm backward").
"""
from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp

from avsiam_jax.models import layers
from benchmarks.report import command, write_section

# name, (rows, width): the Base step's unmasked audio + video rows and the decoder's rows.
SHAPES = [("encoder, unmasked (10 x 708 tokens)", (7080, 768)),
          ("encoder, reconstruction pass (10 x 177)", (1770, 768)),
          ("decoder (10 x 708 tokens)", (7080, 512))]


def autodiff(x, scale, bias, eps):
  """The same forward, differentiated by JAX."""
  mean = x.mean(-1, keepdims=True)
  var = jnp.square(x - mean).mean(-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps) * scale + bias


IMPLS = {"autodiff": autodiff, "closed form": layers.layer_norm}


def fwd_bwd(fn):
  loss = lambda x, s, b, w: jnp.sum(fn(x, s, b, 1e-6) * w)
  return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=7)
  args = parser.parse_args()
  load = os.getloadavg()[0]
  rows = []
  for name, (r, d) in SHAPES:
    keys = jax.random.split(jax.random.key(0), 4)
    x, w = (jax.random.normal(k, (r, d)) * 3 + 1 for k in keys[:2])
    scale, bias = (jax.random.normal(k, (d,)) for k in keys[2:])
    fns = {n: fwd_bwd(f) for n, f in IMPLS.items()}
    for f in fns.values():
      jax.block_until_ready(f(x, scale, bias, w))
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(args.repeats):
      for n, f in fns.items():
        t0 = time.perf_counter()
        jax.block_until_ready(f(x, scale, bias, w))
        best[n] = min(best[n], time.perf_counter() - t0)
    rows.append(f"| {name} | {r} x {d} | {1e3 * best['autodiff']:.1f} | "
                f"{1e3 * best['closed form']:.1f} | {best['autodiff'] / best['closed form']:.2f}x |")
  text = "\n".join([
      f"`{command()}`", "",
      f"cpu, {os.cpu_count()} CPUs, jax {jax.__version__}, float32; forward + backward (the "
      f"input's, scale's and bias's gradients), fastest of {args.repeats}, in turns; load "
      f"average before: {load:.1f}.", "",
      "| rows | rows x width | autodiff ms | closed form ms | speedup |", "|---|---|---|---|---|",
      *rows]) + "\n"
  write_section("LayerNorm backward", text)


if __name__ == "__main__":
  main()
