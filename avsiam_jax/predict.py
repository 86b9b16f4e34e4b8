"""Classifies media files with a finetuned AVSiam run.

  python -m avsiam_jax.predict --checkpoint WORKDIR_OR_STEP_DIR [--top_k 5] VIDEO...

--checkpoint is a finetuning run directory (its latest checkpoint) or one of its step
directories, WORKDIR/checkpoints/<step>. Per file it prints the modality used (audio-visual;
visual-only when the file has no usable audio; audio-only when it has no video) and the top
classes with their scores (sigmoid for a multi-label run, softmax for a single-label one).
A file that cannot be used gets one error line (file and reason) on stderr; the others are
still classified. Exit status: 0, 1 if any file failed, 2 if the checkpoint cannot be used.
"""
from __future__ import annotations

import argparse
import sys

from avsiam_jax import checkpoint, inference, utils
from avsiam_jax.data import media


@utils.cli_errors(checkpoint.CheckpointError)
def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m avsiam_jax.predict", description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--checkpoint", required=True, help="WORKDIR or WORKDIR/checkpoints/<step>")
  parser.add_argument("--top_k", type=int, default=5, help="classes printed per file")
  parser.add_argument("videos", nargs="+", metavar="VIDEO")
  args = parser.parse_args(argv)
  predictor = inference.Predictor.load(args.checkpoint)
  failed = 0
  for path in args.videos:
    try:
      p = predictor.predict(path, top_k=args.top_k)
    except media.ClipError as e:
      print(f"error: {e}", file=sys.stderr, flush=True)
      failed += 1
      continue
    print(f"{path}: {p.modality}" + (f" ({p.reason})" if p.reason else ""))
    for name, score in p.top:
      print(f"  {score:.4f}  {name}")
    sys.stdout.flush()
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
