"""Mask structures: which weights must be switched on and off together.

A structure says what a layer's mask may look like:

* ``"unstructured"``: any set of weights (the RigL paper's masks).
* ``"constant_fan_in"``: every output unit (the kernel's last axis) keeps the
  same number of inputs, as in SRigL (Lasby et al. 2024). The "condensed" form
  (values and input indices per unit) then runs without padding.
* ``"N:M"`` (e.g. ``"2:4"``): in every group of M consecutive weights along the
  input-channel axis (the kernel's second-to-last), for each output and spatial
  position, exactly N are active: NVIDIA's 2:4 sparse tensor cores.
* ``"block:RxC"``: the kernel seen as a ``(fan_in, fan_out)`` matrix (every
  axis but the last flattened into ``fan_in``) is tiled by R x C blocks, each
  all on or all off.

Kernels are laid out as Flax lays them out: inputs (spatial axes, then input
channels) first, outputs last.

Every structure is handled the same way. A layer's mask is cut into *units*
(single weights, or blocks) and the units into *groups* of equal size; every
group holds the same number ``c`` of active units:

================  ===========  =====================  ==============
structure         unit         group                  c
================  ===========  =====================  ==============
unstructured      weight       the whole layer        its count
constant_fan_in   weight       one output unit        the fan-in
N:M               weight       M consecutive inputs   N
block:RxC         R x C block  the whole layer        its block count
================  ===========  =====================  ==============

A :class:`Layout` holds a leaf's structure and its stacked axes (leading axes
that index separate layers, as ``nn.scan`` / ``nnx.scan`` stack them); it turns
a leaf into units ``[layers, groups, group_size]`` and back. Methods drop and
grow on that view (:func:`drop_in_layers`, :func:`fill_groups`), so one code
path keeps every structure's counts exact.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rigl_jax import masks as masks_lib
from rigl_jax import selection
from rigl_jax.masks import ArgumentError

PyTree = Any

_HELP = ("'unstructured', 'constant_fan_in', 'N:M' with 0 < N < M (e.g. '2:4') or "
         "'block:RxC' (e.g. 'block:4x4')")


@dataclasses.dataclass(frozen=True)
class Structure:
  """A parsed structure (see the module docstring); ``str()`` gives its name back."""
  kind: str = "unstructured"   # "unstructured", "constant_fan_in", "n_of_m", "block"
  n: int = 0                   # N:M
  m: int = 0
  rows: int = 1                # block:RxC
  cols: int = 1

  def __str__(self) -> str:
    if self.kind == "n_of_m":
      return f"{self.n}:{self.m}"
    if self.kind == "block":
      return f"block:{self.rows}x{self.cols}"
    return self.kind


UNSTRUCTURED = Structure()


def parse(value, argument: str = "structure") -> Structure:
  """A :class:`Structure` from its name; ArgumentError naming ``argument`` otherwise."""
  if isinstance(value, Structure):
    return value
  text = value.strip() if isinstance(value, str) else None
  if text in ("unstructured", "constant_fan_in"):
    return Structure(text)
  if text is not None:
    n_of_m = re.fullmatch(r"(\d+):(\d+)", text)
    if n_of_m and 0 < int(n_of_m[1]) < int(n_of_m[2]):
      return Structure("n_of_m", n=int(n_of_m[1]), m=int(n_of_m[2]))
    block = re.fullmatch(r"block:(\d+)x(\d+)", text)
    if block and int(block[1]) >= 1 and int(block[2]) >= 1 and int(block[1]) * int(block[2]) > 1:
      return Structure("block", rows=int(block[1]), cols=int(block[2]))
  raise ArgumentError(argument, f"{argument} must be {_HELP}, got {value!r}.")


@dataclasses.dataclass(frozen=True)
class Layout:
  """A leaf's structure, its stacked axes and its shape: how it maps to units."""
  structure: Structure
  stack_axes: int
  shape: tuple

  @property
  def n_layers(self) -> int:
    return math.prod(self.shape[:self.stack_axes])

  @property
  def layer_shape(self) -> tuple:
    return self.shape[self.stack_axes:]

  @property
  def layer_size(self) -> int:
    return math.prod(self.layer_shape)

  @property
  def fan_in(self) -> int:
    return math.prod(self.layer_shape[:-1])

  @property
  def fan_out(self) -> int:
    return self.layer_shape[-1]

  @property
  def trivial(self) -> bool:
    """Unstructured and not stacked: the whole leaf is one layer of single weights."""
    return self.structure.kind == "unstructured" and self.stack_axes == 0

  @property
  def unit_size(self) -> int:
    s = self.structure
    return s.rows * s.cols if s.kind == "block" else 1

  def groups(self) -> tuple[int, int]:
    """(groups per layer, units per group)."""
    s = self.structure
    if s.kind == "constant_fan_in":
      return self.fan_out, self.fan_in
    if s.kind == "n_of_m":
      return self.fan_in // s.m * self.fan_out, s.m
    if s.kind == "block":
      return 1, (self.fan_in // s.rows) * (self.fan_out // s.cols)
    return 1, self.layer_size

  def group_count(self, sparsity: float) -> int:
    """Active units per group at ``sparsity`` (``round((1 - s) * group_size)``)."""
    if self.structure.kind == "n_of_m":
      return self.structure.n
    return masks_lib.num_active(self.groups()[1], sparsity)

  def layer_count(self, sparsity: float) -> int:
    """Active weights per layer (per slice of a stacked leaf)."""
    return self.group_count(sparsity) * self.groups()[0] * self.unit_size

  def to_units(self, x: jax.Array) -> jax.Array:
    """The units as ``[A, group_size, B]``: a group is a column ``[a, :, b]``.

    No transpose (XLA:CPU pays for every one): constant fan-in is the layer as
    ``[layers, fan_in, fan_out]``; N:M ``[layers * fan_in / M, M, fan_out]``;
    blocks (summed over each block) and unstructured ``[layers, units, 1]``. The
    first axis is layer-major, so ``u.reshape(n_layers, -1)`` is each layer in
    its natural (row-major) order.
    """
    s, n = self.structure, self.n_layers
    if s.kind == "constant_fan_in":
      return x.reshape(n, self.fan_in, self.fan_out)
    if s.kind == "n_of_m":
      return x.reshape(n * (self.fan_in // s.m), s.m, self.fan_out)
    if s.kind == "block":
      y = x.reshape(n, self.fan_in // s.rows, s.rows, self.fan_out // s.cols, s.cols)
      y = y.any((2, 4)) if y.dtype == jnp.bool_ else y.sum((2, 4))
      return y.reshape(n, -1, 1)
    return x.reshape(n, -1, 1)

  def from_units(self, u: jax.Array) -> jax.Array:
    """The leaf-shaped array of unit values (a block's value on each of its weights)."""
    s, n = self.structure, self.n_layers
    if s.kind == "block":
      y = u.reshape(n, self.fan_in // s.rows, 1, self.fan_out // s.cols, 1)
      y = jnp.broadcast_to(y, (n, self.fan_in // s.rows, s.rows, self.fan_out // s.cols, s.cols))
      return y.reshape(self.shape)
    return u.reshape(self.shape)

  def from_group_major(self, g: jax.Array) -> jax.Array:
    """``[layers, groups, group_size]`` (group-major, the order in which random
    masks draw their scores) laid out as :meth:`to_units` lays units out."""
    s, n = self.structure, self.n_layers
    n_groups, size = self.groups()
    if s.kind == "constant_fan_in":
      return g.transpose(0, 2, 1)
    if s.kind == "n_of_m":
      y = g.reshape(n, self.fan_in // s.m, self.fan_out, s.m).transpose(0, 1, 3, 2)
      return y.reshape(n * (self.fan_in // s.m), s.m, self.fan_out)
    return g.reshape(n, size, 1)


def check_fits(layout: Layout, path: str, argument: str = "structure") -> None:
  """ArgumentError when the layer's shape cannot hold its structure."""
  s = layout.structure
  if s.kind == "n_of_m" and layout.layer_shape[-2] % s.m:
    raise ArgumentError(argument, f"{argument}: {s} needs the input-channel axis of layer "
                        f"{path!r} (shape {layout.layer_shape}) to be divisible by {s.m}, "
                        f"got {layout.layer_shape[-2]}.")
  if s.kind == "block" and (layout.fan_in % s.rows or layout.fan_out % s.cols):
    raise ArgumentError(argument, f"{argument}: {s} needs layer {path!r} (shape "
                        f"{layout.layer_shape}, seen as {layout.fan_in} x {layout.fan_out}) "
                        f"to be tiled by {s.rows} x {s.cols} blocks.")


def layouts(params: PyTree, structure=None, stacked: Mapping[str, int] | None = None,
            *, sparse: PyTree | None = None) -> PyTree:
  """Per-leaf :class:`Layout` (same structure as ``params``).

  Args:
    params: arrays or shape structs.
    structure: a structure name, a :class:`Structure`, or ``{regex: name}``
      (first matching regex wins; unmatched leaves are unstructured).
    stacked: ``{regex: n}``: matching leaves' first ``n`` axes index layers.
    sparse: bool pytree of the leaves that will be sparse; only they are checked
      against their structure (a dense leaf needs no divisible shape).
  """
  stack = masks_lib.stacked_axes(params, stacked)
  per_leaf = structures(params, structure)
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  sparse_leaves = ([True] * len(flat) if sparse is None else treedef.flatten_up_to(sparse))
  out = []
  for (path, leaf), s, n, is_sparse in zip(flat, treedef.flatten_up_to(per_leaf),
                                           treedef.flatten_up_to(stack), sparse_leaves):
    layout = Layout(s, n, tuple(np.shape(leaf)))
    if is_sparse and s.kind != "unstructured":
      check_fits(layout, masks_lib.path_to_str(path))
    out.append(layout)
  return jax.tree.unflatten(treedef, out)


def structures(params: PyTree, structure=None) -> PyTree:
  """Per-leaf :class:`Structure` from a name or ``{regex: name}``."""
  if structure is None:
    return jax.tree.map(lambda _: UNSTRUCTURED, params)
  if isinstance(structure, Mapping):
    parsed = {pattern: parse(value, f"structure[{pattern!r}]")
              for pattern, value in structure.items()}
    for pattern in parsed:
      if not isinstance(pattern, str):
        raise ArgumentError("structure", f"structure: keys must be regex strings, got "
                            f"{pattern!r}.")
      try:
        re.compile(pattern)
      except re.error as e:
        raise ArgumentError("structure", f"structure: invalid regex {pattern!r}: {e}") from None
    masks_lib.check_patterns_match(params, list(parsed), "structure")

    def pick(path, _):
      p = masks_lib.path_to_str(path)
      return next((s for pattern, s in parsed.items() if re.search(pattern, p)), UNSTRUCTURED)

    return jax.tree_util.tree_map_with_path(pick, params)
  parsed = parse(structure)
  return jax.tree.map(lambda _: parsed, params)


def is_trivial(layout_tree: PyTree) -> bool:
  """Every leaf unstructured and unstacked (today's masks, bit for bit)."""
  return all(l.trivial for l in jax.tree.leaves(layout_tree, is_leaf=_is_layout))


def _is_layout(x) -> bool:
  return isinstance(x, Layout)


def layout_leaves(layout_tree: PyTree | None, treedef) -> list[Layout | None]:
  """Per-leaf layouts in flatten order; None for each leaf when there are none."""
  if layout_tree is None:
    return [None] * treedef.num_leaves
  return treedef.flatten_up_to(layout_tree)


# ----------------------------------------------------------------------------- masks


def random_mask(key: jax.Array, layout: Layout, sparsity: float) -> jax.Array:
  """A random mask with exactly ``group_count`` active units in every group."""
  if layout.trivial:
    return masks_lib.random_mask(key, layout.shape, masks_lib.num_active(
        math.prod(layout.shape), sparsity))
  n_groups, size = layout.groups()
  # Drawn group-major (layer, group, unit) and laid out as to_units lays it out.
  scores = layout.from_group_major(jax.random.uniform(key, (layout.n_layers, n_groups, size)))
  c = layout.group_count(sparsity)
  return layout.from_units(selection.largest_along(scores, c, c))


def random_masks(key: jax.Array, params: PyTree, sparsities: PyTree, layout_tree: PyTree) -> PyTree:
  """:func:`masks.random_masks` with structure: one stream per leaf (``fold_in(key, i)``)."""
  leaves, treedef = jax.tree.flatten(params)
  out = []
  for i, (leaf, s, layout) in enumerate(zip(leaves, treedef.flatten_up_to(sparsities),
                                            layout_leaves(layout_tree, treedef))):
    if s == 0.0:
      out.append(jnp.ones(np.shape(leaf), bool))
    else:
      out.append(random_mask(jax.random.fold_in(key, i), layout, s))
  return jax.tree.unflatten(treedef, out)


def drop_in_layers(mask_u: jax.Array, magnitude_u: jax.Array, n_drop: jax.Array,
                   max_drop: int, n_layers: int) -> jax.Array:
  """Per layer, the ``n_drop[layer]`` smallest-magnitude active units off.

  ``mask_u``/``magnitude_u``: units as :meth:`Layout.to_units` lays them out; the
  ranking is over the whole layer, across groups, ties to the lower index in the
  layer's natural order.
  """
  shape = mask_u.shape
  flat_mask = mask_u.reshape(n_layers, -1)
  scores = selection.drop_scores(flat_mask, magnitude_u.reshape(n_layers, -1))
  return (flat_mask & ~selection.largest_rows(scores, n_drop, max_drop)).reshape(shape)


def fill_groups(mask_u: jax.Array, magnitude_u: jax.Array, grow_score_u: jax.Array | None,
                target: jax.Array, max_change: int) -> jax.Array:
  """Every group (a column ``[a, :, b]`` of the units) brought to ``target`` active
  units (``target`` broadcast to ``[A, B]``).

  A group above its target drops its smallest-magnitude active units; a group
  below grows its largest-``grow_score`` inactive ones (scores >= 0; None: no
  group may fall short). At most ``max_change`` units change per group (a static
  bound). Each half runs only when some group needs it (a ``lax.cond``).
  """
  a, size, b = mask_u.shape
  count = mask_u.sum(1, dtype=jnp.int32)
  target = jnp.broadcast_to(jnp.asarray(target, jnp.int32), (a, b))
  max_change = min(int(max_change), size)
  if max_change == 0:
    return mask_u

  def drop(mask):
    scores = selection.drop_scores(mask, magnitude_u)
    return mask & ~selection.largest_along(scores, jnp.maximum(count - target, 0), max_change)

  def grow(mask):
    scores = selection.grow_scores(mask, grow_score_u)
    return mask | selection.largest_along(scores, jnp.maximum(target - count, 0), max_change)

  mask = jax.lax.cond(jnp.any(count > target), drop, lambda m: m, mask_u)
  if grow_score_u is not None:
    mask = jax.lax.cond(jnp.any(count < target), grow, lambda m: m, mask)
  return mask


def drop_and_grow(mask: jax.Array, weight: jax.Array, grow_score: jax.Array,
                  layout: Layout, sparsity: float, drop_fraction: jax.Array,
                  max_drop_fraction: float) -> jax.Array:
  """RigL's update within a structure: per layer the ``floor(f * n)`` smallest
  active units (by summed |weight|) are dropped across the layer; then each group
  regrows, from its own inactive units (the just-dropped included), the largest
  ``grow_score`` ones until it holds its count again. Counts per group never change.
  """
  n_groups, size = layout.groups()
  c = layout.group_count(sparsity)
  n_active = c * n_groups
  max_drop = min(n_active, math.ceil(max_drop_fraction * n_active))
  n_drop = jnp.floor(drop_fraction * n_active).astype(jnp.int32)
  magnitude = layout.to_units(jnp.abs(weight).astype(jnp.float32))
  mask_u = layout.to_units(mask)
  dropped = drop_in_layers(mask_u, magnitude, jnp.full((layout.n_layers,), n_drop), max_drop,
                           layout.n_layers)
  score = layout.to_units(grow_score.astype(jnp.float32))
  need = jnp.maximum(c - dropped.sum(1, dtype=jnp.int32), 0)
  grown = dropped | selection.largest_along(selection.grow_scores(dropped, score), need,
                                            min(c, max_drop))
  return layout.from_units(grown)


def describe(mask: np.ndarray, structure, stack_axes: int = 0) -> dict | None:
  """What a finished mask holds under ``structure``, checked: ``{"structure": name,
  "group_count": c, "active_groups": g}`` when every group holds ``c`` or 0 active
  units (SRigL's ablated neurons hold 0), None when the mask does not keep it."""
  layout = Layout(parse(structure), stack_axes, tuple(np.shape(mask)))
  if layout.structure.kind == "unstructured":
    return {"structure": "unstructured"}
  try:
    check_fits(layout, "")
  except ArgumentError:
    return None
  units = np.asarray(layout.to_units(jnp.asarray(mask)))
  if layout.structure.kind == "block":
    whole = np.asarray(layout.to_units(jnp.asarray(mask).astype(jnp.int32)))
    if not np.isin(whole, (0, layout.unit_size)).all():
      return None  # a block partly on
  counts = units.sum(1)
  held = np.unique(counts[counts > 0])
  if held.size > 1:
    return None
  return {"structure": str(layout.structure), "group_count": int(held[0]) if held.size else 0,
          "active_groups": int((counts > 0).sum())}
