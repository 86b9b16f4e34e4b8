"""A task's train state on a mesh: its shardings, and the compiled init, train and eval steps.

The state is {"params", "opt": {optimizer group: optax state of its parameters}, "step"};
parameters are sharded by their logical axes (config.mesh.rules), the Adam moments like their
parameters.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from avsiam_jax import checkpoint, optim, sharding
from avsiam_jax.task import Task


def abstract_model(task: Task):
  """The task's model with shapes only (nothing allocated)."""
  return nnx.eval_shape(lambda: task.model(nnx.Rngs(0)))


def create_state(task: Task, groups: dict[str, optim.OptGroup], key) -> dict:
  params = nnx.to_pure_dict(nnx.state(task.model(nnx.Rngs(params=key)), nnx.Param))
  return {"params": params,
          "opt": {n: g.tx.init(optim.subset(params, g.keys)) for n, g in groups.items()},
          "step": jnp.zeros((), jnp.int32)}


def shard_host_params(params: dict, abstract_params: dict) -> dict:
  """Host params onto the shardings of `abstract_params` (ShapeDtypeStructs with shardings)."""
  return jax.tree.map(
      lambda x, a: jax.make_array_from_callback(x.shape, a.sharding, lambda i: x[i]),
      params, abstract_params)


class EvalFns(NamedTuple):
  eval_step: Callable    # (params, eval batch) -> dict of per-clip outputs
  abstract_params: Any   # ShapeDtypeStructs with shardings
  graphdef: Any          # the model's structure; nnx.merge(graphdef, params) rebuilds it


def make_eval_fns(task: Task, mesh) -> EvalFns:
  """The compiled eval step alone: no optimizer, no state."""
  abstract = abstract_model(task)
  graphdef = nnx.graphdef(abstract)
  shapes = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
  rules = dict(task.spec.mesh.rules)
  shardings = sharding.param_shardings(nnx.state(abstract, nnx.Param), mesh, rules)
  step = sharding.with_activation_rules(functools.partial(task.eval_step, graphdef=graphdef),
                                        mesh, rules)
  eval_step = jax.jit(step, in_shardings=(shardings, sharding.batch_sharding(mesh)))
  return EvalFns(eval_step, checkpoint.abstract_with_shardings(shapes, shardings), graphdef)


class TrainFns(NamedTuple):
  init: Callable        # key -> state
  step: Callable        # (state, batch, key) -> (state, metrics); state donated
  eval_step: Callable   # (params, eval batch) -> dict of per-clip outputs
  abstract_state: Any   # ShapeDtypeStructs with shardings, for restoring
  graphdef: Any


def make_train_fns(task: Task, mesh, steps_per_epoch: int) -> TrainFns:
  """Compiled init, train step and eval step of `task`, the state sharded on `mesh`."""
  schedule = optim.lr_schedule(task.schedule, steps_per_epoch)
  ev = make_eval_fns(task, mesh)
  params_sh = jax.tree.map(lambda a: a.sharding, ev.abstract_params)
  abstract_params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                                 ev.abstract_params)
  groups = optim.make_groups(task.spec.optim, schedule, task.opt_groups(list(abstract_params)),
                             task.lr_multipliers(abstract_params))
  shapes = jax.eval_shape(functools.partial(create_state, task, groups), jax.random.key(0))
  repl = sharding.replicated(mesh)
  opt_sh = {n: optax.tree_map_params(g.tx, lambda _, s: s, shapes["opt"][n],
                                     optim.subset(params_sh, g.keys),
                                     transform_non_params=lambda _: repl)
            for n, g in groups.items()}
  shardings = {"params": params_sh, "opt": opt_sh, "step": repl}
  step_fn = sharding.with_activation_rules(
      functools.partial(task.train_step, graphdef=ev.graphdef, groups=groups, schedule=schedule),
      mesh, dict(task.spec.mesh.rules))
  init = jax.jit(functools.partial(create_state, task, groups), out_shardings=shardings)
  step = jax.jit(step_fn, in_shardings=(shardings, sharding.batch_sharding(mesh), repl),
                 out_shardings=(shardings, repl), donate_argnums=(0,))
  return TrainFns(init, step, ev.eval_step, checkpoint.abstract_with_shardings(shapes, shardings),
                  ev.graphdef)
