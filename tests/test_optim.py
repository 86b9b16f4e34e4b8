"""The optimizer: the step-decay schedule in epochs, per-group learning rates."""
import numpy as np
import pytest

from avsiam_jax import optim
from avsiam_jax.config import OptimSpec, parse
from tests.test_train import tiny_config


def test_lr_step_decay_in_epochs():
  config = tiny_config()
  config.total_steps = 200  # 20 epochs of 10 steps
  config.optim.lr, config.optim.decay_rate = 1e-4, 0.5
  config.optim.decay_start_epoch, config.optim.decay_every_epochs = 10, 5
  schedule = optim.lr_schedule(parse(config, 8).pretrain.schedule, steps_per_epoch=10)
  # Paper Table 9: x0.5 at epoch 10 and every 5 epochs after.
  for step, want in ((0, 1e-4), (99, 1e-4), (100, 5e-5), (149, 5e-5), (150, 2.5e-5), (199, 2.5e-5)):
    assert float(schedule(step)) == pytest.approx(want), step


def test_first_update_is_lr_times_multiplier_times_sign():
  """Adam's first step is lr * g / (|g| + eps) ~ lr * sign(g), scaled per parameter group."""
  params = {"encoder": np.ones(3, np.float32), "head_a": np.ones(2, np.float32)}
  grads = {"encoder": np.array([1.0, -2.0, 3.0], np.float32),
           "head_a": np.array([-0.5, 4.0], np.float32)}
  mults = {"encoder": np.ones(3, np.float32), "head_a": np.full(2, 100.0, np.float32)}
  tx = optim.make_optimizer(OptimSpec(b1=0.95, b2=0.999, weight_decay=0.0),
                            lambda step: 1e-3, mults)
  updates, _ = tx.update(grads, tx.init(params), params)
  for k in params:
    np.testing.assert_allclose(updates[k], -1e-3 * mults[k] * np.sign(grads[k]), rtol=1e-5)
