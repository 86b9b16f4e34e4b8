"""Mesh from config.mesh and logical-axis rules: the only place that knows about devices."""
from __future__ import annotations

import functools
import math
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from avsiam_jax.config import BATCH_AXES, MESH_AXES, MeshSpec
from avsiam_jax.models import layers


def make_mesh(mesh: MeshSpec, devices=None) -> Mesh:
  """The mesh of config.mesh on `devices` (default: all), as many as its shape needs."""
  devices = jax.devices() if devices is None else devices
  if math.prod(mesh.shape) != len(devices):
    raise ValueError(f"mesh {dict(zip(MESH_AXES, mesh.shape))} needs {math.prod(mesh.shape)} "
                     f"devices, got {len(devices)}")
  return jax.make_mesh(mesh.shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def batch_shards(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def logical_to_spec(axes, rules: dict[str, Any]) -> P:
  return P(*(rules.get(a) if a is not None else None for a in axes))


def param_shardings(abstract_params: nnx.State, mesh: Mesh, rules: dict[str, Any]):
  """NamedSharding per parameter from its `logical_axes` metadata, as a pure dict."""
  def one(v):
    if v.ndim < 2:  # norm scales and biases: tiny, read by every call, kept whole
      return NamedSharding(mesh, P())
    axes = v.get_metadata().get("logical_axes", (None,) * v.ndim)
    return NamedSharding(mesh, _fit(logical_to_spec(axes, rules), v.shape, mesh))
  shardings = jax.tree.map(one, abstract_params, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return nnx.to_pure_dict(shardings)


def _fit(spec: P, shape, mesh: Mesh) -> P:
  """`spec` with each dimension that does not split evenly left unsharded rather than padded."""
  def size(axis) -> int:
    return math.prod(mesh.shape[a] for a in ((axis,) if isinstance(axis, str) else axis or ()))
  return P(*(a if dim % size(a) == 0 else None for dim, a in zip(shape, spec)))


def with_activation_rules(fn, mesh: Mesh, rules: dict[str, Any]):
  """`fn` whose traced activations follow `rules` (layers.constrain): "batch" over the batch
  axes, "heads" and "mlp" where the parameters' axes of those names go, axes the rules do not
  name ("tokens", "act_embed") whole on every device."""
  rules = {**rules, "batch": BATCH_AXES}

  def pin(x, axes):
    spec = _fit(logical_to_spec(axes, rules), x.shape, mesh)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))

  def traced(*args, **kwargs):
    with layers.constraining(pin):
      return fn(*args, **kwargs)
  return functools.update_wrapper(traced, getattr(fn, "func", fn))  # jit names it as fn


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Host-local numpy batch -> global arrays sharded over the batch axes."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch)
