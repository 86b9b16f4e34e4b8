"""Inference from a run directory: class predictions (finetuning runs), embeddings (any run).

A checkpoint is named by its run directory WORKDIR (the latest step is used) or by one step
directory WORKDIR/checkpoints/<step>. Only the parameters are read (a partial restore of the
`state` item), onto one device; the optimizer is never built.

A whole file is read in windows of `window` seconds every `hop` seconds (WINDOW = 10 s, the
clip length the model was trained on, every 10 s by default; the last window may be shorter),
each prepared exactly as the evaluation pipeline sees a stored record (avsiam_jax/data/clips.py):
10 frames of the window decoded at 224 px, stored as JPEG and read back at the model's size; the
fbank of the window's audio kept as float16, padded or cut to `audio_frames` and normalized.
Frames are made square, sampled and the audio down-mixed as the run's config.json says
(data.frame_resize, data.frame_span, data.downmix; defaults crop, first, mean). A window without
usable audio (no stream, silent, under 1 s) is used visual-only, one without video audio-only.
A file's summary is the mean over its windows: of the class probabilities (Predictor), of the
embeddings (Embedder).

  predictor = Predictor.load("/runs/ft")
  p = predictor.predict("clip.mp4", top_k=5)   # p.modality, p.reason, p.top, p.probs, p.windows
  embedder = Embedder.load("/runs/pretrain")
  audio, video = embedder.embed("clip.mp4")   # (D,) float32 each, or None
  windows = embedder.embed_windows("clip.mp4")  # per window: start, seconds, audio, video
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from avsiam_jax import checkpoint as checkpoint_lib
from avsiam_jax import config as config_lib
from avsiam_jax import losses
from avsiam_jax.checkpoint import CheckpointError, Run
from avsiam_jax.data import clips, media, records
from avsiam_jax.models import layers
from avsiam_jax.models.classifier import AVSiamClassifier, ClassifierSpec
from avsiam_jax.models.vit import Encoder

WINDOW = records.MAX_SECONDS  # seconds: the default and longest window, the records' clip length


def check_window(window: float | None, hop: float | None) -> tuple[float, float]:
  """(window, hop) in seconds, the defaults filled in: a window of 1 s (under it no audio is
  usable) to WINDOW (longer audio would be cut to the model's frames), any positive hop."""
  window = WINDOW if window is None else float(window)
  hop = window if hop is None else float(hop)
  if not media.MIN_AUDIO_SECONDS <= window <= WINDOW:
    raise ValueError(f"window {window:g} s: must be {media.MIN_AUDIO_SECONDS:g} to {WINDOW:g} s "
                     "(the model's clip length)")
  if hop <= 0:
    raise ValueError(f"hop {hop:g} s: must be positive")
  return window, hop


# ----- Run directories and parameters -------------------------------------------------------

def _restore_model(run: Run, make, subtree: str | None = None):
  """(graphdef, state) of the module `make()` with its parameters from the checkpoint.

  `subtree`: the module is that subtree of the saved params (e.g. "encoder").
  """
  abstract = nnx.eval_shape(make)
  graphdef, state = nnx.split(abstract)
  target = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
  if subtree is None:
    params = checkpoint_lib.restore_params(run, target)
  else:
    params = checkpoint_lib.restore_params(run, {subtree: target})[subtree]
  nnx.replace_by_pure_dict(state, params)
  return graphdef, state


def _dtype(config):
  return config_lib.DTYPES[config.model.get("dtype", "float32")]


class _RunReader:
  """What Predictor and Embedder share: the run, its restored module, and clip preparation."""

  def __init__(self, run: Run, graphdef, state):
    self.run = run
    self.config = run.config
    self._graphdef, self._state = graphdef, state

  def _settings(self) -> dict:
    m, data = self.config.model, self.config.get("data", {})
    # Older runs had only crop and the first 10 s; one that names no down-mix gets the mean (the
    # default; its dataset's earlier rule is not reproduced).
    return dict(audio_frames=m.audio_frames, image_size=m.image_size,
                frame_resize=data.get("frame_resize", "crop"),
                downmix=data.get("downmix") or "mean", frame_span=data.get("frame_span", "first"))

  def prepare(self, path) -> clips.PreparedClip:
    """The model inputs of a file's first 10 s, made as the run's dataset made its clips."""
    return clips.prepare_clip(path, **self._settings())

  def prepare_windows(self, path, window: float | None = None,
                      hop: float | None = None) -> Iterator[clips.PreparedWindow]:
    """The model inputs of every window of a file, one at a time (check_window: 10 s every
    10 s by default)."""
    window, hop = check_window(window, hop)
    return clips.prepare_windows(path, window=window, hop=hop, **self._settings())


# ----- Classification -----------------------------------------------------------------------

@dataclasses.dataclass
class WindowPrediction:
  start: float  # seconds from the start of the file
  seconds: float  # the window's length
  modality: str  # clips.AUDIO_VISUAL, AUDIO_ONLY, VISUAL_ONLY, or clips.NONE: not scored
  reason: str  # why a modality is missing; "" for audio-visual
  top: list[tuple[str, float]]  # (class name, score), best first
  probs: np.ndarray | None  # (C,) float32: sigmoid (bce) or softmax (ce) scores


@dataclasses.dataclass
class Prediction:
  """A whole file: the mean of its windows' probabilities, and the windows."""
  path: str
  modality: str  # the windows' one modality, or MIXED
  reason: str  # why a modality is missing; "" for audio-visual
  top: list[tuple[str, float]]  # (class name, score), best first
  probs: np.ndarray  # (C,) float32: the mean over the scored windows
  windows: list[WindowPrediction] = dataclasses.field(default_factory=list)


MIXED = "mixed"  # a file whose windows were scored from different modalities


def _file_modality(windows) -> tuple[str, str]:
  """(modality, reason) of a file from those of its scored windows."""
  kinds = {}
  for w in windows:
    kinds.setdefault(w.modality, []).append(w)
  if len(kinds) == 1:
    (modality, ws), = kinds.items()
    return modality, ws[0].reason
  return MIXED, ", ".join(f"{m} in {len(ws)} of {len(windows)} windows" for m, ws in kinds.items())


# Module-level and jitted with the graphdef static: a second Predictor / Embedder of the same
# model (e.g. another step of the run) reuses the compiled functions.

@functools.partial(jax.jit, static_argnums=(0, 1))
def _audio_only(graphdef, loss, state, audio):
  model = nnx.merge(graphdef, state)
  return losses.probabilities(model(audio=audio[None]), loss)[0]


@functools.partial(jax.jit, static_argnums=(0, 1))
def _visual_only(graphdef, loss, state, video):
  model = nnx.merge(graphdef, state)
  # Per-frame scores, averaged.
  return losses.probabilities(model(video=video), loss).mean(axis=0)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _audio_visual(graphdef, loss, state, audio, video):
  """= model(audio=audio repeated per frame, video=frames), averaged; the audio encoded once."""
  model = nnx.merge(graphdef, state)
  a = model.encoder(audio[None], "a")
  a = jnp.broadcast_to(a, (video.shape[0],) + a.shape[1:])
  f = model.fuse(a, model.encoder(video, "v"))
  return losses.probabilities(model.head_av(f).astype(jnp.float32), loss).mean(axis=0)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _pooled(graphdef, modality, state, x):
  """Mean-pooled tokens of one input, float32 as the retrieval eval computes them."""
  encoder = nnx.merge(graphdef, state)
  return layers.mean_pool(encoder(x[None], modality))[0]


class Predictor(_RunReader):
  """Class scores of media files from a finetuning run."""

  def __init__(self, run: Run, graphdef, state):
    super().__init__(run, graphdef, state)
    self.label_names = list(run.label_names)
    self.loss = run.config.finetune.loss

  @classmethod
  def load(cls, checkpoint: str) -> "Predictor":
    """A finetuning run: trained here, or a released classifier converted with --labels."""
    run = checkpoint_lib.load_run(checkpoint)
    config = run.config
    if config.get("mode") == "pretrain":
      raise CheckpointError(f"{checkpoint}: a pretraining run has no classification heads; "
                            "use Embedder / python -m avsiam_jax.embed for its embeddings")
    if config.get("mode") != "finetune":
      raise CheckpointError(f"{checkpoint}: config.mode {config.get('mode')!r} is not "
                            "'finetune'")
    loss = config.get("finetune", {}).get("loss")
    if loss not in losses.CLASSIFICATION_LOSSES:
      raise CheckpointError(f"{checkpoint}: config.finetune.loss must be one of "
                            f"{losses.CLASSIFICATION_LOSSES}, got {loss!r}")
    spec = ClassifierSpec(encoder=config_lib.model_spec(config.model).encoder,
                          num_classes=len(run.label_names), mm_depth=config.model.mm_depth)
    graphdef, state = _restore_model(
        run, lambda: AVSiamClassifier(spec, rngs=nnx.Rngs(0), dtype=_dtype(config)))
    return cls(run, graphdef, state)

  def probabilities(self, audio: np.ndarray | None, video: np.ndarray | None) -> np.ndarray:
    """(C,) scores of prepared inputs: audio (T, 128) and/or video (frames, S, S, 3)."""
    g, loss, state = self._graphdef, self.loss, self._state
    if audio is not None and video is not None:
      out = _audio_visual(g, loss, state, audio, video)
    elif audio is not None:
      out = _audio_only(g, loss, state, audio)
    elif video is not None:
      out = _visual_only(g, loss, state, video)
    else:
      raise ValueError("need audio, video or both")
    return np.asarray(out, np.float32)

  def top(self, probs: np.ndarray, top_k: int) -> list[tuple[str, float]]:
    order = np.argsort(-probs, kind="stable")[:max(0, top_k)]
    return [(self.label_names[i], float(probs[i])) for i in order]

  def predict(self, path, top_k: int = 5, window: float | None = None,
              hop: float | None = None) -> Prediction:
    """Scores of every window of a file and of the whole file (their mean)."""
    windows = []
    for w in self.prepare_windows(path, window, hop):
      probs = None if w.modality == clips.NONE else self.probabilities(w.audio, w.video)
      top = [] if probs is None else self.top(probs, top_k)
      windows.append(WindowPrediction(w.start, w.seconds, w.modality, w.reason, top, probs))
    scored = [w for w in windows if w.probs is not None]
    probs = np.mean([w.probs for w in scored], axis=0).astype(np.float32)
    modality, reason = _file_modality(scored)
    return Prediction(str(path), modality, reason, self.top(probs, top_k), probs, windows)


# ----- Embeddings ---------------------------------------------------------------------------

class Embedder(_RunReader):
  """Mean-pooled encoder features of media files, as the zero-shot retrieval eval computes them."""

  def __init__(self, run: Run, graphdef, state):
    super().__init__(run, graphdef, state)
    self.frame = int(run.config.get("eval", {}).get("frame", 5))
    self.dim = config_lib.model_spec(run.config.model).encoder.width

  @classmethod
  def load(cls, checkpoint: str) -> "Embedder":
    """Any run: pretraining (AVSiam) and finetuning (classifier) params share `encoder`."""
    run = checkpoint_lib.load_run(checkpoint)
    spec = config_lib.model_spec(run.config.model).encoder
    graphdef, state = _restore_model(
        run, lambda: Encoder(spec, rngs=nnx.Rngs(0), dtype=_dtype(run.config)), "encoder")
    return cls(run, graphdef, state)

  def embed_inputs(self, audio: np.ndarray | None, video: np.ndarray | None):
    """(audio (D,) or None, video (D,) or None) of prepared inputs; video uses one frame."""
    g, state = self._graphdef, self._state
    a = None if audio is None else np.asarray(_pooled(g, "a", state, audio))
    v = None if video is None else np.asarray(_pooled(g, "v", state, video[self.frame]))
    return a, v

  def embed_windows(self, path, window: float | None = None,
                    hop: float | None = None) -> list[WindowEmbedding]:
    """The embeddings of every window of a file (check_window: 10 s every 10 s by default)."""
    out = []
    for w in self.prepare_windows(path, window, hop):
      a, v = self.embed_inputs(w.audio, w.video)
      out.append(WindowEmbedding(w.start, w.seconds, w.modality, w.reason, a, v))
    return out

  def embed(self, path, window: float | None = None, hop: float | None = None):
    """(audio, video) of a whole file: the mean of its windows' embeddings, None for a modality
    no window has."""
    return file_embedding(self.embed_windows(path, window, hop))


@dataclasses.dataclass
class WindowEmbedding:
  start: float  # seconds from the start of the file
  seconds: float  # the window's length
  modality: str  # as WindowPrediction's
  reason: str
  audio: np.ndarray | None  # (D,) float32
  video: np.ndarray | None  # (D,) float32


def file_embedding(windows: list[WindowEmbedding]):
  """(audio, video) of a file: the mean over its windows that have each; None where none has."""
  def mean(vectors):
    vectors = [x for x in vectors if x is not None]
    return np.mean(vectors, axis=0).astype(np.float32) if vectors else None
  return mean([w.audio for w in windows]), mean([w.video for w in windows])

