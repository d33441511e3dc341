"""Reliability of the trainer, on real runs of ``python -m rigl_jax.main``.

- SIGKILL at seeded random points (during a checkpoint write, during the side
  writes, right after a mask update, at a random time), resumed each time: the end
  state, summary.json and metrics.jsonl (FLOP counters included) equal an
  uninterrupted run's, bit for bit. The runs evaluate at every checkpoint step, so a
  resume finds an evaluation line after the last training line.
- Truncated / corrupted latest checkpoints: detected, skipped with a warning, the run
  still ends bit-identical, and the next start is clean; all of them bad: exit 1 with
  one error line.
- SIGTERM: a checkpoint of the last logged step, exit 0.
- Divergence: ``on_nonfinite=stop`` ends with one error line naming the step and
  finite checkpoints only; ``skip`` skips the bad batches.
- Bad input: one ``error: config.FIELD: ...`` line, exit 2, nothing written, no
  train-step compilation.
- Determinism: two fresh runs (no compilation cache) give identical numbers.

Subprocesses share a persistent compilation cache (not the determinism rerun), which
cuts a launch from ~25 s to ~6 s on a busy 2-core machine.
"""

import importlib.util
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from rigl_jax import config as config_lib
from rigl_jax import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOTAL = 400
UPDATE_EVERY = 20
END = 300  # T_end = 0.75 * TOTAL: mask updates at 20, 40, ..., 280
RUN_ARGS = (f"--config.num_train_steps={TOTAL}", "--config.checkpoint_every=40",
            "--config.log_every=20", f"--config.update_every={UPDATE_EVERY}",
            "--config.eval_every=40", "--config.lr_drop_steps=(200,)")


# ----------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def cache_env(tmp_path_factory):
  cache = tmp_path_factory.mktemp("jax_cache")
  return dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(cache),
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def start(workdir, *args, env, run_args=RUN_ARGS):
  """Starts the trainer; stdout and stderr go to ``<workdir>.<n>.log`` (outside it)."""
  n = 0
  while os.path.exists(f"{workdir}.{n}.log"):
    n += 1
  log = f"{workdir}.{n}.log"
  cmd = [sys.executable, "-m", "rigl_jax.main", f"--config={REPO}/configs/quickstart.py",
         f"--workdir={workdir}", *run_args, *args]
  with open(log, "w") as f:
    proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO)
  proc.log = log
  return proc


def finish(proc, timeout=300):
  proc.wait(timeout=timeout)
  with open(proc.log) as f:
    return proc.returncode, f.read()


def run(workdir, *args, env, run_args=RUN_ARGS):
  return finish(start(workdir, *args, env=env, run_args=run_args))


def checkpoint_steps(workdir):
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(x) for x in os.listdir(d) if x.isdigit()) if os.path.isdir(d) else []


def checkpoint_tree(workdir, step=None):
  """A checkpoint (default: the newest) as nested dicts of numpy arrays, read without a target."""
  step = max(checkpoint_steps(workdir)) if step is None else step
  path = os.path.join(workdir, "checkpoints", str(step), "default")
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  with ocp.StandardCheckpointer() as ckptr:
    meta = ckptr.metadata(path).item_metadata.tree
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), meta)
    tree = ckptr.restore(path, target)
  return jax.tree.map(np.asarray, tree)


def checkpoint_leaves(workdir, step=None):
  """A checkpoint's leaves as numpy arrays (see `checkpoint_tree`)."""
  return jax.tree.leaves(checkpoint_tree(workdir, step))


def metrics(workdir, drop=("steps_per_s",)):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    lines = [json.loads(l) for l in f]
  return [{k: v for k, v in l.items() if k not in drop} for l in lines]


def summary(workdir):
  with open(os.path.join(workdir, "summary.json")) as f:
    s = json.load(f)
  s.pop("wall_time_s")
  return s


def assert_same_run(ref, other):
  """Bit-identical final state, summary (but wall time) and metrics (but steps/s)."""
  assert checkpoint_steps(other)[-1] == checkpoint_steps(ref)[-1] == TOTAL
  a, b = checkpoint_leaves(ref), checkpoint_leaves(other)
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()
  assert summary(other) == summary(ref)
  assert metrics(other) == metrics(ref)


def error_lines(log):
  return [l for l in log.splitlines() if l.startswith("error:")]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache_env):
  """One uninterrupted run (it also fills the compilation cache)."""
  workdir = tmp_path_factory.mktemp("ref") / "run"
  rc, log = run(workdir, env=cache_env)
  assert rc == 0, log[-3000:]
  assert checkpoint_steps(workdir) == [TOTAL - 80, TOTAL - 40, TOTAL]
  return workdir


# ----------------------------------------------------------------------------- SIGKILL


@pytest.mark.slow
def test_sigkill_at_random_points_resumes_bit_identical(reference, tmp_path, cache_env):
  rng = random.Random(7)
  workdir = tmp_path / "killed"
  ckpt_dir = workdir / "checkpoints"

  def listing(d):
    return os.listdir(d) if os.path.isdir(d) else []

  def writing_checkpoints():  # steps whose orbax write is under way
    return [int(m.group(1)) for x in listing(ckpt_dir)
            if (m := re.match(r"(\d+)\.orbax-checkpoint-tmp", x))]

  def writing_side(name):  # initial_params / final_masks being written
    return any(x.startswith(name) and "tmp" in x for x in listing(workdir))

  def logged():
    path = workdir / "metrics.jsonl"
    if not path.exists():
      return []
    steps = []
    for line in path.read_text().splitlines():
      try:
        steps.append(json.loads(line)["step"])
      except (ValueError, KeyError):
        pass  # a line being written
    return steps

  # Each entry: (name, make_trigger(resume_step) -> (primary, fallback) or None to skip).
  def at_time(resume):
    delay = rng.uniform(0.2, 1.0)
    started = []

    def primary():
      if not started and any(s > resume for s in logged()):
        started.append(time.time())
      return bool(started) and time.time() >= started[0] + delay
    return primary, None

  def at_checkpoint_write(resume):
    choices = [s for s in range(40, TOTAL, 40) if s > resume]
    if not choices:
      return None
    k = rng.choice(choices)
    return (lambda: k in writing_checkpoints()), (lambda: k in checkpoint_steps(workdir))

  def after_mask_update(resume):
    choices = [s for s in range(UPDATE_EVERY, END, UPDATE_EVERY) if s > resume]
    if not choices:
      return None
    m = rng.choice(choices)
    return (lambda: m in logged()), None

  plan = [
      ("initial_params write", lambda resume: ((lambda: writing_side("initial_params")),
                                               (lambda: bool(logged())))),
      ("random time", at_time),
      ("checkpoint write", at_checkpoint_write),
      ("right after a mask update", after_mask_update),
      ("final checkpoint write", lambda resume: ((lambda: TOTAL in writing_checkpoints()),
                                                 (lambda: TOTAL in checkpoint_steps(workdir)))),
      ("final_masks write", lambda resume: ((lambda: writing_side("final_masks")),
                                            (lambda: (workdir / "final_masks").exists()))),
  ]
  landed = []
  for name, make in plan:
    resume = max(checkpoint_steps(workdir), default=0)
    triggers = make(resume)
    if triggers is None:
      continue
    primary, fallback = triggers
    proc = start(workdir, env=cache_env)
    how = None
    deadline = time.time() + 240
    while proc.poll() is None and time.time() < deadline:
      if primary():
        how = "primary"
      elif fallback is not None and fallback():
        how = "fallback"
      if how:
        proc.send_signal(signal.SIGKILL)
        break
      time.sleep(0.001)
    rc, log = finish(proc)
    assert "Traceback" not in log, log[-3000:]
    if how:
      assert rc == -signal.SIGKILL
      landed.append((name, how, resume))
    else:  # the run got past the point before the trigger saw it
      assert rc == 0, log[-3000:]
  print("kills (point, trigger, resumed from):", landed)
  assert len(landed) >= 4
  assert any(how == "primary" and "checkpoint write" in name for name, how, _ in landed)

  rc, log = run(workdir, env=cache_env)
  assert rc == 0, log[-3000:]
  assert_same_run(reference, workdir)


# ----------------------------------------------------------------------------- corruption


def _data_files(step_dir):
  files = []
  for root, _, names in os.walk(step_dir):
    files += [os.path.join(root, n) for n in names if os.sep + "d" + os.sep in
              os.path.join(root, n)]
  return sorted(files, key=os.path.getsize)


@pytest.mark.slow
def test_corrupted_latest_checkpoints_fall_back_and_end_bit_identical(reference, tmp_path,
                                                                      cache_env):
  workdir = tmp_path / "corrupt"
  shutil.copytree(reference, workdir)
  os.remove(workdir / "summary.json")
  ckpt = workdir / "checkpoints"
  # Step 400: its biggest data file truncated to half. Step 360: bytes overwritten.
  biggest = _data_files(ckpt / str(TOTAL))[-1]
  with open(biggest, "r+b") as f:
    f.truncate(os.path.getsize(biggest) // 2)
  biggest = _data_files(ckpt / str(TOTAL - 40))[-1]
  with open(biggest, "r+b") as f:
    f.seek(os.path.getsize(biggest) // 2)
    f.write(b"\x00garbage\xff" * 16)

  rc, log = run(workdir, env=cache_env)
  assert rc == 0, log[-3000:]
  for step in (TOTAL, TOTAL - 40):
    assert re.search(rf"W.*Checkpoint step {step} .* is unusable", log), log[-3000:]
  assert f"Resumed {workdir} at step {TOTAL - 80}" in log
  assert len(os.listdir(ckpt / "quarantine")) == 2
  assert_same_run(reference, workdir)

  # No crash loop: the next start resumes from the new latest step, with no warning.
  rc, log = run(workdir, env=cache_env)
  assert rc == 0, log[-3000:]
  assert "unusable" not in log and f"Resumed {workdir} at step {TOTAL}" in log


def test_no_usable_checkpoint_is_one_error_line(reference, tmp_path, cache_env):
  workdir = tmp_path / "all_bad"
  shutil.copytree(reference, workdir)
  for step in checkpoint_steps(workdir):
    for path in _data_files(workdir / "checkpoints" / str(step)):
      with open(path, "r+b") as f:
        f.truncate(0)
  rc, log = run(workdir, env=cache_env)
  assert rc == 1, log[-3000:]
  # No traceback at all: neither from the trainer's code nor from orbax/tensorstore
  # threads (which print "Event loop is closed" ones when orbax itself hits a
  # truncated file, interleaved with and even splitting the error line).
  assert "Traceback" not in log, log[-3000:]
  [line] = error_lines(log)
  assert line.startswith("error: checkpoints: None of the 3 checkpoint(s)")


def _with_file_size_limit(limit_bytes, cmd):
  """``cmd`` on a full disk, without root: writes past ``limit_bytes`` fail with EFBIG
  ("File too large") once SIGXFSZ, which would kill the process instead, is ignored.
  A small Python sets both and execs ``cmd`` (no preexec_fn: the test process runs
  JAX's threads, and forking it is unsafe)."""
  setup = ("import os, resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
           f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit_bytes}, {limit_bytes})); "
           "os.execv(sys.argv[1], sys.argv[1:])")
  return [sys.executable, "-c", setup, *cmd]


@pytest.mark.slow
def test_a_checkpoint_that_cannot_be_written_is_one_line_and_keeps_the_previous(
    reference, tmp_path, cache_env):
  workdir = tmp_path / "full"
  shutil.copytree(reference, workdir)
  os.remove(workdir / "summary.json")
  for step in (TOTAL - 40, TOTAL):
    shutil.rmtree(workdir / "checkpoints" / str(step))
  log = tmp_path / "full.log"
  cmd = [sys.executable, "-m", "rigl_jax.main", f"--config={REPO}/configs/quickstart.py",
         f"--workdir={workdir}", *RUN_ARGS]
  with open(log, "w") as f:
    rc = subprocess.run(_with_file_size_limit(50_000, cmd), stdout=f, stderr=subprocess.STDOUT,
                        env=cache_env, cwd=REPO, timeout=300).returncode
  text = log.read_text()
  assert rc == 1, text[-3000:]
  assert "Traceback" not in text, text[-3000:]
  [line] = error_lines(text)
  assert line.startswith(f"error: checkpoints: cannot save a checkpoint in "
                         f"{workdir / 'checkpoints'}: File too large (writing "), line
  assert checkpoint_steps(workdir) == [TOTAL - 80]  # the previous step is intact
  rc, text = run(workdir, env=cache_env)  # space again: resumes from it
  assert rc == 0, text[-3000:]
  assert f"Resumed {workdir} at step {TOTAL - 80}" in text
  assert_same_run(reference, workdir)


def test_a_checkpoint_that_would_not_fit_is_refused_before_writing(tmp_path, monkeypatch):
  from rigl_jax import checkpoint as checkpoint_lib  # pylint: disable=import-outside-toplevel
  ckpt = checkpoint_lib.Checkpointer(tmp_path, save_interval_steps=1)
  state = {"w": np.arange(10_000, dtype=np.float32)}
  assert ckpt.save(1, state)
  ckpt.wait_until_finished()
  usage = shutil.disk_usage(tmp_path)
  monkeypatch.setattr(checkpoint_lib.shutil, "disk_usage",
                      lambda path: usage._replace(free=1000))
  with pytest.raises(checkpoint_lib.CheckpointSaveError,
                     match=r"cannot save step 2 in .*: 0.0 MB free, and a step takes about"):
    ckpt.save(2, state)
  ckpt.close()
  assert sorted(os.listdir(tmp_path)) == ["1"]  # nothing started


@pytest.mark.slow
@pytest.mark.parametrize("process_id", [0, 1])
def test_a_peer_that_never_connects_is_one_line_after_the_timeout(tmp_path, process_id):
  """One process of two started (its peer died before connecting): after
  --init_timeout_s it ends with one error line and exit 1, not jax's SIGABRT."""
  import socket  # pylint: disable=import-outside-toplevel
  with socket.socket() as sock:
    sock.bind(("localhost", 0))
    port = sock.getsockname()[1]
  cmd = [sys.executable, "-m", "rigl_jax.main", f"--config={REPO}/configs/quickstart.py",
         f"--workdir={tmp_path / 'run'}", "--distributed",
         f"--coordinator_address=localhost:{port}", "--num_processes=2",
         f"--process_id={process_id}", "--init_timeout_s=5", "--compilation_cache_dir="]
  started = time.time()
  result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO)
  assert result.returncode == 1, result.stderr[-3000:]
  assert time.time() - started < 60
  assert "Traceback" not in result.stderr
  [line] = error_lines(result.stderr)
  assert line.startswith(f"error: distributed: process {process_id} waited "
                         f"--init_timeout_s=5 s for every process to join the coordinator at "
                         f"localhost:{port}"), line
  assert not (tmp_path / "run").exists()  # nothing written


# ----------------------------------------------------------------------------- SIGTERM


def test_sigterm_stops_after_the_current_step_saves_and_exits_zero(tmp_path, cache_env):
  workdir = tmp_path / "term"
  # RUN_ARGS' train step (from the compilation cache), no checkpoint before the end and
  # a metrics line every 50 steps: a trainer that looked at the signal only when it
  # logs or saves would stop at step 100 or 400, not right after step 50.
  proc = start(workdir, "--config.log_every=50", "--config.eval_every=0",
               "--config.checkpoint_every=100000", env=cache_env)
  path = workdir / "metrics.jsonl"
  deadline = time.time() + 240
  while (time.time() < deadline and proc.poll() is None and
         not (path.exists() and path.read_text().endswith("\n"))):
    time.sleep(0.001)
  sent = time.time()
  proc.send_signal(signal.SIGTERM)  # just after the line of step 50
  rc, log = finish(proc, timeout=120)
  assert rc == 0, log[-3000:]
  assert time.time() - sent < 30
  [saved] = checkpoint_steps(workdir)
  assert f"preempted at step {saved}" in log
  assert 50 <= saved < 100, saved
  # No record at the stop: an uninterrupted run has none there (the steps since 50 wait
  # in metrics_pending.json for the resumed run).
  assert [r["step"] for r in metrics(workdir)] == [50]
  assert (workdir / "metrics_pending.json").exists() == (saved > 50)
  assert checkpoint_leaves(workdir)  # a complete, readable checkpoint


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP],
                         ids=["SIGTERM", "SIGINT", "SIGHUP"])
def test_an_interrupted_and_resumed_run_logs_like_an_uninterrupted_one(
    reference, tmp_path, cache_env, signum):
  """metrics.jsonl used to get an extra record at the stop, and the next record averaged
  the steps after it only (99 of 100)."""
  workdir = tmp_path / "stopped"
  proc = start(workdir, env=cache_env)
  path = workdir / "metrics.jsonl"
  deadline = time.time() + 240
  while time.time() < deadline and not (path.exists() and path.read_text().count("\n") >= 3):
    assert proc.poll() is None, finish(proc)[1][-3000:]
    time.sleep(0.002)
  proc.send_signal(signum)
  rc, log = finish(proc, timeout=120)
  assert rc == 0 and "preempted at step" in log, log[-3000:]
  rc, log = run(workdir, env=cache_env)
  assert rc == 0, log[-3000:]
  assert_same_run(reference, workdir)


# ----------------------------------------------------------------------------- divergence

# The learning rate warms up to a huge value: the loss turns non-finite after the first
# checkpoints. Static masks: the handling does not depend on the method, and the step
# compiles faster.
DIVERGE = ("--config.method=static", "--config.learning_rate=100.0",
           "--config.warmup_epochs=10.0", "--config.num_train_steps=200",
           "--config.checkpoint_every=10", "--config.log_every=5")


def _all_finite(leaves):
  return all(np.all(np.isfinite(x)) for x in leaves if np.issubdtype(x.dtype, np.floating))


def test_divergence_stop_is_one_line_and_keeps_finite_checkpoints(tmp_path, cache_env):
  workdir = tmp_path / "diverge"
  rc, log = run(workdir, env=cache_env, run_args=DIVERGE)
  assert rc == 3, log[-3000:]
  assert "Traceback" not in log
  [line] = error_lines(log)
  bad = int(re.search(r"non-finite loss or gradient at step (\d+)", line).group(1))
  assert line.startswith("error: training diverged:")
  steps = checkpoint_steps(workdir)
  assert steps and max(steps) <= bad  # nothing saved after the bad step
  assert f"the last good checkpoint (step {max(steps)}) is kept" in line
  for step in steps:
    assert _all_finite(checkpoint_leaves(workdir, step))
  records = metrics(workdir)
  [event] = [r for r in records if r.get("event") == "nonfinite"]
  assert event["nonfinite_step"] == bad
  first_flagged = min(r["step"] for r in records if r.get("nonfinite"))
  assert first_flagged - 5 <= bad < first_flagged  # the log interval holding the bad step


def test_divergence_before_any_checkpoint_says_so_and_logs_strict_json(tmp_path):
  c = config_lib.base_config()
  c.batch_size, c.eval_batch_size = 50, 250
  c.learning_rate = 1e6
  c.num_train_steps, c.checkpoint_every, c.log_every = 40, 1000, 5
  with pytest.raises(FloatingPointError, match="no checkpoint had been written yet"):
    train.train_and_evaluate(c, str(tmp_path))
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert lines

  def bare(name):
    raise AssertionError(f"bare {name} in metrics.jsonl")

  records = [json.loads(line, parse_constant=bare) for line in lines]
  assert any(r.get("loss", 0.0) is None for r in records)  # the non-finite loss, as null


@pytest.mark.slow
def test_a_damaged_byte_in_metrics_jsonl_does_not_stop_reruns(tmp_path):
  c = config_lib.base_config()
  c.batch_size, c.eval_batch_size = 50, 250
  c.num_train_steps, c.checkpoint_every, c.log_every = 20, 10, 5
  first = train.train_and_evaluate(c, str(tmp_path))
  path = tmp_path / "metrics.jsonl"
  data = path.read_bytes()
  cut = data.index(b'"loss"')
  path.write_bytes(data[:cut] + b"\xff" + data[cut + 1:])
  again = train.train_and_evaluate(c, str(tmp_path))  # finished: restores and re-evaluates
  assert again["test_accuracy"] == first["test_accuracy"]


def test_divergence_skip_skips_bad_batches(tmp_path):
  c = config_lib.base_config()
  c.batch_size, c.eval_batch_size, c.update_every = 50, 250, 10
  c.learning_rate, c.warmup_epochs = 100.0, 10.0
  c.num_train_steps, c.checkpoint_every, c.log_every = 40, 20, 10
  c.on_nonfinite, c.method = "skip", "rigl"
  result = train.train_and_evaluate(c, str(tmp_path))
  assert result["steps"] == 40
  records = metrics(tmp_path)
  assert sum(r.get("nonfinite", 0) for r in records) > 0
  assert not any(r.get("event") for r in records)
  for step in checkpoint_steps(tmp_path):
    tree = checkpoint_tree(tmp_path, step)
    assert _all_finite(jax.tree.leaves(tree))
    # Skipped batches still advance the sparse schedule's step with the global one.
    assert int(tree["opt_state"]["step"]) == int(tree["step"]) == step


# ----------------------------------------------------------------------------- bad input


def _snapshot(path):
  """What a workdir holds: its listing, a file's text, or None if absent."""
  if path.is_dir():
    return sorted(os.listdir(path))
  return path.read_text() if path.exists() else None


def quickstart_config():
  spec = importlib.util.spec_from_file_location("quickstart", f"{REPO}/configs/quickstart.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _fake_run(directory, model, files=("config.json", "final_masks", "initial_params")):
  """A workdir that looks like a finished run of ``model``."""
  os.makedirs(directory)
  for name in files:
    if name.endswith(".json"):
      with open(os.path.join(directory, name), "w") as f:
        json.dump({"model": model, "dataset": "mnist5k",
                   "layer_densities": {"conv1/kernel": 0.5}}, f)
    else:
      os.makedirs(os.path.join(directory, name))


# Through the command line: one line, exit 2, nothing written, the train step never
# compiled. The flag-level checks, and one of each later layer (validate, setup, the
# optimizer's patterns, the lottery source); the rest of each layer is tested in-process
# below, which is faster.
BAD_FLAGS = [  # (id, args, expected start of the error message)
    ("type", ["--config.sparsity=abc"], "config.sparsity: could not convert string to float"),
    ("unknown key", ["--config.sparsty=0.5"],
     "config.sparsty: unknown field (did you mean 'sparsity'?"),
    ("unknown nested key", ["--config.custom_sparsity.fc1=0.5"],
     "config.custom_sparsity.fc1: unknown field"),
    ("config file", ["--config=configs/nonexistent.py"], "flags: --config:"),
    ("workdir of another config", ["--config.sparsity=0.5"],
     "config.sparsity: the workdir {workdir} holds a run with sparsity=0.9"),
    ("no match", ["--config.dense_layers=('nomatch',)"],
     "config.dense_layers: dense: pattern 'nomatch' matches no parameter"),
    ("lottery source other model", ["--config.method=lottery",
                                    "--config.source_workdir={tmp}/lenet5_run"],
     "config.model: the source run in '{tmp}/lenet5_run' trained model='lenet5'"),
]


def test_bad_input_is_one_line_exit_2_nothing_written(tmp_path):
  _fake_run(tmp_path / "lenet5_run", "lenet5")
  env = dict(os.environ, JAX_LOG_COMPILES="1")
  procs = []
  for i, (name, args, expected) in enumerate(BAD_FLAGS):
    workdir = tmp_path / f"wd{i}"
    if name == "workdir of another config":  # the quickstart's own config (sparsity 0.9)
      os.makedirs(workdir / "checkpoints" / "500")  # a run with a checkpoint: protected
      (workdir / "config.json").write_text(quickstart_config().to_json_best_effort())
    before = _snapshot(workdir)
    args = [a.format(tmp=tmp_path) for a in args]
    expected = expected.format(tmp=tmp_path, workdir=workdir)
    procs.append((name, workdir, before, expected, start(workdir, *args, env=env, run_args=())))
  failures = []
  for name, workdir, before, expected, proc in procs:
    rc, log = finish(proc)
    lines = error_lines(log)
    ok = (rc == 2 and len(lines) == 1 and lines[0].startswith(f"error: {expected}") and
          "Traceback" not in log and "jit(train_step)" not in log and
          "jit(init_state)" not in log)
    ok = ok and _snapshot(workdir) == before
    if not ok:
      failures.append(f"{name}: rc={rc} lines={lines} tail={log[-600:]!r}")
  assert not failures, "\n".join(failures)


BAD_RUNS = [  # (id, config overrides, expected start of the message); {tmp}: tmp_path
    ("lottery source missing", {"method": "lottery", "source_workdir": "{tmp}/nope"},
     "config.source_workdir: '{tmp}/nope' has no config.json"),
    ("lottery source other model", {"method": "lottery", "source_workdir": "{tmp}/lenet5_run"},
     "config.model: the source run in '{tmp}/lenet5_run' trained model='lenet5'"),
    ("distribution source missing", {"distribution_source": "{tmp}/nope"},
     "config.distribution_source: '{tmp}/nope' has no summary.json"),
    ("distribution source other model", {"distribution_source": "{tmp}/lenet5_summary"},
     "config.distribution_source: the run in '{tmp}/lenet5_summary' trained"),
    ("lottery at another sparsity than its source",
     {"method": "lottery", "source_workdir": "{tmp}/mlp90_run", "sparsity": 0.8},
     "config.sparsity: the source run in '{tmp}/mlp90_run' trained sparsity=0.9; a lottery "
     "ticket retrains its source's masks, so sparsity must be 0.9, got 0.8"),
    ("lottery with another distribution than its source",
     {"method": "lottery", "source_workdir": "{tmp}/mlp90_run", "distribution": "uniform"},
     "config.distribution: the source run in '{tmp}/mlp90_run' trained distribution='erk'"),
    ("source without lottery", {"source_workdir": "{tmp}/lenet5_run"},
     "config.source_workdir: only method 'lottery' reads it"),
    ("custom pattern matches nothing", {"custom_sparsity": {"conv9": 0.5}},
     "config.custom_sparsity: custom: pattern 'conv9' matches no parameter"),
    ("dense pattern matches nothing", {"dense_layers": ("conv9",)},
     "config.dense_layers: dense: pattern 'conv9' matches no parameter"),
    ("workdir of another config", {"sparsity": 0.5},
     "config.sparsity: the workdir {workdir} holds a run with sparsity=0.9"),
    ("sparsity leaves a layer empty", {"sparsity": 0.9999999}, "config.sparsity: sparsity: "),
    ("2:4 at another sparsity", {"structure": "2:4", "sparsity": 0.9},
     "config.sparsity: sparsity: every sparse layer is N:M (2:4)"),
    ("blocks that do not tile a layer", {"structure": "block:4x4"},
     "config.structure: structure: block:4x4 needs layer"),
    ("redistribution with a structure", {"method": "snfs", "structure": "constant_fan_in"},
     "config.structure: structure: method 'snfs' moves weights between layers"),
    ("structure on a dense run", {"method": "dense", "structure": "2:4"},
     "config.structure: only sparse methods have a structure"),
    ("every layer forced dense", {"dense_layers": (".*",)},
     "config.dense_layers: dense: the patterns force every sparsifiable parameter dense"),
    ("workdir is a file", {}, "workdir: '{workdir}' exists and is not a directory"),
    ("workdir config.json damaged", {}, "config.overwrite: cannot read {workdir}/config.json"),
]


@pytest.mark.parametrize("name, overrides, expected", BAD_RUNS, ids=[b[0] for b in BAD_RUNS])
def test_bad_run_input_raises_before_writing(tmp_path, name, overrides, expected):
  _fake_run(tmp_path / "lenet5_run", "lenet5")
  _fake_run(tmp_path / "lenet5_summary", "lenet5", files=("summary.json",))
  _fake_run(tmp_path / "mlp90_run", "lenet_300_100")
  with open(tmp_path / "mlp90_run" / "config.json", "w") as f:
    json.dump({"model": "lenet_300_100", "dataset": "mnist5k", "sparsity": 0.9,
               "distribution": "erk", "method": "pruning_global"}, f)
  workdir = tmp_path / "wd"
  c = quickstart_config()
  c.num_train_steps = 10
  if name == "workdir of another config":
    os.makedirs(workdir / "checkpoints" / "10")  # a run with a checkpoint: protected
    (workdir / "config.json").write_text(c.to_json_best_effort())
  if name == "workdir is a file":
    workdir.write_text("not a directory")
  if name == "workdir config.json damaged":
    os.makedirs(workdir)
    (workdir / "config.json").write_text(c.to_json_best_effort()[:40])
  for k, v in overrides.items():
    c[k] = v.format(tmp=tmp_path) if isinstance(v, str) else v
  before = _snapshot(workdir)
  with pytest.raises(config_lib.ConfigError) as e:
    train.train_and_evaluate(c, str(workdir))
  message = str(e.value)
  assert message.startswith(expected.format(tmp=tmp_path, workdir=workdir)), message
  assert "\n" not in message
  assert _snapshot(workdir) == before

# Every field of the shared config with a value of the wrong type or out of range.
_BAD_FIELDS = [
    ("model", "resnet9"), ("model", 3), ("dataset", "svhn"), ("validation_size", -2),
    ("sequence_length", 0), ("sequence_length", 12.5), ("optimizer", "adamw"),
    ("grad_clip_norm", -1.0), ("grad_clip_norm", float("nan")),
    ("validation_size", 1.5), ("dtype", "float16"), ("method", "magic"),
    ("distribution", "normal"), ("sparsity", 1.0), ("sparsity", "0.5"), ("sparsity", True),
    ("sparsity", float("nan")), ("update_every", 0), ("update_every", 2.0),
    ("drop_fraction", 1.5), ("drop_schedule", "linear"), ("end_fraction", -0.1),
    ("end_step", -2), ("start_step", -1), ("skip_inner_update_on_mask_step", 1),
    ("dense_layers", "fc1"), ("dense_layers", (3,)), ("dense_layers", ("(",)),
    ("custom_sparsity", {"fc1": 1.0}), ("custom_sparsity", {"fc1": "x"}),
    ("custom_sparsity", {"[": 0.5}), ("custom_sparsity", ("fc1",)),
    ("source_workdir", None), ("distribution_source", 3), ("data_dir", None),
    ("batch_size", 0), ("batch_size", "8"), ("eval_batch_size", 0), ("num_epochs", -1),
    ("num_train_steps", -2), ("train_multiplier", 0.0), ("train_multiplier", float("inf")),
    ("learning_rate", -0.1), ("learning_rate", float("inf")), ("lr_drop_steps", (-1,)),
    ("lr_drop_steps", 100), ("lr_drop_steps", (1.5,)), ("lr_drop_factor", 2.0),
    ("warmup_epochs", -1.0), ("momentum", 1.0), ("nesterov", "yes"), ("weight_decay", -1e-4),
    ("label_smoothing", 1.0), ("on_nonfinite", "ignore"), ("update_program", "apart"),
    ("update_program", True), ("seed", -1), ("seed", 2**32),
    ("log_every", 0), ("eval_every", -1), ("checkpoint_every", 0), ("keep_checkpoints", 0),
    ("overwrite", "no"), ("uniform_first_layer_dense", 0),
    ("dropout_rate", 0.3), ("dropout_rate", 1.0), ("dropout_rate", -0.5), ("dropout_rate", "0"),
    ("augmentation", "autoaugment"), ("augmentation", 3), ("warmup_steps", -2),
    ("warmup_steps", 1.5), ("lr_drops_after_warmup", 1), ("structure", "3:2"), ("structure", "block:1x1"),
    ("structure", "fan_in"), ("structure", 4), ("srigl_gamma_sal", 1.0),
    ("srigl_gamma_sal", "0.3"), ("srigl_no_ablation", "head"), ("srigl_no_ablation", ("(",)),
]


@pytest.mark.parametrize("field, value", _BAD_FIELDS,
                         ids=[f"{f}={v!r}" for f, v in _BAD_FIELDS])
def test_every_field_is_checked(field, value):
  c = config_lib.base_config()
  with c.ignore_type():
    c[field] = value
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(c)
  message = str(e.value)
  assert message.startswith(f"config.{field}: ") and "\n" not in message


def test_every_field_has_a_bad_value_above():
  assert {f for f, _ in _BAD_FIELDS} == set(config_lib.base_config())


# ----------------------------------------------------------------------------- determinism


@pytest.mark.slow
def test_rerun_gives_identical_numbers(reference, tmp_path):
  # No compilation cache: both runs compile from scratch.
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
  rc, log = run(tmp_path / "again", "--compilation_cache_dir=", env=env)
  assert rc == 0, log[-3000:]
  assert_same_run(reference, tmp_path / "again")


@pytest.mark.parametrize("name", ["metrics.jsonl", "summary.json", "checkpoints", "config.json"])
def test_sabotaged_workdir_entry_is_one_error_line(tmp_path, name):
  workdir = tmp_path / "wd"
  os.makedirs(workdir)
  if name == "checkpoints":
    (workdir / name).write_text("not a directory")
  else:
    os.makedirs(workdir / name)
  rc, log = run(workdir, "--config.num_train_steps=5", env=dict(os.environ))
  assert rc == 2, log[-2000:]
  assert "Traceback" not in log
  [line] = error_lines(log)
  assert line.startswith(f"error: workdir: {workdir / name} must be a ")


CONFIG_FILES = {  # name: (file text, --config suffix, expected message after the path)
    "raises": ("def get_config():\n  raise RuntimeError('boom')\n", "", "RuntimeError: boom"),
    "syntax error": ("def get_config(:\n", "", "SyntaxError: invalid syntax"),
    "no get_config": ("x = 1\n", "", "AttributeError: module"),
    "argument it does not take": ("from rigl_jax import config\n"
                                  "def get_config():\n  return config.base_config()\n",
                                  ":foo", "TypeError: get_config() takes 0 positional"),
}


@pytest.mark.parametrize("name", list(CONFIG_FILES))
def test_broken_config_file_is_one_error_line(tmp_path, name):
  text, suffix, expected = CONFIG_FILES[name]
  path = tmp_path / "broken_config.py"
  path.write_text(text)
  workdir = tmp_path / "wd"
  proc = subprocess.run([sys.executable, "-m", "rigl_jax.main", f"--config={path}{suffix}",
                         f"--workdir={workdir}"], capture_output=True, text=True, timeout=120)
  log = proc.stdout + proc.stderr
  assert proc.returncode == 2, log[-2000:]
  assert "Traceback" not in log
  [line] = error_lines(log)
  assert line.startswith(f"error: flags: --config: {path}{suffix}: {expected}"), line
  assert not workdir.exists()


def test_workdir_that_cannot_be_made_is_one_error_line_and_makes_nothing(tmp_path):
  workdir = tmp_path / "a" / "b" / ("x" * 300) / "c"
  proc = subprocess.run([sys.executable, "-m", "rigl_jax.main",
                         f"--config={REPO}/configs/quickstart.py", f"--workdir={workdir}",
                         "--config.num_train_steps=3"], capture_output=True, text=True,
                        timeout=300)
  log = proc.stdout + proc.stderr
  assert proc.returncode == 2, log[-2000:]
  [line] = error_lines(log)
  assert line.startswith("error: workdir: the path component 'xxx") and "Traceback" not in log
  assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("args, env_extra, message", [
    (("stray",), {}, "error: flags: unexpected argument(s) 'stray': every setting is a flag"),
    (("--init_timeout_s=-1", "--distributed"), {},
     "error: flags: --init_timeout_s must be >= 1, got -1"),
    (("--heartbeat_timeout_s=0", "--distributed"), {},
     "error: flags: --heartbeat_timeout_s must be >= 1, got 0"),
    ((), {"JAX_PLATFORMS": "cuda"}, "error: devices: JAX_PLATFORMS='cuda': "),
], ids=["positional", "init_timeout", "heartbeat_timeout", "no_such_platform"])
def test_more_bad_input_is_one_line_exit_2_nothing_written(tmp_path, args, env_extra, message):
  """Each used to be a traceback, a SIGABRT, a --help dump or silently accepted; and
  every error line was preceded by JAX's 'Unable to initialize backend' INFO line."""
  workdir = tmp_path / "wd"
  proc = subprocess.run([sys.executable, "-m", "rigl_jax.main",
                         f"--config={REPO}/configs/quickstart.py", f"--workdir={workdir}",
                         *args], capture_output=True, text=True, timeout=120,
                        env=dict(os.environ, **env_extra))
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert proc.stderr.splitlines()[-1].startswith(message), proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr and "Unable to initialize backend" not in proc.stderr
  assert not workdir.exists()


def test_a_workdir_path_too_long_for_the_file_system_makes_nothing(tmp_path):
  """Each component fits, the whole path does not: used to leave ~16 nested folders."""
  workdir = tmp_path.joinpath(*["d" * 250] * 20)
  proc = subprocess.run([sys.executable, "-m", "rigl_jax.main",
                         f"--config={REPO}/configs/quickstart.py", f"--workdir={workdir}"],
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2, proc.stderr[-2000:]
  [line] = error_lines(proc.stderr)
  assert line.startswith("error: workdir: the path ") and "bytes for a whole path" in line
  assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- one run per workdir


@pytest.mark.slow
def test_a_second_run_on_a_busy_workdir_is_refused_and_a_killed_run_leaves_no_lock(
    tmp_path, cache_env):
  workdir = tmp_path / "busy"
  first = start(workdir, "--config.num_train_steps=1000000", "--config.log_every=20",
                "--config.checkpoint_every=40", env=cache_env)
  path = workdir / "metrics.jsonl"
  deadline = time.time() + 240
  while time.time() < deadline and not (path.exists() and path.read_text().count("\n") >= 2):
    assert first.poll() is None, finish(first)[1][-3000:]
    time.sleep(0.02)
  before = path.read_text()
  rc, log = run(workdir, "--config.num_train_steps=1000000", "--config.log_every=20",
                "--config.checkpoint_every=40", env=cache_env)
  assert rc == 2, log[-3000:]
  [line] = error_lines(log)
  assert line == (f"error: workdir: {workdir} is in use by process {first.pid} (one run per "
                  f"workdir); wait for it to end or stop it, then rerun to resume")
  assert "Traceback" not in log
  # The refused run wrote nothing: the first one's log goes on, one record per step.
  first.send_signal(signal.SIGKILL)
  first.wait()
  records = [json.loads(l) for l in path.read_text().splitlines()]
  steps = [r["step"] for r in records if "loss" in r]  # the training records
  assert path.read_text().startswith(before) and steps == sorted(set(steps))
  # SIGKILL released the lock: the same command resumes.
  rc, log = run(workdir, "--config.num_train_steps=200", "--config.log_every=20",
                "--config.checkpoint_every=40", "--config.overwrite=True", env=cache_env)
  assert rc == 0, log[-3000:]
  assert "Resumed" in log


def test_two_sweeps_on_one_directory_is_one_error_line(tmp_path):
  from rigl_jax.launch import local  # pylint: disable=import-outside-toplevel
  sweep_dir = tmp_path / "sweep"
  with local.sweep_lock(str(sweep_dir)):
    proc = subprocess.run(
        [sys.executable, "-m", "rigl_jax.launch.sweep", f"--config={REPO}/configs/quickstart.py",
         f"--sweep_dir={sweep_dir}", "--methods=rigl", "--set=num_train_steps=2"],
        cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr.strip().splitlines() == [
      f"error: --sweep_dir: another sweep is running in {sweep_dir} (its lock: "
      f"{sweep_dir}/.sweep.lock)"]


# ----------------------------------------------------------------------------- write failures


@pytest.mark.slow
def test_initial_params_on_a_full_disk_is_one_line_and_the_rerun_starts(tmp_path, cache_env):
  """The initial params (~1 MB) do not fit, config.json (a few kB) does: used to be a
  tensorstore RESOURCE_EXHAUSTED traceback."""
  workdir = tmp_path / "full"
  cmd = [sys.executable, "-m", "rigl_jax.main", f"--config={REPO}/configs/quickstart.py",
         f"--workdir={workdir}", "--config.num_train_steps=20"]
  proc = subprocess.run(_with_file_size_limit(100_000, cmd), capture_output=True, text=True,
                        env=cache_env, cwd=REPO, timeout=300)
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  [line] = error_lines(proc.stderr)
  assert line.startswith(f"error: workdir: cannot write {workdir / 'initial_params'}: "), line
  rc, log = run(workdir, env=cache_env, run_args=("--config.num_train_steps=20",))
  assert rc == 0, log[-3000:]


def test_workdir_files_that_cannot_be_written_are_one_error_each(tmp_path, monkeypatch):
  from rigl_jax import paths, workdir as workdir_lib  # pylint: disable=import-outside-toplevel
  c = quickstart_config()
  c.num_train_steps = 5

  def read_only(path, data):
    raise OSError(30, "Read-only file system", path)

  monkeypatch.setattr(paths, "write_atomic", read_only)
  with pytest.raises(workdir_lib.WriteError,
                     match=r"^workdir: cannot write .*config\.json: Read-only file system$"):
    train.train_and_evaluate(c, str(tmp_path / "ro"))
  monkeypatch.undo()
  # An existing workdir this user may not write (checked before anything runs).
  (tmp_path / "theirs").mkdir()
  monkeypatch.setattr(os, "access", lambda path, mode: False)
  with pytest.raises(config_lib.ConfigError, match="workdir: .* is not writable by this user"):
    workdir_lib.check_path(str(tmp_path / "theirs"))
