"""ResNet-50 (bottleneck, "v1.5": stride on the 3x3 conv) for CIFAR and ImageNet.

The CIFAR variant is the report's CIFAR-100 model: one 3x3 stem conv with 64
channels and no max-pool. The ImageNet variant has the standard 7x7 stride-2
stem and a 3x3 stride-2 max-pool. Both use [3, 4, 6, 3] bottleneck blocks
(the paper's stages conv2_x..conv5_x, here `group1`..`group4`), stride 2 in the
first block of groups 2-4, the last BN scale of every block initialised to 0,
global average pooling and a dense 2048 -> classes layer.
"""

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from rigl_jax.models.layers import batch_norm, check_nhwc, conv, scale_width

STEMS = ("cifar", "imagenet")


class BottleneckBlock(nn.Module):
  """conv1x1-BN-ReLU, conv3x3(stride)-BN-ReLU, conv1x1-BN(scale 0), + shortcut.

  The shortcut is the identity, or a strided 1x1 conv + BN (`shortcut_conv`,
  `shortcut_bn`) where the width or the resolution changes. The last BN's
  scale starts at 0 so each block starts as the identity (Goyal et al. 2017).
  """
  features: int      # width of the 1x1 and 3x3 convs
  out_features: int  # width of the expanding 1x1 conv (4x features)
  strides: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    y = conv(self.features, 1, dtype=self.dtype, name="conv1")(x)
    y = nn.relu(batch_norm(train=train, dtype=self.dtype, name="bn1")(y))
    y = conv(self.features, 3, strides=self.strides, dtype=self.dtype,
             name="conv2")(y)
    y = nn.relu(batch_norm(train=train, dtype=self.dtype, name="bn2")(y))
    y = conv(self.out_features, 1, dtype=self.dtype, name="conv3")(y)
    y = batch_norm(train=train, dtype=self.dtype, name="bn3",
                   zero_scale=True)(y)
    if x.shape[-1] != self.out_features or self.strides != 1:
      shortcut = conv(self.out_features, 1, strides=self.strides,
                      dtype=self.dtype, name="shortcut_conv")(x)
      shortcut = batch_norm(train=train, dtype=self.dtype,
                            name="shortcut_bn")(shortcut)
    else:
      shortcut = x
    return nn.relu(y + shortcut)


class ResNet(nn.Module):
  """Bottleneck ResNet. Parameter paths, in flatten order: `bn_stem`,
  `conv_stem` (input layer, first kernel), `group{g}_block{b}/...` (g, b from
  1), `head` (classifier).

  Attributes:
    stage_sizes: blocks per group, (3, 4, 6, 3) for ResNet-50.
    num_classes: output units.
    stem: "cifar" (3x3 conv, no pooling) or "imagenet" (7x7/2 conv, 3x3/2
      max-pool).
    width_multiplier: scales every hidden width (stem and blocks).
    dtype: compute dtype; params stay float32, logits are returned in float32.
  """
  stage_sizes: Sequence[int]
  num_classes: int
  stem: str = "cifar"
  width_multiplier: float = 1.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool = True):
    if self.stem not in STEMS:
      raise ValueError(f"stem must be one of {STEMS}, got {self.stem!r}")
    check_nhwc(x, "ResNet")
    x = jnp.asarray(x, self.dtype)
    stem_width = scale_width(64, self.width_multiplier)
    if self.stem == "cifar":
      x = conv(stem_width, 3, dtype=self.dtype, name="conv_stem")(x)
    else:
      x = conv(stem_width, 7, strides=2, dtype=self.dtype, name="conv_stem")(x)
    x = nn.relu(batch_norm(train=train, dtype=self.dtype, name="bn_stem")(x))
    if self.stem == "imagenet":
      # Padding with -inf (what max_pool pads with) keeps the max unbiased.
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for g, num_blocks in enumerate(self.stage_sizes):
      base = 64 * 2 ** g
      for b in range(num_blocks):
        strides = 2 if g > 0 and b == 0 else 1
        x = BottleneckBlock(
            features=scale_width(base, self.width_multiplier),
            # The expansion of 4 applies to the truncated width, as the report's
            # PyTorch code does (int(base * s) * 4): 80/160/320/644 at 90%.
            out_features=4 * scale_width(base, self.width_multiplier),
            strides=strides, dtype=self.dtype,
            name=f"group{g + 1}_block{b + 1}")(x, train=train)
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x)
    return jnp.asarray(x, jnp.float32)


RESNET50_STAGES = (3, 4, 6, 3)


def resnet50_cifar(*, num_classes: int, width_multiplier: float = 1.0,
                   dtype: Any = jnp.float32) -> ResNet:
  """ResNet-50 with the CIFAR stem (3x3 conv, no max-pool)."""
  return ResNet(RESNET50_STAGES, num_classes, stem="cifar",
                width_multiplier=width_multiplier, dtype=dtype)


def resnet50_imagenet(*, num_classes: int, width_multiplier: float = 1.0,
                      dtype: Any = jnp.float32) -> ResNet:
  """ResNet-50 with the ImageNet stem (7x7/2 conv, 3x3/2 max-pool)."""
  return ResNet(RESNET50_STAGES, num_classes, stem="imagenet",
                width_multiplier=width_multiplier, dtype=dtype)
