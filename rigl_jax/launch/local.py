"""Runs a sweep locally: one subprocess per run, at most ``concurrency`` at a time.

- A run whose workdir holds ``summary.json`` is finished and skipped.
- Any other run is (re)started with the same command; the trainer resumes from its
  latest checkpoint, so an interrupted sweep just needs the same command again.
- ``SWEEP_DIR/status.json`` records every run's state (``finished``, ``failed``,
  ``diverged``, ``incomplete``, ``running``, ``interrupted``), exit code, attempts and the
  tail of its stderr. A failing run never stops the sweep.
- A run with a source (``Run.after``: a lottery ticket's pruning run) starts once that
  run has finished; when the source ends otherwise, the run is ``blocked``.
- Each run's stdout and stderr go to ``WORKDIR/launch.out`` and ``WORKDIR/launch.err``.
- SIGINT / SIGTERM to the sweep: no new runs start; running ones get SIGTERM (the
  trainer saves a checkpoint and exits) and are recorded as ``interrupted``.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import functools
import json
import os
import signal
import subprocess
import sys
import time
from typing import Callable, Sequence

from rigl_jax.launch import grid

STATUS = "status.json"
SUMMARY = "summary.json"
STDOUT, STDERR = "launch.out", "launch.err"
# States of status.json.
FINISHED, FAILED, DIVERGED = "finished", "failed", "diverged"
INCOMPLETE, RUNNING, INTERRUPTED = "incomplete", "running", "interrupted"
BLOCKED = "blocked"  # not started: a run it needs (Run.after) ended without finishing


def is_finished(workdir: str) -> bool:
  """Whether the workdir (a path or a URL) holds a finished run's summary."""
  from rigl_jax import paths  # pylint: disable=import-outside-toplevel
  return paths.exists(paths.join(workdir, SUMMARY))


def trainer_command(config_path: str, run: grid.Run, common: dict | None = None, *,
                    python: str = sys.executable, distributed: bool = False) -> list[str]:
  """``python -m rigl_jax.main --config=... --workdir=... --config.k=v ...``."""
  cmd = [python, "-m", "rigl_jax.main"]
  if distributed:
    cmd.append("--distributed")
  cmd += [f"--config={config_path}", f"--workdir={run.workdir}"]
  for key, value in list((common or {}).items()) + list(run.overrides.items()):
    cmd.append(f"--config.{key}={_cli_value(value)}")
  return cmd


def _cli_value(value) -> str:
  if isinstance(value, float):
    return repr(value)
  if isinstance(value, (tuple, list)):
    return "(" + ",".join(_cli_value(v) for v in value) + ("," if len(value) == 1 else "") + ")"
  return str(value)


def tail(path: str, lines: int = 25, max_chars: int = 4000) -> str:
  """The last ``lines`` lines of a text file (at most ``max_chars``), '' if missing."""
  try:
    with open(path, "rb") as f:
      f.seek(0, os.SEEK_END)
      f.seek(max(0, f.tell() - 64 * 1024))
      text = f.read().decode("utf-8", errors="replace")
  except OSError:
    return ""
  return "\n".join(text.splitlines()[-lines:])[-max_chars:]


def _now() -> str:
  return datetime.datetime.now().isoformat(timespec="seconds")


class StatusFile:
  """``status.json``: ``{"runs": {name: {...}}, "updated": ...}``, rewritten atomically
  on every change; entries of earlier invocations are kept."""

  def __init__(self, path: str):
    self.path = path
    self.data = {"runs": {}}
    if os.path.exists(path):
      with open(path) as f:
        self.data = json.load(f)
      self.data.setdefault("runs", {})

  def get(self, name: str) -> dict:
    return self.data["runs"].get(name, {})

  def update(self, name: str, **fields) -> None:
    self.data["runs"].setdefault(name, {}).update(fields)
    self.data["updated"] = _now()
    tmp = self.path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(self.data, f, indent=2, sort_keys=True)
    os.replace(tmp, self.path)


def read_status(sweep_dir: str) -> dict:
  """``{name: entry}`` of ``SWEEP_DIR/status.json`` ({} when there is none)."""
  from rigl_jax import paths  # pylint: disable=import-outside-toplevel
  if paths.is_url(sweep_dir):  # status.json belongs to local sweeps (emitted ones have none)
    return {}
  path = os.path.join(sweep_dir, STATUS)
  return StatusFile(path).data["runs"] if os.path.exists(path) else {}


class SweepInUse(RuntimeError):
  """Another sweep holds the sweep directory."""


@contextlib.contextmanager
def sweep_lock(sweep_dir: str):
  """One sweep process per directory: a second one fails at once instead of racing."""
  os.makedirs(sweep_dir, exist_ok=True)
  with open(os.path.join(sweep_dir, ".sweep.lock"), "w") as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      raise SweepInUse(f"another sweep is running in {sweep_dir} (its lock: "
                       f"{os.path.join(sweep_dir, '.sweep.lock')})") from None
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


class _StopRequests:
  """SIGINT and SIGTERM set a flag (main thread only) instead of killing the sweep."""

  def __init__(self):
    self.requested = False
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGINT, signal.SIGTERM):
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread
        pass
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def __exit__(self, *exc):
    for sig, previous in self._previous.items():
      signal.signal(sig, previous)


def _final_state(returncode: int, workdir: str) -> str:
  if returncode == 0:
    return FINISHED if is_finished(workdir) else INCOMPLETE
  err = tail(os.path.join(workdir, STDERR), lines=200, max_chars=50_000)
  return DIVERGED if "FloatingPointError" in err or "non-finite" in err else FAILED


def run_local(runs: Sequence[grid.Run], sweep_dir: str,
              command_fn: Callable[[grid.Run], list[str]], *, concurrency: int = 1,
              poll_s: float = 0.5, grace_s: float = 300.0, env: dict | None = None,
              log: Callable[[str], None] = print) -> dict[str, str]:
  """Runs every unfinished run; returns ``{name: final state}``.

  Args:
    runs: the sweep's runs (their workdirs are created here).
    sweep_dir: holds ``status.json``.
    command_fn: a run -> its argv (e.g. ``functools.partial(trainer_command, config)``).
    concurrency: at most this many runs at a time.
    poll_s: how often running processes are checked.
    grace_s: after a stop request, how long runs may take to save and exit before
      they are killed.
    env: extra environment variables of the runs.
  """
  if concurrency < 1:
    raise ValueError(f"concurrency must be >= 1, got {concurrency}")
  status = StatusFile(os.path.join(sweep_dir, STATUS))
  states, pending = {}, []
  names = {run.name for run in runs}
  for run in runs:
    if is_finished(run.workdir):
      states[run.name] = FINISHED
      if status.get(run.name).get("state") != FINISHED:
        status.update(run.name, state=FINISHED, workdir=run.workdir, overrides=run.overrides)
    else:
      pending.append(run)
  log(f"{len(runs)} runs: {len(runs) - len(pending)} finished, {len(pending)} to run "
      f"(concurrency {concurrency})")
  child_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
  active = {}  # name -> (run, Popen, files, start time)

  def start(run: grid.Run):
    os.makedirs(run.workdir, exist_ok=True)
    cmd = command_fn(run)
    out = open(os.path.join(run.workdir, STDOUT), "w")
    err = open(os.path.join(run.workdir, STDERR), "w")
    proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=child_env,
                            start_new_session=True)  # Ctrl-C reaches the sweep only
    attempts = status.get(run.name).get("attempts", 0) + 1
    status.update(run.name, state=RUNNING, workdir=run.workdir, overrides=run.overrides,
                  command=cmd, attempts=attempts, started_at=_now(), returncode=None,
                  stderr_tail="", pid=proc.pid)
    active[run.name] = (run, proc, (out, err), time.time())
    log(f"start [{attempts}] {run.name}")

  def finish(name: str, returncode: int, state: str | None = None):
    run, _, files, started = active.pop(name)
    for f in files:
      f.close()
    state = state or _final_state(returncode, run.workdir)
    states[name] = state
    fields = dict(state=state, returncode=returncode, ended_at=_now(),
                  duration_s=round(time.time() - started, 1), pid=None)
    fields["stderr_tail"] = (tail(os.path.join(run.workdir, STDERR))
                             if state not in (FINISHED, INCOMPLETE) else "")
    status.update(name, **fields)
    log(f"{state} (exit {returncode}) {name}")

  def block(run: grid.Run, source: str):
    states[run.name] = BLOCKED
    status.update(run.name, state=BLOCKED, workdir=run.workdir, overrides=run.overrides,
                  returncode=None, stderr_tail=f"not started: run {source} did not finish "
                  f"({states.get(source, 'not run')})")
    log(f"{BLOCKED} {run.name}: run {source} did not finish")

  def start_ready():
    """Starts pending runs whose sources have finished (grid order), blocks those whose
    sources ended otherwise."""
    for run in list(pending):
      waiting = [a for a in run.after if states.get(a) != FINISHED]
      # A source that has a state (not finished), or is no run of this list and has
      # no summary, will not finish here.
      ended = [a for a in waiting if a in states or (
          a not in names and not is_finished(run.overrides[grid.SOURCE_FIELD]))]
      waiting = [a for a in waiting if a in names]
      if ended:
        pending.remove(run)
        block(run, ended[0])
      elif not waiting and len(active) < concurrency and not stop.requested:
        pending.remove(run)
        start(run)

  with _StopRequests() as stop:
    while (pending or active) and not stop.requested:
      start_ready()
      if pending and not active:  # what is left waits in a circle: none can start
        for run in list(pending):
          pending.remove(run)
          block(run, run.after[0])
      for name, (_, proc, _, _) in list(active.items()):
        if proc.poll() is not None:
          finish(name, proc.returncode)
      if active:
        time.sleep(poll_s)
    if stop.requested:
      log(f"stop requested: SIGTERM to {len(active)} running runs, {len(pending)} not started")
      for _, proc, _, _ in active.values():
        with contextlib.suppress(ProcessLookupError):
          proc.send_signal(signal.SIGTERM)
      deadline = time.time() + grace_s
      for name, (run, proc, _, _) in list(active.items()):
        try:
          returncode = proc.wait(timeout=max(0.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
          proc.kill()
          returncode = proc.wait()
        finish(name, returncode, FINISHED if is_finished(run.workdir) else INTERRUPTED)
      for run in pending:
        states[run.name] = status.get(run.name).get("state", "not started")
  return states


def run_sweep(runs: Sequence[grid.Run], sweep_dir: str, *, config_path: str, common: dict,
              base_config, concurrency: int = 1, python: str = sys.executable,
              log: Callable[[str], None] = print) -> dict[str, str]:
  """The local sweep of ``launch.sweep`` and ``launch.tune --mode=lr_grid``: writes
  ``sweep.json``, holds the directory's lock and runs the trainer command of each run."""
  grid.write_manifest(sweep_dir, config_path=config_path, common=common, runs=runs,
                      base_config=base_config)
  command_fn = functools.partial(trainer_command, config_path, common=common, python=python)
  with sweep_lock(sweep_dir):
    states = run_local(runs, sweep_dir, command_fn, concurrency=concurrency, log=log)
  counts = {}
  for state in states.values():
    counts[state] = counts.get(state, 0) + 1
  log("sweep: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) +
      f" (details: {os.path.join(sweep_dir, STATUS)})")
  return states
