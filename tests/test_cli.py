"""main.py's flag and config mistakes: one line on stderr, exit status 2, nothing written."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(tmp_path, *flags):
  """(exit status, stderr lines) of main.py; its workdir must not have been made."""
  workdir = tmp_path / "w"
  p = subprocess.run([sys.executable, "main.py", f"--workdir={workdir}", *flags], cwd=ROOT,
                     capture_output=True, text=True, timeout=120,
                     env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert not workdir.exists()
  return p.returncode, p.stderr.strip().splitlines()


@pytest.mark.parametrize("flags, want", [
    (["--config=configs/demo.py", "--config.batch_sise=10"],
     ["config.batch_sise: no such key; did you mean batch_size?"]),
    (["--config=configs/demo.py", "--config.model.varaint=B/16"],
     ["config.model.varaint: no such key; did you mean variant?"]),
    (["--config=configs/demo.py:mode=pretrian"],
     ["--config=configs/demo.py:mode=pretrian: ", "'pretrian'",
      "'pretrain', 'finetune', 'retrieval_finetune', 'eval', 'pretrain+finetune'"]),
    (["--config=configs/demo.py", "--config.batch_size=ten"], ["--config.batch_size=ten: "]),
    (["--config=configs/nope.py"], ["--config: ", "configs/nope.py"]),
    # Not a flag error: config.parse's ConfigError, raised before any compute.
    (["--config=configs/demo.py", "--config.mode=pretrian"],
     ["config.mode: ", "'pretrian'", "'pretrain+finetune'"]),
])
def test_a_config_mistake_is_one_line(tmp_path, flags, want):
  status, err = _main(tmp_path, *flags)
  assert status == 2 and len(err) == 1, err
  assert err[0].startswith("error: ") and all(w in err[0] for w in want), err


def test_a_bug_in_a_config_file_keeps_its_traceback(tmp_path):
  bad = tmp_path / "bad.py"
  bad.write_text("import ml_collections\n\n\ndef get_config():\n"
                 "  return ml_collections.ConfigDict().no_such_field\n")
  status, err = _main(tmp_path, f"--config={bad}")
  assert status == 1 and "Traceback (most recent call last):" in err
  assert any("no_such_field" in line for line in err) and f'File "{bad}"' in "\n".join(err)
