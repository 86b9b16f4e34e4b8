"""Writes a retrieval subset of a built dataset's split (avsiam_jax/data/subsets.py).

  python -m data_prep.retrieval_subset --dataset DATASET_DIR --split eval --name as_eval_5pc
  python -m data_prep.retrieval_subset --dataset DATASET_DIR --split eval --name cavmae \
      --ids audioset_eval_5_per_class_for_retrieval_cleaned.json   # CAV-MAE's list
  python -m data_prep.retrieval_subset --dataset DATASET_DIR --split eval --name given \
      --ids ids.txt                                                 # one clip id a line

--ids takes a CAV-MAE dataset JSON (its data[].video_id) or a text file of ids; listed ids the
split lacks are left out and counted. Then evaluate with --config.eval.retrieval_subset=NAME.
"""
from __future__ import annotations

import argparse
import sys

from avsiam_jax import utils
from avsiam_jax.data import subsets


@utils.cli_errors(ValueError, FileNotFoundError)
def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m data_prep.retrieval_subset",
                              description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--dataset", required=True, help="a directory written by data_prep.build")
  p.add_argument("--split", default="eval")
  p.add_argument("--name", required=True, help="the subset's name (its file name)")
  p.add_argument("--per_class", type=int, default=5, help="clips per class (no --ids)")
  p.add_argument("--ids", help="a CAV-MAE dataset JSON or a text file of clip ids, one a line, "
                 "instead of per_class")
  args = p.parse_args(argv)
  subset = subsets.build(args.dataset, args.split, args.name, k=args.per_class,
                         list_path=args.ids)
  print(f"{subsets.path(args.dataset, args.name)}: {subset['num_clips']} clips of split "
        f"{args.split!r} ({subset['rule']})")
  listed = subset.get("listed")
  if listed and listed["missing"]:
    print(f"  {len(listed['missing'])} listed ids are not in the split (e.g. "
          f"{', '.join(listed['missing'][:3])}); all of them are in the subset file's "
          "listed.missing", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
