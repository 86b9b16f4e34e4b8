"""Random token masking in static shapes.

Multi-ratio masking gives each ratio a fixed fraction of the batch, so every ratio group is one
fixed-shape encoder call. Groups are formed inside each of `batch_shards` contiguous slices of the
batch (one per data-parallel device), so a device only ever gathers its own examples.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp


def kept_count(num_tokens: int, ratio: float) -> int:
  """Tokens kept at a mask ratio: int(N * (1 - r)), as the released code (196 -> 156 at 0.2)."""
  if not 0.0 <= ratio < 1.0:
    raise ValueError(f"mask ratio must be in [0, 1), got {ratio}")
  # Round first so that float error cannot drop an exact count by one.
  return max(1, int(round(num_tokens * (1.0 - ratio), 6)))


def check_groups(batch: int, num_groups: int, batch_shards: int) -> None:
  """Fails unless every data shard splits evenly into the ratio groups."""
  if batch % batch_shards:
    raise ValueError(f"batch {batch} is not divisible by its {batch_shards} data shards")
  local = batch // batch_shards
  if local % num_groups:
    raise ValueError(
        f"per-shard batch {local} (batch {batch} / {batch_shards} shards) is not divisible by "
        f"the {num_groups} mask-ratio groups; use a batch that is a multiple of "
        f"{num_groups * batch_shards}")


def group_permutation(key, batch: int, num_groups: int, batch_shards: int):
  """(S, G, g) local example indices: group k of shard s holds examples perm[s, k]."""
  check_groups(batch, num_groups, batch_shards)
  local = batch // batch_shards
  keys = jax.random.split(key, batch_shards)
  perm = jax.vmap(lambda k: jax.random.permutation(k, local))(keys)
  return perm.reshape(batch_shards, num_groups, local // num_groups)


def take_group(x_BxN, perm_SxGxg, k: int):
  """Examples of group k, shard by shard: (B, ...) -> (S * g, ...)."""
  s, _, g = perm_SxGxg.shape
  x = x_BxN.reshape(s, -1, *x_BxN.shape[1:])
  idx = perm_SxGxg[:, k].reshape(s, g, *([1] * (x.ndim - 2)))
  return jnp.take_along_axis(x, idx, axis=1).reshape(s * g, *x_BxN.shape[1:])


def untake_groups(groups: Sequence[jax.Array], perm_SxGxg):
  """Inverse of take_group over all groups: per-group (S * g, ...) arrays -> (B, ...)."""
  s, _, g = perm_SxGxg.shape
  cat = jnp.concatenate([y.reshape(s, g, *y.shape[1:]) for y in groups], axis=1)
  inv = jnp.argsort(perm_SxGxg.reshape(s, -1), axis=1)
  inv = inv.reshape(*inv.shape, *([1] * (cat.ndim - 2)))
  out = jnp.take_along_axis(cat, inv, axis=1)
  return out.reshape(-1, *out.shape[2:])


def random_keep(key, x_BxNxD, num_keep: int):
  """Keeps num_keep distinct random tokens per example; returns (kept, ids_keep, ids_restore)."""
  b, n = x_BxNxD.shape[:2]
  ids_shuffle = jnp.argsort(jax.random.uniform(key, (b, n)), axis=1)
  ids_restore = jnp.argsort(ids_shuffle, axis=1)
  ids_keep = ids_shuffle[:, :num_keep]
  kept = jnp.take_along_axis(x_BxNxD, ids_keep[..., None], axis=1)
  return kept, ids_keep, ids_restore


def masked_positions(ids_restore_BxN, num_keep: int):
  """1.0 where a token was masked, in the original token order."""
  return (ids_restore_BxN >= num_keep).astype(jnp.float32)
