"""What a training loop reports and listens to: progress lines, TensorBoard, preemption."""
from __future__ import annotations

import io
import os
import signal
import time

import jax
from absl import logging
from jax.experimental import multihost_utils

from avsiam_jax import paths


class _BucketEventFile:
  """A gs:// TensorBoard event file for tensorboardX, through etils.epath like every run path:
  one object, uploaded again when a flush has something new, never after close (tensorboardX's
  own GCS writer uploads on every timed flush, and again when collected at exit)."""

  def __init__(self, path: str):
    self.path, self.buffer, self.sent, self.closed = path, io.BytesIO(), 0, False

  def write(self, data: bytes) -> None:
    self.buffer.write(data)

  def flush(self) -> None:
    if not self.closed and self.buffer.tell() != self.sent:
      paths.path(self.path).write_bytes(self.buffer.getvalue())
      self.sent = self.buffer.tell()

  def close(self) -> None:
    self.flush()
    self.closed = True


class _BucketEventFiles:  # tensorboardX's writer factory for "gs://"
  open = staticmethod(_BucketEventFile)

  def directory_check(self, path):  # pylint: disable=unused-argument
    pass  # object stores have no directories


class Logger:
  """Progress lines on every process's log, TensorBoard scalars from process 0 only."""

  def __init__(self, workdir: str, total_steps: int, batch_size: int, fields=lambda m: ""):
    """fields(metrics): the task's own part of a progress line."""
    self.total_steps, self.batch_size, self.fields = total_steps, batch_size, fields
    self.writer = None
    if jax.process_index() == 0:
      # pylint: disable=import-outside-toplevel
      from tensorboardX import SummaryWriter, record_writer
      record_writer.register_writer_factory("gs", _BucketEventFiles())
      self.writer = SummaryWriter(os.path.join(workdir, "tensorboard"))
    self.t0, self.s0 = time.time(), None

  def scalars(self, step: int, values: dict[str, float]) -> None:
    if self.writer:
      for k, v in values.items():
        self.writer.add_scalar(k, v, step)
      self.writer.flush()

  def close(self) -> None:
    """Writes out every queued event (tensorboardX's flush does not wait for its queue); a gs://
    event file is uploaded here, while the process still can."""
    if self.writer:
      self.writer.close()
      self.writer = None

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
