"""Entry point: python main.py --config=configs/demo.py --workdir=/tmp/avsiam_demo"""
import logging as py_logging
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from avsiam_jax import compile_only, config, distributed, train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")
flags.mark_flags_as_required(["config", "workdir"])
# Multi-process runs (docs/launch.md): set these, the JAX_* env vars, or let SLURM/TPU be detected.
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")


class _QuietLibraries(py_logging.Filter):
  """Keeps the libraries' INFO lines (Orbax's per-save lines, JAX's backend probing) out of the
  progress log; their warnings still show."""

  LIBRARIES = ("/orbax/", "/jax/", "/jaxlib/", "/grain/", "/flax/")

  def filter(self, record):
    return (record.levelno >= py_logging.WARNING
            or not any(lib in record.pathname for lib in self.LIBRARIES))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(_QuietLibraries())
  distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  try:
    if _CONFIG.value.get("compile_only", {}).get("topology"):
      compile_only.run(_CONFIG.value, _WORKDIR.value)
    else:
      train.run(_CONFIG.value, _WORKDIR.value)
  except config.ConfigError as e:
    sys.exit(f"Config error: {e}")


if __name__ == "__main__":
  app.run(main)
