"""The trainer as two processes on this machine: ``--distributed`` with a coordinator on
localhost (jax.distributed; CPU collectives over gloo), one CPU device per process.

- Both processes end with bit-identical states (each logs a CRC32 of its own copy),
  equal to a one-process run on two devices; only the primary writes config.json,
  metrics.jsonl and summary.json; orbax writes one checkpoint both can restore.
- Killing either process makes the other exit non-zero within seconds, not hang.
- SIGTERM to one process: both save the same step (jax's preemption sync point), exit 0.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

pytestmark = pytest.mark.slow  # several processes each: run with --run-slow (CI does)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ("--config.num_train_steps=60", "--config.checkpoint_every=20", "--config.log_every=20",
        "--config.update_every=20")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  cache = tmp_path_factory.mktemp("jax_cache")
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(cache),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  env.pop("XLA_FLAGS", None)  # one CPU device per process
  return env


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start(workdir, *args, env, log):
  cmd = [sys.executable, "-m", "rigl_jax.main", f"--config={REPO}/configs/quickstart.py",
         f"--workdir={workdir}", *args]
  with open(log, "w") as f:
    proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO)
  proc.log = log
  return proc


def start_pair(workdir, *args, env, tmp_path, tag):
  port = free_port()
  return [start(workdir, "--distributed", f"--coordinator_address=127.0.0.1:{port}",
                "--num_processes=2", f"--process_id={i}", *args, env=env,
                log=tmp_path / f"{tag}{i}.log") for i in range(2)]


def finish(proc, timeout=300):
  try:
    proc.wait(timeout=timeout)
  except subprocess.TimeoutExpired:
    proc.kill()
    proc.wait()
    raise
  with open(proc.log) as f:
    return proc.returncode, f.read()


def digest(log):
  return re.findall(r"Final state CRC32 ([0-9a-f]{8}) \(process (\d) of (\d)\)", log)


def checkpoint(workdir, step):
  path = os.path.join(workdir, "checkpoints", str(step), "default")
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  with ocp.StandardCheckpointer() as ckptr:
    meta = ckptr.metadata(path).item_metadata.tree
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), meta)
    return [np.asarray(x) for x in jax.tree.leaves(ckptr.restore(path, target))]


# "separate" (the default on accelerators): the whole step compiles on a thread in
# every process, and all of them switch to it on the same steps.
@pytest.mark.parametrize("program", ["in_step", "separate"])
def test_two_processes_agree_and_match_two_devices(tmp_path, env, program):
  workdir = tmp_path / "two_procs"
  args = (*ARGS, f"--config.update_program={program}")
  procs = start_pair(workdir, *args, env=env, tmp_path=tmp_path, tag="run")
  # Meanwhile (same machine, shared cores): one process with two devices.
  single = start(tmp_path / "one_proc", *args, log=tmp_path / "single.log",
                 env=dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=2"))
  results = [finish(p) for p in procs]
  for rc, log in results:
    assert rc == 0, log[-3000:]
  (d0, i0, n0), = digest(results[0][1])
  (d1, i1, n1), = digest(results[1][1])
  assert (i0, i1, n0, n1) == ("0", "1", "2", "2")
  assert d0 == d1  # each process's own copy of the state, bit for bit
  final_lines = [log.strip().splitlines()[-1] for _, log in results]
  assert final_lines[0] == final_lines[1] and final_lines[0].startswith("test_accuracy=")

  # One writer: no duplicated metrics lines, one summary with the same digest.
  steps = [json.loads(l)["step"] for l in open(workdir / "metrics.jsonl")]
  assert steps == [20, 40, 60]
  assert json.load(open(workdir / "summary.json"))["state_crc32"] == d0
  assert sorted(int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit()) == [20, 40, 60]

  # Two processes x one device == one process x two devices (a sum of two is
  # order-free): the same checkpoint, bit for bit.
  rc, log = finish(single)
  assert rc == 0, log[-3000:]
  [(d_single, _, _)] = digest(log)
  assert d_single == d0
  for a, b in zip(checkpoint(workdir, 60), checkpoint(tmp_path / "one_proc", 60)):
    assert a.tobytes() == b.tobytes()

  # Both processes restore the checkpoint orbax wrote for them, and agree again.
  procs = start_pair(workdir, *args, env=env, tmp_path=tmp_path, tag="again")
  for rc, log in (finish(p) for p in procs):
    assert rc == 0, log[-3000:]
    assert f"Resumed {workdir} at step 60" in log
    assert digest(log)[0][0] == d0


@pytest.mark.parametrize("victim", [1, 0], ids=["kill_worker", "kill_coordinator"])
def test_killing_one_process_stops_the_other(tmp_path, env, victim):
  workdir = tmp_path / "wd"
  procs = start_pair(workdir, "--config.num_train_steps=100000", "--config.log_every=20",
                     "--config.checkpoint_every=100000", "--heartbeat_timeout_s=5",
                     "--shutdown_timeout_s=5", env=env, tmp_path=tmp_path, tag="kill")
  metrics = workdir / "metrics.jsonl"
  deadline = time.time() + 240
  while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
    assert all(p.poll() is None for p in procs), [finish(p)[1][-2000:] for p in procs]
    time.sleep(0.05)
  procs[victim].send_signal(signal.SIGKILL)
  killed_at = time.time()
  survivor = procs[1 - victim]
  rc, log = finish(survivor, timeout=120)
  waited = time.time() - killed_at
  finish(procs[victim])
  assert rc != 0, log[-3000:]
  assert waited < 60, waited
  print(f"survivor (process {1 - victim}) exited with {rc} after {waited:.1f} s")


def test_sigterm_to_one_process_stops_both_at_the_same_step(tmp_path, env):
  workdir = tmp_path / "wd"
  procs = start_pair(workdir, "--config.num_train_steps=100000", "--config.log_every=20",
                     "--config.checkpoint_every=100000", env=env, tmp_path=tmp_path, tag="term")
  metrics = workdir / "metrics.jsonl"
  deadline = time.time() + 240
  while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
    assert all(p.poll() is None for p in procs), [finish(p)[1][-2000:] for p in procs]
    time.sleep(0.05)
  procs[1].send_signal(signal.SIGTERM)  # only the worker gets the notice
  sent = time.time()
  results = [finish(p, timeout=120) for p in procs]
  assert time.time() - sent < 60
  saved = []
  for rc, log in results:
    assert rc == 0, log[-3000:]
    saved += [int(s) for s in re.findall(r"preempted at step (\d+)", log)]
  assert len(saved) == 2 and saved[0] == saved[1]  # jax's preemption sync point
  assert [int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit()] == saved[:1]
  # The log ends at the last log step; the steps after it wait for the resumed run.
  assert json.loads(metrics.read_text().splitlines()[-1])["step"] == saved[0] // 20 * 20
  pending = workdir / "metrics_pending.json"
  assert pending.exists() == (saved[0] % 20 != 0)
  if pending.exists():
    assert json.loads(pending.read_text())["step"] == saved[0]
