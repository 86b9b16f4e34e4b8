"""Random token masking in static shapes.

Multi-ratio masking gives each ratio a fixed fraction of the batch, so every ratio group is one
fixed-shape encoder call. Groups are formed inside each of `batch_shards` contiguous slices of the
batch (one per data-parallel device), so a device only ever gathers its own examples.
"""
from __future__ import annotations

from typing import Sequence

import einops
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


def mask_noise(key, batch: int, num_tokens: int):
  """Per-token noise; the tokens with the smallest values are kept."""
  return jax.random.uniform(key, (batch, num_tokens))


def multi_ratio_masks(key, batch: int, num_tokens: int, ratios: Sequence[float],
                      batch_shards: int):
  """Everything random in multi-ratio masking, drawn for the whole batch.

  Returns the (S, G, g) group permutation and per group its (S * g, N) noise, None where the
  ratio keeps every token.
  """
  key_perm, key_mask = jax.random.split(key)
  perm = group_permutation(key_perm, batch, len(ratios), batch_shards)
  s, _, g = perm.shape
  noise = tuple(
      mask_noise(jax.random.fold_in(key_mask, k), s * g, num_tokens)
      if kept_count(num_tokens, r) < num_tokens else None for k, r in enumerate(ratios))
  return perm, noise


def keep_by_noise(noise_BxN, x_BxNxD, num_keep: int):
  """Keeps the num_keep tokens of lowest noise; returns (kept, ids_keep, ids_restore)."""
  ids_shuffle = jnp.argsort(noise_BxN, axis=1)
  ids_restore = jnp.argsort(ids_shuffle, axis=1)
  ids_keep = ids_shuffle[:, :num_keep]
  kept = jnp.take_along_axis(x_BxNxD, ids_keep[..., None], axis=1)
  return kept, ids_keep, ids_restore


def masked_positions(ids_restore_BxN, num_keep: int):
  """1.0 where a token was masked, in the original token order."""
  return (ids_restore_BxN >= num_keep).astype(jnp.float32)


# ----- Micro-batches (gradient accumulation) ----------------------------------------------
# Micro-batch m takes rows [m * r / M, (m + 1) * r / M) of each shard's r rows, for the batch
# and for every ratio group alike, so a device still only touches its own examples and the
# micro-batches together hold exactly the full batch's masks.

def micro_rows(x_RxN, m, accum_steps: int, batch_shards: int):
  """Micro-batch m (may be traced) of a shard-major array: (S * r, ...) -> (S * r / M, ...)."""
  x = x_RxN.reshape(batch_shards, -1, *x_RxN.shape[1:])
  r = x.shape[1] // accum_steps
  part = jax.lax.dynamic_slice_in_dim(x, m * r, r, axis=1)
  return part.reshape(batch_shards * r, *x.shape[2:])


def join_micro(x_MxRxN, batch_shards: int):
  """Inverse of micro_rows over all m: (M, S * r / M, ...) stacked -> (S * r, ...)."""
  return einops.rearrange(x_MxRxN, "m (s r) ... -> (s m r) ...", s=batch_shards)


def micro_groups(perm_SxGxg, m, accum_steps: int):
  """Micro-batch m's rows of every (shard, group): (S, G, g) -> (S, G, g / M)."""
  gm = perm_SxGxg.shape[2] // accum_steps
  return jax.lax.dynamic_slice_in_dim(perm_SxGxg, m * gm, gm, axis=2)
