"""Per-layer sparsity distributions: uniform, Erdos-Renyi (ER) and ER-Kernel (ERK).

All of them depend on parameter shapes only, so they work on arrays and on
``jax.ShapeDtypeStruct`` alike and give the same answer inside and outside jit.
"""

from __future__ import annotations

import math
import numbers

import re
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from rigl_jax import masks as masks_lib
from rigl_jax import names
from rigl_jax import structure as structure_lib
from rigl_jax.masks import ArgumentError

PyTree = Any
DISTRIBUTIONS = names.DISTRIBUTION_NAMES


def check_sparsity(value, name: str = "sparsity", argument: str | None = None) -> float:
  """A sparsity must be a number (not a string or a bool) in [0, 1).

  ``argument``: the caller's argument the value came from (default ``name``)."""
  argument = argument or name
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
    raise ArgumentError(argument, f"{name} must be a number in [0, 1), got {value!r}.")
  value = float(value)
  if not 0.0 <= value < 1.0:
    raise ArgumentError(argument, f"{name} must be in [0, 1), got {value}.")
  return value


def check_number(name: str, value, low: float, high: float) -> float:
  """A number (not a string or a bool) in [low, high]."""
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real) or \
      not low <= float(value) <= high:
    raise ArgumentError(name, f"{name} must be a number in [{low}, {high}], got {value!r}.")
  return float(value)


def _er_score(shape) -> float:
  # ER looks at fan-in and fan-out only: the last two dims of a conv or dense kernel.
  n_in, n_out = shape[-2], shape[-1]
  return (n_in + n_out) / (n_in * n_out)


def _erk_score(shape) -> float:
  # ERK also counts the kernel's spatial dims.
  return float(np.sum(shape)) / float(np.prod(shape))


def _solve_budget(sizes: dict[str, int], scores: dict[str, float], sparsity: float) -> dict[str, float]:
  """Densities ``eps * score`` that keep ``(1 - sparsity)`` of the weights.

  A layer whose density would exceed 1 is made dense and leaves both sides of the
  budget; ``eps`` is then solved again until every density is at most 1.
  """
  dense: set[str] = set()
  while True:
    free = [p for p in sizes if p not in dense]
    if not free:
      return {p: 1.0 for p in sizes}
    # Weights the free layers must hold: the total budget minus the dense layers.
    budget = (1.0 - sparsity) * sum(sizes.values()) - sum(sizes[p] for p in dense)
    eps = budget / sum(scores[p] * sizes[p] for p in free)
    top = max(scores[p] for p in free)
    if eps * top <= 1.0:
      densities = {p: eps * scores[p] for p in free}
      densities.update({p: 1.0 for p in dense})
      return densities
    # Every layer tied at the largest score becomes dense.
    dense.update(p for p in free if np.isclose(scores[p], top, rtol=1e-12, atol=0))


def sparsity_distribution(
    params: PyTree,
    sparsity: float,
    kind: str = "erk",
    *,
    dense=None,
    custom: Mapping[str, float] | None = None,
    include=None,
    uniform_first_layer_dense: bool = True,
    structure=None,
    stacked: Mapping[str, int] | None = None,
) -> PyTree:
  """Per-leaf sparsities (floats, same structure as ``params``; 0.0 for dense leaves).

  Args:
    params: parameter pytree (arrays or shape structs).
    sparsity: overall sparsity ``S`` in [0, 1) of the layers the distribution covers.
    kind: ``"uniform"`` (every layer at ``S``, the first sparsifiable layer dense),
      ``"er"`` or ``"erk"`` (layer density proportional to a shape score, with
      over-full layers made dense; the overall count is ``(1 - S) * N``).
    dense: layers forced dense (regex, list of regexes, or ``fn(path, leaf)``);
      they leave the budget.
    custom: ``{regex: sparsity}``; a matching layer gets that sparsity and leaves
      the budget. The first matching regex wins.
    include: which leaves may be sparse at all (default: every kernel, a leaf
      whose layer has two axes longer than 1).
    uniform_first_layer_dense: ``"uniform"`` keeps the first sparsifiable layer
      (a conv net's stem) dense, as the RigL paper does; False makes every layer
      sparse (e.g. an MLP, whose first layer holds most of the weights). When
      that first kernel is stacked, the whole stacked leaf stays dense.
    structure: ``"unstructured"`` (default), ``"constant_fan_in"``, ``"N:M"``,
      ``"block:RxC"`` or ``{regex: structure}`` (see :mod:`rigl_jax.structure`).
      An N:M layer's sparsity is ``1 - N/M`` whatever ``sparsity`` says: it
      leaves the budget, as a ``custom`` layer does, and ``sparsity`` is spread
      over the other layers; when every budget layer is N:M, ``sparsity`` must
      be ``1 - N/M``. Constant fan-in and block layers get whole counts per unit
      or whole blocks: their densities are rounded to that quantum, the total
      kept as close to the budget as the quanta allow (largest remainder first).
    stacked: ``{regex: n}``: the first ``n`` axes of matching leaves index
      separate layers (``nn.scan`` params); each slice is scored as one layer.

  Returns:
    The sparsity of every leaf: for unstructured layers the exact (unrounded)
    value, masks holding ``round((1 - s) * size)`` active weights per layer; for
    structured layers the sparsity they really get.

  Example:
    >>> import jax.numpy as jnp
    >>> params = {"a": {"kernel": jnp.zeros((100, 100))}, "b": {"kernel": jnp.zeros((100, 10)), "bias": jnp.zeros(10)}}
    >>> s = sparsity_distribution(params, 0.9, "erk")
    >>> round(s["a"]["kernel"], 3), round(s["b"]["kernel"], 3), s["b"]["bias"]
    (0.929, 0.61, 0.0)
  """
  sparsity = check_sparsity(sparsity)
  if kind not in DISTRIBUTIONS:
    raise ArgumentError("distribution", f"distribution must be one of {DISTRIBUTIONS}, "
                        f"got {kind!r}.")
  custom = dict(custom or {})
  for pattern, value in custom.items():
    check_sparsity(value, f"custom[{pattern!r}]", "custom")
  masks_lib.check_patterns_match(params, list(custom), "custom")
  masks_lib.check_patterns_match(params, masks_lib.selector_patterns(dense), "dense")

  candidates = masks_lib.sparsifiable(params, include=include, stacked=stacked)
  allowed = masks_lib.sparsifiable(params, include=include, dense=dense, stacked=stacked)
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  paths = [masks_lib.path_to_str(p) for p, _ in flat]
  shapes = {path: tuple(np.shape(leaf)) for path, (_, leaf) in zip(paths, flat)}
  layout_of = dict(zip(paths, treedef.flatten_up_to(
      structure_lib.layouts(params, structure, stacked, sparse=allowed))))
  is_candidate = dict(zip(paths, jax.tree.leaves(candidates)))
  is_allowed = dict(zip(paths, jax.tree.leaves(allowed)))
  if not any(is_allowed.values()):
    if any(is_candidate.values()):
      raise ArgumentError("dense", "dense: the patterns force every sparsifiable parameter dense; "
                       "nothing is left to sparsify.")
    raise ArgumentError("params", "params: no parameter to sparsify (by default every floating "
                     "kernel, a leaf with two axes longer than 1, is sparsifiable; check "
                     "`include`, `dense` and `stacked`).")

  result = {p: 0.0 for p in paths}
  budget_layers, n_of_m = [], []
  for path in paths:
    if not is_allowed[path]:
      continue
    match = next((pat for pat in custom if re.search(pat, path)), None)
    s_layer = layout_of[path].structure
    if match is not None:
      result[path] = float(custom[match])
    elif s_layer.kind == "n_of_m":
      result[path] = 1.0 - s_layer.n / s_layer.m
      n_of_m.append(path)
    else:
      budget_layers.append(path)

  if kind == "uniform":
    first = next((p for p in paths if is_candidate[p]), None) if uniform_first_layer_dense else None
    for path in budget_layers + n_of_m:
      if path == first:
        result[path] = 0.0
      elif path in budget_layers:
        result[path] = sparsity
  elif budget_layers:
    score_fn = _erk_score if kind == "erk" else _er_score
    sizes = {p: int(np.prod(shapes[p])) for p in budget_layers}
    scores = {p: score_fn(layout_of[p].layer_shape) for p in budget_layers}
    for path, density in _solve_budget(sizes, scores, sparsity).items():
      result[path] = max(0.0, 1.0 - density)
  _check_n_of_m_sparsity(sparsity, [p for p in n_of_m if result[p] > 0.0],
                         [p for p in budget_layers if result[p] > 0.0 or kind != "uniform"],
                         layout_of)
  _round_to_structure(result, [p for p in budget_layers if result[p] > 0.0], layout_of)
  _round_to_structure(result, [p for p in paths if is_allowed[p] and p not in budget_layers
                               and result[p] > 0.0], layout_of, one_by_one=True)
  for path, s in result.items():
    if s <= 0.0:
      continue
    layout = layout_of[path]
    if layout.trivial or layout.structure.kind == "unstructured":
      size = layout.layer_size
      if masks_lib.num_active(size, s) < 1:
        raise ArgumentError("sparsity", f"sparsity: {s:.9g} leaves layer {path!r} ({size} weights) without a "
                         f"single active weight; lower the sparsity or keep that layer dense.")
    elif layout.group_count(s) < 1:
      raise ArgumentError("sparsity", f"sparsity: {s:.9g} leaves the {layout.structure} groups of "
                          f"layer {path!r} (shape {layout.layer_shape}) without a single active "
                          f"unit; lower the sparsity or keep that layer dense.")
  return jax.tree.unflatten(treedef, [result[p] for p in paths])


def _check_n_of_m_sparsity(sparsity, n_of_m, free, layout_of) -> None:
  """With no other layer to spread ``sparsity`` over, it must be what N:M gives."""
  if not n_of_m or free:
    return
  fixed = {1.0 - layout_of[p].structure.n / layout_of[p].structure.m for p in n_of_m}
  if len(fixed) == 1 and np.isclose(sparsity, next(iter(fixed)), rtol=0, atol=1e-9):
    return
  names_ = sorted({str(layout_of[p].structure) for p in n_of_m})
  raise ArgumentError("sparsity", f"sparsity: every sparse layer is N:M ({', '.join(names_)}), "
                      f"which fixes each layer's sparsity at 1 - N/M, so sparsity must be "
                      f"{'one of ' if len(fixed) > 1 else ''}"
                      f"{', '.join(f'{v:g}' for v in sorted(fixed))}, got {sparsity:g}. "
                      f"Use another structure for other sparsities.")


def _round_to_structure(result: dict, paths: list, layout_of: dict, *,
                        one_by_one: bool = False) -> None:
  """Constant fan-in and block layers: densities rounded to whole units per group.

  The layers' total stays as close to their unrounded total as whole quanta (one
  more unit in every group of a layer) allow: floors first, then a quantum to the
  largest remainders while at least half of it is missing. ``one_by_one``: each
  layer rounded on its own (``custom`` layers, whose values are not a shared budget).
  """
  structured = [p for p in paths if layout_of[p].structure.kind in ("constant_fan_in", "block")]
  if not structured:
    return
  counts, quantum, remainder, group_size = {}, {}, {}, {}
  missing = 0.0
  for p in structured:
    layout = layout_of[p]
    n_groups, size = layout.groups()
    want = (1.0 - result[p]) * size
    if one_by_one:
      counts[p] = masks_lib.num_active(size, result[p])
      continue
    counts[p] = max(1, math.floor(want + 1e-9))
    quantum[p] = n_groups * layout.unit_size * layout.n_layers
    remainder[p] = want - counts[p]
    group_size[p] = size
    missing += remainder[p] * quantum[p]
  if not one_by_one:
    for p in sorted(structured, key=lambda q: -remainder[q]):
      if missing >= quantum[p] / 2 and counts[p] < group_size[p]:
        counts[p] += 1
        missing -= quantum[p]
  for p in structured:
    layout = layout_of[p]
    result[p] = 1.0 - counts[p] / layout.groups()[1]
