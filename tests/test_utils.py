"""The shared helpers: JSON writing, the BLAS thread setting, cost analysis, CLI errors."""
import json
import os
import subprocess
import sys

import jax
import pytest

from avsiam_jax import utils

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_write_json_on_process_zero_only(tmp_path, monkeypatch):
  path = tmp_path / "a.json"
  utils.write_json(str(path), {"x": [1, 2]})
  assert path.read_text() == json.dumps({"x": [1, 2]}, indent=1)
  assert oct(path.stat().st_mode & 0o777) == oct(0o644)
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  utils.write_json(str(tmp_path / "b.json"), {})
  utils.write_json(str(tmp_path / "c.json"), {}, every_process=True)
  assert sorted(os.listdir(tmp_path)) == ["a.json", "c.json"]  # no temp file left either
  with pytest.raises(TypeError):
    utils.write_json(str(path), {"x": object()}, every_process=True)
  assert json.loads(path.read_text()) == {"x": [1, 2]}  # the earlier file, whole
  assert sorted(os.listdir(tmp_path)) == ["a.json", "c.json"]


def test_write_json_for_every_process_does_not_import_jax(tmp_path):
  code = ("import sys; from avsiam_jax import utils; "
          f"utils.write_json({str(tmp_path / 'a.json')!r}, [1], every_process=True); "
          "assert 'jax' not in sys.modules and 'numpy' not in sys.modules")
  subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)
  assert json.loads((tmp_path / "a.json").read_text()) == [1]


def test_one_blas_thread_keeps_what_the_user_set_unless_forced(monkeypatch):
  monkeypatch.setenv("OMP_NUM_THREADS", "4")
  monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
  monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
  with utils.one_blas_thread():
    assert [os.environ.get(k) for k in utils.BLAS_THREAD_VARS] == ["1", "4", "1"]
  with utils.one_blas_thread(force=True):
    assert [os.environ.get(k) for k in utils.BLAS_THREAD_VARS] == ["1", "1", "1"]
  assert [os.environ.get(k) for k in utils.BLAS_THREAD_VARS] == [None, "4", None]


class _Compiled:
  def __init__(self, cost):
    self.cost = cost

  def cost_analysis(self):
    return self.cost


def test_cost_of_a_list_a_dict_or_nothing():
  assert utils.cost_of(_Compiled([{"flops": 2.0}])) == {"flops": 2.0}
  assert utils.cost_of(_Compiled({"flops": 3.0})) == {"flops": 3.0}
  assert utils.cost_of(_Compiled([])) == utils.cost_of(_Compiled(None)) == {}
  assert utils.cost_of(jax.jit(lambda x: x @ x).lower(jax.numpy.ones((4, 4))).compile())["flops"]


class _InputError(ValueError):
  pass


def test_cli_errors_one_line_for_the_named_errors_only(capsys):
  @utils.cli_errors(_InputError, status=3)
  def main(error=None):
    if error is not None:
      raise error
    return 0

  assert main() == 0
  assert main(_InputError("a.csv, line 2:\n  no field 'file'")) == 3
  assert capsys.readouterr().err == "error: a.csv, line 2: no field 'file'\n"
  with pytest.raises(ValueError, match="a bug"):  # any other error keeps its traceback
    main(ValueError("a bug"))
