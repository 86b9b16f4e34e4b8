"""A batch objective over micro-batches, whose gradient needs no more memory than one of them.

A loss like InfoNCE compares each example's features with every other's, so micro-batches cannot
each take the loss of their own rows. An `Objective` splits the batch's losses into
  features(params, m)      micro-batch m's inputs to the global losses (a pytree);
  global_losses(stacked)   {name: loss} of every micro-batch's features, stacked on a leading
                           (steps,) axis;
  local_losses(params, m)  {name: loss} of micro-batch m alone; the batch's is their mean.
With one micro-batch the gradient is plain autodiff of the whole objective. With more it takes
two passes: a forward-only pass collects the features, the global losses give their gradients,
and a second pass backpropagates each micro-batch's slice of those with its local losses.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Objective:
  steps: int
  features: Optional[Callable] = None       # with global_losses, or neither
  global_losses: Optional[Callable] = None
  local_losses: Optional[Callable] = None

  def _stacked_features(self, params):
    if self.steps == 1:
      return jax.tree.map(lambda x: x[None], self.features(params, 0))
    # Forward only: nothing is kept for a backward pass.
    return jax.lax.scan(lambda c, m: (c, self.features(params, m)), None,
                        jnp.arange(self.steps))[1]

  def _local(self, params):
    if self.steps == 1:
      return self.local_losses(params, 0)
    parts = jax.lax.map(lambda m: self.local_losses(params, m), jnp.arange(self.steps))
    return {k: jnp.mean(v) for k, v in parts.items()}

  def __call__(self, params):
    """(loss, parts): the losses by name (global first), and their sum."""
    parts = {}
    if self.global_losses is not None:
      parts.update(self.global_losses(self._stacked_features(params)))
    if self.local_losses is not None:
      parts.update(self._local(params))
    return sum(parts.values()), parts

  def value_and_grad(self, params):
    """((loss, parts), grads) as jax.value_and_grad(self, has_aux=True), one micro-batch at a
    time."""
    if self.steps == 1:
      return jax.value_and_grad(self, has_aux=True)(params)
    parts, d_stacked = {}, None
    if self.global_losses is not None:
      total = lambda f: (lambda p: (sum(p.values()), p))(self.global_losses(f))
      (_, parts), d_stacked = jax.value_and_grad(total, has_aux=True)(
          self._stacked_features(params))

    def micro_objective(params, m):
      """Its gradient is micro-batch m's share of the batch's; aux: its local losses."""
      total = 0.0
      if d_stacked is not None:
        for f, d in zip(jax.tree.leaves(self.features(params, m)), jax.tree.leaves(d_stacked)):
          total += jnp.vdot(f, d[m])
      local = {} if self.local_losses is None else self.local_losses(params, m)
      for loss in local.values():
        total += loss / self.steps
      return total, local

    def accumulate(grads, m):
      g, local = jax.grad(micro_objective, has_aux=True)(params, m)
      return jax.tree.map(jnp.add, grads, g), local

    grads, local = jax.lax.scan(accumulate, jax.tree.map(jnp.zeros_like, params),
                                jnp.arange(self.steps))
    parts.update({k: jnp.mean(v) for k, v in local.items()})
    return (sum(parts.values()), parts), grads
