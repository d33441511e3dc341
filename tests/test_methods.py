"""SNFS, RigL-SG/SM (redistribution) and gradual magnitude pruning."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rigl_jax
from rigl_jax import masks as masks_lib
from rigl_jax import methods as methods_lib
from rigl_jax import schedules
from test_transform import make_tx, mlp_params, run

REDISTRIBUTING = ["snfs", "rigl_sg", "rigl_sm"]
STEPS = 25
# Pruning: end_step is not on the update grid, so the last pruning step is end_step itself.
PRUNE = dict(update_every=5, end_step=18)
PRUNE_STEPS = [5, 10, 15, 18]


@functools.cache
def recorded(method, **kw):
  """(params, state) after every step of a short run; one compile per method."""
  kw.setdefault("dense", r"Dense_2")
  kw.setdefault("end_step", 20)
  record = []
  run(make_tx(method, **kw), STEPS, record=record)
  return record


def leaf_counts(state):
  return [int(np.asarray(m).sum()) for m in jax.tree.leaves(rigl_jax.get_masks(state))]


def static_info(dense=r"Dense_2"):
  """Per-leaf sizes and distribution sparsities, in leaf order."""
  params = mlp_params()
  s = rigl_jax.sparsity_distribution(params, 0.8, "erk", dense=dense)
  return [p.size for p in jax.tree.leaves(params)], jax.tree.leaves(s)


def test_zero_inactive_every_step_all_methods():
  for method in REDISTRIBUTING + ["pruning", "pruning_global"]:
    kw = PRUNE if method.startswith("pruning") else {}
    for params, state in recorded(method, **kw):
      for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(rigl_jax.get_masks(state))):
        assert not np.any(np.asarray(p)[~np.asarray(m)]), method


@pytest.mark.parametrize("method", REDISTRIBUTING)
def test_redistribution_exact_total_and_moving_densities(method):
  sizes, sparsities = static_info()
  sparse = [s > 0 for s in sparsities]
  budget = sum(masks_lib.num_active(n, s) for n, s in zip(sizes, sparsities) if s > 0)
  record = recorded(method)
  initial = leaf_counts(record[0][1])
  for t, (_, state) in enumerate(record):
    counts = leaf_counts(state)
    assert sum(c for c, sp in zip(counts, sparse) if sp) == budget, (method, t)
    # Dense leaves (biases and the forced-dense Dense_2 kernel) stay full.
    assert all(c == n for c, n, sp in zip(counts, sizes, sparse) if not sp)
    assert all(0 <= c <= n for c, n in zip(counts, sizes))
    # Nothing changes outside the scheduled update steps (5, 10, 15).
    if t not in (5, 10, 15):
      assert counts == (leaf_counts(record[t - 1][1]) if t else initial)
  final = leaf_counts(record[-1][1])
  moved = [abs(a - b) for a, b, sp in zip(final, initial, sparse) if sp]
  assert max(moved) > 0, f"{method}: layer densities never moved"


def test_redistributing_reproducible():
  a = recorded("snfs")[-1]
  b = run(make_tx("snfs", dense=r"Dense_2", end_step=20), STEPS)
  for x, y in zip(jax.tree.leaves(rigl_jax.get_masks(a[1])), jax.tree.leaves(rigl_jax.get_masks(b[1]))):
    np.testing.assert_array_equal(x, y)
  for x, y in zip(jax.tree.leaves(a[0]), jax.tree.leaves(b[0])):
    np.testing.assert_array_equal(x, y)


def grown_and_trace(method):
  """Connections grown on step 5 and the inner momentum right after it."""
  record = recorded(method)
  before, after = rigl_jax.get_masks(record[4][1]), rigl_jax.get_masks(record[5][1])
  grown = np.asarray(after["Dense_0"]["kernel"] & ~before["Dense_0"]["kernel"])
  trace = np.asarray(record[5][1].inner_state[0].trace["Dense_0"]["kernel"])
  weight = np.asarray(record[5][0]["Dense_0"]["kernel"])
  return grown, trace, weight


def test_inner_state_of_grown_connections():
  # SNFS: dense inner momentum is kept for grown connections (the signal they were
  # grown for); RigL-SG: masked gradients, grown connections start with zero momentum.
  grown, trace, weight = grown_and_trace("snfs")
  assert grown.sum() > 0
  assert np.count_nonzero(trace[grown]) == grown.sum()
  assert np.all(weight[grown] == 0)
  grown, trace, weight = grown_and_trace("rigl_sg")
  assert grown.sum() > 0
  assert np.all(trace[grown] == 0) and np.all(weight[grown] == 0)


def make_ctx(masks, params, grads, sparsities, drop_fraction):
  return methods_lib.UpdateContext(
      step=jnp.int32(5), key=jax.random.key(0), drop_fraction=jnp.float32(drop_fraction),
      masks=masks, params=params, grads=grads, sparsities=sparsities, max_drop_fraction=0.5)


def test_snfs_grows_by_momentum_not_gradient():
  w = jnp.arange(1.0, 17.0).reshape(4, 4)               # magnitudes 1..16
  mask = jnp.asarray(np.arange(16).reshape(4, 4) >= 8)  # the 8 largest are active
  momentum = jnp.zeros(16).at[jnp.array([0, 3])].set(jnp.array([5.0, -7.0])).reshape(4, 4)
  grads = jnp.zeros(16).at[jnp.array([1, 2])].set(9.0).reshape(4, 4)
  masks = {"w": mask, "d": jnp.ones((2, 2), bool)}
  params = {"w": w * mask, "d": jnp.ones((2, 2))}
  grads = {"w": grads, "d": jnp.ones((2, 2))}
  state = {"w": momentum, "d": jnp.ones((2, 2))}

  @functools.partial(jax.jit, static_argnums=0)
  def update(method, state):
    ctx = make_ctx(masks, params, grads, {"w": 0.5, "d": 0.0}, 0.25)
    return method.update(ctx, state)[0]

  new = update(methods_lib.SNFS(momentum_source="own"), state)
  flat = np.asarray(new["w"]).reshape(-1)
  assert flat.sum() == 8
  assert not flat[8] and not flat[9]   # floor(0.25 * 8) = 2 smallest dropped
  assert flat[0] and flat[3]           # the largest |momentum| grown
  assert not flat[1] and not flat[2]   # ... not the largest |gradient|
  assert np.asarray(new["d"]).all()
  # The default reads the same momentum from the inner optimizer's state instead.
  inner_state = optax.sgd(0.1, momentum=0.9).init(params)
  inner_state = (inner_state[0]._replace(trace=state),) + tuple(inner_state[1:])
  ctx = make_ctx(masks, params, grads, {"w": 0.5, "d": 0.0}, 0.25)._replace(
      inner_state=inner_state)
  from_optimizer = jax.jit(lambda: methods_lib.SNFS().update(ctx, ())[0])()
  np.testing.assert_array_equal(from_optimizer["w"], new["w"])
  # RigL-SG on the same case grows by gradient instead.
  new_sg = update(methods_lib.RigLSG(), ())
  flat = np.asarray(new_sg["w"]).reshape(-1)
  assert flat[1] and flat[2] and not flat[0] and not flat[3]


def test_snfs_momentum_is_ema_of_dense_gradient():
  method = methods_lib.SNFS(momentum=0.9, momentum_source="own")
  params = {"w": jnp.zeros((2, 2))}
  mask = {"w": jnp.array([[True, False], [False, False]])}
  state = method.init(params, mask)
  g = {"w": jnp.array([[1.0, 2.0], [3.0, 4.0]])}
  state = method.observe(method.observe(state, g, mask), g, mask)
  # Inactive entries are tracked too: the momentum is dense.
  np.testing.assert_allclose(state["w"], (0.1 + 0.9 * 0.1) * np.asarray(g["w"]), rtol=1e-6)


def test_optimizer_momentum_found_in_nested_states():
  params = {"a": jnp.ones((3, 2)), "b": jnp.ones(2)}
  nested = optax.chain(
      optax.add_decayed_weights(1e-4, mask={"a": True, "b": False}),
      optax.inject_hyperparams(optax.sgd)(learning_rate=0.1, momentum=0.9, nesterov=True))
  for tx, field in ((nested, "trace"), (optax.adamw(1e-3), "mu")):
    state = tx.init(params)
    _, state = tx.update(jax.tree.map(lambda p: 2 * p, params), state, params)
    found = methods_lib.optimizer_momentum(state, params)
    assert jax.tree.structure(found) == jax.tree.structure(params)
    [(_, expected)] = optax.tree_utils.tree_get_all_with_path(state, field)
    for x, y in zip(jax.tree.leaves(found), jax.tree.leaves(expected)):
      np.testing.assert_array_equal(x, y)
      assert np.all(np.asarray(x) != 0)
  with pytest.raises(ValueError, match="momentum_source='own'"):
    methods_lib.optimizer_momentum(optax.sgd(0.1).init(params), params)


def test_snfs_memory_and_momentum_source():
  params = mlp_params()
  grads = jax.tree.map(jnp.ones_like, params)
  # Default: no state of its own; the optimizer's dense momentum does the job.
  tx = make_tx("snfs", end_step=20)
  state = tx.init(params)
  assert jax.tree.leaves(state.method_state) == []
  own = make_tx(methods_lib.SNFS(momentum_source="own"), end_step=20).init(params)
  assert len(jax.tree.leaves(own.method_state)) == len(jax.tree.leaves(params))
  # RigL-SM likewise scores layers by the (here sparse) optimizer momentum.
  assert jax.tree.leaves(make_tx("rigl_sm", end_step=20).init(params).method_state) == []
  # Without momentum in the inner optimizer the default fails on the first update.
  tx = make_tx("snfs", inner=optax.sgd(0.1), end_step=20)
  with pytest.raises(ValueError, match="momentum_source='own'"):
    jax.jit(tx.update)(grads, tx.init(params), params)
  with pytest.raises(ValueError, match="momentum_source must be one of"):
    methods_lib.SNFS(momentum_source="adam")
  with pytest.raises(ValueError, match="momentum_source must be one of"):
    methods_lib.RigLSM(momentum_source="dense")


def test_rigl_sm_redistributes_by_optimizer_momentum():
  # Two layers, equal gradients; the optimizer's momentum is 10x larger over the
  # active weights of "b", so "b" gets the larger share of the regrowth.
  rng = np.random.default_rng(0)
  mask_a = jnp.asarray(np.arange(64) < 16).reshape(8, 8)
  mask_b = jnp.asarray(np.arange(64) < 16).reshape(8, 8)
  masks = {"a": mask_a, "b": mask_b}
  params = {k: jnp.asarray(rng.normal(size=(8, 8)), jnp.float32) * m for k, m in masks.items()}
  grads = {k: jnp.asarray(rng.uniform(0.5, 1.0, size=(8, 8)), jnp.float32) for k in masks}
  trace = {"a": 0.1 * grads["a"], "b": 1.0 * grads["b"]}
  inner_state = (optax.TraceState(trace=trace), optax.EmptyState())
  ctx = make_ctx(masks, params, grads, {"a": 0.75, "b": 0.75}, 0.5)._replace(
      inner_state=inner_state)
  new = jax.jit(lambda: methods_lib.RigLSM().update(ctx, ())[0])()
  counts = {k: int(np.asarray(v).sum()) for k, v in new.items()}
  assert counts["a"] + counts["b"] == 32
  assert counts["b"] > counts["a"]
  # With its own momentum (here 10x larger on "a") the proportions follow that one.
  own = methods_lib.RigLSM(momentum_source="own")
  state = own.observe(own.init(params, masks), {"a": 10.0 * grads["a"], "b": grads["b"]}, masks)
  new_own = jax.jit(lambda: own.update(ctx, state)[0])()
  counts = {k: int(np.asarray(v).sum()) for k, v in new_own.items()}
  assert counts["a"] + counts["b"] == 32
  assert counts["a"] > counts["b"]


def test_capacity_cap_spreads_excess():
  # Layer a: 14 of 16 active, huge gradients; layer b: 14 of 64 active, tiny ones.
  # Both drop floor(0.25 * 14) = 3; a can take back only 16 - 11 = 5 of the 6.
  rng = np.random.default_rng(0)
  mask_a = jnp.asarray(np.arange(16) < 14).reshape(4, 4)
  mask_b = jnp.asarray(np.arange(64) < 14).reshape(8, 8)
  params = {"a": jnp.asarray(rng.normal(size=(4, 4))) * mask_a,
            "b": jnp.asarray(rng.normal(size=(8, 8))) * mask_b}
  grads = {"a": jnp.full((4, 4), 100.0), "b": jnp.asarray(rng.uniform(size=(8, 8)) * 1e-3)}
  update = jax.jit(lambda masks, params, grads: methods_lib.RigLSG().update(make_ctx(
      masks, params, grads, {"a": 1 - 14 / 16, "b": 1 - 14 / 64}, 0.25), ())[0])
  new = update({"a": mask_a, "b": mask_b}, params, grads)
  assert int(new["a"].sum()) == 16
  assert int(new["b"].sum()) == 14 - 3 + 1
  # The grown connection in b is the largest |gradient| among its inactive ones.
  flat_b, old_b = np.asarray(new["b"]).reshape(-1), np.asarray(mask_b).reshape(-1)
  grown = np.flatnonzero(flat_b & ~old_b)
  inactive = np.flatnonzero(~old_b)
  g_b = np.asarray(grads["b"]).reshape(-1)
  if grown.size:  # (a dropped weight of b may be the one regrown)
    assert g_b[grown[0]] == g_b[inactive].max()


def test_redistribute_counts_exact_and_capped():
  fn = jax.jit(methods_lib.redistribute_counts)
  # Proportional, then the cap of layer 0 binds and its excess is shared 1:1.
  assert fn(10, jnp.array([8.0, 1.0, 1.0]), jnp.array([2, 20, 20])).tolist() == [2, 4, 4]
  assert fn(12, jnp.array([3.0, 1.0, 0.0]), jnp.array([20, 20, 20])).tolist() == [9, 3, 0]
  # Zero-score layers only take what the others cannot hold.
  assert fn(12, jnp.array([3.0, 1.0, 0.0]), jnp.array([5, 4, 20])).tolist() == [5, 4, 3]
  # Largest remainder, ties to the lower index: 10 / 3 = 3.33 each.
  assert fn(10, jnp.ones(3), jnp.array([9, 9, 9])).tolist() == [4, 3, 3]
  rng = np.random.default_rng(0)
  for _ in range(30):
    caps = rng.integers(0, 3_000_000, size=6)
    scores = rng.uniform(size=6) * rng.integers(0, 2, size=6)
    total = int(rng.integers(0, caps.sum() + 1))
    out = np.asarray(fn(total, jnp.asarray(scores, jnp.float32), jnp.asarray(caps, jnp.int32)))
    assert out.sum() == total
    assert np.all(out >= 0) and np.all(out <= caps)


def prune_targets(scope, dense=r"Dense_2"):
  sizes, sparsities = static_info(dense)
  ids = [i for i, s in enumerate(sparsities) if s > 0]
  per_step = {}
  for t in PRUNE_STEPS:
    if scope == "layer":
      per_step[t] = [masks_lib.num_active(sizes[i], schedules.polynomial_sparsity(
          t, initial=0.0, final=sparsities[i], start_step=0, end_step=18)) for i in ids]
    else:
      total = sum(sizes[i] for i in ids)
      final = sum(masks_lib.num_active(sizes[i], sparsities[i]) for i in ids)
      s_t = schedules.polynomial_sparsity(t, initial=0.0, final=1 - final / total,
                                          start_step=0, end_step=18)
      assert s_t == pytest.approx((1 - final / total) * (1 - (1 - t / 18) ** 3))  # cubic
      per_step[t] = int(round((1 - s_t) * total))
  return sizes, sparsities, ids, per_step


@pytest.mark.parametrize("scope, method", [("layer", "pruning"), ("global", "pruning_global")])
def test_pruning_follows_cubic_schedule_exactly(scope, method):
  sizes, sparsities, ids, targets = prune_targets(scope)
  assert schedules.pruning_steps(update_every=5, start_step=0, end_step=18).tolist() == PRUNE_STEPS
  record = recorded(method, **PRUNE)
  prev = jax.tree.leaves(rigl_jax.get_masks(
      make_tx(method, dense=r"Dense_2", **PRUNE).init(mlp_params())))
  assert all(np.asarray(m).all() for m in prev)  # starts dense
  for t, (params, state) in enumerate(record):
    masks = [np.asarray(m) for m in jax.tree.leaves(rigl_jax.get_masks(state))]
    assert all(np.all(m <= p) for m, p in zip(masks, prev)), "pruning grew a weight"
    changed = any(not np.array_equal(m, p) for m, p in zip(masks, prev))
    assert changed == (t in PRUNE_STEPS), t
    counts = [int(m.sum()) for m in masks]
    assert all(counts[i] == sizes[i] for i in range(len(sizes)) if i not in ids)
    if t in PRUNE_STEPS:
      got = [counts[i] for i in ids]
      assert (got if scope == "layer" else sum(got)) == targets[t], (t, got, targets[t])
    prev = masks
  # At end_step the per-layer targets are the distribution's exact counts.
  final = [leaf_counts(record[-1][1])[i] for i in ids]
  expected = [masks_lib.num_active(sizes[i], sparsities[i]) for i in ids]
  assert (final == expected) if scope == "layer" else (sum(final) == sum(expected))


@pytest.mark.parametrize("method", ["pruning", "pruning_global"])
def test_pruning_removes_smallest_magnitudes(method):
  record = recorded(method, **PRUNE)
  t = 10
  old = rigl_jax.get_masks(record[t - 1][1])
  new = rigl_jax.get_masks(record[t][1])
  weights = record[t - 1][0]
  pruned, kept = [], []
  for name in ("Dense_0", "Dense_1"):
    w = np.abs(np.asarray(weights[name]["kernel"]))
    o, n = np.asarray(old[name]["kernel"]), np.asarray(new[name]["kernel"])
    if method == "pruning":  # one threshold per layer
      assert w[o & ~n].max() <= w[n].min()
    pruned.append(w[o & ~n])
    kept.append(w[n])
  if method == "pruning_global":  # one threshold across layers
    assert np.concatenate(pruned).max() <= np.concatenate(kept).min()
    # ... which moves layer densities apart where the per-layer rule would not.
    _, _, ids, _ = prune_targets("layer")
    counts = leaf_counts(record[-1][1])
    per_layer = [masks_lib.num_active(s, v) for s, v in zip(*static_info())]
    assert any(counts[i] != per_layer[i] for i in ids)


def test_pruning_dense_inner_momentum_never_reset():
  record = recorded("pruning", **PRUNE)
  masks = rigl_jax.get_masks(record[-1][1])["Dense_0"]["kernel"]
  trace = np.asarray(record[-1][1].inner_state[0].trace["Dense_0"]["kernel"])
  pruned = ~np.asarray(masks)
  assert pruned.sum() > 0
  assert np.count_nonzero(trace[pruned]) > 0.9 * pruned.sum()


def test_methods_registered_and_bad_scope():
  for name in REDISTRIBUTING + ["pruning", "pruning_global"]:
    assert methods_lib.get_method(name).name == name
  assert methods_lib.get_method("pruning_global").scope == "global"
  with pytest.raises(ValueError, match="scope must be one of"):
    methods_lib.MagnitudePruning(scope="row")
  with pytest.raises(ValueError, match="momentum must be in"):
    methods_lib.SNFS(momentum=1.5)
