"""What a training loop reports and listens to: progress lines, TensorBoard, preemption."""
from __future__ import annotations

import os
import signal
import time

import jax
from absl import logging
from jax.experimental import multihost_utils


class Logger:
  """Progress lines on every process's log, TensorBoard scalars from process 0 only."""

  def __init__(self, workdir: str, total_steps: int, batch_size: int, fields=lambda m: ""):
    """fields(metrics): the task's own part of a progress line."""
    self.total_steps, self.batch_size, self.fields = total_steps, batch_size, fields
    self.writer = None
    if jax.process_index() == 0:
      from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
      self.writer = SummaryWriter(os.path.join(workdir, "tensorboard"))
    self.t0, self.s0 = time.time(), None

  def scalars(self, step: int, values: dict[str, float]) -> None:
    if self.writer:
      for k, v in values.items():
        self.writer.add_scalar(k, v, step)
      self.writer.flush()

  def progress(self, step: int, metrics: dict[str, float]) -> None:
    now = time.time()
    speed = "warming up"
    if self.s0 is None:  # the first interval includes compilation: time from here on
      self.t0, self.s0 = now, step
    elif step > self.s0:
      rate = (step - self.s0) * self.batch_size / max(now - self.t0, 1e-9)
      eta = (self.total_steps - step) * self.batch_size / rate
      speed = f"{rate:.1f} samples/s | ETA {time.strftime('%H:%M:%S', time.gmtime(eta))}"
      metrics = dict(metrics, samples_per_sec=rate)
    self.scalars(step, {f"train/{k}": v for k, v in metrics.items()})
    logging.info("step %d/%d | loss %.4f (%s) | %s", step, self.total_steps, metrics["loss"],
                 self.fields(metrics), speed)


class StopRequest:
  """SIGTERM (preemption) asks the loop to save at the next step boundary and return.

  With several processes JAX's own preemption service catches the signal and agrees on a
  step, so every process saves the same step.
  """

  def __init__(self):
    self.requested = False
    if jax.process_count() == 1:
      signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    logging.warning("SIGTERM: saving a checkpoint at the next step boundary, then stopping")
    self.requested = True

  def __call__(self, step: int) -> bool:
    if jax.process_count() > 1:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.requested
