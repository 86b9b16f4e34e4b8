"""Entry point: python main.py --config=configs/demo.py --workdir=/tmp/avsiam_demo"""
import difflib
import logging as py_logging
import re
import sys

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from avsiam_jax import compile_only, config, distributed, train, utils

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")
flags.mark_flags_as_required(["config", "workdir"])
# Multi-process runs (docs/launch.md): set these, the JAX_* env vars, or let SLURM/TPU be detected.
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")


class _QuietLibraries(py_logging.Filter):
  """Keeps the libraries' INFO lines (Orbax's per-save lines, JAX's backend probing, gcsfs's
  per-file lines) out of the progress log; their warnings still show."""

  LIBRARIES = ("/orbax/", "/jax/", "/jaxlib/", "/grain/", "/flax/", "/gcsfs/", "/fsspec/")

  def filter(self, record):
    return (record.levelno >= py_logging.WARNING
            or not any(lib in record.pathname for lib in self.LIBRARIES))


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, but a mistake in the flags (an unknown config key, a bad value, an
  argument the config file refuses) ends in one line on stderr and exit 2, before any work;
  ml_collections would end most of them in a traceback."""
  try:
    rest = flags.FLAGS(argv)
    _CONFIG.value.get("mode")  # a config file that is not there fails on first use
    return rest
  except flags.Error as e:
    message = _flag_error(e)
  except OSError as e:  # the config file cannot be read
    message = f"--{_CONFIG.name}: {str(e).strip().splitlines()[-1].strip()}"
  except (AttributeError, KeyError, TypeError):
    message = _unknown_key(argv)
    if message is None:  # no override names a missing key: a bug, shown with its traceback
      raise
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def _flag_error(e: flags.Error) -> str:
  """absl's message, where ml_collections put a config file's traceback: its error's line."""
  text, wrapped = str(e), e.__context__
  if "\n" in text and wrapped is not None and text.endswith(str(wrapped)):
    # `flag --config=PATH:ARG: ` + the traceback of the config file's ValueError or TypeError
    # (ml_collections re-raises it in its `except`, so the original is the context).
    flag = text[:-len(str(wrapped))].rstrip(": ")
    text = f"{flag}: {utils.one_line(wrapped.__context__ or wrapped)}"
  return text.splitlines()[0].removeprefix("flag ")


def _unknown_key(argv: list[str]) -> str | None:
  """`config.PATH: no such key; ...` for the first --config.PATH override whose key the config
  file's config lacks; None when there is none."""
  config = _config_of(argv)
  if config is None:
    return None
  # --config.a.b=V or --config.a.b V; a path with an index (a[0]) is not checked.
  overrides = [re.fullmatch(rf"--?{_CONFIG.name}\.([^=\[]+)(=.*)?", arg) for arg in argv]
  for path in [m.group(1) for m in overrides if m]:
    node, where = config, _CONFIG.name
    for key in path.split("."):
      if not isinstance(node, (ml_collections.ConfigDict, dict)):
        return f"{_CONFIG.name}.{path}: {where} is a {type(node).__name__}, it has no keys"
      if key not in node:
        keys = sorted(str(k) for k in node.keys())
        close = difflib.get_close_matches(key, keys, n=3)
        hint = f"did you mean {' or '.join(close)}?" if close else f"{where} has {', '.join(keys)}"
        return f"{_CONFIG.name}.{path}: no such key; {hint}"
      node, where = node[key], f"{where}.{key}"
  return None


def _config_of(argv: list[str]):
  """The config the --config argument names, loaded again; None if it does not load."""
  value = None
  for i, arg in enumerate(argv):
    m = re.fullmatch(rf"--?{_CONFIG.name}(=(.*))?", arg)
    if m:
      value = m.group(2) if m.group(1) else (argv[i + 1] if i + 1 < len(argv) else None)
  try:
    return flags.FLAGS[_CONFIG.name].parser.parse(value)
  except Exception:  # pylint: disable=broad-except  # the caller re-raises the first error
    return None


# A TPU machine JAX would not use is a start-up error too (distributed.check_tpu_runtime).
@utils.cli_errors(config.ConfigError, distributed.StartupError)
def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(_QuietLibraries())
  distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  if _CONFIG.value.get("compile_only", {}).get("topology"):
    compile_only.run(_CONFIG.value, _WORKDIR.value)
  else:
    train.run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
