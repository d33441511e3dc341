"""Small shared pieces for the models: width scaling, initialisers, conv and BN.

Kept in one place so every model uses the same BatchNorm settings (momentum 0.9,
eps 1e-5, statistics in the `batch_stats` collection) and the same rounding rule
for the width multiplier (the Small-Dense baseline depends on it).
"""

import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

Dtype = Any

# He initialisation, fan-out normal: the usual choice for ReLU conv nets with BN
# (as in torchvision's ResNets); flax's default (LeCun fan-in) is meant for
# linear/tanh units.
he_normal_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def scale_width(width: int, multiplier: float) -> int:
  """Scales a hidden width, truncating to an int, at least 1.

  Truncation, as the report's PyTorch code does for Small-Dense
  (`int(c * sqrt(density))`, rigl-reproducibility `models/wide_resnet.py` l.40,
  `models/resnet.py` l.178), so Small-Dense models have the same widths there and
  here. The small epsilon keeps exact products (0.5 * 300) from truncating down
  through float error.
  """
  if multiplier <= 0:
    raise ValueError(f"width_multiplier must be > 0, got {multiplier}")
  return max(1, int(math.floor(width * multiplier + 1e-9)))


def same_padding(kernel_size: int) -> tuple[tuple[int, int], tuple[int, int]]:
  """Symmetric explicit padding `(k - 1) // 2` on each side.

  This is the "fixed padding" of the TF reference ResNets and torchvision: the
  output size depends only on the kernel size and stride, and for stride 2 on
  even inputs it pads symmetrically (XLA's 'SAME' would pad only at the end).
  """
  p = (kernel_size - 1) // 2
  return ((p, p), (p, p))


def conv(features: int, kernel_size: int, *, strides: int = 1,
         groups: int = 1, dtype: Dtype = jnp.float32, name: str) -> nn.Conv:
  """A bias-free conv (always followed by BN here) with He fan-out init."""
  return nn.Conv(
      features=features,
      kernel_size=(kernel_size, kernel_size),
      strides=(strides, strides),
      padding=same_padding(kernel_size),
      feature_group_count=groups,
      use_bias=False,
      kernel_init=he_normal_fan_out,
      dtype=dtype,
      name=name)


def batch_norm(*, train: bool, dtype: Dtype = jnp.float32, name: str,
               zero_scale: bool = False) -> nn.BatchNorm:
  """BatchNorm with the project's fixed settings.

  Args:
    train: use batch statistics and update the running averages (the caller
      must then pass `mutable=['batch_stats']`); otherwise use running averages.
    dtype: compute dtype; flax keeps the statistics in float32 regardless.
    name: submodule name.
    zero_scale: initialise the scale to 0 (last BN of a residual branch, so
      each block starts as the identity).
  """
  return nn.BatchNorm(
      use_running_average=not train,
      momentum=0.9,
      epsilon=1e-5,
      dtype=dtype,
      scale_init=nn.initializers.zeros if zero_scale else nn.initializers.ones,
      name=name)


def check_nhwc(x: jnp.ndarray, model: str) -> None:
  """Conv models need NHWC input; fail with a clear message otherwise."""
  if x.ndim != 4:
    raise ValueError(
        f"{model} expects NHWC input of rank 4, got shape {tuple(x.shape)}")

