"""Sparse-training methods: how masks start and how they change.

A method is a small object the transform calls at fixed points; it never touches
the optimizer itself. The transform asks it for:

* ``initial_masks(key, params, sparsities)``: the masks at step 0;
* ``init(params, masks)`` / ``observe(state, grads, masks)``: a method state and
  its per-step update (e.g. a dense gradient momentum), both optional;
* ``is_update_step(step, ...)``: whether this step changes the masks (default:
  every ``update_every`` steps while below ``end_step``);
* ``update(ctx, state)``: on a mask-update step, the new masks. Connections
  active in both the old and new mask keep their weight; every other one
  (dropped or newly grown) has weight 0 afterwards;
* ``keep_inner_state(old_masks, new_masks)``: which connections keep their inner
  optimizer state across the update (the rest restart from zero).

Class attributes tell the transform what the method needs:
``updates_masks`` (False: never call ``update``), ``dense_inner_gradients``
(True: the inner optimizer sees dense gradients and keeps dense momentum).
New methods subclass :class:`Method` and are registered in ``METHODS``.

The methods here: ``static``, ``set``, ``rigl`` (fixed per-layer counts);
``snfs``, ``rigl_sg``, ``rigl_sm`` (per-layer counts move between layers, the
global count is fixed, see :func:`redistribute_counts`); ``pruning`` and
``pruning_global`` (dense-to-sparse gradual magnitude pruning).
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rigl_jax import masks as masks_lib
from rigl_jax import names
from rigl_jax import schedules
from rigl_jax import selection
from rigl_jax import structure as structure_lib

PyTree = Any


class UpdateContext(NamedTuple):
  """What a method sees on a mask-update step (arrays may be traced)."""
  step: jax.Array             # int32 scalar: the optimizer step being taken
  key: jax.Array              # a PRNG key for this step
  drop_fraction: jax.Array    # float32 scalar from the drop schedule
  masks: PyTree               # current bool masks
  params: PyTree              # current params (inactive entries are 0)
  grads: PyTree               # DENSE gradients of this step
  sparsities: PyTree          # static per-leaf target sparsities (floats)
  max_drop_fraction: float    # static upper bound of drop_fraction
  # The transform's static schedule, for methods whose targets depend on it
  # (gradual pruning). None only where a caller built the context by hand.
  start_step: int | None = None
  end_step: int | None = None
  update_every: int | None = None
  # The inner optimizer's state after this step's update (before any reset),
  # for methods that read its momentum. None where a caller built the context.
  inner_state: PyTree = None
  # Per-leaf rigl_jax.structure.Layout (structure, stacked axes); None: every
  # leaf unstructured and unstacked.
  layouts: PyTree = None


def drop_smallest(mask: jax.Array, magnitude: jax.Array, n_drop: jax.Array,
                  max_drop: int) -> jax.Array:
  """Flat mask with its ``n_drop`` smallest-``magnitude`` active entries switched off.

  ``max_drop`` is a static bound on ``n_drop``; ``n_drop`` may be traced. Ties
  go to the lower index.
  """
  return mask & ~selection.largest(selection.drop_scores(mask, magnitude), n_drop, max_drop)


def grow_largest(mask: jax.Array, score: jax.Array, n_grow: jax.Array,
                 max_grow: int) -> jax.Array:
  """Flat mask with the ``n_grow`` largest-``score`` inactive entries switched on.

  Scores must be >= 0 (magnitudes, uniform draws) so that every inactive entry
  ranks above the active ones. ``max_grow`` is a static bound on ``n_grow``.
  """
  return mask | selection.largest(selection.grow_scores(mask, score), n_grow, max_grow)


def drop_and_grow(mask: jax.Array, weight: jax.Array, grow_score: jax.Array,
                  n_drop: jax.Array, max_drop: int) -> jax.Array:
  """Drops the ``n_drop`` smallest-magnitude active weights, grows ``n_drop`` others.

  Growth picks the largest ``grow_score`` among the connections inactive after
  the drop (the just-dropped ones included). The active count never changes.
  ``max_drop`` is a static bound on ``n_drop`` (see :func:`selection.largest`).

  Returns:
    The new mask. A connection dropped and grown again in the same update is
    simply kept (as in the authors' code): only connections new to the mask
    start from zero.
  """
  shape = mask.shape
  flat = drop_smallest(mask.reshape(-1), jnp.abs(weight.reshape(-1)), n_drop, max_drop)
  flat = grow_largest(flat, grow_score.reshape(-1), n_drop, max_drop)
  return flat.reshape(shape)


# From this many unstructured sparse layers on, their selections run together
# (`_drop_and_grow_all`): the update compiles in about the time of one layer's
# instead of growing with the depth, at some run time (the segmented selection
# costs about 2x the per-layer ones on CPU: on LeNet-5, 0.12 instead of 0.05 of a
# step every dT steps, which the few layers of such models do not repay).
GROUP_MIN_LAYERS = 8


def _drop_and_grow_all(masks: list, weights: list, grow_scores: list, n_drops: list,
                       max_drops: list, score_fn: Callable = lambda x: x) -> list:
  """:func:`drop_and_grow` of every layer: the same masks. The layers are laid end to
  end and both selections (drop, then grow) run as two turns of one loop over
  `selection.largest_in_segments`, so the mask update compiles one selection, not
  two per layer (WRN-22-2's masked step compiled in 2.0x the dense one's time
  with a selection per layer). The grow scores are ``score_fn`` of ``grow_scores``,
  applied once to their concatenation."""
  sizes = [int(m.size) for m in masks]
  flat = lambda leaves, dtype: jnp.concatenate([x.reshape(-1).astype(dtype) for x in leaves])
  mask0, magnitude = flat(masks, bool), jnp.abs(flat(weights, jnp.float32))
  score = score_fn(flat(grow_scores, jnp.float32))
  k = jnp.stack([jnp.asarray(n, jnp.int32) for n in n_drops])

  def turn(i, mask):
    scores = jnp.where(i == 0, selection.drop_scores(mask, magnitude),
                       selection.grow_scores(mask, score))
    picked = selection.largest_in_segments(scores, k, sizes, max_drops)
    return jnp.where(i == 0, mask & ~picked, mask | picked)

  new = jax.lax.fori_loop(0, 2, turn, mask0)
  return [part.reshape(m.shape) for part, m in
          zip(jnp.split(new, np.cumsum(sizes)[:-1].tolist()), masks)]


def _is_plain(layout) -> bool:
  return layout is None or layout.trivial


class Method:
  """Base class: the mask never changes (Static)."""
  name = "static"
  updates_masks = False
  dense_inner_gradients = False
  # The structure the method needs (None: any); "srigl" needs constant fan-in.
  required_structure: str | None = None
  # Whether the method keeps a structure other than unstructured/unstacked.
  supports_structure = True

  def initial_masks(self, key, params, sparsities, layouts=None):
    """Random masks with exactly each layer's count (per group under a structure)."""
    if layouts is None or structure_lib.is_trivial(layouts):
      return masks_lib.random_masks(key, params, sparsities)
    return structure_lib.random_masks(key, params, sparsities, layouts)

  def init(self, params, masks):
    del params, masks
    return ()

  def observe(self, state, grads, masks):
    del grads, masks
    return state

  def is_update_step(self, step, *, update_every: int, start_step: int, end_step: int):
    """Whether ``step`` changes the masks (traced bool); gradual pruning overrides it."""
    return schedules.is_update_step(
        step, update_every=update_every, start_step=start_step, end_step=end_step)

  def update(self, ctx: UpdateContext, state):
    return ctx.masks, state

  def keep_inner_state(self, old_masks: PyTree, new_masks: PyTree) -> PyTree:
    """Bool pytree: connections whose inner optimizer state survives a mask update.

    Sparse inner gradients (RigL, SET): only connections active before and after
    keep their state; a grown one starts with zero momentum, as the RigL paper
    does. Dense inner gradients (SNFS, pruning): the state tracks the dense
    gradient of every connection whatever the mask, so nothing is reset; for SNFS
    that momentum is exactly the signal a connection was grown for. The new
    weight itself still starts at 0 either way.
    """
    if self.dense_inner_gradients:
      return jax.tree.map(jnp.ones_like, new_masks)
    return jax.tree.map(jnp.logical_and, old_masks, new_masks)


class DropAndGrow(Method):
  """Per layer, drop the smallest weights and grow by ``grow_scores``, counts fixed."""
  updates_masks = True

  def grow_scores(self, ctx: UpdateContext, state) -> PyTree:
    raise NotImplementedError

  def grow_scores_of(self, ctx: UpdateContext, state) -> tuple[PyTree, Callable | None]:
    """``(tree, f)``: the grow scores are ``f`` applied elementwise to ``tree``
    (``f`` None: ``tree`` itself). RigL's ``(grads, jnp.abs)`` lets the grouped
    update take ``|.|`` once on all layers laid end to end: one kernel, not one
    per layer for XLA to compile."""
    return self.grow_scores(ctx, state), None

  def update(self, ctx: UpdateContext, state):
    raw_scores, score_fn = self.grow_scores_of(ctx, state)
    score_fn = score_fn or (lambda x: x)
    leaves, treedef = jax.tree.flatten(ctx.masks)
    weights = treedef.flatten_up_to(ctx.params)
    score_leaves = treedef.flatten_up_to(raw_scores)
    sparsities = treedef.flatten_up_to(ctx.sparsities)
    layouts = structure_lib.layout_leaves(ctx.layouts, treedef)
    new_masks = list(leaves)
    plain = []  # unstructured sparse layers: their selections run together (below)
    for i, (mask, weight, score, s, layout) in enumerate(
        zip(leaves, weights, score_leaves, sparsities, layouts)):
      if s == 0.0:  # dense layers are never touched
        continue
      if not _is_plain(layout):
        new_masks[i] = structure_lib.drop_and_grow(
            mask, weight, score_fn(score), layout, s, ctx.drop_fraction, ctx.max_drop_fraction)
        continue
      n_active = masks_lib.num_active(mask.size, s)
      max_drop = min(n_active, math.ceil(ctx.max_drop_fraction * n_active))
      n_drop = jnp.floor(ctx.drop_fraction * n_active).astype(jnp.int32)
      plain.append((i, n_drop, max_drop))
    if len(plain) >= GROUP_MIN_LAYERS:
      ids, n_drops, max_drops = zip(*plain)
      new = _drop_and_grow_all([leaves[i] for i in ids], [weights[i] for i in ids],
                               [score_leaves[i] for i in ids], list(n_drops), list(max_drops),
                               score_fn)
      for i, mask in zip(ids, new):
        new_masks[i] = mask
    else:
      for i, n_drop, max_drop in plain:
        new_masks[i] = drop_and_grow(leaves[i], weights[i], score_fn(score_leaves[i]), n_drop,
                                     max_drop)
    return treedef.unflatten(new_masks), state


class SET(DropAndGrow):
  """Sparse Evolutionary Training (Mocanu et al. 2018): grow uniformly at random."""
  name = "set"

  def grow_scores(self, ctx, state):
    leaves, treedef = jax.tree.flatten(ctx.masks)
    keys = [jax.random.fold_in(ctx.key, i) for i in range(len(leaves))]
    return treedef.unflatten([jax.random.uniform(k, m.shape) for k, m in zip(keys, leaves)])


class RigL(DropAndGrow):
  """RigL (Evci et al. 2020): grow where the dense gradient is largest in magnitude."""
  name = "rigl"

  def grow_scores(self, ctx, state):
    return jax.tree.map(jnp.abs, ctx.grads)

  def grow_scores_of(self, ctx, state):
    return ctx.grads, jnp.abs


class SRigL(RigL):
  """SRigL (Lasby et al., ICLR 2024): RigL under constant fan-in, with neuron ablation.

  Every output unit (neuron) keeps the same fan-in ``k``. On an update, per layer:

  1. ``n_prune = floor(f * n_active)`` weights go, ``n_keep`` stay.
  2. Salience: a weight is salient when it is among the ``n_keep`` largest
     ``|w|`` or the ``n_prune`` largest ``|grad|`` of the layer. A neuron with
     fewer than ``max(1, int(gamma_sal * k0))`` salient weights is ablated
     (``k0``: the fan-in with no neuron ablated), but the
     ``budget // fan_in + 1`` neurons with the most salient weights always stay.
  3. The fan-in becomes ``k = budget // active_neurons`` (``budget = k0 * fan_out``).
  4. Ablated neurons lose every weight; among the other active weights the
     smallest ``|w|`` go until ``n_keep`` remain; each active neuron then drops
     its smallest or grows its largest-``|grad|`` inactive weights until it holds
     exactly ``k``. Ablated neurons may come back at a later update.

  ``no_ablation`` (regex(es)) names layers never ablated: the authors exempt the
  classifier. Differences from the authors' code are listed in README.
  """
  name = "srigl"
  required_structure = "constant_fan_in"

  def __init__(self, gamma_sal: float = 0.3, no_ablation=None):
    if not 0.0 <= float(gamma_sal) < 1.0:
      raise masks_lib.ArgumentError("gamma_sal", f"gamma_sal must be a number in [0, 1), "
                                    f"got {gamma_sal!r}.")
    self.gamma_sal = float(gamma_sal)
    self.no_ablation = masks_lib._compile_selector(no_ablation, "no_ablation")  # pylint: disable=protected-access

  def update(self, ctx: UpdateContext, state):
    leaves, treedef = jax.tree.flatten(ctx.masks)
    weights = treedef.flatten_up_to(ctx.params)
    grads = treedef.flatten_up_to(ctx.grads)
    sparsities = treedef.flatten_up_to(ctx.sparsities)
    layouts = structure_lib.layout_leaves(ctx.layouts, treedef)
    paths = [masks_lib.path_to_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(ctx.masks)[0]]
    new_masks = list(leaves)
    for i, (mask, layout, s) in enumerate(zip(leaves, layouts, sparsities)):
      if s == 0.0:
        continue
      if layout is None or layout.structure.kind != "constant_fan_in":
        raise ValueError(f"srigl: layer {paths[i]!r} is not constant fan-in; build the "
                         "transform with structure='constant_fan_in'.")
      ablate = self.gamma_sal > 0 and not (self.no_ablation and self.no_ablation(paths[i], mask))
      new_masks[i] = self._update_layer(mask, weights[i], grads[i], layout, s, ctx, ablate)
    return treedef.unflatten(new_masks), state

  def _update_layer(self, mask, weight, grad, layout, sparsity, ctx, ablate):
    if not ablate:  # constant fan-in RigL, the same masks (tested)
      return structure_lib.drop_and_grow(mask, weight, jnp.abs(grad), layout, sparsity,
                                         ctx.drop_fraction, ctx.max_drop_fraction)
    fan_out, fan_in = layout.groups()
    k0 = layout.group_count(sparsity)
    budget = k0 * fan_out
    max_prune = min(budget, math.ceil(ctx.max_drop_fraction * budget))
    mask_u = layout.to_units(mask)                                   # [layers, in, out]
    magnitude = layout.to_units(jnp.abs(weight).astype(jnp.float32))
    score = layout.to_units(jnp.abs(grad).astype(jnp.float32))
    layers = mask_u.shape[0]
    n_ones = mask_u.reshape(layers, -1).sum(-1, dtype=jnp.int32)
    n_prune = jnp.floor(ctx.drop_fraction * n_ones).astype(jnp.int32)
    n_keep = n_ones - n_prune
    # The n_keep largest |w| among the active weights (RigL's drop): the
    # weights kept when no neuron is ablated, and the |w| half of salience.
    kept_by_magnitude = structure_lib.drop_in_layers(mask_u, magnitude, n_prune, max_prune,
                                                     layers)
    if ablate:
      # (NaN gradients are never salient.)
      flat_g = jnp.where(jnp.isnan(score), -1.0, score).reshape(layers, -1)
      salient = kept_by_magnitude | selection.largest_rows(
          flat_g, n_prune, max_prune).reshape(mask_u.shape)
      counts = salient.sum(1, dtype=jnp.int32)                        # [layers, out]
      threshold = max(1, int(self.gamma_sal * k0))
      min_neurons = budget // fan_in
      if min_neurons < fan_out:
        ranked = -jnp.sort(-counts, axis=-1)
        threshold = jnp.minimum(threshold, ranked[:, min_neurons])
      active = counts >= jnp.reshape(threshold, (-1, 1))
    else:
      active = jnp.ones((layers, fan_out), bool)
    fan_in_now = budget // jnp.maximum(active.sum(-1, dtype=jnp.int32), 1)   # [layers]

    def keep_among_active():
      # Ablated neurons lose every weight; the n_keep largest |w| of the others stay.
      kept = mask_u & active[:, None, :]
      excess = jnp.maximum(kept.reshape(layers, -1).sum(-1, dtype=jnp.int32) - n_keep, 0)
      return structure_lib.drop_in_layers(kept, magnitude, excess, max_prune, layers)

    kept = jax.lax.cond(jnp.all(active), lambda: kept_by_magnitude, keep_among_active)
    target = jnp.where(active, fan_in_now[:, None], 0)
    new = structure_lib.fill_groups(kept, magnitude, score, target, min(fan_in, budget))
    return layout.from_units(new)


class Static(Method):
  """The initial random mask is kept for the whole run."""
  name = "static"


def redistribute_counts(total, scores, capacities) -> jax.Array:
  """Splits ``total`` connections across layers in proportion to ``scores``.

  Each layer is capped at its capacity and the excess is spread over the other
  layers, in proportion to their scores again (water-filling): a layer whose
  share exceeds its capacity is fixed at it and the rest is shared anew among
  the layers left. Shares only grow when a layer leaves, so at most one round
  per layer is needed (a static loop). The real shares are then rounded by
  largest remainder (ties: lower layer index), and a last greedy pass moves the
  few units that float32 rounding may leave over, so the sum is always exact.
  If no layer left has a positive score, the rest goes by spare capacity.

  Args:
    total: int scalar (may be traced), at most ``sum(capacities)``.
    scores: float ``[L]``, >= 0 (non-finite or negative scores count as 0).
    capacities: int ``[L]``, >= 0.

  Returns:
    int32 ``[L]`` counts with ``0 <= counts <= capacities`` and ``sum == total``.

  Example:
    >>> import jax.numpy as jnp
    >>> redistribute_counts(10, jnp.array([8.0, 1.0, 1.0]), jnp.array([2, 20, 20])).tolist()
    [2, 4, 4]
  """
  scores = jnp.asarray(scores, jnp.float32)
  scores = jnp.where(jnp.isfinite(scores) & (scores > 0), scores, 0.0)
  caps = jnp.asarray(capacities, jnp.int32)
  cap_f = caps.astype(jnp.float32)
  total = jnp.asarray(total, jnp.int32)

  def shares(fixed):
    remaining = jnp.maximum(total.astype(jnp.float32) - jnp.sum(jnp.where(fixed, cap_f, 0.0)), 0.0)
    weight = jnp.where(fixed, 0.0, scores)
    weight = jnp.where(weight.sum() > 0, weight, jnp.where(fixed, 0.0, cap_f))
    share = remaining * weight / jnp.maximum(weight.sum(), jnp.finfo(jnp.float32).tiny)
    return jnp.where(fixed, cap_f, share)

  fixed = jnp.zeros(scores.shape, bool)
  for _ in range(scores.shape[0]):
    fixed = fixed | (shares(fixed) > cap_f)
  share = jnp.clip(shares(fixed), 0.0, cap_f)

  def exclusive_cumsum(x):
    return jnp.cumsum(x) - x

  counts = jnp.clip(jnp.floor(share).astype(jnp.int32), 0, caps)
  remainder = share - counts.astype(jnp.float32)
  deficit = total - counts.sum()
  # Units still to place: largest remainder first, each layer up to its capacity.
  order = jnp.argsort(-remainder, stable=True)
  spare = (caps - counts)[order]
  counts = counts.at[order].add(jnp.clip(deficit - exclusive_cumsum(spare), 0, spare))
  # Units placed too many (only after float32 overshoot): smallest remainder first.
  order = jnp.argsort(remainder, stable=True)
  held = counts[order]
  return counts.at[order].add(-jnp.clip(-deficit - exclusive_cumsum(held), 0, held))


class RedistributingDropAndGrow(DropAndGrow):
  """Drop per layer, regrow the same total across layers by a layer score (SNFS).

  On an update, every sparse layer ``l`` with ``n_l`` active weights drops its
  ``k_l = floor(f * n_l)`` smallest magnitudes, as RigL does. The total
  ``K = sum k_l`` is then regrown, layer ``l`` receiving a share proportional to
  its score, the mean ``|layer_signal|`` over its active weights (before the
  drop), capped at its free slots ``N_l - n_l + k_l`` (see
  :func:`redistribute_counts`). Within a layer the largest ``grow_scores`` among
  the inactive connections are grown. So layer densities move while the global
  active count stays exact; layers the distribution made dense (sparsity 0) are
  neither touched nor counted.
  """

  supports_structure = False  # layer counts move one weight at a time

  def layer_signal(self, ctx: UpdateContext, state) -> PyTree:
    """Per-parameter values whose mean magnitude over active weights scores a layer."""
    raise NotImplementedError

  def update(self, ctx: UpdateContext, state):
    leaves, treedef = jax.tree.flatten(ctx.masks)
    sparsities = treedef.flatten_up_to(ctx.sparsities)
    ids = [i for i, s in enumerate(sparsities) if s > 0.0]
    if not ids:
      return ctx.masks, state
    weights = treedef.flatten_up_to(ctx.params)
    grow_scores = treedef.flatten_up_to(self.grow_scores(ctx, state))
    signals = treedef.flatten_up_to(self.layer_signal(ctx, state))
    # Static top-k bounds: the redistributed layers hold `budget` weights in all,
    # so a layer holds at most min(N_l, budget) and at most
    # ceil(max_f * budget) are dropped (and regrown) in all.
    budget = sum(masks_lib.num_active(leaves[i].size, sparsities[i]) for i in ids)
    max_total = min(budget, math.ceil(ctx.max_drop_fraction * budget))

    after_drop, n_drop, capacity, layer_score = [], [], [], []
    for i in ids:
      mask = leaves[i].reshape(-1)
      size = mask.size
      n = mask.sum(dtype=jnp.int32)
      held_max = min(size, budget)
      max_drop = min(held_max, math.ceil(ctx.max_drop_fraction * held_max))
      k = jnp.minimum(jnp.floor(ctx.drop_fraction * n).astype(jnp.int32), max_drop)
      after_drop.append(drop_smallest(mask, jnp.abs(weights[i].reshape(-1)), k, max_drop))
      n_drop.append(k)
      capacity.append(size - n + k)
      signal = jnp.abs(signals[i].reshape(-1)).astype(jnp.float32)
      layer_score.append(jnp.sum(jnp.where(mask, signal, 0.0)) / jnp.maximum(n, 1))

    n_grow = redistribute_counts(
        jnp.sum(jnp.stack(n_drop)), jnp.stack(layer_score), jnp.stack(capacity))
    new_masks = list(leaves)
    for j, i in enumerate(ids):
      grown = grow_largest(after_drop[j], grow_scores[i].reshape(-1), n_grow[j],
                           min(leaves[i].size, max_total))
      new_masks[i] = grown.reshape(leaves[i].shape)
    return treedef.unflatten(new_masks), state


# Field names under which optax states keep a params-shaped first moment:
# TraceState.trace (sgd momentum), ScaleByAdamState.mu (adam, adamw, ...).
_MOMENTUM_FIELDS = ("trace", "mu")


def optimizer_momentum(inner_state: PyTree, params: PyTree) -> PyTree:
  """The params-shaped momentum inside an optax state.

  The first ``trace`` (``optax.trace``, ``optax.sgd(momentum=...)``) or ``mu``
  (``optax.adam`` and relatives) field, at any depth (chains,
  ``inject_hyperparams``), whose tree structure is that of ``params``.

  Raises:
    ValueError: there is none (e.g. ``optax.sgd`` without momentum).
  """
  want = jax.tree.structure(params)
  for name in _MOMENTUM_FIELDS:
    for _, value in optax.tree_utils.tree_get_all_with_path(inner_state, name):
      if jax.tree.structure(value) == want:
        return value
  raise ValueError(
      "momentum_source='optimizer' (SNFS, RigL-SM) needs an inner optimizer with momentum "
      "(a params-shaped 'trace' or 'mu' in its state, e.g. optax.sgd(lr, momentum=0.9) "
      "or optax.adam); this one has none. Use momentum_source='own' for a separate "
      "momentum buffer.")


class _Momentum(Method):
  """A momentum to score by: the inner optimizer's, or the method's own EMA.

  ``momentum_source="optimizer"`` (default) reads the params-shaped momentum
  the inner optimizer keeps anyway (:func:`optimizer_momentum`): no state of
  its own. ``"own"`` keeps ``m <- beta * m + (1 - beta) * g`` of the DENSE
  gradient every step (in ``observe``), float32, 4 bytes per parameter. The
  ``(1 - beta)`` factor (PyTorch's momentum buffer has none) scales every
  layer alike, so it changes neither growth ranks nor redistribution
  proportions.
  """
  MOMENTUM_SOURCES = ("optimizer", "own")

  def __init__(self, momentum: float = 0.9, momentum_source: str = "optimizer"):
    if not 0.0 <= float(momentum) < 1.0:
      raise ValueError(f"momentum must be in [0, 1), got {momentum!r}.")
    if momentum_source not in self.MOMENTUM_SOURCES:
      raise ValueError(f"momentum_source must be one of {self.MOMENTUM_SOURCES}, "
                       f"got {momentum_source!r}.")
    self.momentum = float(momentum)
    self.momentum_source = momentum_source

  def init(self, params, masks):
    del masks
    if self.momentum_source == "optimizer":
      return ()
    # zeros_like keeps each param's sharding.
    return jax.tree.map(lambda p: jnp.zeros_like(p, dtype=jnp.float32), params)

  def observe(self, state, grads, masks):
    del masks
    if self.momentum_source == "optimizer":
      return state
    beta = self.momentum
    return jax.tree.map(lambda m, g: beta * m + (1.0 - beta) * g.astype(jnp.float32),
                        state, grads)

  def momentum_of(self, ctx: UpdateContext, state) -> PyTree:
    """The momentum tree this update scores by."""
    if self.momentum_source == "own":
      return state
    if ctx.inner_state is None:
      raise ValueError(f"{type(self).__name__}(momentum_source='optimizer') needs "
                       "ctx.inner_state (sparse_training fills it in).")
    return optimizer_momentum(ctx.inner_state, ctx.params)


class SNFS(_Momentum, RedistributingDropAndGrow):
  """Sparse Networks From Scratch (Dettmers & Zettlemoyer 2019).

  Grows where the dense gradient momentum is largest in magnitude and
  redistributes the active weights across layers by mean |momentum| over each
  layer's active weights. The inner optimizer sees dense gradients every step,
  so its momentum is dense too, and by default (``momentum_source=
  "optimizer"``, see :class:`_Momentum`) that is the momentum SNFS scores by,
  as the authors' code does: no memory beyond the masks. That momentum is kept
  for grown connections (see :meth:`Method.keep_inner_state`). The reference
  drop fraction (prune rate) is 0.5 with cosine decay: pass
  ``drop_fraction=0.5`` to the transform.
  """
  name = "snfs"
  dense_inner_gradients = True

  def grow_scores(self, ctx, state):
    return jax.tree.map(jnp.abs, self.momentum_of(ctx, state))

  def layer_signal(self, ctx, state):
    return self.momentum_of(ctx, state)


class RigLSG(RedistributingDropAndGrow):
  """RigL plus redistribution by each layer's mean |gradient| over active weights."""
  name = "rigl_sg"

  def grow_scores(self, ctx, state):
    return jax.tree.map(jnp.abs, ctx.grads)

  def layer_signal(self, ctx, state):
    return ctx.grads


class RigLSM(_Momentum, RedistributingDropAndGrow):
  """RigL plus redistribution by each layer's mean |momentum| over active weights.

  Growth is RigL's (largest dense-gradient magnitude); the inner optimizer
  sees masked gradients, as in RigL. By default the layer score reads the
  inner optimizer's momentum, which is sparse: the report's "average sparse
  momentum" (at an active weight it is the momentum of that weight's gradient
  since it was last grown). ``momentum_source="own"`` scores by an EMA of the
  dense gradient instead, at 4 bytes per parameter.
  """
  name = "rigl_sm"

  def grow_scores(self, ctx, state):
    return jax.tree.map(jnp.abs, ctx.grads)

  def layer_signal(self, ctx, state):
    return self.momentum_of(ctx, state)


def _pruning_counts(size: int, final_sparsity: float, steps, start_step: int, end_step: int,
                    power: float) -> np.ndarray:
  """Exact active counts ``round((1 - s(t)) * size)`` at each pruning step, in float64."""
  return np.array([
      masks_lib.num_active(size, schedules.polynomial_sparsity(
          int(t), initial=0.0, final=final_sparsity, start_step=start_step,
          end_step=end_step, power=power))
      for t in steps], np.int32)


def _max_decrease(size: int, counts: np.ndarray) -> int:
  """Largest drop between consecutive pruning steps (from dense): the static top-k size."""
  before = np.concatenate([[size], counts[:-1]])
  return max(0, int(np.max(before - counts)))


class MagnitudePruning(Method):
  """Gradual magnitude pruning, dense to sparse (Zhu & Gupta 2017).

  Masks start all True. On every pruning step ``t`` (every ``update_every`` steps
  after ``start_step`` and always at ``end_step``, see
  :func:`schedules.pruning_steps`) the smallest-magnitude active weights are
  removed until the target is met; nothing ever grows back.

  * ``scope="layer"`` (the original): layer ``l`` holds exactly
    ``round((1 - s_l(t)) * N_l)`` weights, ``s_l(t)`` the cubic
    :func:`schedules.polynomial_sparsity` from 0 at ``start_step`` to the
    distribution's ``s_l`` at ``end_step``.
  * ``scope="global"`` (the report's variant): one magnitude threshold across all
    sparse layers; their total holds exactly ``round((1 - S(t)) * N)``, the cubic
    going from 0 to the sparsity that leaves the distribution's total count, so
    the final parameter count equals the sparse-from-scratch methods'.

  Layers with sparsity 0 stay dense. The inner optimizer sees dense gradients
  (dense momentum) and its state is never reset. Targets are static tables
  computed in float64 at trace time and indexed by the step.
  """
  name = "pruning"
  updates_masks = True
  dense_inner_gradients = True
  SCOPES = ("layer", "global")

  def __init__(self, scope: str = "layer", power: float = 3.0):
    if scope not in self.SCOPES:
      raise ValueError(f"scope must be one of {self.SCOPES}, got {scope!r}.")
    self.scope = scope
    self.power = float(power)

  def initial_masks(self, key, params, sparsities, layouts=None):
    del key, sparsities, layouts
    return jax.tree.map(lambda p: jnp.ones(jnp.shape(p), bool), params)

  def is_update_step(self, step, *, update_every: int, start_step: int, end_step: int):
    return schedules.is_pruning_step(
        step, update_every=update_every, start_step=start_step, end_step=end_step)

  def update(self, ctx: UpdateContext, state):
    if ctx.start_step is None or ctx.end_step is None or ctx.update_every is None:
      raise ValueError("pruning needs start_step, end_step and update_every in the "
                       "UpdateContext (sparse_training fills them in).")
    schedule = dict(start_step=ctx.start_step, end_step=ctx.end_step)
    steps = schedules.pruning_steps(update_every=ctx.update_every, **schedule)
    # The current step is one of `steps` (is_update_step chose it).
    index = jnp.clip(jnp.searchsorted(jnp.asarray(steps, jnp.int32), ctx.step),
                     0, len(steps) - 1)
    leaves, treedef = jax.tree.flatten(ctx.masks)
    sparsities = treedef.flatten_up_to(ctx.sparsities)
    weights = treedef.flatten_up_to(ctx.params)
    ids = [i for i, s in enumerate(sparsities) if s > 0.0]
    if not ids:
      return ctx.masks, state
    new_masks = list(leaves)

    def prune(mask, weight, counts, size):
      n_drop = jnp.maximum(mask.sum(dtype=jnp.int32) - jnp.asarray(counts)[index], 0)
      return drop_smallest(mask, jnp.abs(weight), n_drop, _max_decrease(size, counts))

    layouts = structure_lib.layout_leaves(ctx.layouts, treedef)
    if self.scope == "layer":
      for i in ids:
        if not _is_plain(layouts[i]):
          new_masks[i] = self._prune_groups(leaves[i], weights[i], layouts[i], sparsities[i],
                                            steps, index, schedule)
          continue
        size = leaves[i].size
        counts = _pruning_counts(size, sparsities[i], steps, power=self.power, **schedule)
        flat = prune(leaves[i].reshape(-1), weights[i].reshape(-1), counts, size)
        new_masks[i] = flat.reshape(leaves[i].shape)
    else:
      sizes = [leaves[i].size for i in ids]
      size = sum(sizes)
      final = sum(_final_count(leaves[i].size, sparsities[i], layouts[i]) for i in ids)
      counts = _pruning_counts(size, 1.0 - final / size, steps, power=self.power, **schedule)
      flat = prune(jnp.concatenate([leaves[i].reshape(-1) for i in ids]),
                   jnp.concatenate([weights[i].reshape(-1).astype(jnp.float32) for i in ids]),
                   counts, size)
      for i, part in zip(ids, jnp.split(flat, np.cumsum(sizes)[:-1])):
        layout = layouts[i]
        if layout is None or layout.structure.kind == "unstructured":
          new_masks[i] = part.reshape(leaves[i].shape)
          continue
        # The global threshold decides how many weights the layer keeps; its
        # structure decides which: whole units per group, the smallest dropped.
        n_groups, group_size = layout.groups()
        quantum = n_groups * layout.n_layers * layout.unit_size
        mask_u = layout.to_units(leaves[i])
        current = mask_u[0, :, 0].sum(dtype=jnp.int32)
        target = jnp.minimum(jnp.round(part.sum() / quantum).astype(jnp.int32), current)
        magnitude = layout.to_units(jnp.abs(weights[i]).astype(jnp.float32))
        new_masks[i] = layout.from_units(structure_lib.fill_groups(
            mask_u, magnitude, None, target, group_size))
    return treedef.unflatten(new_masks), state

  def _prune_groups(self, mask, weight, layout, sparsity, steps, index, schedule):
    """Layer-scope pruning within a structure: every group at the same count c(t)."""
    group_size = layout.groups()[1]
    final = 1.0 - layout.group_count(sparsity) / group_size
    counts = _pruning_counts(group_size, final, steps, power=self.power, **schedule)
    magnitude = layout.to_units(jnp.abs(weight).astype(jnp.float32))
    pruned = structure_lib.fill_groups(
        layout.to_units(mask), magnitude, None,
        jnp.asarray(counts)[index], _max_decrease(group_size, counts))
    return layout.from_units(pruned)


def _final_count(size: int, sparsity: float, layout) -> int:
  """A layer's active weights at the end: per slice and structure when it has one."""
  if _is_plain(layout):
    return masks_lib.num_active(size, sparsity)
  return layout.layer_count(sparsity) * layout.n_layers


class GlobalMagnitudePruning(MagnitudePruning):
  """:class:`MagnitudePruning` with one global magnitude threshold (``scope="global"``)."""
  name = "pruning_global"

  def __init__(self, scope: str = "global", power: float = 3.0):
    super().__init__(scope=scope, power=power)


METHODS: dict[str, type[Method]] = {
    "static": Static, "set": SET, "rigl": RigL,
    "snfs": SNFS, "rigl_sg": RigLSG, "rigl_sm": RigLSM,
    "pruning": MagnitudePruning, "pruning_global": GlobalMagnitudePruning,
    "srigl": SRigL,
}
if tuple(METHODS) != names.METHOD_NAMES:  # the config and --help list names.METHOD_NAMES
  raise ImportError(f"rigl_jax.names.METHOD_NAMES {names.METHOD_NAMES} differs from "
                    f"rigl_jax.methods.METHODS {tuple(METHODS)}")


def get_method(method: str | Method) -> Method:
  """A method object from its name (or the object itself)."""
  if isinstance(method, Method):
    return method
  if method not in METHODS:
    raise masks_lib.ArgumentError(
        "method", f"method must be one of {tuple(METHODS)} or a rigl_jax.methods.Method, "
        f"got {method!r}.")
  return METHODS[method]()
