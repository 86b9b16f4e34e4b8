"""Entry point: python main.py --config=configs/demo.py --workdir=/tmp/avsiam_demo"""
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from avsiam_jax import train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.INFO)
  try:
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except train.ConfigError as e:
    sys.exit(f"Config error: {e}")


if __name__ == "__main__":
  app.run(main)
