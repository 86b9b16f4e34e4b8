"""Test set-up: 8 virtual CPU devices, so sharding tests run on one machine.

Tests compile many small programs and run each a few times, so LLVM's expensive passes are
skipped (numerics unchanged: the golden comparisons hold). Tests that compile large train
steps also lower the backend optimization level for those programs (test_sharding.compile_fast).
"""
import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                      "--xla_llvm_disable_expensive_passes=true")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SHARED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared")
