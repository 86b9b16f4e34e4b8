"""The t-SNE wrapper (separation, determinism, awkward inputs) and the class-coloured PNG
(modality-coloured without classes)."""
import numpy as np
import pytest
from PIL import Image

from avsiam_jax.evaluators import embedding_plot as ep


def clusters(k=5, per=40, dim=50, seed=0):
  rng = np.random.default_rng(seed)
  labels = np.repeat(np.arange(k), per)
  return rng.normal(scale=4.0, size=(k, dim))[labels] + rng.normal(size=(k * per, dim)), labels


def knn_purity(y, labels, k=5):
  d = ((y[:, None] - y[None]) ** 2).sum(-1)
  np.fill_diagonal(d, np.inf)
  nearest = np.argsort(d, axis=1)[:, :k]
  return float(np.mean(labels[nearest] == labels[:, None]))


def test_separated_clusters_stay_apart():
  x, labels = clusters()
  y, kl = ep.tsne(x, return_kl=True)
  assert y.shape == (200, 2) and y.dtype == np.float64 and np.all(np.isfinite(y))
  assert knn_purity(y, labels) >= 0.95
  assert 0.0 < kl < 2.0
  # Every cluster's centre is further from the others than its points are from it.
  centres = np.stack([y[labels == c].mean(0) for c in range(5)])
  radius = max(np.linalg.norm(y[labels == c] - centres[c], axis=1).max() for c in range(5))
  gaps = np.linalg.norm(centres[:, None] - centres[None], axis=-1)
  assert gaps[~np.eye(5, dtype=bool)].min() > radius


def test_deterministic_for_a_seed():
  x, _ = clusters(k=4, per=20, dim=20, seed=3)
  a = ep.tsne(x, iterations=300, seed=5)
  np.testing.assert_array_equal(a, ep.tsne(x, iterations=300, seed=5))
  # The seeded random start (for identical points) follows the seed too.
  same = np.ones((12, 4))
  np.testing.assert_array_equal(ep.tsne(same, iterations=250, seed=1),
                                ep.tsne(same, iterations=250, seed=1))
  assert not np.array_equal(ep.tsne(same, iterations=250, seed=1),
                            ep.tsne(same, iterations=250, seed=2))


def test_small_and_degenerate_inputs():
  y = ep.tsne(np.random.default_rng(0).normal(size=(6, 3)), iterations=250)  # perplexity clamped
  assert y.shape == (6, 2) and np.all(np.isfinite(y))
  x = np.repeat(np.eye(3), 4, axis=0)  # exact duplicates, rank-2 data
  y = ep.tsne(x, iterations=250)
  assert np.all(np.isfinite(y))
  assert knn_purity(y, np.repeat(np.arange(3), 4), k=3) == 1.0
  # Identical points and 1-D points have no two principal components to start from.
  for x in (np.ones((10, 5)), np.random.default_rng(1).normal(size=(10, 1)), np.zeros((2, 3))):
    y = ep.tsne(x, iterations=250)
    assert y.shape == (len(x), 2) and np.all(np.isfinite(y))


def test_tsne_rejects_bad_input():
  with pytest.raises(ValueError, match="non-finite"):
    ep.tsne(np.array([[0.0, 1.0], [np.nan, 2.0], [1.0, 1.0]]))
  with pytest.raises(ValueError, match="at least 2"):
    ep.tsne(np.ones((1, 4)))
  with pytest.raises(ValueError, match="2-D"):
    ep.tsne(np.ones(8))
  with pytest.raises(ValueError, match="numeric"):
    ep.tsne(np.array([["a", "b"], ["c", "d"]]))
  with pytest.raises(ValueError, match="iterations must be >= 250"):
    ep.tsne(np.ones((5, 2)), iterations=100)


def colour_spread(path, colour):
  """Spread (std, in map widths) of where a colour appears on the map."""
  image = Image.open(path)
  left, top, right, bottom = ep._plot_box(*image.size)
  inside = np.asarray(image.convert("RGB"))[top + 1:bottom, left + 1:right]
  where = np.argwhere(np.all(inside == colour, axis=-1))
  return float(np.linalg.norm(where.std(0)) / (right - left))


def pixels(path):
  """Image size and the set of colours inside the map (the text is anti-aliased: grey shades)."""
  image = Image.open(path)
  left, top, right, bottom = ep._plot_box(*image.size)
  inside = np.asarray(image.convert("RGB"))[top + 1:bottom, left + 1:right].reshape(-1, 3)
  return image.size, {tuple(int(v) for v in c) for c in inside}


def plot_data(per_class=(30, 25, 20, 15, 10, 6), dim=32, seed=0):
  rng = np.random.default_rng(seed)
  labels = np.concatenate([np.full(n, c) for c, n in enumerate(per_class)] + [np.full(5, -1)])
  centres = rng.normal(scale=3.0, size=(len(per_class) + 1, dim))
  audio = centres[labels] + rng.normal(size=(len(labels), dim))
  video = centres[labels] + rng.normal(size=(len(labels), dim))
  return audio, video, labels


def test_plot_writes_png_with_class_colours(tmp_path):
  audio, video, labels = plot_data()
  names = [f"class {c} " + "with a very long descriptive name" * 3 for c in range(6)]
  path = ep.plot_embeddings(audio, video, labels, names, tmp_path / "tsne.png",
                            max_classes=4, title="audio and video")
  assert path == tmp_path / "tsne.png"
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  with Image.open(path) as image:
    image.verify()  # a complete, uncorrupted PNG
  size, colours = pixels(path)
  assert size == (900, 700)
  # The four most frequent classes get the first four palette colours; the rest are left out.
  assert all(ep._PALETTE[i] in colours for i in range(4))
  assert not any(ep._PALETTE[i] in colours for i in range(4, 6))
  assert ep._UNLABELLED not in colours
  assert ep._AUDIO_COLOUR not in colours and ep._VIDEO_COLOUR not in colours  # by class
  # Separated classes make tight clusters: each colour's marks sit together.
  assert max(colour_spread(path, ep._PALETTE[i]) for i in range(4)) < 0.1
  legend = np.asarray(Image.open(path).convert("RGB"))[:, 900 - ep._LEGEND_WIDTH:].reshape(-1, 3)
  assert ep._PALETTE[3] in {tuple(int(v) for v in c) for c in legend}


def test_plot_without_labels_colours_by_modality(tmp_path):
  # No classes (an unlabeled dataset); audio and video embeddings in two far-apart places.
  rng = np.random.default_rng(0)
  shift = np.zeros(16)
  shift[0] = 12.0
  audio, video = rng.normal(size=(30, 16)) + shift, rng.normal(size=(30, 16)) - shift
  path = ep.plot_embeddings(audio, video, np.full(30, -1), [], tmp_path / "modality.png")
  _, colours = pixels(path)
  assert ep._AUDIO_COLOUR in colours and ep._VIDEO_COLOUR in colours
  assert ep._UNLABELLED not in colours and not any(c in colours for c in ep._PALETTE)
  # Each colour is one modality: its marks make one tight group.
  assert max(colour_spread(path, ep._AUDIO_COLOUR), colour_spread(path, ep._VIDEO_COLOUR)) < 0.1


def test_plot_rejects_bad_input(tmp_path):
  audio, video, labels = plot_data(per_class=(10, 10))
  out = tmp_path / "x.png"
  with pytest.raises(ValueError, match="differ in shape"):
    ep.plot_embeddings(audio, video[:, :-1], labels, [], out)
  with pytest.raises(ValueError, match="differ in shape"):
    ep.plot_embeddings(audio, video[:-1], labels, [], out)
  with pytest.raises(ValueError, match="at least 5"):
    ep.plot_embeddings(audio[:4], video[:4], labels[:4], [], out)
  bad = audio.copy()
  bad[3, 1] = np.inf
  with pytest.raises(ValueError, match="audio embeddings has non-finite"):
    ep.plot_embeddings(bad, video, labels, [], out)
  with pytest.raises(ValueError, match="labels must have shape"):
    ep.plot_embeddings(audio, video, labels[:-1], [], out)
  with pytest.raises(ValueError, match="integer class ids"):
    ep.plot_embeddings(audio, video, labels + 0.5, [], out)
  with pytest.raises(ValueError, match="2-D"):
    ep.plot_embeddings(audio[:, 0], video[:, 0], labels, [], out)
  assert not out.exists()


def test_plot_is_deterministic_and_sized(tmp_path):
  audio, video, labels = plot_data(per_class=(12, 10, 8))
  a = ep.plot_embeddings(audio, video, labels, ["a", "b", "c"], tmp_path / "a.png", seed=3,
                         size=(640, 480))
  b = ep.plot_embeddings(audio, video, labels, ["a", "b", "c"], tmp_path / "b.png", seed=3,
                         size=(640, 480))
  with Image.open(a) as image_a, Image.open(b) as image_b:
    assert image_a.format == "PNG" and image_a.size == (640, 480)
    np.testing.assert_array_equal(np.asarray(image_a), np.asarray(image_b))
  with pytest.raises(ValueError, match="too small"):
    ep.plot_embeddings(audio, video, labels, [], tmp_path / "c.png", size=(300, 300))


def test_plot_of_collapsed_embeddings(tmp_path):
  # An untrained or collapsed model can give every clip the same embedding: still a map.
  labels = np.repeat(np.arange(3), 4)
  path = ep.plot_embeddings(np.ones((12, 16)), np.ones((12, 16)), labels, ["a", "b", "c"],
                            tmp_path / "same.png")
  _, colours = pixels(path)
  assert any(ep._PALETTE[i] in colours for i in range(3))
