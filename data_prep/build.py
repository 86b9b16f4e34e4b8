"""Builds an AVSiam dataset (a TFDS-format ArrayRecord dataset) from raw media.

  python -m data_prep.build --input JSON_OR_DIR [--labels CSV] --out DATASET_DIR
      [--split train] [--num_shards N] [--workers W]
      [--process_index I --process_count P] [--max_frames 1024] [--frame_resize crop]
      [--downmix mean] [--frame_span first] [--split_list LIST ...] [--finalize]

Inputs
  * A CAV-MAE dataset JSON, {"data": [{"video_id", "wav", "video_path", "labels"}]}, with
    --labels the label CSV `index,mid,display_name` (required: it fixes the class indices).
    "labels" is "mid1,mid2". "video_path" is a video file, or a CAV-MAE frame folder holding
    video_path/frame_{0..9}/<video_id>.jpg. "wav" is an audio file; when it is empty or equal
    to "video_path" the audio comes from the video file. Relative paths are relative to the
    JSON's folder.
  * A folder of videos (any container FFmpeg reads; hidden files and .csv/.json/.txt/.md
    are ignored), searched recursively. A clip's id is its path relative to the folder
    without the extension ("a.mp4" -> "a", "sub/b.webm" -> "sub/b"). --labels, optional, is
    a CSV of `file,labels` rows, header `file,labels` optional (another header, such as
    `video_id,labels`, is refused):
        file,labels
        a.mp4,dog
        sub/b.webm,"dog,bark"
        c,
    `file` is a path relative to the folder, or a clip id (file name without extension);
    `labels` holds label strings separated by ',' (quote the field), possibly none. With the
    CSV, exactly its rows are built, in its order; without it, every file, with no labels. The
    vocabulary is the sorted set of label strings of the CSV (names = ids = the strings); when
    the dataset already has a split, an existing vocabulary that contains them all is reused.
  * A folder of videos and --split_list LIST [LIST ...]: exactly the listed clips, in list
    order, without labels (MSR-VTT: videos/all/video0.mp4 ... video9999.mp4). A LIST is
    MSR-VTT's videodatainfo JSON (train_val_videodatainfo.json, test_videodatainfo.json:
    {"videos": [{"video_id": "video7010", "split": "test", ...}]}), of which the videos whose
    "split" is --split (train, validate or test) are taken; give both files at once for any
    split. Or it is a text file of clip ids, one a line (blank lines and '#' comments skipped),
    for the other splits in use (the 9k train list, the 1k-A JSFusion test list), all taken.
    A listed id is a clip id of the folder (file name without extension), also found in a
    subfolder (TrainValVideo/video0.mp4); a listed clip without a file, or without a sound
    track, is skipped and reported. report.json's `listed` gives the lists and how many clips
    they name (num_listed) and how many were built (num_built); metadata.json keeps the count.
    MSR-VTT's 2,990-video test split:
        python -m data_prep.build --input MSRVTT/videos/all --out /data/msrvtt --split test \
            --split_list train_val_videodatainfo.json test_videodatainfo.json --workers 16

Per clip (avsiam_jax/data/examples.py, the record layout of avsiam_jax/data/records.py): 10
frames (JPEG; --frame_resize crop, the default: short side resized to 224 then centre crop, as
CAV-MAE; squash: the whole frame resized to 224 x 224, bicubic, as the released AVSiam code)
sampled from the first 10 s of the video (--frame_span first, the default: frame
int(i * total / 10)) or from the whole video (whole: np.linspace(0, total - 1, 10), the released
AVSiam loader's rule without its random offset), the kaldi fbank of the first 10 s of 16 kHz
mono audio as float16 (T <= max_frames, 128), unpadded, and int32 labels. Audio of several
channels becomes mono by --downmix: mean (the default: the mean of the channels, as the
released AVSiam loader) or first (the first channel, as CAV-MAE's `sox remix 1`). Every split
of a dataset has the same max_frames, frame_resize, downmix and frame_span.

Output in DATASET_DIR, a dataset `tfds.builder_from_directory(DATASET_DIR)` opens without
TensorFlow: <name>-<split>.array_record-iiiii-of-nnnnn shards of tf.train.Examples; TFDS's
dataset_info.json (shard lengths) and features.json; metadata.json with this project's
label_names, label_ids, fbank (downmix among them) and frames (resize, span) settings, and per
split num_skipped and example_labels (every record's classes, in record order); report.json
with, per split, the counts, the downmix and frame_span, and every skipped clip as {id, path,
reason, message}. <name> is the folder's name, or NAME for a folder DATA_DIR/NAME/X.Y.Z (then
`tfds.data_source("NAME", data_dir=DATA_DIR)` finds it). A folder of the earlier format (msgpack records) is refused: convert it first with
`python -m data_prep.convert --dataset DATASET_DIR`.

Bad input: each case has one rule, and a skipped clip is never written as a placeholder.
  * a malformed JSON/CSV (or a vocabulary that differs from the dataset's) stops the build
    before any work, with the file, line/entry and field in the error;
  * clips skipped and reported (report.json) with a reason: the media.py codes
    (missing_file, unreadable, no_audio, no_video, silent_audio, audio_too_short, no_frames),
    'unknown_label' (a mid missing from the label CSV), 'duplicate_id' (a later entry with an
    id already seen: the first entry is kept, whatever becomes of it), 'ambiguous_file' (a
    folder-CSV id that matches several files);
  * any other error in a clip stops the build, naming the clip (finished shards are kept).

Several processes/hosts: shard i covers a contiguous index range of the clip list; process I
of P builds the shards with i % P == I. Every process must be given the same input, split,
num_shards, max_frames, frame_resize, downmix and frame_span (checked against
.build/<split>/plan.json).

Resume: a shard whose final file exists is kept; a leftover `.tmp` is redone. Each shard has a
report part, .build/<split>/<shard>.report.json, written before the shard file appears.

Finalize rule: whichever process finds, after its own shards, that all shards of the split
exist writes dataset_info.json and report.json (under a file lock). `--finalize` does only that
step (e.g. after the last host died having written its shards); it fails if a shard is missing.
"""
from __future__ import annotations

import argparse
import collections
from concurrent import futures
import contextlib
import csv
import dataclasses
import fcntl
import glob
import hashlib
import json
import math
import multiprocessing
import os
import re
import sys
import time
import traceback

from avsiam_jax import utils  # standard library only: numpy is not loaded yet

if __name__ == "__main__":
  # CLI only, before numpy loads: fbank's small matmul gains nothing from BLAS threads, and
  # their spinning next to FFmpeg's decode threads halved clips/s on a 2-core machine.
  for _k in utils.BLAS_THREAD_VARS:
    os.environ.setdefault(_k, "1")

# The record format and how one clip becomes a record live in the package; this script plans,
# runs and reports the build.
from avsiam_jax.data import examples, media, records  # pylint: disable=wrong-import-position

CLIPS_PER_SHARD = 1000  # default shard size
REPORT_FILE = "report.json"
STATE_DIR = ".build"
# Extensions never treated as media in a folder input (label lists, notes).
_NOT_MEDIA = {".csv", ".json", ".txt", ".md", ".tmp", ".part"}
_SPLIT_RE = re.compile(r"^[A-Za-z0-9_]+$")
# Column names of other datasets' CSVs: a first row holding one is a header, not a clip.
_HEADER_NAMES = {"file", "files", "filename", "file_name", "path", "video", "video_id",
                 "video_path", "id", "clip", "clip_id", "ytid", "youtube_id", "name", "label",
                 "labels", "class", "classes", "mid", "mids", "positive_labels"}


class InputError(ValueError):
  """Malformed input or settings; raised before any clip is decoded."""


@dataclasses.dataclass
class Entry:
  id: str
  video: str | None  # video file, or frame folder when frame_dir
  audio: str | None  # separate audio file; None: the video file's audio
  frame_dir: bool
  labels: list[int]
  skip: dict | None = None  # set at planning time: {id, path, reason, message}


def _skip(entry_id, path, reason, message):
  return {"id": entry_id, "path": path, "reason": reason, "message": message}


# ---------------------------------------------------------------- input parsing


def read_label_csv(path):
  """CAV-MAE label CSV -> (mids, display names), ordered by index."""
  try:
    f = open(path, newline="", encoding="utf-8")
  except OSError as e:
    raise InputError(f"{path}: cannot read label CSV: {e}") from None
  with f:
    reader = csv.DictReader(f)
    need = {"index", "mid", "display_name"}
    if reader.fieldnames is None or not need <= {h.strip() for h in reader.fieldnames}:
      raise InputError(f"{path}: label CSV needs the header index,mid,display_name; "
                       f"got {reader.fieldnames}")
    rows = {}
    mids = set()
    for row in reader:
      row = {k.strip(): (v or "").strip() for k, v in row.items() if k is not None}
      line = reader.line_num
      try:
        index = int(row["index"])
      except ValueError:
        raise InputError(f"{path}, line {line}: field 'index' is not an integer: "
                         f"{row['index']!r}") from None
      if not row["mid"]:
        raise InputError(f"{path}, line {line}: field 'mid' is empty")
      if index in rows:
        raise InputError(f"{path}, line {line}: field 'index' {index} repeated")
      if row["mid"] in mids:
        raise InputError(f"{path}, line {line}: field 'mid' {row['mid']!r} repeated")
      mids.add(row["mid"])
      rows[index] = (row["mid"], row["display_name"])
  if not rows:
    raise InputError(f"{path}: label CSV has no rows")
  if sorted(rows) != list(range(len(rows))):
    raise InputError(f"{path}: field 'index' must run 0..{len(rows) - 1} without gaps")
  return [rows[i][0] for i in range(len(rows))], [rows[i][1] for i in range(len(rows))]


def _read_cavmae_json(path, labels_csv):
  if labels_csv is None:
    raise InputError(f"{path}: a CAV-MAE JSON needs --labels, the label CSV "
                     "(index,mid,display_name) that fixes the class indices")
  label_ids, label_names = read_label_csv(labels_csv)
  try:
    with open(path, encoding="utf-8") as f:
      doc = json.load(f)
  except (OSError, ValueError) as e:
    raise InputError(f"{path}: cannot read dataset JSON: {e}") from None
  if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
    raise InputError(f"{path}: field 'data' (a list of clips) missing at the top level")
  base = os.path.dirname(os.path.abspath(path))
  index = {mid: i for i, mid in enumerate(label_ids)}
  entries, seen = [], set()
  for n, item in enumerate(doc["data"]):
    if not isinstance(item, dict):
      raise InputError(f"{path}: data[{n}] is not an object")
    for key in ("video_id", "wav", "video_path", "labels"):
      if not isinstance(item.get(key), str):
        raise InputError(f"{path}: data[{n}] field {key!r} missing or not a string")
    vid = item["video_id"].strip()
    if not vid:
      raise InputError(f"{path}: data[{n}] field 'video_id' is empty")
    video = os.path.join(base, item["video_path"]) if item["video_path"] else None
    if video is None:
      raise InputError(f"{path}: data[{n}] field 'video_path' is empty")
    audio = os.path.join(base, item["wav"]) if item["wav"] else None
    if audio is not None and os.path.normpath(audio) == os.path.normpath(video):
      audio = None
    # A frame folder ends with a separator (the CAV-MAE JSONs) or is an existing folder.
    frame_dir = item["video_path"].endswith(("/", os.sep)) or os.path.isdir(video)
    mids = [m.strip() for m in item["labels"].split(",") if m.strip()]
    entry = Entry(vid, video, audio, frame_dir, [])
    unknown = [m for m in mids if m not in index]
    if vid in seen:
      entry.skip = _skip(vid, video, "duplicate_id", f"data[{n}]: id seen in an earlier entry")
    elif unknown:
      entry.skip = _skip(vid, video, "unknown_label",
                         f"data[{n}]: labels not in {labels_csv}: {','.join(unknown)}")
    else:
      entry.labels = sorted({index[m] for m in mids})
    seen.add(vid)
    entries.append(entry)
  return entries, label_ids, label_names


def _scan_folder(folder):
  """Relative paths of candidate media files, sorted."""
  found = []
  for root, dirs, files in os.walk(folder):
    dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    for name in files:
      if name.startswith(".") or os.path.splitext(name)[1].lower() in _NOT_MEDIA:
        continue
      found.append(os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/"))
  return sorted(found)


def _clip_id(rel):
  return os.path.splitext(rel)[0]


def _column_name(cell):
  return cell.strip().lstrip("#").strip().lower().replace(" ", "_").replace("-", "_")


def _read_folder_csv(path, names_a_clip):
  """`file,labels` rows -> [(line, file, [labels])].

  The header is optional; a first row that names no clip (`names_a_clip(file)` is false) and
  holds a column name (video_id, label, ...) is another header, refused: read as a row, it
  would be a missing clip and its labels field a class.
  """
  try:
    f = open(path, newline="", encoding="utf-8")
  except OSError as e:
    raise InputError(f"{path}: cannot read labels CSV: {e}") from None
  rows = []
  with f:
    reader = csv.reader(f)
    for row in reader:
      line = reader.line_num
      if not row or all(not c.strip() for c in row):
        continue
      if not rows and [c.strip().lower() for c in row] == ["file", "labels"]:
        continue  # header
      if (not rows and not names_a_clip(row[0].strip())
          and any(_column_name(c) in _HEADER_NAMES for c in row)):
        raise InputError(f"{path}, line {line}: header {','.join(c.strip() for c in row)!r} "
                         "is not 'file,labels'; name the columns file,labels, or drop the "
                         "header (the first line is then a clip)")
      if len(row) == 1:
        row = row + [""]
      if len(row) != 2:
        raise InputError(f"{path}, line {line}: expected 2 fields file,labels, got {len(row)}; "
                         'quote a labels field that holds commas: a.mp4,"dog,bark"')
      file = row[0].strip()
      if not file:
        raise InputError(f"{path}, line {line}: field 'file' is empty")
      rows.append((line, file, sorted({x.strip() for x in row[1].split(",") if x.strip()})))
  if not rows:
    raise InputError(f"{path}: labels CSV has no rows")
  return rows


def _read_folder(folder, labels_csv, existing_vocab, listed=None):
  """Entries of a folder input: the CSV's rows, the `listed` clips ((where, id) pairs of
  read_split_list), or every file."""
  files = _scan_folder(folder)
  if listed is not None:
    rows = [(where, clip, []) for where, clip in listed]
  elif labels_csv is None:
    rows = [(folder, rel, []) for rel in files]
  else:
    ids = {_clip_id(rel) for rel in files}
    rows = [(f"{labels_csv}, line {line}", file, labels)
            for line, file, labels in _read_folder_csv(
                labels_csv, lambda file: file in ids or os.path.isfile(os.path.join(folder, file)))]
  vocab = sorted({label for _, _, labels in rows for label in labels})
  if existing_vocab is not None and set(vocab) <= set(existing_vocab):
    vocab = list(existing_vocab)  # keep the dataset's indices for a later split
  index = {label: i for i, label in enumerate(vocab)}
  by_id, by_stem = collections.defaultdict(list), collections.defaultdict(list)
  for rel in files:
    by_id[_clip_id(rel)].append(rel)
    by_stem[os.path.basename(_clip_id(rel))].append(rel)
  entries, seen = [], set()
  for where, file, labels in rows:
    rel, skip = file, None
    if not os.path.isfile(os.path.join(folder, file)):
      # A listed id may name a file in a subfolder (MSR-VTT's TrainValVideo/, TestVideo/).
      matches = by_id.get(file) or (by_stem.get(file, []) if listed is not None else [])
      if len(matches) == 1:
        rel = matches[0]
      elif matches:
        skip = ("ambiguous_file", f"{where}: {file!r} matches {', '.join(matches)}; "
                "name the file with its extension")
      else:
        skip = ("missing_file", f"{where}: no such file or clip id in {folder}")
    path = os.path.join(folder, rel)
    # A listed clip keeps the list's id (unless the list names a file), wherever its file is.
    named_file = os.path.isfile(os.path.join(folder, file))
    clip_id = _clip_id(rel) if listed is None or named_file else file
    entry = Entry(clip_id, path, None, False, sorted(index[x] for x in labels))
    if clip_id in seen:
      entry.skip = _skip(clip_id, path, "duplicate_id", f"{where}: id seen in an earlier entry")
    elif skip:
      entry.skip = _skip(clip_id, path, *skip)
    seen.add(clip_id)
    entries.append(entry)
  return entries, vocab, list(vocab)


def _read_videodatainfo(path, doc):
  """[(where, id, split)] of an MSR-VTT videodatainfo JSON's "videos"."""
  videos = doc.get("videos") if isinstance(doc, dict) else None
  if not isinstance(videos, list):
    raise InputError(f"{path}: field 'videos' (MSR-VTT's list of {{video_id, split}}) missing "
                     "at the top level")
  out = []
  for n, item in enumerate(videos):
    if not isinstance(item, dict):
      raise InputError(f"{path}: videos[{n}] is not an object")
    for key in ("video_id", "split"):
      if not isinstance(item.get(key), str) or not item[key].strip():
        raise InputError(f"{path}: videos[{n}] field {key!r} missing, empty or not a string")
    out.append((f"{path}, videos[{n}]", item["video_id"].strip(), item["split"].strip()))
  return out


def _read_id_list(path, text, names_a_clip):
  """[(where, id)] of a text list of clip ids, one a line."""
  out = []
  for n, line in enumerate(text.splitlines(), 1):
    clip = line.strip()
    if not clip or clip.startswith("#"):
      continue
    if "," in clip or "\t" in clip:
      raise InputError(f"{path}, line {n}: {clip[:60]!r} is not one clip id; a list holds one id "
                       "a line (from a CSV such as MSR-VTT's JSFusion list keep its video_id "
                       "column)")
    if not out and _column_name(clip) in _HEADER_NAMES and not names_a_clip(clip):
      raise InputError(f"{path}, line {n}: {clip!r} is a column name, not a clip id; drop the "
                       "header line")
    out.append((f"{path}, line {n}", clip))
  return out


def read_split_list(paths, split, names_a_clip=lambda clip: False):
  """The clips a split lists, in order, as (where, id) pairs.

  Each path is an MSR-VTT videodatainfo JSON ({"videos": [{"video_id", "split", ...}]}; its
  entries whose "split" is `split`) or a text file of clip ids, one a line (blank lines and
  '#' comments skipped). Several files give their clips in the order given; the JSONs together
  must give each video one split. `names_a_clip(id)` tells a first line that is a clip from a
  header.
  """
  listed, splits_of, counts, any_json = [], {}, collections.Counter(), False
  for path in paths:
    try:
      with open(path, encoding="utf-8") as f:
        text = f.read()
    except OSError as e:
      raise InputError(f"{path}: cannot read split list: {e}") from None
    if not text.lstrip().startswith(("{", "[")):
      listed += _read_id_list(path, text, names_a_clip)
      continue
    try:
      doc = json.loads(text)
    except ValueError as e:
      raise InputError(f"{path}: cannot read split list JSON: {e}") from None
    any_json = True
    for where, clip, clip_split in _read_videodatainfo(path, doc):
      if splits_of.setdefault(clip, (clip_split, where))[0] != clip_split:
        raise InputError(f"{where}: video {clip!r} is in split {clip_split!r}, but "
                         f"{splits_of[clip][1]} puts it in {splits_of[clip][0]!r}")
      counts[clip_split] += 1
      if clip_split == split:
        listed.append((where, clip))
  if any_json and not counts[split]:
    have = ", ".join(f"{name} ({n})" for name, n in sorted(counts.items()))
    raise InputError(f"--split {split!r}: {', '.join(paths)} list no video of that split; "
                     f"they have {have}")
  if not listed:
    raise InputError(f"{', '.join(paths)}: the split list holds no clip id")
  return listed


# ---------------------------------------------------------------- one clip (worker side)


def process_clip(entry: Entry, max_frames: int, frame_resize: str = "crop",
                 downmix: str = "mean", frame_span: str = "first"):
  """One clip -> ('ok', example) | ('skip', report row) | ('error', message)."""
  if entry.skip is not None:
    return "skip", entry.skip
  try:
    return "ok", examples.make_example(entry.id, entry.video, entry.audio,
                                       frame_dir=entry.frame_dir, labels=entry.labels,
                                       max_frames=max_frames, frame_resize=frame_resize,
                                       downmix=downmix, frame_span=frame_span)
  except media.ClipError as e:
    return "skip", _skip(entry.id, e.path, e.reason, e.detail or str(e))
  except Exception:  # a bug or an unforeseen failure: stop the build, naming the clip
    return "error", (f"clip {entry.id!r} ({entry.video}, audio {entry.audio}): "
                     f"unexpected error\n{traceback.format_exc()}")


# ---------------------------------------------------------------- files and state


def _read_json(path):
  with open(path) as f:
    return json.load(f)


def _state_dir(out, split):
  return os.path.join(out, STATE_DIR, split)


def _part_path(out, split, shard):
  return os.path.join(_state_dir(out, split), shard + ".report.json")


@contextlib.contextmanager
def _lock(out):
  # One finalize at a time when several processes end together.
  os.makedirs(os.path.join(out, STATE_DIR), exist_ok=True)
  with open(os.path.join(out, STATE_DIR, "lock"), "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _shard_ranges(n, num_shards):
  return [(i * n // num_shards, (i + 1) * n // num_shards) for i in range(num_shards)]


def _existing_info(out):
  path = os.path.join(out, records.INFO_FILE)
  if not os.path.exists(path):
    return None
  try:
    return records.read_info(out)
  except records.FormatError as e:  # e.g. the earlier format: names the convert command
    raise InputError(str(e)) from None


def _check_compatible(out, label_ids, label_names, max_frames, frame_resize, downmix="mean",
                      frame_span="first"):
  """A new split must share the dataset's vocabulary and settings."""
  info = _existing_info(out)
  if info is None:
    return
  where = os.path.join(out, records.METADATA_FILE)
  if list(info.get("label_ids", [])) != list(label_ids):
    old, new = set(info.get("label_ids", [])), set(label_ids)
    raise InputError(
        f"{where}: label vocabulary differs from this input's ({len(old)} vs "
        f"{len(label_ids)} labels; only in the dataset: {sorted(old - new)[:5]}, only in the "
        f"input: {sorted(new - old)[:5]}{'' if old != new else '; same labels, other order'})")
  if list(info.get("label_names", [])) != list(label_names):
    raise InputError(f"{where}: label names differ from this input's label CSV")
  built = info.get("fbank", {}).get("max_frames")
  if built != max_frames:
    raise InputError(f"{where}: built with max_frames={built}, this run asks {max_frames}")
  # A dataset_info.json without the entry predates the option: its frames were cropped.
  built = info.get("frames", {}).get("resize", "crop")
  if built != frame_resize:
    raise InputError(f"{where}: built with frame_resize={built!r}, this run asks "
                     f"{frame_resize!r}; a dataset's splits share one frame_resize")
  # No entry: built before the option, with the earlier down-mix, which no flag reproduces.
  built = info.get("fbank", {}).get("downmix")
  if built != downmix:
    said = (f"the earlier down-mix {records.EARLIER_DOWNMIX} (no fbank.downmix entry)"
            if built is None else f"downmix={built!r}")
    raise InputError(f"{where}: built with {said}, this run asks downmix={downmix!r}; a "
                     "dataset's splits share one downmix"
                     + ("" if built is not None else "; rebuild every split with "
                        f"`{records.REBUILD_COMMAND.format(dir=out)}`"))
  # No entry: built before the option, from the first 10 s.
  built = info.get("frames", {}).get("span", "first")
  if built != frame_span:
    raise InputError(f"{where}: built with frame_span={built!r}, this run asks "
                     f"{frame_span!r}; a dataset's splits share one frame_span")


def _plan_fingerprint(entries):
  h = hashlib.sha256()
  for e in entries:
    h.update(json.dumps(dataclasses.asdict(e), sort_keys=True).encode())
  return h.hexdigest()


def _read_plan(path):
  # A plan written before the frame_resize / frame_span options was a crop build of the first
  # 10 s; one without downmix used the earlier down-mix (None: no flag reproduces it).
  return dict({"frame_resize": "crop", "frame_span": "first", "downmix": None},
              **_read_json(path))


def _legacy_shards(out, split):
  return glob.glob(os.path.join(out, f"{split}-*-of-*.array_record"))


def _check_plan(out, split, plan):
  """Writes the plan, or checks that an earlier/parallel run used the same one."""
  os.makedirs(_state_dir(out, split), exist_ok=True)
  path = os.path.join(_state_dir(out, split), "plan.json")
  if os.path.exists(path):
    old = _read_plan(path)
    if "name" not in old:  # written by a build of the earlier (msgpack) format
      raise InputError(
          f"{out}: split {split!r} was started by a build of the earlier format ({path}); "
          f"delete its shards and {_state_dir(out, split)} to start over, or finish it with that "
          f"version and convert it with `{records.CONVERT_COMMAND.format(dir=out)}`")
    diff = [k for k in plan if old.get(k) != plan[k]]
    if diff:
      # Short settings with both values; lists and the fingerprint by name only.
      said = [f"{k} {old.get(k)!r} before, {plan[k]!r} now"
              if isinstance(plan[k], (int, str)) and k != "entries_sha256" else k for k in diff]
      raise InputError(
          f"{out}: split {split!r} was started with other settings ({'; '.join(said)}; see "
          f"{path}); finish it with the same input and flags, or delete its shards and "
          f"{_state_dir(out, split)} to start over")
  else:
    utils.write_json(path, plan, every_process=True)
  legacy = _legacy_shards(out, split)
  if legacy:
    raise InputError(f"{out}: {legacy[0]} is a shard of the earlier format; convert the "
                     f"dataset first: `{records.CONVERT_COMMAND.format(dir=out)}`")
  names = set(plan["shards"])
  pattern = f"{plan['name']}-{split}.{records.FILE_FORMAT}-*-of-*"
  stray = [p for p in glob.glob(os.path.join(out, pattern)) if os.path.basename(p) not in names
           and not p.endswith(".tmp")]
  if stray:
    raise InputError(f"{out}: {stray[0]} belongs to another build of split {split!r} "
                     f"(this one has {plan['num_shards']} shards); remove it first")


# ---------------------------------------------------------------- reports and finalize


def _merge_parts(parts):
  skipped = [row for p in parts for row in p["skipped"]]
  return {
      "num_examples": sum(p["num_examples"] for p in parts),
      "num_skipped": len(skipped),
      "skipped_by_reason": dict(sorted(collections.Counter(r["reason"] for r in skipped).items())),
      "skipped": skipped,
  }


def _listed(plan):
  return {"listed": dict(plan["listed"])} if "listed" in plan else {}


def _with_built(report):
  if "listed" in report:  # how many of the listed clips the split holds
    report["listed"]["num_built"] = report["num_examples"]
  return report


def _missing_shards(out, split, plan):
  return [s for s in plan["shards"]
          if not (os.path.exists(os.path.join(out, s)) and os.path.exists(_part_path(out, split, s)))]


def finalize(out, split="train", verbose=True):
  """Writes dataset_info.json and merges report.json once every shard of `split` exists.

  Returns the split's report, or None when shards are still missing.
  """
  plan_path = os.path.join(_state_dir(out, split), "plan.json")
  if not os.path.exists(plan_path):
    raise FileNotFoundError(f"{plan_path} not found: split {split!r} was never started in {out}")
  plan = _read_plan(plan_path)
  with _lock(out):
    if _missing_shards(out, split, plan):
      return None
    parts = [_read_json(_part_path(out, split, s)) for s in plan["shards"]]
    report = dict(_merge_parts(parts), input=plan["input"], num_shards=plan["num_shards"],
                  shards=plan["shards"], downmix=plan["downmix"], frame_span=plan["frame_span"],
                  **_listed(plan))
    _with_built(report)
    _check_compatible(out, plan["label_ids"], plan["label_names"], plan["max_frames"],
                      plan["frame_resize"], plan["downmix"], plan["frame_span"])
    info = _existing_info(out) or dict(name=plan["name"], version=plan["version"],
                                       label_names=plan["label_names"],
                                       label_ids=plan["label_ids"], splits={})
    # A plan without downmix (shards of an earlier build) leaves the entry out: readers warn.
    info.update(records.format_info(plan["max_frames"], plan["frame_resize"], plan["downmix"],
                                    plan["frame_span"]))
    # example_labels (record order): class-balanced sampling without reading every record.
    info["splits"][split] = {"num_examples": report["num_examples"], "shards": plan["shards"],
                             "shard_lengths": [p["num_examples"] for p in parts],
                             "num_skipped": report["num_skipped"],
                             "example_labels": [l for p in parts for l in p["example_labels"]]}
    if "listed" in plan:  # what the split's list asked for, next to what it holds
      info["splits"][split]["listed"] = {
          "files": [os.path.basename(f) for f in plan["listed"]["files"]],
          "num_listed": plan["listed"]["num_listed"]}
    report_path = os.path.join(out, REPORT_FILE)
    full = _read_json(report_path) if os.path.exists(report_path) else {"splits": {}}
    full["splits"][split] = report
    utils.write_json(report_path, full, every_process=True)
    records.write_info(out, info)
  if verbose:
    print(f"[{split}] finalized: {records.INFO_FILE} and {REPORT_FILE} written in {out}",
          flush=True)
  return dict(report, split=split, finalized=True)


# ---------------------------------------------------------------- build


class _Progress:
  def __init__(self, split, total, verbose):
    self.split, self.total, self.verbose = split, total, verbose
    self.done = self.written = 0
    self.start = self.last = time.time()

  def rate(self):
    return self.done / max(time.time() - self.start, 1e-9)

  def step(self, ok):
    self.done += 1
    self.written += ok
    now = time.time()
    if self.verbose and (now - self.last >= 5.0 or self.done == self.total):
      self.last = now
      print(f"[{self.split}] {self.done}/{self.total} clips, {self.written} written, "
            f"{self.done - self.written} skipped, {self.rate():.2f} clips/s", flush=True)


def _results(entries, max_frames, pool, window, frame_resize="crop", downmix="mean",
             frame_span="first"):
  """Results in order; at most `window` clips in flight so memory stays bounded."""
  settings = (max_frames, frame_resize, downmix, frame_span)
  if pool is None:
    for e in entries:
      yield process_clip(e, *settings)
    return
  pending = collections.deque()
  it = iter(entries)

  def submit():
    e = next(it, None)
    if e is not None:
      pending.append((e, pool.submit(process_clip, e, *settings)))

  for _ in range(window):
    submit()
  while pending:
    entry, future = pending.popleft()
    try:
      result = future.result()
    except futures.process.BrokenProcessPool:
      # A worker died (a decoder crash, out of memory) or could not start: fail, don't hang.
      ids = [entry.id] + [e.id for e, _ in pending]
      raise RuntimeError(
          f"a worker process died or could not start while decoding one of {len(ids)} clips "
          f"({', '.join(map(repr, ids[:8]))}{', ...' if len(ids) > 8 else ''}); finished "
          "shards are kept. If the workers could not start (e.g. build() called from stdin), "
          "use workers=1.") from None
    submit()
    yield result


def _shard_examples(results, count, part, part_path, progress):
  for _ in range(count):
    status, payload = next(results)
    if status == "error":
      raise RuntimeError(payload)
    progress.step(status == "ok")
    if status == "ok":
      part["num_examples"] += 1
      part["example_labels"].append(payload["labels"].tolist())
      yield payload
    else:
      part["skipped"].append(payload)
  # Written before write_shard renames the shard: a final shard always has its part.
  utils.write_json(part_path, part, every_process=True)


def load_input(input, labels=None, existing_vocab=None, split_list=None, split="train"):
  """(entries, label_ids, label_names) of a CAV-MAE JSON or a folder input; `split_list`
  (files, see read_split_list) chooses the folder's clips of `split`."""
  if split_list:
    if not os.path.isdir(input):
      raise InputError(f"--split_list chooses clips of a folder input; {input} is not a folder")
    if labels:
      raise InputError("--split_list and --labels: a listed split has no labels; give one")
    names = {_clip_id(rel) for rel in _scan_folder(input)}
    listed = read_split_list(split_list, split, lambda clip: clip in names)
    return _read_folder(input, None, existing_vocab, listed)
  if os.path.isdir(input):
    return _read_folder(input, labels, existing_vocab)
  if not os.path.isfile(input):
    raise InputError(f"{input}: no such file or folder")
  return _read_cavmae_json(input, labels)


def build(input, out, labels=None, split="train", num_shards=None, workers=1, process_index=0,
          process_count=1, max_frames=records.MAX_FBANK_FRAMES, frame_resize="crop",
          downmix="mean", frame_span="first", split_list=None, verbose=True) -> dict:
  """Builds this process's shards of `split`; finalizes the split if it is then complete.

  `split_list`: files listing the clips of `split` in the folder `input` (read_split_list).
  Returns the split's report: {num_examples, num_skipped, skipped_by_reason, skipped:
  [{id, path, reason, message}], shards, downmix, frame_span, finalized, listed (with
  split_list: {files, num_listed}), ...}: the merged report of the whole split when finalized,
  else that of this process's shards.
  """
  if not _SPLIT_RE.match(split):
    raise InputError(f"split {split!r}: use letters, digits and '_'")
  if not 0 <= process_index < process_count:
    raise InputError(f"process_index {process_index} not in [0, {process_count})")
  if max_frames < 1 or workers < 1:
    raise InputError("max_frames and workers must be positive")
  try:
    records.check_frame_resize(frame_resize)
    records.check_downmix(downmix)
    records.check_frame_span(frame_span)
  except ValueError as e:
    raise InputError(str(e)) from None
  out = os.path.abspath(out)
  existing = _existing_info(out)
  split_list = [os.path.abspath(p) for p in split_list] if split_list else None
  entries, label_ids, label_names = load_input(
      input, labels, existing.get("label_ids") if existing else None, split_list, split)
  if not entries:
    raise InputError(f"{input}: no clips")
  _check_compatible(out, label_ids, label_names, max_frames, frame_resize, downmix, frame_span)
  n = len(entries)
  if num_shards is None:
    num_shards = min(n, max(process_count, math.ceil(n / CLIPS_PER_SHARD)))
  if num_shards < 1:
    raise InputError(f"num_shards must be positive, got {num_shards}")
  # A later split keeps the dataset's TFDS name; a new dataset is named after its folder.
  name, version = ((existing["name"], existing["version"]) if existing
                   else records.dataset_name(out))
  names = [records.shard_name(name, split, i, num_shards) for i in range(num_shards)]
  plan = {"input": os.path.abspath(input), "name": name, "version": version,
          "num_entries": n, "num_shards": num_shards,
          "shards": names, "max_frames": max_frames, "frame_resize": frame_resize,
          "downmix": downmix, "frame_span": frame_span,
          "label_ids": label_ids, "label_names": label_names,
          "entries_sha256": _plan_fingerprint(entries)}
  if split_list:  # absent otherwise, so plans of earlier builds still match
    plan["listed"] = {"files": split_list, "num_listed": n}
  os.makedirs(out, exist_ok=True)
  _check_plan(out, split, plan)

  ranges = _shard_ranges(n, num_shards)
  mine = [i for i in range(num_shards) if i % process_count == process_index]
  todo = [i for i in mine if not (os.path.exists(os.path.join(out, names[i]))
                                  and os.path.exists(_part_path(out, split, names[i])))]
  clips = [e for i in todo for e in entries[slice(*ranges[i])]]
  if verbose:
    print(f"[{split}] {n} clips in {num_shards} shards; process {process_index}/{process_count}: "
          f"{len(mine)} shards, {len(mine) - len(todo)} already done, {len(clips)} clips to "
          f"decode with {workers} worker(s)", flush=True)

  progress = _Progress(split, len(clips), verbose)
  pool, env = None, contextlib.ExitStack()
  if workers > 1 and len(clips) > 1:
    # spawn: never fork a parent that may hold JAX/XLA threads. The executor starts workers
    # on demand, so the BLAS setting stays in the environment while it lives.
    env.enter_context(utils.one_blas_thread())
    pool = futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
  try:
    results = _results(clips, max_frames, pool, 4 * workers, frame_resize, downmix, frame_span)
    for i in todo:
      path = os.path.join(out, names[i])
      with contextlib.suppress(FileNotFoundError):
        os.remove(path + ".tmp")  # stale partial file of a killed run
      part = {"shard": names[i], "range": list(ranges[i]), "num_examples": 0, "skipped": [],
              "example_labels": []}
      count = ranges[i][1] - ranges[i][0]
      records.write_shard(path, _shard_examples(results, count, part,
                                                _part_path(out, split, names[i]), progress),
                          len(label_ids))
  finally:
    if pool is not None:
      pool.shutdown(wait=True, cancel_futures=True)
    env.close()
  elapsed = time.time() - progress.start

  report = finalize(out, split, verbose=verbose)
  if report is None:
    parts = [_read_json(_part_path(out, split, names[i])) for i in mine]
    report = dict(_merge_parts(parts), split=split, finalized=False, input=plan["input"],
                  num_shards=num_shards, shards=[names[i] for i in mine], downmix=downmix,
                  frame_span=frame_span, **_listed(plan))
  report["clips_per_second"] = progress.done / elapsed if progress.done and elapsed > 0 else None
  if verbose:
    _print_summary(report, progress.done, elapsed, out)
  return report


def _print_summary(report, decoded, elapsed, out):
  scope = "split" if report["finalized"] else "this process's shards"
  print(f"[{report['split']}] done: {report['num_examples']} clips written, "
        f"{report['num_skipped']} skipped ({scope}); {decoded} clips processed in "
        f"{elapsed:.1f} s" + (f" ({decoded / elapsed:.2f} clips/s)" if decoded and elapsed else ""),
        flush=True)
  if report.get("listed") and report["finalized"]:
    print(f"  {report['num_examples']} of the {report['listed']['num_listed']} clips listed in "
          f"{', '.join(map(os.path.basename, report['listed']['files']))}", flush=True)
  for reason, count in report["skipped_by_reason"].items():
    print(f"  skipped {count:6d}  {reason}", flush=True)
  if report["num_skipped"]:
    print(f"  details: {os.path.join(out, REPORT_FILE) if report['finalized'] else os.path.join(out, STATE_DIR)}",
          flush=True)
  if not report["finalized"]:
    print("  other shards of the split are not finished yet; the last process to finish "
          "(or a --finalize run) writes dataset_info.json", flush=True)


@utils.cli_errors(InputError, FileNotFoundError)
def main(argv=None):
  parser = argparse.ArgumentParser(
      prog="python -m data_prep.build", description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--input", help="CAV-MAE dataset JSON, or a folder of videos")
  parser.add_argument("--labels", help="label CSV: index,mid,display_name for a JSON input; "
                      "file,labels for a folder input")
  parser.add_argument("--out", required=True, help="dataset folder")
  parser.add_argument("--split", default="train")
  parser.add_argument("--num_shards", type=int, default=None,
                      help=f"default: one per {CLIPS_PER_SHARD} clips, at least process_count")
  parser.add_argument("--workers", type=int, default=1, help="decoding processes")
  parser.add_argument("--process_index", type=int, default=0)
  parser.add_argument("--process_count", type=int, default=1)
  parser.add_argument("--max_frames", type=int, default=records.MAX_FBANK_FRAMES,
                      help="fbank frames kept per clip")
  parser.add_argument("--frame_resize", choices=records.FRAME_RESIZES, default="crop",
                      help="how frames become 224 x 224: crop (short side, then centre crop; "
                      "CAV-MAE) or squash (whole frame, bicubic; the released AVSiam code)")
  parser.add_argument("--downmix", choices=records.DOWNMIXES, default="mean",
                      help="how audio of several channels becomes mono: mean (of the channels; "
                      "the released AVSiam loader) or first (channel; CAV-MAE's sox remix 1)")
  parser.add_argument("--frame_span", choices=records.FRAME_SPANS, default="first",
                      help="where the 10 frames are sampled: first (the first 10 s) or whole "
                      "(the whole video, as the released AVSiam loader); audio: the first 10 s")
  parser.add_argument("--split_list", nargs="+", metavar="LIST",
                      help="the clips of --split in the folder --input: MSR-VTT videodatainfo "
                      "JSON(s) (their videos whose split is --split) or text files of clip ids, "
                      "one a line")
  parser.add_argument("--finalize", action="store_true",
                      help="only write dataset_info.json/report.json of a split whose shards "
                      "all exist")
  args = parser.parse_args(argv)
  if args.finalize:
    if finalize(args.out, args.split) is None:
      plan = _read_json(os.path.join(_state_dir(args.out, args.split), "plan.json"))
      missing = _missing_shards(args.out, args.split, plan)
      print(f"error: {len(missing)} shard(s) of {args.split!r} not built yet, e.g. "
            f"{missing[0]}", file=sys.stderr)
      return 1
    return 0
  if not args.input:
    parser.error("--input is required (unless --finalize)")
  build(args.input, args.out, labels=args.labels, split=args.split,
        num_shards=args.num_shards, workers=args.workers, process_index=args.process_index,
        process_count=args.process_count, max_frames=args.max_frames,
        frame_resize=args.frame_resize, downmix=args.downmix, frame_span=args.frame_span,
        split_list=args.split_list)
  return 0


if __name__ == "__main__":
  sys.exit(main())
