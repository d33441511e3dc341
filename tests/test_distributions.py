"""Sparsity distributions and exact-count masks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rigl_jax
from rigl_jax import masks as masks_lib


def wrn_22_2_kernels():
  """Kernel shapes of WRN-22-2 (pre-activation, 1x1 shortcuts), written out by hand."""
  shapes = {"conv_stem": (3, 3, 3, 16)}
  c_in = 16
  for g, width in enumerate((32, 64, 128)):
    for b in range(3):
      shapes[f"group{g}/block{b}/conv1"] = (3, 3, c_in, width)
      shapes[f"group{g}/block{b}/conv2"] = (3, 3, width, width)
      if c_in != width:
        shapes[f"group{g}/block{b}/shortcut"] = (1, 1, c_in, width)
      c_in = width
  shapes["head"] = (128, 10)
  params = {}
  for path, shape in shapes.items():
    node = params
    parts = path.split("/")
    for part in parts[:-1]:
      node = node.setdefault(part, {})
    node[parts[-1]] = {"kernel": jax.ShapeDtypeStruct(shape, jnp.float32),
                       "bias": jax.ShapeDtypeStruct(shape[-1:], jnp.float32)}
  return params


def flat_sparsities(params, *args, **kwargs):
  s = rigl_jax.sparsity_distribution(params, *args, **kwargs)
  return {masks_lib.path_to_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(s)[0]}


def kernel_sizes(params):
  return {masks_lib.path_to_str(p): int(np.prod(l.shape))
          for p, l in jax.tree_util.tree_flatten_with_path(params)[0] if len(l.shape) >= 2}


@pytest.mark.parametrize("kind", ["er", "erk"])
@pytest.mark.parametrize("sparsity", [0.5, 0.8, 0.9, 0.95])
def test_er_erk_budget_exact(kind, sparsity):
  params = wrn_22_2_kernels()
  s = flat_sparsities(params, sparsity, kind)
  sizes = kernel_sizes(params)
  total = sum(sizes.values())
  active = sum(masks_lib.num_active(n, s[p]) for p, n in sizes.items())
  # Rounding each layer's count moves the total by at most half a weight per layer.
  assert abs(active - (1 - sparsity) * total) <= 0.5 * len(sizes)
  for path, value in s.items():
    assert 0.0 <= value < 1.0
    if path.endswith("bias"):
      assert value == 0.0


def test_erk_dense_layer_loop_wrn_80():
  s = flat_sparsities(wrn_22_2_kernels(), 0.8, "erk")
  dense = sorted(p for p, v in s.items() if p.endswith("kernel") and v == 0.0)
  assert dense == ["conv_stem/kernel", "group0/block0/shortcut/kernel",
                   "group1/block0/shortcut/kernel", "group2/block0/shortcut/kernel",
                   "head/kernel"]


def test_erk_scores_follow_shape():
  params = {"a": {"kernel": jnp.zeros((3, 3, 64, 64))}, "b": {"kernel": jnp.zeros((3, 3, 64, 128))}}
  s = flat_sparsities(params, 0.9, "erk")
  ratio = (1 - s["a/kernel"]) / (1 - s["b/kernel"])
  expected = (3 + 3 + 64 + 64) / (3 * 3 * 64 * 64) / ((3 + 3 + 64 + 128) / (3 * 3 * 64 * 128))
  assert ratio == pytest.approx(expected, rel=1e-9)
  er = flat_sparsities(params, 0.9, "er")
  er_ratio = (1 - er["a/kernel"]) / (1 - er["b/kernel"])
  assert er_ratio == pytest.approx((128 / 64**2) / (192 / (64 * 128)), rel=1e-9)


def test_uniform_keeps_first_layer_dense():
  s = flat_sparsities(wrn_22_2_kernels(), 0.9, "uniform")
  assert s["conv_stem/kernel"] == 0.0
  assert s["head/kernel"] == 0.9
  assert s["group1/block2/conv2/kernel"] == 0.9


def test_dense_and_custom_leave_the_budget():
  params = wrn_22_2_kernels()
  s = flat_sparsities(params, 0.9, "erk", dense=r"^head/", custom={r"group2/block2/conv2": 0.5})
  assert s["head/kernel"] == 0.0
  assert s["group2/block2/conv2/kernel"] == 0.5
  sizes = kernel_sizes(params)
  budget = {p: n for p, n in sizes.items()
            if not p.startswith("head") and not p.startswith("group2/block2/conv2")}
  active = sum((1 - s[p]) * n for p, n in budget.items())
  assert active == pytest.approx(0.1 * sum(budget.values()), rel=1e-9)


@pytest.mark.parametrize("bad, match", [
    (dict(sparsity=1.0), "sparsity must be in"),
    (dict(sparsity=-0.1), "sparsity must be in"),
    (dict(kind="lognormal"), "distribution must be one of"),
    (dict(custom={"nope": 0.5}), "custom: pattern 'nope' matches no parameter"),
    (dict(dense=["nope"]), "dense: pattern 'nope' matches no parameter"),
    (dict(custom={"head": 1.5}), r"custom\['head'\] must be in"),
])
def test_bad_input(bad, match):
  kwargs = dict(sparsity=0.9, kind="erk")
  kwargs.update(bad)
  with pytest.raises(ValueError, match=match):
    rigl_jax.sparsity_distribution(wrn_22_2_kernels(), **kwargs)


def test_nothing_to_sparsify():
  with pytest.raises(ValueError, match="no parameter to sparsify"):
    rigl_jax.sparsity_distribution({"b": jnp.zeros(3)}, 0.5, "erk")


@pytest.mark.parametrize("kind", ["uniform", "er", "erk"])
def test_random_masks_exact_counts_and_seeded(kind):
  params = jax.tree.map(lambda s: jnp.zeros(s.shape), wrn_22_2_kernels())
  sparsities = rigl_jax.sparsity_distribution(params, 0.9, kind)
  m1 = rigl_jax.random_masks(jax.random.key(1), params, sparsities)
  m2 = rigl_jax.random_masks(jax.random.key(1), params, sparsities)
  m3 = rigl_jax.random_masks(jax.random.key(2), params, sparsities)
  for m, a, b, s, p in zip(jax.tree.leaves(m1), jax.tree.leaves(m2), jax.tree.leaves(m3),
                           jax.tree.leaves(sparsities), jax.tree.leaves(params)):
    assert m.dtype == jnp.bool_ and m.shape == p.shape
    assert int(m.sum()) == masks_lib.num_active(p.size, s)
    np.testing.assert_array_equal(m, a)
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(m1), jax.tree.leaves(m3))
             if not a.all())


def test_uniform_every_layer_sparse_when_asked():
  s = flat_sparsities(wrn_22_2_kernels(), 0.9, "uniform", uniform_first_layer_dense=False)
  assert all(v == 0.9 for p, v in s.items() if p.endswith("kernel"))


def test_core_errors_name_the_argument_not_only_in_their_text():
  """Callers (the trainer) map ``ArgumentError.argument`` to their own setting."""
  params = {"a": {"kernel": jnp.zeros((20, 10)), "bias": jnp.zeros(10)}}
  cases = [(dict(dense=".*"), "dense"), (dict(dense="nomatch"), "dense"),
           (dict(custom={"nomatch": 0.5}), "custom"), (dict(custom={"a": 2.0}), "custom"),
           (dict(sparsity=0.9999999), "sparsity"), (dict(sparsity="0.5"), "sparsity"),
           (dict(kind="erx"), "distribution"), (dict(include=lambda p, l: False), "params")]
  for overrides, argument in cases:
    kwargs = {"sparsity": 0.9, "kind": "erk", **overrides}
    with pytest.raises(rigl_jax.ArgumentError) as info:
      rigl_jax.sparsity_distribution(params, kwargs.pop("sparsity"), kwargs.pop("kind"),
                                     **kwargs)
    assert info.value.argument == argument, (overrides, info.value)
    assert isinstance(info.value, ValueError)


def test_method_and_distribution_names_come_from_one_list():
  from rigl_jax import config, distributions, methods, names  # pylint: disable=import-outside-toplevel
  assert tuple(methods.METHODS) == names.METHOD_NAMES
  assert distributions.DISTRIBUTIONS == names.DISTRIBUTION_NAMES == config.DISTRIBUTIONS
  assert config.SPARSE_METHODS == names.METHOD_NAMES + ("lottery",)
  assert config.CHOICES["method"] == config.DENSE_METHODS + config.SPARSE_METHODS
