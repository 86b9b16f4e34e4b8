"""Where the pretraining step's time goes: a profile by part of the model and step.

  python -m benchmarks.step_profile [--config Base] [--batch 10] [--topology v5p:2x2x1]

CPU: the Base step (float32, the config's multi-ratio masking, packed groups) is compiled,
timed (one warm-up, then --steps), and one more step is traced with jax.profiler; each executed
XLA operation is charged to the part of the model it computes (benchmarks/hlo_breakdown.py:
weight matmuls, attention, norms, GELU, bias + residual, patches, masking + packing, losses,
optimizer, layout copies), in busy thread-seconds. Beside it: the step's GFLOP/s against this
machine's float32 matmul rate measured in the same run, and its ceiling: every dot of the step
run alone at its shapes, as often as the step runs it.

--topology: the same step compiled for that TPU slice (libtpu, no TPU needed; bfloat16, the
paper's per-chip batch, --scan/--remat as given), broken down by FLOPs and bytes per part from
its optimized HLO, loop bodies times their trip counts, with the cost model's samples/s.
The tables go to docs/benchmarks.md ("Step profile (CPU)", "Step profile (TPU)").
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

# Per-operation trace events of XLA's CPU runtime; set before JAX starts.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_cpu_enable_xprof_traceme=true").strip()

import jax  # noqa: E402

from avsiam_jax import compile_only, sharding  # noqa: E402
from avsiam_jax.config import parse  # noqa: E402
from benchmarks import hlo_breakdown, pretrain_step  # noqa: E402
from benchmarks.tpu_plan import PER_CHIP_BATCH  # noqa: E402
from benchmarks.report import command, write_section  # noqa: E402
from configs import base  # noqa: E402


def dots_alone(dots: dict, repeats: int = 3) -> dict[str, tuple[float, float]]:
  """{part: (seconds, FLOPs)} of a step's dots (hlo_breakdown.dots) each run alone at its
  shapes (jitted, best of `repeats`) times how often the step runs it: what the matmuls cost
  with nothing else."""
  out = {}
  for d, n in dots.items():
    fn = jax.jit(lambda a, b, d=d: jax.lax.dot_general(a, b, (d.contracting, d.batch)))
    a, b = (jax.random.normal(jax.random.key(i), s, d.dtype) for i, s in enumerate((d.lhs, d.rhs)))
    s, f = out.get(d.part, (0.0, 0.0))
    out[d.part] = (s + n * pretrain_step.fastest_s(fn, a, b, repeats=repeats), f + n * d.flops)
  return out


def cpu_profile(name: str, batch: int, steps: int) -> tuple[list[str], dict]:
  config = pretrain_step.make_config(name, batch, None)
  mesh = sharding.make_mesh(parse(config, jax.device_count()).mesh)
  data = pretrain_step.random_batch(config, sharding.batch_sharding(mesh))
  key = jax.random.key(0)
  before = pretrain_step.matmul_gflops()
  spec, fns, compiled = pretrain_step.compiled_step(config, mesh, data, key)
  module = hlo_breakdown.Module(compiled.as_text())
  flops = pretrain_step.flops(compiled)  # whole step; the chunked attention's loop counted once
  static = hlo_breakdown.static_costs(module)
  step_flops = sum(v["flops"] for v in static.values())  # loop bodies times their trip counts
  state = fns.init(jax.random.key(1))
  state, _ = jax.block_until_ready(compiled(state, data, key))
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    state, _ = jax.block_until_ready(compiled(state, data, key))
    times.append(time.perf_counter() - t0)
  with tempfile.TemporaryDirectory() as trace:
    jax.profiler.start_trace(trace)
    t0 = time.perf_counter()
    state, _ = jax.block_until_ready(compiled(state, data, key))
    traced_s = time.perf_counter() - t0
    jax.profiler.stop_trace()
    parts, busy = hlo_breakdown.trace_times(trace, module)
  dots = hlo_breakdown.dots(module)
  alone = dots_alone(dots)
  rate = max(before, pretrain_step.matmul_gflops())  # before and after: the less disturbed
  step_s = min(times)
  achieved = step_flops / step_s / 1e9
  total = sum(parts.values())
  alone_s = sum(t for t, _ in alone.values())
  alone_rate = sum(f for _, f in alone.values()) / alone_s / 1e9
  by_part = ", ".join(f"{part} {t:.2f} s at {f / t / 1e9 / rate:.0%} of the rate"
                      for part, (t, f) in sorted(alone.items(), key=lambda kv: -kv[1][0])
                      if t > 0.05)
  lines = [f"CPU: {name}, batch {batch}, float32, attention {spec.model.encoder.attention}, "
           f"{os.cpu_count()} CPUs. Step {step_s:.2f} s (fastest of {steps}; traced step "
           f"{traced_s:.2f} s); {step_flops / 1e12:.2f} TFLOP per step (dots, loops times their "
           f"trip counts; XLA's cost analysis: {flops / 1e12:.2f}) = **{achieved:.0f} GFLOP/s, "
           f"{achieved / rate:.0%} of the {rate:.0f} GFLOP/s** float32 matmul rate measured "
           f"in this run ({pretrain_step.MATMUL_N}^3, jitted, best of 5 before and 5 after the "
           "steps).", "",
           f"Ceiling: the step's {len(dots)} distinct dots, each run alone "
           f"at its shapes (jitted, best of 3) as often as the step runs it, take "
           f"**{alone_s:.2f} s, {alone_rate / rate:.0%} of the matmul rate** ({by_part}); the "
           f"other work adds {step_s - alone_s:.2f} s ({(step_s - alone_s) / step_s:.0%} of the "
           "step).", "",
           "| part | busy thread-s | share | GFLOP | GB moved |", "|---|---|---|---|---|"]
  for part in hlo_breakdown.PARTS:
    if part in parts or part in static:
      cost = static.get(part, {"flops": 0.0, "bytes": 0.0})
      lines.append(f"| {part} | {parts.get(part, 0.0):.2f} | "
                   f"{parts.get(part, 0.0) / total:.1%} | {cost['flops'] / 1e9:.0f} | "
                   f"{cost['bytes'] / 1e9:.1f} |")
  span = sum(busy.values())
  lines += ["", "Threads busy during the traced step: " + ", ".join(
      f"{k} for {v / span:.0%}" for k, v in sorted(busy.items())) + " of the time."]
  return lines, {"step_s": step_s, "gflops": achieved, "matmul_gflops": rate}


def tpu_profile(topology: str, scan: bool, remat: str) -> list[str]:
  config = base.get_config()
  devices = compile_only.topology_devices(topology)
  config.compile_only.topology = topology
  config.model.dtype = "bfloat16"
  config.model.scan, config.model.remat = scan, remat
  config.batch_size = PER_CHIP_BATCH["B"] * len(devices)
  spec = parse(config, len(devices), len({d.process_index for d in devices}), platform="tpu")
  kept = {}
  report = compile_only.compile_stage(spec, "pretrain", devices,
                                      on_compiled=lambda c: kept.update(text=c.as_text()))
  static = hlo_breakdown.static_costs(kept["text"])
  flops = report["flops_per_chip"]  # XLA's count (a scanned body once)
  moved = sum(v["bytes"] for v in static.values())
  speed = report.get("samples_per_s_per_chip")
  lines = [f"TPU {topology} (compiled here, libtpu), Base, bfloat16, {PER_CHIP_BATCH['B']} clips per "
           f"chip, scan {scan}, remat {remat}: {moved / 1e9:.0f} GB moved per chip per step "
           f"(its HLO, loops times their trip counts), {flops / 1e12:.2f} TFLOP by XLA's cost "
           "analysis (a loop body once); per part, TFLOP where the HLO's matmuls can be read "
           "(nan: batched matmuls the TPU compiler wrote as windowed convolutions); "
           f"{report['argument_gib']:.2f} + {report['temp_gib']:.2f} GiB arguments + temporaries "
           "per chip; cost model "
           + (f"{speed:.1f} samples/s per chip" if speed else "gives no step time") + ".", "",
           "| part | TFLOP | GB moved | bytes share |", "|---|---|---|---|"]
  for part in hlo_breakdown.PARTS:
    if part in static:
      c = static[part]
      lines.append(f"| {part} | {c['flops'] / 1e12:.3f} | {c['bytes'] / 1e9:.1f} | "
                   f"{c['bytes'] / moved:.1%} |")
  return lines


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="Base", choices=("tiny", "Base"))
  parser.add_argument("--batch", type=int, default=10)
  parser.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up")
  parser.add_argument("--topology", default="", help="the TPU program too, e.g. v5p:2x2x1")
  parser.add_argument("--tpu_only", action="store_true", help="the TPU program alone")
  parser.add_argument("--scan", action="store_true", help="TPU program: scanned blocks")
  parser.add_argument("--remat", default="none", help="TPU program: none, dots or full")
  args = parser.parse_args()
  load = os.getloadavg()[0]
  head = f"`{command()}` (load average before: {load:.1f})"
  notes = ("Parts: the innermost function of this project that traced each operation (a "
           "backward operation counts where its forward is); GB moved: operands and result of "
           "every unfused operation.")
  if not args.tpu_only:
    lines, _ = cpu_profile(args.config, args.batch, args.steps)
    write_section("Step profile (CPU)", "\n".join(
        [head, "", *lines, "", notes + " Busy thread-s: XLA's per-operation trace events "
         "(operations running at once on two threads both count)."]) + "\n")
  if args.topology:
    lines = tpu_profile(args.topology, args.scan, args.remat)
    write_section("Step profile (TPU)", "\n".join([head, "", *lines, "", notes]) + "\n")


if __name__ == "__main__":
  main()
