"""Does the input pipeline keep the real train step fed? Measured on this machine.

Usage:
  python benchmarks/bench_pipeline.py           # mnist5k/LeNet-5, cifar10/LeNet-5, cifar10/WRN-22-2
  python benchmarks/bench_pipeline.py --quick   # LeNet-5 only (mnist5k and cifar10)
  python benchmarks/bench_pipeline.py --out pipeline.json

The step is the trainer's own: ``rigl_jax.train.make_train_step`` with the
trainer's optimizer (``make_optimizer``: RigL, sparsity 0.9, ERK, SGD Nesterov,
kernel-only weight decay), jitted over a one-device mesh with the trainer's
shardings and the state donated, fed as ``train_and_evaluate`` feeds it:
``train_step(state, to_global(next(batches)))`` with no blocking between steps,
so the host builds batch t+1 while the step t runs (asynchronous dispatch).

The data: ``mnist5k`` (the offline 5,000 MNIST digits) and ``cifar10`` under
``tfds.testing.mock_data(num_examples=...)`` (random uint8 images of the real
shape, read through the real loader) with the real pad-crop-flip
augmentation and normalisation; batch 128.

Timed interleaved in one loop, order rotating each repetition:

* ``fed``:      ``calls`` trainer steps, each fed by the pipeline;
* ``held``:     the same step on one batch already on the device;
* ``pipeline``: ``calls`` batches from ``pipeline.train_batches`` alone (host
                numpy: gather, augmentation, normalisation), no step;
* ``pipeline_put``: the same plus the host-to-device transfer (``to_global``).

Every step sample starts from a copy of the same initial state (made before
the clock starts). Read:

* ``fed_over_held``: steps/s fed by the pipeline / steps/s on a held batch
  (1.00: the pipeline costs the step nothing).
* ``pipeline_over_step``: pipeline batches/s alone / held steps/s. Target >= 3.
  On 2 shared cores the pipeline and XLA's CPU threads compete for the same
  cores, so even a fast pipeline is not free here (``fed_over_held``).
"""

from __future__ import annotations

import table  # benchmarks/table.py (the script's folder is on sys.path)

import argparse
import contextlib
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from rigl_jax import config as config_lib
from rigl_jax import data as data_lib
from rigl_jax import models
from rigl_jax import flops as flops_lib
from rigl_jax import train as train_lib

BATCH = 128
MOCK_EXAMPLES = 2560      # cifar10 mock: train examples (minus the validation below)
MOCK_VALIDATION = 256
TARGET_PIPELINE_OVER_STEP = 3.0

# (dataset, model, repetitions (full, quick), calls per sample)
CASES = [
    ("mnist5k", "lenet5", (8, 5), 10),
    ("cifar10", "lenet5", (8, 5), 10),
    ("cifar10", "wrn_22_2", (4, 0), 2),
]


def make_config(dataset, model):
  c = config_lib.base_config()
  c.dataset, c.model, c.method = dataset, model, "rigl"
  c.batch_size = BATCH
  c.num_train_steps = 10_000
  return c


@contextlib.contextmanager
def maybe_mock(dataset):
  if dataset == "cifar10":
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
      yield
  else:
    yield


def copy_tree(tree):
  return jax.tree.map(lambda a: jnp.array(a, copy=True), tree)


def bench_case(dataset, model_name, reps, calls, log):
  log(f"[{dataset}/{model_name}] batch {BATCH}, {reps} reps x {calls} calls")
  c = make_config(dataset, model_name)
  t0 = time.perf_counter()
  with maybe_mock(dataset):
    pipeline = data_lib.get_pipeline(
        dataset, global_batch_size=BATCH, eval_batch_size=500, seed=0,
        validation_size=MOCK_VALIDATION if dataset == "cifar10" else None)
  load_s = time.perf_counter() - t0
  info = pipeline.info
  model = models.get_model(model_name, num_classes=info.num_classes)
  total = config_lib.total_steps(c, pipeline.steps_per_epoch)
  tx = train_lib.make_optimizer(c, total=total)

  mesh = jax.make_mesh((jax.device_count(),), ("data",))
  replicated = NamedSharding(mesh, P())
  batch_sharding = NamedSharding(mesh, P("data"))
  key = jax.random.key(0)
  state0 = train_lib.create_train_state(model, tx, jnp.zeros((1,) + tuple(info.input_shape)),
                                        key, sparse=True)
  state0 = state0._replace(step=jnp.ones([], jnp.int32))  # step 1: not a mask-update step
  state0 = jax.device_put(state0, replicated)
  lr_fn = train_lib.learning_rate_fn(c, pipeline.steps_per_epoch)
  costs = flops_lib.model_costs(model, info.input_shape)
  step_fn = jax.jit(train_lib.make_train_step(model, tx, c, info.num_classes, lr_fn, costs),
                    in_shardings=(replicated, batch_sharding),
                    out_shardings=(replicated, replicated), donate_argnums=0)

  def to_global(batch):
    return {k: jax.make_array_from_process_local_data(batch_sharding, v)
            for k, v in batch.items()}

  batches = pipeline.train_batches(0)
  held = to_global(next(batches))
  t0 = time.perf_counter()
  step_fn = step_fn.lower(state0, held).compile()
  compile_s = time.perf_counter() - t0

  def run_steps(feed):
    state = copy_tree(state0)
    jax.block_until_ready(state)
    t = time.perf_counter()
    metrics = None
    for _ in range(calls):
      state, metrics = step_fn(state, feed())
    jax.block_until_ready((state, metrics))
    return (time.perf_counter() - t) / calls, float(metrics["loss"])

  losses = {}

  def fed():
    dt, losses["fed"] = run_steps(lambda: to_global(next(batches)))
    return dt

  def held_step():
    dt, losses["held"] = run_steps(lambda: held)
    return dt

  def pipe():
    t = time.perf_counter()
    for _ in range(calls):
      next(batches)
    return (time.perf_counter() - t) / calls

  def pipe_put():
    t = time.perf_counter()
    out = None
    for _ in range(calls):
      out = to_global(next(batches))
    jax.block_until_ready(out)
    return (time.perf_counter() - t) / calls

  runners = {"fed": fed, "held": held_step, "pipeline": pipe, "pipeline_put": pipe_put}
  names = list(runners)
  for n in names:  # warm-up
    runners[n]()
  times = {n: [] for n in names}
  t_loop = time.perf_counter()
  for r in range(reps):
    order = names[r % len(names):] + names[:r % len(names)]
    for n in order:
      times[n].append(runners[n]())
  loop_s = time.perf_counter() - t_loop
  med = {n: statistics.median(v) for n, v in times.items()}

  def paired(a, b):
    return statistics.median(ta / tb for ta, tb in zip(times[a], times[b]))

  row = {
      "dataset": dataset, "model": model_name, "case": f"{dataset}/{model_name}",
      "batch": BATCH, "reps": reps, "calls_per_sample": calls,
      "mock_examples": MOCK_EXAMPLES if dataset == "cifar10" else None,
      "augmentation": "pad-crop-flip" if dataset == "cifar10" else "none",
      "fed_steps_per_s": 1 / med["fed"], "held_steps_per_s": 1 / med["held"],
      "pipeline_batches_per_s": 1 / med["pipeline"],
      "pipeline_put_batches_per_s": 1 / med["pipeline_put"],
      "fed_over_held": med["held"] / med["fed"],            # throughput ratio
      "fed_over_held_paired": paired("held", "fed"),
      "pipeline_over_step": med["held"] / med["pipeline"],  # batches/s over steps/s
      "pipeline_over_step_paired": paired("held", "pipeline"),
      "pipeline_put_over_step": med["held"] / med["pipeline_put"],
      "load_s": load_s, "compile_s": compile_s, "timed_loop_s": loop_s,
      "last_losses": losses,
  }
  log(f"[{dataset}/{model_name}] fed/held {row['fed_over_held']:.3f}, pipeline/step "
      f"{row['pipeline_over_step']:.1f}x; {loop_s:.0f} s timed")
  return row


ROWS = [
    ("batch", "{}"), ("reps", "{}"), ("calls_per_sample", "{}"), ("augmentation", "{}"),
    ("held_steps_per_s", "{:.2f}"), ("fed_steps_per_s", "{:.2f}"),
    ("fed_over_held", "{:.3f}"), ("fed_over_held_paired", "{:.3f}"),
    ("pipeline_batches_per_s", "{:.1f}"), ("pipeline_put_batches_per_s", "{:.1f}"),
    ("pipeline_over_step", "{:.1f}"), ("pipeline_over_step_paired", "{:.1f}"),
    ("pipeline_put_over_step", "{:.1f}"),
    ("load_s", "{:.1f}"), ("compile_s", "{:.1f}"), ("timed_loop_s", "{:.0f}"),
]


def format_table(rows):
  return table.metric_table(rows, "case", ROWS)


def summary_rows(result):
  out = []
  for r in result["rows"]:
    case = r["case"]
    out.append(("pipeline", case, "held / fed steps/s",
                f"{r['held_steps_per_s']:.2f} / {r['fed_steps_per_s']:.2f} "
                f"(fed/held {r['fed_over_held']:.3f})", "", ""))
    v = r["pipeline_over_step"]
    out.append(("pipeline", case, "pipeline batches/s / step steps/s",
                f"{r['pipeline_batches_per_s']:.1f} / {r['held_steps_per_s']:.2f} = {v:.1f}x "
                f"(+transfer {r['pipeline_put_over_step']:.1f}x)",
                f">= {TARGET_PIPELINE_OVER_STEP:.0f}x",
                "met" if v >= TARGET_PIPELINE_OVER_STEP else "MISSED"))
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="LeNet-5 only")
  parser.add_argument("--out", default=None, help="write the results as JSON here")
  parser.add_argument("--reps", type=int, default=None, help="override the repetitions")
  parser.add_argument("--models", default=None,
                      help="comma-separated subset of " + ",".join(sorted({m for _, m, _, _ in CASES})))
  args = parser.parse_args(argv)
  log = lambda msg: print(msg, file=sys.stderr, flush=True)
  t0 = time.perf_counter()
  load_before = os.getloadavg()
  rows = []
  for dataset, model_name, (reps_full, reps_quick), calls in CASES:
    if args.models is not None:
      if model_name not in args.models.split(","):
        continue
      reps = args.reps or reps_full
    else:
      reps = args.reps or (reps_quick if args.quick else reps_full)
      if (args.quick and reps_quick == 0) or reps == 0:
        continue
    rows.append(bench_case(dataset, model_name, reps, calls, log))
  result = {
      "benchmark": "bench_pipeline", "quick": args.quick,
      "config": {"method": "rigl", "sparsity": 0.9, "batch": BATCH,
                 "cifar10_mock_examples": MOCK_EXAMPLES},
      "machine": {"platform": platform.platform(), "jax": jax.__version__,
                  "backend": jax.default_backend(), "cpu_count": os.cpu_count(),
                  "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
      "total_s": time.perf_counter() - t0, "rows": rows,
  }
  return table.finish(result, format_table(rows), args.out)


if __name__ == "__main__":
  main()
