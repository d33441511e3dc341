"""Exact top-k selection as a boolean mask, the primitive of every mask update.

``largest(scores, k, max_k)`` marks the ``min(k, max_k)`` largest entries of a
flat float array, ties going to the lower index: the same set as the first
``k`` indices of ``jax.lax.top_k(scores, max_k)``, for any ``k`` (it may be
traced). Two implementations give that same set:

* ``by_top_k``: ``lax.top_k`` with the static bound ``max_k``. XLA's CPU
  TopK is a partial sort whose cost grows with ``k``: 2-3.5 ms for RigL's
  5.6k drops among LeNet-300-100's 235k first-layer weights, more than a
  whole train step of that model.
* ``by_radix``: a most-significant-digit-first radix select on the float
  bits. Three histogram passes (11, 11 and 10 bits, by scatter-add) find the
  k-th largest value exactly; the selection is then one comparison, plus a
  running count over the entries equal to that value in the rare case where
  the tie must be split. About 1 ms for the same case, whatever ``k``.

`largest` uses the radix select for arrays of 16,384 entries or more on CPU
(below that, and on other platforms, ``lax.top_k``), chosen when the
computation is traced, by JAX's default backend (not
``jax.lax.platform_dependent``, which compiles every branch: on CPU the unused
``top_k`` branches made a model's mask update compile 20-40% longer). The
choice never changes the result.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# Below this many entries lax.top_k is as fast (measured on CPU: 0.37 vs 0.23 ms
# at 16k entries, 0.04 vs 0.16 ms at 4k).
RADIX_MIN_SIZE = 16384
# (shift, width) of each radix digit, most significant first; 11/11/10 bits was
# the fastest split measured (8x4 and 12/12/8 cost 10-40% more).
_DIGITS = ((21, 11), (10, 11), (0, 10))
# Rows at least this long are selected one after another (a `lax.map` of the radix
# select), shorter ones all at once by bisection. Measured on CPU (2 cores, medians,
# ms): 2 x 235k rows 2.3 vs 2.7; 24 x 262k 29 vs 187, where the bisection's 25 passes
# leave the cache; 4 x 65k 1.5 either way; 16 x 16k 2.4 vs 1.7. A `vmap` of the radix
# select, used before, ran 2-6x slower than either (batched scatters, both tie branches).
ROW_BY_ROW_MIN_SIZE = 65536
# Stacked layers at least this large in all are bisected layer after layer (a
# `lax.map`) rather than together: medians on CPU, ms, together vs layer by layer,
# (L, n, B) = (4, 512, 2048) 33.8 vs 14.3, (8, 768, 3072) 309 vs 69; at 2M entries
# a tie, (8, 256, 1024) 7.9 vs 6.6 and (8, 1024, 256) 6.1 vs 7.0.
LAYER_BY_LAYER_MIN_SIZE = 1 << 22


# Below every real score: marks entries a selection must not pick.
LOWEST = float(jnp.finfo(jnp.float32).min)
# The floor of every pickable score (-inf included), still above LOWEST.
_FLOOR = LOWEST / 2


def drop_scores(mask: jax.Array, magnitude: jax.Array) -> jax.Array:
  """Scores whose largest entries are the active ones to drop first: the smallest
  magnitudes, NaN before all (a NaN weight is no weight to keep). Inactive entries
  rank below every active one, whatever the values, so counts stay exact."""
  m = magnitude.astype(jnp.float32)
  m = jnp.where(jnp.isnan(m), -1.0, m)
  return jnp.where(mask, jnp.maximum(-m, _FLOOR), LOWEST)


def grow_scores(mask: jax.Array, score: jax.Array) -> jax.Array:
  """Scores whose largest entries are the inactive ones to grow first (``score`` >= 0);
  a NaN score ranks below every real one. Active entries rank below every inactive one."""
  s = score.astype(jnp.float32)
  s = jnp.where(jnp.isnan(s), -1.0, s)
  return jnp.where(mask, LOWEST, jnp.maximum(s, _FLOOR))


def sortable_bits(x: jax.Array) -> jax.Array:
  """uint32 keys in the order of the float32 values (XLA TopK's total order:
  -0.0 < +0.0, NaN above +inf)."""
  bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
  negative = (bits >> 31) == 1
  return jnp.where(negative, ~bits, bits | jnp.uint32(0x80000000))


def by_top_k(scores: jax.Array, k: jax.Array, max_k: int) -> jax.Array:
  """`largest` by ``lax.top_k(scores, max_k)``; ``scores`` flat."""
  _, idx = jax.lax.top_k(scores, max_k)
  selected = jnp.arange(max_k) < k
  return jnp.zeros(scores.shape, bool).at[idx].set(selected)


def by_radix(scores: jax.Array, k: jax.Array) -> jax.Array:
  """`largest` by radix select on the float bits; ``scores`` flat, 0 <= k <= size."""
  key = sortable_bits(scores)
  k = jnp.asarray(k, jnp.int32)
  # `remaining`: how many of the entries that share the digits chosen so far are
  # still to be selected; the k-th largest key is built digit by digit in `kth`.
  remaining = jnp.maximum(k, 1)
  kth = jnp.uint32(0)
  for shift, width in _DIGITS:
    bins = 1 << width
    digit = ((key >> shift) & jnp.uint32(bins - 1)).astype(jnp.int32)
    high = shift + width
    if high < 32:  # only entries whose higher digits equal kth's are counted
      digit = jnp.where((key >> high) == (kth >> high), digit, bins)
    hist = jnp.zeros(bins, jnp.int32).at[digit].add(1, mode="drop")
    at_least = jnp.cumsum(hist[::-1])[::-1]  # entries with this digit or a larger one
    chosen = jnp.sum(at_least >= remaining, dtype=jnp.int32) - 1
    above = jnp.where(chosen + 1 < bins, at_least[jnp.minimum(chosen + 1, bins - 1)], 0)
    remaining = remaining - above
    kth = kth | (chosen.astype(jnp.uint32) << shift)
  greater = key > kth
  equal = key == kth
  # `remaining` entries equal to the k-th largest are needed: all of them, or
  # (rarely) the first ones by index, as lax.top_k breaks ties.
  selected = jax.lax.cond(
      jnp.sum(equal, dtype=jnp.int32) == remaining,
      lambda: greater | equal,
      lambda: greater | (equal & (jnp.cumsum(equal, dtype=jnp.int32) <= remaining)))
  return selected & (k > 0)


def _on_cpu() -> bool:
  """Whether the computation being traced will run on CPU (JAX's default backend)."""
  return jax.default_backend() == "cpu"


def largest(scores: jax.Array, k: jax.Array, max_k: int) -> jax.Array:
  """Bool mask of the ``min(k, max_k)`` largest entries of flat ``scores``.

  Ties go to the lower index. ``max_k`` is a static bound (an int); ``k`` may
  be traced.

  Example:
    >>> import jax.numpy as jnp
    >>> from rigl_jax import selection
    >>> selection.largest(jnp.array([0.5, 2.0, 2.0, -1.0]), 2, max_k=3).tolist()
    [False, True, True, False]
  """
  max_k = min(int(max_k), scores.size)
  if max_k == 0:
    return jnp.zeros(scores.shape, bool)
  k = jnp.clip(jnp.asarray(k, jnp.int32), 0, max_k)
  if scores.size < RADIX_MIN_SIZE:
    return by_top_k(scores, k, max_k)
  return by_radix(scores, k) if _on_cpu() else by_top_k(scores, k, max_k)


def largest_in_segments(scores: jax.Array, k: jax.Array, sizes: list[int],
                        max_k: list[int]) -> jax.Array:
  """:func:`largest` on each segment of the flat ``scores`` (``sizes``: the segments'
  lengths, static), ``k[i]`` (at most ``max_k[i]``) entries of segment ``i``.

  On CPU one radix select runs over all segments at once
  (:func:`_by_segmented_radix`), so the compiled code does not grow with the
  number of segments: a model's mask update compiles in about the time of one
  layer's. Elsewhere each segment has its own :func:`largest`.
  """
  bounds = [min(int(m), n) for m, n in zip(max_k, sizes)]
  k = jnp.clip(k.astype(jnp.int32), 0, jnp.asarray(bounds, jnp.int32))
  if _on_cpu() and len(sizes) > 1:
    return _by_segmented_radix(scores, k, sizes)
  parts = jnp.split(scores, np.cumsum(sizes)[:-1].tolist())
  return jnp.concatenate([largest(p, k[i], b) if b else jnp.zeros(p.shape, bool)
                          for i, (p, b) in enumerate(zip(parts, bounds))])


def _by_segmented_radix(scores: jax.Array, k: jax.Array, sizes: list[int]) -> jax.Array:
  """:func:`by_radix` on each segment of the flat ``scores`` (``sizes``: the
  segments' lengths, static), ``k[i]`` entries of segment ``i``: one histogram
  pass per digit over every segment, by scatter-add into ``[segments, bins]``.

  Written for compile time (a model's whole mask update is this one function):
  the three digits are turns of one loop, each segment's digit is found by a
  bisection over the bins (a loop of masked sums) rather than a cumulative sum,
  which XLA:CPU compiles as about five reduce-window kernels per use, and ties
  are split by the same loop run on the entries' indices."""
  n = len(sizes)
  key = sortable_bits(scores)
  # Each entry's segment, by binary search over the segments' ends: code of one
  # size whatever the number of segments (a broadcast per segment compiled 0.37 s
  # for ResNet-50's 54 kernels, this 0.09 s). The barrier keeps XLA from folding
  # it into a constant as large as the model at compile time.
  ends = jax.lax.optimization_barrier(jnp.asarray(np.cumsum(sizes), jnp.int32))
  segment = jnp.searchsorted(ends, jnp.arange(scores.shape[0], dtype=jnp.int32),
                             side="right").astype(jnp.int32)
  remaining, kth = _segmented_kth(key, None, jnp.maximum(k, 1), segment, n)
  kth_each = kth[segment]
  greater = key > kth_each
  equal = key == kth_each
  equal_count = jnp.zeros((n,), jnp.int32).at[segment].add(equal.astype(jnp.int32))

  def split_ties():
    # The first `remaining` equal entries of each segment by index: the largest
    # keys `~index` among them (a second select, where a running count over the
    # whole model compiled to about twenty kernels).
    index_key = ~jnp.arange(scores.shape[0], dtype=jnp.uint32)
    _, kth_index = _segmented_kth(index_key, equal, remaining, segment, n)
    return greater | (equal & (index_key >= kth_index[segment]))

  selected = jax.lax.cond(jnp.all(equal_count == remaining),
                          lambda: greater | equal, split_ties)
  return selected & (k[segment] > 0)


def _segmented_kth(key: jax.Array, eligible: jax.Array | None, remaining: jax.Array,
                   segment: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
  """Per segment, the ``remaining[i]``-th largest of the uint32 ``key`` over the
  entries of segment ``i`` (those ``eligible``, if given), digit by digit; returns
  ``(r, kth)``: ``kth[i]`` that key, ``r[i]`` how many entries equal to it are
  among the ``remaining[i]`` largest."""
  bins = 1 << max(width for _, width in _DIGITS)
  shifts = jnp.asarray([shift for shift, _ in _DIGITS], jnp.uint32)
  highs = jnp.asarray([shift + width for shift, width in _DIGITS], jnp.uint32)
  bin_index = jnp.arange(bins, dtype=jnp.int32)

  def digit_turn(d, carry):
    remaining, kth = carry
    shift, high = shifts[d], highs[d]
    digit = ((key >> shift) & jnp.uint32(bins - 1)).astype(jnp.int32)
    # Only entries whose higher digits equal their segment's kth count (a shift
    # by 32, the first digit's, is 0 on both sides in XLA: all entries count).
    counted = (key >> high) == (kth[segment] >> high)
    if eligible is not None:
      counted = counted & eligible
    digit = jnp.where(counted, digit, bins)
    hist = jnp.zeros((n, bins), jnp.int32).at[segment, digit].add(1, mode="drop")
    at_or_above = lambda b: jnp.sum(jnp.where(bin_index[None, :] >= b[:, None], hist, 0),
                                    axis=1)
    # The largest bin b with at_or_above(b) >= remaining, bit by bit.
    def bisect(bit, chosen):
      candidate = chosen | (1 << (bins.bit_length() - 2 - bit))
      return jnp.where(at_or_above(candidate) >= remaining, candidate, chosen)
    chosen = jax.lax.fori_loop(0, bins.bit_length() - 1, bisect, jnp.zeros((n,), jnp.int32))
    remaining = remaining - at_or_above(chosen + 1)
    return remaining, kth | (chosen.astype(jnp.uint32) << shift)

  return jax.lax.fori_loop(0, len(_DIGITS), digit_turn,
                           (remaining, jnp.zeros((n,), jnp.uint32)))


def _by_pairwise_rank(scores: jax.Array, k: jax.Array) -> jax.Array:
  """The ``k[a, b]`` largest of each short column ``scores[a, :, b]`` (N:M groups): an
  entry's rank is the number of entries of its column that beat it (larger, or
  equal at a lower index)."""
  key = sortable_bits(scores)
  index = jnp.arange(scores.shape[1])
  beats = (key[:, None, :, :] > key[:, :, None, :]) | (
      (key[:, None, :, :] == key[:, :, None, :]) &
      (index[None, None, :, None] < index[None, :, None, None]))
  return beats.sum(2, dtype=jnp.int32) < k[:, None, :]


def _by_bisection(scores: jax.Array, k: jax.Array) -> jax.Array:
  """`largest_rows` by bisection (:func:`_by_bisection_along` on ``[rows, n, 1]``)."""
  return _by_bisection_along(scores[:, :, None], k[:, None])[:, :, 0]


def largest_rows(scores: jax.Array, k: jax.Array, max_k: int) -> jax.Array:
  """:func:`largest` on every row of ``scores`` ``[rows, n]``, ``k[row]`` entries each.

  The same set as :func:`largest` row by row (ties to the lower index), chosen
  by shape: a pairwise rank for rows of up to 16 (N:M groups), the flat
  selection for a single row, ``lax.top_k`` per row off CPU and for small arrays,
  and otherwise, on CPU, the radix select row after row for long rows
  (:data:`ROW_BY_ROW_MIN_SIZE`) or a bisection over all rows at once.
  """
  rows, n = scores.shape
  max_k = min(int(max_k), n)
  if max_k == 0 or rows == 0:
    return jnp.zeros(scores.shape, bool)
  k = jnp.clip(jnp.broadcast_to(jnp.asarray(k, jnp.int32), (rows,)), 0, max_k)
  if rows == 1:
    return largest(scores[0], k[0], max_k)[None]
  if n <= 16:
    return _by_pairwise_rank(scores[:, :, None], k[:, None])[:, :, 0]
  if not _on_cpu() or scores.size < RADIX_MIN_SIZE:
    return jax.vmap(lambda r, c: by_top_k(r, c, max_k))(scores, k)
  if n >= ROW_BY_ROW_MIN_SIZE:
    return jax.lax.map(lambda row: by_radix(*row), (scores, k))
  return _by_bisection(scores, k)


def largest_along(scores: jax.Array, k: jax.Array, max_k: int) -> jax.Array:
  """:func:`largest` on every column ``scores[a, :, b]`` of ``[A, n, B]``, ``k[a, b]``
  entries each (ties to the lower index along the column).

  The columns are a layer's groups as ``rigl_jax.structure`` lays them out (no
  transpose needed): a pairwise rank for columns of up to 16 entries (N:M), a
  batched ``lax.top_k`` for small layers and off CPU, and otherwise a bisection on
  the float bits, all columns at once (stacked layers larger than
  :data:`LAYER_BY_LAYER_MIN_SIZE` in all: layer after layer).
  """
  a, n, b = scores.shape
  max_k = min(int(max_k), n)
  if max_k == 0 or scores.size == 0:
    return jnp.zeros(scores.shape, bool)
  k = jnp.clip(jnp.broadcast_to(jnp.asarray(k, jnp.int32), (a, b)), 0, max_k)
  if b == 1:
    return largest_rows(scores[:, :, 0], k[:, 0], max_k)[:, :, None]
  if n <= 16:
    return _by_pairwise_rank(scores, k)

  def by_columns(s, kk):
    rows = s.transpose(0, 2, 1).reshape(a * b, n)
    picked = jax.vmap(lambda r, c: by_top_k(r, c, max_k))(rows, kk.reshape(-1))
    return picked.reshape(a, b, n).transpose(0, 2, 1)

  if scores.size < RADIX_MIN_SIZE or not _on_cpu():  # ~25 passes cost more than a small top_k
    return by_columns(scores, k)
  if a > 1 and scores.size >= LAYER_BY_LAYER_MIN_SIZE:
    # Layer after layer: each layer's passes stay in cache, and stop when its own
    # columns are settled.
    return jax.lax.map(lambda layer: _by_bisection_along(layer[0][None], layer[1][None])[0],
                       (scores, k))
  return _by_bisection_along(scores, k)


def _count_dtype(n: int):
  """The narrowest count type for columns of ``n`` entries: int16 sums vectorise
  twice as wide on CPU (a pass costs about 0.75x of an int32 one)."""
  return jnp.int16 if n <= jnp.iinfo(jnp.int16).max else jnp.int32


def _extend_kth(key, k, kth, count, frozen, first_bit: int, width: int):
  """Bits ``first_bit .. width-1`` (from the most significant) of each column's k-th
  largest key, by bisection; ``key`` ``[A, n, B]`` of ``width`` bits, ``kth`` its
  prefix so far, ``count`` how many keys of the column are >= ``kth``. Stops when
  every column holds exactly ``k`` (or is ``frozen``)."""
  n = key.shape[1]
  dtype = _count_dtype(n)
  one = jnp.asarray(1, key.dtype)
  settled = lambda count: jnp.all((count == k) | (k == 0) | frozen)

  def cond(carry):
    bit, _, count = carry
    return (bit < width) & ~settled(count)

  def body(carry):
    bit, kth, count = carry
    candidate = kth | (one << (width - 1 - bit).astype(key.dtype))
    above = jnp.sum(key >= candidate[:, None, :], axis=1, dtype=dtype).astype(jnp.int32)
    take = (above >= k) & ~frozen
    return bit + 1, jnp.where(take, candidate, kth), jnp.where(take, above, count)

  _, kth, count = jax.lax.while_loop(cond, body, (jnp.int32(first_bit), kth, count))
  return kth, count


def _by_bisection_along(scores: jax.Array, k: jax.Array) -> jax.Array:
  """The ``k[a, b]`` largest entries of each column ``scores[a, :, b]``, by bisection.

  The k-th largest key of each column is built bit by bit, most significant
  first: one compare-and-count pass per bit, no scatter and no sort. The first 16
  bits (sign, exponent, 7 mantissa bits) are found on 16-bit keys, the rest on the
  full ones; counts are int16 where the columns allow (both halve a pass's work on
  XLA:CPU). The loop stops as soon as every column's prefix holds exactly ``k``
  entries (for real-valued scores after about ``log2(n)`` bits below the
  exponent). A column whose k-th largest score is 0 (no signal: a dead unit's zero
  gradients) is settled at once. Entries equal to the k-th value are taken by
  index, lowest first (a bisection over the index bits), only where some column
  needs it.
  """
  key = sortable_bits(scores)
  a, n, b = key.shape
  dtype = _count_dtype(n)
  zero = sortable_bits(jnp.zeros([], jnp.float32))
  positive = jnp.sum(key > zero, axis=1, dtype=dtype).astype(jnp.int32)
  at_least_zero = jnp.sum(key >= zero, axis=1, dtype=dtype).astype(jnp.int32)
  at_zero = (positive < k) & (k <= at_least_zero)      # the k-th largest is 0
  kth = jnp.where(at_zero, zero, jnp.uint32(0))
  count = jnp.where(at_zero, at_least_zero, n)
  high, count = _extend_kth((key >> 16).astype(jnp.uint16), k, (kth >> 16).astype(jnp.uint16),
                            count, at_zero, 0, 16)
  kth, count = _extend_kth(key, k, high.astype(jnp.uint32) << 16 | (kth & 0xFFFF), count,
                           at_zero, 16, 32)

  def split_ties():
    greater = key > kth[:, None, :]
    equal = key == kth[:, None, :]
    need = k - greater.sum(1, dtype=dtype).astype(jnp.int32)
    index = jnp.arange(n, dtype=jnp.int32)[None, :, None]
    # The largest `below` with count(equal & index < below) < need, bit by bit:
    # the first `need` equal entries are those at index <= below.
    below = jnp.zeros((a, b), jnp.int32)
    for bit in reversed(range(max(1, int(n).bit_length()))):
      candidate = below | (1 << bit)
      held = jnp.sum(equal & (index < candidate[:, None, :]), axis=1,
                     dtype=dtype).astype(jnp.int32)
      below = jnp.where(held < need, candidate, below)
    return greater | (equal & (index <= below[:, None, :]))

  exact = jnp.all((count == k) | (k == 0))
  selected = jax.lax.cond(exact, lambda: key >= kth[:, None, :], split_ties)
  return selected & (k[:, None, :] > 0)
