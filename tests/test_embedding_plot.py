"""t-SNE against scikit-learn's and against its own definition; the class-coloured PNG."""
import math

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.manifold import TSNE, trustworthiness

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


@pytest.fixture(scope="module")
def digits():
  x, labels = load_digits(return_X_y=True)
  pick = np.random.default_rng(0).choice(len(x), 300, replace=False)
  return x[pick], labels[pick]


def test_separated_clusters_stay_apart():
  x, labels = clusters()
  y = ep.tsne(x)
  assert y.shape == (200, 2) and np.all(np.isfinite(y))
  assert knn_purity(y, labels) >= 0.95


def test_matches_sklearn_quality(digits):
  x, labels = digits
  y, kl = ep.tsne(x, return_kl=True)
  # Digits overlap in PCA; the descent has to pull them apart.
  assert knn_purity(y, labels) >= 0.85 > knn_purity(ep.tsne(x, iterations=0), labels) + 0.2
  ref = TSNE(method="exact", init="pca", perplexity=30.0, random_state=0).fit(x)
  ours = trustworthiness(x, y, n_neighbors=5)
  theirs = trustworthiness(x, ref.embedding_, n_neighbors=5)
  assert ours >= theirs - 0.02, (ours, theirs)
  assert ours > 0.95
  # Both minimize KL for (nearly) the same P: ours should be about as low.
  assert kl <= ref.kl_divergence_ * 1.05, (kl, ref.kl_divergence_)


def test_kl_drops_below_start_and_random_layout(digits):
  x, _ = digits
  _, kl_start = ep.tsne(x, iterations=0, return_kl=True)
  y, kl = ep.tsne(x, iterations=400, return_kl=True)
  p = ep.joint_probabilities(x)
  random_layout = np.random.default_rng(0).normal(scale=10.0, size=y.shape)
  assert kl < 0.5 * kl_start
  assert kl < 0.5 * ep.kl_divergence(p, random_layout)
  assert kl == pytest.approx(ep.kl_divergence(p, y))


def test_gradient_matches_finite_differences():
  rng = np.random.default_rng(1)
  p = ep.joint_probabilities(rng.normal(size=(25, 6)), perplexity=5.0)
  y = rng.normal(size=(25, 2))
  grad = ep._gradient(p, y, 1.0)
  numeric = np.zeros_like(y)
  h = 1e-6
  for i in range(25):
    for k in range(2):
      step = np.zeros_like(y)
      step[i, k] = h
      numeric[i, k] = (ep.kl_divergence(p, y + step) - ep.kl_divergence(p, y - step)) / (2 * h)
  np.testing.assert_allclose(grad, numeric, atol=1e-7 * np.abs(numeric).max() + 1e-9)
  # Exaggeration scales only the attractive part: the gradient is affine in it.
  attract = grad - ep._gradient(p, y, 0.0)
  assert np.abs(attract).max() > 0.1 * np.abs(grad).max()
  np.testing.assert_allclose(ep._gradient(p, y, 12.0), grad + 11.0 * attract, rtol=1e-9,
                             atol=1e-12)


@pytest.mark.parametrize("n,perplexity", [(300, 30.0), (40, 5.0), (8, 30.0)])
def test_affinities_hit_the_perplexity(n, perplexity):
  x = np.random.default_rng(2).normal(size=(n, 10)) * np.linspace(0.1, 3.0, 10)
  d2 = ((x[:, None] - x[None]) ** 2).sum(-1)
  np.fill_diagonal(d2, np.inf)
  cond = ep._conditional_rows(d2, math.log(ep._effective_perplexity(perplexity, n)))
  np.testing.assert_allclose(cond.sum(1), 1.0)
  assert np.all(np.diagonal(cond) == 0)
  entropy = -np.sum(np.where(cond > 0, cond * np.log(np.where(cond > 0, cond, 1.0)), 0.0), 1)
  target = min(perplexity, (n - 1) / 3)  # clamped for small N
  np.testing.assert_allclose(np.exp(entropy), target, rtol=1e-4)
  p = ep.joint_probabilities(x, perplexity)
  np.testing.assert_allclose(p, p.T)
  assert p.sum() == pytest.approx(1.0) and np.all(np.diagonal(p) == 0)


def test_deterministic_for_a_seed():
  x, _ = clusters(k=4, per=20, dim=20, seed=3)
  a = ep.tsne(x, iterations=300, seed=5)
  np.testing.assert_array_equal(a, ep.tsne(x, iterations=300, seed=5))
  assert not np.array_equal(a, ep.tsne(x, iterations=300, seed=6))


def test_small_and_degenerate_inputs():
  y = ep.tsne(np.random.default_rng(0).normal(size=(6, 3)), iterations=200)  # perplexity clamped
  assert y.shape == (6, 2) and np.all(np.isfinite(y))
  x = np.repeat(np.eye(3), 4, axis=0)  # exact duplicates, rank-2 data
  y = ep.tsne(x, iterations=200)
  assert np.all(np.isfinite(y))
  assert knn_purity(y, np.repeat(np.arange(3), 4), k=3) == 1.0
  with pytest.raises(ValueError, match="non-finite"):
    ep.tsne(np.array([[0.0, 1.0], [np.nan, 2.0], [1.0, 1.0]]))
  with pytest.raises(ValueError, match="at least 2"):
    ep.tsne(np.ones((1, 4)))


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
  size, colours = pixels(path)
  assert size == (900, 700)
  # The four most frequent classes get the first four palette colours; the rest are left out.
  assert all(ep._PALETTE[i] in colours for i in range(4))
  assert not any(ep._PALETTE[i] in colours for i in range(4, 6))
  assert ep._UNLABELLED not in colours
  # Separated classes make tight clusters: each colour's marks sit together.
  assert max(colour_spread(path, ep._PALETTE[i]) for i in range(4)) < 0.1
  legend = np.asarray(Image.open(path).convert("RGB"))[:, 900 - ep._LEGEND_WIDTH:].reshape(-1, 3)
  assert ep._PALETTE[3] in {tuple(int(v) for v in c) for c in legend}


def test_plot_without_labels_draws_all_grey(tmp_path):
  audio, video, labels = plot_data(per_class=(10, 10))
  path = ep.plot_embeddings(audio, video, np.full(len(labels), -1), [], tmp_path / "grey.png")
  _, colours = pixels(path)
  assert ep._UNLABELLED in colours
  assert not any(c in colours for c in ep._PALETTE)


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
