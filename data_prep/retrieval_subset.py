"""Writes a retrieval subset of a built dataset's split (avsiam_jax/data/subsets.py).

  python -m data_prep.retrieval_subset --dataset DATASET_DIR --split eval --name as_eval_5pc
  python -m data_prep.retrieval_subset --dataset DATASET_DIR --split eval --name given \
      --ids ids.txt                     # one clip id per line, e.g. CAV-MAE's list

Then evaluate with --config.eval.retrieval_subset=NAME.
"""
from __future__ import annotations

import argparse
import sys

from avsiam_jax import utils
from avsiam_jax.data import subsets


@utils.cli_errors(ValueError, FileNotFoundError)
def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m data_prep.retrieval_subset",
                              description=__doc__.splitlines()[0])
  p.add_argument("--dataset", required=True, help="a directory written by data_prep.build")
  p.add_argument("--split", default="eval")
  p.add_argument("--name", required=True, help="the subset's name (its file name)")
  p.add_argument("--per_class", type=int, default=5, help="clips per class (no --ids)")
  p.add_argument("--ids", help="a text file of clip ids, one per line, instead of per_class")
  args = p.parse_args(argv)
  ids = None
  if args.ids:
    with open(args.ids) as f:
      ids = [line.strip() for line in f if line.strip()]
  subset = subsets.build(args.dataset, args.split, args.name, k=args.per_class, ids=ids)
  print(f"{subsets.path(args.dataset, args.name)}: {subset['num_clips']} clips of split "
        f"{args.split!r} ({subset['rule']})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
