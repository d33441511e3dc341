"""Sparse-training methods: how masks start and how they change.

A method is a small object the transform calls at fixed points; it never touches
the optimizer itself. The transform asks it for:

* ``initial_masks(key, params, sparsities)``: the masks at step 0;
* ``init(params, masks)`` / ``observe(state, grads, masks)``: a method state and
  its per-step update (e.g. a dense gradient momentum), both optional;
* ``update(ctx, state)``: on a mask-update step, the new masks. Connections
  active in both the old and new mask keep their weight and optimizer state;
  every other one (dropped or newly grown) restarts from zero.

Class attributes tell the transform what the method needs:
``updates_masks`` (False: never call ``update``), ``dense_inner_gradients``
(True: the inner optimizer sees dense gradients and keeps dense momentum).
New methods subclass :class:`Method` and are registered in ``METHODS``.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from rigl_jax import masks as masks_lib

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


def _flat_top_k(scores: jax.Array, k: int) -> jax.Array:
  """Indices of the ``k`` largest scores (ties: lower index first, as lax.top_k does)."""
  _, idx = jax.lax.top_k(scores, k)
  return idx


def drop_and_grow(mask: jax.Array, weight: jax.Array, grow_score: jax.Array,
                  n_drop: jax.Array, max_drop: int) -> jax.Array:
  """Drops the ``n_drop`` smallest-magnitude active weights, grows ``n_drop`` others.

  Growth picks the largest ``grow_score`` among the connections inactive after
  the drop (the just-dropped ones included). The active count never changes.
  ``max_drop`` is a static bound on ``n_drop`` so ``lax.top_k`` (much cheaper
  than a full sort) has a static size.

  Returns:
    The new mask. A connection dropped and grown again in the same update is
    simply kept (as in the authors' code): only connections new to the mask
    start from zero.
  """
  shape = mask.shape
  mask = mask.reshape(-1)
  if max_drop == 0:
    return mask.reshape(shape)
  lowest = jnp.finfo(jnp.float32).min
  selected = jnp.arange(max_drop) < n_drop

  magnitude = jnp.abs(weight.reshape(-1)).astype(jnp.float32)
  drop_idx = _flat_top_k(jnp.where(mask, -magnitude, lowest), max_drop)
  after_drop = mask.at[drop_idx].set(mask[drop_idx] & ~selected)

  score = grow_score.reshape(-1).astype(jnp.float32)
  grow_idx = _flat_top_k(jnp.where(after_drop, lowest, score), max_drop)
  grown = jnp.zeros_like(mask).at[grow_idx].set(selected)
  return (after_drop | grown).reshape(shape)


class Method:
  """Base class: the mask never changes (Static)."""
  name = "static"
  updates_masks = False
  dense_inner_gradients = False

  def initial_masks(self, key, params, sparsities):
    return masks_lib.random_masks(key, params, sparsities)

  def init(self, params, masks):
    del params, masks
    return ()

  def observe(self, state, grads, masks):
    del grads, masks
    return state

  def update(self, ctx: UpdateContext, state):
    return ctx.masks, state


class DropAndGrow(Method):
  """Per layer, drop the smallest weights and grow by ``grow_scores``, counts fixed."""
  updates_masks = True

  def grow_scores(self, ctx: UpdateContext, state) -> PyTree:
    raise NotImplementedError

  def update(self, ctx: UpdateContext, state):
    scores = self.grow_scores(ctx, state)
    leaves, treedef = jax.tree.flatten(ctx.masks)
    weights = treedef.flatten_up_to(ctx.params)
    score_leaves = treedef.flatten_up_to(scores)
    sparsities = treedef.flatten_up_to(ctx.sparsities)
    new_masks = []
    for mask, weight, score, s in zip(leaves, weights, score_leaves, sparsities):
      if s == 0.0:  # dense layers are never touched
        new_masks.append(mask)
        continue
      n_active = masks_lib.num_active(mask.size, s)
      max_drop = min(n_active, math.ceil(ctx.max_drop_fraction * n_active))
      n_drop = jnp.floor(ctx.drop_fraction * n_active).astype(jnp.int32)
      new_masks.append(drop_and_grow(mask, weight, score, n_drop, max_drop))
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


class Static(Method):
  """The initial random mask is kept for the whole run."""
  name = "static"


METHODS: dict[str, type[Method]] = {"static": Static, "set": SET, "rigl": RigL}


def get_method(method: str | Method) -> Method:
  """A method object from its name (or the object itself)."""
  if isinstance(method, Method):
    return method
  if method not in METHODS:
    raise ValueError(f"method must be one of {tuple(METHODS)} or a rigl_jax.methods.Method, "
                     f"got {method!r}.")
  return METHODS[method]()
