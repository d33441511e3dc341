"""Sparse ``x @ W`` for inference, in the form a mask's structure runs fastest in.

A masked kernel ``W`` (fan_in, fan_out) is stored as one of:

* :class:`Condensed` (constant fan-in, SRigL's "condensed" layer): per output unit
  its ``k`` active weights and their input indices, ``values``/``indices``
  ``[fan_out, k]``. ``y[o] = sum_j values[o, j] * x[indices[o, j]]``: one gather of
  ``fan_out * k`` inputs, no scatter. An unstructured mask condenses too, padded to
  its largest fan-in (padding: value 0 at index 0).
* :class:`Blocks` (``block:RxC`` masks): per column of blocks its nonzero RxC blocks
  and their block-row indices, ``values [n_cols, k, R, C]``, ``rows [n_cols, k]``
  (padded to the column holding the most blocks). ``y[:, c] = sum_j x[:, rows[c, j]]
  @ values[c, j]``: a gather of whole R-wide input slices and one batched matmul.
* :class:`NativeCondensed`: a condensed form with uint16 indices, run at batch 1 by
  the C++ kernel of `rigl_jax.native` (built on first use where a C++ compiler
  is found), its rows split across XLA's CPU threads. XLA runs the condensed
  gather on about one core; this is what beats a cached dense kernel at batch 1.
* the dense kernel (``x @ W``), which the trainer's eval step runs.

Which is fastest depends on the layer, the batch and the machine (on 2 CPU cores:
condensed wins at batch 1 where the dense product is bound by reading ``W``, and
loses at batch 256 where the dense one is a BLAS GEMM; blocks of 32 and more win
at batch 256). :func:`fastest` times the forms a layer has for a batch size and
picks one, never a sparse form slower than the dense product.

Every form computes the masked dense product: the same products of the same
numbers, summed in another order (float32 rounding differs in the last bits).
JAX and numpy only.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from rigl_jax import native



@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Condensed:
  """Per output unit its active weights and their input indices (see module doc)."""
  values: jax.Array                                       # [fan_out, k]
  indices: jax.Array                                      # [fan_out, k], int32
  fan_in: int = dataclasses.field(metadata=dict(static=True))

  @property
  def fan_out(self) -> int:
    return self.values.shape[0]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Blocks:
  """Per column of RxC blocks its nonzero blocks and their block rows (module doc)."""
  values: jax.Array                                       # [n_cols, k, R, C]
  rows: jax.Array                                         # [n_cols, k], int32
  fan_in: int = dataclasses.field(metadata=dict(static=True))

  @property
  def fan_out(self) -> int:
    return self.values.shape[0] * self.values.shape[3]


def condense(kernel: np.ndarray, mask: np.ndarray) -> Condensed:
  """The :class:`Condensed` form of a 2-D ``kernel`` under ``mask`` (both
  ``(fan_in, fan_out)``); per output unit the active inputs in increasing order,
  padded to the largest fan-in with zero weights at input 0."""
  kernel, mask = np.asarray(kernel), np.asarray(mask, bool)
  fan_in, fan_out = mask.shape
  counts = mask.sum(0)
  k = max(int(counts.max()) if counts.size else 0, 1)
  # Per column the row indices of its active entries first (stable: increasing).
  order = np.argsort(~mask, axis=0, kind="stable")[:k].T            # [fan_out, k]
  valid = np.arange(k)[None, :] < counts[:, None]
  # int32: XLA:CPU gathers with int16 indices converted them on every call inside a
  # loop (a GRU step: 56 vs 40 us for a 512x1536 layer at 90%).
  indices = np.where(valid, order, 0).astype(np.int32)
  values = np.where(valid, kernel.T[np.arange(fan_out)[:, None], order], 0).astype(kernel.dtype)
  return Condensed(jnp.asarray(values), jnp.asarray(indices), fan_in)


def condensed_matmul(x: jax.Array, c: Condensed) -> jax.Array:
  """``x @ W`` for ``x`` ``[..., fan_in]`` from the condensed form."""
  lead = x.shape[:-1]
  x2 = x.reshape(-1, c.fan_in)
  if x2.shape[0] == 1:  # a gather from a vector is XLA:CPU's fastest form of it
    gathered = x2[0].at[c.indices].get(mode="promise_in_bounds")     # [fan_out, k]
    y = jnp.sum(gathered * c.values, axis=-1)[None]
  else:
    gathered = x2.at[:, c.indices].get(mode="promise_in_bounds")     # [B, fan_out, k]
    y = jnp.sum(gathered * c.values[None], axis=-1)
  return y.reshape(*lead, c.fan_out).astype(x.dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class NativeCondensed:
  """:class:`Condensed` with uint16 indices, for the native kernel (module doc)."""
  values: jax.Array                                       # [fan_out, k], float32
  indices: jax.Array                                      # [fan_out, k], uint16
  fan_in: int = dataclasses.field(metadata=dict(static=True))

  @property
  def fan_out(self) -> int:
    return self.values.shape[0]


def native_form(c: Condensed) -> NativeCondensed | None:
  """``c`` for the native kernel, or None where it cannot run it (the kernel not
  built here, weights not float32, or more than 65,536 inputs)."""
  if c.values.dtype != jnp.float32 or c.fan_in > 1 << 16 or not native.available():
    return None
  return NativeCondensed(c.values, jnp.asarray(np.asarray(c.indices).astype(np.uint16)),
                         c.fan_in)


def native_matmul(x: jax.Array, c: NativeCondensed) -> jax.Array:
  """``x @ W`` for ``x`` ``[..., fan_in]``: the native kernel for one row, XLA's
  gather (as :func:`condensed_matmul`) for several."""
  if math.prod(x.shape[:-1]) != 1:
    return condensed_matmul(x, Condensed(c.values, c.indices.astype(jnp.int32), c.fan_in))
  y = native.condensed_matvec(x.reshape(c.fan_in), c.values, c.indices)
  return y.reshape(*x.shape[:-1], c.fan_out).astype(x.dtype)


def blockify(kernel: np.ndarray, mask: np.ndarray, block: tuple[int, int]) -> Blocks:
  """The :class:`Blocks` form of a 2-D ``kernel`` whose ``mask`` is made of whole
  ``block`` = (R, C) tiles; raises ValueError when it is not."""
  kernel, mask = np.asarray(kernel), np.asarray(mask, bool)
  r, c = block
  fan_in, fan_out = mask.shape
  if fan_in % r or fan_out % c:
    raise ValueError(f"a {fan_in}x{fan_out} kernel is not tiled by {r}x{c} blocks")
  tiles = mask.reshape(fan_in // r, r, fan_out // c, c)
  on = tiles.any(axis=(1, 3))                                        # [n_rows, n_cols]
  if not np.array_equal(tiles.all(axis=(1, 3)), on):
    raise ValueError(f"the mask is not made of whole {r}x{c} blocks")
  counts = on.sum(0)
  k = max(int(counts.max()) if counts.size else 0, 1)
  order = np.argsort(~on, axis=0, kind="stable")[:k].T               # [n_cols, k]
  valid = np.arange(k)[None, :] < counts[:, None]
  rows = np.where(valid, order, 0).astype(np.int32)
  w = kernel.reshape(fan_in // r, r, fan_out // c, c).transpose(2, 0, 1, 3)  # [n_cols, n_rows, R, C]
  values = w[np.arange(w.shape[0])[:, None], order]                  # [n_cols, k, R, C]
  values = np.where(valid[:, :, None, None], values, 0).astype(kernel.dtype)
  return Blocks(jnp.asarray(values), jnp.asarray(rows), fan_in)


def block_matmul(x: jax.Array, b: Blocks) -> jax.Array:
  """``x @ W`` for ``x`` ``[..., fan_in]`` from the block form."""
  lead = x.shape[:-1]
  n_cols, _, r, c = b.values.shape
  x2 = x.reshape(-1, b.fan_in)
  slices = x2.reshape(x2.shape[0], b.fan_in // r, r).transpose(1, 0, 2)   # [n_rows, B, R]
  gathered = slices.at[b.rows].get(mode="promise_in_bounds")              # [n_cols, k, B, R]
  y = jnp.einsum("ckbr,ckrs->cbs", gathered, b.values)                    # [n_cols, B, C]
  return y.transpose(1, 0, 2).reshape(*lead, n_cols * c).astype(x.dtype)


def dense_matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """The trainer's product: ``x @ W`` with the masked kernel."""
  return x @ kernel


def product(form) -> Callable[[jax.Array, object], jax.Array]:
  """The product function of a form (a dense kernel array, Condensed or Blocks)."""
  if isinstance(form, Condensed):
    return condensed_matmul
  if isinstance(form, Blocks):
    return block_matmul
  if isinstance(form, NativeCondensed):
    return native_matmul
  return dense_matmul


def candidate_forms(dense: jax.Array, form) -> dict:
  """The forms a layer may run in: ``{"dense": dense, "sparse": form}``, plus
  ``"native"`` (:func:`native_form`) for a :class:`Condensed` form where the
  native kernel runs. For :func:`fastest` to choose from."""
  forms = {"dense": dense, "sparse": form}
  if isinstance(form, Condensed):
    fast = native_form(form)
    if fast is not None:
      forms["native"] = fast
  return forms


def time_products(forms: dict, batch: int, *, repeats: int = 5, steps: int | None = None,
                  dtype=jnp.float32) -> dict[str, float]:
  """Median seconds of one product of each form in ``forms`` (``{name: form}``, one
  fan-in) on a ``[batch, fan_in]`` input, as a loop runs it: ``steps`` products one
  after another inside one jitted ``lax.scan`` (each input depends on the last
  output), the weights passed as arguments. Per-call timing would measure JAX's
  dispatch instead, which is most of a small batch-1 product; compilation is
  excluded. The forms' runs are interleaved, in alternating order, so a slow spell
  of a shared machine falls on all of them."""
  first = next(iter(forms.values()))
  fan_in = first.shape[0] if isinstance(first, (jax.Array, np.ndarray)) else first.fan_in
  steps = steps or (32 if batch <= 8 else 2)
  xs = jnp.asarray(np.random.default_rng(0).standard_normal((steps, batch, fan_in)), dtype)

  def scanned(fn):
    def run(weights, xs):
      def step(carry, x):
        y = fn(x + carry, weights)
        return jnp.tanh(jnp.sum(y)).astype(x.dtype) * 1e-30, None
      return jax.lax.scan(step, jnp.zeros((), dtype), xs)[0]
    return run

  compiled = {name: jax.jit(scanned(product(form))).lower(form, xs).compile()
              for name, form in forms.items()}
  for name, form in forms.items():
    jax.block_until_ready(compiled[name](form, xs))
  samples = {name: [] for name in forms}
  names = list(forms)
  for r in range(repeats):
    for name in names if r % 2 == 0 else names[::-1]:
      start = time.perf_counter()
      jax.block_until_ready(compiled[name](forms[name], xs))
      samples[name].append((time.perf_counter() - start) / steps)
  return {name: float(np.median(t)) for name, t in samples.items()}


def time_product(form, batch: int, **timing) -> float:
  """:func:`time_products` of one form."""
  return time_products({"form": form}, batch, **timing)["form"]


def fastest(forms: dict, batch: int, **timing) -> tuple[str, dict[str, float]]:
  """The name of the fastest form in ``forms`` (``{"dense": kernel, ...}``) at
  ``batch``, and every form's seconds. A sparse form is chosen only when it beats
  the dense product, so a sparse layer never makes a model slower than dense."""
  seconds = time_products(forms, batch, **timing)
  return fastest_of(seconds), seconds


def fastest_of(seconds: dict[str, float]) -> str:
  """The name with the fewest ``seconds``; ``"dense"`` (where present) unless
  another is strictly faster."""
  best = min(seconds, key=seconds.get)
  return "dense" if "dense" in seconds and seconds[best] >= seconds["dense"] else best
