"""Mesh from config.mesh and logical-axis rules: the only place that knows about devices."""
from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from avsiam_jax.config import BATCH_AXES, MESH_AXES, MeshSpec


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
  def size(axis) -> int:
    return math.prod(mesh.shape[a] for a in ((axis,) if isinstance(axis, str) else axis or ()))

  def one(v):
    axes = v.get_metadata().get("logical_axes", (None,) * v.ndim)
    # A dimension that does not split evenly stays unsharded rather than padded.
    spec = [a if dim % size(a) == 0 else None
            for dim, a in zip(v.shape, logical_to_spec(axes, rules))]
    return NamedSharding(mesh, P(*spec))
  shardings = jax.tree.map(one, abstract_params, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return nnx.to_pure_dict(shardings)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Host-local numpy batch -> global arrays sharded over the batch axes."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch)
