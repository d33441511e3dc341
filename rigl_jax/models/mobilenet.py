"""MobileNet v1 (Howard et al. 2017), as used in the RigL paper on ImageNet.

Standard layout: 3x3/2 conv with 32 channels, 13 depthwise-separable blocks,
global average pooling, dense 1024 -> classes. Every conv is followed by BN and
ReLU (the paper's and the RigL authors' choice, not ReLU6); no dropout.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from rigl_jax.models.layers import batch_norm, check_nhwc, conv, scale_width

# (pointwise output channels, depthwise stride) of the 13 blocks.
BLOCKS = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
          (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2),
          (1024, 1))


class DepthwiseSeparableBlock(nn.Module):
  """Depthwise 3x3 (`dw_conv`, kernel (3, 3, 1, C)) - BN - ReLU, then
  pointwise 1x1 (`pw_conv`) - BN - ReLU."""
  features: int
  strides: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    channels = x.shape[-1]
    x = conv(channels, 3, strides=self.strides, groups=channels,
             dtype=self.dtype, name="dw_conv")(x)
    x = nn.relu(batch_norm(train=train, dtype=self.dtype, name="dw_bn")(x))
    x = conv(self.features, 1, dtype=self.dtype, name="pw_conv")(x)
    return nn.relu(batch_norm(train=train, dtype=self.dtype, name="pw_bn")(x))


class MobileNetV1(nn.Module):
  """MobileNet v1; `width_multiplier` is the paper's alpha.

  Parameter paths, in flatten order: `bn_stem`, `conv_stem` (input layer,
  first kernel), `dwsep_block01`..`dwsep_block13` (each with `dw_conv`,
  `pw_conv`), `head` (classifier). Depthwise kernels are 4-D like any conv
  kernel; find them by the `dw_conv` name if they should be kept dense.

  Attributes:
    num_classes: output units.
    width_multiplier: alpha, scales every hidden width.
    dtype: compute dtype; params stay float32, logits are returned in float32.
  """
  num_classes: int
  width_multiplier: float = 1.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool = True):
    check_nhwc(x, "MobileNetV1")
    x = jnp.asarray(x, self.dtype)
    x = conv(scale_width(32, self.width_multiplier), 3, strides=2,
             dtype=self.dtype, name="conv_stem")(x)
    x = nn.relu(batch_norm(train=train, dtype=self.dtype, name="bn_stem")(x))
    for i, (features, strides) in enumerate(BLOCKS):
      # Zero-padded index so that the flatten order is the forward order.
      x = DepthwiseSeparableBlock(
          scale_width(features, self.width_multiplier), strides,
          dtype=self.dtype, name=f"dwsep_block{i + 1:02d}")(x, train=train)
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x)
    return jnp.asarray(x, jnp.float32)
