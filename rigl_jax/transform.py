"""``sparse_training``: an optax transformation that trains sparse networks.

The masks live in the optimizer state. Every step the wrapped (inner) optimizer
sees masked gradients and the returned updates keep inactive weights at exactly
zero. On a mask-update step, chosen inside jit with ``jax.lax.cond``, the method
drops and grows connections from the dense gradient instead of (by default)
taking the optimizer step.
"""

from __future__ import annotations

import logging
import numbers
import sys
import weakref
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rigl_jax import distributions
from rigl_jax import masks as masks_lib
from rigl_jax import methods as methods_lib
from rigl_jax import schedules
from rigl_jax import structure as structure_lib
from rigl_jax.masks import ArgumentError

PyTree = Any


class SparseTrainingState(NamedTuple):
  """State of :func:`sparse_training`."""
  step: jax.Array          # int32: how many updates were taken
  masks: PyTree            # bool, same structure as params; dense leaves all True
  inner_state: optax.OptState
  method_state: PyTree     # whatever the method keeps (e.g. dense momentum)
  rng: jax.Array           # uint32 raw key data (checkpoint-friendly)


def _is_masked_node(x) -> bool:
  return isinstance(x, optax.MaskedNode)


def reset_param_like(state: PyTree, params: PyTree, keep: PyTree) -> PyTree:
  """Zeroes the entries where ``keep`` is False in every subtree shaped like params.

  Optimizer states mirror the params in many places (sgd's trace, adam's mu and
  nu, MultiSteps' accumulators, a chain's or inject_hyperparams' inner states,
  ``optax.masked`` states with MaskedNode holes). Any subtree with the params'
  tree structure and leaf shapes is treated as per-parameter state.
  """
  params_def = jax.tree.structure(params)
  shapes = [jnp.shape(p) for p in jax.tree.leaves(params)]

  def is_param_like(node) -> bool:
    if _is_masked_node(node) or node is None:
      return False
    try:
      flat, treedef = jax.tree.flatten(node, is_leaf=_is_masked_node)
    except Exception:  # pylint: disable=broad-except
      return False
    if treedef != params_def:
      return False
    return all(_is_masked_node(x) or jnp.shape(x) == s for x, s in zip(flat, shapes))

  def reset(node):
    if not is_param_like(node):
      return node
    return jax.tree.map(
        lambda x, k: x if _is_masked_node(x) else jnp.where(k, x, jnp.zeros_like(x)),
        node, keep, is_leaf=_is_masked_node)

  if is_param_like(state):
    return reset(state)
  return jax.tree.map(reset, state, is_leaf=is_param_like)


def reset_inner_state(inner: optax.GradientTransformation, inner_state: PyTree,
                      params: PyTree, keep: PyTree) -> PyTree:
  """Zeroes the entries where ``keep`` is False in the per-parameter parts of
  ``inner_state``: those ``optax.tree_map_params`` finds (the optax way). For an
  inner transformation whose ``init`` cannot take tree_map_params' placeholder,
  the subtrees shaped like params (:func:`reset_param_like`)."""
  def reset(x, k):
    return x if _is_masked_node(x) else jnp.where(k, x, jnp.zeros_like(x))

  try:
    return optax.tree_map_params(inner, reset, inner_state, keep, is_leaf=_is_masked_node)
  except (TypeError, ValueError, AttributeError, KeyError, IndexError):
    return reset_param_like(inner_state, params, keep)


def find_state(opt_state: PyTree) -> SparseTrainingState:
  """The (first) :class:`SparseTrainingState` inside a possibly nested optax state."""
  found = [s for s in jax.tree.leaves(
      opt_state, is_leaf=lambda x: isinstance(x, SparseTrainingState))
           if isinstance(s, SparseTrainingState)]
  if not found:
    raise ValueError("opt_state: no SparseTrainingState inside; was the optimizer built "
                     "with rigl_jax.sparse_training?")
  return found[0]


def get_masks(opt_state: PyTree) -> PyTree:
  """The bool masks (same structure as params; dense leaves all True)."""
  return find_state(opt_state).masks


def apply_masks(params: PyTree, opt_state: PyTree) -> PyTree:
  """Zeroes the inactive weights of ``params``; call once after ``tx.init``."""
  return masks_lib.apply_masks(params, get_masks(opt_state))


def skip_step(opt_state: PyTree) -> PyTree:
  """``opt_state`` after a training step that was skipped (e.g. a non-finite loss).

  Only the step counter of every :class:`SparseTrainingState` inside moves on,
  so that update steps and drop fractions stay on the caller's step count; the
  masks, the inner state and the method state are kept. A mask update due on
  the skipped step does not happen. Other states pass through unchanged.
  """
  return jax.tree.map(
      lambda s: s._replace(step=s.step + 1) if isinstance(s, SparseTrainingState) else s,
      opt_state, is_leaf=lambda x: isinstance(x, SparseTrainingState))


def _as_int(name: str, value, minimum: int, minimum_text: str | None = None) -> int:
  """Any integral value (int, numpy integer) >= ``minimum``; bools and floats are not."""
  if (isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral) or
      value < minimum):
    raise ArgumentError(name, f"{name} must be an int >= {minimum_text or minimum}, "
                        f"got {value!r}.")
  return int(value)


def _check_structure(name: str, tree: PyTree, masks: PyTree) -> None:
  if jax.tree.structure(tree) != jax.tree.structure(masks):
    raise ValueError(
        f"sparse_training: {name} do not have the structure of the params the optimizer "
        f"was initialised with. Expected {jax.tree.structure(masks)}, got "
        f"{jax.tree.structure(tree)}.")


def _lookahead_init_code():
  return optax.lookahead(optax.identity(), 1, 0.5).init.__code__


def _reject_lookahead() -> None:
  """optax.lookahead keeps slow weights that no mask reaches: refuse to run under it."""
  try:
    caller = sys._getframe(2)  # pylint: disable=protected-access
  except ValueError:  # called from the outermost frame: not from lookahead
    return
  if caller.f_code is _lookahead_init_code():
    raise ValueError(
        "sparse_training cannot run inside optax.lookahead: lookahead keeps a dense copy "
        "of the slow weights and moves the fast weights towards it on every sync, which "
        "revives dropped connections (and its reset_state=True re-initialises the masks "
        "as integers). Apply the masks to both copies in your own lookahead loop, or use "
        "another optimizer.")


def _is_traced(tree) -> bool:
  return any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(tree))


def _masked_updates(updates: PyTree, params: PyTree, keep: PyTree) -> PyTree:
  # Where a connection is (or becomes) inactive the update is -param, so
  # params + updates is exactly 0 there, whatever the param held before.
  return jax.tree.map(lambda u, p, k: jnp.where(k, u, -p).astype(u.dtype), updates, params, keep)


def sparse_training(
    inner: optax.GradientTransformation,
    *,
    method: str | methods_lib.Method,
    sparsity: float,
    distribution: str = "erk",
    update_every: int = 100,
    end_step: int,
    drop_fraction: float = 0.3,
    drop_schedule: str | Callable = "cosine",
    start_step: int = 0,
    skip_inner_update_on_mask_step: bool = True,
    include=None,
    dense=None,
    custom: Mapping[str, float] | None = None,
    uniform_first_layer_dense: bool = True,
    seed: int = 0,
    structure=None,
    stacked: Mapping[str, int] | None = None,
    report_nonfinite: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """Wraps ``inner`` so that it trains a sparse network.

  Args:
    inner: any optax transformation (``optax.sgd``, a chain, inject_hyperparams...).
    method: ``"static"``, ``"set"``, ``"rigl"``, ``"snfs"``, ``"rigl_sg"``,
      ``"rigl_sm"``, ``"pruning"``, ``"pruning_global"`` (see
      ``rigl_jax.methods.METHODS``) or a :class:`rigl_jax.methods.Method`.
    sparsity: overall sparsity in [0, 1) of the sparsified layers.
    distribution: ``"uniform"``, ``"er"`` or ``"erk"``.
    update_every: steps between mask updates (dT).
    end_step: no mask update at or after this step (T_end); for pruning, the
      step at which the final sparsity is reached (pruning happens there too).
    drop_fraction: the drop fraction at ``start_step`` (alpha).
    drop_schedule: ``"cosine"``, ``"constant"`` or ``fn(step) -> fraction``.
    start_step: first step counted by the schedules.
    skip_inner_update_on_mask_step: on a mask-update step, change the masks
      instead of taking the optimizer step (as the authors' code does).
    include: which leaves may be sparse (regex(es) or ``fn(path, leaf)``;
      default every leaf with ndim >= 2).
    dense: leaves forced dense (regex(es) or predicate).
    custom: ``{regex: sparsity}`` for layers with their own sparsity.
    uniform_first_layer_dense: with ``distribution="uniform"``, keep the first
      sparsifiable layer dense (the paper's choice for a conv net's stem).
    seed: seeds the initial masks and any random growth.
    structure: ``"unstructured"`` (default; ``"constant_fan_in"`` for
      ``"srigl"``), ``"constant_fan_in"``, ``"N:M"`` (e.g. ``"2:4"``),
      ``"block:RxC"``, or ``{regex: structure}`` per layer (see
      :mod:`rigl_jax.structure`). Every mask update keeps the structure's counts
      exactly (per output unit, per group of M, whole blocks). The redistributing
      methods (snfs, rigl_sg, rigl_sm) need unstructured, unstacked layers.
    stacked: ``{regex: n}``: the first ``n`` axes of matching leaves index
      separate layers (``nn.scan`` / ``nnx.scan`` params): each slice gets its own
      distribution share, counts and top-k, and stacked biases stay dense.
    report_nonfinite: a debug check: log one warning (logger ``"rigl_jax"``) the
      first time a mask update sees NaN or inf weights or gradients. Counts stay
      exact either way (a NaN weight ranks as the smallest magnitude, a NaN
      gradient as no growth score). Off by default: it adds a host callback to
      the update, and JAX does not reuse executables with host callbacks from
      its persistent compilation cache.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; its state is (or holds) a
    :class:`SparseTrainingState`. ``update`` also takes ``mask_update=False``:
    trace no mask update (see :func:`mask_update_steps`).

  Example:
    >>> import jax, jax.numpy as jnp, optax, rigl_jax
    >>> params = {"w": jax.random.normal(jax.random.key(0), (64, 32)), "b": jnp.zeros(32)}
    >>> tx = rigl_jax.sparse_training(optax.sgd(0.1, momentum=0.9), method="rigl",
    ...                               sparsity=0.9, update_every=10, end_step=100)
    >>> state = tx.init(params)
    >>> params = rigl_jax.apply_masks(params, state)
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, state = tx.update(grads, state, params)
    >>> params = optax.apply_updates(params, updates)
    >>> int((params["w"] != 0).sum()), int(rigl_jax.get_masks(state)["w"].sum())
    (205, 205)
  """
  method = methods_lib.get_method(method)
  sparsity = distributions.check_sparsity(sparsity)
  if distribution not in distributions.DISTRIBUTIONS:
    raise ArgumentError("distribution", f"distribution must be one of "
                        f"{distributions.DISTRIBUTIONS}, got {distribution!r}.")
  update_every = _as_int("update_every", update_every, 1)
  start_step = _as_int("start_step", start_step, 0)
  end_step = _as_int("end_step", end_step, start_step, f"start_step ({start_step})")
  seed = _as_int("seed", seed, 0)
  drop_fraction = distributions.check_number("drop_fraction", drop_fraction, 0.0, 1.0)
  drop_fraction_fn = schedules.make_drop_fraction_fn(
      drop_schedule, initial=float(drop_fraction), start_step=start_step, end_step=end_step)
  max_drop_fraction = schedules.max_drop_fraction(drop_schedule, drop_fraction)
  inner = optax.with_extra_args_support(inner)
  nonfinite_report = _NonFiniteReport()
  if structure is None:
    structure = method.required_structure
  elif method.required_structure is not None and not isinstance(structure, Mapping) and \
      str(structure_lib.parse(structure)) != method.required_structure:
    raise ArgumentError("structure", f"structure: method {method.name!r} needs "
                        f"{method.required_structure!r}, got {structure!r}.")
  if isinstance(structure, str) or isinstance(structure, structure_lib.Structure):
    structure_lib.parse(structure)  # a bad name fails here, before any params are seen
  if stacked is not None and not isinstance(stacked, Mapping):
    raise ArgumentError("stacked", f"stacked must be a dict {{regex: number of leading "
                        f"axes}}, got {stacked!r}.")

  def layer_sparsities(params):
    # Shapes only: the same static answer at init and inside the jitted update.
    return distributions.sparsity_distribution(
        params, sparsity, distribution, dense=dense, custom=custom, include=include,
        uniform_first_layer_dense=uniform_first_layer_dense, structure=structure,
        stacked=stacked)

  def layer_layouts(params, sparsities):
    """Per-leaf layouts, or None when every leaf is unstructured and unstacked."""
    sparse = jax.tree.map(lambda s: s > 0.0, sparsities)
    layouts = structure_lib.layouts(params, structure, stacked, sparse=sparse)
    if structure_lib.is_trivial(layouts):
      return None
    leaves = jax.tree.leaves(layouts, is_leaf=lambda x: isinstance(x, structure_lib.Layout))
    sparse_leaves = jax.tree.leaves(sparse)
    if not method.supports_structure:
      raise ArgumentError("structure", f"structure: method {method.name!r} moves weights "
                          f"between layers one at a time and keeps no structure; use it "
                          f"with unstructured, unstacked layers (got structure="
                          f"{structure!r}, stacked={stacked!r}).")
    if method.required_structure and any(
        is_sparse and str(l.structure) != method.required_structure
        for l, is_sparse in zip(leaves, sparse_leaves)):
      raise ArgumentError("structure", f"structure: method {method.name!r} needs every "
                          f"sparse layer {method.required_structure!r}, got {structure!r}.")
    return layouts

  def init_fn(params):
    _reject_lookahead()
    key = jax.random.key(seed)
    if not jax.tree.leaves(params):
      # optax.tree_map_params initialises with a placeholder without leaves to find
      # the params-shaped parts of a state: the masks are one, like momentum.
      return SparseTrainingState(
          step=jnp.zeros([], jnp.int32), masks=params, inner_state=inner.init(params),
          method_state=method.init(params, params), rng=jax.random.key_data(key))
    sparsities = layer_sparsities(params)
    layouts = layer_layouts(params, sparsities)
    initial = (method.initial_masks(key, params, sparsities) if layouts is None
               else method.initial_masks(key, params, sparsities, layouts))
    # Each mask is placed like its param (sharded the same way on a mesh).
    masks = jax.tree.map(masks_lib.place_like, initial, params)
    masked_params = masks_lib.apply_masks(params, masks)
    return SparseTrainingState(
        step=jnp.zeros([], jnp.int32),
        masks=masks,
        inner_state=inner.init(masked_params),
        method_state=method.init(masked_params, masks),
        rng=jax.random.key_data(key),
    )

  def update_fn(grads, state, params=None, *, mask_update: bool = True, **extra_args):
    if params is None:
      raise ValueError("sparse_training needs params: call tx.update(grads, state, params).")
    if not isinstance(mask_update, bool):
      raise ArgumentError("mask_update", f"mask_update must be True or False (a Python "
                          f"bool, known when tracing), got {mask_update!r}.")
    _check_structure("grads", grads, state.masks)
    _check_structure("params", params, state.masks)
    if _is_traced((grads, state, params, extra_args)):
      return update_impl(grads, state, params, extra_args, mask_update)
    # Called eagerly (outside jit): one compiled update, reused on every call, instead
    # of tracing the cond's branches anew each time.
    return jitted_update(grads, state, params, extra_args, mask_update)

  def update_impl(grads, state, params, extra_args, mask_update):
    # Masks are bool; optax.tree_map_params (e.g. casting the per-parameter state
    # to bfloat16) maps them as params-shaped state: bool again, exactly.
    masks = jax.tree.map(lambda m: m if m.dtype == jnp.bool_ else m != 0, state.masks)
    method_state = method.observe(state.method_state, grads, masks)
    inner_grads = grads if method.dense_inner_gradients else masks_lib.apply_masks(grads, masks)

    updates, inner_state = inner.update(inner_grads, state.inner_state, params, **extra_args)
    if not (method.updates_masks and mask_update):
      return _masked_updates(updates, params, masks), SparseTrainingState(
          step=state.step + 1, masks=masks, inner_state=inner_state,
          method_state=method_state, rng=state.rng)

    def mask_step(_):
      # Scores and top-k work on whole layers: on Explicit mesh axes they see
      # replicated copies, and the new masks go back to the params' sharding.
      whole = lambda tree: jax.tree.map(masks_lib.replicate, tree)
      sparsities = layer_sparsities(params)
      ctx = methods_lib.UpdateContext(
          step=state.step,
          key=jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step),
          drop_fraction=jnp.asarray(drop_fraction_fn(state.step), jnp.float32),
          masks=whole(masks), params=whole(params), grads=whole(grads),
          sparsities=sparsities,
          max_drop_fraction=max_drop_fraction,
          start_step=start_step, end_step=end_step, update_every=update_every,
          inner_state=whole(inner_state), layouts=layer_layouts(params, sparsities))
      if report_nonfinite:
        jax.debug.callback(nonfinite_report, _any_nonfinite((params, grads)), state.step)
      new_masks, new_method_state = method.update(ctx, whole(method_state))
      return (jax.tree.map(masks_lib.place_like, new_masks, masks),
              jax.tree.map(masks_lib.place_like, new_method_state, method_state),
              jnp.ones([], bool))

    # Only the rare, expensive part (scores, top-k) sits inside the cond. The
    # optimizer step runs every step and the update step is applied with selects,
    # which XLA fuses with the optimizer's own elementwise work; a cond around the
    # optimizer would cost copies of every momentum leaf on every step.
    # The selects below read the flag as the cond returns it: computed from the
    # step, XLA copied its dozen scalar ops into every fusion that reads it (two
    # per leaf; ResNet-50's step: 32,191 -> 27,683 HLO ops, compile time within noise).
    new_masks, method_state, is_update = jax.lax.cond(
        method.is_update_step(state.step, update_every=update_every, start_step=start_step,
                              end_step=end_step),
        mask_step, lambda _: (masks, method_state, jnp.zeros([], bool)), None)
    if skip_inner_update_on_mask_step:
      updates = jax.tree.map(lambda u: jnp.where(is_update, jnp.zeros_like(u), u), updates)
      inner_state = jax.tree.map(lambda new, old: jnp.where(is_update, old, new),
                                 inner_state, state.inner_state)
    # Surviving connections keep their weight; the rest restart at 0. Which
    # connections keep their optimizer state is the method's call, on update steps.
    survivors = jax.tree.map(jnp.logical_and, new_masks, masks)
    keep_state = jax.tree.map(lambda k: k | ~is_update,
                              method.keep_inner_state(masks, new_masks))
    inner_state = reset_inner_state(inner, inner_state, params, keep_state)
    updates = _masked_updates(updates, params, survivors)
    masks = new_masks
    new_state = SparseTrainingState(
        step=state.step + 1, masks=masks, inner_state=inner_state,
        method_state=method_state, rng=state.rng)
    return updates, new_state

  jitted_update = jax.jit(update_impl, static_argnums=4)

  def update_steps(start: int, stop: int) -> np.ndarray:
    steps = np.arange(start, stop, dtype=np.int64)
    if not method.updates_masks:
      return steps[:0]
    flags = np.broadcast_to(np.asarray(method.is_update_step(
        steps, update_every=update_every, start_step=start_step, end_step=end_step)),
        steps.shape)
    return steps[flags]

  _UPDATE_SCHEDULES[update_fn] = update_steps
  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# The update function of a sparse_training transform -> its mask_update_steps.
_UPDATE_SCHEDULES: "weakref.WeakKeyDictionary[Callable, Callable]" = weakref.WeakKeyDictionary()


def mask_update_steps(tx: optax.GradientTransformation, start: int, stop: int) -> np.ndarray:
  """The optimizer steps in ``[start, stop)`` on which ``tx`` (as
  :func:`sparse_training` returned it) changes its masks (a step counts as the
  state's step before the update), as a sorted int64 array.

  A training loop can then compile two programs: the step it runs almost always,
  traced with ``tx.update(..., mask_update=False)`` (no mask-update branch, so it
  compiles about as fast as a dense step), and the whole step, with the default
  ``mask_update=True``, for the steps listed here, compiled when first needed or
  on a thread of its own. Together they give the numbers of the single program,
  bit for bit. ``mask_update=False`` on a listed step would skip that update:
  the caller's contract.

  Example:
    >>> import optax, rigl_jax
    >>> tx = rigl_jax.sparse_training(optax.sgd(0.1), method="rigl", sparsity=0.9,
    ...                               update_every=100, end_step=1000)
    >>> rigl_jax.mask_update_steps(tx, 0, 400).tolist()
    [100, 200, 300]
  """
  try:
    update_steps = _UPDATE_SCHEDULES.get(getattr(tx, "update", None))
  except TypeError:  # no update function, or one that takes no weak reference
    update_steps = None
  if update_steps is None:
    raise ArgumentError("tx", "mask_update_steps needs the transformation sparse_training "
                        f"returned (not one wrapping it), got {type(tx).__name__}.")
  return update_steps(int(start), int(stop))


_LOGGER = logging.getLogger("rigl_jax")


class _NonFiniteReport:
  """Says once per transform that a mask update saw NaN or inf weights or gradients."""

  def __init__(self):
    self.said = False

  def __call__(self, bad, step):
    if bool(bad) and not self.said:
      self.said = True
      _LOGGER.warning(
          "sparse_training: the mask update at step %d saw non-finite weights or "
          "gradients. Masks keep their exact counts (a NaN weight ranks as the smallest "
          "magnitude, a NaN gradient as no growth score), but a weight that is inf or "
          "NaN stays so when its connection is dropped: look for the overflow (e.g. "
          "float16 with adam's eps=1e-8).", int(step))


def _any_nonfinite(trees) -> jax.Array:
  leaves = [x for x in jax.tree.leaves(trees) if jnp.issubdtype(x.dtype, jnp.floating)]
  if not leaves:
    return jnp.zeros([], bool)
  return jnp.any(jnp.stack([jnp.any(~jnp.isfinite(x)) for x in leaves]))
