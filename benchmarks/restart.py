"""Restart time to the first step, with and without the persistent compilation cache.

  python -m benchmarks.restart [--steps 10]

Trains the demo's pretraining stage for `--steps` steps, then restarts it for one more step
(it resumes from the checkpoint), once with the default cache (WORKDIR/compile_cache) and once
with --config.compile_cache_dir=none. The time is from launching the process to the log line
of the resumed step; both runs read one prebuilt demo dataset. The table goes to
docs/benchmarks.md (section "Restart").
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

from benchmarks.report import REPO, command, write_section


def launch(workdir: str, dataset: str, steps: int, cache: str) -> float:
  """Seconds from launch to the log line of step `steps`."""
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
  cmd = [sys.executable, "main.py", "--config=configs/demo.py:mode=pretrain",
         f"--workdir={workdir}", f"--config.data.dir={dataset}", f"--config.total_steps={steps}",
         "--config.log_every_steps=1", f"--config.checkpoint_every_steps={steps}",
         "--config.eval.max_clips=40"]
  if cache:
    cmd.append(f"--config.compile_cache_dir={cache}")
  t0 = time.perf_counter()
  proc = subprocess.Popen(cmd, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
  seen = None
  for line in proc.stderr:
    if seen is None and re.search(rf"step {steps}/{steps} ", line):
      seen = time.perf_counter() - t0
  if proc.wait() or seen is None:
    raise RuntimeError(f"{' '.join(cmd)} failed (rc {proc.returncode})")
  return seen


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=10)
  args = parser.parse_args()
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    dataset = os.path.join(tmp, "demo_dataset")
    from avsiam_jax.data import demo  # pylint: disable=import-outside-toplevel
    demo.ensure_demo_dataset(dataset, 400, 100, seed=0)
    for name, cache in (("on (WORKDIR/compile_cache)", ""), ("off", "none")):
      work = os.path.join(tmp, "off" if cache else "on")
      first = launch(work, dataset, args.steps, cache)
      again = launch(work, dataset, args.steps + 1, cache)
      rows.append((name, f"{first:.1f}", f"{again:.1f}"))
      print(rows[-1], flush=True)
  lines = [f"`{command()}`", "",
           f"{os.cpu_count()} CPUs; the demo's pretraining stage (configs/demo.py). Seconds from "
           f"launching `main.py` to the log line of a step: a fresh run to its step {args.steps}, "
           f"then a restart (resumed from the step-{args.steps} checkpoint) to its first step.",
           "", f"| compilation cache | fresh run, to step {args.steps} | restart, to step "
           f"{args.steps + 1} |", "|---|---|---|"]
  lines += [f"| {' | '.join(r)} |" for r in rows]
  write_section("Restart", "\n".join(lines) + "\n")


if __name__ == "__main__":
  main()
