"""Tests of the Grain input pipelines on small synthetic datasets.

Clip i of the main dataset: label [i] (one class per clip), fbank constant i+1
(length 48/64/80 frames), frame t a constant grey of 10+8*i+3*t. So a mixed
clip's fbank value, pixel value and label vector each reveal the mixup weight.
"""
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from avsiam_jax.data import augment
from avsiam_jax.data import fbank as fbank_lib
from avsiam_jax.data import pipeline
from avsiam_jax.data import records

N_MAIN = 13
FRAMES = 64      # audio_frames in most tests
SIZE = 32        # image_size in most tests (exercises the resize)
M, S = fbank_lib.FBANK_MEAN, fbank_lib.FBANK_STD


def _jpeg(value: int, size: int = 224) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(buf, format="JPEG",
                                                                   quality=95)
  return buf.getvalue()


def _write(path, examples, num_classes, shards=2, store_labels=False):
  per = -(-len(examples) // shards)
  records.write_dataset(path, {"train": [examples[s * per:(s + 1) * per] for s in range(shards)]},
                        label_ids=[f"c{c}" for c in range(num_classes)],
                        store_labels=store_labels)
  return path


def _main_examples():
  out = []
  for i in range(N_MAIN):
    t_len = (48, 64, 80)[i % 3]
    out.append(dict(id=f"clip{i}", frames=[_jpeg(10 + 8 * i + 3 * t) for t in range(10)],
                    fbank=np.full((t_len, 128), i + 1, np.float16),
                    labels=np.array([i], np.int32)))
  return out


@pytest.fixture(scope="module")
def main_ds(tmp_path_factory):
  examples = _main_examples()
  path = _write(str(tmp_path_factory.mktemp("main")), examples, N_MAIN)
  return path, examples


@pytest.fixture(scope="module")
def long_ds(tmp_path_factory):
  rng = np.random.default_rng(0)
  examples = [dict(id=f"long{i}", frames=[_jpeg(100)] * 10,
                   fbank=rng.uniform(1, 2, (256, 128)).astype(np.float16),
                   labels=np.array([0], np.int32)) for i in range(4)]
  return _write(str(tmp_path_factory.mktemp("long")), examples, 2, shards=1)


BAL_LABELS = [[0], [0], [0], [0], [1], [1, 2]]


@pytest.fixture(scope="module")
def bal_ds(tmp_path_factory):
  examples = [dict(id=f"b{i}", frames=[_jpeg(50)] * 10, fbank=np.zeros((16, 128), np.float16),
                   labels=np.array(l, np.int32)) for i, l in enumerate(BAL_LABELS)]
  return _write(str(tmp_path_factory.mktemp("bal")), examples, 3, shards=1)


def _frame_values(example, size=SIZE):
  """Normalized expected frames, (10, S, S, 3)."""
  return np.stack([augment.normalize_image(augment.decode_frame(f, size))
                   for f in example["frames"]])


def _expected_audio(example, frames=FRAMES):
  return fbank_lib.normalize(augment.pad_or_cut(example["fbank"], frames))


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def _pretrain(path, **kw):
  kw = dict(batch_size=2, audio_frames=FRAMES, image_size=SIZE) | kw
  return pipeline.make_pretrain_iterator(path, "train", **kw)


def _finetune(path, **kw):
  kw = dict(batch_size=2, audio_frames=FRAMES, image_size=SIZE) | kw
  return pipeline.make_finetune_iterator(path, "train", **kw)


# ----------------------------------------------------------- pretraining ---

def test_pretrain_shapes_and_normalization(main_ds):
  path, examples = main_ds
  it = pipeline.make_pretrain_iterator(path, "train", batch_size=3, audio_frames=FRAMES,
                                       time_shift=False)
  batch = next(it)
  assert batch["audio"].shape == (3, FRAMES, 128) and batch["audio"].dtype == np.float32
  assert batch["video"].shape == (3, 224, 224, 3) and batch["video"].dtype == np.float32
  assert batch["index"].dtype == np.int32
  for b, i in enumerate(batch["index"]):
    ex = examples[i]
    np.testing.assert_allclose(batch["audio"][b], _expected_audio(ex), rtol=1e-6)
    # Zero padding of short clips shows up as the normalized value of 0.
    if ex["fbank"].shape[0] < FRAMES:
      np.testing.assert_allclose(batch["audio"][b, -1], -M / S, rtol=1e-6)
    frames = _frame_values(ex, 224)
    assert any(np.array_equal(batch["video"][b], f) for f in frames)
  # ImageNet normalization: a grey of 10+8i has the expected channel values.
  pix = augment.decode_frame(examples[0]["frames"][0], 224)[0, 0]
  want = (pix / 255.0 - augment.IMAGENET_MEAN) / augment.IMAGENET_STD
  np.testing.assert_allclose(augment.normalize_image(pix), want, rtol=1e-5, atol=1e-6)


def test_pretrain_time_shift(main_ds):
  path, examples = main_ds
  batch = next(_pretrain(path, batch_size=4, time_shift=True))
  for b, i in enumerate(batch["index"]):
    want = _expected_audio(examples[i])
    diffs = [batch["audio"][b] - np.roll(want, s, axis=0) for s in range(FRAMES)]
    # Some roll of the clean fbank is below the result by uniform noise < 0.1.
    assert any(d.min() >= 0 and d.max() < 0.1 for d in diffs)


def test_pretrain_deterministic(main_ds):
  path, _ = main_ds
  a = _take(_pretrain(path, seed=3), 4)
  b = _take(_pretrain(path, seed=3), 4)
  c = _take(_pretrain(path, seed=4), 4)
  _assert_batches_equal(a, b)
  assert not all(np.array_equal(x["index"], y["index"]) for x, y in zip(a, c))
  assert not np.array_equal(a[0]["audio"], c[0]["audio"])


def test_epochs_are_fresh_permutations(main_ds):
  path, _ = main_ds
  it = _pretrain(path, batch_size=N_MAIN, time_shift=False)
  e0, e1 = next(it)["index"], next(it)["index"]
  assert sorted(e0) == sorted(e1) == list(range(N_MAIN))
  assert not np.array_equal(e0, e1)


def test_num_epochs_finite(main_ds):
  path, _ = main_ds
  it = _pretrain(path, batch_size=4, num_epochs=2)
  batches = list(it)
  assert len(batches) == it.num_batches == 2 * N_MAIN // 4
  assert _pretrain(path).num_batches is None


def test_worker_count_does_not_change_batches(main_ds):
  path, _ = main_ds
  a = _take(_finetune(path, seed=1, worker_count=0), 3)
  it = _finetune(path, seed=1, worker_count=2)
  b = _take(it, 3)
  it.close()
  _assert_batches_equal(a, b)


# -------------------------------------------------------- checkpointing ---

@pytest.mark.parametrize("make", [_pretrain, _finetune])
def test_state_restores_exactly(main_ds, make):
  path, _ = main_ds
  it = make(path, seed=7)
  _take(it, 5)                                   # 10 of 13 clips: mid-epoch
  state = it.get_state()
  state = json.loads(json.dumps(state))          # must be JSON-serializable
  want = _take(it, 3)                            # crosses the epoch boundary
  fresh = make(path, seed=7)
  fresh.set_state(state)
  _assert_batches_equal(want, _take(fresh, 3))
  assert fresh.get_state() == it.get_state()


def test_state_rejects_other_pipeline(main_ds):
  path, _ = main_ds
  state = _pretrain(path, seed=1).get_state()
  with pytest.raises(ValueError):
    _pretrain(path, seed=2).set_state(state)
  with pytest.raises(ValueError):
    _finetune(path, seed=1).set_state(state)


def test_eval_state_restores(main_ds):
  path, _ = main_ds
  it = pipeline.make_eval_iterator(path, "train", batch_size=3, audio_frames=FRAMES,
                                   image_size=SIZE)
  next(it)
  state = json.loads(json.dumps(it.get_state()))
  want = list(it)
  fresh = pipeline.make_eval_iterator(path, "train", batch_size=3, audio_frames=FRAMES,
                                      image_size=SIZE)
  fresh.set_state(state)
  _assert_batches_equal(want, list(fresh))


# ------------------------------------------------------------- processes ---

@pytest.mark.parametrize("make", [_pretrain, _finetune])
def test_processes_split_the_global_stream(main_ds, make):
  path, _ = main_ds
  p, b, n = 3, 2, 3
  per_proc = [_take(make(path, seed=5, batch_size=b, process_index=i, process_count=p), n)
              for i in range(p)]
  # Epoch 0 = global positions < 13; process i holds positions i + p*k.
  seen = {}
  for i in range(p):
    idx = np.concatenate([x["index"] for x in per_proc[i]])
    for k, ex in enumerate(idx):
      seen[i + p * k] = int(ex)
  epoch0 = [seen[g] for g in range(N_MAIN)]
  assert sorted(epoch0) == list(range(N_MAIN))   # disjoint and covering
  # Global batch n is the same whatever the process count (augmentation included).
  single = _take(make(path, seed=5, batch_size=b * p), n)
  for step in range(n):
    for key in single[step]:
      parts = [per_proc[i][step][key] for i in range(p)]
      interleaved = np.stack(parts, axis=1).reshape(single[step][key].shape)
      np.testing.assert_array_equal(interleaved, single[step][key], err_msg=key)
  # A state saved with 3 processes restores with 1 (same global batch).
  it3 = make(path, seed=5, batch_size=b, process_index=0, process_count=p)
  next(it3)
  it1 = make(path, seed=5, batch_size=b * p)
  it1.set_state(it3.get_state())
  _assert_batches_equal([next(it1)], [single[1]])


def test_eval_processes_pad_and_cover(main_ds):
  path, examples = main_ds
  p, b = 3, 2
  seen, counts = [], []
  for i in range(p):
    batches = list(pipeline.make_eval_iterator(path, "train", batch_size=b, audio_frames=FRAMES,
                                               image_size=SIZE, process_index=i,
                                               process_count=p))
    counts.append(len(batches))
    idx = np.concatenate([x["index"] for x in batches])
    mask = np.concatenate([x["mask"] for x in batches])
    np.testing.assert_array_equal(mask, idx >= 0)
    real = idx[idx >= 0]
    assert np.all(np.diff(real) == 1)               # contiguous slice
    seen.extend(real.tolist())
    for x in batches:
      assert x["video"].shape == (b, 10, SIZE, SIZE, 3)
      assert x["audio"].shape == (b, FRAMES, 128) and x["labels"].shape == (b, N_MAIN)
      assert x["mask"].dtype == np.bool_ and x["index"].dtype == np.int32
      for r in range(b):
        if x["index"][r] < 0:
          assert not x["audio"][r].any() and not x["video"][r].any()
          assert not x["labels"][r].any()
        else:
          ex = examples[x["index"][r]]
          np.testing.assert_array_equal(x["video"][r], _frame_values(ex))
          np.testing.assert_allclose(x["audio"][r], _expected_audio(ex), rtol=1e-6)
          np.testing.assert_array_equal(x["labels"][r], augment.multi_hot(ex["labels"], N_MAIN))
  assert sorted(seen) == list(range(N_MAIN))        # every clip exactly once
  assert len(set(counts)) == 1                      # processes stay in lockstep


def test_eval_max_examples(main_ds):
  path, _ = main_ds
  batches = list(pipeline.make_eval_iterator(path, "train", batch_size=4, audio_frames=FRAMES,
                                             image_size=SIZE, max_examples=7))
  idx = np.concatenate([x["index"] for x in batches])
  assert idx.tolist() == [0, 1, 2, 3, 4, 5, 6, -1]
  assert pipeline.make_eval_iterator(path, "train", batch_size=4, max_examples=7).num_batches == 2


# ----------------------------------------------------------- finetuning ---

def test_finetune_shapes_and_label_smoothing(main_ds):
  path, examples = main_ds
  eps = 0.1
  batch = next(_finetune(path, batch_size=4, mixup=0.0, label_smoothing=eps, freqm=0,
                         timem=0, time_shift=False))
  assert batch["audio"].shape == (4, FRAMES, 128) and batch["audio"].dtype == np.float32
  assert batch["video"].shape == (4, SIZE, SIZE, 3) and batch["video"].dtype == np.float32
  assert batch["labels"].shape == (4, N_MAIN) and batch["labels"].dtype == np.float32
  for b, i in enumerate(batch["index"]):
    y = augment.multi_hot(examples[i]["labels"], N_MAIN)
    np.testing.assert_allclose(batch["labels"][b], y * (1 - eps) + eps / N_MAIN, rtol=1e-6)
    np.testing.assert_allclose(batch["audio"][b], _expected_audio(examples[i]), rtol=1e-6)
  np.testing.assert_allclose(augment.smooth_labels(np.array([1.0, 0.0, 0.0, 0.0]), 0.2),
                             [0.85, 0.05, 0.05, 0.05], rtol=1e-6)


def test_mixup_keeps_features_and_labels_consistent(main_ds):
  path, examples = main_ds
  it = _finetune(path, batch_size=8, mixup=1.0, label_smoothing=0.0, freqm=0, timem=0,
                 time_shift=False)
  lams, checked = [], 0
  for batch in _take(it, 4):
    for b, i in enumerate(batch["index"]):
      y = batch["labels"][b]
      others = [j for j in np.flatnonzero(y) if j != i]
      if not others:                               # partner was the clip itself
        continue
      (j,) = others
      lam = y[i]
      np.testing.assert_allclose(y[i] + y[j], 1.0, rtol=1e-6)
      # Audio: row 0 exists in every clip; raw value lam*(i+1) + (1-lam)*(j+1).
      raw = batch["audio"][b, 0, 0] * S + M
      np.testing.assert_allclose((raw - (j + 1)) / (i - j), lam, atol=2e-4)
      assert np.ptp(batch["audio"][b, 0]) < 1e-5
      # Video: both clips use the same frame slot t.
      pix = batch["video"][b, 0, 0, 0] * augment.IMAGENET_STD[0] + augment.IMAGENET_MEAN[0]
      pix *= 255.0
      vi = [augment.decode_frame(f, SIZE)[0, 0, 0] for f in examples[i]["frames"]]
      vj = [augment.decode_frame(f, SIZE)[0, 0, 0] for f in examples[j]["frames"]]
      lam_v = [(pix - float(vj[t])) / (float(vi[t]) - float(vj[t])) for t in range(10)]
      assert min(abs(l - lam) for l in lam_v) < 1e-3
      lams.append(lam)
      checked += 1
  assert checked >= 16
  assert 0.1 < min(lams) and max(lams) < 0.9 and np.std(lams) > 0.02   # Beta(10, 10)
  # Probability 0.5: roughly half of the clips are mixed.
  batch = next(_finetune(path, batch_size=60, mixup=0.5, label_smoothing=0.0, freqm=0,
                         timem=0, time_shift=False))
  mixed = np.mean((batch["labels"] > 0).sum(axis=1) > 1)
  assert 0.25 < mixed < 0.75


def test_spec_augment_widths():
  maxf = maxt = 0
  for s in range(2000):
    x = np.ones((1024, 128), np.float32)
    augment.spec_augment(x, np.random.default_rng(s), 48, 192)
    fw = int((~x.any(axis=0)).sum())
    tw = int((~x.any(axis=1)).sum())
    assert fw <= 47 and tw <= 191                  # width ~ U[0, max) floored
    maxf, maxt = max(maxf, fw), max(maxt, tw)
  assert maxf >= 44 and maxt >= 180                # the range is used
  x = np.ones((1024, 128), np.float32)
  augment.spec_augment(x, np.random.default_rng(0), 0, 0)
  assert x.all()


def test_spec_augment_in_pipeline(long_ds):
  masked_value = -M / S                             # raw 0 after normalization
  it = pipeline.make_finetune_iterator(long_ds, "train", batch_size=4, audio_frames=256,
                                       image_size=SIZE, mixup=0.0, time_shift=False)
  widths_f, widths_t = [], []
  for batch in _take(it, 5):
    for a in batch["audio"]:
      m = np.isclose(a, masked_value)
      widths_f.append(int(m.all(axis=0).sum()))
      widths_t.append(int(m.all(axis=1).sum()))
  assert max(widths_f) <= 48 and max(widths_t) <= 192
  assert max(widths_f) > 0 and max(widths_t) > 0


def test_balanced_sampling_frequencies(bal_ds):
  weights = augment.class_balanced_weights(BAL_LABELS, 3)
  class_w = 1000 / (np.array([4, 2, 1]) + 0.01)
  np.testing.assert_allclose(weights, [class_w[0]] * 4 + [class_w[1], class_w[1] + class_w[2]])
  assert pipeline.split_example_labels(bal_ds, "train") == BAL_LABELS
  n = 30000
  stream = pipeline._train_stream(len(BAL_LABELS), 0, None, weights, 0, 1)
  draws = np.array([stream[k] for k in range(n)])
  freq = np.bincount(draws, minlength=6) / n
  p = weights / weights.sum()
  assert np.all(np.abs(freq - p) < 5 * np.sqrt(p * (1 - p) / n) + 1e-3)
  # End to end: balanced batches are deterministic and split over processes.
  parts = [np.concatenate([x["index"] for x in _take(pipeline.make_finetune_iterator(
      bal_ds, "train", batch_size=2, audio_frames=16, image_size=SIZE, balanced=True,
      process_index=i, process_count=2), 3)]) for i in range(2)]
  whole = np.concatenate([x["index"] for x in _take(pipeline.make_finetune_iterator(
      bal_ds, "train", batch_size=4, audio_frames=16, image_size=SIZE, balanced=True), 3)])
  np.testing.assert_array_equal(np.stack(parts, 1).reshape(-1), whole)
  np.testing.assert_array_equal(whole, draws[:12])


def test_grain_checkpoint_handler_round_trip(main_ds, tmp_path):
  from etils import epath
  import grain
  path, _ = main_ds
  it = _finetune(path, seed=2)
  _take(it, 2)
  handler = grain.checkpoint.CheckpointHandler()
  handler.save(epath.Path(tmp_path), item=it)
  want = _take(it, 2)
  fresh = handler.restore(epath.Path(tmp_path), item=_finetune(path, seed=2))
  _assert_batches_equal(want, _take(fresh, 2))


# ----------------------------------------------------------- earlier datasets ---

def test_dataset_without_downmix_warns_once(main_ds, tmp_path, monkeypatch, caplog):
  import shutil  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(pipeline, "_WARNED_DOWNMIX", set())
  path, _ = main_ds
  assert records.read_info(path)["fbank"]["downmix"] == "mean"  # write_dataset's default
  old = str(tmp_path / "old")
  shutil.copytree(path, old)
  info = records.read_info(old)
  del info["fbank"]["downmix"]  # as a dataset built before the option
  records.write_info(old, info)
  caplog.set_level("WARNING")
  for _ in range(2):  # training and eval open it: one warning per process and folder
    _pretrain(old)
    pipeline.make_eval_iterator(old, "train", batch_size=4)
  _pretrain(path)
  warned = [r.getMessage() for r in caplog.records if "down-mix" in r.getMessage()]
  assert len(warned) == 1
  assert warned[0].startswith(old + ": metadata.json records no audio down-mix")
  assert "stereo sources in it were mixed at 1/sqrt(2) per channel" in warned[0]
  assert "log-mels +ln 2 too high" in warned[0]
  assert f"`python -m data_prep.build ... --out {old}`" in warned[0]
