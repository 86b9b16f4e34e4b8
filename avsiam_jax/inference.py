"""Inference from a run directory: class predictions (finetuning runs), embeddings (any run).

A checkpoint is named by its run directory WORKDIR (the latest step is used) or by one step
directory WORKDIR/checkpoints/<step>. Only the parameters are read (a partial restore of the
`state` item), onto one device; the optimizer is never built.

Clips are prepared exactly as the evaluation pipeline sees them after `data_prep.build`: 10
frames decoded at 224 px, stored as JPEG and read back at the model's size; the fbank of the
first 10 s kept as float16, padded or cut to `audio_frames` and normalized. A file without
usable audio (no stream, silent, under 1 s) is used visual-only, one without video audio-only.

  predictor = Predictor.load("/runs/ft")
  p = predictor.predict("clip.mp4", top_k=5)   # p.modality, p.reason, p.top, p.probs
  embedder = Embedder.load("/runs/pretrain")
  audio, video = embedder.embed("clip.mp4")   # (D,) float32 each, or None
"""
from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from avsiam_jax import finetuning, train
from avsiam_jax.data import augment, media, pipeline
from avsiam_jax.data import fbank as fbank_lib
from avsiam_jax.models.classifier import AVSiamClassifier, ClassifierSpec
from avsiam_jax.models.vit import Encoder
from data_prep import build

AUDIO_VISUAL, AUDIO_ONLY, VISUAL_ONLY = "audio-visual", "audio-only", "visual-only"
LOSSES = ("bce", "ce")
# media.ClipError reason -> (modality still usable, why); other reasons fail the clip.
_FALLBACK = {
    "no_audio": (VISUAL_ONLY, "no audio stream"),
    "silent_audio": (VISUAL_ONLY, "silent audio track"),
    "audio_too_short": (VISUAL_ONLY, f"audio shorter than {media.MIN_AUDIO_SECONDS:g} s"),
    "no_video": (AUDIO_ONLY, "no video stream"),
    "no_frames": (AUDIO_ONLY, "no decodable video frame"),
}


# The eval pipeline's own per-clip steps, reused so that the numbers stay the same.
_eval_audio = pipeline._audio  # pylint: disable=protected-access
_eval_frame = pipeline._frame  # pylint: disable=protected-access


class CheckpointError(ValueError):
  """A checkpoint path or run directory that cannot be used, with the path in the message."""


# ----- Run directories and parameters -------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Run:
  workdir: str
  checkpoints_dir: str
  step: int
  config: ml_collections.ConfigDict
  label_names: list[str] | None  # finetuning runs only

  @property
  def step_dir(self) -> str:
    return str(epath.Path(self.checkpoints_dir) / str(self.step))


def _manager(checkpoints_dir) -> ocp.CheckpointManager:
  # Only reads (no create, no cleanup, nothing to keep or delete); not read_only=True, which
  # logs warnings on every load.
  return ocp.CheckpointManager(str(checkpoints_dir), options=ocp.CheckpointManagerOptions(
      create=False, enable_async_checkpointing=False))


def load_run(checkpoint: str) -> Run:
  """Resolves WORKDIR or WORKDIR/checkpoints/<step>; reads config.json (and label names)."""
  path = epath.Path(checkpoint)
  if (path / "config.json").exists():
    workdir, ckpt_dir, step = path, path / "checkpoints", None
  elif (path.name.isdigit() and path.parent.name == "checkpoints"
        and (path.parent.parent / "config.json").exists()):
    workdir, ckpt_dir, step = path.parent.parent, path.parent, int(path.name)
  else:
    why = "does not exist" if not path.exists() else "has no config.json"
    raise CheckpointError(
        f"{checkpoint}: not a run directory (WORKDIR with config.json) nor a checkpoint step "
        f"directory (WORKDIR/checkpoints/<step>); it {why}")
  steps = []
  if ckpt_dir.exists():
    mgr = _manager(ckpt_dir)
    steps = list(mgr.all_steps())
    mgr.close()
  if step is None:
    if not steps:
      raise CheckpointError(f"{checkpoint}: no finished checkpoint in {ckpt_dir}")
    step = max(steps)
  elif step not in steps:
    raise CheckpointError(f"{checkpoint}: not a finished checkpoint of {ckpt_dir} "
                          f"(finished steps: {sorted(steps) or 'none'})")
  config = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
  names = None
  if config.get("mode") == "finetune":
    names_path = workdir / "label_names.json"
    if not names_path.exists():
      raise CheckpointError(f"{checkpoint}: finetuning run without {names_path}")
    names = [str(n) for n in json.loads(names_path.read_text())]
  return Run(str(workdir), str(ckpt_dir), step, config, names)


def restore_params(run: Run, target: Any) -> Any:
  """The subtree `target` (ShapeDtypeStructs, shaped like the saved params) of the saved params.

  Partial restore: a PyTreeRestore of the `state` item whose target holds only
  {"params": target}; the optimizer moments and the data iterator state are not read.
  """
  sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  item = {"params": jax.tree.map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), target)}
  args = ocp.args.PyTreeRestore(
      item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
      partial_restore=True)
  mgr = _manager(run.checkpoints_dir)
  try:
    out = mgr.restore(run.step, args=ocp.args.Composite(state=args))
  except (ValueError, KeyError, TypeError, FileNotFoundError) as e:
    raise CheckpointError(f"{run.step_dir}: its parameters do not match the model of "
                          f"{run.workdir}/config.json: {e}") from e
  finally:
    mgr.close()
  return out["state"]["params"]


def _restore_model(run: Run, make, subtree: str | None = None):
  """(graphdef, state) of the module `make()` with its parameters from the checkpoint.

  `subtree`: the module is that subtree of the saved params (e.g. "encoder").
  """
  abstract = nnx.eval_shape(make)
  graphdef, state = nnx.split(abstract)
  target = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
  if subtree is None:
    params = restore_params(run, target)
  else:
    params = restore_params(run, {subtree: target})[subtree]
  nnx.replace_by_pure_dict(state, params)
  return graphdef, state


def _dtype(config):
  return train.DTYPES[config.model.get("dtype", "float32")]


# ----- Clip preparation ---------------------------------------------------------------------

@dataclasses.dataclass
class PreparedClip:
  path: str
  audio: np.ndarray | None  # (audio_frames, 128) float32, normalized
  video: np.ndarray | None  # (10, S, S, 3) float32, ImageNet-normalized
  modality: str  # AUDIO_VISUAL, AUDIO_ONLY or VISUAL_ONLY
  reason: str  # why a modality is missing; "" for audio-visual


def _decode(path):
  """(frames uint8 or None, waveform or None, modality, reason) as data_prep.build decodes."""
  kw = dict(max_seconds=build.MAX_SECONDS)
  try:
    clip = media.decode_clip(path, num_frames=build.NUM_FRAMES, image_size=build.IMAGE_SIZE,
                             sample_rate=build.SAMPLE_RATE, **kw)
    return clip.frames, clip.waveform, AUDIO_VISUAL, ""
  except media.ClipError as e:
    if e.reason not in _FALLBACK:
      raise
    modality, reason = _FALLBACK[e.reason]
  try:
    if modality == VISUAL_ONLY:
      frames = media.decode_frames(path, num_frames=build.NUM_FRAMES,
                                   image_size=build.IMAGE_SIZE, **kw)
      return frames, None, modality, reason
    wave = media.decode_audio(path, sample_rate=build.SAMPLE_RATE, **kw)
    return None, wave, modality, reason
  except media.ClipError as e:
    # Neither modality is usable: say why for both.
    raise media.ClipError(e.path, e.reason, f"{e.detail or e.reason}; and {reason}") from None


def prepare_clip(path, *, audio_frames: int, image_size: int) -> PreparedClip:
  """Model inputs of one media file; raises media.ClipError (file and reason) if unusable."""
  path = str(path)
  frames, wave, modality, reason = _decode(path)
  audio = video = None
  if wave is not None:
    # float16 as stored by data_prep.build, then the eval pipeline's pad/cut + normalize.
    feats = fbank_lib.fbank(wave, sample_rate=build.SAMPLE_RATE).astype(np.float16)
    audio = fbank_lib.normalize(_eval_audio({"id": path, "fbank": feats}, audio_frames))
  if frames is not None:
    # The JPEG round trip of the stored frames, then the eval pipeline's resize + normalize.
    ex = {"id": path, "frames": [media.encode_jpeg(f) for f in frames]}
    video = np.empty((len(frames), image_size, image_size, 3), np.float32)
    for t in range(len(frames)):
      augment.normalize_image(_eval_frame(ex, t, image_size), out=video[t])
  return PreparedClip(path, audio, video, modality, reason)


# ----- Classification -----------------------------------------------------------------------

@dataclasses.dataclass
class Prediction:
  path: str
  modality: str  # AUDIO_VISUAL, AUDIO_ONLY or VISUAL_ONLY
  reason: str  # why a modality is missing; "" for audio-visual
  top: list[tuple[str, float]]  # (class name, score), best first
  probs: np.ndarray  # (C,) float32: sigmoid (bce) or softmax (ce) scores


# Module-level and jitted with the graphdef static: a second Predictor / Embedder of the same
# model (e.g. another step of the run) reuses the compiled functions.

@functools.partial(jax.jit, static_argnums=(0, 1))
def _audio_only(graphdef, loss, state, audio):
  model = nnx.merge(graphdef, state)
  return finetuning.probabilities(model(audio=audio[None]), loss)[0]


@functools.partial(jax.jit, static_argnums=(0, 1))
def _visual_only(graphdef, loss, state, video):
  model = nnx.merge(graphdef, state)
  # Per-frame scores, averaged.
  return finetuning.probabilities(model(video=video), loss).mean(axis=0)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _audio_visual(graphdef, loss, state, audio, video):
  """= model(audio=audio repeated per frame, video=frames), averaged; the audio encoded once."""
  model = nnx.merge(graphdef, state)
  a = model.encoder(audio[None], "a")
  a = jnp.broadcast_to(a, (video.shape[0],) + a.shape[1:])
  f = model.fuse(a, model.encoder(video, "v"))
  return finetuning.probabilities(model.head_av(f).astype(jnp.float32), loss).mean(axis=0)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _pooled(graphdef, modality, state, x):
  """Mean-pooled tokens of one input, float32 as the retrieval eval computes them."""
  encoder = nnx.merge(graphdef, state)
  return encoder(x[None], modality).astype(jnp.float32).mean(axis=1)[0]


class Predictor:
  """Class scores of media files from a finetuning run."""

  def __init__(self, run: Run, graphdef, state):
    self.run = run
    self.config = run.config
    self.label_names = list(run.label_names)
    self.loss = run.config.finetune.loss
    self._graphdef, self._state = graphdef, state

  @classmethod
  def load(cls, checkpoint: str) -> "Predictor":
    run = load_run(checkpoint)
    config = run.config
    if config.get("mode") == "pretrain":
      raise CheckpointError(f"{checkpoint}: a pretraining run has no classification heads; "
                            "use Embedder / python -m avsiam_jax.embed for its embeddings")
    if config.get("mode") != "finetune":
      raise CheckpointError(f"{checkpoint}: config.mode {config.get('mode')!r} is not "
                            "'finetune'")
    loss = config.get("finetune", {}).get("loss")
    if loss not in LOSSES:
      raise CheckpointError(f"{checkpoint}: config.finetune.loss must be one of {LOSSES}, "
                            f"got {loss!r}")
    spec = ClassifierSpec(encoder=train.model_spec(config).encoder,
                          num_classes=len(run.label_names), mm_depth=config.model.mm_depth)
    graphdef, state = _restore_model(
        run, lambda: AVSiamClassifier(spec, rngs=nnx.Rngs(0), dtype=_dtype(config)))
    return cls(run, graphdef, state)

  def prepare(self, path) -> PreparedClip:
    m = self.config.model
    return prepare_clip(path, audio_frames=m.audio_frames, image_size=m.image_size)

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

class Embedder:
  """Mean-pooled encoder features of media files, as the zero-shot retrieval eval computes them."""

  def __init__(self, run: Run, graphdef, state):
    self.run = run
    self.config = run.config
    self.frame = int(run.config.get("eval", {}).get("frame", 5))
    self.dim = train.model_spec(run.config).encoder.width
    self._graphdef, self._state = graphdef, state

  @classmethod
  def load(cls, checkpoint: str) -> "Embedder":
    """Any run: pretraining (AVSiam) and finetuning (classifier) params share `encoder`."""
    run = load_run(checkpoint)
    spec = train.model_spec(run.config).encoder
    graphdef, state = _restore_model(
        run, lambda: Encoder(spec, rngs=nnx.Rngs(0), dtype=_dtype(run.config)), "encoder")
    return cls(run, graphdef, state)

  def prepare(self, path) -> PreparedClip:
    m = self.config.model
    return prepare_clip(path, audio_frames=m.audio_frames, image_size=m.image_size)

  def embed_inputs(self, audio: np.ndarray | None, video: np.ndarray | None):
    """(audio (D,) or None, video (D,) or None) of prepared inputs; video uses one frame."""
    g, state = self._graphdef, self._state
    a = None if audio is None else np.asarray(_pooled(g, "a", state, audio))
    v = None if video is None else np.asarray(_pooled(g, "v", state, video[self.frame]))
    return a, v

  def embed(self, path):
    clip = self.prepare(path)
    return self.embed_inputs(clip.audio, clip.video)

