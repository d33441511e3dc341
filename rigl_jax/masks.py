"""Masks: which parameters are sparse, exact-count random masks, and statistics.

A mask pytree has the same structure as the params. Every leaf is a bool array of
the leaf's shape; a dense leaf has an all-True mask (never ``None``), so masks
compose with ``jax.tree.map`` against params and any optimizer state that mirrors
them.
"""

from __future__ import annotations

import numbers
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

PyTree = Any
# A layer selector: a regex (searched in the leaf's path, e.g. "Dense_0/kernel"),
# a sequence of regexes, or a predicate ``fn(path, leaf) -> bool``.
Selector = str | Sequence[str] | Callable[[str, Any], bool] | None


def path_to_str(path) -> str:
  """'/'-joined key path of a leaf, e.g. ``('Dense_0', 'kernel') -> 'Dense_0/kernel'``."""
  parts = []
  for entry in path:
    if isinstance(entry, jax.tree_util.DictKey):
      parts.append(str(entry.key))
    elif isinstance(entry, jax.tree_util.GetAttrKey):
      parts.append(entry.name)
    elif isinstance(entry, jax.tree_util.SequenceKey):
      parts.append(str(entry.idx))
    else:
      parts.append(str(entry))
  return "/".join(parts)


def leaf_paths(tree: PyTree) -> PyTree:
  """A pytree of the same structure whose leaves are their own path strings."""
  return jax.tree_util.tree_map_with_path(lambda p, _: path_to_str(p), tree)


def is_kernel_shape(layer_shape) -> bool:
  """A layer's weights form a kernel when at least two axes are longer than 1: a
  dense or conv kernel. Biases, norm scales and Equinox's ``(C, 1, 1)`` conv biases
  are not kernels, and are never sparse."""
  return sum(int(d) > 1 for d in layer_shape) >= 2


def default_is_sparsifiable(path: str, leaf) -> bool:
  """Conv and dense kernels (:func:`is_kernel_shape`) are sparse; biases and norm
  params are not. (For stacked leaves :func:`sparsifiable` looks at one layer.)"""
  del path
  return is_kernel_shape(np.shape(leaf))


def is_floating(leaf) -> bool:
  """Only floating-point leaves can be sparse (an integer or bool leaf is no weight)."""
  dtype = getattr(leaf, "dtype", None)
  if dtype is None:
    dtype = np.result_type(leaf)
  return bool(jnp.issubdtype(dtype, jnp.floating))


class ArgumentError(ValueError):
  """A bad argument of the core's public functions; ``argument`` names it (``"dense"``,
  ``"custom"``, ``"sparsity"``, ``"params"``, ...), so that a caller can report it
  against its own setting without parsing the message."""

  def __init__(self, argument: str, message: str):
    super().__init__(message)
    self.argument = argument


def _compile_selector(selector: Selector, name: str) -> Callable[[str, Any], bool] | None:
  """Turns a selector into a predicate; validates regexes with a clear error."""
  if selector is None:
    return None
  if callable(selector):
    return selector
  patterns = [selector] if isinstance(selector, str) else list(selector)
  compiled = []
  for pattern in patterns:
    if not isinstance(pattern, str):
      raise ArgumentError(name, f"{name}: expected a regex string, a list of them or a "
                       f"predicate fn(path, leaf), got {pattern!r}.")
    try:
      compiled.append(re.compile(pattern))
    except re.error as e:
      raise ArgumentError(name, f"{name}: invalid regex {pattern!r}: {e}") from None
  return lambda path, leaf: any(c.search(path) for c in compiled)


def selector_patterns(selector: Selector) -> list[str]:
  """The regexes of a selector (empty for None or a predicate)."""
  if selector is None or callable(selector):
    return []
  return [selector] if isinstance(selector, str) else list(selector)


def check_patterns_match(tree: PyTree, patterns: Sequence[str], name: str) -> None:
  """Raises ValueError if a regex matches no leaf path: a typo must not pass silently."""
  paths = jax.tree.leaves(leaf_paths(tree))
  for pattern in patterns:
    if not any(re.search(pattern, p) for p in paths):
      shown = ", ".join(paths[:8]) + (", ..." if len(paths) > 8 else "")
      raise ArgumentError(name, f"{name}: pattern {pattern!r} matches no parameter. "
                       f"Parameter paths look like: {shown}")


def stacked_axes(params: PyTree, stacked=None) -> PyTree:
  """Per-leaf number of leading axes that index separate layers (0 when not stacked).

  ``stacked``: ``{regex: n}``, e.g. ``{"layers/": 1}`` for ``nn.scan`` /
  ``nnx.scan`` params of shape ``(L, ...)``; the first matching regex wins.
  """
  if not stacked:
    return jax.tree.map(lambda _: 0, params)
  if not isinstance(stacked, Mapping):
    raise ArgumentError("stacked", f"stacked must be a dict {{regex: number of leading "
                        f"axes}}, got {stacked!r}.")
  for pattern, n in stacked.items():
    _compile_selector(pattern, "stacked")
    if isinstance(n, (bool, np.bool_)) or not isinstance(n, numbers.Integral) or n < 1:
      raise ArgumentError("stacked", f"stacked[{pattern!r}] must be an int >= 1 (leading "
                          f"axes that index layers), got {n!r}.")
  check_patterns_match(params, list(stacked), "stacked")

  def axes(path, leaf):
    p = path_to_str(path)
    n = next((int(v) for pattern, v in stacked.items() if re.search(pattern, p)), 0)
    if n > len(np.shape(leaf)):
      raise ArgumentError("stacked", f"stacked: {n} leading axes asked of {p!r}, which "
                          f"has shape {tuple(np.shape(leaf))}.")
    return n

  return jax.tree_util.tree_map_with_path(axes, params)


def sparsifiable(params: PyTree, *, include: Selector = None, dense: Selector = None,
                 stacked=None) -> PyTree:
  """Bool pytree: True for leaves that may be sparse.

  Args:
    params: the parameter pytree (arrays or ``jax.ShapeDtypeStruct``).
    include: which leaves may be sparse; default every kernel. Whatever it says,
      only floating-point kernels are ever sparse: a layer (one slice of a stacked
      leaf) needs two axes longer than 1 (:func:`is_kernel_shape`).
    dense: leaves forced dense, overriding ``include``.
    stacked: ``{regex: n}``, leading axes that index layers (:func:`stacked_axes`).
  """
  include_fn = _compile_selector(include, "include") or default_is_sparsifiable
  dense_fn = _compile_selector(dense, "dense") or (lambda path, leaf: False)
  stack = stacked_axes(params, stacked)

  def select(path, leaf, n_stack):
    p = path_to_str(path)
    return (is_floating(leaf) and is_kernel_shape(np.shape(leaf)[n_stack:]) and
            bool(include_fn(p, leaf)) and not bool(dense_fn(p, leaf)))

  return jax.tree_util.tree_map_with_path(select, params, stack)


def num_active(size: int, sparsity: float) -> int:
  """The exact number of ones a mask of ``size`` entries holds at ``sparsity``."""
  return int(round((1.0 - float(sparsity)) * size))


def random_mask(key: jax.Array, shape: Sequence[int], n_active: int) -> jax.Array:
  """A bool mask of ``shape`` with exactly ``n_active`` True entries, uniformly placed."""
  size = int(np.prod(shape))
  order = jax.random.permutation(key, size)
  flat = jnp.zeros((size,), bool).at[order[:n_active]].set(True)
  return flat.reshape(shape)


def random_masks(key: jax.Array, params: PyTree, sparsities: PyTree) -> PyTree:
  """Exact-count random masks, one independent stream per leaf.

  Each leaf's key is ``fold_in(key, leaf_index)`` so a mask does not depend on
  how many other leaves precede it in the draw order beyond its index.
  """
  leaves, treedef = jax.tree.flatten(params)
  sparsity_leaves = treedef.flatten_up_to(sparsities)
  masks = []
  for i, (leaf, s) in enumerate(zip(leaves, sparsity_leaves)):
    shape = np.shape(leaf)
    size = int(np.prod(shape))
    if s == 0.0:
      masks.append(jnp.ones(shape, bool))
    else:
      masks.append(random_mask(jax.random.fold_in(key, i), shape, num_active(size, s)))
  return jax.tree.unflatten(treedef, masks)


def _explicit_spec(x):
  """``x``'s PartitionSpec when it is sharded over Explicit mesh axes, else None."""
  try:
    sharding = jax.typeof(x).sharding
  except (TypeError, AttributeError):
    return None
  mesh = getattr(sharding, "mesh", None)
  if mesh is None or mesh.empty:
    return None
  if not any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):
    return None
  spec = sharding.spec
  return spec if any(axis is not None for axis in spec) else None


def place_like(x, ref):
  """``x`` (of ``ref``'s shape) placed as ``ref`` is: a concrete array on
  ``ref.sharding``; under Explicit mesh axes resharded to ``ref``'s spec; otherwise
  as it is (under Auto axes the compiler, or the caller's out_shardings, decide)."""
  if isinstance(ref, jax.Array) and not isinstance(ref, jax.core.Tracer):
    if isinstance(x, jax.core.Tracer) or getattr(x, "sharding", None) == ref.sharding:
      return x
    return jax.device_put(x, ref.sharding)
  spec = _explicit_spec(ref)
  if spec is None or _explicit_spec(x) == spec:
    return x
  return jax.sharding.reshard(x, spec)


def replicate(x):
  """``x`` gathered onto every device when it is sharded over Explicit mesh axes:
  whole-layer operations (top-k, reshapes) then need no sharding rule."""
  if _explicit_spec(x) is None:
    return x
  return jax.sharding.reshard(x, jax.sharding.PartitionSpec())


def apply_masks(params: PyTree, masks: PyTree) -> PyTree:
  """Zeroes the inactive entries of ``params``; the result has ``params``' structure.

  Leaves are matched in flatten order, so the two trees may wrap their arrays in
  different node types: Flax NNX's ``nnx.state(model, nnx.Param)`` (Param
  variables) against the masks in an ``nnx.Optimizer``'s state (OptVariable).
  Under ``optax.multi_transform`` / ``optax.partition`` the masks have
  ``optax.MaskedNode`` holes where another transformation owns the param: those
  params are returned as they are.
  """
  leaves, treedef = jax.tree.flatten(params, is_leaf=_is_masked_node)
  mask_leaves = jax.tree.leaves(masks, is_leaf=_is_masked_node)
  if len(mask_leaves) != len(leaves) or any(
      not (_is_masked_node(m) or _is_masked_node(p)) and np.shape(m) != np.shape(p)
      for m, p in zip(mask_leaves, leaves)):
    raise ValueError(
        f"apply_masks: the masks ({len(mask_leaves)} leaves) do not match the params "
        f"({len(leaves)} leaves) leaf for leaf; pass the params the optimizer was "
        f"initialised with. Masks: {jax.tree.structure(masks)}; params: {treedef}.")
  return treedef.unflatten([
      p if _is_masked_node(m) or _is_masked_node(p) else jnp.where(m, p, jnp.zeros_like(p))
      for p, m in zip(leaves, mask_leaves)])


def _is_masked_node(x) -> bool:
  return isinstance(x, optax.MaskedNode)


def layer_densities(masks: PyTree) -> dict[str, float]:
  """Fraction of active entries per leaf, keyed by path (all leaves, dense ones at 1.0)."""
  out = {}
  for path, m in jax.tree_util.tree_flatten_with_path(masks)[0]:
    m = np.asarray(m)
    out[path_to_str(path)] = float(m.sum()) / max(m.size, 1)
  return out


def count_active(masks: PyTree, where: PyTree | None = None) -> tuple[int, int]:
  """(active, total) entries over the leaves where ``where`` is True (default all)."""
  leaves = jax.tree.leaves(masks)
  selected = [True] * len(leaves) if where is None else jax.tree.leaves(where)
  active = sum(int(np.asarray(m).sum()) for m, w in zip(leaves, selected) if w)
  total = sum(int(np.size(m)) for m, w in zip(leaves, selected) if w)
  return active, total


def global_density(masks: PyTree, where: PyTree | None = None, *, stacked=None) -> float:
  """Active fraction of the kernels (:func:`is_kernel_shape`, per layer of a
  ``stacked`` leaf), where sparsity lives: biases and norm parameters, always dense,
  would only dilute it. This is the ``global_density`` the trainer reports.
  ``where`` (a bool pytree) picks other leaves.
  """
  if where is None:
    where = jax.tree.map(lambda m, n: is_kernel_shape(np.shape(m)[n:]), masks,
                         stacked_axes(masks, stacked))
  active, total = count_active(masks, where)
  if total == 0:
    raise ValueError("global_density: `where` selects no mask entry (the default "
                     "selects the kernels).")
  return active / total
