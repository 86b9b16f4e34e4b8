"""The mask-ratio groups of one modality packed into rows for a single encoder call.

The encoder is shared by every group, so G groups of kept tokens need not be G calls: pairing
the longest group with the shortest gives rows of nearly equal length that run as one batch
through the blocks' matmuls, with attention restricted to each row's segments (NaViT-style
packing; the rows and what they cost: docs/benchmarks.md). The layout follows from the
group sizes alone, so attention is restricted to each segment by static slices or a static
mask (layers.segmented_attention): no example sees another or the padding. Rows are formed
inside each data shard, as the groups are (masking.py).
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import einops
import jax
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


def pack(groups: Sequence, plan: Plan, shards: int):
  """Per-group tokens [(S * g, n_k, D)] (take_group order) -> rows (S * R, L, D)."""
  pieces = []
  for s in plan.sets:
    if not _twin(s):
      pieces += [groups[k] for k in s]
      continue
    x = groups[s[0]].reshape(shards, plan.per_group, *groups[s[0]].shape[1:])
    if plan.per_group % 2:  # a zero example fills the last row; its segment is never pooled
      x = jnp.pad(x, ((0, 0), (0, 1), (0, 0), (0, 0)))
    pieces += [t.reshape(-1, *x.shape[2:]) for t in (x[:, 0::2], x[:, 1::2])]
  return join(pieces, _layout(plan, shards), axis=1)


@dataclasses.dataclass(frozen=True)
class Segments:
  """Where pack put the examples, static: attention is restricted to each segment.

  shards: data shards (rows are shard-major); rows: rows per shard; length: tokens per row;
  blocks: the rows of each of the plan's row sets, as (first row, rows, lengths of its
  segments from token 0 on; the rest is padding).
  """
  shards: int
  rows: int
  length: int
  blocks: tuple[tuple[int, int, tuple[int, ...]], ...]


def _layout(plan: Plan, shards: int) -> Segments:
  blocks, r0 = [], 0
  for s in plan.sets:
    blocks.append((r0, plan.rows(s), tuple(plan.lengths[k] for k in s)))
    r0 += plan.rows(s)
  return Segments(shards, plan.rows_per_shard, plan.length, tuple(blocks))


def segments(plan: Plan, shards: int) -> Segments | None:
  """The plan's Segments; None where every row is one whole example: nothing to restrict."""
  layout = _layout(plan, shards)
  if all(spans == (plan.length,) for _, _, spans in layout.blocks):
    return None
  return layout


def segment_ids(segments: Segments):
  """(S * R, L) int32: each token's segment number within its row, -1 on padding."""
  blocks = []
  for _, rows, spans in segments.blocks:
    ids = [jnp.full((n,), i, jnp.int32) for i, n in enumerate(spans)]
    ids.append(jnp.full((segments.length - sum(spans),), -1, jnp.int32))
    blocks.append(jnp.broadcast_to(jnp.concatenate(ids), (rows, segments.length)))
  per_shard = jnp.concatenate(blocks)
  return jnp.tile(per_shard, (segments.shards, 1))


def cut(x, segments: Segments, axis: int):
  """Every segment of packed rows, block by block: (S * R, ..., L at `axis`, ...) ->
  [(S * rows, ..., n, ...)]."""
  s = segments.shards
  x = x.reshape(s, segments.rows, *x.shape[1:])
  pieces = []
  for r0, rows, spans in segments.blocks:
    start = 0
    for n in spans:
      piece = jax.lax.slice_in_dim(x[:, r0:r0 + rows], start, start + n, axis=axis + 1)
      pieces.append(piece.reshape(s * rows, *piece.shape[2:]))
      start += n
  return pieces


def join(pieces, segments: Segments, axis: int):
  """Inverse of cut: the pieces back into rows (S * R, ..., L, ...), zero on padding."""
  s, blocks, i = segments.shards, [], 0
  for _, rows, spans in segments.blocks:
    parts = [p.reshape(s, rows, *p.shape[1:]) for p in pieces[i:i + len(spans)]]
    i += len(spans)
    pad = list(parts[0].shape)
    pad[axis + 1] = segments.length - sum(spans)
    if pad[axis + 1]:
      parts.append(jnp.zeros(pad, parts[0].dtype))
    blocks.append(jnp.concatenate(parts, axis=axis + 1))
  rows = jnp.concatenate(blocks, axis=1)
  return rows.reshape(-1, *rows.shape[2:])


def pooled_groups(rows_SRxLxD, plan: Plan, shards: int, pool) -> list:
  """`pool` ((n, tokens, D) -> (n, D), e.g. layers.mean_pool) of every segment of encoded rows,
  back in groups: [(S * g, D)], as pool of each group's own tokens."""
  d = rows_SRxLxD.shape[-1]
  pooled = iter([pool(p) for p in cut(rows_SRxLxD, _layout(plan, shards), axis=1)])
  out = [None] * len(plan.lengths)
  for s in plan.sets:
    if not _twin(s):
      for k in s:
        out[k] = next(pooled)
      continue
    pair = jnp.stack([next(pooled).reshape(shards, -1, d) for _ in s], axis=2)
    both = einops.rearrange(pair, "s r two d -> s (r two) d")[:, :plan.per_group]
    out[s[0]] = both.reshape(-1, d)
  return out
