"""rigl_jax.sparse_linear: the condensed, block and native products equal the masked
dense product, for structured and padded unstructured masks, at batch 1 and above;
the native kernel builds from scratch and is simply not offered where it cannot
build; the planner never picks a sparse form slower than dense."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import jax
import jax.numpy as jnp
import pytest

from rigl_jax import sparse_linear


def _masked(kernel, mask):
  return np.where(mask, kernel, 0).astype(np.float32)


@pytest.mark.parametrize("fan_in,fan_out,kind", [(96, 64, "constant_fan_in"),
                                                 (40, 24, "unstructured"),
                                                 (40_000, 3, "unstructured")])
@pytest.mark.parametrize("batch", [1, 5])
def test_condensed_product_equals_the_masked_dense_product(fan_in, fan_out, kind, batch):
  rng = np.random.default_rng(fan_in + batch)
  kernel = rng.standard_normal((fan_in, fan_out)).astype(np.float32)
  if kind == "constant_fan_in":
    mask = np.zeros((fan_in, fan_out), bool)
    for o in range(fan_out):
      mask[rng.choice(fan_in, 9, replace=False), o] = True
  else:
    mask = rng.random((fan_in, fan_out)) < 0.1
    mask[:, 0] = False  # an output with no input at all
  form = sparse_linear.condense(kernel, mask)
  assert form.indices.dtype == jnp.int32
  k = int(mask.sum(0).max())
  assert form.values.shape == (fan_out, k)
  x = rng.standard_normal((batch, fan_in)).astype(np.float32)
  y = jax.jit(sparse_linear.condensed_matmul)(jnp.asarray(x), form)
  np.testing.assert_allclose(np.asarray(y), x @ _masked(kernel, mask), rtol=1e-5, atol=1e-4)
  # Leading axes are kept, as nn.Dense does.
  y3 = sparse_linear.condensed_matmul(jnp.asarray(x)[None], form)
  assert y3.shape == (1, batch, fan_out)


@pytest.mark.parametrize("block", [(4, 4), (8, 2)])
@pytest.mark.parametrize("batch", [1, 7])
def test_block_product_equals_the_masked_dense_product(block, batch):
  rng = np.random.default_rng(batch)
  r, c = block
  tiles = rng.random((48 // r, 32 // c)) < 0.3
  tiles[:, 1] = False  # a column of blocks with none on
  mask = np.kron(tiles, np.ones(block, bool))
  kernel = rng.standard_normal(mask.shape).astype(np.float32)
  form = sparse_linear.blockify(kernel, mask, block)
  assert form.values.shape[1:] == (int(tiles.sum(0).max()), r, c)
  x = rng.standard_normal((batch, 48)).astype(np.float32)
  y = jax.jit(sparse_linear.block_matmul)(jnp.asarray(x), form)
  np.testing.assert_allclose(np.asarray(y), x @ _masked(kernel, mask), rtol=1e-5, atol=1e-4)


def test_blockify_refuses_a_mask_of_partial_blocks():
  mask = np.kron(np.eye(4, dtype=bool), np.ones((4, 4), bool))
  mask[0, 0] = False
  with pytest.raises(ValueError, match="whole 4x4 blocks"):
    sparse_linear.blockify(np.ones((16, 16), np.float32), mask, (4, 4))
  with pytest.raises(ValueError, match="not tiled"):
    sparse_linear.blockify(np.ones((16, 18), np.float32), np.ones((16, 18), bool), (4, 4))


def test_fastest_never_picks_a_sparse_form_slower_than_dense(monkeypatch):
  times = {"dense": 2.0, "condensed": 3.0, "blocks": 2.0}
  monkeypatch.setattr(sparse_linear, "time_products",
                      lambda forms, batch, **kw: {n: times[f] for n, f in forms.items()})
  assert sparse_linear.fastest({k: k for k in times}, 1)[0] == "dense"  # a tie stays dense
  times["blocks"] = 1.0
  best, seconds = sparse_linear.fastest({k: k for k in times}, 1)
  assert best == "blocks" and seconds == times
  # The real timing runs and returns positive seconds for each form.
  monkeypatch.undo()
  rng = np.random.default_rng(0)
  kernel, mask = rng.standard_normal((64, 32)).astype(np.float32), rng.random((64, 32)) < 0.2
  best, seconds = sparse_linear.fastest(
      {"dense": jnp.asarray(_masked(kernel, mask)),
       "condensed": sparse_linear.condense(kernel, mask)}, 1, repeats=2, steps=4)
  assert best in seconds and all(s > 0 for s in seconds.values())


def _native_or_skip():
  from rigl_jax import native  # pylint: disable=import-outside-toplevel
  if not native.available():
    pytest.skip(f"the native kernel is not built here: {native.unavailable_reason()}")


@pytest.mark.parametrize("fan_in,fan_out,k", [(768, 3072, 77),   # split across threads
                                              (40, 7, 3),         # one thread, k < 4
                                              (300, 1001, 31)])   # odd rows
def test_native_kernel_computes_the_masked_dense_product(fan_in, fan_out, k):
  _native_or_skip()
  rng = np.random.default_rng(fan_out)
  kernel = rng.standard_normal((fan_in, fan_out)).astype(np.float32)
  mask = np.zeros((fan_in, fan_out), bool)
  for o in range(fan_out):
    mask[rng.choice(fan_in, k, replace=False), o] = True
  mask[:, 1] = False  # an output with no input: padded, value 0 at index 0
  form = sparse_linear.native_form(sparse_linear.condense(kernel, mask))
  assert isinstance(form, sparse_linear.NativeCondensed) and form.indices.dtype == jnp.uint16
  dense = _masked(kernel, mask)
  for batch in (1, 3):  # one row: the kernel; several: XLA's gather
    x = rng.standard_normal((batch, fan_in)).astype(np.float32)
    y = jax.jit(sparse_linear.native_matmul)(jnp.asarray(x), form)
    np.testing.assert_allclose(np.asarray(y), x @ dense, rtol=1e-4, atol=1e-4)
  # Under vmap (one kernel call per row).
  xs = rng.standard_normal((3, 1, fan_in)).astype(np.float32)
  y = jax.jit(jax.vmap(lambda x: sparse_linear.native_matmul(x, form)))(jnp.asarray(xs))
  np.testing.assert_allclose(np.asarray(y)[:, 0], xs[:, 0] @ dense, rtol=1e-4, atol=1e-4)
  # In a loop, as generation runs it: each step's input is the last output (a
  # contracting map, so float rounding is not amplified from step to step).
  w = rng.standard_normal((fan_out, fan_in)).astype(np.float32) / (2 * np.sqrt(fan_out * k))

  def run(product, weights, x):
    def step(h, _):
      return jnp.tanh(product(h, weights) @ w), None
    return jax.lax.scan(step, x, None, length=5)[0]

  x0 = jnp.asarray(rng.standard_normal((1, fan_in)), jnp.float32)
  np.testing.assert_allclose(
      np.asarray(jax.jit(lambda f, x: run(sparse_linear.native_matmul, f, x))(form, x0)),
      np.asarray(jax.jit(lambda d, x: run(sparse_linear.dense_matmul, d, x))(
          jnp.asarray(dense), x0)), rtol=1e-4, atol=1e-4)


def test_native_kernel_is_right_when_called_from_several_threads_at_once():
  # Two-way splits go to one helper thread, one job at a time; a call that finds
  # it busy splits over XLA's pool instead. Four Python threads (JAX releases the
  # GIL while a computation runs) each run their own layer in a loop.
  _native_or_skip()
  import threading  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(7)
  jobs = []
  for t in range(4):
    fan_in, fan_out, k = 256 + 64 * t, 1024 + 8 * t, 24  # >= 2 x 8192 kept: a split
    kernel = rng.standard_normal((fan_in, fan_out)).astype(np.float32)
    mask = np.zeros((fan_in, fan_out), bool)
    for o in range(fan_out):
      mask[rng.choice(fan_in, k, replace=False), o] = True
    form = sparse_linear.native_form(sparse_linear.condense(kernel, mask))
    xs = rng.standard_normal((50, 1, fan_in)).astype(np.float32)
    jobs.append((form, xs, xs[:, 0] @ _masked(kernel, mask)))
  product = jax.jit(sparse_linear.native_matmul)
  results = [None] * len(jobs)

  def run(t):
    form, xs, _ = jobs[t]
    results[t] = np.stack([np.asarray(product(jnp.asarray(x), form))[0] for x in xs])

  threads = [threading.Thread(target=run, args=(t,)) for t in range(len(jobs))]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join(timeout=120)
  for (_, _, expected), got in zip(jobs, results):
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_planner_offers_the_native_form_only_where_it_runs(monkeypatch, tmp_path):
  from rigl_jax import native  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  kernel, mask = rng.standard_normal((64, 32)).astype(np.float32), rng.random((64, 32)) < 0.2
  condensed = sparse_linear.condense(kernel, mask)
  dense = jnp.asarray(_masked(kernel, mask))
  assert set(sparse_linear.candidate_forms(dense, condensed)) == (
      {"dense", "sparse", "native"} if native.available() else {"dense", "sparse"})
  blocks = sparse_linear.blockify(np.ones((8, 8), np.float32), np.ones((8, 8), bool), (4, 4))
  assert set(sparse_linear.candidate_forms(dense, blocks)) == {"dense", "sparse"}
  # Turned off, or with a compiler that fails: no native form, a reason, no exception.
  monkeypatch.setenv("RIGL_JAX_CACHE", str(tmp_path))
  for env, reason in (({"RIGL_JAX_NATIVE": "0"}, "RIGL_JAX_NATIVE=0"),
                      ({"CXX": "false"}, "false failed")):
    monkeypatch.setattr(native, "_status", {})
    with monkeypatch.context() as m:
      for name, value in env.items():
        m.setenv(name, value)
      assert not native.available() and reason in native.unavailable_reason()
      assert sparse_linear.native_form(condensed) is None
      assert set(sparse_linear.candidate_forms(dense, condensed)) == {"dense", "sparse"}
  assert not any(tmp_path.rglob("*.so"))  # nothing half-built left in the cache


def test_native_kernel_builds_from_scratch_in_an_empty_cache(tmp_path):
  """The real build (compiler, FFI headers, atomic write, registration) in a fresh
  process and an empty cache dir: not only a library cached by an earlier run."""
  if not any(shutil.which(c) for c in ("c++", "g++", "clang++")):
    pytest.skip("no C++ compiler on this machine")
  env = {**os.environ, "RIGL_JAX_CACHE": str(tmp_path)}
  env.pop("RIGL_JAX_NATIVE", None)
  code = ("import json, numpy as np, jax.numpy as jnp\n"
          "from rigl_jax import native, sparse_linear\n"
          "assert native.available(), native.unavailable_reason()\n"
          "k = np.arange(12, dtype=np.float32).reshape(4, 3); m = k % 2 == 0\n"
          "f = sparse_linear.native_form(sparse_linear.condense(k, m))\n"
          "x = jnp.arange(4, dtype=jnp.float32)[None]\n"
          "print(json.dumps([sparse_linear.native_matmul(x, f).tolist(), "
          "(x @ (k * m)).tolist()]))\n")
  result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  got, expected = json.loads(result.stdout.strip().splitlines()[-1])
  np.testing.assert_allclose(got, expected)
  assert len(list(tmp_path.rglob("condensed_matvec.so"))) == 1
