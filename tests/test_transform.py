"""The sparse_training optax transformation: invariants of training with masks."""

import functools
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rigl_jax
from rigl_jax import masks as masks_lib
from rigl_jax import schedules


def mlp_params(seed=0, sizes=(32, 64, 48, 10)):
  keys = jax.random.split(jax.random.key(seed), len(sizes))
  params = {}
  for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
    params[f"Dense_{i}"] = {
        "kernel": jax.random.normal(keys[i], (n_in, n_out)) / np.sqrt(n_in),
        "bias": jnp.zeros(n_out)}
  return params


def mlp_loss(params, x, y):
  h = x
  n = len(params)
  for i in range(n):
    h = h @ params[f"Dense_{i}"]["kernel"] + params[f"Dense_{i}"]["bias"]
    if i < n - 1:
      h = jax.nn.relu(h)
  return optax.softmax_cross_entropy_with_integer_labels(h, y).mean()


def batches(seed=0, n=64):
  rng = np.random.default_rng(seed)
  while True:
    x = rng.normal(size=(n, 32)).astype(np.float32)
    yield x, (x[:, :10].argmax(-1)).astype(np.int32)


def run(tx, steps, params=None, jit=True, record=None):
  params = mlp_params() if params is None else params
  state = tx.init(params)
  params = rigl_jax.apply_masks(params, state)

  def step(params, state, x, y):
    grads = jax.grad(mlp_loss)(params, x, y)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  step = jax.jit(step) if jit else step
  data = batches()
  for _ in range(steps):
    x, y = next(data)
    params, state = step(params, state, x, y)
    if record is not None:
      record.append((params, state))
  return params, state


def make_tx(method="rigl", inner=None, **kw):
  kw.setdefault("sparsity", 0.8)
  kw.setdefault("update_every", 5)
  kw.setdefault("end_step", 40)
  return rigl_jax.sparse_training(inner or optax.sgd(0.05, momentum=0.9), method=method, **kw)


def expected_counts(params, sparsity=0.8, kind="erk"):
  s = rigl_jax.sparsity_distribution(params, sparsity, kind)
  return jax.tree.map(lambda p, v: masks_lib.num_active(p.size, v), params, s)


def assert_exact_counts_and_zero_inactive(record):
  """Every recorded step: ERK-80% active counts per leaf, inactive weights exactly 0."""
  counts = expected_counts(mlp_params())
  for params, state in record:
    masks = rigl_jax.get_masks(state)
    for p, m, c in zip(jax.tree.leaves(params), jax.tree.leaves(masks), jax.tree.leaves(counts)):
      assert int(m.sum()) == c
      assert not np.any(np.asarray(p)[~np.asarray(m)])


@pytest.mark.parametrize("method", ["static", "set", "rigl"])
def test_exact_counts_and_zero_inactive_every_step(method):
  record = []
  run(make_tx(method), 45, record=record)
  assert_exact_counts_and_zero_inactive(record)


@pytest.mark.parametrize("method", ["set", "rigl"])
def test_masks_change_only_on_scheduled_steps(method):
  record = []
  params0 = mlp_params()
  state0 = make_tx(method).init(params0)
  run(make_tx(method), 45, record=record)
  prev = rigl_jax.get_masks(state0)
  changed_at = []
  for t, (_, state) in enumerate(record):
    masks = rigl_jax.get_masks(state)
    if any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(prev), jax.tree.leaves(masks))):
      changed_at.append(t)
    prev = masks
  scheduled = [t for t in range(45)
               if schedules.is_update_step(t, update_every=5, start_step=0, end_step=40)]
  assert scheduled == [5, 10, 15, 20, 25, 30, 35]
  assert changed_at and set(changed_at) <= set(scheduled)
  # RigL at alpha 0.3 moves something on nearly every scheduled step.
  assert len(changed_at) >= 5


@pytest.mark.parametrize("method", ["rigl", "snfs", "pruning"])
def test_step_without_update_branch_plus_whole_step_equal_the_single_program(method):
  """`mask_update=False` on the steps `mask_update_steps` does not list, the default
  on those it does: every state and param bit for bit the single program's."""
  tx = make_tx(method)
  update_steps = rigl_jax.mask_update_steps(tx, 0, 45).tolist()
  expected = [5, 10, 15, 20, 25, 30, 35] + ([40] if method == "pruning" else [])
  assert update_steps == expected

  def step(params, state, x, y, mask_update):
    grads = jax.grad(mlp_loss)(params, x, y)
    updates, state = tx.update(grads, state, params, mask_update=mask_update)
    return optax.apply_updates(params, updates), state

  programs = {flag: jax.jit(functools.partial(step, mask_update=flag)) for flag in (True, False)}
  single, two = [], []
  for record, choose in ((single, lambda t: True), (two, lambda t: t in update_steps)):
    params = mlp_params()
    state = tx.init(params)
    params = rigl_jax.apply_masks(params, state)
    data = batches()
    for t in range(45):
      x, y = next(data)
      params, state = programs[choose(t)](params, state, x, y)
      record.append((params, state))
  for a, b in zip(single, two):
    assert all(np.array_equal(u, v) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  # The programs differ: without the branch, a listed step leaves the masks alone.
  params = mlp_params()
  state = tx.init(params)
  params = rigl_jax.apply_masks(params, state)
  for t, (x, y) in zip(range(6), batches()):
    params, state = programs[t != 5](params, state, x, y)
  before = rigl_jax.get_masks(tx.init(mlp_params()))
  assert all(np.array_equal(u, v) for u, v in
             zip(jax.tree.leaves(before), jax.tree.leaves(rigl_jax.get_masks(state))))
  assert not all(np.array_equal(u, v) for u, v in
                 zip(jax.tree.leaves(before), jax.tree.leaves(rigl_jax.get_masks(single[5][1]))))


def test_mask_update_arguments_are_checked():
  tx = make_tx("rigl")
  params = mlp_params()
  state = tx.init(params)
  with pytest.raises(rigl_jax.ArgumentError, match="mask_update must be True or False"):
    tx.update(params, state, params, mask_update=1)
  with pytest.raises(rigl_jax.ArgumentError, match="sparse_training returned"):
    rigl_jax.mask_update_steps(optax.chain(tx), 0, 10)
  with pytest.raises(rigl_jax.ArgumentError, match="sparse_training returned"):
    rigl_jax.mask_update_steps(object(), 0, 10)
  assert rigl_jax.mask_update_steps(make_tx("static"), 0, 45).size == 0


def test_dense_layers_untouched_and_drop_counts():
  params = mlp_params()
  tx = make_tx("rigl", dense=r"Dense_2")
  record = []
  run(tx, 6, params=params, record=record)
  before = rigl_jax.get_masks(record[4][1])
  after = rigl_jax.get_masks(record[5][1])
  assert np.asarray(after["Dense_2"]["kernel"]).all()
  # Step 5 is the first update: k = floor(f(5) * n_active) connections move per layer.
  f5 = float(schedules.cosine_drop_fraction(5, initial=0.3, start_step=0, end_step=40))
  s = rigl_jax.sparsity_distribution(params, 0.8, "erk", dense=r"Dense_2")
  for name in ("Dense_0", "Dense_1"):
    n_active = masks_lib.num_active(params[name]["kernel"].size, s[name]["kernel"])
    moved = int((np.asarray(after[name]["kernel"]) & ~np.asarray(before[name]["kernel"])).sum())
    assert 0 < moved <= int(np.floor(f5 * n_active))


def test_grown_weights_and_momentum_start_at_zero():
  record = []
  run(make_tx("rigl", skip_inner_update_on_mask_step=False), 6, record=record)
  params_before, state_before = record[4]
  params_after, state_after = record[5]
  m_before = rigl_jax.get_masks(state_before)["Dense_0"]["kernel"]
  m_after = rigl_jax.get_masks(state_after)["Dense_0"]["kernel"]
  grown = np.asarray(m_after & ~m_before)
  dropped = np.asarray(m_before & ~m_after)
  assert grown.sum() > 0 and grown.sum() == dropped.sum()
  trace = state_after.inner_state[0].trace["Dense_0"]["kernel"]
  assert np.all(np.asarray(params_after["Dense_0"]["kernel"])[grown] == 0)
  assert np.all(np.asarray(trace)[grown] == 0)
  assert np.all(np.asarray(trace)[dropped] == 0)
  # Surviving connections took the optimizer step (skip disabled) and kept momentum.
  survivors = np.asarray(m_after & m_before)
  assert np.count_nonzero(np.asarray(trace)[survivors]) > 0.9 * survivors.sum()


def test_skip_inner_update_on_mask_step():
  record = []
  run(make_tx("rigl"), 6, record=record)
  params_before, state_before = record[4]
  params_after, state_after = record[5]
  m_before = rigl_jax.get_masks(state_before)["Dense_0"]["kernel"]
  m_after = rigl_jax.get_masks(state_after)["Dense_0"]["kernel"]
  survivors = np.asarray(m_after & m_before)
  np.testing.assert_array_equal(np.asarray(params_after["Dense_0"]["kernel"])[survivors],
                                np.asarray(params_before["Dense_0"]["kernel"])[survivors])
  # Biases are dense and also skipped on the mask step.
  np.testing.assert_array_equal(params_after["Dense_0"]["bias"], params_before["Dense_0"]["bias"])


def test_rigl_grows_largest_gradient():
  w = jnp.arange(1.0, 17.0).reshape(4, 4)  # magnitudes 1..16
  mask = jnp.asarray(np.arange(16).reshape(4, 4) >= 8)  # the 8 largest are active
  score = jnp.zeros(16).at[jnp.array([0, 3])].set(jnp.array([5.0, 7.0])).reshape(4, 4)
  from rigl_jax.methods import drop_and_grow
  new = np.asarray(drop_and_grow(mask, w * mask, score, jnp.int32(2), 4)).reshape(-1)
  assert new.sum() == 8
  assert not new[8] and not new[9]  # the two smallest active weights dropped
  assert new[0] and new[3]          # the two largest scores grown
  # With the dropped ones scoring highest they are grown back: nothing changes.
  regrow = jnp.zeros(16).at[jnp.array([8, 9])].set(9.0).reshape(4, 4)
  same = drop_and_grow(mask, w * mask, regrow, jnp.int32(2), 4)
  np.testing.assert_array_equal(same, mask)


def test_drop_fraction_schedules():
  f = lambda t: float(schedules.cosine_drop_fraction(t, initial=0.3, start_step=0, end_step=100))
  assert f(0) == pytest.approx(0.3)
  assert f(50) == pytest.approx(0.15)
  assert f(100) == pytest.approx(0.0, abs=1e-7)
  assert f(25) == pytest.approx(0.15 * (1 + np.cos(np.pi / 4)))
  c = schedules.make_drop_fraction_fn("constant", initial=0.2, start_step=0, end_step=10)
  assert float(c(7)) == pytest.approx(0.2)
  user = schedules.make_drop_fraction_fn(lambda t: 0.1 * (t < 50), initial=0.3, start_step=0,
                                         end_step=10)
  assert float(user(10)) == pytest.approx(0.1) and float(user(60)) == 0.0
  assert schedules.num_update_steps(update_every=100, start_step=0, end_step=750) == 7


def test_jit_and_eager_equal():
  p_jit, s_jit = run(make_tx("rigl"), 7, jit=True)
  p_eager, s_eager = run(make_tx("rigl"), 7, jit=False)
  for a, b in zip(jax.tree.leaves(rigl_jax.get_masks(s_jit)), jax.tree.leaves(rigl_jax.get_masks(s_eager))):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree.leaves(p_jit), jax.tree.leaves(p_eager)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_set_reproducible_per_seed():
  masks = lambda seed: jax.tree.leaves(rigl_jax.get_masks(run(make_tx("set", seed=seed), 6)[1]))
  a, b, c = masks(3), masks(3), masks(4)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  assert any(not np.array_equal(x, z) for x, z in zip(a, c))


@pytest.mark.parametrize("name, inner", [
    ("adam", optax.adam(1e-3)),
    ("chain_wd", optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.1, momentum=0.9, nesterov=True))),
    ("inject", optax.inject_hyperparams(optax.sgd)(learning_rate=0.1, momentum=0.9)),
    ("masked", optax.masked(optax.sgd(0.1, momentum=0.9),
                            lambda p: jax.tree.map(lambda x: x.ndim > 1, p))),
])
def test_composes_with_optax_and_resets_state(name, inner):
  record = []
  run(make_tx("rigl", inner=inner, skip_inner_update_on_mask_step=False), 6, record=record)
  _, state = record[5]
  masks = rigl_jax.get_masks(state)
  prev = rigl_jax.get_masks(record[4][1])
  grown = jax.tree.map(lambda a, b: a & ~b, masks, prev)
  assert sum(int(g.sum()) for g in jax.tree.leaves(grown)) > 0
  # Every per-parameter state entry of a grown or inactive connection is 0.
  def check(node):
    if isinstance(node, optax.MaskedNode):
      return
    flat = jax.tree.leaves(node, is_leaf=lambda x: isinstance(x, optax.MaskedNode))
    if len(flat) == len(jax.tree.leaves(masks)) and jax.tree.structure(
        node, is_leaf=lambda x: isinstance(x, optax.MaskedNode)) == jax.tree.structure(masks):
      for x, m, g in zip(flat, jax.tree.leaves(masks), jax.tree.leaves(grown)):
        if isinstance(x, optax.MaskedNode):
          continue
        assert not np.any(np.asarray(x)[np.asarray(g)]), name
  checked = []
  def visit(node):
    if jax.tree.structure(node, is_leaf=lambda x: isinstance(x, optax.MaskedNode)) == jax.tree.structure(masks):
      check(node)
      checked.append(1)
      return True
    return False
  jax.tree.leaves(state.inner_state, is_leaf=visit)
  assert checked, f"{name}: no per-parameter state found"


def test_multisteps_outside():
  tx = optax.MultiSteps(make_tx("rigl"), every_k_schedule=2)
  record = []
  run(tx, 24, record=record)
  assert_exact_counts_and_zero_inactive(record)
  assert int(rigl_jax.find_state(record[-1][1]).step) == 12


@pytest.mark.parametrize("kwargs, match", [
    (dict(method="magic"), "method must be one of"),
    (dict(sparsity=1.0), "sparsity must be in"),
    (dict(distribution="normal"), "distribution must be one of"),
    (dict(update_every=0), "update_every must be an int >= 1"),
    (dict(end_step=-5), "end_step must be an int >= start_step"),
    (dict(drop_schedule="linear"), "drop_schedule must be one of"),
])
def test_bad_arguments_fail_at_construction(kwargs, match):
  base = dict(method="rigl", sparsity=0.9, end_step=100)
  base.update(kwargs)
  with pytest.raises(ValueError, match=match):
    rigl_jax.sparse_training(optax.sgd(0.1), **base)


def test_bad_patterns_fail_at_init():
  tx = make_tx("rigl", custom={"Conv_9": 0.5})
  with pytest.raises(ValueError, match="custom: pattern 'Conv_9' matches no parameter"):
    tx.init(mlp_params())
  with pytest.raises(ValueError, match="no parameter to sparsify"):
    make_tx("rigl").init({"bias": jnp.zeros(4)})


TWO_DEVICE_SCRIPT = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    sys.path.insert(0, {tests_dir!r})
    import jax, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    import rigl_jax, test_transform as t
    assert jax.device_count() == 2
    mesh = jax.make_mesh((2,), ("data",))
    replicated = NamedSharding(mesh, P())
    batch = NamedSharding(mesh, P("data"))
    tx = t.make_tx("rigl")
    params = jax.device_put(t.mlp_params(), replicated)
    state = jax.device_put(tx.init(params), replicated)
    params = rigl_jax.apply_masks(params, state)
    @jax.jit
    def step(params, state, x, y):
      grads = jax.grad(t.mlp_loss)(params, x, y)
      updates, state = tx.update(grads, state, params)
      return t.optax.apply_updates(params, updates), state
    data = t.batches()
    for _ in range(21):
      x, y = next(data)
      params, state = step(params, state, jax.device_put(x, batch), jax.device_put(y, batch))
    np.savez(sys.argv[1], *[np.asarray(m) for m in jax.tree.leaves(rigl_jax.get_masks(state))])
""")


def test_two_devices_same_masks_as_one(tmp_path):
  script = tmp_path / "two.py"
  script.write_text(TWO_DEVICE_SCRIPT.format(tests_dir=os.path.dirname(__file__)))
  out = tmp_path / "masks.npz"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
  subprocess.run([sys.executable, str(script), str(out)], check=True, env=env, timeout=300)
  two = np.load(out)
  _, state = run(make_tx("rigl"), 21)
  one = jax.tree.leaves(rigl_jax.get_masks(state))
  assert len(two.files) == len(one)
  for i, m in enumerate(one):
    np.testing.assert_array_equal(two[f"arr_{i}"], np.asarray(m))


def test_skip_step_moves_only_the_sparse_step():
  params = mlp_params()
  tx = optax.chain(optax.clip_by_global_norm(1.0), make_tx("rigl"))
  state = tx.init(params)
  skipped = rigl_jax.skip_step(state)
  assert int(rigl_jax.find_state(skipped).step) == int(rigl_jax.find_state(state).step) + 1
  before, after = rigl_jax.find_state(state), rigl_jax.find_state(skipped)
  for a, b in zip(jax.tree.leaves((before.masks, before.inner_state, before.rng)),
                  jax.tree.leaves((after.masks, after.inner_state, after.rng))):
    np.testing.assert_array_equal(a, b)
  plain = optax.sgd(0.1, momentum=0.9).init(params)
  assert jax.tree.structure(rigl_jax.skip_step(plain)) == jax.tree.structure(plain)


def test_core_imports_jax_optax_numpy_only():
  core = ["masks", "names", "distributions", "schedules", "selection", "methods", "structure",
          "transform"]
  code = ("import sys; import " + ", ".join(f"rigl_jax.{m}" for m in core) + "; "
          "print(sorted({m.split('.')[0] for m in sys.modules}))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  loaded = set(eval(out.stdout))  # pylint: disable=eval-used
  # (absl is not in the list: optax itself imports it.)
  for heavy in ("flax", "tensorflow", "orbax", "ml_collections", "tensorflow_datasets"):
    assert heavy not in loaded, f"the core imports {heavy}"


def test_names_module_imports_nothing():
  """config.py (and so --help) reads the method and distribution names from it."""
  code = ("import sys; before = set(sys.modules); import rigl_jax.names; "
          "print(sorted(m for m in set(sys.modules) - before))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert eval(out.stdout) == ["rigl_jax", "rigl_jax.names"]  # pylint: disable=eval-used
