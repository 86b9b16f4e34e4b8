"""Run paths: local directories and gs://BUCKET/... URLs alike.

What the trainer and the tools read and write under a run directory (checkpoints, config.json,
results, TensorBoard events, figures, converted weights, the compilation cache) goes through
etils.epath, as Orbax's own files and JAX's compilation cache do; epath reaches gs:// through
gcsfs. Orbax writes the arrays through TensorStore's GCS driver. Both take the machine's default
credentials (on a TPU VM, its service account).

Imports no JAX (the dataset builder's processes import utils, which imports this on use).
"""
from __future__ import annotations

import os
import uuid

# gcsfs's experimental zonal / hierarchical-namespace layer asks the Storage Control API (gRPC)
# about each bucket, again on every operation while it cannot tell; runs write plain objects.
# Set the variable to true to have it.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
try:
  import fsspec.config
  # No listing cache: gcsfs would otherwise keep a directory's listing for the life of the
  # process and miss the checkpoints other processes (and TensorStore) write meanwhile.
  fsspec.config.conf.setdefault("gcs", {}).setdefault("use_listings_cache", False)
except ImportError:  # no fsspec: local paths only
  pass


def is_url(path) -> bool:
  """Whether `path` is a URL (gs://...) rather than a local path."""
  return "://" in os.fspath(path)


def absolute(path) -> str:
  """An absolute local path (Orbax wants one), or the URL as it is."""
  path = os.fspath(path)
  return path if is_url(path) else os.path.abspath(path)


def path(p):
  """epath.Path of a local path or a URL."""
  from etils import epath  # pylint: disable=import-outside-toplevel
  return epath.Path(os.fspath(p))


def exists(p) -> bool:
  return path(p).exists() if is_url(p) else os.path.exists(p)


def makedirs(p) -> None:
  """A local directory and its parents; nothing for a URL (object stores have no directories)."""
  if not is_url(p):
    os.makedirs(p, exist_ok=True)


def check_writable(directory) -> None:
  """Writes and removes a small object in the URL `directory`; OSError naming the URL when that
  fails (no such bucket, no permission, no credentials). Local directories are left to makedirs.

  Run before any compute: without it a missing bucket shows at the first checkpoint.
  """
  if not is_url(directory):
    return
  probe = path(directory) / f".write_check.{uuid.uuid4().hex}"
  try:
    probe.write_bytes(b"")
    probe.unlink()
  except Exception as e:  # gcsfs raises FileNotFoundError, OSError (403) or its HttpError (401)
    first = str(e).strip().splitlines()
    why = "the bucket does not exist" if isinstance(e, FileNotFoundError) else (
        " ".join(l.strip() for l in first if l.strip()) or type(e).__name__)
    raise OSError(f"{directory}: cannot write there ({why}); check the bucket name and that "
                  "this machine's credentials may create objects in it") from e
