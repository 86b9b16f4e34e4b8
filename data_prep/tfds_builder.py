"""TFDS dataset builders for AudioSet and VGGSound from CAV-MAE dataset JSONs and raw videos.

The same clips, features and metadata as `python -m data_prep.build` (the clip -> example code
and the input parsing are data_prep.build's), written by TFDS's own builder machinery into
DATA_DIR/<name>/<config>/1.0.0, which the trainer reads as `--config.data.dir`.

manual_dir holds the label CSV and one CAV-MAE JSON per split (relative paths inside a JSON
are relative to manual_dir); a split whose JSON is absent is not built:
  audioset_clips:  class_labels_indices.csv, train.json, eval.json
  vggsound_clips:  class_labels_indices.csv, train.json, test.json
Configs: `crop` (default) and `squash`, the frame resize of data_prep.build's --frame_resize.

  python -m data_prep.tfds_builder audioset_clips --manual_dir M --data_dir D [--workers 8]
  # or, where TensorFlow is installed (TFDS's CLI imports it):
  tfds build audioset_clips --imports data_prep.tfds_builder --manual_dir M --data_dir D

Without TensorFlow the Python API builds it too: `AudiosetClips(data_dir=D, workers=8)
.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=M))`.
Clips that cannot be used are skipped as in data_prep.build (never a placeholder) and listed
with their reasons in metadata.json (avsiam/splits/<split>/skipped).
"""
from __future__ import annotations

import argparse
import contextlib
from concurrent import futures
import multiprocessing
import os
import sys

import tensorflow_datasets as tfds

from avsiam_jax.data import records
from data_prep import build

LABELS_FILE = "class_labels_indices.csv"
_MANUAL = __doc__.split("\n\n")[1]  # the manual_dir paragraph above


class _CavMaeClips(tfds.core.GeneratorBasedBuilder):
  """Clips of CAV-MAE dataset JSONs: frames, fbank, labels (avsiam_jax/data/records.py)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Records of data_prep.build's format 2."}
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=r, description=f"frames made square by {r}")
                     for r in records.FRAME_RESIZES]
  DEFAULT_CONFIG_NAME = "crop"
  SPLIT_FILES: dict[str, str] = {}
  MANUAL_DOWNLOAD_INSTRUCTIONS = _MANUAL
  # TFDS looks a builder's file up through importlib_resources, which it does not install on
  # Python >= 3.9; this module's path is the same answer.
  code_path = tfds.core.Path(__file__)

  def __init__(self, *, workers: int = 1, max_frames: int = records.MAX_FBANK_FRAMES, **kwargs):
    self._workers, self._max_frames = workers, max_frames
    kwargs.setdefault("file_format", records.FILE_FORMAT)  # TFDS's default, TFRecord, needs TF
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    # Class names come from manual_dir's CSV, read in _split_generators.
    return tfds.core.DatasetInfo(builder=self, description=records.DESCRIPTION,
                                 features=records.features(None),
                                 metadata=tfds.core.MetadataDict(), disable_shuffling=True)

  def _split_generators(self, dl_manager):
    manual = os.fspath(dl_manager.manual_dir)
    csv_path = os.path.join(manual, LABELS_FILE)
    label_ids, label_names = build.read_label_csv(csv_path)
    self.info.features["labels"].feature.names = label_ids
    self.info.metadata[records.METADATA_KEY] = records.metadata(dict(
        label_ids=label_ids, label_names=label_names, splits={},
        **records.format_info(self._max_frames, self.builder_config.name)))
    present = {s: os.path.join(manual, f) for s, f in self.SPLIT_FILES.items()
               if os.path.exists(os.path.join(manual, f))}
    if not present:
      raise FileNotFoundError(f"{manual}: none of {sorted(self.SPLIT_FILES.values())}")
    return {s: self._generate_examples(s, path, csv_path) for s, path in present.items()}

  def _generate_examples(self, split, json_path, csv_path):
    entries, _, _ = build.load_input(json_path, csv_path)
    meta = self.info.metadata[records.METADATA_KEY]
    labels, skipped = [], []
    with contextlib.ExitStack() as stack:
      pool = None
      if self._workers > 1:
        pool = stack.enter_context(futures.ProcessPoolExecutor(
            self._workers, mp_context=multiprocessing.get_context("spawn")))
      # data_prep.build's ordered, bounded decoding of the clips.
      results = build._results(  # pylint: disable=protected-access
          entries, self._max_frames, pool, 4 * self._workers, self.builder_config.name)
      for key, (status, payload) in enumerate(results):
        if status == "error":
          raise RuntimeError(payload)
        if status == "skip":
          skipped.append(payload)
          continue
        labels.append(payload["labels"].tolist())
        # Integer keys in input order: with disable_shuffling, the record order.
        yield key, records.tfds_example(payload)
    meta["splits"][split] = {"num_skipped": len(skipped), "example_labels": labels,
                             "skipped": skipped}


class AudiosetClips(_CavMaeClips):
  """AudioSet (AS-20K, AS-2M) clips from CAV-MAE JSONs."""

  SPLIT_FILES = {"train": "train.json", "eval": "eval.json"}


class VggsoundClips(_CavMaeClips):
  """VGGSound clips from CAV-MAE JSONs."""

  SPLIT_FILES = {"train": "train.json", "test": "test.json"}


BUILDERS = {"audioset_clips": AudiosetClips, "vggsound_clips": VggsoundClips}


def prepare(name: str, manual_dir: str, data_dir: str, config: str = "crop", workers: int = 1):
  """Builds dataset `name` (a BUILDERS key); returns its directory (the trainer's data.dir)."""
  builder = BUILDERS[name](config=config, data_dir=data_dir, workers=workers)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return os.fspath(builder.data_dir)


def main(argv=None):
  p = argparse.ArgumentParser(prog="python -m data_prep.tfds_builder",
                              description=__doc__.splitlines()[0])
  p.add_argument("name", choices=sorted(BUILDERS))
  p.add_argument("--manual_dir", required=True)
  p.add_argument("--data_dir", required=True)
  p.add_argument("--config", choices=records.FRAME_RESIZES, default="crop")
  p.add_argument("--workers", type=int, default=1)
  args = p.parse_args(argv)
  try:
    path = prepare(args.name, args.manual_dir, args.data_dir, args.config, args.workers)
  except (build.InputError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"{path}: open it with tfds.builder_from_directory({path!r})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
