"""Mesh from config and logical-axis rules: the only place that knows about devices."""
from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
# The batch is split over every axis that holds different examples.
BATCH_AXES = ("data", "fsdp")


def mesh_shape(mesh_config, num_devices: int) -> tuple[int, ...]:
  """Resolves one -1 entry to the remaining devices; checks the product."""
  shape = [int(mesh_config[a]) for a in MESH_AXES]
  if shape.count(-1) > 1:
    raise ValueError(f"config.mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, shape))}")
  if any(s == 0 or s < -1 for s in shape):
    raise ValueError(f"config.mesh: axis sizes must be positive or -1, got {shape}")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if num_devices % known:
      raise ValueError(f"config.mesh {dict(zip(MESH_AXES, shape))} does not divide the "
                       f"{num_devices} devices present")
    shape[shape.index(-1)] = num_devices // known
  if math.prod(shape) != num_devices:
    raise ValueError(f"config.mesh {dict(zip(MESH_AXES, shape))} needs {math.prod(shape)} devices, "
                     f"{num_devices} are present")
  return tuple(shape)


def make_mesh(mesh_config, devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(mesh_config, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
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
