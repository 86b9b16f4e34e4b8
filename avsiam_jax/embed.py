"""Embeds media files with the encoder of any AVSiam run (pretraining or finetuning).

  python -m avsiam_jax.embed --checkpoint WORKDIR_OR_STEP_DIR --out FILE.npz
      [--window 10] [--hop 10] VIDEO_OR_DIR...

Directories are searched recursively for video files (by extension), in sorted order; files
named directly are taken whatever their extension. Each file is read whole, in windows of
--window seconds (1 to 10; default 10, the model's clip length) every --hop seconds (default:
the window), the last one shorter. A window's embeddings are those of the zero-shot retrieval
eval: mean-pooled encoder tokens of its audio, and of its middle frame; a file's are the mean
over its windows.

FILE.npz holds, for the N embedded files in input order and their M windows in file order:
  paths (N,) str; audio, video (N, D) float32, the mean over the file's windows, zeros where
  the file lacks that modality; has_audio, has_video (N,) bool;
  window_file (M,) int32, the index of the window's file in paths; window_start,
  window_seconds (M,) float32, its start and length in seconds; window_audio, window_video
  (M, D) float32, zeros where the window lacks that modality; window_has_audio,
  window_has_video (M,) bool;
  skipped (K, 2) str: [file, "reason: detail"] per file not used.
Skipped files are also reported on stderr. Exit status: 0; 1 if any file was skipped (FILE.npz
still holds the others) or none was found; 2 if the checkpoint cannot be used.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from avsiam_jax import checkpoint, inference, predict, utils
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
  predict.add_window_flags(parser)
  parser.add_argument("inputs", nargs="+", metavar="VIDEO_OR_DIR")
  args = parser.parse_args(argv)
  window, hop = predict.window_flags(parser, args)
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
  zeros = np.zeros(d, np.float32)
  kept, files, windows, skipped = [], [], [], []
  for path in paths:
    try:
      ws = embedder.embed_windows(path, window, hop)
    except media.ClipError as e:
      print(f"skipped: {e}", file=sys.stderr, flush=True)
      skipped.append((path, f"{e.reason}: {e.detail}" if e.detail else e.reason))
      continue
    files.append(inference.file_embedding(ws))
    windows += [(len(kept), w) for w in ws]
    kept.append(path)
  n = len(kept)

  def rows(vectors):
    return np.stack([zeros if x is None else x for x in vectors]) if vectors else np.zeros(
        (0, d), np.float32)

  # A file object: np.savez would add ".npz" to the name. A local file or a gs:// object.
  with run_paths.path(args.out).open("wb") as f:
    np.savez(f, paths=np.array(kept, dtype=str),
             audio=rows([a for a, _ in files]), video=rows([v for _, v in files]),
             has_audio=np.array([a is not None for a, _ in files], bool),
             has_video=np.array([v is not None for _, v in files], bool),
             window_file=np.array([i for i, _ in windows], np.int32),
             window_start=np.array([w.start for _, w in windows], np.float32),
             window_seconds=np.array([w.seconds for _, w in windows], np.float32),
             window_audio=rows([w.audio for _, w in windows]),
             window_video=rows([w.video for _, w in windows]),
             window_has_audio=np.array([w.audio is not None for _, w in windows], bool),
             window_has_video=np.array([w.video is not None for _, w in windows], bool),
             skipped=np.array(skipped, dtype=str).reshape(-1, 2))
  print(f"{n} of {len(paths)} files embedded, {len(skipped)} skipped -> {args.out}",
        file=sys.stderr)
  return 1 if skipped or not n else 0


if __name__ == "__main__":
  sys.exit(main())
