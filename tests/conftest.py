"""Test set-up: 8 virtual CPU devices, so sharding tests run on one machine.

Tests compile many small programs and run each a few times, so LLVM's expensive passes are
skipped (numerics unchanged: the golden comparisons hold). Tests that compile large train
steps also lower the backend optimization level for those programs (test_sharding.compile_fast).
"""
import atexit
import os
import shutil
import tempfile

import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                      "--xla_llvm_disable_expensive_passes=true")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Many tests (and the processes some of them start) compile the same train steps: one XLA
# compilation cache per test session, shared through the environment, compiles each once.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # pytest-xdist workers inherit it
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="avsiam_tests_xla_cache_")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


def data_file(*parts: str) -> str:
  """A file shipped in tests/data; a missing one fails the test that needs it, never skips it."""
  path = os.path.join(DATA, *parts)
  if not os.path.exists(path):
    raise FileNotFoundError(f"test data {path} is missing from the checkout")
  return path


@pytest.fixture(scope="session")
def demo_dataset(tmp_path_factory):
  """One small demo dataset (40 train and 10 eval clips of 4 classes) for every test that trains."""
  from avsiam_jax.data import demo  # pylint: disable=import-outside-toplevel
  return demo.ensure_demo_dataset(str(tmp_path_factory.mktemp("demo") / "ds"), 40, 10, seed=0)


@pytest.fixture(scope="session")
def pretrained_run(tmp_path_factory, demo_dataset):
  """A pretraining run of two steps on the demo dataset: what the finetuning tests start from."""
  from avsiam_jax import train  # pylint: disable=import-outside-toplevel
  from tests.test_train import tiny_config  # pylint: disable=import-outside-toplevel
  pre = tiny_config()
  pre.data.demo, pre.data.dir, pre.total_steps = False, demo_dataset, 2
  pre_dir = str(tmp_path_factory.mktemp("pre"))
  train.run(pre, pre_dir)
  return pre_dir


def build(config, num_devices: int = 1, *, num_classes: int = 0, steps_per_epoch: int = 10):
  """(spec, mesh, task, TrainFns) of a ConfigDict on the first `num_devices` devices, built as
  the trainer builds them (the stage is config.mode's: finetune, or else pretrain)."""
  # pylint: disable=import-outside-toplevel
  import jax
  from avsiam_jax import config as config_lib
  from avsiam_jax import sharding, state, train
  from avsiam_jax.weights import provenance
  spec = provenance.from_weights(config_lib.parse(config, num_devices))
  mesh = sharding.make_mesh(spec.mesh, jax.devices()[:num_devices])
  task = train.make_task(spec, "finetune" if spec.mode == "finetune" else "pretrain", num_classes)
  return spec, mesh, task, state.make_train_fns(task, mesh, steps_per_epoch)
