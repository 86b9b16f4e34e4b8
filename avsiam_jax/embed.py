"""Embeds media files with the encoder of any AVSiam run (pretraining or finetuning).

  python -m avsiam_jax.embed --checkpoint WORKDIR_OR_STEP_DIR --out FILE.npz VIDEO_OR_DIR...

Directories are searched recursively for video files (by extension), in sorted order; files
named directly are taken whatever their extension. Embeddings are those of the zero-shot
retrieval eval: mean-pooled encoder tokens of the audio, and of the middle frame.

FILE.npz holds, for the N embedded files in input order:
  paths (N,) str; audio, video (N, D) float32, zeros where the file lacks that modality;
  has_audio, has_video (N,) bool; skipped (K, 2) str: [file, "reason: detail"] per file
  not used.
Skipped files are also reported on stderr. Exit status: 0; 1 if any file was skipped (FILE.npz
still holds the others) or none was found; 2 if the checkpoint cannot be used.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from avsiam_jax import checkpoint, inference, utils
from avsiam_jax import paths as run_paths
from avsiam_jax.data import media

VIDEO_EXTENSIONS = frozenset(
    ".3g2 .3gp .asf .avi .f4v .flv .gif .m1v .m2v .m2ts .m4v .mkv .mov .mp4 .mpeg .mpg .mts "
    ".mxf .ogv .rm .rmvb .ts .vob .webm .wmv".split())


def find_videos(inputs) -> list[str]:
  """Files named directly, and the video files under each directory (recursive, sorted)."""
  out = []
  for item in inputs:
    if not os.path.isdir(item):
      out.append(item)
      continue
    found = []
    for root, dirs, files in os.walk(item):
      dirs[:] = [d for d in dirs if not d.startswith(".")]
      found += [os.path.join(root, f) for f in files if not f.startswith(".")
                and os.path.splitext(f)[1].lower() in VIDEO_EXTENSIONS]
    out += sorted(found)
  return out


@utils.cli_errors(checkpoint.CheckpointError)
def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m avsiam_jax.embed", description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--checkpoint", required=True, help="WORKDIR or WORKDIR/checkpoints/<step>")
  parser.add_argument("--out", required=True, help="output .npz file")
  parser.add_argument("inputs", nargs="+", metavar="VIDEO_OR_DIR")
  args = parser.parse_args(argv)
  # Found before the files are embedded, not after.
  out_dir = os.path.dirname(run_paths.absolute(args.out))
  if not run_paths.is_url(out_dir) and not os.path.isdir(out_dir):
    parser.error(f"--out {args.out}: no folder {out_dir}")
  try:
    run_paths.check_writable(out_dir)  # a gs:// --out
  except OSError as e:
    parser.error(f"--out {e}")
  embedder = inference.Embedder.load(args.checkpoint)
  paths = find_videos(args.inputs)
  d = embedder.dim
  kept, audio, video, has_audio, has_video, skipped = [], [], [], [], [], []
  for path in paths:
    try:
      a, v = embedder.embed(path)
    except media.ClipError as e:
      print(f"skipped: {e}", file=sys.stderr, flush=True)
      skipped.append((path, f"{e.reason}: {e.detail}" if e.detail else e.reason))
      continue
    kept.append(path)
    has_audio.append(a is not None)
    has_video.append(v is not None)
    audio.append(np.zeros(d, np.float32) if a is None else a)
    video.append(np.zeros(d, np.float32) if v is None else v)
  n = len(kept)
  # A file object: np.savez would add ".npz" to the name. A local file or a gs:// object.
  with run_paths.path(args.out).open("wb") as f:
    np.savez(f, paths=np.array(kept, dtype=str),
             audio=np.stack(audio) if n else np.zeros((0, d), np.float32),
             video=np.stack(video) if n else np.zeros((0, d), np.float32),
             has_audio=np.array(has_audio, bool), has_video=np.array(has_video, bool),
             skipped=np.array(skipped, dtype=str).reshape(-1, 2))
  print(f"{n} of {len(paths)} files embedded, {len(skipped)} skipped -> {args.out}",
        file=sys.stderr)
  return 1 if skipped or not n else 0


if __name__ == "__main__":
  sys.exit(main())
