"""README's recipes (NNX, linen TrainState, sharding) run as written."""

import os
import re

import jax
import numpy as np
import pytest

import rigl_jax

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def recipe(name: str) -> str:
  with open(README) as f:
    text = f.read()
  blocks = re.findall(r"```python\n(# recipe: (\w+)\n.*?)```", text, re.S)
  found = {n: code for code, n in blocks}
  assert name in found, f"README has no '# recipe: {name}' block"
  return found[name]


def assert_sparse(params, masks, sparsity):
  kernels = [(p, m) for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(masks))
             if np.ndim(m) >= 2]
  for p, m in kernels:
    assert not np.asarray(p)[~np.asarray(m)].any()
  assert rigl_jax.global_density(masks) == pytest.approx(1 - sparsity, abs=2e-3)


def test_nnx_recipe():
  from flax import nnx  # pylint: disable=import-outside-toplevel
  scope = {}
  exec(compile(recipe("nnx"), "README:nnx", "exec"), scope)  # pylint: disable=exec-used
  assert_sparse(nnx.state(scope["model"], nnx.Param), scope["masks"], 0.9)
  assert float(scope["loss"]) < 1.0  # it learned the toy task


def test_linen_recipe():
  scope = {}
  exec(compile(recipe("linen"), "README:linen", "exec"), scope)  # pylint: disable=exec-used
  assert_sparse(scope["state"].params, scope["masks"], 0.9)
  assert int(scope["state"].step) == 200


def test_sharding_recipe():
  scope = {}
  exec(compile(recipe("sharding"), "README:sharding", "exec"), scope)  # pylint: disable=exec-used
  masks, params = scope["masks"], scope["params"]
  assert masks["w"].sharding.is_equivalent_to(params["w"].sharding, 2)
  assert masks["b"].sharding.is_equivalent_to(params["b"].sharding, 1)


def test_scan_recipe():
  """nn.scan layers, stacked=, constant fan-in: four layers of one fan-in each."""
  scope = {}
  exec(compile(recipe("scan"), "README:scan", "exec"), scope)  # pylint: disable=exec-used
  fan_in = np.asarray(scope["fan_in"])
  assert fan_in.shape == (4, 64)
  assert (fan_in == fan_in[:, :1]).all()         # constant fan-in within each layer
  masks = scope["masks"]
  assert np.asarray(masks["blocks"]["Dense_0"]["bias"]).all()  # (4, 64) biases dense
  kernel = np.asarray(scope["params"]["blocks"]["Dense_0"]["kernel"])
  assert not kernel[~np.asarray(masks["blocks"]["Dense_0"]["kernel"])].any()
  assert float(scope["loss"]) < 0.3              # it learned the toy task
