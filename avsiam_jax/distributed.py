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

On a Cloud TPU machine (TPU chips on the PCI bus, as JAX itself finds them, or the TPU worker env
vars) it refuses to start when JAX would not use the TPUs: without libtpu each worker would
otherwise train as a one-process CPU job. JAX_PLATFORMS=cpu runs on the CPU on purpose.
"""
from __future__ import annotations

import glob
import importlib.util
import os

import jax
from absl import logging

_TPU_ENV_VARS = ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "MEGASCALE_COORDINATOR_ADDRESS")
# Set on TPU pod workers (GKE, queued resources); a TPU VM keeps them in its metadata instead.
_TPU_MACHINE_ENV_VARS = ("TPU_ACCELERATOR_TYPE",) + _TPU_ENV_VARS
# TPU chips on the PCI bus: Google's vendor id and the TPU device ids (jax._src.hardware_utils's
# table; other Google devices, such as the gVNIC network card, are not TPUs).
PCI_DEVICES = "/sys/bus/pci/devices"
_GOOGLE_PCI_VENDOR = "0x1ae0"
_TPU_PCI_DEVICES = {"0x0027": "v3", "0x0056": "TPU", "0x005e": "v4", "0x0062": "v5p",
                    "0x0063": "v5e", "0x006f": "v6e", "0x0076": "tpu7x"}
INSTALL_HINT = ("install the TPU runtime on every worker (`pip install -r requirements.txt -r "
                "requirements-tpu.txt` in a Python >= 3.11 venv: docs/launch.md, \"Install on "
                "every worker\"), check that `python -c \"import jax; print(jax.device_count())\"` "
                "prints the slice's chips, or set JAX_PLATFORMS=cpu to run on the CPU on purpose")


class StartupError(RuntimeError):
  """The machine and the installed JAX do not agree: a TPU machine JAX would not use."""


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
  return _has_libtpu() and bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*")
                               or tpu_chips()[0])


def tpu_chips(pci_devices: str = PCI_DEVICES) -> tuple[int, str | None]:
  """(TPU chips on the PCI bus, their generation), read from sysfs as JAX does at start-up."""
  count, kind = 0, None
  for vendor in glob.glob(os.path.join(pci_devices, "*", "vendor")):
    try:
      with open(vendor) as f:
        if f.read().strip() != _GOOGLE_PCI_VENDOR:
          continue
      with open(os.path.join(os.path.dirname(vendor), "device")) as f:
        device = f.read().strip()
    except OSError:
      continue
    if device in _TPU_PCI_DEVICES:
      count, kind = count + 1, _TPU_PCI_DEVICES[device]
  return count, kind


def tpu_machine(environ=os.environ, chips: tuple[int, str | None] | None = None) -> str | None:
  """What shows that this is a Cloud TPU machine ("4 v5p TPU chips on the PCI bus",
  "TPU_ACCELERATOR_TYPE=v5p-64"), or None."""
  count, kind = tpu_chips() if chips is None else chips
  if count:
    return f"{count} {kind} TPU chip{'s' if count > 1 else ''} on the PCI bus"
  for name in _TPU_MACHINE_ENV_VARS:
    if environ.get(name):
      return f"{name}={environ[name]}"
  return None


def _has_libtpu(environ=os.environ) -> bool:
  return importlib.util.find_spec("libtpu") is not None or bool(environ.get("TPU_LIBRARY_PATH"))


def check_tpu_runtime(backend: str | None = None, *, environ=os.environ,
                      has_libtpu: bool | None = None,
                      chips: tuple[int, str | None] | None = None) -> str | None:
  """Raises StartupError on a TPU machine where JAX would not run on the TPUs.

  `backend`: None before JAX starts (then only libtpu's presence is checked), else
  jax.default_backend(). JAX_PLATFORMS without "tpu" opts out. Returns what marks the machine
  as a TPU machine (None: not one, nothing checked).
  """
  platforms = environ.get("JAX_PLATFORMS", "")
  if platforms and "tpu" not in platforms.split(","):
    return None
  why = tpu_machine(environ, chips)
  if why is None:
    return None
  if backend is None:
    if not (_has_libtpu(environ) if has_libtpu is None else has_libtpu):
      raise StartupError(f"this is a Cloud TPU machine ({why}) but JAX's TPU runtime (libtpu) is "
                         f"not installed, so each worker would train alone on its CPU: "
                         f"{INSTALL_HINT}")
  elif backend != "tpu":
    raise StartupError(f"this is a Cloud TPU machine ({why}) but JAX started its {backend!r} "
                       f"backend, not the TPU (is another process holding the chips? "
                       f"`sudo lsof -w /dev/accel* /dev/vfio/*`): {INSTALL_HINT}")
  return why


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
  # Before any backend starts: a TPU machine without libtpu fails here, naming the fix.
  tpu = check_tpu_runtime()
  found = detect(coordinator_address, num_processes, process_id)
  if found is None:
    logging.debug("Single process: jax.distributed not initialized")
  else:
    how, kwargs = found
    logging.info("Initializing jax.distributed (%s): %s", how, kwargs or "auto-detect")
    jax.distributed.initialize(**kwargs)
    logging.info("jax.distributed up: process %d of %d; %d local / %d global devices (%s)",
                 jax.process_index(), jax.process_count(), jax.local_device_count(),
                 jax.device_count(), jax.default_backend())
  if tpu is not None:  # only a TPU machine pays for starting the backend here
    check_tpu_runtime(jax.default_backend())
  return found is not None
