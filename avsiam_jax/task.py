"""What the trainer asks of a task: train.py's loop and state.py's compiled steps call these and
nothing else, so a new objective is a new class (and an entry in train.TASKS), not a new loop.

Implemented by pretraining.PretrainTask, finetuning.FinetuneTask and
retrieval_finetuning.RetrievalFinetuneTask, which subclass `Task` to declare it (and take its
defaults); any class with these members passes as one.
"""
from __future__ import annotations

from typing import ClassVar, Iterator, Optional, Protocol, runtime_checkable

from flax import nnx

from avsiam_jax.config import RunSpec, Schedule


@runtime_checkable
class Task(Protocol):
  name: ClassVar[str]                  # logs, the final plot's title
  batch_keys: ClassVar[tuple[str, ...]]  # what a train batch holds
  uses_labels: ClassVar[bool]          # trains on the dataset's label names (num_classes)
  spec: RunSpec
  schedule: Schedule                   # this stage's batch size, epochs and learning rate
  selection_metric: str                # selection.METRICS: what picks the best epoch
  random_init_warning: ClassVar[str] = ""  # logged when training starts from the fresh draw
  title: ClassVar[str] = ""            # the stage in run()'s logs ("Pretraining")
  about: ClassVar[str] = ""            # what it trains and evaluates, for those logs

  @classmethod
  def eval_spec(cls, spec: RunSpec, run_config) -> RunSpec:
    """The spec that evaluates (mode=eval) a run of this task whose config.json is
    `run_config`: by default the command's own."""
    del run_config
    return spec

  def model(self, rngs: nnx.Rngs) -> nnx.Module:
    """A fresh model drawn from `rngs`."""

  def opt_groups(self, param_keys) -> dict[str, tuple[str, ...]]:
    """{optimizer name: the top-level parameters it updates}, stepped in this order."""

  def lr_multipliers(self, params) -> Optional[dict]:
    """A params-shaped tree of learning-rate factors, or None: every factor 1."""
    del params
    return None

  def train_step(self, state: dict, batch: dict, key, *, graphdef, groups,
                 schedule) -> tuple[dict, dict]:
    """(new state, metrics): one step; groups: optim.make_groups of opt_groups."""

  def eval_step(self, params: dict, batch: dict, *, graphdef) -> dict:
    """Per-clip outputs the Evaluator scores ("feat_a"/"feat_v", a classifier's "probs_*")."""

  def train_iterator(self, ds_dir: str, **common) -> Iterator[dict]:
    """Host batches of the training split, with get_state/set_state for checkpoints."""

  def log_fields(self, metrics: dict) -> str:
    """The task's part of a progress line."""

  def check_sources(self) -> None:
    """Raises ConfigError, before any compute, for a weight source that cannot be read."""
    return None

  def init_source(self) -> str:
    """Where starting weights come from ("": the fresh draw)."""

  def init_params(self, params: dict, key) -> dict:
    """Host `params` (the fresh state's, drawn from `key`) with init_source's weights in."""

