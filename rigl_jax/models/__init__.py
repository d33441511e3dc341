"""Flax (linen) models and a name -> model registry.

Every model is called as `model.apply(variables, x, train=bool, mutable=[...])`
with NHWC float input (the MLP flattens any input) and returns float32 logits;
the language models (`LANGUAGE_MODELS`) take byte ids `[batch, length]` and return
logits `[batch, length, 256]`.
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
                                mutable=["batch_stats"],
                                rngs={"dropout": jax.random.key(1)})
"""

from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp

from rigl_jax.models.charlm import (CharGRU, CharTransformer, char_gru, char_gru_small,
                                    char_transformer_small)
from rigl_jax.models.layers import scale_width
from rigl_jax.models.lenet5 import LeNet5
from rigl_jax.models.mlp import LeNet300100
from rigl_jax.models.mobilenet import MobileNetV1
from rigl_jax.models.resnet import (BottleneckBlock, ResNet, resnet50_cifar,
                                    resnet50_imagenet)
from rigl_jax.models.wide_resnet import WideResNet, WideResNetBlock


def _wrn_22_2(*, num_classes, width_multiplier, dtype, dropout_rate=0.3):
  return WideResNet(depth=22, width=2, num_classes=num_classes,
                    width_multiplier=width_multiplier, dropout_rate=dropout_rate,
                    dtype=dtype)


# Builders take (num_classes, width_multiplier, dtype) as keywords, and
# dropout_rate where the model has dropout (DROPOUT_MODELS).
_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "lenet_300_100": LeNet300100,
    "lenet5": LeNet5,
    "wrn_22_2": _wrn_22_2,
    "resnet50_cifar": resnet50_cifar,
    "resnet50_imagenet": resnet50_imagenet,
    "mobilenet_v1": MobileNetV1,
    # Character-level language models (byte ids in, next-byte logits out).
    "char_gru": char_gru,
    "char_gru_small": char_gru_small,
    "char_transformer_small": char_transformer_small,
}

MODEL_NAMES: tuple[str, ...] = tuple(_BUILDERS)
LANGUAGE_MODELS = ("char_gru", "char_gru_small", "char_transformer_small")
# Models with dropout, and their reference rate (the default of `get_model`).
DROPOUT_MODELS: dict[str, float] = {"wrn_22_2": 0.3}


def get_model(name: str, *, num_classes: int, width_multiplier: float = 1.0,
              dtype: Any = jnp.float32, dropout_rate: float | None = None) -> nn.Module:
  """Returns the model called `name` (one of `MODEL_NAMES`).

  Args:
    name: the config's `model` field.
    num_classes: size of the classifier output.
    width_multiplier: scales every hidden width (truncated to an int, at
      least 1); input and output sizes are unchanged. Small-Dense uses
      `sqrt(1 - sparsity)`.
    dtype: compute dtype; parameters stay float32.
    dropout_rate: None for the model's reference rate (`DROPOUT_MODELS`, 0 for
      models without dropout); a rate > 0 only for models in `DROPOUT_MODELS`.

  Raises:
    ValueError: unknown `name`, a non-positive `width_multiplier`, or a
      dropout rate outside [0, 1) or for a model without dropout.
  """
  if name not in _BUILDERS:
    raise ValueError(f"Unknown model {name!r} in config field `model`; "
                     f"allowed: {', '.join(MODEL_NAMES)}")
  if not width_multiplier > 0:
    raise ValueError(f"width_multiplier must be > 0, got {width_multiplier}")
  kwargs = dict(num_classes=num_classes, width_multiplier=width_multiplier, dtype=dtype)
  if dropout_rate is not None:
    if not 0.0 <= dropout_rate < 1.0:
      raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate}")
    if name in DROPOUT_MODELS:
      kwargs["dropout_rate"] = dropout_rate
    elif dropout_rate > 0:
      raise ValueError(f"model {name!r} has no dropout; dropout_rate > 0 is allowed for "
                       f"{', '.join(DROPOUT_MODELS)}")
  return _BUILDERS[name](**kwargs)


__all__ = [
    "MODEL_NAMES", "DROPOUT_MODELS", "get_model", "scale_width", "LeNet300100", "LeNet5",
    "WideResNet", "WideResNetBlock", "ResNet", "BottleneckBlock",
    "resnet50_cifar", "resnet50_imagenet", "MobileNetV1", "LANGUAGE_MODELS", "CharGRU",
    "CharTransformer",
]
