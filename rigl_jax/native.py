"""A native (C++) kernel for XLA:CPU, built on first use: the batch-1 constant fan-in product.

``y[o] = sum_j values[o, j] * x[indices[o, j]]`` with uint16 indices, its rows split
between the calling thread and a helper thread of its own (two parts; it polls
for the next call for 200 us before it sleeps) or XLA's own CPU thread pool (more
parts, or the helper busy): an XLA FFI custom call, ``jax.ffi``. XLA:CPU runs
the same gather on one core at about the rate of a plain C loop
(``benchmarks/bench_gather_limit.py``); splitting it is what makes a cached
768x3072 layer at 90% faster than its dense product at batch 1.

The kernel is compiled once per machine with the C++ compiler found (``$CXX``,
``c++``, ``g++`` or ``clang++``) against the XLA FFI headers that ship with jaxlib,
and cached under ``$RIGL_JAX_CACHE`` (default ``~/.cache/rigl_jax``) by a hash of
the source, the jaxlib version, the compiler, its flags and the CPU. Without a
compiler, off CPU, or with ``RIGL_JAX_NATIVE=0``, :func:`available` is False and
`rigl_jax.sparse_linear` keeps to its pure-JAX forms: nothing else changes.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp

TARGET = "rigl_jax_condensed_matvec"
FLAGS = ("-std=c++17", "-O3", "-march=native", "-shared", "-fPIC", "-w")
# Below this many kept weights one thread does it (waking a second costs more;
# 8192 ran char_gru's generation loop faster than 16384: its 18k-weight readout splits).
_MIN_PART = 8192

SOURCE = r"""
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <thread>
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

static void Rows(const float* x, const float* v, const uint16_t* idx, float* y,
                 int64_t begin, int64_t end, int64_t k) {
  for (int64_t o = begin; o < end; ++o) {
    const float* vv = v + o * k;
    const uint16_t* ii = idx + o * k;
    // Four partial sums: four independent chains of loads and adds.
    float a0 = 0, a1 = 0, a2 = 0, a3 = 0;
    int64_t j = 0;
    for (; j + 4 <= k; j += 4) {
      a0 += vv[j] * x[ii[j]];
      a1 += vv[j + 1] * x[ii[j + 1]];
      a2 += vv[j + 2] * x[ii[j + 2]];
      a3 += vv[j + 3] * x[ii[j + 3]];
    }
    for (; j < k; ++j) a0 += vv[j] * x[ii[j]];
    y[o] = (a0 + a1) + (a2 + a3);
  }
}

// A second thread of our own for two-way splits, the common case at batch 1 on a
// small machine: handing a part to XLA's pool wakes a sleeping thread on every
// call (about 5 us, as much as the part itself on a 512x1536 layer). This one
// polls for the next job for a while after each (a generation loop calls every
// few microseconds) and sleeps only after kSpin of no work. One job at a time:
// a caller that finds it busy (another call running concurrently) uses the pool.
class Helper {
 public:
  static Helper& Get() {
    static Helper* helper = new Helper();  // never destroyed: the thread lives on
    return *helper;
  }

  // Hands rows [begin, end) to the helper; false when it is busy with another job.
  bool Offer(const float* x, const float* v, const uint16_t* idx, float* y,
             int64_t begin, int64_t end, int64_t k) {
    bool expected = false;
    if (!started_ || !busy_.compare_exchange_strong(expected, true)) return false;
    x_ = x; v_ = v; idx_ = idx; y_ = y; begin_ = begin; end_ = end; k_ = k;
    done_.store(false);
    claimed_.store(false);
    seq_.fetch_add(1);
    if (sleeping_.load()) {
      std::lock_guard<std::mutex> lock(mu_);
      cv_.notify_one();
    }
    return true;
  }

  // After the caller's own part: the offered part run here if the helper has not
  // claimed it (so a call never waits on a thread that is not running), else awaited.
  void Finish() {
    if (!claimed_.exchange(true)) {
      Rows(x_, v_, idx_, y_, begin_, end_, k_);
    } else {
      while (!done_.load(std::memory_order_acquire)) {
      }
    }
    busy_.store(false);
  }

 private:
  static constexpr auto kSpin = std::chrono::microseconds(200);

  Helper() {
    try {
      std::thread([this] { Loop(); }).detach();
      started_ = true;
    } catch (...) {  // no thread to be had: every split goes to the pool
    }
  }

  void Loop() {
    uint64_t seen = 0;
    for (;;) {
      auto idle_since = std::chrono::steady_clock::now();
      while (seq_.load() == seen) {
        if (std::chrono::steady_clock::now() - idle_since > kSpin) {
          std::unique_lock<std::mutex> lock(mu_);
          sleeping_.store(true);
          cv_.wait(lock, [&] { return seq_.load() != seen; });
          sleeping_.store(false);
        }
      }
      seen = seq_.load();
      if (!claimed_.exchange(true)) {
        Rows(x_, v_, idx_, y_, begin_, end_, k_);
        done_.store(true, std::memory_order_release);
      }
    }
  }

  bool started_ = false;
  std::atomic<bool> busy_{false}, claimed_{true}, done_{true}, sleeping_{false};
  std::atomic<uint64_t> seq_{0};
  std::mutex mu_;
  std::condition_variable cv_;
  const float* x_ = nullptr;
  const float* v_ = nullptr;
  const uint16_t* idx_ = nullptr;
  float* y_ = nullptr;
  int64_t begin_ = 0, end_ = 0, k_ = 0;
};

// Parts 1.. of the rows: each run by whichever thread claims it first (a pool
// thread or the caller), so the call finishes even if the pool never runs a task.
struct Parts {
  static constexpr int kMax = 16;
  std::atomic<bool> claimed[kMax];
  std::atomic<bool> done[kMax];
  Parts() {
    for (int i = 0; i < kMax; ++i) { claimed[i] = false; done[i] = false; }
  }
};

static ffi::Error Impl(ffi::ThreadPool pool, int64_t min_part, ffi::Buffer<ffi::F32> x,
                       ffi::Buffer<ffi::F32> values, ffi::Buffer<ffi::U16> indices,
                       ffi::ResultBuffer<ffi::F32> y) {
  auto dims = values.dimensions();
  if (dims.size() != 2 || indices.dimensions().size() != 2 ||
      indices.dimensions()[0] != dims[0] || indices.dimensions()[1] != dims[1]) {
    return ffi::Error::InvalidArgument("values and indices must both be [fan_out, k]");
  }
  const int64_t fan_out = dims[0], k = dims[1];
  const float* xp = x.typed_data();
  const float* vp = values.typed_data();
  const uint16_t* ip = indices.typed_data();
  float* yp = y->typed_data();
  int64_t n = (fan_out * k) / (min_part > 0 ? min_part : 1);
  n = n < pool.num_threads() ? n : pool.num_threads();
  n = n < Parts::kMax ? n : Parts::kMax;
  n = n < fan_out ? n : fan_out;
  if (n <= 1) {
    Rows(xp, vp, ip, yp, 0, fan_out, k);
    return ffi::Error::Success();
  }
  if (n == 2 && Helper::Get().Offer(xp, vp, ip, yp, fan_out / 2, fan_out, k)) {
    Rows(xp, vp, ip, yp, 0, fan_out / 2, k);
    Helper::Get().Finish();
    return ffi::Error::Success();
  }
  auto bound = [=](int64_t i) { return fan_out * i / n; };
  auto parts = std::make_shared<Parts>();
  auto run = [=](int64_t i) {
    if (!parts->claimed[i].exchange(true)) {
      Rows(xp, vp, ip, yp, bound(i), bound(i + 1), k);
      parts->done[i].store(true, std::memory_order_release);
    }
  };
  for (int64_t i = 1; i < n; ++i) pool.Schedule([=]() { run(i); });
  Rows(xp, vp, ip, yp, 0, bound(1), k);
  for (int64_t i = 1; i < n; ++i) run(i);  // parts no pool thread has started yet
  for (int64_t i = 1; i < n; ++i) {
    while (!parts->done[i].load(std::memory_order_acquire)) {
    }
  }
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(RiglJaxCondensedMatvec, Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Attr<int64_t>("min_part")
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
"""

_status: dict = {}


def available() -> bool:
  """Whether the kernel is built and registered (tried once per process; never raises)."""
  if "ok" not in _status:
    try:
      _build_and_register()
      _status["ok"], _status["reason"] = True, ""
    except Exception as e:  # pylint: disable=broad-except
      _status["ok"], _status["reason"] = False, f"{type(e).__name__}: {e}"
  return _status["ok"]


def unavailable_reason() -> str:
  """Why :func:`available` is False ('' when it is True)."""
  available()
  return _status["reason"]


def _cpu_id() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      lines = [l for l in f if l.startswith(("model name", "flags"))]
    return "".join(sorted(set(lines)))
  except OSError:
    return platform.processor()


def library_path(cxx: str) -> str:
  """Where the kernel built by ``cxx`` for this machine is cached."""
  import jaxlib  # pylint: disable=import-outside-toplevel
  key = hashlib.sha256("\0".join([SOURCE, jaxlib.__version__, cxx, *FLAGS, platform.machine(),
                                  _cpu_id()]).encode())
  root = os.environ.get("RIGL_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                          "rigl_jax")
  return os.path.join(root, "native", key.hexdigest()[:16], "condensed_matvec.so")


def _build_and_register() -> None:
  if os.environ.get("RIGL_JAX_NATIVE", "1") == "0":
    raise RuntimeError("turned off by RIGL_JAX_NATIVE=0")
  if jax.default_backend() != "cpu":
    raise RuntimeError(f"the kernel is for CPU; the backend is {jax.default_backend()}")
  cxx = next((c for c in (os.environ.get("CXX"), "c++", "g++", "clang++")
              if c and shutil.which(c)), None)
  if cxx is None:
    raise RuntimeError("no C++ compiler ($CXX, c++, g++, clang++)")
  path = library_path(shutil.which(cxx))
  if not os.path.exists(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tempfile.TemporaryDirectory(dir=os.path.dirname(path)) as tmp:
      src, out = os.path.join(tmp, "condensed_matvec.cc"), os.path.join(tmp, "lib.so")
      with open(src, "w") as f:
        f.write(SOURCE)
      result = subprocess.run([cxx, *FLAGS, "-I", jax.ffi.include_dir(), src, "-o", out],
                              capture_output=True, text=True, check=False, timeout=300)
      if result.returncode != 0:
        raise RuntimeError(f"{cxx} failed: {result.stderr.strip()[-500:]}")
      os.replace(out, path)  # atomic: a concurrent build never leaves half a file
  library = ctypes.cdll.LoadLibrary(path)
  jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(library.RiglJaxCondensedMatvec),
                              platform="cpu")


def condensed_matvec(x: jax.Array, values: jax.Array, indices: jax.Array) -> jax.Array:
  """``y[o] = sum_j values[o, j] * x[indices[o, j]]``: ``x`` ``[fan_in]`` float32,
  ``values`` ``[fan_out, k]`` float32, ``indices`` ``[fan_out, k]`` uint16. Call
  only when :func:`available`."""
  # Under jax.vmap: one call per element (the kernel takes one row).
  return jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((values.shape[0],), jnp.float32),
                          vmap_method="sequential")(
      x.astype(jnp.float32), values, indices, min_part=_MIN_PART)
