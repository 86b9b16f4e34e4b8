"""The optimizer both stages use: Adam with torch's L2 weight decay and a step-decay schedule,
one optimizer per group of parameters a loss reaches."""
from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from avsiam_jax.config import OptimSpec, Schedule


def lr_schedule(s: Schedule, steps_per_epoch: int):
  """Step decay in epochs: lr x rate at decay_start_epoch, and every decay_every_epochs after."""

  def schedule(step):
    epoch = step // steps_per_epoch
    decays = jnp.where(epoch >= s.decay_start_epoch,
                       (epoch - s.decay_start_epoch) // s.decay_every_epochs + 1, 0)
    return s.lr * s.decay_rate ** decays.astype(jnp.float32)
  return schedule


def scale_by_multipliers(multipliers) -> optax.GradientTransformation:
  # Adam's update is linear in the learning rate, so scaling it equals a per-group lr.
  return optax.stateless(lambda updates, params=None: jax.tree.map(
      lambda u, m: u * m, updates, multipliers))


def make_optimizer(o: OptimSpec, schedule, lr_multipliers=None) -> optax.GradientTransformation:
  """`lr_multipliers`: a tree like the params of per-parameter learning-rate factors, or None."""
  # torch.optim.Adam's weight_decay is an L2 term added to the gradient before the moments.
  parts = [optax.add_decayed_weights(o.weight_decay),
           optax.scale_by_adam(b1=o.b1, b2=o.b2, eps=1e-8),
           optax.scale_by_learning_rate(schedule)]
  if lr_multipliers is not None:
    parts.append(scale_by_multipliers(lr_multipliers))
  return optax.chain(*parts)


class OptGroup(NamedTuple):
  """One optimizer: the top-level parameter subtrees it updates, and its transformation."""
  keys: tuple[str, ...]
  tx: optax.GradientTransformation


def subset(tree: dict, keys: Sequence[str]) -> dict:
  """The top-level subtrees `keys` of a params-shaped dict."""
  return {k: tree[k] for k in keys}


def make_groups(o: OptimSpec, schedule, groups: dict[str, Sequence[str]],
                lr_multipliers=None) -> dict[str, OptGroup]:
  """{name: OptGroup} for a task's groups ({name: top-level parameter keys}), in order.

  A group's optimizer holds moments for its own parameters only and never touches the others
  (as torch skips parameters whose gradient is None), weight decay included.
  """
  return {name: OptGroup(tuple(keys), make_optimizer(
      o, schedule, None if lr_multipliers is None else subset(lr_multipliers, keys)))
          for name, keys in groups.items()}


def apply_group(group: OptGroup, grads: dict, opt_state, params: dict):
  """(new params, new optimizer state): one group's step; other parameters stay as they are."""
  updates, opt_state = group.tx.update(subset(grads, group.keys), opt_state,
                                       subset(params, group.keys))
  return {**params, **optax.apply_updates(subset(params, group.keys), updates)}, opt_state
