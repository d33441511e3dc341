"""Exact top-k selection: the radix select picks lax.top_k's set, ties included."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rigl_jax import selection

LOWEST = float(jnp.finfo(jnp.float32).min)
SIZES = (1, 2, 3, 31, 256, 1000, 4097, 4999)


@functools.partial(jax.jit, static_argnums=2)
def reference(scores, k, max_k):
  return selection.by_top_k(scores, k, max_k)


radix = jax.jit(selection.by_radix)


def cases(seed, count=120):
  """Score arrays shaped like mask updates': ties, -0.0/+0.0, masked-out entries."""
  rng = np.random.default_rng(seed)
  for i in range(count):
    # A few sizes, odd and even: each compiles both functions once (240 random sizes
    # compiled 480 times and took minutes).
    n = int(rng.choice(SIZES))
    kind = i % 6
    if kind == 0:
      s = rng.standard_normal(n)
    elif kind == 1:  # few distinct values: every threshold is a tie
      s = rng.integers(-3, 3, n).astype(float)
    elif kind == 2:  # drop scores: -|w| of active weights, the rest excluded
      s = np.where(rng.random(n) < 0.9, LOWEST, -np.abs(rng.standard_normal(n)))
    elif kind == 3:  # signed zeros only
      s = np.where(rng.random(n) < 0.5, 0.0, -0.0)
    elif kind == 4:  # grow scores with many exact zeros (dead units)
      s = np.abs(rng.standard_normal(n)) * (rng.random(n) < 0.3)
    else:  # extremes
      s = rng.choice([np.inf, -np.inf, LOWEST, 3e38, -1e-45, 1e-45, 0.0], n)
    yield jnp.asarray(s, jnp.float32), int(rng.integers(0, n + 1))


@pytest.mark.parametrize("seed", [0, 1])
def test_radix_equals_top_k(seed):
  for scores, k in cases(seed):
    expected = reference(scores, k, scores.size)
    got = radix(scores, k)
    np.testing.assert_array_equal(got, expected, err_msg=f"n={scores.size} k={k}")
    assert int(got.sum()) == k


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from([-2.0, -0.0, 0.0, 0.5, 1.0, 1.0000001, LOWEST]),
                min_size=1, max_size=300), st.integers(0, 300))
def test_radix_equals_top_k_property(values, k):
  scores = jnp.asarray(values, jnp.float32)
  k = min(k, scores.size)
  np.testing.assert_array_equal(radix(scores, k), reference(scores, k, scores.size))


def test_largest_bounds_and_dispatch():
  rng = np.random.default_rng(0)
  big = jnp.asarray(rng.standard_normal(selection.RADIX_MIN_SIZE + 5), jnp.float32)
  for k, max_k, count in ((0, 100, 0), (50, 100, 50), (500, 100, 100), (7, 0, 0)):
    got = jax.jit(selection.largest, static_argnums=2)(big, k, max_k)
    assert int(got.sum()) == count
    if count:
      np.testing.assert_array_equal(got, reference(big, count, count))
  # On CPU the large array goes through the radix select (scatter-add histograms),
  # a small one through lax.top_k.
  lowered = lambda x: jax.jit(selection.largest, static_argnums=2).lower(x, 3, 10).as_text()
  if jax.default_backend() == "cpu":
    assert "scatter" in lowered(big) and "top_k" not in lowered(big).replace("-", "_").lower()
  assert "top_k" in lowered(big[:100]).replace("-", "_").lower() or \
      "topk" in lowered(big[:100]).lower()


@pytest.mark.parametrize("seed", range(5))
def test_segmented_selection_equals_largest_per_segment(seed):
  """`largest_in_segments` (one radix select over all segments on CPU) picks the
  sets `largest` picks segment by segment: ties (rounded values, all equal), k = 0,
  k capped by max_k, segments of one entry."""
  rng = np.random.default_rng(seed)
  sizes = [int(rng.integers(1, 20_000 if seed % 2 else 300)) for _ in range(int(rng.integers(2, 7)))]
  sizes[0] = 1 if seed == 3 else sizes[0]
  arrays = []
  for i, size in enumerate(sizes):
    a = rng.standard_normal(size).astype(np.float32)
    a = np.round(a, 1) if (seed + i) % 2 else a
    arrays.append(jnp.asarray(np.zeros_like(a) if seed == 4 and i == 1 else a))
  k = [int(rng.integers(0, s + 1)) for s in sizes]
  max_k = [int(rng.integers(0, s + 1)) for s in sizes]

  def in_segments(arrays, kk):
    flat = jnp.concatenate([a.reshape(-1) for a in arrays])
    picked = selection.largest_in_segments(flat, jnp.asarray(kk, jnp.int32), sizes, max_k)
    return jnp.split(picked, np.cumsum(sizes)[:-1].tolist())

  got = jax.jit(in_segments)(arrays, k)
  for g, a, kk, m in zip(got, arrays, k, max_k):
    np.testing.assert_array_equal(np.asarray(g), np.asarray(selection.largest(a, kk, m)))


@pytest.mark.slow
def test_rigl_updates_the_same_masks_grouped_and_layer_by_layer(monkeypatch):
  """Ten layers: the grouped update (one selection for all) gives the per-layer masks."""
  import optax  # pylint: disable=import-outside-toplevel
  import rigl_jax  # pylint: disable=import-outside-toplevel
  from rigl_jax import methods  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  params = {f"l{i}": jnp.asarray(rng.standard_normal((40 + 7 * i, 30)), jnp.float32)
            for i in range(10)}
  grads = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32), params)
  results = []
  for group_min in (8, 10**9):
    monkeypatch.setattr(methods, "GROUP_MIN_LAYERS", group_min)
    tx = rigl_jax.sparse_training(optax.sgd(0.1), method="rigl", sparsity=0.8, update_every=1,
                                  end_step=100)
    state = tx.init(params)
    p = rigl_jax.apply_masks(params, state)
    for _ in range(3):
      updates, state = jax.jit(tx.update)(grads, state, p)
      p = optax.apply_updates(p, updates)
    results.append(jax.tree.map(np.asarray, rigl_jax.get_masks(state)))
  for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("rows,n", [
    (3, 9),                                    # pairwise rank (N:M groups)
    (3, 1000),                                 # lax.top_k per row (small array)
    (4, selection.RADIX_MIN_SIZE),             # bisection over all rows
    (2, selection.ROW_BY_ROW_MIN_SIZE + 3),    # radix select row after row
])
def test_largest_rows_equals_largest_row_by_row(rows, n):
  """Every path of `largest_rows` picks `lax.top_k`'s set in every row: ties (rounded
  values, a row of equal values), k = 0, k above max_k."""
  rng = np.random.default_rng(rows * n)
  scores = np.round(rng.standard_normal((rows, n)), 1).astype(np.float32)
  scores[-1] = 0.5
  max_k = n - 1
  k = np.asarray([0, n] + [int(rng.integers(1, n)) for _ in range(rows - 2)], np.int32)
  got = np.asarray(jax.jit(selection.largest_rows, static_argnums=2)(
      jnp.asarray(scores), jnp.asarray(k), max_k))
  for row, kk, g in zip(scores, k, got):
    count = min(int(kk), max_k)
    np.testing.assert_array_equal(g, np.asarray(reference(jnp.asarray(row), count, n)))
    assert int(g.sum()) == count


@pytest.mark.parametrize("a,n,b", [
    (2, 8, 5),                                 # pairwise rank (N:M groups)
    (2, 40, 30),                               # lax.top_k per column (small array)
    (1, 256, 80),                              # bisection over the layer's columns
    (2, 1024, selection.LAYER_BY_LAYER_MIN_SIZE // 2048),  # bisection layer after layer
    (2, selection.ROW_BY_ROW_MIN_SIZE, 1),     # a column per layer: largest_rows
])
def test_largest_along_equals_largest_column_by_column(a, n, b):
  """Every path of `largest_along` picks `lax.top_k`'s set in every column: ties
  (rounded values, a layer of equal values), k = 0, k above max_k."""
  rng = np.random.default_rng(a * n * b)
  scores = np.round(rng.standard_normal((a, n, b)), 1).astype(np.float32)
  scores[-1] = 0.5
  max_k = n - 1
  k = rng.integers(0, n + 1, (a, b)).astype(np.int32)
  k[0, 0] = 0
  got = np.asarray(jax.jit(selection.largest_along, static_argnums=2)(
      jnp.asarray(scores), jnp.asarray(k), max_k))
  expect = jax.jit(jax.vmap(jax.vmap(lambda s, kk: reference(s, kk, n), in_axes=(1, 0),
                                     out_axes=1)))
  np.testing.assert_array_equal(got, np.asarray(expect(jnp.asarray(scores),
                                                       jnp.asarray(np.minimum(k, max_k)))))
