"""One process of the two-process CPU test (tests/test_multihost.py); not a test itself.

  python -m tests.multihost_worker --coordinator_address=127.0.0.1:PORT --num_processes=2 \
      --process_id=I --workdir=W --data_dir=D [--local_devices=2] [--steps=3]

Run from the repository root: the worker imports avsiam_jax and tests.test_train from there.

Starts JAX's distributed runtime through avsiam_jax.distributed.initialize (as main.py does),
runs train.run on the test config and prints one JSON line
{"process_index", "process_count", "local_devices", "global_devices", "results"}.
"""
import argparse
import json
import os


def worker_config(data_dir: str, steps: int, num_devices: int):
  """tiny_config from test_train with a prebuilt dataset, a fixed masking layout and per-step
  TensorBoard scalars; the same function builds the test's one-process reference."""
  from tests.test_train import tiny_config  # pylint: disable=g-import-not-at-top
  c = tiny_config(batch=3 * num_devices)
  c.pretrain.mask_ratios = (0.0, 0.4, 0.8)  # three groups per device keep the compile short
  c.data.demo = False
  c.data.dir = data_dir
  c.total_steps = steps
  c.log_every_steps = 1
  c.eval.batch_size = 2 * num_devices
  c.mesh.batch_shards = num_devices
  return c


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--coordinator_address", required=True)
  p.add_argument("--num_processes", type=int, required=True)
  p.add_argument("--process_id", type=int, required=True)
  p.add_argument("--workdir", required=True)
  p.add_argument("--data_dir", required=True)
  p.add_argument("--local_devices", type=int, default=2)
  p.add_argument("--steps", type=int, default=3)
  args = p.parse_args()

  # Before JAX starts a backend: this process's virtual CPU devices; cheaper CPU compiles
  # (about half the time; the numbers change by float rounding only).
  os.environ["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count={args.local_devices} "
                             "--xla_backend_optimization_level=0 "
                             "--xla_llvm_disable_expensive_passes=true")
  os.environ["JAX_PLATFORMS"] = "cpu"
  import jax  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top
  # Cross-process collectives on CPU (already the default in this JAX version).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  logging.set_verbosity(logging.INFO)
  logging.use_absl_handler()

  from avsiam_jax import distributed, train  # pylint: disable=g-import-not-at-top
  assert distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
  assert not distributed.initialize(args.coordinator_address, args.num_processes,
                                    args.process_id)  # idempotent
  config = worker_config(args.data_dir, args.steps, jax.device_count())
  results = train.run(config, args.workdir)
  print(json.dumps({"process_index": jax.process_index(), "process_count": jax.process_count(),
                    "local_devices": jax.local_device_count(),
                    "global_devices": jax.device_count(), "results": results}), flush=True)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main()
