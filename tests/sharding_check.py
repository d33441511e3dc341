"""Run by tests/test_composition.py in a subprocess with N forced CPU devices:
the transform on params sharded over a mesh (Explicit and Auto axes; model-parallel,
FSDP-style and both), against the same steps on one device.

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python tests/sharding_check.py
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import rigl_jax

# (method, structure, sparsity): the structured ones have their grouped axes
# (output units, input-channel groups, blocks) sharded by the layouts below.
METHODS = (("rigl", None, 0.8), ("set", None, 0.8), ("snfs", None, 0.8),
           ("pruning_global", None, 0.8), ("rigl", "constant_fan_in", 0.8),
           ("srigl", None, 0.8), ("rigl", "2:4", 0.5), ("pruning", "block:4x4", 0.8))
STEPS = 7


def make_params():
  k1, k2 = jax.random.split(jax.random.key(0))
  return {"fc1": {"kernel": jax.random.normal(k1, (64, 48)), "bias": jnp.zeros(48)},
          "fc2": {"kernel": jax.random.normal(k2, (48, 16)), "bias": jnp.zeros(16)}}


def make_tx(spec):
  method, structure, sparsity = spec
  return rigl_jax.sparse_training(optax.sgd(0.1, momentum=0.9), method=method,
                                  sparsity=sparsity, structure=structure,
                                  update_every=2, end_step=6, seed=3)


def fake_grads(params, step):
  # Elementwise (no reductions), so sharded and unsharded runs see the same numbers.
  return jax.tree.map(lambda p: jnp.sin(3.0 * p + step), params)


def run(tx, params, init_fn):
  state = init_fn(params)
  params = jax.jit(rigl_jax.apply_masks)(params, state)

  @jax.jit
  def step(params, state, i):
    updates, state = tx.update(fake_grads(params, i), state, params)
    return optax.apply_updates(params, updates), state

  for i in range(STEPS):
    params, state = step(params, state, jnp.float32(i))
  return params, state


def check(mesh_shape, axis_type, specs, method, reference):
  mesh = jax.make_mesh(mesh_shape, ("data", "model"), axis_types=(axis_type,) * 2)
  tx = make_tx(method)
  with jax.set_mesh(mesh):
    params = jax.tree.map(lambda p, s: jax.device_put(p, NamedSharding(mesh, s)),
                          make_params(), specs)
    if axis_type == AxisType.Explicit:
      init_fn = jax.jit(tx.init)
    else:  # Auto axes: shardings of the state derived from the params', the optax way
      abstract = jax.eval_shape(tx.init, params)
      state_specs = optax.tree_map_params(tx, lambda _, s: s, abstract, specs,
                                          transform_non_params=lambda _: P())
      init_fn = jax.jit(tx.init, out_shardings=jax.tree.map(
          lambda s: NamedSharding(mesh, s), state_specs))
    params, state = run(tx, params, init_fn)
  masks = rigl_jax.get_masks(state)
  ref_params, ref_state = reference
  for m, p, s, ref_m, ref_p in zip(jax.tree.leaves(masks), jax.tree.leaves(params),
                                    jax.tree.leaves(specs), jax.tree.leaves(ref_state.masks),
                                    jax.tree.leaves(ref_params)):
    want = NamedSharding(mesh, s)
    assert m.sharding.is_equivalent_to(want, m.ndim), (m.sharding, s)  # masks like params
    assert p.sharding.is_equivalent_to(want, p.ndim), (p.sharding, s)
    np.testing.assert_array_equal(np.asarray(m), np.asarray(ref_m))  # same masks as 1 device
    np.testing.assert_array_equal(np.asarray(p), np.asarray(ref_p))
    assert not np.asarray(p)[~np.asarray(m)].any()
  momentum = rigl_jax.methods.optimizer_momentum(state.inner_state, params)
  for mu, s in zip(jax.tree.leaves(momentum), jax.tree.leaves(specs)):
    assert mu.sharding.is_equivalent_to(NamedSharding(mesh, s), mu.ndim), (mu.sharding, s)


def main():
  n = jax.device_count()
  layouts = {  # name: (mesh shape, specs)
      "model-parallel": ((1, n), {"fc1": {"kernel": P(None, "model"), "bias": P("model")},
                                  "fc2": {"kernel": P("model", None), "bias": P()}}),
      "fsdp": ((n, 1), {"fc1": {"kernel": P("data", None), "bias": P()},
                        "fc2": {"kernel": P("data", None), "bias": P()}}),
  }
  if n == 4:
    layouts["2d"] = ((2, 2), {"fc1": {"kernel": P("data", "model"), "bias": P("model")},
                              "fc2": {"kernel": P("model", "data"), "bias": P("data")}})
  for method in METHODS:
    reference = run(make_tx(method), make_params(), make_tx(method).init)
    # The method really moved the masks during the reference run.
    initial = make_tx(method).init(make_params()).masks
    assert any((np.asarray(a) != np.asarray(b)).any() for a, b in
               zip(jax.tree.leaves(initial), jax.tree.leaves(reference[1].masks))), method
    for name, (shape, specs) in layouts.items():
      # The structured entries run on Explicit axes only (Auto is the same code
      # path for them), to keep the default test set short.
      structured = method[1] is not None or method[0] == "srigl"
      for axis_type in ((AxisType.Explicit,) if structured and n == 2 else
                        (AxisType.Explicit, AxisType.Auto)):
        check(shape, axis_type, specs, method, reference)
        print(f"ok {n} devices {name} {axis_type.name} {method[0]} {method[1]}")

  check_stacked()


# Stacked kernels: a (4, 128, 64) kernel as four layers, with the selection's size
# thresholds lowered so that these small layers take the paths large ones take on
# CPU (the radix select row after row, the per-unit bisection layer after layer).
STACKED_METHODS = (("rigl", None), ("rigl", "constant_fan_in"), ("srigl", "constant_fan_in"),
                   ("rigl", "block:4x4"))


def check_stacked():
  # Run last: the lowered thresholds stay for the rest of this process.
  from rigl_jax import selection  # pylint: disable=import-outside-toplevel
  selection.RADIX_MIN_SIZE, selection.ROW_BY_ROW_MIN_SIZE = 1024, 4096
  selection.LAYER_BY_LAYER_MIN_SIZE = 16384
  k1, k2 = jax.random.split(jax.random.key(1))
  make = lambda: {"blocks": {"kernel": jax.random.normal(k1, (4, 128, 64)),
                             "scale": jnp.ones((4, 64))},
                  "head": {"kernel": jax.random.normal(k2, (64, 16))}}

  def make_stacked_tx(method, structure):
    return rigl_jax.sparse_training(optax.sgd(0.1, momentum=0.9), method=method, sparsity=0.8,
                                    structure=structure,
                                    stacked={"^blocks/": 1}, update_every=2, end_step=6, seed=3)

  mesh = jax.make_mesh((1, jax.device_count()), ("data", "model"),
                       axis_types=(AxisType.Explicit,) * 2)
  layouts = {"layers sharded": {"blocks": {"kernel": P("model", None, None),
                                           "scale": P("model", None)}, "head": {"kernel": P()}},
             "units sharded": {"blocks": {"kernel": P(None, None, "model"),
                                          "scale": P(None, "model")},
                               "head": {"kernel": P(None, "model")}}}
  for method, structure in STACKED_METHODS:
    tx = make_stacked_tx(method, structure)
    ref_params, ref_state = run(tx, make(), tx.init)
    for name, specs in layouts.items():
      with jax.set_mesh(mesh):
        params = jax.tree.map(lambda p, s: jax.device_put(p, NamedSharding(mesh, s)),
                              make(), specs)
        params, state = run(tx, params, jax.jit(tx.init))
      for m, ref_m, p, ref_p in zip(jax.tree.leaves(state.masks), jax.tree.leaves(ref_state.masks),
                                    jax.tree.leaves(params), jax.tree.leaves(ref_params)):
        np.testing.assert_array_equal(np.asarray(m), np.asarray(ref_m))
        np.testing.assert_array_equal(np.asarray(p), np.asarray(ref_p))
      print(f"stacked-ok {name} {method} {structure}")


if __name__ == "__main__":
  main()
  sys.exit(0)
