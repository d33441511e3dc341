"""Structured sparsity (constant fan-in, N:M, blocks), stacked layers and SRigL.

The invariants are checked exactly: every group of a structure (an output unit, M
consecutive inputs, a layer's blocks) holds the same count at init and after every
update of every method that keeps a structure; stacked slices are separate layers.
"""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rigl_jax
from rigl_jax import masks as masks_lib
from rigl_jax import structure as structure_lib

COMMON = dict(deadline=None, database=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow])


def group_counts(mask, structure, stack_axes=0):
  """Active units per group, ``[layers, groups]``, computed with numpy only."""
  m = np.asarray(mask)
  layers = math.prod(m.shape[:stack_axes])
  shape = m.shape[stack_axes:]
  fan_in, fan_out = math.prod(shape[:-1]), shape[-1]
  w = m.reshape(layers, fan_in, fan_out)
  s = structure_lib.parse(structure)
  if s.kind == "constant_fan_in":
    return w.sum(1)
  if s.kind == "n_of_m":
    return w.reshape(layers, fan_in // s.m, s.m, fan_out).sum(2).reshape(layers, -1)
  if s.kind == "block":
    b = w.reshape(layers, fan_in // s.rows, s.rows, fan_out // s.cols, s.cols)
    on = b.any(axis=(2, 4))
    assert (b.all(axis=(2, 4)) == on).all(), "a block is partly on"
    return on.reshape(layers, -1).sum(1, keepdims=True)
  return w.reshape(layers, -1).sum(1, keepdims=True)


def assert_equal_groups(mask, structure, stack_axes=0):
  counts = group_counts(mask, structure, stack_axes)
  assert (counts == counts.reshape(-1)[0]).all(), np.unique(counts)
  return int(counts.reshape(-1)[0])


@st.composite
def structured_layers(draw):
  """Dense (n_in, n_out) and conv (k, k, c_in, c_out) kernels whose input channels
  divide by 4 and whose (fan_in, fan_out) views tile by 2 x 2 blocks."""
  shapes = []
  for _ in range(draw(st.integers(1, 3))):
    if draw(st.booleans()):
      shapes.append((4 * draw(st.integers(1, 12)), 2 * draw(st.integers(1, 16))))
    else:
      k = draw(st.sampled_from([1, 3]))
      shapes.append((k, k, 4 * draw(st.integers(1, 3)), 2 * draw(st.integers(1, 6))))
  return shapes


def make_params(shapes, seed=0):
  rng = np.random.default_rng(seed)
  return {f"layer{i}": {"kernel": jnp.asarray(rng.normal(size=s), jnp.float32),
                        "bias": jnp.zeros(s[-1])} for i, s in enumerate(shapes)}


STRUCTURED_METHODS = [("constant_fan_in", m) for m in
                      ("static", "set", "rigl", "srigl", "pruning")] + \
                     [("2:4", m) for m in ("static", "set", "rigl", "pruning")] + \
                     [("1:4", "rigl"), ("block:2x2", "rigl"), ("block:2x2", "set"),
                      ("block:2x2", "pruning")]


def _examples(n):
  return settings(max_examples=n, **COMMON)(given(
      shapes=structured_layers(), case=st.sampled_from(STRUCTURED_METHODS),
      sparsity=st.sampled_from([0.5, 0.8, 0.9]), kind=st.sampled_from(["uniform", "erk"]),
      seed=st.integers(0, 3))(_keeps_the_structures_counts))


def _keeps_the_structures_counts(shapes, case, sparsity, kind, seed):
  structure, method = case
  if structure_lib.parse(structure).kind == "n_of_m":
    s = structure_lib.parse(structure)
    sparsity = 1.0 - s.n / s.m
  params = make_params(shapes, seed)
  try:
    tx = rigl_jax.sparse_training(
        optax.sgd(0.05, momentum=0.9), method=method, sparsity=sparsity, distribution=kind,
        structure=structure, update_every=2, end_step=8, drop_fraction=0.5, seed=seed,
        uniform_first_layer_dense=False)
    state = tx.init(params)
  except rigl_jax.ArgumentError as e:  # a layer too small for one unit per group
    assert e.argument == "sparsity", e
    return
  sparsities = jax.tree.leaves(rigl_jax.sparsity_distribution(
      params, sparsity, kind, structure=structure, uniform_first_layer_dense=False))
  params = rigl_jax.apply_masks(params, state)
  first = jax.tree.map(np.asarray, rigl_jax.get_masks(state))
  step = jax.jit(tx.update)
  rng = np.random.default_rng(seed)
  moved, movable = False, False
  for i in range(10):
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
    updates, state = step(grads, state, params)
    params = optax.apply_updates(params, updates)
    masks = rigl_jax.get_masks(state)
    for (path, m), p, s in zip(jax.tree_util.tree_flatten_with_path(masks)[0],
                               jax.tree.leaves(params), sparsities):
      m = np.asarray(m)
      assert not np.asarray(p)[~m].any()
      if not masks_lib.path_to_str(path).endswith("kernel") or s == 0.0:
        assert m.all()
        continue
      if method == "srigl":  # ablated neurons hold 0, every other one the same fan-in
        counts = group_counts(m, structure)
        assert len(set(counts[counts > 0].tolist())) == 1, np.unique(counts)
        continue
      count = assert_equal_groups(m, structure)
      layout = structure_lib.Layout(structure_lib.parse(structure), 0, m.shape)
      # with 16 active units a layer drops (and seldom regrows) several per update
      movable |= layout.layer_count(s) // layout.unit_size >= 16
      if method != "srigl" and (method != "pruning" or i >= 8):
        # after pruning's last step, and always for the others: the layer's count
        assert count == layout.group_count(s), (path, count, layout.group_count(s))
    moved |= any((np.asarray(a) != b).any() for a, b in zip(jax.tree.leaves(masks),
                                                          jax.tree.leaves(first)))
  if method in ("set", "rigl", "pruning", "srigl") and movable:
    assert moved, "the masks never changed"


# Every structure and method: 4 examples by default, 48 in the slow set.
test_every_update_keeps_the_structures_counts = _examples(4)
test_every_update_keeps_the_structures_counts_more_examples = pytest.mark.slow(_examples(48))


def test_unstructured_is_the_default_bit_for_bit():
  params = make_params([(32, 16), (3, 3, 8, 8)])
  runs = []
  for structure in (None, "unstructured", {"layer0": "unstructured"}):
    tx = rigl_jax.sparse_training(optax.sgd(0.1), method="rigl", sparsity=0.8,
                                  update_every=1, end_step=10, structure=structure)
    state = tx.init(params)
    p = rigl_jax.apply_masks(params, state)
    for i in range(4):
      grads = jax.tree.map(lambda x: jnp.cos(x * (i + 1)), p)
      updates, state = tx.update(grads, state, p)
      p = optax.apply_updates(p, updates)
    runs.append([np.asarray(m) for m in jax.tree.leaves(rigl_jax.get_masks(state))])
  for other in runs[1:]:
    for a, b in zip(runs[0], other):
      np.testing.assert_array_equal(a, b)


def test_distribution_rounds_structured_layers_to_whole_units():
  params = make_params([(100, 100), (100, 10), (3, 3, 16, 32)])
  sizes = [100 * 100, 100 * 10, 3 * 3 * 16 * 32]
  plain = jax.tree.leaves(rigl_jax.sparsity_distribution(params, 0.9, "erk"))
  kernels = [s for s in plain if s > 0]
  for structure, group in (("constant_fan_in", [100, 100, 144]),
                           ("block:4x2", [100 * 100 // 8, 100 * 10 // 8, 144 * 32 // 8])):
    s = [x for x in jax.tree.leaves(rigl_jax.sparsity_distribution(
        params, 0.9, "erk", structure=structure)) if x > 0]
    assert len(s) == len(kernels)
    counts = [(1 - x) * g for x, g in zip(s, group)]
    np.testing.assert_allclose(counts, np.round(counts), atol=1e-6)  # whole units per group
    unit = 1 if structure == "constant_fan_in" else 8
    quanta = [size // g for size, g in zip(sizes, group)]
    total = sum((1 - x) * n for x, n in zip(s, sizes))
    # as close to the budget as whole quanta allow
    assert abs(total - 0.1 * sum(sizes)) <= max(quanta) / 2 + 1e-6, (total, 0.1 * sum(sizes))
    del unit


def test_n_of_m_fixes_the_layer_density_and_refuses_other_sparsities():
  params = make_params([(32, 16), (16, 8)])
  s = rigl_jax.sparsity_distribution(params, 0.5, "erk", structure="2:4")
  assert [x for x in jax.tree.leaves(s) if x > 0] == [0.5, 0.5]
  with pytest.raises(rigl_jax.ArgumentError, match="sparsity must be 0.5") as e:
    rigl_jax.sparsity_distribution(params, 0.9, "erk", structure="2:4")
  assert e.value.argument == "sparsity"
  # Mixed: the N:M layer leaves the budget, the other layer takes sparsity.
  mixed = rigl_jax.sparsity_distribution(params, 0.9, "erk", structure={"layer0": "2:4"})
  assert mixed["layer0"]["kernel"] == 0.5 and mixed["layer1"]["kernel"] == pytest.approx(0.9)


@pytest.mark.parametrize("structure,argument", [
    ("3:2", "structure"), ("block:0x4", "structure"), ("fan_in", "structure"),
    ({"nope": "2:4"}, "structure"), ({"layer0": "4:8x"}, "structure[{!r}]".format("layer0")),
])
def test_bad_structures_name_the_argument(structure, argument):
  params = make_params([(32, 16)])
  with pytest.raises(rigl_jax.ArgumentError) as e:
    rigl_jax.sparse_training(optax.sgd(0.1), method="rigl", sparsity=0.5,
                             end_step=10, structure=structure).init(params)
  assert e.value.argument == argument, e.value


def test_shapes_that_cannot_hold_the_structure_are_refused():
  params = make_params([(30, 16)])
  for structure, text in (("2:4", "divisible by 4"), ("block:4x4", "tiled by 4 x 4")):
    with pytest.raises(rigl_jax.ArgumentError, match=text) as e:
      rigl_jax.sparse_training(optax.sgd(0.1), method="rigl", sparsity=0.5, end_step=10,
                               structure=structure).init(params)
    assert e.value.argument == "structure"


@pytest.mark.parametrize("method", ["snfs", "rigl_sg", "rigl_sm"])
def test_redistribution_refuses_a_structure(method):
  params = make_params([(32, 16)])
  tx = rigl_jax.sparse_training(optax.sgd(0.1, momentum=0.9), method=method, sparsity=0.8,
                                end_step=10, structure="constant_fan_in")
  with pytest.raises(rigl_jax.ArgumentError, match="moves weights between layers") as e:
    tx.init(params)
  assert e.value.argument == "structure"


def test_srigl_needs_constant_fan_in():
  with pytest.raises(rigl_jax.ArgumentError, match="needs 'constant_fan_in'") as e:
    rigl_jax.sparse_training(optax.sgd(0.1), method="srigl", sparsity=0.5, end_step=10,
                             structure="2:4")
  assert e.value.argument == "structure"


# ----------------------------------------------------------------------------- SRigL


def _srigl_run(params, grads_fn, steps, no_ablation="^out/"):
  tx = rigl_jax.sparse_training(
      optax.sgd(0.0), method=rigl_jax.methods.SRigL(no_ablation=no_ablation), sparsity=0.9,
      update_every=1, end_step=100, drop_fraction=0.3, drop_schedule="constant",
      uniform_first_layer_dense=False, distribution="uniform")
  state = tx.init(params)
  params = rigl_jax.apply_masks(params, state)
  step = jax.jit(tx.update)
  for i in range(steps):
    updates, state = step(grads_fn(i), state, params)
    params = optax.apply_updates(params, updates)
  return np.asarray(rigl_jax.get_masks(state)["hidden"]["kernel"]), \
      np.asarray(rigl_jax.get_masks(state)["out"]["kernel"]), params


def test_srigl_ablates_neurons_without_salient_weights_and_keeps_constant_fan_in():
  rng = np.random.default_rng(0)
  hidden = rng.normal(size=(80, 40)).astype(np.float32)
  hidden[:, :10] *= 1e-4                    # neurons 0-9: tiny weights ...
  params = {"hidden": {"kernel": jnp.asarray(hidden)},
            "out": {"kernel": jnp.asarray(rng.normal(size=(40, 20)).astype(np.float32) * 1e-4)}}

  def grads(i):
    g = rng.normal(size=(80, 40)).astype(np.float32)
    g[:, :10] = 0.0                         # ... and no gradient: not salient
    return {"hidden": {"kernel": jnp.asarray(g)},
            "out": {"kernel": jnp.zeros((40, 20))}}

  mask, out_mask, _ = _srigl_run(params, grads, 6)
  fan_in = mask.sum(0)
  budget = 8 * 40                           # 10% of 80 inputs, 40 neurons
  active = fan_in > 0
  assert not active[:10].all() and active[10:].all()
  k = budget // active.sum()
  assert (fan_in[active] == k).all() and k > 8    # the survivors' fan-in grew
  assert mask.sum() <= budget
  # the exempt layer keeps every neuron, at its constant fan-in (10% of 40 = 4)
  assert (out_mask.sum(0) == 4).all()


def test_srigl_without_ablation_is_constant_fan_in_rigl():
  rng = np.random.default_rng(1)
  params = {"hidden": {"kernel": jnp.asarray(rng.normal(size=(80, 40)), jnp.float32)},
            "out": {"kernel": jnp.asarray(rng.normal(size=(40, 20)), jnp.float32)}}
  grads = lambda i: jax.tree.map(lambda p: jnp.sin(p * (i + 2.0)), params)
  masks = []
  for method in (rigl_jax.methods.SRigL(gamma_sal=0.0), "rigl"):
    tx = rigl_jax.sparse_training(optax.sgd(0.0), method=method, sparsity=0.9, update_every=1,
                                  end_step=100, structure="constant_fan_in", seed=5)
    state = tx.init(params)
    p = rigl_jax.apply_masks(params, state)
    for i in range(5):
      updates, state = tx.update(grads(i), state, p)
      p = optax.apply_updates(p, updates)
    masks.append([np.asarray(m) for m in jax.tree.leaves(rigl_jax.get_masks(state))])
  for a, b in zip(*masks):
    np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------- stacked


def test_stacked_kernel_is_four_layers():
  d = 32
  rng = np.random.default_rng(0)
  stacked = {"layers": {"kernel": jnp.asarray(rng.normal(size=(4, d, d)), jnp.float32),
                        "scale": jnp.ones((4, d))},
             "head": {"kernel": jnp.asarray(rng.normal(size=(d, 10)), jnp.float32)}}
  unstacked = {f"l{i}": {"kernel": stacked["layers"]["kernel"][i], "scale": jnp.ones(d)}
               for i in range(4)}
  unstacked["head"] = stacked["head"]
  s_stacked = rigl_jax.sparsity_distribution(stacked, 0.9, "erk", stacked={"layers/": 1})
  s_plain = rigl_jax.sparsity_distribution(unstacked, 0.9, "erk")
  assert s_stacked["layers"]["kernel"] == pytest.approx(s_plain["l0"]["kernel"], abs=1e-12)
  assert s_stacked["head"]["kernel"] == pytest.approx(s_plain["head"]["kernel"], abs=1e-12)
  assert s_stacked["layers"]["scale"] == 0.0      # (4, d) scales are not kernels
  want = masks_lib.num_active(d * d, s_plain["l0"]["kernel"])

  tx = rigl_jax.sparse_training(optax.sgd(0.1), method="rigl", sparsity=0.9,
                                stacked={"layers/": 1}, update_every=1, end_step=200)
  state = tx.init(stacked)
  params = rigl_jax.apply_masks(stacked, state)
  first = np.asarray(rigl_jax.get_masks(state)["layers"]["kernel"])
  assert first.sum((1, 2)).tolist() == [want] * 4
  step = jax.jit(tx.update)
  for i in range(100):
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
    grads["layers"]["kernel"] = grads["layers"]["kernel"].at[0].multiply(10.0)
    updates, state = step(grads, state, params)
    params = optax.apply_updates(params, updates)
  masks = rigl_jax.get_masks(state)
  last = np.asarray(masks["layers"]["kernel"])
  assert last.sum((1, 2)).tolist() == [want] * 4
  assert (last != first).any()
  assert np.asarray(masks["layers"]["scale"]).all()


def test_stacked_structure_counts_per_slice():
  rng = np.random.default_rng(0)
  params = {"layers": {"kernel": jnp.asarray(rng.normal(size=(3, 16, 8)), jnp.float32)}}
  tx = rigl_jax.sparse_training(optax.sgd(0.1), method="rigl", sparsity=0.75,
                                stacked={"layers": 1}, structure="constant_fan_in",
                                update_every=1, end_step=50)
  state = tx.init(params)
  p = rigl_jax.apply_masks(params, state)
  for i in range(10):
    grads = {"layers": {"kernel": jnp.asarray(rng.normal(size=(3, 16, 8)), jnp.float32)}}
    updates, state = tx.update(grads, state, p)
    p = optax.apply_updates(p, updates)
  mask = np.asarray(rigl_jax.get_masks(state)["layers"]["kernel"])
  assert (mask.sum(1) == 4).all()               # 25% of 16 inputs per unit, per slice


def test_only_kernels_are_sparse_equinox_conv_bias():
  # Equinox lays a conv bias out as (C, 1, 1): not a kernel, whatever its ndim.
  params = {"a_bias": jnp.zeros((16, 1, 1)), "b_stem": jnp.ones((3, 3, 3, 16)),
            "c_conv": jnp.ones((3, 3, 16, 16))}
  s = rigl_jax.sparsity_distribution(params, 0.9, "uniform")
  assert s["a_bias"] == 0.0
  assert s["b_stem"] == 0.0              # uniform's dense first layer is the first kernel
  assert s["c_conv"] == 0.9
  assert masks_lib.global_density({"a": jnp.ones((16, 1, 1), bool),
                                   "b": jnp.zeros((4, 4), bool)}) == 0.0


# ----------------------------------------------------------------------------- trainer


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [
    dict(method="srigl"), dict(method="rigl", structure="2:4", sparsity=0.5)],
    ids=["srigl", "rigl-2:4"])
def test_trainer_structure_resumes_bit_identical(tmp_path, overrides):
  """A structured run cut at step 20 and resumed ends bit-identical to an uninterrupted
  one, with the structure intact in its final masks and summary."""
  from rigl_jax import config as config_lib  # pylint: disable=import-outside-toplevel
  from rigl_jax import train  # pylint: disable=import-outside-toplevel

  def config(**extra):
    c = config_lib.base_config()
    c.update(dict(batch_size=50, eval_batch_size=250, num_train_steps=40, update_every=5,
                  end_step=30, lr_drop_steps=(30,), log_every=10, checkpoint_every=20))
    c.update(overrides)
    c.update(extra)
    return c

  whole = train.train_and_evaluate(config(), str(tmp_path / "whole"))
  train.train_and_evaluate(config(num_train_steps=20), str(tmp_path / "cut"))
  resumed = train.train_and_evaluate(config(overwrite=True), str(tmp_path / "cut"))
  assert resumed["state_crc32"] == whole["state_crc32"]
  assert resumed["test_accuracy"] == whole["test_accuracy"]
  densities = whole["layer_densities"]
  kernels = {k: v for k, v in densities.items() if k.endswith("kernel")}
  if overrides.get("structure") == "2:4":
    assert all(v == 0.5 for v in kernels.values()), kernels
  else:  # SRigL: at most the budget (ablation can only lower it), fc1 and fc2 sparse
    assert whole["global_density"] <= 0.1 + 1e-3
    assert kernels["fc1/kernel"] < 0.2 and kernels["fc2/kernel"] < 0.5, kernels
  # The export keeps the structure, checked on the masks themselves.
  from rigl_jax import export  # pylint: disable=import-outside-toplevel
  result = export.export_and_verify(str(tmp_path / "whole"))
  assert result["predictions_match"]
  manifest = json.load(open(tmp_path / "whole" / "export" / "manifest.json"))
  want = overrides.get("structure", "constant_fan_in")
  assert manifest["structure"] == want
  sparse = [l for l in manifest["layers"] if l["encoding"] != "dense"]
  assert sparse and all(l["structure"] == want for l in sparse), sparse
  if want == "2:4":
    assert all(l["group_count"] == 2 for l in sparse)


@pytest.mark.slow
def test_a_run_from_before_the_structure_fields_resumes(tmp_path):
  """config.json of a run started before `structure` and the srigl fields existed: the
  run resumes under the same command (the missing fields had their defaults)."""
  from rigl_jax import config as config_lib  # pylint: disable=import-outside-toplevel
  from rigl_jax import train  # pylint: disable=import-outside-toplevel
  import json  # pylint: disable=import-outside-toplevel
  c = config_lib.base_config()
  c.update(dict(batch_size=50, eval_batch_size=250, num_train_steps=20, log_every=10,
                checkpoint_every=10, end_step=10, update_every=5))
  train.train_and_evaluate(c, str(tmp_path))
  path = tmp_path / "config.json"
  saved = json.loads(path.read_text())
  for field in ("structure", "srigl_gamma_sal", "srigl_no_ablation"):
    del saved[field]
  path.write_text(json.dumps(saved))
  summary = train.train_and_evaluate(c, str(tmp_path))  # the guard accepts it
  assert summary["steps"] == 20
  c.structure = "2:4"
  with pytest.raises(config_lib.ConfigError, match="config.structure: the workdir"):
    train.train_and_evaluate(c, str(tmp_path))  # a real difference is still refused
