"""Compile-only: the real train steps compiled for a TPU slice on a machine without TPUs."""
import importlib.util
import json
import os
import platform
import sys

import pytest
from packaging.requirements import Requirement

from avsiam_jax import compile_only
from avsiam_jax.config import ConfigError
from tests.test_train import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def libtpu_has_wheels(sys_platform=sys.platform, machine=platform.machine()) -> bool:
  """Where libtpu installs (requirements-tpu.txt's marker): Linux x86-64."""
  return sys_platform == "linux" and machine == "x86_64"


# Skipped only where libtpu cannot be installed; where it can, a missing libtpu fails the tests
# (compile_only names the install).
needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None and not libtpu_has_wheels(),
    reason=f"libtpu has wheels for Linux x86-64 only, not {sys.platform} {platform.machine()}: "
    "compiling for a TPU slice needs it")


@pytest.mark.parametrize("sys_platform, machine", [
    ("linux", "x86_64"), ("linux", "aarch64"), ("darwin", "arm64"), ("darwin", "x86_64"),
    ("win32", "AMD64")])
def test_the_tpu_requirements_install_only_where_libtpu_has_wheels(sys_platform, machine):
  # The requirement markers pip evaluates on each machine, against the skip rule above.
  env = {"sys_platform": sys_platform, "platform_machine": machine}
  with open(os.path.join(ROOT, "requirements-tpu.txt")) as f:
    reqs = [Requirement(l.split("#")[0].strip()) for l in f if l.split("#")[0].strip()]
  assert {r.name for r in reqs} == {"jax", "libtpu"}
  for r in reqs:
    assert r.marker.evaluate(env) == libtpu_has_wheels(sys_platform, machine), (r, env)


def tpu_config(mode):
  c = tiny_config(batch=12)
  c.mode = mode
  c.pretrain.mask_ratios = (0.0, 0.4, 0.8)  # 3 per chip: one example per ratio group
  c.finetune.batch_size = 8
  c.eval.batch_size = 4
  c.compile_only.topology = "v5p:2x2x1"
  c.compile_only.num_classes = 7
  return c


@needs_libtpu
def test_both_stages_compile_for_a_v5p_slice(tmp_path):
  reports = compile_only.run(tpu_config("pretrain+finetune"), str(tmp_path))
  assert set(reports) == {"pretrain", "finetune"}
  with open(tmp_path / "compile_only.json") as f:
    assert json.load(f) == json.loads(json.dumps(reports))
  for stage, r in reports.items():
    assert r["chips"] == 4 and r["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1}
    assert r["attention"] == "dense"  # resolved for the TPU, not for this CPU
    assert r["hbm_gib"] == 95 and r["fits"] and 0 < r["used_gib"] < 1
    assert r["temp_gib"] > 0 and r["compile_s"] > 0
    # Data parallel: the gradients are summed across the chips.
    assert r["collectives"].get("all-reduce", 0) >= 1, (stage, r["collectives"])
    # XLA's count against the analytic matmul count (1.10 and 1.14 here: the rest is norms,
    # softmax, losses and Adam, a large share at this tiny width).
    ratio = r["flops_per_chip"] / r["analytic_flops_per_chip"]
    assert 0.9 < ratio < 1.4, (stage, ratio)
    assert compile_only.summary(r).startswith(f"{stage} test on v5p:2x2x1 (4 chips")


def test_analytic_flops_scale_with_the_kept_tokens():
  from avsiam_jax.config import parse  # pylint: disable=import-outside-toplevel
  c = tpu_config("pretrain")
  c.pretrain.mask_ratios = (0.0,)
  full = compile_only.analytic_flops_per_sample(parse(c, 1), "pretrain")
  c.pretrain.mask_ratios = (0.5,)
  half = compile_only.analytic_flops_per_sample(parse(c, 1), "pretrain")
  assert half < full


def test_bad_topology_is_a_config_error(tmp_path):
  c = tpu_config("pretrain")
  c.compile_only.topology = "v5p-2x2"
  with pytest.raises(ConfigError, match="config.compile_only.topology"):
    compile_only.run(c, str(tmp_path))
  c.mode = "eval"
  c.compile_only.topology = "v5p:2x2x1"
  if importlib.util.find_spec("libtpu") is not None:
    with pytest.raises(ConfigError, match="training stages"):
      compile_only.run(c, str(tmp_path))
  assert not os.path.exists(tmp_path / "compile_only.json")


def test_a_program_refused_for_hbm_is_reported_as_not_fitting():
  msg = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
         "temporaries (99.72G) exceeds available HBM (95.74G).")
  assert compile_only.refused_temp_gib(msg) == pytest.approx(99.72)
  assert compile_only.refused_temp_gib(msg.replace("99.72G", "1.45T")) == pytest.approx(1484.8)
  assert compile_only.refused_temp_gib("INTERNAL: something else") is None
  report = {"stage": "pretrain", "variant": "B/16", "topology": "v5p:2x2x1", "chips": 4,
            "dtype": "bfloat16", "batch_per_chip": 95, "temp_gib": 99.72, "hbm_gib": 95,
            "compile_s": 300.0, "error": msg}
  assert "DOES NOT FIT: 99.7 GiB of temporaries for 95 GiB" in compile_only.summary(report)
