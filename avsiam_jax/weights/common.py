"""Shared pieces of the weight converters: reading tensor files, strict key bookkeeping.

Every converter reads a flat {name: array} dict through `Source` (each key must be taken or
dropped with a reason) and writes the model's pure-dict params through `Target` (each leaf
must be filled from the source or declared freshly initialized). Both raise `WeightError`
naming the first key that does not fit.
"""
from __future__ import annotations

import os
from typing import Any, Iterable

import numpy as np

from avsiam_jax import trees


class WeightError(ValueError):
  """A source file that does not fit the model: names the offending key."""


class SpecMismatch(WeightError):
  """The model spec (config) cannot reproduce the source: names the config key to set."""


def require(spec_value, wanted, config_key: str, why: str) -> None:
  if spec_value != wanted:
    raise SpecMismatch(f"{why}: set {config_key} = {wanted!r} (it is {spec_value!r})")


# ----- reading files ------------------------------------------------------------------------

TORCH_MISSING = (
    "reading {path!r} needs PyTorch, which is not installed. Install the optional extra "
    "(`pip install torch --index-url https://download.pytorch.org/whl/cpu`), or re-save the "
    "state dict as .safetensors (safetensors.torch.save_file) on a machine that has torch; "
    ".npz and .safetensors files need no torch.")


def _to_numpy(a) -> np.ndarray:
  a = np.asarray(a)
  if a.dtype.type is np.void and a.dtype.itemsize == 2:
    # numpy stores bfloat16 as a 2-byte void (big_vision npz files).
    import ml_dtypes  # pylint: disable=import-outside-toplevel
    a = a.view(ml_dtypes.bfloat16)
  return a


def read_tensors(path: str) -> dict[str, np.ndarray]:
  """Flat {name: array} from .npz, .safetensors or a torch state dict (.pth/.pt/.bin/.ckpt)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"weight file {path!r} does not exist")
  ext = os.path.splitext(path)[1].lower()
  if ext == ".npz":
    with np.load(path, allow_pickle=False) as f:
      return {k: _to_numpy(f[k]) for k in f.files}
  if ext == ".safetensors":
    from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
    return {k: _to_numpy(v) for k, v in load_file(path).items()}
  if ext in (".pth", ".pt", ".bin", ".ckpt"):
    return _read_torch(path)
  raise WeightError(f"{path!r}: unknown weight file type {ext!r}; expected .npz, .safetensors, "
                    ".pth, .pt, .bin or .ckpt")


def _read_torch(path: str) -> dict[str, np.ndarray]:
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(TORCH_MISSING.format(path=path)) from e
  obj = torch.load(path, map_location="cpu", weights_only=True)
  obj = unwrap_state_dict(obj)
  out = {}
  for k, v in obj.items():
    if not isinstance(v, torch.Tensor):
      raise WeightError(f"{path!r}: entry {k!r} is a {type(v).__name__}, not a tensor")
    v = v.detach().cpu()
    out[k] = (v.float() if v.is_floating_point() else v).numpy()
  return out


def unwrap_state_dict(obj: Any) -> dict:
  """The state dict inside common wrappers ({'state_dict': ...}, {'model': ...})."""
  for _ in range(3):
    if isinstance(obj, dict) and len(obj) <= 4:
      inner = [k for k in ("state_dict", "model", "module", "params")
               if isinstance(obj.get(k), dict)]
      if inner:
        obj = obj[inner[0]]
        continue
    break
  if not isinstance(obj, dict):
    raise WeightError(f"expected a state dict, got {type(obj).__name__}")
  return obj


def strip_prefix(flat: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
  """Removes `prefix` (e.g. DDP's 'module.') when every key carries it."""
  if flat and all(k.startswith(prefix) for k in flat):
    return {k[len(prefix):]: v for k, v in flat.items()}
  return flat


# ----- source bookkeeping -------------------------------------------------------------------

class Source:
  """A flat tensor dict whose every key must be used (`take`) or dropped with a reason."""

  def __init__(self, flat: dict[str, np.ndarray], name: str = "source"):
    self.flat = dict(flat)
    self.name = name
    self.used: set[str] = set()
    self.dropped: dict[str, str] = {}

  def __contains__(self, key: str) -> bool:
    return key in self.flat

  def keys(self) -> list[str]:
    return list(self.flat)

  def shape(self, key: str) -> tuple[int, ...]:
    return tuple(self._get(key).shape)

  def _get(self, key: str) -> np.ndarray:
    if key not in self.flat:
      raise WeightError(f"{self.name}: missing key {key!r}")
    return self.flat[key]

  def take(self, key: str, shape: Iterable[int] | None = None) -> np.ndarray:
    """The array as float32 (shape asserted when given); marks the key used."""
    a = self._get(key)
    if shape is not None and tuple(a.shape) != tuple(shape):
      raise WeightError(f"{self.name}: key {key!r} has shape {tuple(a.shape)}, "
                        f"expected {tuple(shape)}")
    self.used.add(key)
    return np.asarray(a, np.float32)

  def peek(self, key: str) -> np.ndarray:
    return np.asarray(self._get(key), np.float32)

  def drop(self, key: str, reason: str) -> None:
    self._get(key)
    self.dropped[key] = reason

  def drop_prefix(self, prefix: str, reason: str) -> int:
    keys = [k for k in self.flat if k.startswith(prefix) and k not in self.used]
    for k in keys:
      self.dropped[k] = reason
    return len(keys)

  def finish(self) -> dict[str, str]:
    """Raises on the first key neither used nor dropped; returns {dropped key: reason}."""
    left = sorted(k for k in self.flat if k not in self.used and k not in self.dropped)
    if left:
      more = f" (and {len(left) - 1} more: {left[1:6]}...)" if len(left) > 1 else ""
      raise WeightError(f"{self.name}: unexpected key {left[0]!r} is neither converted nor "
                        f"known to be unused{more}")
    return dict(sorted(self.dropped.items()))


# ----- target bookkeeping -------------------------------------------------------------------

class Target:
  """The model's pure-dict params to fill; every leaf filled or declared fresh, shapes asserted."""

  def __init__(self, params: dict):
    self.params = params
    self.leaves = trees.flatten(params)
    self.filled: dict[str, str] = {}   # target path -> source key (or description)
    self.fresh: set[str] = set()
    self.values: dict[str, np.ndarray] = {}

  def __contains__(self, path: str) -> bool:
    return path in self.leaves

  def shape(self, path: str) -> tuple[int, ...]:
    if path not in self.leaves:
      raise WeightError(f"model has no parameter {path!r}")
    return tuple(self.leaves[path].shape)

  def put(self, path: str, value: np.ndarray, src: str) -> None:
    want = self.shape(path)
    value = np.asarray(value)
    if tuple(value.shape) != want:
      raise WeightError(f"source {src!r} -> model parameter {path!r}: shape {tuple(value.shape)} "
                        f"does not fit {want}")
    if path in self.filled:
      raise WeightError(f"model parameter {path!r} filled twice ({self.filled[path]!r}, {src!r})")
    dtype = np.dtype(getattr(self.leaves[path], "dtype", np.float32))
    self.values[path] = np.array(value, dtype=dtype)
    self.filled[path] = src

  def keep_fresh(self, prefix: str, *, optional: bool = False) -> None:
    """Declares every leaf at or under `prefix` fresh (`optional`: the model may lack it)."""
    hits = [p for p in self.leaves if p == prefix or p.startswith(prefix.rstrip("/") + "/")]
    if not hits and not optional:
      raise WeightError(f"model has no parameters under {prefix!r}")
    self.fresh.update(p for p in hits if p not in self.filled)

  def result(self) -> dict:
    """The new pure dict (host numpy leaves); raises on the first leaf neither filled nor fresh."""
    missing = sorted(p for p in self.leaves if p not in self.filled and p not in self.fresh)
    if missing:
      raise WeightError(f"model parameter {missing[0]!r} is not filled by the source "
                        f"({len(missing)} unfilled)")
    values = dict(self.values)
    for p in self.fresh:
      leaf = self.leaves[p]
      if not hasattr(leaf, "__array__"):
        raise WeightError(f"model parameter {p!r} stays fresh but `params` holds no values for it "
                          f"({type(leaf).__name__}); pass initialized params")
      values[p] = np.asarray(leaf)
    return trees.rebuild(self.params, values)
