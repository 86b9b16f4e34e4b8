"""Two real JAX processes on CPU (jax.distributed + gloo) train like one process does.

Each process (tests/multihost_worker.py) has 2 virtual CPU devices, reads its own half of every
global batch from the shared dataset and runs train.run into one shared workdir.
The per-step losses that process 0 logs to TensorBoard must match a one-process, one-device run
fed the same global batches with the same masking layout (config.mesh.batch_shards = 4).
"""
import glob
import json
import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from avsiam_jax import sharding
from conftest import build
from avsiam_jax.data import pipeline, records
import multihost_worker  # pytest puts tests/ (no __init__.py) on sys.path
from tb_events import read_scalars

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_PROCESSES, LOCAL_DEVICES, STEPS = 2, 2, 3
TIMEOUT_S = 900


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def reference_losses(config, data_dir):
  """One process on one device, the same global batches (the concatenation over processes of
  what each process's pipeline yields, in process order) and the same masking layout."""
  num_train = records.read_info(data_dir)["splits"]["train"]["num_examples"]
  _, mesh, _, fns = build(config, steps_per_epoch=num_train // config.batch_size)
  init_key, step_key = jax.random.split(jax.random.key(config.seed))
  iters = [pipeline.make_pretrain_iterator(
      data_dir, "train", batch_size=config.batch_size // NUM_PROCESSES,
      audio_frames=config.model.audio_frames, image_size=config.model.image_size,
      seed=config.seed, time_shift=config.data.time_shift, process_index=i,
      process_count=NUM_PROCESSES) for i in range(NUM_PROCESSES)]
  state, out = fns.init(init_key), []
  for _ in range(STEPS):
    parts = [next(it) for it in iters]
    batch = {k: np.concatenate([p[k] for p in parts]) for k in ("audio", "video")}
    state, m = fns.step(state, sharding.global_batch(batch, mesh), step_key)
    out.append(jax.device_get(m))
  return out


@pytest.mark.slow
def test_two_processes_match_one(tmp_path, demo_dataset):
  t0 = time.time()
  num_devices = NUM_PROCESSES * LOCAL_DEVICES
  data_dir = demo_dataset
  num_eval = records.read_info(data_dir)["splits"]["eval"]["num_examples"]
  workdir = str(tmp_path / "workdir")
  port = free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu")  # the worker sets XLA_FLAGS
  for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_NTASKS"):
    env.pop(k, None)
  procs, logs = [], []
  for i in range(NUM_PROCESSES):
    out, err = (open(tmp_path / f"worker{i}.{s}", "w+") for s in ("out", "err"))
    logs.append((out, err))
    procs.append(subprocess.Popen(
        # A module run from the root: the child finds avsiam_jax and tests there.
        [sys.executable, "-m", "tests.multihost_worker",
         f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={NUM_PROCESSES}",
         f"--process_id={i}", f"--workdir={workdir}", f"--data_dir={data_dir}",
         f"--local_devices={LOCAL_DEVICES}", f"--steps={STEPS}"],
        cwd=ROOT, env=env, stdout=out, stderr=err))

  # The one-process reference, computed here while the workers run.
  config = multihost_worker.worker_config(data_dir, STEPS, num_devices)
  want = reference_losses(config, data_dir)

  deadline = time.time() + TIMEOUT_S
  try:
    while any(p.poll() is None for p in procs) and time.time() < deadline:
      if any(p.poll() not in (None, 0) for p in procs):  # one failed: give the other a moment
        deadline = min(deadline, time.time() + 20)
      time.sleep(0.5)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  outputs = []
  for i, (p, (out, err)) in enumerate(zip(procs, logs)):
    out.seek(0), err.seek(0)
    stdout, stderr = out.read(), err.read()
    out.close(), err.close()
    assert p.returncode == 0, (f"worker {i} exited {p.returncode}\n--- stdout\n{stdout}\n"
                               f"--- stderr (last 8000 chars)\n{stderr[-8000:]}")
    outputs.append(json.loads(stdout.strip().splitlines()[-1]))

  for i, o in enumerate(outputs):
    assert (o["process_index"], o["process_count"]) == (i, NUM_PROCESSES)
    assert (o["local_devices"], o["global_devices"]) == (LOCAL_DEVICES, num_devices)
  # Every process computes the same (all-gathered) retrieval metrics.
  assert outputs[0]["results"] == outputs[1]["results"]
  assert outputs[0]["results"]["step"] == STEPS
  assert outputs[0]["results"]["retrieval"]["num_clips"] == num_eval

  # Losses per step, as logged by process 0, match the one-process run.
  scalars = read_scalars(os.path.join(workdir, "tensorboard"))
  for name in ("loss", "contrastive", "reconstruction", "grad_norm_total"):
    got = [scalars[f"train/{name}"][s] for s in range(1, STEPS + 1)]
    np.testing.assert_allclose(got, [float(m[name]) for m in want], rtol=1e-5, atol=1e-5,
                               err_msg=name)
  # Process 0 alone writes TensorBoard and results.json; the checkpoint is written once.
  assert len(glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*"))) == 1
  with open(os.path.join(workdir, "results.json")) as f:
    assert json.load(f) == outputs[0]["results"]
  assert [d for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit()] == [str(STEPS)]
  assert not glob.glob(os.path.join(workdir, "**", "*.orbax-checkpoint-tmp*"), recursive=True)
  print(f"two-process test: {time.time() - t0:.1f} s")


def test_detect_multi_process_launches(monkeypatch):
  from avsiam_jax import distributed  # pylint: disable=g-import-not-at-top
  for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_NTASKS",
            "SLURM_STEP_NODELIST", "AVSIAM_DISTRIBUTED", "TPU_WORKER_HOSTNAMES",
            "TPU_PROCESS_ADDRESSES", "MEGASCALE_COORDINATOR_ADDRESS"):
    monkeypatch.delenv(k, raising=False)
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  assert distributed.detect() is None  # a plain single process
  assert not distributed.initialize()  # ... which initialize leaves alone
  assert distributed.detect("h:1", 1, 0) is None
  assert distributed.detect("h:1", 2, 1) == (
      "explicit", {"coordinator_address": "h:1", "num_processes": 2, "process_id": 1})
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
  monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
  monkeypatch.setenv("JAX_PROCESS_ID", "3")
  assert distributed.detect() == (
      "explicit", {"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3})
  assert distributed.detect(process_id=0)[1]["process_id"] == 0  # flags win over env
  monkeypatch.setenv("AVSIAM_DISTRIBUTED", "0")
  assert distributed.detect() is None
  monkeypatch.delenv("AVSIAM_DISTRIBUTED")
  monkeypatch.delenv("JAX_PROCESS_ID")
  with pytest.raises(ValueError, match="process"):
    distributed.detect()
  for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES"):
    monkeypatch.delenv(k)
  monkeypatch.setenv("SLURM_NTASKS", "16")
  assert distributed.detect() is None  # not inside srun: one process
  monkeypatch.setenv("SLURM_STEP_NODELIST", "node[01-02]")
  assert distributed.detect() == ("SLURM", {})
  monkeypatch.setenv("SLURM_NTASKS", "1")
  assert distributed.detect() is None
  monkeypatch.setenv("JAX_PLATFORMS", "")
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "w0,w1,w2,w3")
  assert distributed.detect() == ("Cloud TPU", {})
