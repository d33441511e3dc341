"""The transform in other people's JAX code: sharded params on a mesh (Explicit and
Auto axes), optax.tree_map_params, eager calls, other optax wrappers, NNX and linen,
and the argument checks a library user meets."""

import logging
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rigl_jax

HERE = os.path.dirname(os.path.abspath(__file__))


def tx_rigl(**kwargs):
  args = dict(method="rigl", sparsity=0.8, update_every=2, end_step=50)
  args.update(kwargs)
  return rigl_jax.sparse_training(optax.sgd(0.1, momentum=0.9), **args)


def mlp_params():
  k1, k2 = jax.random.split(jax.random.key(0))
  return {"fc1": {"kernel": jax.random.normal(k1, (32, 16)), "bias": jnp.zeros(16)},
          "fc2": {"kernel": jax.random.normal(k2, (16, 4)), "bias": jnp.zeros(4)}}


# ----------------------------------------------------------------------------- sharding


# Both device counts are in the slow set (45 s and more); tests/test_train.py checks
# two devices against one in the default suite.
@pytest.mark.parametrize("devices", [pytest.param(2, marks=pytest.mark.slow),
                                     pytest.param(4, marks=pytest.mark.slow)])
def test_sharded_params_on_explicit_and_auto_meshes(devices):
  """Model-parallel, FSDP-style (and on 4 devices both) layouts, Explicit and Auto
  axes, eight methods and structures (constant fan-in, SRigL, 2:4 and blocks with
  their grouped axes sharded): masks and momentum come out sharded like the params, and every
  step equals the same step on one device (tests/sharding_check.py)."""
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  result = subprocess.run([sys.executable, os.path.join(HERE, "sharding_check.py")],
                          capture_output=True, text=True, env=env, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  layouts = 3 if devices == 4 else 2
  # 4 unstructured entries on both axis types; 4 structured ones on Explicit axes
  # only with 2 devices, on both with 4.
  expected = 4 * layouts * 2 + 4 * layouts * (2 if devices == 4 else 1)
  lines = result.stdout.splitlines()
  assert sum(line.startswith("ok ") for line in lines) == expected, result.stdout
  # Stacked kernels, the layers' axis or the units' axis sharded: one device's masks.
  assert sum(line.startswith("stacked-ok ") for line in lines) == 2 * 4, result.stdout


# ----------------------------------------------------------------------------- optax


def test_tree_map_params_maps_masks_and_per_parameter_state():
  tx = rigl_jax.sparse_training(optax.adam(1e-3), method="rigl", sparsity=0.8,
                                update_every=2, end_step=50)
  params = mlp_params()
  state = tx.init(params)
  shapes = optax.tree_map_params(tx, lambda p: p.shape, state,
                                 transform_non_params=lambda _: None)
  expected = jax.tree.map(lambda p: p.shape, params)
  assert shapes.masks == expected
  adam = shapes.inner_state[0]
  assert adam.mu == expected and adam.nu == expected and adam.count is None
  assert shapes.step is None and shapes.rng is None


@pytest.mark.parametrize("wrap", ["multi_transform", "partition"])
def test_apply_masks_under_multi_transform_and_partition(wrap):
  """The documented apply_masks(params, opt_state) when sparse training owns only some
  params: the masks have MaskedNode holes, the other params pass unchanged."""
  params = {"a": {"kernel": jnp.ones((16, 8)), "bias": jnp.ones(8)},
            "b": {"kernel": jnp.ones((8, 4)), "bias": jnp.ones(4)}, "emb": jnp.ones((32, 16))}
  labels = {"a": {"kernel": "sparse", "bias": "dense"},
            "b": {"kernel": "sparse", "bias": "dense"}, "emb": "dense"}
  sparse = rigl_jax.sparse_training(optax.sgd(0.1, momentum=0.9), method="rigl",
                                    sparsity=0.5, update_every=2, end_step=20)
  transforms = {"sparse": sparse, "dense": optax.adam(1e-2)}
  tx = (optax.multi_transform(transforms, labels) if wrap == "multi_transform"
        else optax.partition(transforms, labels))
  state = tx.init(params)
  params = rigl_jax.apply_masks(params, state)
  assert float(params["emb"].sum()) == 32 * 16          # not sparse training's: untouched
  counts = (int(params["a"]["kernel"].sum()), int(params["b"]["kernel"].sum()))
  assert sum(counts) == 80                              # 50% of the 160 kernel weights

  @jax.jit
  def step(params, state, i):
    grads = jax.tree.map(lambda p: jnp.sin(p * (i + 1.0)) + 0.1, params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  for i in range(7):
    params, state = step(params, state, jnp.float32(i))
  masks = rigl_jax.get_masks(state)
  assert int(masks["a"]["kernel"].sum()) + int(masks["b"]["kernel"].sum()) == 80
  again = rigl_jax.apply_masks(params, state)
  for p, q in zip(jax.tree.leaves(params), jax.tree.leaves(again)):
    np.testing.assert_array_equal(np.asarray(p), np.asarray(q))   # inactive already 0


def test_tree_map_params_cast_keeps_masks_usable():
  """Casting the per-parameter state to bfloat16 with optax.tree_map_params casts the
  masks as well (they are params-shaped state); the next update reads them as bool."""
  tx = rigl_jax.sparse_training(optax.adam(1e-3), method="rigl", sparsity=0.8,
                                update_every=1, end_step=50)
  params = mlp_params()
  state = tx.init(params)
  params = rigl_jax.apply_masks(params, state)
  before = jax.tree.map(np.asarray, rigl_jax.get_masks(state))
  cast = optax.tree_map_params(tx, lambda v: v.astype(jnp.bfloat16), state)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, new_state = jax.jit(tx.update)(grads, cast, params)
  for m, b in zip(jax.tree.leaves(rigl_jax.get_masks(new_state)), jax.tree.leaves(before)):
    assert m.dtype == jnp.bool_ and int(m.sum()) == int(b.sum())


def test_eager_updates_compile_once(caplog):
  """A plain Python loop (no jit), as flax's linen VAE example runs its optimizer."""
  tx = tx_rigl()
  params = mlp_params()
  state = tx.init(params)
  params = rigl_jax.apply_masks(params, state)
  grads = jax.tree.map(jnp.ones_like, params)
  for _ in range(3):  # warm up: the first update and mask-update steps compile
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  with jax.log_compiles(True), caplog.at_level(logging.WARNING):
    caplog.clear()
    for _ in range(8):  # update steps and ordinary steps alternate (update_every=2)
      updates, state = tx.update(grads, state, params)
      params = optax.apply_updates(params, updates)
  compiles = [r for r in caplog.records if "Compiling" in r.getMessage()]
  assert not compiles, [r.getMessage()[:200] for r in compiles]
  for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(rigl_jax.get_masks(state))):
    assert not np.asarray(p)[~np.asarray(m)].any()


def test_eager_and_jitted_updates_agree():
  tx = tx_rigl()
  params = mlp_params()
  state = tx.init(params)
  params = rigl_jax.apply_masks(params, state)
  grads = jax.tree.map(lambda p: jnp.cos(p), params)
  a = tx.update(grads, state, params)
  b = jax.jit(tx.update)(grads, state, params)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_lookahead_is_refused_with_the_reason():
  tx = optax.lookahead(tx_rigl(), sync_period=5, slow_step_size=0.5)
  with pytest.raises(ValueError, match="cannot run inside optax.lookahead"):
    tx.init(optax.LookaheadParams.init_synced(mlp_params()))


# ----------------------------------------------------------------------------- arguments


def test_only_floating_leaves_are_sparse():
  params = dict(mlp_params(), table=jnp.ones((32, 8), jnp.int32))
  state = tx_rigl().init(params)
  assert bool(rigl_jax.get_masks(state)["table"].all())
  sparsities = rigl_jax.sparsity_distribution(params, 0.8, "erk")
  assert sparsities["table"] == 0.0
  # The budget is the float kernels' alone: 80% of them, exactly as without the table.
  kernels = 32 * 16 + 16 * 4
  active = sum(int(m.sum()) for k, m in rigl_jax.get_masks(state).items() if k != "table"
               for m in [m["kernel"]])
  assert abs(active - 0.2 * kernels) <= 2


def test_integral_step_arguments_of_any_integer_type():
  tx = tx_rigl(end_step=np.int64(100), update_every=np.int32(2), start_step=np.int64(0))
  tx.init(mlp_params())
  for kwargs in (dict(end_step=100.0), dict(update_every=True), dict(end_step="100")):
    with pytest.raises(ValueError, match="must be an int"):
      tx_rigl(**kwargs)


@pytest.mark.parametrize("sparsity", ["0.9", True, None, [0.9]])
def test_sparsity_must_be_a_number(sparsity):
  with pytest.raises(ValueError, match="sparsity must be a number"):
    tx_rigl(sparsity=sparsity)
  assert tx_rigl(sparsity=np.float32(0.5)) is not None


def test_grads_of_another_structure_give_a_clear_error():
  tx = tx_rigl()
  params = mlp_params()
  state = tx.init(params)
  grads = {"fc1": params["fc1"]}
  with pytest.raises(ValueError, match="grads do not have the structure of the params"):
    tx.update(grads, state, params)
  with pytest.raises(ValueError, match="grads do not have the structure of the params"):
    jax.jit(tx.update)(grads, state, params)


def test_global_density_is_over_the_kernels():
  state = tx_rigl(sparsity=0.75).init(mlp_params())
  masks = rigl_jax.get_masks(state)
  assert rigl_jax.global_density(masks) == pytest.approx(0.25, abs=1e-3)
  everything = jax.tree.map(lambda _: True, masks)
  total = 32 * 16 + 16 * 4 + 16 + 4
  assert rigl_jax.global_density(masks, everything) == pytest.approx(
      (0.25 * (32 * 16 + 16 * 4) + 20) / total, abs=1e-3)
  with pytest.raises(ValueError, match="selects no mask entry"):
    rigl_jax.global_density(masks, jax.tree.map(lambda _: False, masks))


# ----------------------------------------------------------------------------- packaging


def test_the_library_depends_on_jax_optax_numpy_only():
  import re  # pylint: disable=import-outside-toplevel
  import tomllib  # pylint: disable=import-outside-toplevel
  with open(os.path.join(os.path.dirname(HERE), "pyproject.toml"), "rb") as f:
    project = tomllib.load(f)["project"]
  names = {re.split(r"[<>=!~\[ ]", d)[0].lower() for d in project["dependencies"]}
  assert names == {"jax", "optax", "numpy"}
  assert not any("==" in d for d in project["dependencies"])  # ranges, not pins
  assert "flax" in " ".join(project["optional-dependencies"]["train"])


def test_main_help_does_not_import_jax():
  result = subprocess.run([sys.executable, "-X", "importtime", "-m", "rigl_jax.main", "--help"],
                          capture_output=True, text=True, timeout=120)
  imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines()
              if line.startswith("import time:")}
  assert "jax" not in imported and "flax" not in imported
  text = result.stdout + result.stderr
  assert "--workdir" in text
  from rigl_jax import config as config_lib  # pylint: disable=import-outside-toplevel
  for field in config_lib.base_config():  # every config field, with allowed values
    assert f"  {field} = " in text, field
  assert "one of dense, small_dense, static, set, rigl" in text


def test_launch_tools_live_in_the_package():
  from rigl_jax.launch import report, sweep  # pylint: disable=import-outside-toplevel,unused-import
  assert not os.path.exists(os.path.join(os.path.dirname(HERE), "launch"))


@pytest.mark.parametrize("method", [
    "rigl", pytest.param("set", marks=pytest.mark.slow), "snfs",
    pytest.param("rigl_sm", marks=pytest.mark.slow), "srigl", "pruning_global"])
def test_non_finite_weights_keep_exact_counts(method, caplog):
  """float16 with adam's eps=1e-8 overflows: weights turn inf and NaN. The masks keep
  their counts (they grew by ~2x before), and report_nonfinite says so once."""
  rng = np.random.default_rng(0)
  params = {"a": {"kernel": jnp.asarray(rng.normal(size=(128, 64)), jnp.float16)},
            "b": {"kernel": jnp.asarray(rng.normal(size=(64, 16)), jnp.float16)}}
  tx = rigl_jax.sparse_training(optax.adam(1e-3), method=method, sparsity=0.8, update_every=3,
                                end_step=20, report_nonfinite=True)
  state = tx.init(params)
  params = rigl_jax.apply_masks(params, state)
  budget = sum(int(m.sum()) for m in jax.tree.leaves(rigl_jax.get_masks(state)))
  if method == "pruning_global":
    budget = round(0.2 * (128 * 64 + 64 * 16))
  step = jax.jit(tx.update)
  with caplog.at_level(logging.WARNING, logger="rigl_jax"):
    for _ in range(24):
      grads = jax.tree.map(
          lambda p: jnp.asarray(rng.normal(size=p.shape) * 1e-4, jnp.float16), params)
      updates, state = step(grads, state, params)
      params = optax.apply_updates(params, updates)
      jax.block_until_ready(state)
  assert not all(np.isfinite(np.asarray(p)).all() for p in jax.tree.leaves(params))
  counts = sum(int(m.sum()) for m in jax.tree.leaves(rigl_jax.get_masks(state)))
  if method == "srigl":
    assert counts <= budget          # ablation may only lower it
  else:
    assert counts == budget
  reports = [r for r in caplog.records if "saw non-finite" in r.getMessage()]
  assert len(reports) == 1
