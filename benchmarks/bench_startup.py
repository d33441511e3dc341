"""Start-up of the quickstart: from launch to its first training step (issue 18).

Usage:
  python benchmarks/bench_startup.py [--runs 3]

Runs ``python -m rigl_jax.main --config=configs/quickstart.py`` in fresh
processes with their own compilation cache folder: once with the cache empty
(cold), then ``--runs`` times with it filled (warm), each into a new workdir,
logging every step. From the launch time and the trainer's own log timestamps it
prints, per run: ``starting_s`` (launch to the "Starting" line: imports, data,
model, optimizer state), ``first_step_s`` (launch to the end of step 1, which
includes loading or compiling the step) and ``total_s``. Also the import time of
``rigl_jax.train`` alone, in a fresh process. Target: warm ``first_step_s <= 3``.

``--update_programs`` instead runs a model cold (cache empty) with ``update_program``
``separate`` and ``in_step``, interleaved: ``separate`` compiles the step without
the mask update before step 1 and the whole step on a thread
(``train.StepPrograms``)::

  python benchmarks/bench_startup.py --update_programs --model=wrn_22_2 --steps=6 --update_every=3
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_LOG_TIME = re.compile(r"^I\d{4} (\d\d):(\d\d):(\d\d\.\d+) ")


def _log_seconds(line: str, day: datetime.date) -> float | None:
  """The wall-clock time (epoch seconds) of an absl log line, None for other lines."""
  match = _LOG_TIME.match(line)
  if not match:
    return None
  h, m, s = int(match[1]), int(match[2]), float(match[3])
  midnight = datetime.datetime.combine(day, datetime.time()).timestamp()
  return midnight + 3600 * h + 60 * m + s


def one_run(workdir: str, cache_dir: str, *overrides: str) -> dict:
  cmd = [sys.executable, "-m", "rigl_jax.main", f"--config={REPO}/configs/quickstart.py",
         f"--workdir={workdir}", f"--compilation_cache_dir={cache_dir}",
         "--config.log_every=1", "--config.num_train_steps=50", "--config.eval_every=0",
         *overrides]
  env = dict(os.environ)
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  day = datetime.date.today()
  launch = time.time()
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
  end = time.time()
  if proc.returncode != 0:
    raise RuntimeError(proc.stderr[-2000:])
  starting = first_step = None
  for line in proc.stderr.splitlines():
    t = _log_seconds(line, day)
    if t is None:
      continue
    if starting is None and "Starting" in line:
      starting = t
    if first_step is None and re.search(r"step +1/", line):
      first_step = t
  return {"starting_s": starting - launch, "first_step_s": first_step - launch,
          "total_s": end - launch}


def import_seconds() -> float:
  start = time.time()
  subprocess.run([sys.executable, "-c", "import rigl_jax.train"], cwd=REPO, check=True)
  return time.time() - start


def compare_update_programs(args) -> None:
  """Cold runs of ``args.model`` with update_program separate and in_step, interleaved."""
  rows = {True: [], False: []}
  with tempfile.TemporaryDirectory() as tmp:
    for i in range(args.runs):
      for on in (True, False) if i % 2 == 0 else (False, True):
        rows[on].append(one_run(
            os.path.join(tmp, f"{on}{i}"), os.path.join(tmp, f"cache{on}{i}"),
            f"--config.model={args.model}", f"--config.num_train_steps={args.steps}",
            f"--config.update_every={args.update_every}", "--config.checkpoint_every=1000",
            f"--config.update_program={'separate' if on else 'in_step'}"))
  print(f"{args.model}, {args.steps} steps, mask updates every {args.update_every}, "
        f"cache empty, {args.runs} runs each (median)\n")
  print("| update_program | launch -> end of step 1 | whole run |")
  print("|---|---|---|")
  med = lambda on, k: statistics.median(r[k] for r in rows[on])
  for on in (True, False):
    print(f"| {'separate' if on else 'in_step'} | {med(on, 'first_step_s'):.2f} s | "
          f"{med(on, 'total_s'):.2f} s |")
  print(f"\nstep 1 comes {med(False, 'first_step_s') - med(True, 'first_step_s'):.2f} s "
        f"sooner; the whole run takes {med(True, 'total_s') - med(False, 'total_s'):+.2f} s")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--runs", type=int, default=3,
                      help="warm runs (--update_programs: runs of each)")
  parser.add_argument("--update_programs", action="store_true",
                      help="compare update_program separate and in_step, cold")
  parser.add_argument("--model", default="wrn_22_2")
  parser.add_argument("--steps", type=int, default=6)
  parser.add_argument("--update_every", type=int, default=3)
  args = parser.parse_args()
  if args.update_programs:
    compare_update_programs(args)
    return
  with tempfile.TemporaryDirectory() as tmp:
    cache = os.path.join(tmp, "cache")
    rows = [("cold", one_run(os.path.join(tmp, "cold"), cache))]
    for i in range(args.runs):
      rows.append((f"warm {i + 1}", one_run(os.path.join(tmp, f"warm{i}"), cache)))
  imports = statistics.median(import_seconds() for _ in range(3))
  print(f"import rigl_jax.train alone: {imports:.2f} s (median of 3 fresh processes)\n")
  print("| run | launch -> Starting | launch -> end of step 1 | whole run (50 steps) |")
  print("|---|---|---|---|")
  for name, r in rows:
    print(f"| {name} | {r['starting_s']:.2f} s | {r['first_step_s']:.2f} s | {r['total_s']:.2f} s |")
  warm = statistics.median(r["first_step_s"] for name, r in rows if name != "cold")
  print(f"\nwarm first step (median): {warm:.2f} s; target <= 3 s: "
        f"{'met' if warm <= 3 else 'MISSED'}")


if __name__ == "__main__":
  main()
