"""The optimizer both stages use: Adam with torch's L2 weight decay and a step-decay schedule."""
from __future__ import annotations

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
