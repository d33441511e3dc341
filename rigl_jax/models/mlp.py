"""LeNet-300-100: the classic MNIST multilayer perceptron."""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from rigl_jax.models.layers import scale_width


class LeNet300100(nn.Module):
  """Dense 300 -> ReLU -> dense 100 -> ReLU -> dense `num_classes`.

  Any input is flattened per example, so images (B, 28, 28, 1) and 1-D signals
  such as mnist1d (B, 40) both work. Parameter paths, in flatten order:
  `fc1` (input layer), `fc2`, `head` (classifier).

  Attributes:
    num_classes: output units.
    width_multiplier: scales the hidden widths 300 and 100.
    dtype: compute dtype; params stay float32, logits are returned in float32.
  """
  num_classes: int
  width_multiplier: float = 1.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool = True):
    del train  # No BatchNorm or dropout: same computation in train and eval.
    x = jnp.asarray(x, self.dtype).reshape((x.shape[0], -1))
    for name, width in (("fc1", 300), ("fc2", 100)):
      x = nn.Dense(scale_width(width, self.width_multiplier), dtype=self.dtype,
                   name=name)(x)
      x = nn.relu(x)
    x = nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x)
    return jnp.asarray(x, jnp.float32)
