"""A sparse kernel's product against the dense BLAS product, without JAX.

Usage:
  python benchmarks/bench_sparse_kernel.py --export /tmp/rigl_jax/bench_export/lenet_300_100_0.9/export
  python benchmarks/bench_sparse_kernel.py --export DIR --repeats 5000 --batches 1 128

For every 2-D sparse kernel of an export (``python -m rigl_jax.export`` or
``benchmarks/bench_export.py``), times ``x @ W`` at each batch size three ways,
interleaved, median of ``--repeats`` calls:

* ``dense``: numpy's BLAS on the dense (masked) kernel;
* ``csr``: scipy's public ``csr_array @ x.T`` (CSR of ``W.T``: one row per
  output), what a user would write;
* ``csr_kernel`` (batch 1 only): scipy's C++ ``csr_matvec`` called directly
  (``scipy.sparse._sparsetools``, a private module: it isolates the kernel from
  the Python wrapper's checks).

It answers where the sparse product starts to pay on this CPU with no
framework overhead in the way; `bench_export.py` measures the whole JAX models.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import scipy.sparse as sp
from scipy.sparse import _sparsetools

from rigl_jax import export


def interleaved_us(fns: dict, repeats: int) -> dict[str, float]:
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      start = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - start)
  return {name: float(np.median(t)) * 1e6 for name, t in times.items()}


def kernel_rows(kernel: np.ndarray, batches, repeats: int, seed: int = 0) -> list[dict]:
  kernel = np.ascontiguousarray(kernel, np.float32)
  fan_in, fan_out = kernel.shape
  csr = sp.csr_array(kernel.T)
  csr.sort_indices()
  rng = np.random.default_rng(seed)
  rows = []
  for batch in batches:
    x = rng.random((batch, fan_in), dtype=np.float32)
    fns = {"dense": lambda: x @ kernel, "csr": lambda: (csr @ x.T).T}
    if batch == 1:
      xv = x[0].copy()

      def csr_kernel():
        y = np.zeros(fan_out, np.float32)
        _sparsetools.csr_matvec(fan_out, fan_in, csr.indptr, csr.indices, csr.data, xv, y)
        return y
      np.testing.assert_allclose(csr_kernel(), x[0] @ kernel, rtol=1e-4, atol=1e-5)
      fns["csr_kernel"] = csr_kernel
    np.testing.assert_allclose(fns["csr"](), x @ kernel, rtol=1e-4, atol=1e-5)
    us = interleaved_us(fns, repeats if batch == 1 else max(repeats // 10, 50))
    rows.append({"batch": batch, "nnz": int(csr.nnz), "density": csr.nnz / kernel.size,
                 **{f"{k}_us": v for k, v in us.items()},
                 **{f"dense_over_{k}": us["dense"] / v for k, v in us.items() if k != "dense"}})
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--export", required=True, help="an export directory")
  parser.add_argument("--batches", nargs="+", type=int, default=[1, 128])
  parser.add_argument("--repeats", type=int, default=5000)
  parser.add_argument("--all_kernels", action="store_true",
                      help="also 2-D kernels the loader runs densely (above max_density)")
  args = parser.parse_args()
  exported = export.load_exported(args.export)
  flat = {"/".join(k): v for k, v in _flatten(exported.variables["params"])}
  print("| kernel | shape | density | batch | dense us | csr us | csr_kernel us | "
        "dense/csr | dense/csr_kernel |")
  print("|" + "---|" * 9)
  for path, mode in exported.layer_modes.items():
    kernel = flat[path]
    if kernel.ndim != 2 or (mode != "sparse" and not args.all_kernels):
      continue
    for r in kernel_rows(np.asarray(kernel), args.batches, args.repeats):
      print(f"| {path} ({mode}) | {kernel.shape[0]}x{kernel.shape[1]} | {r['density']:.3f} | "
            f"{r['batch']} | {r['dense_us']:.1f} | {r['csr_us']:.1f} | "
            f"{r.get('csr_kernel_us', float('nan')):.1f} | {r['dense_over_csr']:.2f} | "
            f"{r.get('dense_over_csr_kernel', float('nan')):.2f} |")


def _flatten(tree, prefix=()):
  for key, value in tree.items():
    if isinstance(value, dict):
      yield from _flatten(value, prefix + (key,))
    else:
      yield prefix + (key,), value


if __name__ == "__main__":
  main()
