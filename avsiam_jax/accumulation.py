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
The objective's value is the weighted sum of its losses (`weights`, 1 for a loss not named);
the losses themselves are reported unweighted.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Optional

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Objective:
  steps: int
  features: Optional[Callable] = None       # with global_losses, or neither
  global_losses: Optional[Callable] = None
  local_losses: Optional[Callable] = None
  weights: Optional[Mapping[str, float]] = None  # {loss name: its factor in the total}

  def total(self, parts: dict):
    """The weighted sum of the losses `parts`."""
    w = self.weights or {}
    return sum(w.get(k, 1.0) * v for k, v in parts.items())

  def over(self, fixed: dict) -> "Objective":
    """The same objective as a function of the top-level params not in `fixed` (held
    constant), so its gradient is taken for those only."""
    def bind(f):
      return None if f is None else (lambda params, m: f({**fixed, **params}, m))
    return dataclasses.replace(self, features=bind(self.features),
                               local_losses=bind(self.local_losses))

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
    """(loss, parts): the losses by name (global first), and their weighted sum."""
    parts = {}
    if self.global_losses is not None:
      parts.update(self.global_losses(self._stacked_features(params)))
    if self.local_losses is not None:
      parts.update(self._local(params))
    return self.total(parts), parts

  def value_and_grad(self, params):
    """((loss, parts), grads) as jax.value_and_grad(self, has_aux=True), one micro-batch at a
    time."""
    if self.steps == 1:
      return jax.value_and_grad(self, has_aux=True)(params)
    parts, d_stacked = {}, None
    if self.global_losses is not None:
      total = lambda f: (lambda p: (self.total(p), p))(self.global_losses(f))
      (_, parts), d_stacked = jax.value_and_grad(total, has_aux=True)(
          self._stacked_features(params))

    def micro_objective(params, m):
      """Its gradient is micro-batch m's share of the batch's; aux: its local losses."""
      total = 0.0
      if d_stacked is not None:
        for f, d in zip(jax.tree.leaves(self.features(params, m)), jax.tree.leaves(d_stacked)):
          total += jnp.vdot(f, d[m])
      local = {} if self.local_losses is None else self.local_losses(params, m)
      return total + self.total(local) / self.steps, local

    def accumulate(grads, m):
      g, local = jax.grad(micro_objective, has_aux=True)(params, m)
      return jax.tree.map(jnp.add, grads, g), local

    grads, local = jax.lax.scan(accumulate, jax.tree.map(jnp.zeros_like, params),
                                jnp.arange(self.steps))
    parts.update({k: jnp.mean(v) for k, v in local.items()})
    return (self.total(parts), parts), grads
