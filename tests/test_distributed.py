"""Start-up on a TPU machine: without JAX's TPU runtime the run stops, naming the fix, instead of
training each worker alone on its CPU."""
import os

import pytest

from avsiam_jax import distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NO_CHIPS = (0, None)


def _pci(root, devices):
  """A fake /sys/bus/pci/devices: one folder per (vendor, device)."""
  for i, (vendor, device) in enumerate(devices):
    d = root / f"0000:00:{i:02x}.0"
    d.mkdir(parents=True)
    (d / "vendor").write_text(vendor + "\n")
    (d / "device").write_text(device + "\n")
  return str(root)


def test_tpu_chips_are_counted_from_the_pci_bus(tmp_path):
  # Four v5p chips, Google's gVNIC network card (same vendor, not a TPU), an Intel device.
  root = _pci(tmp_path / "pci", [("0x1ae0", "0x0062")] * 4 + [("0x1ae0", "0x0042"),
                                                              ("0x8086", "0x0062")])
  assert distributed.tpu_chips(root) == (4, "v5p")
  assert distributed.tpu_chips(str(tmp_path / "none")) == NO_CHIPS
  assert distributed.tpu_machine({}, (4, "v5p")) == "4 v5p TPU chips on the PCI bus"
  assert distributed.tpu_machine({"TPU_ACCELERATOR_TYPE": "v5p-64"}, NO_CHIPS) == (
      "TPU_ACCELERATOR_TYPE=v5p-64")
  assert distributed.tpu_machine({"TPU_ACCELERATOR_TYPE": ""}, NO_CHIPS) is None


@pytest.mark.parametrize("environ, chips, libtpu, backend, fails", [
    # A TPU VM (chips on the bus, nothing in the environment) without libtpu.
    ({}, (4, "v5p"), False, None, "libtpu.*not installed"),
    # A pod worker whose environment names the slice.
    ({"TPU_WORKER_HOSTNAMES": "w0,w1"}, NO_CHIPS, False, None, "libtpu.*not installed"),
    # libtpu there, but JAX came up on the CPU anyway.
    ({}, (4, "v5p"), True, "cpu", "started its 'cpu' backend"),
    ({"JAX_PLATFORMS": "tpu,cpu"}, (4, "v4"), True, "cpu", "started its 'cpu' backend"),
    # Fine: the TPU backend; the CPU asked for; no TPU machine at all.
    ({}, (4, "v5p"), True, None, None),
    ({}, (4, "v5p"), True, "tpu", None),
    ({"JAX_PLATFORMS": "cpu"}, (4, "v5p"), False, "cpu", None),
    ({}, NO_CHIPS, False, "cpu", None),
])
def test_a_tpu_machine_that_jax_would_not_use_is_refused(environ, chips, libtpu, backend, fails):
  check = lambda: distributed.check_tpu_runtime(backend, environ=environ, has_libtpu=libtpu,
                                                chips=chips)
  if fails is None:
    check()
    return
  with pytest.raises(distributed.StartupError, match=fails) as e:
    check()
  message = str(e.value)
  assert "\n" not in message and "Cloud TPU machine" in message
  assert "requirements-tpu.txt" in message and "JAX_PLATFORMS=cpu" in message


def test_main_stops_at_start_up_on_a_tpu_worker_without_libtpu(tmp_path, monkeypatch, capsys):
  """main.py's main on a pod worker's environment without libtpu: one line, status 2, no
  workdir (in this process: the check reads the environment, not JAX's state)."""
  import main  # pylint: disable=import-outside-toplevel
  from absl import logging  # pylint: disable=import-outside-toplevel
  monkeypatch.delenv("JAX_PLATFORMS", raising=False)
  monkeypatch.setenv("TPU_ACCELERATOR_TYPE", "v5p-64")
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "w0,w1,w2,w3,w4,w5,w6,w7")
  monkeypatch.setattr(distributed, "_has_libtpu", lambda environ=None: False)
  workdir = tmp_path / "w"
  main.parse_flags(["main.py", f"--config={os.path.join(ROOT, 'configs', 'demo.py')}",
                    f"--workdir={workdir}"])
  verbosity = logging.get_verbosity()
  try:
    assert main.main(["main.py"]) == 2
  finally:
    logging.set_verbosity(verbosity)
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1, err
  assert err[0].startswith("error: this is a Cloud TPU machine (TPU_ACCELERATOR_TYPE=v5p-64)")
  assert "requirements-tpu.txt" in err[0]
  assert not workdir.exists()
