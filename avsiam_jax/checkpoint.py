"""Checkpoints: the train state with the input iterator's state (saved and resumed by the
trainer), and run directories read back for finetuning, evaluation and inference.

A checkpoint is named by its run directory WORKDIR (the latest step is used) or by one step
directory WORKDIR/checkpoints/<step>. Reading parameters alone is a partial restore of the
`state` item: the optimizer moments and the data iterator state are not read.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

from avsiam_jax import paths, trees
from avsiam_jax.weights import load, signature

CONFIG_FILE, LABELS_FILE = "config.json", "label_names.json"
# The train state's tree and shapes: the config.model keys of the shape fields, and the optimizer.
HINT = (f"was it written with another config.model "
        f"({', '.join(signature.keys(signature.fields(('shape',))))}) or "
        "config.pretrain.separate_optimizers? Resume with the config it was trained with, or use "
        "a fresh workdir")


class CheckpointError(ValueError):
  """A checkpoint path or run directory that cannot be used, with the path in the message."""


class Checkpointer:
  """Saves {state, data} every `every_steps` steps (asynchronously) and restores the latest."""

  def __init__(self, directory: str, *, every_steps: int, keep: int):
    self.every_steps = every_steps
    self.directory = paths.absolute(directory)  # a local path or a gs:// URL
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
      trees.check_compatible(getattr(stored, "tree", stored), abstract_state,
                             os.path.join(self.directory, str(step)), HINT)
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    return out["state"], out["data"]

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_with_shardings(shapes: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      shapes, shardings)


# ----- Run directories ----------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Run:
  workdir: str
  checkpoints_dir: str
  step: int
  config: ml_collections.ConfigDict  # as recorded in config.json
  label_names: list[str] | None      # finetuning runs only

  @property
  def step_dir(self) -> str:
    return str(epath.Path(self.checkpoints_dir) / str(self.step))


def _reader(checkpoints_dir) -> ocp.CheckpointManager:
  # Only reads (no create, no cleanup, nothing to keep or delete); not read_only=True, which
  # logs warnings on every load.
  return ocp.CheckpointManager(str(checkpoints_dir), options=ocp.CheckpointManagerOptions(
      create=False, enable_async_checkpointing=False))


def _resolve(checkpoint: str):
  """(workdir, checkpoints dir, step or None) of WORKDIR or WORKDIR/checkpoints/<step>."""
  # Orbax restores only from absolute paths; URLs (gs://...) are left as they are.
  path = paths.path(paths.absolute(checkpoint))
  if (path / CONFIG_FILE).exists():
    return path, path / "checkpoints", None
  if (path.name.isdigit() and path.parent.name == "checkpoints"
      and (path.parent.parent / CONFIG_FILE).exists()):
    return path.parent.parent, path.parent, int(path.name)
  why = "does not exist" if not path.exists() else f"has no {CONFIG_FILE}"
  if (path / load.META_FILE).exists():
    why += (": it is converted weights, not a run; train from it with --config.model_init, or "
            "convert a finetuned classifier with --labels to predict with it")
  raise CheckpointError(
      f"{checkpoint}: not a run directory (WORKDIR with {CONFIG_FILE}) nor a checkpoint step "
      f"directory (WORKDIR/checkpoints/<step>); it {why}")


def _read_config(workdir) -> ml_collections.ConfigDict:
  path = workdir / CONFIG_FILE
  try:
    return ml_collections.ConfigDict(json.loads(path.read_text()))
  except (OSError, ValueError) as e:
    raise CheckpointError(f"{path}: cannot be read: {e}") from e


def run_config(checkpoint: str) -> ml_collections.ConfigDict:
  """The config.json of the run of WORKDIR or WORKDIR/checkpoints/<step>; no checkpoint read."""
  workdir, _, _ = _resolve(checkpoint)
  return _read_config(workdir)


def load_run(checkpoint: str) -> Run:
  """Resolves WORKDIR or WORKDIR/checkpoints/<step>; reads config.json (and label names)."""
  workdir, ckpt_dir, step = _resolve(checkpoint)
  steps = []
  if ckpt_dir.exists():
    mgr = _reader(ckpt_dir)
    steps = list(mgr.all_steps())
    mgr.close()
  if step is None:
    if not steps:
      raise CheckpointError(f"{checkpoint}: no finished checkpoint in {ckpt_dir}")
    step = max(steps)
  elif step not in steps:
    raise CheckpointError(f"{checkpoint}: not a finished checkpoint of {ckpt_dir} "
                          f"(finished steps: {sorted(steps) or 'none'})")
  config = _read_config(workdir)
  names = None
  if config.get("mode") == "finetune":
    names_path = workdir / LABELS_FILE
    if not names_path.exists():
      raise CheckpointError(f"{checkpoint}: finetuning run without {names_path}")
    names = [str(n) for n in json.loads(names_path.read_text())]
  return Run(str(workdir), str(ckpt_dir), step, config, names)


def restore_params(run: Run, target: Any) -> Any:
  """The subtree `target` (ShapeDtypeStructs, shaped like the saved params) of the saved params,
  on one device."""
  sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  item = {"params": jax.tree.map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), target)}
  args = ocp.args.PyTreeRestore(
      item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
      partial_restore=True)
  mgr = _reader(run.checkpoints_dir)
  try:
    out = mgr.restore(run.step, args=ocp.args.Composite(state=args))
  except (ValueError, KeyError, TypeError, FileNotFoundError) as e:
    raise CheckpointError(f"{run.step_dir}: its parameters do not match the model of "
                          f"{run.workdir}/{CONFIG_FILE}: {e}") from e
  finally:
    mgr.close()
  return out["state"]["params"]
