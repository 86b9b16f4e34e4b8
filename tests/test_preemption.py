"""Crash and preemption: SIGKILL then restart gives the uninterrupted loss curve; SIGTERM saves
and exits 0."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from avsiam_jax import train
from configs import demo as demo_config
from tb_events import read_scalars

pytestmark = pytest.mark.slow  # trains in subprocesses

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 12
OVERRIDES = {
    "data.demo": False, "model.variant": "test", "model.image_size": 32,
    "model.audio_frames": 32, "model.decoder_width": 16, "model.decoder_depth": 1,
    "model.decoder_heads": 2, "checkpoint_every_steps": 3, "log_every_steps": 1,
    "eval.batch_size": 16, "eval.max_clips": 8, "optim.lr": 1e-3,
}


@pytest.fixture(scope="module")
def dataset(demo_dataset):
  return demo_dataset


def config_for(data_dir, total_steps):
  c = demo_config.get_config("mode=pretrain")
  for key, value in dict(OVERRIDES, **{"data.dir": data_dir, "total_steps": total_steps}).items():
    *parents, leaf = key.split(".")
    node = c
    for part in parents:
      node = node[part]
    node[leaf] = value
  return c


def launch(workdir, data_dir, total_steps, log, env=None):
  """main.py in a subprocess; its output goes to a file (a full pipe would block it)."""
  flags = [f"--config.{k}={v}" for k, v in
           dict(OVERRIDES, **{"data.dir": data_dir, "total_steps": total_steps}).items()]
  with open(log, "w") as f:
    return subprocess.Popen(
        [sys.executable, "main.py", "--config=configs/demo.py:mode=pretrain",
         f"--workdir={workdir}", *flags],
        cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env)


def output(log):
  with open(log) as f:
    return f.read()


def wait_for(condition, proc, log, timeout=300):
  t0 = time.time()
  while not condition():
    if proc.poll() is not None:
      raise AssertionError(f"exited early with {proc.returncode}:\n{output(log)[-3000:]}")
    if time.time() - t0 > timeout:
      proc.kill()
      raise AssertionError(f"timed out:\n{output(log)[-3000:]}")
    time.sleep(0.05)


def losses(workdir):
  return read_scalars(os.path.join(workdir, "tensorboard")).get("train/loss", {})


def test_sigkill_then_restart_matches_uninterrupted(tmp_path, dataset):
  reference = str(tmp_path / "reference")
  train.run(config_for(dataset, STEPS), reference)
  want = losses(reference)
  assert sorted(want) == list(range(1, STEPS + 1))

  workdir, log = str(tmp_path / "killed"), str(tmp_path / "log")
  proc = launch(workdir, dataset, STEPS, log)
  wait_for(lambda: os.path.isdir(os.path.join(workdir, "checkpoints", "3")), proc, log)
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=60)
  proc = launch(workdir, dataset, STEPS, log)
  assert proc.wait(timeout=600) == 0, output(log)[-3000:]
  assert "Resumed from step" in output(log)
  got = losses(workdir)
  assert sorted(got) == list(range(1, STEPS + 1))
  np.testing.assert_allclose([got[s] for s in range(1, STEPS + 1)],
                             [want[s] for s in range(1, STEPS + 1)], rtol=1e-5, atol=1e-6)


def test_sigterm_saves_and_exits_cleanly(tmp_path, dataset):
  workdir, log = str(tmp_path / "preempted"), str(tmp_path / "log")
  proc = launch(workdir, dataset, 300, log)
  wait_for(lambda: max(losses(workdir), default=0) >= 2, proc, log)
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=300) == 0, output(log)[-3000:]
  saved = [int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit()]
  # The last step trained is the one saved, whether or not a periodic save was due.
  assert max(saved) == max(losses(workdir)) >= 2
  assert f"Stopped at step {max(saved)}" in output(log)
