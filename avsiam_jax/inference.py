"""Inference from a run directory: class predictions (finetuning runs), embeddings (any run).

A checkpoint is named by its run directory WORKDIR (the latest step is used) or by one step
directory WORKDIR/checkpoints/<step>. Only the parameters are read (a partial restore of the
`state` item), onto one device; the optimizer is never built.

Clips are prepared exactly as the evaluation pipeline sees their stored records
(avsiam_jax/data/clips.py): 10 frames decoded at 224 px, stored as JPEG and read back at the
model's size; the fbank of the first 10 s kept as float16, padded or cut to `audio_frames` and
normalized. Frames are made square, sampled and the audio down-mixed as the run's config.json
says (data.frame_resize, data.frame_span, data.downmix; defaults crop, first, mean). A file
without usable audio (no stream, silent, under 1 s) is used visual-only, one without video
audio-only.

  predictor = Predictor.load("/runs/ft")
  p = predictor.predict("clip.mp4", top_k=5)   # p.modality, p.reason, p.top, p.probs
  embedder = Embedder.load("/runs/pretrain")
  audio, video = embedder.embed("clip.mp4")   # (D,) float32 each, or None
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from avsiam_jax import checkpoint as checkpoint_lib
from avsiam_jax import config as config_lib
from avsiam_jax import losses
from avsiam_jax.checkpoint import CheckpointError, Run
from avsiam_jax.data import clips
from avsiam_jax.models import layers
from avsiam_jax.models.classifier import AVSiamClassifier, ClassifierSpec
from avsiam_jax.models.vit import Encoder

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

  def prepare(self, path) -> clips.PreparedClip:
    """A file's model inputs, made as the run's dataset made its clips where the run says how."""
    m, data = self.config.model, self.config.get("data", {})
    # Older runs had only crop and the first 10 s; one that names no down-mix gets the mean (the
    # default; its dataset's earlier rule is not reproduced).
    return clips.prepare_clip(path, audio_frames=m.audio_frames, image_size=m.image_size,
                              frame_resize=data.get("frame_resize", "crop"),
                              downmix=data.get("downmix") or "mean",
                              frame_span=data.get("frame_span", "first"))


# ----- Classification -----------------------------------------------------------------------

@dataclasses.dataclass
class Prediction:
  path: str
  modality: str  # clips.AUDIO_VISUAL, AUDIO_ONLY or VISUAL_ONLY
  reason: str  # why a modality is missing; "" for audio-visual
  top: list[tuple[str, float]]  # (class name, score), best first
  probs: np.ndarray  # (C,) float32: sigmoid (bce) or softmax (ce) scores


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

  def predict(self, path, top_k: int = 5) -> Prediction:
    clip = self.prepare(path)
    probs = self.probabilities(clip.audio, clip.video)
    order = np.argsort(-probs, kind="stable")[:max(0, top_k)]
    top = [(self.label_names[i], float(probs[i])) for i in order]
    return Prediction(clip.path, clip.modality, clip.reason, top, probs)


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

  def embed(self, path):
    clip = self.prepare(path)
    return self.embed_inputs(clip.audio, clip.video)

