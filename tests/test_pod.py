"""Pod-shaped runs on this machine: many forced CPU devices in one process, and
several processes of several devices each (``--distributed`` on localhost), as a
TPU pod's hosts run (a v4 host drives 4 chips). Each must give the metrics of one
device, up to the order of floating-point reductions.

Also the stall watchdog: a run whose collectives stop making progress ends with
one ``error:`` line instead of hanging.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from rigl_jax import config as config_lib
from rigl_jax import watchdog as watchdog_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = f"{REPO}/configs/quickstart.py"
# batch 96 divides over 16 devices; eval_batch_size stays at the default 500, which
# does not (it is padded to 512 and the padding masked).
ARGS = ("--config.batch_size=96", "--config.num_train_steps=200", "--config.log_every=100",
        "--config.eval_every=100", "--config.checkpoint_every=100")


def env_with(devices: int, cache) -> dict:
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(cache),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  return env


def free_port() -> int:
  import socket  # pylint: disable=import-outside-toplevel
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch(workdir, args, *, env, log, processes=1, port=None, extra=()):
  """Starts the trainer as ``processes`` processes (``--distributed`` when > 1)."""
  procs = []
  for i in range(processes):
    cmd = [sys.executable, "-m", "rigl_jax.main", f"--config={QUICKSTART}",
           f"--workdir={workdir}", *args, *extra]
    if processes > 1:
      cmd += ["--distributed", f"--coordinator_address=127.0.0.1:{port}",
              f"--num_processes={processes}", f"--process_id={i}"]
    f = open(f"{log}.{i}", "w")  # pylint: disable=consider-using-with
    proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    proc.log = f"{log}.{i}"
    procs.append(proc)
  return procs


def finish(proc, timeout=400):
  try:
    proc.wait(timeout=timeout)
  except subprocess.TimeoutExpired:
    proc.kill()
    proc.wait()
    raise AssertionError(f"timed out; log tail:\n{open(proc.log).read()[-3000:]}") from None
  return proc.returncode, open(proc.log).read()


def metrics(workdir):
  return [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]


def assert_same_run(one, many):
  """Two runs' summaries and logs agree up to reduction order: the same masks'
  densities, the same accuracies (to one example in a thousand) and losses to 1e-4."""
  a, b = (json.load(open(os.path.join(w, "summary.json"))) for w in (one, many))
  assert a["layer_densities"] == b["layer_densities"]
  for key in ("test_accuracy", "val_accuracy"):
    assert abs(a[key] - b[key]) <= 1e-3 + 1e-9, (key, a[key], b[key])
  for key in ("test_loss", "val_loss"):
    assert a[key] == pytest.approx(b[key], rel=1e-4), key
  log_a, log_b = metrics(one), metrics(many)
  assert [r["step"] for r in log_a] == [r["step"] for r in log_b]
  for ra, rb in zip(log_a, log_b):
    for key in ("loss", "val_loss", "test_loss"):
      if key in ra:
        assert ra[key] == pytest.approx(rb[key], rel=1e-4), (ra["step"], key)


@pytest.fixture(scope="module")
def one_device_run(tmp_path_factory):
  root = tmp_path_factory.mktemp("one_device")
  [proc] = launch(root / "wd", ARGS, env=env_with(1, root / "cache"), log=root / "log")
  rc, log = finish(proc)
  assert rc == 0, log[-3000:]
  return root / "wd"


@pytest.mark.slow
def test_sixteen_devices_in_one_process_match_one_device(tmp_path, one_device_run):
  # Used to deadlock in the first steps (XLA:CPU collectives with steps in flight).
  [proc] = launch(tmp_path / "wd", ARGS, env=env_with(16, tmp_path / "cache"),
                  log=tmp_path / "log")
  rc, log = finish(proc)
  assert rc == 0, log[-3000:]
  assert_same_run(one_device_run, tmp_path / "wd")


@pytest.mark.slow
def test_four_processes_of_four_devices_match_one_device(tmp_path, one_device_run):
  procs = launch(tmp_path / "wd", ARGS, env=env_with(4, tmp_path / "cache"),
                 log=tmp_path / "log", processes=4, port=free_port())
  results = [finish(p) for p in procs]
  for rc, log in results:
    assert rc == 0, log[-3000:]
  digests = {re.search(r"Final state CRC32 (\w+) \(process \d of 4\)", log).group(1)
             for _, log in results}
  assert len(digests) == 1  # every process holds the same state, bit for bit
  assert_same_run(one_device_run, tmp_path / "wd")


@pytest.mark.slow
def test_a_batch_norm_resnet_on_sixteen_devices_matches_one_device(tmp_path):
  """WRN-22-2 (batch norm; dropout off) on 16 devices (one process, and 4 processes of
  4 devices), 2 examples each: the batch
  statistics are over the global batch, so the first step's loss equals one device's
  to float32 rounding (per-device statistics would be far off). A deep net at lr 0.1
  amplifies rounding, so later steps are compared more loosely."""
  args = ("--config.model=wrn_22_2", "--config.batch_size=32", "--config.num_train_steps=3",
          "--config.log_every=1", "--config.eval_every=0", "--config.update_every=2",
          "--config.validation_size=100", "--config.eval_batch_size=200",
          "--config.dropout_rate=0")
  layouts = {"one": (1, 1), "16_devices": (1, 16), "4_processes_x_4": (4, 4)}
  for name, (processes, devices) in layouts.items():
    procs = launch(tmp_path / name, args, env=env_with(devices, tmp_path / "cache"),
                   log=tmp_path / f"log_{name}", processes=processes, port=free_port())
    for proc in procs:
      rc, log = finish(proc, timeout=600)
      assert rc == 0, log[-3000:]
  one = metrics(tmp_path / "one")
  for name in ("16_devices", "4_processes_x_4"):
    many = metrics(tmp_path / name)
    assert [r["step"] for r in one] == [r["step"] for r in many] == [1, 2, 3]
    assert one[0]["loss"] == pytest.approx(many[0]["loss"], rel=1e-5), name
    for a, b in zip(one, many):
      assert a["loss"] == pytest.approx(b["loss"], rel=1e-3), name
      assert a["layer_densities"] == b["layer_densities"]  # mask update at step 2


def test_eval_batch_is_padded_to_the_device_count_not_refused():
  c = config_lib.base_config()
  c.batch_size, c.eval_batch_size = 96, 500
  config_lib.validate(c, device_count=16)  # no error for eval_batch_size
  assert config_lib.eval_batch_size_for(c, 16) == 512
  assert config_lib.eval_batch_size_for(c, 1) == 500
  assert config_lib.eval_batch_size_for(c, 32) == 512
  c.batch_size = 100
  with pytest.raises(config_lib.ConfigError, match=r"config\.batch_size: 100 .*16"):
    config_lib.validate(c, device_count=16)


def test_watchdog_fires_once_without_beats_and_not_with_them():
  now = [0.0]
  fired = []
  with watchdog_lib.Watchdog(10, lambda s, what: fired.append((s, what)), clock=lambda: now[0],
                             poll_s=0.005) as dog:
    for step in range(50):  # 50 beats 1 s apart: never quiet for 10 s
      now[0] += 1.0
      dog.beat(f"step {step}")
      time.sleep(0.002)
    assert not fired
    now[0] += 10.5
    deadline = time.time() + 5
    while not fired and time.time() < deadline:
      time.sleep(0.01)
  assert fired == [(10.5, "step 49")]
  with pytest.raises(ValueError, match="timeout_s"):
    watchdog_lib.Watchdog(0, print)


@pytest.mark.slow
def test_a_run_whose_peer_stops_responding_ends_with_one_error_line(tmp_path):
  """A peer that stops (SIGSTOP) while still counted alive (long heartbeat): the other
  process waits in a collective; the watchdog ends it with one error line."""
  procs = launch(tmp_path / "wd", ("--config.num_train_steps=100000", "--config.log_every=20",
                                   "--config.checkpoint_every=100000"),
                 env=env_with(1, tmp_path / "cache"), log=tmp_path / "log", processes=2,
                 port=free_port(),
                 extra=("--stall_timeout_s=8", "--heartbeat_timeout_s=300"))
  log_file = tmp_path / "wd" / "metrics.jsonl"
  deadline = time.time() + 240
  while time.time() < deadline and not (log_file.exists() and
                                        log_file.read_text().count("\n") >= 2):
    assert all(p.poll() is None for p in procs), [open(p.log).read()[-2000:] for p in procs]
    time.sleep(0.05)
  procs[1].send_signal(signal.SIGSTOP)
  stopped_at = time.time()
  try:
    rc, log = finish(procs[0], timeout=120)
  finally:
    procs[1].send_signal(signal.SIGKILL)
    procs[1].send_signal(signal.SIGCONT)
    procs[1].wait()
  assert rc == 1, log[-3000:]
  errors = [line for line in log.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and "stalled: process 0 of 2" in errors[0], log[-3000:]
  assert "Traceback" not in log
  assert time.time() - stopped_at < 60


@pytest.mark.slow
def test_processes_that_do_not_share_the_workdir_stop_with_one_error_line_each(tmp_path):
  """A pod without shared storage, simulated: each process is given its own folder."""
  port = free_port()
  env = env_with(1, tmp_path / "cache")
  cmds = []
  for i in range(2):
    cmd = [sys.executable, "-m", "rigl_jax.main", f"--config={QUICKSTART}",
           f"--workdir={tmp_path / f'disk_{i}' / 'wd'}", "--config.num_train_steps=20",
           "--distributed", f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
           f"--process_id={i}"]
    cmds.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 env=env, cwd=REPO, text=True))
  for i, proc in enumerate(cmds):
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err[-3000:]
    assert "is not shared: process(es) 1 of 2 do not see" in errors[0]
    assert "Traceback" not in err
    assert not os.path.exists(tmp_path / f"disk_{i}" / "wd" / "checkpoints")


# ----------------------------------------------------------------------------- SLURM

FAKE_SRUN = """#!/bin/bash
# Stands in for srun inside an allocation: starts nodes x ntasks-per-node local tasks
# with the variables slurmstepd gives each task (those jax's SLURM detection reads).
nodes=1; per_node=1
while [[ "$1" == --* ]]; do
  case "$1" in --nodes=*) nodes=${1#*=};; --ntasks-per-node=*) per_node=${1#*=};; esac
  shift
done
n=$((nodes * per_node)); pids=()
for ((i = 0; i < n; i++)); do
  SLURM_STEP_NODELIST=localhost SLURM_NTASKS=$n SLURM_PROCID=$i \\
  SLURM_LOCALID=$((i % per_node)) SLURM_STEP_NUM_NODES=$nodes \\
      "$@" > "$FAKE_SLURM_DIR/task$i.log" 2>&1 &
  pids+=($!); echo $! >> "$FAKE_SLURM_DIR/pids"
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
exit $rc
"""
FAKE_SCONTROL = """#!/bin/bash
echo "$@" >> "$FAKE_SLURM_DIR/scontrol.log"
"""


def slurm_job_id_with_free_port() -> int:
  """A job id whose coordinator port (jax: 61440 + id % 4096) is free here."""
  import socket  # pylint: disable=import-outside-toplevel
  for job_id in range(os.getpid() % 4096, os.getpid() % 4096 + 4096):
    with socket.socket() as s:
      try:
        s.bind(("127.0.0.1", 61440 + job_id % 4096))
        return 100000 + job_id % 4096
      except OSError:
        continue
  raise AssertionError("no free port in jax's SLURM range")


@pytest.mark.slow
def test_slurm_multinode_task_runs_one_process_per_gpu_and_requeues_at_the_time_limit(
    tmp_path):
  from rigl_jax.launch import emit, grid  # pylint: disable=import-outside-toplevel
  sweep_dir = tmp_path / "sweep"
  runs = grid.make_runs([{"method": "rigl", "seed": 0}], str(sweep_dir))
  script, _ = emit.write_slurm(
      runs, str(sweep_dir), config_path=QUICKSTART, repo_dir=REPO, python=sys.executable,
      nodes=2, gpus_per_node=2,
      common={"num_train_steps": 300, "log_every": 20, "checkpoint_every": 1000,
              "batch_size": 96, "eval_every": 0})
  text = open(script).read().splitlines()
  for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=2", "#SBATCH --gres=gpu:2",
               "#SBATCH --signal=TERM@120", "#SBATCH --requeue", "#SBATCH --open-mode=append"):
    assert line in text, line
  fake = tmp_path / "bin"
  fake.mkdir()
  for name, body in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
    (fake / name).write_text(body)
    (fake / name).chmod(0o755)
  state = tmp_path / "slurm_state"
  state.mkdir()
  env = dict(env_with(1, tmp_path / "cache"), PATH=f"{fake}:{os.environ['PATH']}",
             FAKE_SLURM_DIR=str(state), SLURM_ARRAY_TASK_ID="0",
             SLURM_JOB_ID=str(slurm_job_id_with_free_port()), SLURM_JOB_NUM_NODES="2")

  # The time limit: SLURM sends SIGTERM to every task; they save, the task requeues.
  batch = subprocess.Popen(["bash", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           env=env, text=True)
  metrics_file = sweep_dir / runs[0].name / "metrics.jsonl"
  deadline = time.time() + 240
  while time.time() < deadline and not (metrics_file.exists() and
                                        metrics_file.read_text().count("\n") >= 1):
    assert batch.poll() is None, batch.communicate()[0]
    time.sleep(0.05)
  for pid in (state / "pids").read_text().split():
    os.kill(int(pid), signal.SIGTERM)
  out, _ = batch.communicate(timeout=120)
  logs = [(state / f"task{i}.log").read_text() for i in range(4)]
  assert batch.returncode == 0, out + logs[0][-3000:]
  assert "requeueing" in out
  assert (state / "scontrol.log").read_text().split() == ["requeue", env["SLURM_JOB_ID"]]
  for i, log in enumerate(logs):
    assert f"process {i}" in log or "preempted at step" in log, log[-2000:]
    assert "preempted at step" in log
  assert not (sweep_dir / runs[0].name / "summary.json").exists()

  # Requeued: the same script starts again, resumes and finishes; no second requeue.
  (state / "pids").unlink()
  proc = subprocess.run(["bash", script], capture_output=True, text=True, env=env, timeout=400)
  logs = [(state / f"task{i}.log").read_text() for i in range(4)]
  assert proc.returncode == 0, proc.stdout + proc.stderr + logs[0][-3000:]
  assert all("Resumed" in log for log in logs), logs[0][-3000:]
  assert len({re.search(r"Final state CRC32 (\w+) \(process \d of 4\)", log).group(1)
              for log in logs}) == 1
  assert (sweep_dir / runs[0].name / "summary.json").exists()
  assert (state / "scontrol.log").read_text().split() == ["requeue", env["SLURM_JOB_ID"]]
  # And a finished run's task exits at once.
  proc = subprocess.run(["bash", script], capture_output=True, text=True, env=env, timeout=120)
  assert proc.returncode == 0 and f"finished: {runs[0].name}" in proc.stdout
