"""Runs every benchmark (or merges saved results) and prints one table.

Usage:
  python benchmarks/run_all.py --quick                 # core, pipeline, memory in quick mode (~5 min)
  python benchmarks/run_all.py                         # everything, WRN-22-2 included (long on 2 cores)
  python benchmarks/run_all.py --only core,memory      # a subset
  python benchmarks/run_all.py --quick --out results.json
  python benchmarks/run_all.py --load a.json b.json    # one table from runs saved with --out
                                                       # (by run_all.py or by each bench_*.py)

Extra arguments after ``--`` go to every benchmark (e.g. ``-- --reps 3``).
Each row says which benchmark, model and metric, the value, the target and
whether this run met it. The machine (CPU model, cores, memory, jax version)
and the 1-minute load average sampled every 5 s during the run are printed
too: on a shared machine only ratios taken in the same run mean anything.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_core  # pylint: disable=wrong-import-position
import bench_memory  # pylint: disable=wrong-import-position
import bench_pipeline  # pylint: disable=wrong-import-position

BENCHES = {"core": bench_core, "pipeline": bench_pipeline, "memory": bench_memory}


def machine_info() -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  cpu = ""
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next((line.split(":", 1)[1].strip() for line in f
                  if line.startswith("model name")), "")
  except OSError:
    pass
  try:
    free = subprocess.run(["free", "-h"], capture_output=True, text=True, check=False).stdout
  except OSError:
    free = ""
  try:
    nproc = subprocess.run(["nproc"], capture_output=True, text=True, check=False).stdout.strip()
  except OSError:
    nproc = str(os.cpu_count())
  return {"cpu_model": cpu, "nproc": nproc, "os_cpu_count": os.cpu_count(),
          "free_h": free.strip("\n"), "platform": platform.platform(),
          "python": platform.python_version(), "jax": jax.__version__,
          "backend": jax.default_backend(),
          "devices": [str(d) for d in jax.devices()]}


class LoadSampler:
  """Samples the 1-minute load average every ``period`` seconds in a thread."""

  def __init__(self, period: float = 5.0):
    self.period, self.samples = period, []
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)

  def _run(self):
    while not self._stop.is_set():
      self.samples.append(os.getloadavg()[0])
      self._stop.wait(self.period)

  def __enter__(self):
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()

  def summary(self) -> dict:
    s = self.samples or [os.getloadavg()[0]]
    return {"min": min(s), "mean": sum(s) / len(s), "max": max(s), "n": len(s)}


def format_table(rows) -> str:
  table = [("bench", "model", "metric", "value", "target", "verdict")] + [
      tuple(str(c) for c in r) for r in rows]
  widths = [max(len(line[i]) for line in table) for i in range(6)]
  lines = [" | ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in table]
  lines.insert(1, "-+-".join("-" * w for w in widths))
  return "\n".join(lines)


def main(argv=None):
  argv = list(sys.argv[1:] if argv is None else argv)
  passthrough = []
  if "--" in argv:
    i = argv.index("--")
    argv, passthrough = argv[:i], argv[i + 1:]
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="quick mode of every benchmark")
  parser.add_argument("--only", default=",".join(BENCHES),
                      help="comma-separated subset of " + ",".join(BENCHES))
  parser.add_argument("--load", nargs="+", default=None,
                      help="merge saved JSON results instead of running")
  parser.add_argument("--out", default=None, help="write all results as JSON here")
  args = parser.parse_args(argv)
  log = lambda msg: print(msg, file=sys.stderr, flush=True)

  results = {}
  info = machine_info()
  load = None
  t0 = time.perf_counter()
  if args.load:
    for path in args.load:
      with open(path) as f:
        saved = json.load(f)
      parts = saved["results"] if "results" in saved else {
          saved["benchmark"].replace("bench_", ""): saved}
      for name, res in parts.items():
        if name in results:  # several runs of one benchmark: a later row of the
          # same model (case) replaces the earlier one, new ones are appended
          merged = {r.get("case", r["model"]): r for r in results[name]["rows"]}
          merged.update({r.get("case", r["model"]): r for r in res["rows"]})
          results[name] = dict(results[name], rows=list(merged.values()))
        else:
          results[name] = res
  else:
    with LoadSampler() as sampler:
      for name in args.only.split(","):
        log(f"=== {name} ===")
        bench_argv = ["--quick"] if args.quick else []
        if name != "memory":  # memory takes no timing options
          bench_argv += passthrough
        results[name] = BENCHES[name].main(bench_argv)
    load = sampler.summary()

  rows = []
  for name in BENCHES:
    if name in results:
      rows += BENCHES[name].summary_rows(results[name])
  print()
  print(format_table(rows))
  print()
  print(f"machine: {info['cpu_model']}; nproc {info['nproc']}; jax {info['jax']} "
        f"({info['backend']}); python {info['python']}")
  print(info["free_h"])
  if load:
    print(f"1-min load average during the run: min {load['min']:.2f}, mean {load['mean']:.2f}, "
          f"max {load['max']:.2f} ({load['n']} samples); total "
          f"{time.perf_counter() - t0:.0f} s")
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"machine": info, "load_during_run": load, "quick": args.quick,
                 "results": results, "table": rows}, f, indent=2)


if __name__ == "__main__":
  main()
