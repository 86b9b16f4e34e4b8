"""benchmarks/hlo_breakdown.py: a compiled program's FLOPs and bytes by part of the model,
against the analytic matmul counts of a small block stack (forward and backward, unrolled and
scanned)."""
import math

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from avsiam_jax.models import layers
from benchmarks import hlo_breakdown

B, N, D, HEADS, MLP, DEPTH = 2, 8, 16, 2, 32, 3


def stack_program(scan: bool, grad: bool) -> str:
  blocks = nnx.List([layers.Block(D, HEADS, MLP, streams=("x",), eps=1e-6, rngs=nnx.Rngs(i),
                                  attention="dense") for i in range(DEPTH)])
  graphdef, params = nnx.split(blocks)
  x = jnp.ones((B, N, D))

  def loss(params, x):
    return jnp.sum(layers.run_blocks(nnx.merge(graphdef, params), x, "x", scan=scan) ** 2)
  fn = jax.grad(loss, argnums=(0, 1)) if grad else loss
  return jax.jit(fn).lower(params, x).compile().as_text()


# Forward FLOPs of one block: q/k/v, output and the two MLP matmuls; the two attention products.
WEIGHT = 2 * B * N * (3 * D * D + D * D + 2 * D * MLP)
ATTENTION = 2 * (2 * B * N * N * D)


@pytest.mark.parametrize("scan", [False, True])
def test_forward_flops_by_part(scan):
  costs = hlo_breakdown.static_costs(stack_program(scan, grad=False))
  assert costs["weight matmuls"]["flops"] == DEPTH * WEIGHT
  assert costs["attention"]["flops"] == DEPTH * ATTENTION
  assert costs["norms"]["bytes"] > 0 and costs["norms"]["flops"] == 0
  assert set(costs) <= set(hlo_breakdown.PARTS)


@pytest.mark.parametrize("scan", [False, True])
def test_backward_charged_to_forward_code(scan):
  """Gradients of the weights and the input: every matmul again for its input's gradient and
  once for its weight's; attention's four backward products are its part too."""
  costs = hlo_breakdown.static_costs(stack_program(scan, grad=True))
  assert costs["weight matmuls"]["flops"] == 3 * DEPTH * WEIGHT
  assert costs["attention"]["flops"] == 3 * DEPTH * ATTENTION


def test_copies_and_frames():
  """A transpose alone is a layout copy; an instruction's frames name this project's code."""
  text = jax.jit(lambda x: jnp.transpose(x) * 1.0).lower(jnp.ones((64, 32))).compile().as_text()
  costs = hlo_breakdown.static_costs(text)
  assert list(costs) == ["layout copies"]
  assert costs["layout copies"]["bytes"] == 2 * 64 * 32 * 4  # read once, written once
  text = stack_program(scan=False, grad=False)
  module = hlo_breakdown.Module(text)
  dots = [i for i in module.instr.values() if i.op == "dot"]
  assert dots and all(any("layers.py" in path for path, _ in module.stack(i)) for i in dots)


@pytest.mark.parametrize("scan", [False, True])
def test_dots_rebuild_the_matmul_counts(scan):
  """Every executed dot with its shapes and how often it runs: their FLOPs per part add up to
  the analytic counts, forward and backward, and each rebuilds as a jax.lax.dot_general."""
  for grad, times in ((False, 1), (True, 3)):
    dots = hlo_breakdown.dots(stack_program(scan, grad=grad))
    flops = {part: sum(d.flops * n for d, n in dots.items() if d.part == part)
             for part in ("weight matmuls", "attention")}
    assert flops == {"weight matmuls": times * DEPTH * WEIGHT,
                     "attention": times * DEPTH * ATTENTION}
  for d in dots:
    out = jax.eval_shape(lambda a, b: jax.lax.dot_general(a, b, (d.contracting, d.batch)),
                         jnp.zeros(d.lhs), jnp.zeros(d.rhs))
    assert d.dtype == "float32"
    contracted = math.prod(d.lhs[i] for i in d.contracting[0])
    assert d.flops == 2 * out.size * contracted
