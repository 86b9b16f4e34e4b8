"""TPU plan: the pretraining step of each model size compiled for TPU slices, from this machine.

  python -m benchmarks.tpu_plan [--cases B/v5p:2x2x1/bfloat16/scan,H/v5p:4x4x4/bfloat16/scan/dots]

Each case (CONFIG/TOPOLOGY/DTYPE[/dots|full][/scan][/grouped]; grouped: one encoder call per
mask-ratio group instead of the groups packed into rows) runs `main.py` with
--config.compile_only.topology=TOPOLOGY in a process of its own (libtpu: requirements-tpu.txt)
at the paper's per-chip batch, data parallel, and reads its WORKDIR/compile_only.json. A case that does not finish within
--timeout seconds is reported as such. A scanned case brings its unrolled twin (the case
without /scan): XLA's cost model counts a loop body once, so the twin's step time stands for
the scanned program's (which also stacks the blocks' weights, a copy the twin does not make). The table goes to docs/benchmarks.md ("TPU plan").
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import subprocess
import sys
import tempfile
import time

from benchmarks.report import REPO, command, write_section

CONFIGS = {"demo": "configs/demo.py:mode=pretrain", "B": "configs/base.py",
           "L": "configs/large.py", "H": "configs/huge.py"}
# The paper's per-device pretraining batch, rounded to a multiple of the 5 ratio groups.
PER_CHIP_BATCH = {"demo": 10, "B": 95, "L": 50, "H": 25}
DEFAULT_CASES = "demo/v5p:2x2x1/float32,demo/v5p:2x2x1/bfloat16,B/v5p:2x2x1/bfloat16"


def chips(topology: str) -> int:
  dims = [int(x) for x in topology.split(":", 1)[1].split("x")]
  count = 1
  for d in dims:
    count *= d
  return count


def run_case(case: str, timeout: int) -> dict:
  name, topology, dtype, *rest = case.split("/")
  remat = next((r for r in rest if r in ("dots", "full")), "none")
  scan = "scan" in rest
  pack = "grouped" not in rest
  batch = PER_CHIP_BATCH[name] * chips(topology)
  with tempfile.TemporaryDirectory() as work:
    cmd = [sys.executable, "main.py", f"--config={CONFIGS[name]}", f"--workdir={work}",
           f"--config.compile_only.topology={topology}", f"--config.model.dtype={dtype}",
           f"--config.model.remat={remat}", f"--config.model.scan={scan}",
           f"--config.pretrain.pack_groups={pack}",
           f"--config.batch_size={batch}",
           "--config.eval.batch_size=" + str(chips(topology)), "--config.compile_cache_dir=none"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    t0 = time.perf_counter()
    try:
      proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=timeout)
    except subprocess.TimeoutExpired:
      return {"case": case, "error": f"not finished in {timeout} s"}
    path = os.path.join(work, "compile_only.json")
    if proc.returncode or not os.path.exists(path):
      return {"case": case, "error": proc.stderr.strip().splitlines()[-1][:200]}
    with open(path) as f:
      report = json.load(f)["pretrain"]
  return dict(report, case=case, wall_s=time.perf_counter() - t0)


def twin(case: str) -> str:
  """The unrolled program of a scanned case: the same step, every block in the HLO."""
  return case.replace("/scan", "")


def row(r: dict, done: dict[str, dict] | None = None) -> str:
  """done: finished cases by case; a scanned case's step time comes from its unrolled twin's
  cost model there (XLA's cost analysis counts a loop body once)."""
  if "error" in r and "temp_gib" in r:  # refused by the TPU compiler: does not fit
    took = ("-" if r["compile_s"] < 0 else  # not recorded
            f"{r['lower_s']:.0f} + {r['compile_s']:.0f}")
    return (f"| {r['case']} | {r['batch_per_chip']:g} | {took} | - + {r['temp_gib']:.1f} | "
            f"> {r['hbm_gib']} (NO: refused) | - | - | - | - |")
  if "error" in r:
    return f"| {r['case']} | {r['error']} |" + " |" * 8
  tflop = f"{r['flops_per_chip'] / 1e12:.2f}"
  ratio = f"{r['flops_per_chip'] / r['analytic_flops_per_chip']:.2f}"
  speed = ("-" if r["samples_per_s_per_chip"] is None else
           f"{r['samples_per_s_per_chip']:.1f}")
  if r.get("scan", "/scan" in r["case"]):  # XLA counts a scanned loop body once
    tflop, ratio, speed = f"({tflop})", f"({ratio})", f"({speed})"
    unrolled = (done or {}).get(twin(r["case"]), {})
    if unrolled.get("samples_per_s_per_chip"):
      speed += f" ~{unrolled['samples_per_s_per_chip']:.1f} (unrolled)"
  coll = ", ".join(f"{v} {k}" for k, v in sorted(r["collectives"].items()))
  fits = "yes" if r["fits"] else "NO"
  return (f"| {r['case']} | {r['batch_per_chip']:g} | {r['lower_s']:.0f} + {r['compile_s']:.0f} "
          f"| {r['argument_gib']:.2f} + {r['temp_gib']:.2f} | {r['used_gib']:.1f} / "
          f"{r['hbm_gib']} ({fits}) | {tflop} | {ratio} | {coll} | {speed} |")


def packing_lines(done: dict[str, dict]) -> list[str]:
  """Packed ratio groups against one encoder call per group, for every case run both ways;
  done: the finished cases' results by case."""
  lines = []
  for case, grouped in done.items():
    packed = done.get(case.replace("/grouped", ""))
    if not case.endswith("/grouped") or packed is None:
      continue
    work = ""
    if not packed.get("scan"):  # a scanned body is counted once: no step totals to compare
      work = f", XLA FLOPs {packed['flops_per_chip'] / grouped['flops_per_chip']:.3f}x"
      if packed["samples_per_s_per_chip"] and grouped["samples_per_s_per_chip"]:
        work += (f", cost-model samples/s "
                 f"{packed['samples_per_s_per_chip'] / grouped['samples_per_s_per_chip']:.3f}x")
    lines.append(f"{packed['case']}, packed / grouped: compile "
                 f"{packed['compile_s'] / grouped['compile_s']:.2f}x, temporaries "
                 f"{packed['temp_gib'] / grouped['temp_gib']:.3f}x{work}.  ")
  return lines


def compile_lines(done: dict[str, dict]) -> list[str]:
  """Compile time of every scanned or packed variant against the unrolled program with one
  encoder call per ratio group, per config / topology / dtype."""
  lines = []
  for case, base in done.items():
    if not case.endswith("/grouped") or base.get("scan"):
      continue
    stem = case[:-len("/grouped")]
    others = [r for c, r in done.items() if c != case and c.startswith(stem)]
    if others:
      lines.append(f"{stem}, compile time against the unrolled program with one encoder call "
                   f"per group ({base['compile_s']:.0f} s): " + ", ".join(
                       f"{r['case'][len(stem) + 1:] or 'packed'} {r['compile_s']:.0f} s "
                       f"({base['compile_s'] / r['compile_s']:.2f}x less)" for r in others)
                   + ".  ")
  return lines


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--cases", default=DEFAULT_CASES)
  parser.add_argument("--timeout", type=int, default=3600)
  parser.add_argument("--include", default="",
                      help="results printed by an earlier run (one dict per line), listed first")
  args = parser.parse_args()
  results = []
  if args.include:
    with open(args.include) as f:
      results = [ast.literal_eval(line) for line in f if line.startswith("{")]
  cases = list(filter(None, args.cases.split(",")))
  # Every scanned case's unrolled twin too, for the step time the scanned program's cost
  # analysis cannot give.
  cases += [twin(c) for c in cases if "/scan" in c and twin(c) not in cases]
  have = {r["case"] for r in results}
  for case in cases:
    if case in have:
      continue
    results.append(run_case(case, args.timeout))
    print(results[-1], flush=True)  # one line per case, for --include
  lines = [f"`{command()}`", "",
           f"Compiled on this machine ({os.cpu_count()} CPUs) with libtpu; nothing runs on a TPU. "
           "Case: config / topology / compute dtype (parameters and Adam float32); data "
           "parallel, the paper's per-chip batch. Memory per chip in GiB (arguments + "
           "temporaries; used = those + outputs - aliased, against the chip's HBM). FLOPs: "
           "XLA's per chip per step, and its ratio to the analytic matmul count. Samples/s: "
           "the TPU cost model's estimate per chip ('-' where it gives none). In brackets "
           "(scan cases): XLA counts a scanned loop body once, so those undercount the step; "
           "their step time is the cost model's for the unrolled twin (the same case without "
           "scan, compiled in the same run: '~N (unrolled)'), whose HLO holds every block. "
           "Compile times are on a shared 2-core machine and vary with its load.", "",
           "| case | batch/chip | lower + compile s | GiB args + temp | used / HBM (fits) | "
           "TFLOP/chip/step | XLA / analytic | collectives | samples/s/chip |",
           "|---|---|---|---|---|---|---|---|---|"]
  done = {r["case"]: r for r in results if "error" not in r}
  lines += [row(r, done) for r in results] + [""] + packing_lines(done) + compile_lines(done)
  write_section("TPU plan", "\n".join(lines) + "\n")


if __name__ == "__main__":
  main()
