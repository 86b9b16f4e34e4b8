"""Small helpers shared by the trainer, the command-line tools and the benchmarks.

Standard library only at import: the dataset builder and its worker processes import it and
must not load JAX (write_json imports it only when it needs the process index).
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
import tempfile

# Read once, when numpy (OpenBLAS, MKL, OpenMP) loads in a process.
BLAS_THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def write_json(path: str, obj, *, every_process: bool = False) -> None:
  """Writes `obj` as JSON (indent=1) on JAX process 0; the others write nothing.

  `every_process`: every caller writes, and JAX is not imported (data_prep: its processes are
  not JAX processes and each writes files of its own). The file appears whole or not at all: a
  private temp file (several hosts may write one path at once), then a rename; a gs:// URL is
  one object upload, which GCS makes visible whole or not at all.
  """
  if not every_process:
    import jax  # pylint: disable=import-outside-toplevel
    if jax.process_index() != 0:
      return
  if "://" in path:
    from avsiam_jax import paths  # pylint: disable=import-outside-toplevel
    paths.path(path).write_text(json.dumps(obj, indent=1))
    return
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".",
                             prefix=os.path.basename(path) + ".", suffix=".tmp")
  try:
    with os.fdopen(fd, "w") as f:
      os.fchmod(f.fileno(), 0o644)  # mkstemp makes it private
      json.dump(obj, f, indent=1)
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)
    raise


@contextlib.contextmanager
def one_blas_thread(*, force: bool = False):
  """One BLAS thread in the processes started meanwhile; the environment is restored after.

  Worker processes each spinning a full-size OpenBLAS pool next to FFmpeg's decode threads
  made 2 workers slower than 1 on a 2-core machine. A variable the user set is kept unless
  `force` (the demo's records must be bit-identical: several threads round fbank sums
  differently).
  """
  saved = {k: os.environ.get(k) for k in BLAS_THREAD_VARS if force or k not in os.environ}
  os.environ.update({k: "1" for k in saved})
  try:
    yield
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v


def cost_of(compiled) -> dict[str, float]:
  """XLA's cost analysis of a compiled program as one dict ({} when it gives none)."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # one dict per program in some jax versions
    cost = cost[0] if cost else {}
  return dict(cost or {})


def cli_errors(*errors: type[BaseException], status: int = 2):
  """Decorates a command's `main(argv) -> int`: one of `errors` (the bad arguments and inputs
  the command checks for) ends in one line `error: ...` on stderr and returns `status`.

  Any other exception propagates with its traceback: it is a bug, not a user's mistake.
  """
  def decorate(main):
    @functools.wraps(main)
    def wrapped(*args, **kwargs):
      try:
        return main(*args, **kwargs)
      except errors as e:
        print(f"error: {one_line(e)}", file=sys.stderr, flush=True)
        return status
    return wrapped
  return decorate


def one_line(error: BaseException) -> str:
  """An exception's message on one line (its type's name when it has none)."""
  lines = [l.strip() for l in str(error).splitlines() if l.strip()]
  return " ".join(lines) if lines else type(error).__name__
