"""Wide ResNet (Zagoruyko & Komodakis 2016) for CIFAR, pre-activation blocks.

WRN-22-2 is the report's CIFAR-10 model: a 3x3 stem conv with 16 channels, three
groups of 3 blocks with 32/64/128 channels (strides 1/2/2), a final BN-ReLU,
global average pooling and a dense 128 -> classes layer, with dropout 0.3 between
the two convs of every block, as in both references: the authors' TF code
(google-research/rigl `rigl/cifar_resnet/resnet_model.py` l.41 `droprate=0.3`,
l.226) and the report's PyTorch code (rigl-reproducibility `models/__init__.py`
l.6 registry `wrn-22-2`, `models/wide_resnet.py` l.169-170).
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from rigl_jax.models.layers import batch_norm, check_nhwc, conv, scale_width


class WideResNetBlock(nn.Module):
  """Pre-activation basic block: BN-ReLU-conv3x3-BN-ReLU-dropout-conv3x3 + shortcut.

  The shortcut is the identity, or a 1x1 conv (`shortcut`) where the width or
  the resolution changes. The projection reads the pre-activated input, as in
  the original WRN code, so the first BN-ReLU is shared by both paths.
  """
  features: int
  strides: int = 1
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    preact = nn.relu(batch_norm(train=train, dtype=self.dtype, name="bn1")(x))
    if x.shape[-1] != self.features or self.strides != 1:
      shortcut = conv(self.features, 1, strides=self.strides, dtype=self.dtype,
                      name="shortcut")(preact)
    else:
      shortcut = x
    y = conv(self.features, 3, strides=self.strides, dtype=self.dtype,
             name="conv1")(preact)
    y = nn.relu(batch_norm(train=train, dtype=self.dtype, name="bn2")(y))
    # Draws from the `dropout` rng stream in training (the trainer folds the step
    # into it, so a resumed run draws the same masks); the identity at evaluation.
    y = nn.Dropout(self.dropout_rate, deterministic=not train)(y)
    y = conv(self.features, 3, dtype=self.dtype, name="conv2")(y)
    return y + shortcut


class WideResNet(nn.Module):
  """WRN-`depth`-`width` for 32x32 inputs.

  `depth = 6 * blocks_per_group + 4`; group widths are 16*width, 32*width,
  64*width after a 16-channel stem. Parameter paths, in flatten order:
  `conv_stem` (input layer, first kernel), `group{g}_block{b}/...` (g, b from
  1), `bn_final`, `head` (classifier).

  Attributes:
    depth: total depth, 6n + 4 (22 for WRN-22-2).
    width: widening factor k (2 for WRN-22-2).
    num_classes: output units.
    width_multiplier: scales every hidden width (stem and groups).
    dropout_rate: dropout between the two convs of every block (0.3 in both
      references; 0 turns it off). Training calls need `rngs={"dropout": key}`.
    dtype: compute dtype; params stay float32, logits are returned in float32.
  """
  depth: int = 22
  width: int = 2
  num_classes: int = 10
  width_multiplier: float = 1.0
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool = True):
    if self.depth < 10 or (self.depth - 4) % 6:
      raise ValueError(f"WideResNet depth must be 6n + 4 (n >= 1), got "
                       f"{self.depth}")
    check_nhwc(x, "WideResNet")
    blocks_per_group = (self.depth - 4) // 6
    x = jnp.asarray(x, self.dtype)
    # The stem is followed by the first block's BN, hence no bias.
    x = conv(scale_width(16, self.width_multiplier), 3, dtype=self.dtype,
             name="conv_stem")(x)
    for g, base in enumerate((16, 32, 64)):
      features = scale_width(base * self.width, self.width_multiplier)
      for b in range(blocks_per_group):
        strides = 2 if g > 0 and b == 0 else 1
        x = WideResNetBlock(features, strides, dropout_rate=self.dropout_rate,
                            dtype=self.dtype,
                            name=f"group{g + 1}_block{b + 1}")(x, train=train)
    # Pre-activation nets need a last BN-ReLU before pooling.
    x = nn.relu(batch_norm(train=train, dtype=self.dtype, name="bn_final")(x))
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x)
    return jnp.asarray(x, jnp.float32)
