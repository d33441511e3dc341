"""Flax (linen) models and a name -> model registry.

Every model is called as `model.apply(variables, x, train=bool, mutable=[...])`
with NHWC float input (the MLP flattens any input) and returns float32 logits.
BatchNorm statistics live in the `batch_stats` collection, so a training call
needs `mutable=['batch_stats']`. Naming rule the sparse-training core relies
on: the input layer's kernel is the first `kernel` leaf of
`jax.tree_util.tree_flatten_with_path(params)` (dict keys sorted), and the
classifier is the submodule `head`.

Example:
  model = get_model("wrn_22_2", num_classes=10)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)),
                         train=False)
  logits, updates = model.apply(variables, images, train=True,
                                mutable=["batch_stats"])
"""

from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp

from rigl_jax.models.layers import scale_width
from rigl_jax.models.lenet5 import LeNet5
from rigl_jax.models.mlp import LeNet300100
from rigl_jax.models.mobilenet import MobileNetV1
from rigl_jax.models.resnet import (BottleneckBlock, ResNet, resnet50_cifar,
                                    resnet50_imagenet)
from rigl_jax.models.wide_resnet import WideResNet, WideResNetBlock


def _wrn_22_2(*, num_classes, width_multiplier, dtype):
  return WideResNet(depth=22, width=2, num_classes=num_classes,
                    width_multiplier=width_multiplier, dtype=dtype)


# Builders take (num_classes, width_multiplier, dtype) as keywords.
_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "lenet_300_100": LeNet300100,
    "lenet5": LeNet5,
    "wrn_22_2": _wrn_22_2,
    "resnet50_cifar": resnet50_cifar,
    "resnet50_imagenet": resnet50_imagenet,
    "mobilenet_v1": MobileNetV1,
}

MODEL_NAMES: tuple[str, ...] = tuple(_BUILDERS)


def get_model(name: str, *, num_classes: int, width_multiplier: float = 1.0,
              dtype: Any = jnp.float32) -> nn.Module:
  """Returns the model called `name` (one of `MODEL_NAMES`).

  Args:
    name: the config's `model` field.
    num_classes: size of the classifier output.
    width_multiplier: scales every hidden width (rounded to the nearest int,
      at least 1); input and output sizes are unchanged. Small-Dense uses
      `sqrt(1 - sparsity)`.
    dtype: compute dtype; parameters stay float32.

  Raises:
    ValueError: unknown `name`, or a non-positive `width_multiplier`.
  """
  if name not in _BUILDERS:
    raise ValueError(f"Unknown model {name!r} in config field `model`; "
                     f"allowed: {', '.join(MODEL_NAMES)}")
  if not width_multiplier > 0:
    raise ValueError(f"width_multiplier must be > 0, got {width_multiplier}")
  return _BUILDERS[name](num_classes=num_classes,
                         width_multiplier=width_multiplier, dtype=dtype)


__all__ = [
    "MODEL_NAMES", "get_model", "scale_width", "LeNet300100", "LeNet5",
    "WideResNet", "WideResNetBlock", "ResNet", "BottleneckBlock",
    "resnet50_cifar", "resnet50_imagenet", "MobileNetV1",
]
