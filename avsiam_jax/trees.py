"""Nested parameter trees by path: one flattening and one stored-versus-wanted check."""
from __future__ import annotations

from typing import Any

import jax
import numpy as np


def _part(k) -> str:
  for attr in ("key", "idx", "name"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def path_str(keypath) -> str:
  """'encoder/blocks/0/attn/qkv': dict keys, list indices and namedtuple fields alike (orbax
  stores namedtuples as dicts, so a stored tree and a live one give the same paths)."""
  return "/".join(_part(k) for k in keypath)


def flatten(tree: Any) -> dict[str, Any]:
  """{path string: leaf}."""
  return {path_str(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def rebuild(tree: Any, values: dict[str, Any]) -> Any:
  """`tree`'s structure with each leaf replaced by values[its path string]."""
  return jax.tree_util.tree_map_with_path(lambda p, _: values[path_str(p)], tree)


def _shape(x) -> tuple[int, ...]:
  return tuple(np.shape(x)) if not hasattr(x, "shape") else tuple(x.shape)


def check_compatible(stored: Any, wanted: Any, where: str, hint: str = "", *,
                     what: str = "checkpoint", dtypes: bool = True, first: str = "params/"
                     ) -> None:
  """Raises ValueError at the first path whose presence, shape (or dtype) differ.

  Messages read "{what} {where} has no ...": e.g. what="checkpoint", where its directory.

  Paths starting with `first` are checked before the rest: parameter paths say more than the
  optimizer moments that mirror them.
  """
  got, want = flatten(stored), flatten(wanted)
  hint = f"; {hint}" if hint else ""
  order = lambda paths: sorted(paths, key=lambda p: not p.startswith(first))
  for path in order(want):
    a = want[path]
    if path not in got:
      raise ValueError(f"{what} {where} has no {path} (shape {_shape(a)}), which the current "
                       f"model needs{hint}")
    s = got[path]
    if _shape(s) != _shape(a):
      raise ValueError(f"{what} {where} does not fit the current model: {path} has shape "
                       f"{_shape(s)} in the {what} but {_shape(a)} in the model{hint}")
    if dtypes and np.dtype(s.dtype) != np.dtype(a.dtype):
      raise ValueError(f"{what} {where} does not fit the current model: {path} has dtype "
                       f"{np.dtype(s.dtype)} in the {what} but {np.dtype(a.dtype)} in the "
                       f"model{hint}")
  extra = order(p for p in got if p not in want)
  if extra:
    more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
    raise ValueError(f"{what} {where} holds {extra[0]} (shape {_shape(got[extra[0]])}){more}, "
                     f"which the current model lacks{hint}")
