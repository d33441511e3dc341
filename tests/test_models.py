"""Tests for rigl_jax.models: shapes, exact parameter counts, naming, init.

Large models are only traced (`jax.eval_shape`), never run, so the file stays
fast on CPU. Expected parameter counts are computed here, layer by layer, from
the architecture descriptions (SPEC_NOTES section 5 and the original papers),
not read from the models.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rigl_jax import models
from rigl_jax.models import (LANGUAGE_MODELS, MODEL_NAMES, BottleneckBlock, WideResNet,
                             WideResNetBlock, get_model, scale_width)

# name -> (input shape for tests, classes, stem path, stem input channels)
CASES = {
    "lenet_300_100": ((2, 28, 28, 1), 10, "fc1", 784),
    "lenet5": ((2, 28, 28, 1), 10, "conv1", 1),
    "wrn_22_2": ((2, 32, 32, 3), 10, "conv_stem", 3),
    "resnet50_cifar": ((2, 32, 32, 3), 100, "conv_stem", 3),
    "resnet50_imagenet": ((2, 224, 224, 3), 1000, "conv_stem", 3),
    "mobilenet_v1": ((2, 224, 224, 3), 1000, "conv_stem", 3),
}
BN_MODELS = ("wrn_22_2", "resnet50_cifar", "resnet50_imagenet",
             "mobilenet_v1")


def abstract_variables(model, shape):
  """Variable shapes of `model` for input `shape`, without computing them."""
  return jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros(shape), train=False))


def count(tree) -> int:
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def kernel_paths(params):
  """(path string, shape) of every `kernel` leaf, in flatten order."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(params)
  return [("/".join(k.key for k in path), leaf.shape)
          for path, leaf in leaves if path[-1].key == "kernel"]


@pytest.fixture(scope="module")
def variables():
  """Abstract variables of every registered model, traced once."""
  out = {}
  for name, (shape, classes, _, _) in CASES.items():
    out[name] = abstract_variables(get_model(name, num_classes=classes), shape)
  return out


def test_registry_lists_all_models():
  # The language models are tested in test_charlm.py.
  assert set(MODEL_NAMES) == set(CASES) | set(LANGUAGE_MODELS)


@pytest.mark.parametrize("name", list(CASES))
def test_output_shape_train_and_eval(name, variables):
  shape, classes, _, _ = CASES[name]
  model = get_model(name, num_classes=classes)
  x = jnp.zeros(shape)
  v = variables[name]
  logits = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), v, x)
  assert logits.shape == (shape[0], classes)
  assert logits.dtype == jnp.float32
  logits, updates = jax.eval_shape(
      lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"],
                               rngs={"dropout": jax.random.key(1)}), v, x)
  assert logits.shape == (shape[0], classes)
  # Exactly the BN models carry (and update) running statistics.
  assert ("batch_stats" in updates) == (name in BN_MODELS)
  assert ("batch_stats" in v) == (name in BN_MODELS)


def test_mlp_flattens_1d_inputs():
  model = get_model("lenet_300_100", num_classes=10)
  v = abstract_variables(model, (3, 40))  # mnist1d
  assert v["params"]["fc1"]["kernel"].shape == (40, 300)
  out = jax.eval_shape(lambda v, x: model.apply(v, x, train=True), v,
                       jnp.zeros((3, 40)))
  assert out.shape == (3, 10)


def test_conv_models_reject_non_nhwc():
  model = get_model("lenet5", num_classes=10)
  with pytest.raises(ValueError, match="NHWC"):
    abstract_variables(model, (2, 784))


# ----- exact parameter counts, computed from the architecture descriptions --


def dense(n_in, n_out):
  return n_in * n_out + n_out


def conv_nobias(k, c_in, c_out):
  return k * k * c_in * c_out


def bn(c):
  return 2 * c  # scale and offset; running stats are not parameters


def lenet_300_100_count(n_in=784, classes=10):
  return dense(n_in, 300) + dense(300, 100) + dense(100, classes)


def lenet5_count(classes=10):
  # 28 -conv5-> 24 -pool-> 12 -conv5-> 8 -pool-> 4: 4*4*50 features.
  return (conv_nobias(5, 1, 20) + 20 + conv_nobias(5, 20, 50) + 50 +
          dense(4 * 4 * 50, 500) + dense(500, classes))


def wrn_count(depth=22, k=2, classes=10):
  n = (depth - 4) // 6
  total = conv_nobias(3, 3, 16)
  c_in = 16
  for width in (16 * k, 32 * k, 64 * k):
    for _ in range(n):
      total += bn(c_in) + conv_nobias(3, c_in, width)
      total += bn(width) + conv_nobias(3, width, width)
      if c_in != width:
        total += conv_nobias(1, c_in, width)  # 1x1 shortcut, no BN
      c_in = width
  return total + bn(c_in) + dense(c_in, classes)


def resnet50_count(stem_kernel, classes):
  total = conv_nobias(stem_kernel, 3, 64) + bn(64)
  c_in = 64
  for blocks, width in zip((3, 4, 6, 3), (64, 128, 256, 512)):
    for b in range(blocks):
      total += conv_nobias(1, c_in, width) + bn(width)
      total += conv_nobias(3, width, width) + bn(width)
      total += conv_nobias(1, width, 4 * width) + bn(4 * width)
      if b == 0:  # projection shortcut: 1x1 conv + BN
        total += conv_nobias(1, c_in, 4 * width) + bn(4 * width)
      c_in = 4 * width
  return total + dense(2048, classes)


def mobilenet_v1_count(classes):
  total = conv_nobias(3, 3, 32) + bn(32)
  c_in = 32
  for c_out in (64, 128, 128, 256, 256, 512, 512, 512, 512, 512, 512, 1024,
                1024):
    total += 3 * 3 * c_in + bn(c_in)              # depthwise 3x3
    total += conv_nobias(1, c_in, c_out) + bn(c_out)  # pointwise 1x1
    c_in = c_out
  return total + dense(1024, classes)


def test_reference_counts_match_published_figures():
  # Sanity of the arithmetic above against well-known totals.
  assert lenet_300_100_count() == 266_610
  assert lenet5_count() == 431_080
  assert resnet50_count(7, 1000) == 25_557_032   # torchvision resnet50
  assert mobilenet_v1_count(1000) == 4_231_976   # Keras, trainable params


@pytest.mark.parametrize("name,expected", [
    ("lenet_300_100", lenet_300_100_count(784, 10)),
    ("lenet5", lenet5_count(10)),
    ("wrn_22_2", wrn_count(22, 2, 10)),
    ("resnet50_cifar", resnet50_count(3, 100)),
    ("resnet50_imagenet", resnet50_count(7, 1000)),
    ("mobilenet_v1", mobilenet_v1_count(1000)),
])
def test_exact_parameter_counts(name, expected, variables):
  assert count(variables[name]["params"]) == expected


def test_wrn_shortcut_convs_only_where_width_changes(variables):
  params = variables["wrn_22_2"]["params"]
  with_shortcut = sorted(k for k in params if "shortcut" in params[k])
  assert with_shortcut == ["group1_block1", "group2_block1", "group3_block1"]
  assert params["group2_block1"]["shortcut"]["kernel"].shape == (1, 1, 32, 64)
  assert params["head"]["kernel"].shape == (128, 10)


def test_general_wide_resnet_count():
  model = WideResNet(depth=16, width=4, num_classes=100)
  v = abstract_variables(model, (1, 32, 32, 3))
  assert count(v["params"]) == wrn_count(16, 4, 100)


def test_wide_resnet_rejects_bad_depth():
  with pytest.raises(ValueError, match="6n"):
    abstract_variables(WideResNet(depth=21), (1, 32, 32, 3))


# ----- naming conventions the sparse-training core relies on -------------


@pytest.mark.parametrize("name", list(CASES))
def test_stem_kernel_first_and_head_recognisable(name, variables):
  shape, classes, stem, stem_in = CASES[name]
  kernels = kernel_paths(variables[name]["params"])
  first_path, first_shape = kernels[0]
  assert first_path == f"{stem}/kernel"
  # The first kernel is the one that reads the input.
  assert first_shape[-2] == stem_in
  head = [(p, s) for p, s in kernels if p.startswith("head/")]
  assert head and head[0][0] == "head/kernel"
  assert head[0][1][-1] == classes
  # No other kernel reads the raw input channels in conv models.
  if name != "lenet_300_100" and stem_in == 3:
    assert all(s[-2] != 3 for _, s in kernels[1:])


@pytest.mark.parametrize("name", list(CASES))
def test_kernels_are_matrices_and_the_rest_vectors(name, variables):
  leaves, _ = jax.tree_util.tree_flatten_with_path(variables[name]["params"])
  for path, leaf in leaves:
    if path[-1].key == "kernel":
      assert leaf.ndim >= 2, path
    else:
      assert leaf.ndim == 1, path
    assert leaf.dtype == jnp.float32, path


@pytest.mark.parametrize("name", BN_MODELS)
def test_convs_before_bn_have_no_bias(name, variables):
  leaves, _ = jax.tree_util.tree_flatten_with_path(variables[name]["params"])
  for path, _ in leaves:
    if path[-1].key == "bias":
      parent = path[-2].key
      assert "bn" in parent or parent == "head", path


# ----- width multiplier (Small-Dense) -------------------------------------


def test_scale_width_truncates_like_the_reports_code():
  # rigl-reproducibility truncates: int(c * sqrt(density)).
  assert scale_width(300, 0.5) == 150
  assert scale_width(16, math.sqrt(0.1)) == 5   # 5.06
  assert scale_width(5, 0.5) == 2               # 2.5 truncates
  assert scale_width(300, math.sqrt(0.1)) == 94  # 94.87
  assert scale_width(100, math.sqrt(0.1)) == 31  # 31.62
  for width in (16, 32, 64, 128, 256, 512, 2048):
    for density in (0.5, 0.2, 0.1, 0.05):
      assert scale_width(width, math.sqrt(density)) == int(width * np.sqrt(density))
  assert scale_width(20, 0.01) == 1             # at least one unit
  with pytest.raises(ValueError):
    scale_width(10, 0.0)


def test_width_multiplier_scales_hidden_widths_only():
  model = get_model("lenet_300_100", num_classes=10, width_multiplier=0.5)
  params = abstract_variables(model, (1, 784))["params"]
  assert params["fc1"]["kernel"].shape == (784, 150)
  assert params["fc2"]["kernel"].shape == (150, 50)
  assert params["head"]["kernel"].shape == (50, 10)


@pytest.mark.parametrize("name", ["wrn_22_2", "resnet50_cifar", "lenet5"])
def test_width_multiplier_shrinks_params_by_its_square(name, variables):
  shape, classes, stem, stem_in = CASES[name]
  m = math.sqrt(1 - 0.8)  # Small-Dense at 80% sparsity
  small = abstract_variables(
      get_model(name, num_classes=classes, width_multiplier=m), shape)
  ratio = count(small["params"]) / count(variables[name]["params"])
  assert 0.8 * m**2 < ratio < 1.25 * m**2
  kernels = kernel_paths(small["params"])
  assert kernels[0][1][-2] == stem_in        # input size unchanged
  assert dict(kernels)["head/kernel"][-1] == classes  # output size unchanged


def test_bad_width_multiplier_rejected():
  with pytest.raises(ValueError, match="width_multiplier"):
    get_model("wrn_22_2", num_classes=10, width_multiplier=0.0)


# ----- initialisation and behaviour (small real runs) ----------------------
# Real initialisation runs only on single blocks or tiny models: XLA's CPU
# compile of threefry draws takes seconds, so keys use the "rbg" PRNG (fast to
# compile) and test inputs come from numpy.


def real_init(module, x):
  return module.init(jax.random.key(0, impl="rbg"), x, train=False)


def normal(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape),
                     jnp.float32)


def test_resnet50_blocks_all_have_a_last_bn(variables):
  params = variables["resnet50_cifar"]["params"]
  blocks = sorted(k for k in params if k.startswith("group"))
  assert len(blocks) == 3 + 4 + 6 + 3
  for block in blocks:
    out = params[block]["conv3"]["kernel"].shape[-1]
    assert params[block]["bn3"]["scale"].shape == (out,)


def test_bottleneck_last_bn_scale_is_zero():
  block = BottleneckBlock(features=4, out_features=16, strides=1)
  x = normal((2, 4, 4, 8), 1)  # 8 != 16: projection
  params = real_init(block, x)["params"]
  np.testing.assert_array_equal(params["bn3"]["scale"], 0.0)
  for other in ("bn1", "bn2", "shortcut_bn"):
    np.testing.assert_array_equal(params[other]["scale"], 1.0)
  assert float(jnp.std(params["conv2"]["kernel"])) > 0


def test_bottleneck_starts_as_identity():
  # With the last BN scale at 0 the residual branch outputs 0, so a block with
  # an identity shortcut maps x to relu(x) at initialisation.
  block = BottleneckBlock(features=4, out_features=16, strides=1)
  x = normal((2, 4, 4, 16), 2)
  v = real_init(block, x)
  np.testing.assert_allclose(block.apply(v, x, train=False), nn.relu(x),
                             atol=1e-6)


def test_he_fan_out_init_scale():
  block = WideResNetBlock(features=64)
  params = real_init(block, jnp.zeros((1, 4, 4, 64)))["params"]
  kernel = params["conv2"]["kernel"]  # 3x3, 64 -> 64
  expected_std = math.sqrt(2.0 / (3 * 3 * 64))
  assert abs(float(jnp.std(kernel)) / expected_std - 1) < 0.1


def test_batch_norm_train_updates_stats_and_eval_uses_them():
  block = WideResNetBlock(features=8)
  x = normal((4, 4, 4, 8), 2) * 3 + 1
  v = real_init(block, x)
  apply = block.apply
  _, updates = apply(v, x, train=True, mutable=["batch_stats"])
  old = v["batch_stats"]["bn1"]["mean"]
  new = updates["batch_stats"]["bn1"]["mean"]
  # momentum 0.9 from zero: new running mean = 0.1 * batch mean.
  np.testing.assert_allclose(old, 0.0)
  np.testing.assert_allclose(new, 0.1 * jnp.mean(x, axis=(0, 1, 2)),
                             rtol=1e-5, atol=1e-6)
  a = apply(v, x, train=False)
  b = apply({**v, **updates}, x, train=False)
  assert not np.allclose(a, b)


def test_models_without_bn_ignore_train():
  for name, shape in (("lenet_300_100", (2, 40)), ("lenet5", (2, 28, 28, 1))):
    model = get_model(name, num_classes=10)
    x = normal(shape, 3)
    v = real_init(model, x)
    apply = model.apply
    np.testing.assert_array_equal(apply(v, x, train=True),
                                  apply(v, x, train=False))


def test_compute_dtype_bfloat16_keeps_params_float32():
  model = get_model("lenet5", num_classes=10, dtype=jnp.bfloat16)
  x = jnp.ones((2, 28, 28, 1))
  v = real_init(model, x)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(v["params"]))
  logits, state = jax.eval_shape(
      lambda v, x: model.apply(v, x, train=False, capture_intermediates=True,
                               mutable=["intermediates"]), v, x)
  assert state["intermediates"]["conv1"]["__call__"][0].dtype == jnp.bfloat16
  assert state["intermediates"]["head"]["__call__"][0].dtype == jnp.bfloat16
  assert logits.dtype == jnp.float32


def test_unknown_model_name():
  with pytest.raises(ValueError) as err:
    get_model("resnet18", num_classes=10)
  message = str(err.value)
  assert "model" in message and "resnet18" in message
  for name in MODEL_NAMES:
    assert name in message


def test_public_api():
  assert callable(models.get_model)
  assert isinstance(MODEL_NAMES, tuple)


# ----- dropout (WRN-22-2) --------------------------------------------------


def test_wrn_22_2_has_the_references_dropout():
  """Both references put dropout 0.3 between the two convs of every block."""
  model = get_model("wrn_22_2", num_classes=10)
  assert model.dropout_rate == 0.3
  assert get_model("wrn_22_2", num_classes=10, dropout_rate=0.0).dropout_rate == 0.0
  with pytest.raises(ValueError, match="no dropout"):
    get_model("resnet50_cifar", num_classes=100, dropout_rate=0.3)
  with pytest.raises(ValueError, match="dropout_rate"):
    get_model("wrn_22_2", num_classes=10, dropout_rate=1.0)


def test_wrn_dropout_differs_by_key_in_training_and_is_off_at_eval():
  model = WideResNet(depth=10, width=1, num_classes=10, dropout_rate=0.3)
  x = normal((2, 8, 8, 3), 4)
  v = real_init(model, x)

  def train(key):
    logits, _ = model.apply(v, x, train=True, mutable=["batch_stats"],
                            rngs={"dropout": key})
    return logits

  a, b = train(jax.random.key(1)), train(jax.random.key(2))
  assert not np.allclose(a, b)
  np.testing.assert_array_equal(a, train(jax.random.key(1)))
  # Evaluation ignores the key, and without dropout training needs none.
  np.testing.assert_array_equal(model.apply(v, x, train=False, rngs={"dropout": jax.random.key(1)}),
                                model.apply(v, x, train=False, rngs={"dropout": jax.random.key(2)}))
  plain = WideResNet(depth=10, width=1, num_classes=10, dropout_rate=0.0)
  plain.apply(v, x, train=True, mutable=["batch_stats"])


def test_full_wrn_22_2_train_forward_depends_on_the_dropout_key():
  model = get_model("wrn_22_2", num_classes=10)
  x = normal((2, 32, 32, 3), 5)
  v = real_init(model, x)
  run = jax.jit(lambda key: model.apply(v, x, train=True, mutable=["batch_stats"],
                                        rngs={"dropout": key})[0])
  assert not np.allclose(run(jax.random.key(0)), run(jax.random.key(1)))
  evaluate = jax.jit(lambda key: model.apply(v, x, train=False, rngs={"dropout": key}))
  np.testing.assert_array_equal(evaluate(jax.random.key(0)), evaluate(jax.random.key(1)))


def test_resnet50_small_dense_widths_expand_the_truncated_width():
  """The report's PyTorch ResNet-50 truncates the bottleneck width, then expands it by 4
  (int(base * s) * 4): at 90% the block outputs are 80/160/320/644, not 80/161/323/647."""
  m = math.sqrt(1 - 0.9)
  params = abstract_variables(
      get_model("resnet50_cifar", num_classes=100, width_multiplier=m), (1, 32, 32, 3))["params"]
  outs = [params[f"group{g}_block1"]["conv3"]["kernel"].shape[-1] for g in (1, 2, 3, 4)]
  mids = [params[f"group{g}_block1"]["conv1"]["kernel"].shape[-1] for g in (1, 2, 3, 4)]
  assert mids == [20, 40, 80, 161]
  assert outs == [80, 160, 320, 644]
