"""Property tests (hypothesis) of the core, over random layer shapes, sparsities,
distributions, forced-dense layers, drop fractions and seeds:

- ER/ERK: densities in [0, 1], the budget ``sum d_l N_l = (1 - S) sum N_l`` exactly
  before rounding and within half a weight per layer after it, one ``eps`` for every
  layer left sparse (``d_l = eps * score_l``), and only top-scored layers made dense;
  uniform: S everywhere but the first layer.
- Masks hold exactly ``round((1 - s_l) * N_l)`` ones, at init and after every RigL/SET
  update; inactive weights are exactly 0; an update never changes a dense layer
  (mask all True, weights bit-identical) and keeps every surviving weight's value.

Examples are derandomized (the same every run) and not stored, so the suite is
reproducible and writes nothing into the tree.
"""

import jax
import numpy as np
import optax
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rigl_jax
from rigl_jax import masks as masks_lib

COMMON = dict(deadline=None, database=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow])


@st.composite
def layer_shapes(draw, max_layers=4):
  """Dense (n_in, n_out) and conv (k, k, c_in, c_out) kernels; each layer also has a bias.

  A kernel has two axes longer than 1 (a (1, n) leaf is no kernel, see
  ``masks.is_kernel_shape``): fan-ins and fan-outs start at 2."""
  shapes = []
  for _ in range(draw(st.integers(1, max_layers))):
    if draw(st.booleans()):
      shapes.append((draw(st.integers(2, 64)), draw(st.integers(2, 64))))
    else:
      k = draw(st.sampled_from([1, 3, 5]))
      shapes.append((k, k, draw(st.integers(2, 12)), draw(st.integers(2, 12))))
  return shapes


def make_params(shapes, seed=0):
  rng = np.random.default_rng(seed)
  return {f"layer{i}": {"kernel": rng.normal(size=s).astype(np.float32),
                        "bias": rng.normal(size=s[-1]).astype(np.float32)}
          for i, s in enumerate(shapes)}


def forced_dense(shapes, index):
  """A regex forcing one kernel dense, or None (never the only kernel)."""
  if index is None or len(shapes) < 2:
    return None
  return [f"^layer{index % len(shapes)}/kernel$"]


def flat(tree):
  return {masks_lib.path_to_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def score(kind, shape):
  if kind == "er":
    n_in, n_out = shape[-2], shape[-1]
    return (n_in + n_out) / (n_in * n_out)
  return sum(shape) / np.prod(shape)


@settings(max_examples=150, **COMMON)
@given(shapes=layer_shapes(), sparsity=st.floats(0.0, 0.99), kind=st.sampled_from(
    ["uniform", "er", "erk"]), dense_index=st.none() | st.integers(0, 3))
def test_distribution_budget_and_rule(shapes, sparsity, kind, dense_index):
  params = make_params(shapes)
  dense = forced_dense(shapes, dense_index)
  try:
    s = flat(rigl_jax.sparsity_distribution(params, sparsity, kind, dense=dense))
  except rigl_jax.ArgumentError as e:  # a tiny layer left without a weight: refused
    assert e.argument == "sparsity" and "without a single active weight" in str(e)
    return
  kernels = [f"layer{i}/kernel" for i in range(len(shapes))]
  forced = {k for k in kernels if dense and k == dense[0][1:-1]}
  budget = [k for k in kernels if k not in forced]
  size = {k: int(np.prod(shape)) for k, shape in zip(kernels, shapes)}
  shape_of = dict(zip(kernels, shapes))
  assert all(v == 0.0 for p, v in s.items() if p.endswith("bias") or p in forced)
  assert all(0.0 <= v <= 1.0 for v in s.values())
  if kind == "uniform":
    for k in budget:
      assert s[k] == (0.0 if k == "layer0/kernel" else sparsity)
    return
  density = {k: 1.0 - s[k] for k in budget}
  want = (1.0 - sparsity) * sum(size[k] for k in budget)
  assert sum(density[k] * size[k] for k in budget) == pytest.approx(want, rel=1e-9, abs=1e-6)
  counts = sum(masks_lib.num_active(size[k], s[k]) for k in budget)
  assert abs(counts - want) <= len(budget) / 2 + 1e-6
  sparse = [k for k in budget if density[k] < 1.0 - 1e-9]
  made_dense = [k for k in budget if k not in sparse]
  eps = [density[k] / score(kind, shape_of[k]) for k in sparse]
  assert eps == pytest.approx([eps[0]] * len(eps), rel=1e-9) if eps else True
  if sparse and made_dense:  # only layers scoring at least as high as any sparse one
    top_sparse = max(score(kind, shape_of[k]) for k in sparse)
    assert all(score(kind, shape_of[k]) >= top_sparse * (1 - 1e-9) for k in made_dense)


@settings(max_examples=10, **COMMON)
@given(shapes=layer_shapes(max_layers=3), sparsity=st.floats(0.0, 0.98),
       kind=st.sampled_from(["uniform", "er", "erk"]), method=st.sampled_from(["rigl", "set"]),
       drop_fraction=st.floats(0.05, 1.0), dense_index=st.none() | st.integers(0, 2),
       seed=st.integers(0, 2**31 - 1))
def test_updates_keep_counts_and_never_touch_dense_layers(shapes, sparsity, kind, method,
                                                          drop_fraction, dense_index, seed):
  params = make_params(shapes, seed)
  dense = forced_dense(shapes, dense_index)
  # update_every=1: every step after the first is a mask update (instead of an
  # optimizer step), so a dense layer must come out of it bit for bit unchanged.
  tx = rigl_jax.sparse_training(
      optax.sgd(0.1, momentum=0.9), method=method, sparsity=sparsity, distribution=kind,
      update_every=1, end_step=1000, drop_fraction=drop_fraction, drop_schedule="constant",
      dense=dense, seed=seed)
  try:
    sparsities = flat(rigl_jax.sparsity_distribution(params, sparsity, kind, dense=dense))
  except rigl_jax.ArgumentError as e:  # a tiny layer left without a weight: refused
    assert e.argument == "sparsity" and "without a single active weight" in str(e)
    return
  expected = {p: int(round((1.0 - s) * np.size(flat(params)[p]))) for p, s in sparsities.items()}

  @jax.jit  # init and step: each compiled once for this shape set
  def init(params):
    state = tx.init(params)
    return rigl_jax.apply_masks(params, state), state

  @jax.jit
  def step(grads, state, params):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  params, state = init(params)
  rng = np.random.default_rng(seed)
  for t in range(4):
    masks = flat(rigl_jax.get_masks(state))
    assert {p: int(np.sum(m)) for p, m in masks.items()} == expected
    grads = jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), params)
    new_params, state = step(grads, state, params)
    new_params = flat(new_params)
    new_masks = flat(rigl_jax.get_masks(state))
    for p, m in new_masks.items():
      m, old, new = np.asarray(m), np.asarray(masks[p]), np.asarray(new_params[p])
      before = np.asarray(flat(params)[p])
      assert int(m.sum()) == expected[p], (t, p)
      assert not np.any(new[~m]), (t, p)  # inactive weights exactly 0
      if sparsities[p] == 0.0:
        assert m.all()
        if t > 0:  # a mask-update step: the dense layer is untouched
          assert new.tobytes() == before.tobytes(), (t, p)
      elif t > 0:  # survivors keep their value; grown weights start at 0
        keep = m & old
        assert np.array_equal(new[keep], before[keep]), (t, p)
        assert not np.any(new[m & ~old]), (t, p)
    # Random weights for the next step (masked, as training keeps them): a fresh
    # magnitude order for the drop.
    params = jax.tree.map(
        lambda p, m: np.where(m, rng.normal(size=p.shape), 0.0).astype(np.float32),
        params, rigl_jax.get_masks(state))
