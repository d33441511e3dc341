"""LeNet-5 as in Caffe's MNIST example (`lenet_train_test.prototxt`)."""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from rigl_jax.models.layers import check_nhwc, scale_width


class LeNet5(nn.Module):
  """Caffe LeNet-5: conv 20@5x5 -> pool -> conv 50@5x5 -> pool -> 500 -> classes.

  Convolutions are 'VALID' with bias, max-pooling is 2x2 stride 2. As in Caffe,
  the only nonlinearity is the ReLU after the 500-unit dense layer (the convs
  are followed by max-pooling only). On 28x28x1 MNIST with 10 classes this has
  431,080 parameters. Parameter paths, in flatten order: `conv1` (input layer),
  `conv2`, `fc1`, `head` (classifier).

  Attributes:
    num_classes: output units.
    width_multiplier: scales the hidden widths 20, 50 and 500.
    dtype: compute dtype; params stay float32, logits are returned in float32.
  """
  num_classes: int
  width_multiplier: float = 1.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool = True):
    del train  # No BatchNorm or dropout.
    check_nhwc(x, "lenet5")
    x = jnp.asarray(x, self.dtype)
    for name, width in (("conv1", 20), ("conv2", 50)):
      x = nn.Conv(scale_width(width, self.width_multiplier), (5, 5),
                  padding="VALID", dtype=self.dtype, name=name)(x)
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    x = nn.Dense(scale_width(500, self.width_multiplier), dtype=self.dtype,
                 name="fc1")(x)
    x = nn.relu(x)
    x = nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x)
    return jnp.asarray(x, jnp.float32)
