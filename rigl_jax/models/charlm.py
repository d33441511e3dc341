"""Character-level language models: a GRU (the RigL paper's section 4.3) and a small
causal Transformer.

Both take int byte ids ``[batch, length]`` (any numeric dtype; cast to int32) and
return float32 logits ``[batch, length, vocab]`` for the next byte at every
position. Every matrix is a 2-D ``kernel`` (or the embedding table), so the
sparse-training transform masks the GRU's input and recurrent matrices, the
readout and the attention and MLP projections like any dense layer; the
configs keep the embeddings dense (``dense_layers``).

The GRU follows the RigL paper's description: a byte embedding of width 128
shared with the output (the logits are the readout's 128 features times the
embedding table), a GRU with 512 units, and a readout of two linear layers of
256 and 128 units. The ReLU between the two readout layers is rigl_jax's choice.

FLOPs: ``rigl_jax.flops`` traces every ``nn.Dense`` call; the products that are
not ``nn.Dense`` calls are given by :meth:`extra_layer_costs`: the recurrent
matrix applied at every step, the shared embedding's output product, and the
attention scores and weighted sums (dense, whatever the sparsity).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from rigl_jax.layer_cost import LayerCost
from rigl_jax.models.layers import scale_width


class GRURecurrence(nn.Module):
  """The recurrent half of a GRU: ``h_t`` from the precomputed input projections
  ``x_proj [batch, length, 3 * hidden]`` (reset, update, candidate) and
  ``h_{t-1} @ kernel [hidden, 3 * hidden] + bias``, scanned over the sequence."""
  hidden: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_proj):
    kernel = self.param("kernel", nn.initializers.orthogonal(column_axis=-1),
                        (self.hidden, 3 * self.hidden))
    bias = self.param("bias", nn.initializers.zeros, (3 * self.hidden,))
    kernel, bias = kernel.astype(self.dtype), bias.astype(self.dtype)

    def step(h, x_t):
      x_r, x_z, x_n = jnp.split(x_t, 3, axis=-1)
      h_r, h_z, h_n = jnp.split(h @ kernel + bias, 3, axis=-1)
      r = jax.nn.sigmoid(x_r + h_r)
      z = jax.nn.sigmoid(x_z + h_z)
      n = jnp.tanh(x_n + r * h_n)
      h = (1.0 - z) * n + z * h
      return h, h

    h0 = jnp.zeros((x_proj.shape[0], self.hidden), self.dtype)
    _, hs = jax.lax.scan(step, h0, jnp.swapaxes(x_proj.astype(self.dtype), 0, 1))
    return jnp.swapaxes(hs, 0, 1)


def _product_cost(path: str, fan_in: int, outputs: int, kernel_shape, has_bias: bool):
  return LayerCost(path=path, kind="dense", kernel_shape=tuple(kernel_shape),
                   input_shape=(), output_shape=(outputs,), feature_group_count=1,
                   has_bias=has_bias, fan_in=int(fan_in), outputs_per_example=int(outputs))


class CharGRU(nn.Module):
  """Byte embedding (shared with the output) -> GRU -> readout -> logits."""
  num_classes: int = 256       # the byte vocabulary
  embed_dim: int = 128
  hidden: int = 512
  readout: tuple[int, ...] = (256, 128)
  width_multiplier: float = 1.0  # Small-Dense: scales the GRU and the first readout layer
  dtype: Any = jnp.float32

  def _hidden(self) -> int:
    return scale_width(self.hidden, self.width_multiplier)

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    embed = nn.Embed(self.num_classes, self.embed_dim, name="embed")
    h = embed(x.astype(jnp.int32)).astype(self.dtype)
    hidden = self._hidden()
    h = nn.Dense(3 * hidden, dtype=self.dtype, name="gru_input")(h)
    h = GRURecurrence(hidden, dtype=self.dtype, name="gru_recurrent")(h)
    widths = [scale_width(w, self.width_multiplier) for w in self.readout[:-1]]
    for i, width in enumerate(widths):
      h = nn.relu(nn.Dense(width, dtype=self.dtype, name=f"readout_{i}")(h))
    # The last readout layer has the embedding's width: its output meets the table.
    h = nn.Dense(self.embed_dim, dtype=self.dtype, name=f"readout_{len(widths)}")(h)
    return embed.attend(h.astype(jnp.float32)).astype(jnp.float32)

  def extra_layer_costs(self, input_shape) -> list:
    """The recurrent matrix at every step and the output product with the embedding."""
    length, hidden = int(input_shape[0]), self._hidden()
    return [
        _product_cost("gru_recurrent/kernel", hidden, length * 3 * hidden,
                      (hidden, 3 * hidden), True),
        _product_cost("embed/embedding", self.embed_dim, length * self.num_classes,
                      (self.num_classes, self.embed_dim), False),
    ]


class CausalSelfAttention(nn.Module):
  num_heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    batch, length, width = x.shape
    head = width // self.num_heads
    qkv = nn.Dense(3 * width, dtype=self.dtype, name="qkv")(x)
    q, k, v = (t.reshape(batch, length, self.num_heads, head)
               for t in jnp.split(qkv, 3, axis=-1))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(head).astype(self.dtype)
    causal = jnp.tril(jnp.ones((length, length), bool))
    scores = jnp.where(causal, scores.astype(jnp.float32), -1e9)
    weights = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, length, width)
    return nn.Dense(width, dtype=self.dtype, name="out")(out)


class CharTransformer(nn.Module):
  """Pre-LayerNorm causal Transformer over bytes with learned positions."""
  num_classes: int = 256
  width: int = 128
  depth: int = 2
  num_heads: int = 4
  mlp_ratio: int = 4
  width_multiplier: float = 1.0  # Small-Dense: scales the width (whole heads kept)
  dtype: Any = jnp.float32

  def _width(self) -> int:
    per_head = max(1, scale_width(self.width, self.width_multiplier) // self.num_heads)
    return per_head * self.num_heads

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    width = self._width()
    tokens = x.astype(jnp.int32)
    h = nn.Embed(self.num_classes, width, name="embed")(tokens)
    positions = self.param("pos_embed", nn.initializers.normal(0.02), (tokens.shape[1], width))
    h = (h + positions).astype(self.dtype)
    for i in range(self.depth):
      h = h + CausalSelfAttention(self.num_heads, dtype=self.dtype, name=f"block{i}_attn")(
          nn.LayerNorm(dtype=self.dtype, name=f"block{i}_ln1")(h))
      y = nn.LayerNorm(dtype=self.dtype, name=f"block{i}_ln2")(h)
      y = nn.gelu(nn.Dense(self.mlp_ratio * width, dtype=self.dtype, name=f"block{i}_mlp1")(y))
      h = h + nn.Dense(width, dtype=self.dtype, name=f"block{i}_mlp2")(y)
    h = nn.LayerNorm(dtype=self.dtype, name="ln_final")(h)
    return nn.Dense(self.num_classes, dtype=self.dtype, name="head")(h).astype(jnp.float32)

  def extra_layer_costs(self, input_shape) -> list:
    """Attention scores (q.k over the head width) and weighted sums (over the
    positions) of every block: parameter-free, so always dense. Counted over the
    full length x length square, as computed (the causal mask halves the useful part)."""
    length, width = int(input_shape[0]), self._width()
    head = width // self.num_heads
    costs = []
    for i in range(self.depth):
      costs.append(_product_cost(f"block{i}_attn/scores", head,
                                 self.num_heads * length * length, (head, length), False))
      costs.append(_product_cost(f"block{i}_attn/weighted_sum", length, length * width,
                                 (length, width), False))
    return costs


def char_gru(*, num_classes, width_multiplier, dtype):
  """The RigL paper's WikiText-103 model (section 4.3)."""
  return CharGRU(num_classes=num_classes, width_multiplier=width_multiplier, dtype=dtype)


def char_gru_small(*, num_classes, width_multiplier, dtype):
  """A CPU-scale GRU of the same shape: embedding 64, 256 units, readout 128 and 64."""
  return CharGRU(num_classes=num_classes, embed_dim=64, hidden=256, readout=(128, 64),
                 width_multiplier=width_multiplier, dtype=dtype)


def char_transformer_small(*, num_classes, width_multiplier, dtype):
  """A CPU-scale causal Transformer: width 128, 2 blocks, 4 heads, MLP 512."""
  return CharTransformer(num_classes=num_classes, width_multiplier=width_multiplier,
                         dtype=dtype)
