"""Theoretical FLOP counting for sparse conv / dense networks (the report's procedure).

The RigL paper and the ML Reproducibility Challenge 2020 report quote every method's
cost as multiples of the dense model's FLOPs. This module reproduces that count:

1. ``layer_costs`` traces a Flax model once (abstractly, with ``jax.eval_shape``, so
   even ImageNet ResNet-50 costs nothing) and records every ``nn.Conv`` and
   ``nn.Dense`` call: the kernel's parameter path, its shape, the group count and
   the per-example output size. No per-model tables.
2. ``layer_flops`` / ``forward_flops`` turn those records into inference FLOPs per
   example for given per-layer densities.
3. ``train_flops_per_step`` and ``multipliers`` apply the per-method training-cost
   formulas and normalise them against the dense model.

Counting convention (per example, per conv/dense call, kernel density ``d``)::

    fan_in    = prod(kernel.shape[:-1])      # k*k*c_in/groups for a conv, c_in for dense
    n_out     = outputs per example          # H_out*W_out*c_out for a conv
    mults     = fan_in*d * n_out  +  n_out   # dot products, plus one per output for ReLU
    adds      = (fan_in*d - 1) * n_out  [+ n_out if the layer has a bias]

The ReLU multiply is charged to EVERY conv and dense output -- shortcut 1x1 convs,
pre-activation convs and the classifier included -- whether or not a ReLU follows
in the actual graph. That is what the report's counter does (it builds a MicroNet
``Conv2D(..., activation="relu")`` / ``FullyConnected(..., "relu")`` op for every
layer). The ReLU multiply and the ``- 1`` addition then cancel, so a bias-free layer
costs exactly ``2 * d * MACs`` -- linear in the density, which is why the report's
uniform multipliers are 0.10x / 0.20x. With it the dense totals come out at the
report's figures: WRN-22-2 on 32x32 gives 3.155e8 (report 3.15e8) and the CIFAR
ResNet-50 (3x3 stem, no max-pool, stride on the 3x3 conv) 2.596e9 (report 2.59e9).
(With ``relu=False`` the totals drop by 0.1-0.2 %, so both readings are within 1 %
of the report; we follow the report's code.) BatchNorm, pooling, residual additions
and the softmax are not counted. Shortcut convs count like any other conv; leaving
them out would give 3.12e8 and 2.36e9, so they must be counted.

Densities are per kernel (the fraction of nonzero weights), keyed by the kernel's
'/'-joined path in ``variables["params"]``, the same strings a mask pytree's
leaves have.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from rigl_jax.layer_cost import LayerCost  # re-exported: rigl_jax.flops.LayerCost
from rigl_jax.masks import path_to_str

PyTree = Any

# Methods whose training cost ``train_flops_per_step`` knows.
TRAIN_METHODS = (
    "dense", "static", "set", "small_dense", "rigl", "rigl_sg", "rigl_sm", "snfs",
    "pruning", "lottery", "srigl",
)


def _leading_dim(x) -> int:
  # ShapeDtypeStructs have .shape but np.shape() cannot read them.
  shape = x.shape if hasattr(x, "shape") else np.shape(x)
  if len(shape) < 1:
    raise ValueError("sample_input must have a leading batch axis.")
  return int(shape[0])


def _lookup(params: Mapping, path: tuple[str, ...]):
  """The leaf of ``params`` at ``path``; KeyError names the path if it is missing."""
  node = params
  for key in path:
    if not isinstance(node, Mapping) or key not in node:
      raise KeyError(f"kernel path {'/'.join(path)!r} not found in variables['params'].")
    node = node[key]
  return node


def layer_costs(model: nn.Module, variables: PyTree, sample_input, **apply_kwargs) -> list[LayerCost]:
  """Traces ``model.apply(variables, sample_input, **apply_kwargs)`` and returns its layers.

  Every ``nn.Conv`` and ``nn.Dense`` call (subclasses included) is recorded in call
  order; a module called twice appears twice (its FLOPs are paid twice). Nothing is
  computed: the trace runs under ``jax.eval_shape``, so ``variables`` and
  ``sample_input`` may be real arrays or ``jax.ShapeDtypeStruct``s (e.g. from
  ``jax.eval_shape(model.init, ...)``).

  Args:
    model: a Flax linen module.
    variables: its variables, with the kernels under ``variables["params"]``.
    sample_input: an input batch (its first axis is the batch axis; the counts are
      per example, so a batch of 1 is enough).
    **apply_kwargs: passed to ``model.apply`` (e.g. ``train=False``). Keep them
      static: they are closed over, not traced.

  Returns:
    The list of ``LayerCost`` records.
  """
  batch = _leading_dim(sample_input)
  records: list[LayerCost] = []
  # Modules whose __call__ is running: a subclass calling super().__call__() passes
  # through the interceptor twice and must be recorded once (the outer call).
  active: list[int] = []

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if (context.method_name != "__call__" or not isinstance(module, (nn.Conv, nn.Dense))
        or id(module) in active):
      return next_fun(*args, **kwargs)
    active.append(id(module))
    try:
      out = next_fun(*args, **kwargs)
    finally:
      active.pop()
    x = args[0] if args else kwargs["inputs"]
    # The module's scope path is its position under the root, which is exactly its
    # key path in variables["params"] (no lifted transforms rename it here).
    key_path = tuple(module.scope.path) + ("kernel",)
    kernel = _lookup(variables["params"], key_path)
    kernel_shape = tuple(int(s) for s in kernel.shape)
    is_conv = isinstance(module, nn.Conv)
    records.append(LayerCost(
        path="/".join(key_path),
        kind="conv" if is_conv else "dense",
        kernel_shape=kernel_shape,
        input_shape=tuple(int(s) for s in x.shape[1:]),
        output_shape=tuple(int(s) for s in out.shape[1:]),
        feature_group_count=int(module.feature_group_count) if is_conv else 1,
        has_bias=bool(module.use_bias),
        # Flax kernels already hold c_in/groups in the second-to-last axis, so the
        # dot-product length is the product of all axes but the output one.
        fan_in=int(np.prod(kernel_shape[:-1])),
        # Outputs per example: any extra leading axes (sequence length, ...) count.
        outputs_per_example=int(np.prod(out.shape)) // batch,
    ))
    return out

  def run(v, x):
    with nn.intercept_methods(interceptor):
      return model.apply(v, x, **apply_kwargs)

  jax.eval_shape(run, variables, sample_input)
  return records


def _leaf_density(leaf, path: str) -> float:
  """A density from one leaf: a number is a density; an array is a mask or weights."""
  arr = np.asarray(leaf)
  if arr.ndim == 0:
    value = float(arr)
    if not 0.0 <= value <= 1.0:
      raise ValueError(f"density of {path!r} must be in [0, 1], got {value}.")
    return value
  # A bool mask: fraction of True. A float mask or masked weights: fraction nonzero
  # (the report's counter measured density as the fraction of nonzero weights).
  return float(np.count_nonzero(arr)) / arr.size


def resolve_densities(costs: Iterable[LayerCost], densities) -> dict[str, float]:
  """Per-layer densities ``{path: d}`` for the layers in ``costs``.

  ``densities`` may be:
    * ``None``: every layer dense;
    * a flat ``{"Dense_0/kernel": 0.1, ...}`` mapping of densities;
    * a pytree shaped like ``variables["params"]`` whose kernel leaves are
      densities (numbers), masks (bool arrays: fraction of True) or masked weights
      (fraction nonzero). Leaves that are not layer kernels (biases, BatchNorm) are
      ignored, ``None`` leaves mean dense.
  Layers absent from ``densities`` are dense. To pass sparsities (as returned by
  ``distributions.sparsity_distribution``) use ``densities_from_sparsities``.
  """
  layer_paths = {c.path for c in costs}
  if densities is None:
    return {}
  flat, _ = jax.tree_util.tree_flatten_with_path(densities)
  result = {}
  for key_path, leaf in flat:
    path = path_to_str(key_path)
    if path in layer_paths:
      result[path] = _leaf_density(leaf, path)
  if flat and not result:
    # Nothing lined up: almost surely a format mistake (e.g. a "params/" prefix),
    # which must not silently count as a dense model.
    given = ", ".join(path_to_str(p) for p, _ in flat[:4])
    known = ", ".join(sorted(layer_paths)[:4])
    raise ValueError(f"densities: no entry matches a layer path. Given paths look like "
                     f"{given}; layer paths look like {known}.")
  return result


def densities_from_sparsities(sparsities: PyTree) -> PyTree:
  """Turns a pytree (or flat mapping) of per-layer sparsities into densities."""
  return jax.tree.map(lambda s: 1.0 - float(s), sparsities)


def layer_flops(cost: LayerCost, density: float = 1.0, *, relu: bool = True) -> float:
  """Inference FLOPs per example of one layer at kernel density ``density``.

  Multiplications ``fan_in*d*n_out`` (+ ``n_out`` for the ReLU when ``relu``),
  additions ``(fan_in*d - 1)*n_out`` (+ ``n_out`` for a bias). The ``- 1`` is the
  ``n`` products needing only ``n - 1`` additions; it is floored at 0 so that an
  (almost) empty layer never counts negative additions.
  """
  if not 0.0 <= density <= 1.0:
    raise ValueError(f"density of {cost.path!r} must be in [0, 1], got {density}.")
  return float(_layer_flops(cost, density, relu, max))


def _layer_flops(cost: LayerCost, density, relu: bool, maximum):
  n_out = cost.outputs_per_example
  nnz_per_output = cost.fan_in * density
  mults = nnz_per_output * n_out + (n_out if relu else 0)
  adds = maximum(nnz_per_output - 1.0, 0.0) * n_out + (n_out if cost.has_bias else 0)
  return mults + adds


def masked_forward_flops(costs: Iterable[LayerCost], masks: PyTree, *,
                         relu: bool = True) -> jax.Array:
  """``forward_flops`` of a bool mask pytree as a float32 scalar that jit can trace.

  The train step counts the FLOPs of the masks each step's forward pass used, so
  the mean over training is exact whatever the logging interval.
  """
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  flat = {path_to_str(p): m for p, m in jax.tree_util.tree_flatten_with_path(masks)[0]}
  total = jnp.zeros([], jnp.float32)
  for cost in costs:
    mask = flat.get(cost.path)
    density = 1.0 if mask is None else jnp.mean(mask, dtype=jnp.float32)
    total = total + _layer_flops(cost, density, relu, jnp.maximum)
  return total


def forward_flops(costs: Iterable[LayerCost], densities=None, *, relu: bool = True) -> float:
  """Inference FLOPs per example of the whole network (``densities=None``: dense).

  See ``resolve_densities`` for the accepted ``densities`` formats.
  """
  costs = list(costs)
  per_layer = resolve_densities(costs, densities)
  return float(sum(layer_flops(c, per_layer.get(c.path, 1.0), relu=relu) for c in costs))


def train_flops_per_step(method: str, f_dense: float, f_sparse: float | None = None, *,
                         update_every: int = 100, f_final: float | None = None) -> float:
  """Training FLOPs per example per step, the backward pass costing 2x the forward.

  Args:
    method: one of ``TRAIN_METHODS``.
    f_dense: dense forward FLOPs ``f_D``.
    f_sparse: sparse forward FLOPs ``f_S``; for methods where it changes during
      training (snfs, rigl_sg, rigl_sm, pruning) the mean over training (see
      the trainer's per-step count); for small_dense the small model's FLOPs; for lottery
      the mean of the pruning run it starts from. Ignored for dense.
    update_every: ``dT``, steps between mask updates (RigL family only).
    f_final: lottery only: forward FLOPs of the final pruned network, which is
      retrained with a static mask.

  Returns:
    dense ``3 f_D``; static, set, small_dense ``3 f_S``; rigl (and rigl_sg/sm, srigl)
    ``(3 f_S dT + 2 f_S + f_D) / (dT + 1)`` (every dT-th step also needs the dense
    gradient); snfs ``2 f_S + f_D`` (dense gradient every step); pruning
    ``3 f_S``; lottery ``3 f_S + 3 f_final`` (the pruning run plus a sparse
    retraining of the same length).
  """
  if method not in TRAIN_METHODS:
    raise ValueError(f"method must be one of {TRAIN_METHODS}, got {method!r}.")
  if method == "dense":
    return 3.0 * f_dense
  if f_sparse is None:
    raise ValueError(f"method {method!r} needs f_sparse.")
  if method in ("static", "set", "small_dense", "pruning"):
    return 3.0 * f_sparse
  if method in ("rigl", "rigl_sg", "rigl_sm", "srigl"):
    if update_every < 1:
      raise ValueError(f"update_every must be >= 1, got {update_every}.")
    dt = update_every
    # dT ordinary sparse steps (forward + sparse backward), then one update step whose
    # backward computes the dense gradient: 2 f_S + f_D.
    return (3.0 * f_sparse * dt + 2.0 * f_sparse + f_dense) / (dt + 1)
  if method == "snfs":
    # Forward and input-gradient are sparse, but the weight gradient is dense every step.
    return 2.0 * f_sparse + f_dense
  # lottery
  if f_final is None:
    raise ValueError("method 'lottery' needs f_final (the final pruned network's FLOPs).")
  return 3.0 * f_sparse + 3.0 * f_final


def multipliers(method: str, f_dense: float, f_sparse: float | None = None, *,
                update_every: int = 100, f_final: float | None = None,
                train_scale: float = 1.0) -> tuple[float, float]:
  """(train, test) FLOP multipliers against the dense model, as in the report's tables.

  ``train = train_flops_per_step(...) * train_scale / (3 f_D)`` and
  ``test = f_final / f_D``, where ``f_final`` (inference FLOPs of the trained
  network) defaults to ``f_sparse`` (``f_D`` for dense). ``train_scale`` is the
  length of training relative to the dense baseline (2.0 for the report's "2x"
  rows).
  """
  train = train_flops_per_step(method, f_dense, f_sparse, update_every=update_every,
                               f_final=f_final) * train_scale
  if method == "dense":
    test = f_dense
  else:
    test = f_final if f_final is not None else f_sparse
  return train / (3.0 * f_dense), test / f_dense


# ----------------------------------------------------------------------------- command line


def model_costs(model: nn.Module, input_shape) -> list[LayerCost]:
  """``layer_costs`` of a model at one example of ``input_shape``, nothing allocated,
  plus the model's ``extra_layer_costs(input_shape)`` when it has them: products that
  are not ``nn.Dense``/``nn.Conv`` calls (a recurrent matrix applied at every step,
  attention scores)."""
  sample = jax.ShapeDtypeStruct((1,) + tuple(input_shape), np.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), sample)
  costs = layer_costs(model, variables, sample, train=False)
  extra = getattr(model, "extra_layer_costs", None)
  return costs + list(extra(tuple(input_shape))) if extra is not None else costs


def reference_dense_flops(c, num_classes: int, input_shape) -> float:
  """f_D of a config: the full-width dense model (Small-Dense is measured against it)."""
  from rigl_jax import models  # pylint: disable=import-outside-toplevel
  return forward_flops(model_costs(models.get_model(c.model, num_classes=num_classes),
                                   input_shape))


def pruning_mean_densities(final_sparsities: Mapping[str, float], sizes: Mapping[str, int],
                           *, total: int, update_every: int, start_step: int, end_step: int,
                           power: float = 3.0) -> dict[str, float]:
  """Each layer's density averaged over the ``total`` steps of gradual magnitude pruning.

  Layer ``l`` holds ``round((1 - s_l(t)) * N_l)`` weights from pruning step ``t`` on
  (the mask a pruning step makes serves the steps after it; the steps up to the first
  one are dense), ``s_l`` the cubic from 0 at ``start_step`` to ``final_sparsities[l]``
  at ``end_step``. For global pruning this spreads the global count over the layers
  in proportion to their final counts: the real split depends on the weights, so a
  finished run's ``summary.json`` (FLOPs of its real masks) is the exact figure.
  """
  from rigl_jax import masks, schedules  # pylint: disable=import-outside-toplevel
  steps = schedules.pruning_steps(update_every=update_every, start_step=start_step,
                                  end_step=end_step)
  steps = steps[steps < total]
  if total < 1 or steps.size == 0:
    return {path: 1.0 for path in final_sparsities}
  # The mask made at pruning step p serves steps p + 1 up to the next pruning step.
  spans = np.diff(np.append(steps, total - 1))
  dense_steps = int(steps[0]) + 1
  out = {}
  for path, final in final_sparsities.items():
    size = sizes[path]
    counts = [masks.num_active(size, schedules.polynomial_sparsity(
        int(t), initial=0.0, final=final, start_step=start_step, end_step=end_step,
        power=power)) for t in steps]
    out[path] = (dense_steps * size + float(np.dot(spans, counts))) / (total * size)
  return out


def config_flops(c, steps_per_epoch: int | None = None) -> dict:
  """FLOPs of a trainer config from the formulas, without training.

  Static, SET and RigL use the config's distribution. Pruning (both scopes) averages
  the cubic schedule over training (:func:`pruning_mean_densities`); SNFS and RigL-SG/SM
  use the initial distribution (their redistribution depends on training). Lottery
  adds its source pruning run: that run's ``summary.json`` when it has finished, else
  the formula for the config in its ``config.json``, else the formula for this config
  with ``method='pruning_global'`` (the report's pruning). A finished run's own
  ``summary.json`` holds the multipliers of its real masks.

  Args:
    c: a trainer config.
    steps_per_epoch: for configs that give their length in epochs (pruning and
      lottery need the number of steps); defaults to the data set's train size
      (after its default validation split) over the batch size.
  """
  import json  # pylint: disable=import-outside-toplevel
  import math  # pylint: disable=import-outside-toplevel
  import os  # pylint: disable=import-outside-toplevel

  from rigl_jax import config as config_lib  # pylint: disable=import-outside-toplevel
  from rigl_jax import data, distributions, masks, models  # pylint: disable=import-outside-toplevel

  config_lib.validate(c, need_lottery_source=False)
  input_shape, num_classes = data.input_spec(c.dataset, c.sequence_length)
  model = models.get_model(c.model, num_classes=num_classes,
                           width_multiplier=config_lib.width_multiplier(c))
  costs = model_costs(model, input_shape)
  f_dense = reference_dense_flops(c, num_classes, input_shape)
  sample = jax.ShapeDtypeStruct((1,) + tuple(input_shape), np.float32)
  params = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), sample)["params"]
  cost_paths = {cost.path for cost in costs}
  if c.method in config_lib.DENSE_METHODS:
    densities = {cost.path: 1.0 for cost in costs}
    sparsities = {}
  else:
    tree = distributions.sparsity_distribution(
        params, c.sparsity, c.distribution, dense=list(c.dense_layers) or None,
        custom=dict(c.custom_sparsity) or None,
        uniform_first_layer_dense=c.uniform_first_layer_dense,
        structure=config_lib.structure_of(c))
    sizes = {masks.path_to_str(path): math.prod(p.shape)
             for path, p in jax.tree_util.tree_flatten_with_path(params)[0]}
    sparsities = {masks.path_to_str(path): float(s)
                  for path, s in jax.tree_util.tree_flatten_with_path(tree)[0]}
    densities = {k: masks.num_active(sizes[k], s) / sizes[k] for k, s in sparsities.items()}
  densities = {k: v for k, v in densities.items() if k in cost_paths}
  f_final = forward_flops(costs, densities)
  f_sparse = f_final
  total = None
  if c.method in ("pruning", "pruning_global"):
    if steps_per_epoch is None:
      steps_per_epoch = data.train_steps_per_epoch(c.dataset, c.batch_size, c.validation_size)
    total = config_lib.total_steps(c, steps_per_epoch)
    mean = pruning_mean_densities(
        {k: v for k, v in sparsities.items() if k in cost_paths}, sizes, total=total,
        update_every=c.update_every, start_step=c.start_step,
        end_step=config_lib.end_step(c, total))
    f_sparse = forward_flops(costs, mean)
  method = {"pruning_global": "pruning", "lottery": "static"}.get(c.method, c.method)
  train_mult, test_mult = multipliers(method, f_dense, f_sparse, update_every=c.update_every,
                                      f_final=f_final, train_scale=c.train_multiplier)
  out = {
      "model": c.model, "dataset": c.dataset, "method": c.method,
      "distribution": c.distribution, "sparsity": c.sparsity,
      "dense_forward_flops": f_dense, "sparse_forward_flops": f_final,
      "mean_sparse_forward_flops": f_sparse,
      "train_multiplier": train_mult, "test_multiplier": test_mult,
      "layers": [{"path": cost.path, "density": densities.get(cost.path, 1.0),
                  "dense_flops": layer_flops(cost),
                  "sparse_flops": layer_flops(cost, densities.get(cost.path, 1.0))}
                 for cost in costs],
  }
  if c.method == "lottery":
    summary_path = os.path.join(c.source_workdir, "summary.json")
    config_path = os.path.join(c.source_workdir, "config.json")
    if c.source_workdir and os.path.isfile(summary_path):
      with open(summary_path) as f:
        source_mult, origin = float(json.load(f)["train_flops_multiplier"]), summary_path
    else:
      if c.source_workdir and os.path.isfile(config_path):
        with open(config_path) as f:
          source = config_lib.base_config()
          source.update(json.load(f))
        origin = config_path
      else:
        source = config_lib.base_config()
        source.update({k: v for k, v in c.items()})
        source.update(method="pruning_global", source_workdir="")
        origin = "this config with method='pruning_global'"
      source_mult = config_flops(source, steps_per_epoch)["train_multiplier"]
    out["retrain_multiplier"] = train_mult
    out["source_train_multiplier"] = source_mult
    out["source"] = origin
    out["train_multiplier"] = train_mult + source_mult
  return out


def main(argv):
  """Prints the config's FLOPs as JSON; any bad input is one ``error:`` line, exit 2."""
  import json  # pylint: disable=import-outside-toplevel

  from rigl_jax import cli  # pylint: disable=import-outside-toplevel
  from rigl_jax import config as config_lib  # pylint: disable=import-outside-toplevel
  from rigl_jax.masks import ArgumentError  # pylint: disable=import-outside-toplevel
  cli.no_arguments(argv)
  try:
    config = _FLAGS.config
    config.keys()  # ml_collections reports a config file that failed to load only now
  except Exception as e:  # pylint: disable=broad-except
    cli.fail(f"flags: --config: {_last_error_line(str(e))}")
  try:
    result = config_flops(config)
  except config_lib.ConfigError as e:
    cli.fail(e)
  except ArgumentError as e:
    cli.fail(f"config.{e.argument}: {e}")
  except (OSError, ValueError, KeyError) as e:  # an unreadable or damaged source run
    cli.fail(f"{type(e).__name__}: {e}")
  print(json.dumps(result, indent=2))


def _last_error_line(text: str) -> str:
  """The last non-empty line of an error text (ml_collections nests the cause)."""
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  return lines[-1] if lines else text


if __name__ == "__main__":
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file("config", None, "A config file from configs/.")
  flags.mark_flags_as_required(["config"])
  _FLAGS = flags.FLAGS
  from rigl_jax import cli  # pylint: disable=g-import-not-at-top
  cli.run(main)
