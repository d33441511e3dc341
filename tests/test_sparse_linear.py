"""rigl_jax.sparse_linear: the condensed and block products equal the masked dense
product, for structured and padded unstructured masks, at batch 1 and above; the
planner never picks a sparse form slower than dense."""

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
  monkeypatch.setattr(sparse_linear, "time_product",
                      lambda form, batch, **kw: times[form])
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
