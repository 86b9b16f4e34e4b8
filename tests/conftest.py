"""Test set-up: 8 virtual CPU devices, so sharding tests run on one machine.

Tests compile many small programs and run each a few times, so the CPU backend compiles them
cheaply: LLVM's expensive passes skipped, backend optimization level 0 and no fusion emitters
(more than halves compile time; the ViT goldens hold; test_fbank checks its goldens at XLA's
default level). The processes tests start inherit the flags.
"""
import atexit
import os
import shutil
import tempfile

import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                      "--xla_llvm_disable_expensive_passes=true "
                      "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false")
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


@pytest.fixture(scope="session")
def unlabeled_dataset(demo_dataset, tmp_path_factory):
  """The demo dataset's clips in a dataset without labels (the format of MSR-VTT's: no
  vocabulary, every clip's labels empty)."""
  # pylint: disable=import-outside-toplevel
  import numpy as np
  from avsiam_jax.data import records
  splits = {}
  for split in ("train", "eval"):
    source = records.open_split(demo_dataset, split)
    splits[split] = [[dict(source[i], labels=np.zeros(0, np.int32)) for i in range(len(source))]]
  out = str(tmp_path_factory.mktemp("unlabeled") / "ds")
  records.write_dataset(out, splits, label_ids=[])
  return out


@pytest.fixture(scope="session")
def pretrained_run(unlabeled_dataset, tmp_path_factory):
  """Two pretraining steps (tests/test_train.tiny_config) on the demo clips without their
  labels: what finetuning tests start from, and a run to evaluate on other data.
  {"work": the run directory, "results": its results}."""
  # pylint: disable=import-outside-toplevel
  from avsiam_jax import train
  from tests.test_train import tiny_config
  config = tiny_config()
  config.data.demo, config.data.dir, config.total_steps = False, unlabeled_dataset, 2
  work = str(tmp_path_factory.mktemp("pretrained") / "run")
  return {"work": work, "results": train.run(config, work)}
