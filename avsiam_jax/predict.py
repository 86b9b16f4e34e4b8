"""Classifies media files with a finetuned AVSiam run, whole files in windows.

  python -m avsiam_jax.predict --checkpoint WORKDIR_OR_STEP_DIR [--top_k 5]
      [--window 10] [--hop 10] VIDEO...

--checkpoint is a finetuning run directory (its latest checkpoint) or one of its step
directories, WORKDIR/checkpoints/<step> (WORKDIR/best: the epoch eval.every_epoch selected).
Each file is read whole, in windows of --window seconds (1 to 10; default 10, the clip length
the model was trained on) every --hop seconds (default: the window), the last one shorter;
each window is scored as a clip of its own. Per file it prints the modality used
(audio-visual; visual-only where the file has no usable audio; audio-only where it has no
video) and the top classes of the whole file (the mean of the windows' scores: sigmoid for a
multi-label run, softmax for a single-label one), then, for a file of several windows, each
window's time span, modality and top classes.
A file that cannot be used gets one error line (file and reason) on stderr; the others are
still classified. Exit status: 0, 1 if any file failed, 2 if the checkpoint or the arguments
cannot be used.
"""
from __future__ import annotations

import argparse
import sys

from avsiam_jax import checkpoint, inference, utils
from avsiam_jax.data import clips, media


def _span(w) -> str:
  return f"[{w.start:g}-{w.start + w.seconds:.4g} s]"


def add_window_flags(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--window", type=float, default=None,
                      help=f"seconds per window, 1 to {inference.WINDOW:g} (default "
                      f"{inference.WINDOW:g}: the model's clip length)")
  parser.add_argument("--hop", type=float, default=None,
                      help="seconds from one window's start to the next (default: the window)")


def window_flags(parser: argparse.ArgumentParser, args) -> tuple[float, float]:
  try:
    return inference.check_window(args.window, args.hop)
  except ValueError as e:
    parser.error(f"--window/--hop: {e}")


@utils.cli_errors(checkpoint.CheckpointError)
def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m avsiam_jax.predict", description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--checkpoint", required=True, help="WORKDIR or WORKDIR/checkpoints/<step>")
  parser.add_argument("--top_k", type=int, default=5, help="classes printed per file and window")
  add_window_flags(parser)
  parser.add_argument("videos", nargs="+", metavar="VIDEO")
  args = parser.parse_args(argv)
  window, hop = window_flags(parser, args)
  predictor = inference.Predictor.load(args.checkpoint)
  failed = 0
  for path in args.videos:
    try:
      p = predictor.predict(path, top_k=args.top_k, window=window, hop=hop)
    except media.ClipError as e:
      print(f"error: {e}", file=sys.stderr, flush=True)
      failed += 1
      continue
    several = len(p.windows) > 1
    print(f"{path}: {p.modality}" + (f" ({p.reason})" if p.reason else "")
          + (f"; {len(p.windows)} windows of {window:g} s every {hop:g} s, the whole file:"
             if several else ""))
    for name, score in p.top:
      print(f"  {score:.4f}  {name}")
    for w in p.windows if several else ():
      print(f"  {_span(w)} "
            + ("not scored" if w.modality == clips.NONE else w.modality)
            + (f" ({w.reason})" if w.reason else ""))
      for name, score in w.top:
        print(f"    {score:.4f}  {name}")
    sys.stdout.flush()
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
