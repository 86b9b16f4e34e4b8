"""The mask-ratio groups of one modality packed into rows for a single encoder call.

The encoder is shared by every group, so G groups of kept tokens (audio at ratios 0-0.8:
512/409/307/204/102) need not be G calls: pairing the longest group with the shortest gives rows
of nearly equal length (614/613/614) that run as one batch through the blocks' matmuls, with
attention restricted to each row's segments (NaViT-style packing). The layout follows from the
group sizes alone, so attention slices every segment out of the rows (layers.Attention) and
computes no scores between examples or on padding. Rows are formed inside each data shard, as
the groups are (masking.py).
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import einops
import jax.numpy as jnp


def _twin(row_set: tuple[int, ...]) -> bool:
  """A set pairing two examples of one group."""
  return len(row_set) == 2 and row_set[0] == row_set[1]


@dataclasses.dataclass(frozen=True)
class Plan:
  """How the groups of one shard become rows.

  lengths: kept tokens per group; per_group: examples per group and shard; sets: the row sets,
  each the groups of its segments: (i, j) puts example t of group i and of group j in one row,
  (k, k) two examples of group k, (k,) one; length: tokens per row (padded up to).
  """
  lengths: tuple[int, ...]
  per_group: int
  sets: tuple[tuple[int, ...], ...]
  length: int

  def rows(self, row_set: tuple[int, ...]) -> int:
    """Rows of a set per shard."""
    if _twin(row_set):
      return -(-self.per_group // 2)
    return self.per_group

  @property
  def rows_per_shard(self) -> int:
    return sum(self.rows(s) for s in self.sets)

  @property
  def padding(self) -> int:
    """Padded token slots per shard."""
    return self.rows_per_shard * self.length - self.per_group * sum(self.lengths)


def make_plan(lengths: Sequence[int], per_group: int) -> Plan:
  """Longest with shortest; an odd middle group pairs with itself or rides alone, whichever pads
  fewer tokens."""
  lengths = tuple(int(n) for n in lengths)
  order = sorted(range(len(lengths)), key=lambda k: -lengths[k])
  pairs = tuple((order[i], order[-1 - i]) for i in range(len(order) // 2))
  if len(order) % 2 == 0:
    candidates = [pairs]
  else:
    mid = order[len(order) // 2]
    candidates = [pairs + ((mid,),)]
    if per_group > 1:
      candidates.append(pairs + ((mid, mid),))
  plans = []
  for sets in candidates:
    length = max(sum(lengths[k] for k in s) for s in sets)
    plans.append(Plan(lengths, per_group, sets, length))
  return min(plans, key=lambda p: p.padding)


def _pad_tokens(x_SxRxNxD, length: int):
  return jnp.pad(x_SxRxNxD, ((0, 0), (0, 0), (0, length - x_SxRxNxD.shape[2]), (0, 0)))


def pack(groups: Sequence, plan: Plan, shards: int):
  """Per-group tokens [(S * g, n_k, D)] (take_group order) -> rows (S * R, L, D)."""
  g = plan.per_group
  per_shard = [x.reshape(shards, g, *x.shape[1:]) for x in groups]
  sets = []
  for s in plan.sets:
    if len(s) == 1:
      x = per_shard[s[0]]
    elif not _twin(s):
      x = jnp.concatenate([per_shard[s[0]], per_shard[s[1]]], axis=2)
    else:
      x = per_shard[s[0]]
      if g % 2:  # a zero example fills the last row; its segment is dropped at pooling
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 0), (0, 0)))
      x = einops.rearrange(x, "s (r two) n d -> s r (two n) d", two=2)
    sets.append(_pad_tokens(x, plan.length))
  rows = jnp.concatenate(sets, axis=1)
  return rows.reshape(-1, *rows.shape[2:])


@dataclasses.dataclass(frozen=True)
class Segments:
  """Where pack put the examples, static: attention runs on each segment's slice of the rows.

  shards: data shards (rows are shard-major); rows: rows per shard; length: tokens per row;
  sets: per row set (first row, rows, lengths of its segments from token 0 on; the rest is
  padding).
  """
  shards: int
  rows: int
  length: int
  sets: tuple[tuple[int, int, tuple[int, ...]], ...]


def segments(plan: Plan, shards: int) -> Segments | None:
  """The plan's Segments; None where every row is one whole example: nothing to restrict."""
  sets, r0 = [], 0
  for s in plan.sets:
    sets.append((r0, plan.rows(s), tuple(plan.lengths[k] for k in s)))
    r0 += plan.rows(s)
  if all(spans == (plan.length,) for _, _, spans in sets):
    return None
  return Segments(shards, plan.rows_per_shard, plan.length, tuple(sets))


def pooled_groups(rows_SRxLxD, plan: Plan, shards: int) -> list:
  """Mean of every segment of encoded rows, float32, back in groups: [(S * g, D)], as
  model.pool of each group's own tokens."""
  g = plan.per_group
  y = rows_SRxLxD.reshape(shards, plan.rows_per_shard, *rows_SRxLxD.shape[1:])
  out, r0 = [None] * len(plan.lengths), 0
  for s in plan.sets:
    r = plan.rows(s)
    rows, start, means = y[:, r0:r0 + r], 0, []
    for k in s:
      means.append(rows[:, :, start:start + plan.lengths[k]].astype(jnp.float32).mean(axis=2))
      start += plan.lengths[k]
    if _twin(s):
      both = einops.rearrange(jnp.stack(means, axis=2), "s r two d -> s (r two) d")
      out[s[0]] = both[:, :g]
    else:
      for k, m in zip(s, means):
        out[k] = m
    r0 += r
  return [x.reshape(shards * g, -1) for x in out]
