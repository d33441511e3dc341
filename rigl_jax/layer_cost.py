"""The cost record of one conv or dense layer: what its FLOP count depends on.

Its own small module (dataclasses only), so that a model can describe layers the
FLOP counter cannot trace (the char-LM's GRU products) without importing
``rigl_jax.flops``, which imports the config and the models in turn.
"""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class LayerCost:
  """One traced conv or dense call and what its FLOP count depends on.

  Attributes:
    path: '/'-joined key path of the kernel in ``variables["params"]``, e.g.
      ``"Dense_0/kernel"``; the same string a mask pytree's leaf has.
    kind: ``"conv"`` or ``"dense"``.
    kernel_shape: shape of the kernel (Flax layout: spatial..., c_in/groups, c_out).
    input_shape: per-example input shape (batch axis removed).
    output_shape: per-example output shape (batch axis removed).
    feature_group_count: conv groups (``c_in`` for a depthwise conv); 1 for dense.
    has_bias: whether the layer adds a bias (one add per output).
    fan_in: length of each output's dot product at density 1,
      ``prod(kernel_shape[:-1])`` = ``k*k*c_in/groups`` for a conv.
    outputs_per_example: number of output elements per example, e.g.
      ``H_out*W_out*c_out``.
  """
  path: str
  kind: str
  kernel_shape: tuple[int, ...]
  input_shape: tuple[int, ...]
  output_shape: tuple[int, ...]
  feature_group_count: int
  has_bias: bool
  fan_in: int
  outputs_per_example: int

  @property
  def num_params(self) -> int:
    """Number of kernel weights (bias excluded)."""
    return math.prod(self.kernel_shape)
