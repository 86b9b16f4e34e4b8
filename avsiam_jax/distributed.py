"""Multi-process start-up through JAX's own runtime (`jax.distributed.initialize`).

Call `initialize()` once at start-up, before anything touches a JAX device. It decides from the
environment whether this process is one of several:

  explicit   arguments (main.py's --coordinator_address/--num_processes/--process_id) or the
             env vars JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID;
  SLURM      SLURM_NTASKS > 1 (one task per host or per GPU, launched with srun): JAX reads the
             coordinator, process count and id from SLURM's variables;
  TPU pods   a Cloud TPU VM (libtpu installed and TPU chips visible, or the TPU worker env
             vars set): JAX reads the workers from the TPU metadata;

and otherwise does nothing (one process: the single-host default). AVSIAM_DISTRIBUTED=0 turns
detection off; AVSIAM_DISTRIBUTED=1 forces `jax.distributed.initialize()` with auto-detection.
Calling it again is a no-op.
"""
from __future__ import annotations

import glob
import importlib.util
import os

import jax
from absl import logging

_TPU_ENV_VARS = ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "MEGASCALE_COORDINATOR_ADDRESS")


def _env_int(name: str) -> int | None:
  value = os.environ.get(name)
  if value in (None, ""):
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def _on_tpu_vm() -> bool:
  """A Cloud TPU VM: TPU worker env vars, or libtpu installed and TPU chips present.

  Looks only at the environment and /dev, so no JAX backend is started.
  """
  platforms = os.environ.get("JAX_PLATFORMS", "")
  if platforms and "tpu" not in platforms:
    return False
  if any(os.environ.get(v) for v in _TPU_ENV_VARS):
    return True
  has_libtpu = (importlib.util.find_spec("libtpu") is not None
                or bool(os.environ.get("TPU_LIBRARY_PATH")))
  return has_libtpu and bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def detect(coordinator_address: str | None = None, num_processes: int | None = None,
           process_id: int | None = None) -> tuple[str, dict] | None:
  """(how, kwargs for jax.distributed.initialize) when this is a multi-process run, else None."""
  mode = os.environ.get("AVSIAM_DISTRIBUTED", "").strip().lower()
  if mode in ("0", "false", "off", "no"):
    return None
  coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
  num_processes = num_processes if num_processes is not None else _env_int("JAX_NUM_PROCESSES")
  process_id = process_id if process_id is not None else _env_int("JAX_PROCESS_ID")
  if num_processes is not None:
    if num_processes < 1:
      raise ValueError(f"num_processes must be >= 1, got {num_processes}")
    if num_processes == 1:
      return None
    if coordinator_address is None or process_id is None:
      raise ValueError(
          f"num_processes={num_processes} also needs the coordinator address (host:port of "
          "process 0) and this process's id: --coordinator_address/--process_id or "
          "JAX_COORDINATOR_ADDRESS/JAX_PROCESS_ID")
    return "explicit", dict(coordinator_address=coordinator_address,
                            num_processes=num_processes, process_id=process_id)
  if process_id is not None:
    raise ValueError("process_id is set but num_processes is not")
  # Partial settings (e.g. only the coordinator address) are passed on; JAX detects the rest.
  partial = {k: v for k, v in (("coordinator_address", coordinator_address),) if v}
  if (_env_int("SLURM_NTASKS") or 1) > 1:
    if "SLURM_STEP_NODELIST" in os.environ:  # inside an `srun` step: one process per task
      return "SLURM", partial
    logging.warning("SLURM_NTASKS=%s but not inside an srun step: running as one process; "
                    "launch with `srun python main.py ...`", os.environ["SLURM_NTASKS"])
  if _on_tpu_vm():
    return "Cloud TPU", partial
  if mode in ("1", "true", "on", "yes"):
    return "auto-detected", partial
  return None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
  """Starts JAX's distributed runtime when launched as several processes; True if it did.

  Idempotent: returns False if the runtime is already up (or this is a single process).
  Must run before any call that starts a JAX backend (jax.devices(), computations, ...).
  """
  if jax.distributed.is_initialized():
    return False
  found = detect(coordinator_address, num_processes, process_id)
  if found is None:
    logging.debug("Single process: jax.distributed not initialized")
    return False
  how, kwargs = found
  logging.info("Initializing jax.distributed (%s): %s", how, kwargs or "auto-detect")
  jax.distributed.initialize(**kwargs)
  logging.info("jax.distributed up: process %d of %d; %d local / %d global devices (%s)",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count(), jax.default_backend())
  return True
