"""How fast can a batch-1 condensed product be on this CPU? A hand-written C gather
against XLA's, to say how far ``bench_export --layers`` is from the gather's limit.

Usage:
  python benchmarks/bench_gather_limit.py            # needs a C compiler (cc); ~30 s
  python benchmarks/bench_gather_limit.py --repeats 2000

A constant fan-in layer at batch 1 is ``y[o] = sum_j V[o, j] * x[I[o, j]]``. Where
the dense kernel stays in cache the dense product is not bound by memory traffic,
and the sparse one is bound by its gathers: one random load per kept weight. This
script measures that rate three ways, at 90% sparsity, for each layer shape of
issue 18's targets:

* ``c_1core``: the loop above in C (``cc -O3 -march=native``, 4 accumulators,
  uint16 indices), one thread, called through ctypes on numpy arrays;
* ``xla_condensed``: `rigl_jax.sparse_linear.condensed_matmul` as a jitted loop
  runs it (`sparse_linear.time_product`; XLA:CPU may use both cores);
* ``xla_dense``: the masked dense product, the same way;
* ``c_2core``: the C loop with the rows split between two threads, each running
  its half ``--repeats`` times with no synchronisation (``split_gain``: the
  one-thread time over this).

It prints, per layer, ns per kept weight for each sparse form, ``best_2core``:
the dense time over half the C loop's time, the speedup a perfect two-core split
of a kernel as fast as that C loop would reach, and ``measured_2core``: the
dense time over ``c_2core``, what two threads really reach here. A target above
``measured_2core`` is out of reach of a hand-written gather kernel on this
machine, not only of XLA's.
Where no compiler runs, it says so and exits 1.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import jax.numpy as jnp
import numpy as np

from rigl_jax import sparse_linear

C_SOURCE = r"""
#include <stdint.h>
void condensed_matvec(const float* x, const float* v, const uint16_t* idx, float* y,
                      int fan_out, int k) {
  for (int o = 0; o < fan_out; o++) {
    const float* vv = v + (long)o * k;
    const uint16_t* ii = idx + (long)o * k;
    float a0 = 0, a1 = 0, a2 = 0, a3 = 0;
    int j = 0;
    for (; j + 4 <= k; j += 4) {
      a0 += vv[j] * x[ii[j]];         a1 += vv[j + 1] * x[ii[j + 1]];
      a2 += vv[j + 2] * x[ii[j + 2]]; a3 += vv[j + 3] * x[ii[j + 3]];
    }
    for (; j < k; j++) a0 += vv[j] * x[ii[j]];
    y[o] = (a0 + a1) + (a2 + a3);
  }
}

/* Rows [begin, end) of the product, ``repeats`` times: one thread's share of a split. */
void condensed_rows_repeated(const float* x, const float* v, const uint16_t* idx, float* y,
                             int begin, int end, int k, int repeats) {
  for (int r = 0; r < repeats; r++)
    condensed_matvec(x, v + (long)begin * k, idx + (long)begin * k, y + begin, end - begin, k);
}
"""

SHAPES = ((768, 3072), (3072, 768), (512, 1536), (4096, 4096))
SPARSITY = 0.9


def build_kernel(workdir: str):
  """The C loops as a ctypes library, or None when no compiler builds them."""
  cc = shutil.which("cc") or shutil.which("gcc")
  if cc is None:
    return None
  src, lib = os.path.join(workdir, "gather.c"), os.path.join(workdir, "gather.so")
  with open(src, "w") as f:
    f.write(C_SOURCE)
  result = subprocess.run([cc, "-O3", "-march=native", "-shared", "-fPIC", src, "-o", lib],
                          capture_output=True, text=True, check=False)
  if result.returncode != 0:
    print(result.stderr, file=sys.stderr)
    return None
  library = ctypes.CDLL(lib)
  library.condensed_matvec.restype = None
  library.condensed_rows_repeated.restype = None
  return library


def constant_fan_in_mask(rng, fan_in: int, fan_out: int, k: int) -> np.ndarray:
  mask = np.zeros((fan_in, fan_out), bool)
  for o in range(fan_out):
    mask[rng.choice(fan_in, k, replace=False), o] = True
  return mask


def c_split_seconds(library, x, values, indices, repeats: int, threads: int = 2) -> float:
  """Median seconds of one C product with its rows split between ``threads`` threads,
  each running its share ``repeats`` times with no synchronisation in between
  (ctypes releases the GIL): the throughput of a perfectly scheduled split, thread
  start and join included (small against ``repeats`` calls)."""
  y = np.zeros(values.shape[0], np.float32)
  ptrs = [ctypes.c_void_p(a.ctypes.data) for a in (x, values, indices, y)]
  fan_out, k = values.shape
  bounds = [fan_out * i // threads for i in range(threads + 1)]
  samples = []
  for _ in range(7):
    workers = [threading.Thread(target=library.condensed_rows_repeated,
                                args=(*ptrs, ctypes.c_int(bounds[i]), ctypes.c_int(bounds[i + 1]),
                                      ctypes.c_int(k), ctypes.c_int(repeats)))
               for i in range(threads)]
    start = time.perf_counter()
    for w in workers:
      w.start()
    for w in workers:
      w.join()
    samples.append((time.perf_counter() - start) / repeats)
  return float(np.median(samples))


def c_seconds(library, x, values, indices, repeats: int) -> float:
  """Median seconds of one C product over 7 batches of ``repeats`` calls."""
  kernel = library.condensed_matvec
  y = np.zeros(values.shape[0], np.float32)
  args = [ctypes.c_void_p(a.ctypes.data) for a in (x, values, indices, y)]
  args += [ctypes.c_int(values.shape[0]), ctypes.c_int(values.shape[1])]
  for _ in range(10):
    kernel(*args)
  samples = []
  for _ in range(7):
    start = time.perf_counter()
    for _ in range(repeats):
      kernel(*args)
    samples.append((time.perf_counter() - start) / repeats)
  expected = (values * x[indices.astype(np.int64)]).sum(1)
  if not np.allclose(y, expected, rtol=1e-4, atol=1e-4):
    raise AssertionError("the C loop computed another product")
  return float(np.median(samples))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--repeats", type=int, default=500, help="C calls per timing batch")
  args = parser.parse_args(argv)
  with tempfile.TemporaryDirectory() as workdir:
    library = build_kernel(workdir)
    if library is None:
      print("error: no C compiler (cc) built the kernel; nothing measured", file=sys.stderr)
      return 1
    rng = np.random.default_rng(0)
    rows = []
    for fan_in, fan_out in SHAPES:
      k = int(round(fan_in * (1 - SPARSITY)))
      mask = constant_fan_in_mask(rng, fan_in, fan_out, k)
      kernel_w = (rng.standard_normal((fan_in, fan_out)) * mask).astype(np.float32)
      condensed = sparse_linear.condense(kernel_w, mask)
      values = np.ascontiguousarray(np.asarray(condensed.values))
      indices = np.ascontiguousarray(np.asarray(condensed.indices).astype(np.uint16))
      x = rng.standard_normal(fan_in).astype(np.float32)
      kept = fan_out * k
      c_s = c_seconds(library, x, values, indices, args.repeats)
      c2_s = c_split_seconds(library, x, values, indices, args.repeats)
      sparse_s = sparse_linear.time_product(condensed, 1, repeats=7, steps=64)
      dense_s = sparse_linear.time_product(jnp.asarray(kernel_w), 1, repeats=7, steps=64)
      rows.append({
          "layer": f"{fan_in}x{fan_out}", "kept": kept,
          "c_1core_ns_per_kept": round(c_s / kept * 1e9, 3),
          "xla_condensed_ns_per_kept": round(sparse_s / kept * 1e9, 3),
          "xla_dense_us": round(dense_s * 1e6, 1),
          "xla_condensed_us": round(sparse_s * 1e6, 1),
          "c_1core_us": round(c_s * 1e6, 1),
          "c_2core_us": round(c2_s * 1e6, 1),
          "split_gain": round(c_s / c2_s, 2),
          "xla_speedup": round(dense_s / sparse_s, 2),
          "best_2core": round(dense_s / (c_s / 2), 2),
          "measured_2core": round(dense_s / c2_s, 2),
      })
      print(json.dumps(rows[-1]), file=sys.stderr)
  print("| layer | dense us (XLA) | condensed us (XLA) | speedup | C loop, 1 core, us "
        "| ns per kept weight: C 1 core / XLA | C loop, 2 threads, us (gain) "
        "| speedup: perfect 2-core / measured 2-thread |")
  print("|---|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['layer']} | {r['xla_dense_us']} | {r['xla_condensed_us']} | "
          f"{r['xla_speedup']} | {r['c_1core_us']} | {r['c_1core_ns_per_kept']} / "
          f"{r['xla_condensed_ns_per_kept']} | {r['c_2core_us']} ({r['split_gain']}x) | "
          f"{r['best_2core']} / {r['measured_2core']} |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
