"""Orbax checkpoints of the train state together with the input iterator's state."""
from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


class Checkpointer:
  """Saves {state, data} every `every_steps` steps (asynchronously) and restores the latest."""

  def __init__(self, directory: str, *, every_steps: int, keep: int):
    self.every_steps = every_steps
    self.directory = os.path.abspath(directory)
    # Handlers named up front so that a fresh manager can read a step's metadata before
    # restoring anything.
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def due(self, step: int) -> bool:
    return self.every_steps > 0 and step % self.every_steps == 0

  def save(self, step: int, state: Any, data_state: Any) -> bool:
    """Starts an asynchronous save; arrays are copied off the devices before it returns."""
    if step == self.manager.latest_step():
      return False
    return self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)), force=True)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, Any]:
    """Restores onto the shardings carried by `abstract_state` (ShapeDtypeStructs).

    The stored tree, shapes and dtypes are checked first: a checkpoint from another model
    raises ValueError before any array is read.
    """
    stored = self.manager.item_metadata(step)["state"]
    if stored is not None:
      check_compatible(getattr(stored, "tree", stored), abstract_state,
                       os.path.join(self.directory, str(step)))
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    return out["state"], out["data"]

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_with_shardings(shapes: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      shapes, shardings)


def _flat(tree) -> dict[str, Any]:
  """'params/encoder/blocks/0/attn/qkv' -> leaf; dict keys, list indices and namedtuple
  fields (which orbax stores as dicts) all become path parts."""
  def part(k):
    for attr in ("key", "idx", "name"):
      if hasattr(k, attr):
        return str(getattr(k, attr))
    return str(k)
  return {"/".join(part(k) for k in path): leaf
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


HINT = ("was it written with another config.model (variant, image_size, audio_frames, mel_bins, "
        "mm_depth, decoder_*) or config.pretrain.separate_optimizers? Resume with the config it "
        "was trained with, or use a fresh workdir")


def check_compatible(stored: Any, abstract: Any, where: str) -> None:
  """Raises ValueError at the first path whose presence, shape or dtype differ."""
  got, want = _flat(stored), _flat(abstract)
  # Parameters first: their paths say more than the optimizer moments that mirror them.
  params_first = lambda paths: sorted(paths, key=lambda p: not p.startswith("params/"))
  for path in params_first(want):
    a = want[path]
    if path not in got:
      raise ValueError(f"checkpoint {where} has no {path} (shape {tuple(a.shape)}), which the "
                       f"current model needs: {HINT}")
    s = got[path]
    if tuple(s.shape) != tuple(a.shape):
      raise ValueError(f"checkpoint {where} does not fit the current model: {path} has shape "
                       f"{tuple(s.shape)} in the checkpoint but {tuple(a.shape)} in the model; "
                       f"{HINT}")
    if np.dtype(s.dtype) != np.dtype(a.dtype):
      raise ValueError(f"checkpoint {where} does not fit the current model: {path} has dtype "
                       f"{np.dtype(s.dtype)} in the checkpoint but {np.dtype(a.dtype)} in the "
                       f"model; {HINT}")
  extra = params_first(p for p in got if p not in want)
  if extra:
    more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
    raise ValueError(f"checkpoint {where} holds {extra[0]} (shape {tuple(got[extra[0]].shape)})"
                     f"{more}, which the current model lacks: {HINT}")
