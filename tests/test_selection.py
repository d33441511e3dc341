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
