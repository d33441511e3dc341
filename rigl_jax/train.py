"""The trainer: ``train_and_evaluate(config, workdir)``.

In the order a run goes: :func:`setup` (config, data, model, optimizer; writes
nothing), :func:`restore_or_create` (the checkpoint or the step-0 state of
:func:`create_train_state`), :func:`train_loop` (one jitted step over a
``jax.make_mesh`` of every device, batch sharded on ``data``, state replicated),
and :func:`summarize`. The run log is ``rigl_jax.run_log``, the workdir's other
files are ``rigl_jax.workdir``, checkpoints are ``rigl_jax.checkpoint``.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import signal
import threading
import time
import zlib
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import rigl_jax
from rigl_jax import checkpoint as checkpoint_lib
from rigl_jax import config as config_lib
from rigl_jax import data as data_lib
from rigl_jax import flops as flops_lib
from rigl_jax import masks as masks_lib
from rigl_jax import methods as methods_lib
from rigl_jax import models, paths, run_log, schedules
from rigl_jax import watchdog as watchdog_lib
from rigl_jax import workdir as workdir_lib

PyTree = Any


class TrainState(NamedTuple):
  step: jax.Array            # int32: steps taken
  params: PyTree
  batch_stats: PyTree
  opt_state: PyTree
  rng: jax.Array             # uint32 key data, folded with the step for stochastic layers
  nonfinite_step: jax.Array  # int32: first step with a non-finite loss or gradient, -1 if none
  # float32 [2]: compensated (Kahan) sum over the steps taken of the forward FLOPs per
  # example of the masks each step used, and its running error. Checkpointed, so
  # training FLOPs survive a resume whatever happens to metrics.jsonl.
  forward_flops_sum: jax.Array


# ----------------------------------------------------------------------------- optimizer


def learning_rate_fn(c, steps_per_epoch: int):
  """Linear warm-up, then the base rate times ``lr_drop_factor`` per drop passed."""
  warmup = config_lib.warmup_steps(c, steps_per_epoch)
  drop_steps = config_lib.lr_drop_steps(c, warmup)
  drops = jnp.asarray(drop_steps or [np.iinfo(np.int32).max], jnp.int32)
  n_drops = len(drop_steps)

  def fn(step):
    passed = jnp.sum(step >= drops) if n_drops else 0
    lr = c.learning_rate * c.lr_drop_factor ** passed
    if warmup > 0:
      lr = lr * jnp.minimum(1.0, (step + 1) / warmup)
    return jnp.asarray(lr, jnp.float32)

  return fn


def _kernels_only(params):
  return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


def set_learning_rate(opt_state, lr):
  """Writes ``lr`` into every inject_hyperparams state: the rate follows the global step,
  also across mask-update steps on which the inner optimizer does not step."""
  is_inject = lambda x: isinstance(x, optax.InjectStatefulHyperparamsState)

  def set_lr(node):
    if not is_inject(node):
      return node
    hyper = dict(node.hyperparams)
    hyper["learning_rate"] = jnp.asarray(lr, hyper["learning_rate"].dtype)
    return node._replace(hyperparams=hyper)

  return jax.tree.map(set_lr, opt_state, is_leaf=is_inject)


class GivenMasks(methods_lib.Static):
  """A static method whose masks come from elsewhere (the lottery ticket's pruned mask)."""
  name = "given_masks"

  def __init__(self, masks):
    self.masks = masks

  def initial_masks(self, key, params, sparsities, layouts=None):
    del key, sparsities, layouts
    return jax.tree.map(lambda m, p: jnp.asarray(m, bool).reshape(jnp.shape(p)), self.masks, params)


def warn_if_far_from_sparsity(c, params_shape) -> None:
  """Warns when the kernels as a whole end up much denser than ``config.sparsity``
  (uniform keeps the first layer dense, and an MLP's first layer holds most weights)."""
  if c.method == "lottery" or c.distribution_source:
    return
  sparsities = rigl_jax.sparsity_distribution(
      params_shape, c.sparsity, c.distribution, dense=list(c.dense_layers) or None,
      custom=dict(c.custom_sparsity) or None,
      uniform_first_layer_dense=c.uniform_first_layer_dense, structure=config_lib.structure_of(c))
  active = total = 0
  for p, s in zip(jax.tree.leaves(params_shape), jax.tree.leaves(sparsities)):
    if len(p.shape) >= 2:
      size = int(np.prod(p.shape))
      active, total = active + masks_lib.num_active(size, s), total + size
  density = active / max(total, 1)
  if density > (1.0 - c.sparsity) + 0.05:
    logging.warning(
        "config.sparsity=%s, but the kernels as a whole will be %.1f%% dense (%.1f%% "
        "sparse): distribution=%r leaves some layers dense%s.", c.sparsity, 100 * density,
        100 * (1 - density), c.distribution,
        " (uniform keeps the first layer dense; --config.uniform_first_layer_dense=False "
        "sparsifies it too)" if c.distribution == "uniform" and c.uniform_first_layer_dense
        else "")


def method_of(c, *, lottery_masks=None, output_layer: str | None = None):
  """The core's method for config ``c``: a name, or an object carrying its settings."""
  if c.method == "lottery":
    return GivenMasks(lottery_masks)
  if c.method == "srigl":
    # The authors exempt the classifier from ablation (configs/model/resnet18.yaml l.3-4).
    no_ablation = list(c.srigl_no_ablation) or (
        [f"^{re.escape(output_layer)}$"] if output_layer else None)
    return methods_lib.SRigL(gamma_sal=c.srigl_gamma_sal, no_ablation=no_ablation)
  return c.method


def make_optimizer(c, *, total: int, lottery_masks=None,
                   output_layer: str | None = None) -> optax.GradientTransformation:
  """SGD (Nesterov) or Adam, with kernel-only weight decay (added to the gradient, as
  the report's SGD does) and optional global-norm clipping, wrapped for sparse training."""
  if c.optimizer == "adam":
    base = optax.inject_hyperparams(optax.adam)(learning_rate=c.learning_rate, b1=c.momentum)
  else:
    base = optax.inject_hyperparams(optax.sgd)(
        learning_rate=c.learning_rate, momentum=c.momentum, nesterov=c.nesterov)
  clip = [optax.clip_by_global_norm(c.grad_clip_norm)] if c.grad_clip_norm > 0 else []
  inner = optax.chain(*clip, optax.add_decayed_weights(c.weight_decay, mask=_kernels_only),
                      base)
  if c.method in config_lib.DENSE_METHODS:
    return inner
  method = method_of(c, lottery_masks=lottery_masks, output_layer=output_layer)
  return rigl_jax.sparse_training(
      inner,
      method=method,
      sparsity=c.sparsity,
      distribution=c.distribution,
      update_every=c.update_every,
      end_step=max(config_lib.end_step(c, total), c.start_step),
      start_step=c.start_step,
      drop_fraction=c.drop_fraction,
      drop_schedule=c.drop_schedule,
      skip_inner_update_on_mask_step=c.skip_inner_update_on_mask_step,
      dense=list(c.dense_layers) or None,
      custom=(workdir_lib.densities_from_run(c) if c.distribution_source
              else dict(c.custom_sparsity) or None),
      uniform_first_layer_dense=c.uniform_first_layer_dense,
      seed=c.seed,
      structure=config_lib.structure_of(c),
  )


# ----------------------------------------------------------------------------- state


def create_train_state(model, tx, sample, key, *, sparse: bool, params=None) -> TrainState:
  """The state at step 0, built the same way by the trainer, export and the benchmarks
  (call it under ``jax.jit`` or ``jax.eval_shape``): the model initialised from
  ``key`` (``params`` replace its weights, as a lottery ticket's original ones do),
  the optimizer state, and, for sparse methods, the params with the initial masks
  applied."""
  variables = model.init(key, sample, train=False)
  params = variables["params"] if params is None else params
  opt_state = tx.init(params)
  if sparse:
    params = rigl_jax.apply_masks(params, opt_state)
  return TrainState(step=jnp.zeros([], jnp.int32), params=params,
                    batch_stats=variables.get("batch_stats", {}), opt_state=opt_state,
                    rng=jax.random.key_data(jax.random.fold_in(key, 1)),
                    nonfinite_step=jnp.full([], -1, jnp.int32),
                    forward_flops_sum=jnp.zeros([2], jnp.float32))


# ----------------------------------------------------------------------------- steps


def cross_entropy(logits, labels, num_classes: int, label_smoothing: float):
  targets = jax.nn.one_hot(labels, num_classes)
  if label_smoothing:
    targets = optax.smooth_labels(targets, label_smoothing)
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def _all_finite(tree) -> jax.Array:
  return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def kahan_add(total: jax.Array, value: jax.Array) -> jax.Array:
  """``total`` = [sum, compensation] plus ``value``, compensated: float32 sums of
  about 1e5 terms stay exact to float32 rounding (a plain sum would drift by ~1e-3)."""
  y = value - total[1]
  t = total[0] + y
  return jnp.stack([t, (t - total[0]) - y])


def make_train_step(model, tx, c, num_classes: int, lr_fn, costs, *, mask_update: bool = True):
  """The train step; with ``mask_update=False`` the sparse transform traces no mask
  update (see :class:`StepPrograms`)."""
  skip_bad = c.on_nonfinite == "skip"
  sparse = c.method not in config_lib.DENSE_METHODS
  update_args = {"mask_update": mask_update} if sparse else {}

  def train_step(state: TrainState, batch):
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

    def loss_fn(params):
      logits, new_vars = model.apply(
          {"params": params, "batch_stats": state.batch_stats}, batch["image"], train=True,
          mutable=["batch_stats"], rngs={"dropout": rng})
      loss = cross_entropy(logits, batch["label"], num_classes, c.label_smoothing).mean()
      return loss, (logits, new_vars.get("batch_stats", state.batch_stats))

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    lr = lr_fn(state.step)
    opt_state = set_learning_rate(state.opt_state, lr)
    updates, opt_state = tx.update(grads, opt_state, state.params, **update_args)
    params = optax.apply_updates(state.params, updates)

    finite = jnp.isfinite(loss) & _all_finite(grads)
    # A bad batch leaves the state untouched. With "stop" the state also freezes
    # from then on, so the host can stop at its next check holding the last good
    # state; with "skip" training goes on with the next batch.
    healthy = state.nonfinite_step < 0
    accept = finite if skip_bad else finite & healthy
    new_state = state._replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                               opt_state=opt_state)
    # The sparse schedule's step counter moves on with the global step, so a
    # skipped batch does not shift later mask updates.
    kept = state._replace(step=state.step + 1, opt_state=rigl_jax.skip_step(state.opt_state))
    new_state = jax.tree.map(lambda a, b: jnp.where(accept, a, b), new_state, kept)
    first_bad = jnp.where(~finite & (state.nonfinite_step < 0), state.step, state.nonfinite_step)
    # Every step computed its forward and backward pass, accepted or not.
    step_flops = flops_lib.masked_forward_flops(
        costs, rigl_jax.get_masks(state.opt_state) if sparse else {})
    new_state = new_state._replace(
        nonfinite_step=first_bad if not skip_bad else state.nonfinite_step,
        forward_flops_sum=kahan_add(state.forward_flops_sum, step_flops))
    metrics = {
        "loss": loss,
        "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"]),
        "learning_rate": lr,
        "nonfinite": (~finite).astype(jnp.int32),
    }
    return new_state, metrics

  return train_step


def make_eval_step(model, num_classes: int):
  """Sums of correct predictions, loss and count over the real entries of a batch:
  examples (``mask [batch]``) or, for language models, characters (``mask [batch,
  length]``)."""
  def eval_step(state: TrainState, batch):
    logits = model.apply({"params": state.params, "batch_stats": state.batch_stats},
                         batch["image"], train=False)
    loss = cross_entropy(logits, batch["label"], num_classes, 0.0)
    weight = batch["mask"].astype(jnp.float32)
    weight = jnp.broadcast_to(weight.reshape(weight.shape + (1,) * (loss.ndim - weight.ndim)),
                              loss.shape)
    correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
    return {"correct": jnp.sum(correct * weight), "loss": jnp.sum(loss * weight),
            "count": jnp.sum(weight)}
  return eval_step


# ----------------------------------------------------------------------------- helpers


class Preemption:
  """Turns SIGTERM, SIGHUP and a first Ctrl-C (SIGINT) into a flag the loop checks
  after each step: the run saves and exits 0. A second Ctrl-C stops at once (the last
  checkpoint is kept).

  With several processes, jax's preemption notifier owns SIGTERM: a notice to any
  process makes every process stop at the same agreed step (``check`` must be
  called after every step), so that all of them take part in the same save.
  """

  def __init__(self):
    self.requested = False
    self._previous = {}
    self._multi_process = jax.process_count() > 1

  def __enter__(self):
    # SIGHUP (the terminal closed) stops the run like SIGTERM instead of killing it.
    signals = ((signal.SIGINT, signal.SIGHUP) if self._multi_process
               else (signal.SIGTERM, signal.SIGINT, signal.SIGHUP))
    for signum in signals:
      try:
        self._previous[signum] = signal.signal(signum, self._handle)
      except ValueError:  # not the main thread: leave signals alone
        pass
    return self

  def check(self, step: int) -> bool:
    """Whether to save and stop after ``step``; read once per step."""
    if self._multi_process and not self.requested:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      self.requested = bool(multihost_utils.reached_preemption_sync_point(step))
    return self.requested

  def _handle(self, signum, frame):
    del frame
    if signum == signal.SIGHUP and self._multi_process:
      os.kill(os.getpid(), signal.SIGTERM)  # jax's notifier: every process stops together
      return
    if signum == signal.SIGINT:
      if self.requested:
        raise KeyboardInterrupt
      logging.warning("Ctrl-C: saving after this step; press Ctrl-C again to stop at once.")
    self.requested = True

  def __exit__(self, *exc):
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)


def _to_host(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


def state_digest(state: TrainState) -> str:
  """CRC32 of this process's own copy of the state (step, params, BN statistics,
  optimizer state with the masks, rng): equal digests mean bit-identical states,
  across reruns, resumes and the processes of one run."""
  crc = 0
  for leaf in jax.tree.leaves(state):
    local = leaf.addressable_data(0) if isinstance(leaf, jax.Array) else leaf
    crc = zlib.crc32(np.ascontiguousarray(np.asarray(local)).reshape(-1).view(np.uint8), crc)
  return f"{crc:08x}"


# ----------------------------------------------------------------------------- main loop


# ----------------------------------------------------------------------------- the run


class Setup(NamedTuple):
  """Everything a run builds from its config before it has a state."""
  config: ml_collections.ConfigDict
  pipeline: Any            # rigl_jax.data pipeline
  model: Any               # flax module
  tx: optax.GradientTransformation
  total_steps: int
  sparse: bool
  costs: Any               # rigl_jax.flops layer costs of the model
  dense_flops: float       # forward FLOPs per example of the dense reference model
  initial_params: Any      # lottery: the source run's initial params, else None
  source_cost: dict | None  # lottery: the source run's training cost, else None
  drop_fraction_fn: Any    # step -> the drop fraction of the mask update at that step


def check_sparse_optimizer(tx, params_shape) -> None:
  """Builds the masks' shapes once, so that a bad pattern or a sparsity that leaves a
  layer empty fails here, naming the config field, before anything is compiled."""
  try:
    jax.eval_shape(tx.init, params_shape)
  except rigl_jax.ArgumentError as e:
    field = {"dense": "dense_layers", "custom": "custom_sparsity", "sparsity": "sparsity",
             "params": "model", "distribution": "distribution"}.get(e.argument, e.argument)
    raise config_lib.ConfigError(f"config.{field}: {e}") from None


def setup(c: ml_collections.ConfigDict, workdir: str) -> Setup:
  """Validates the config and the workdir, and builds data, model and optimizer;
  writes nothing."""
  config_lib.validate(c, device_count=jax.device_count())
  workdir_lib.check_path(workdir)
  try:
    pipeline = data_lib.get_pipeline(
        c.dataset, global_batch_size=c.batch_size,
        eval_batch_size=config_lib.eval_batch_size_for(c, jax.device_count()),
        seed=c.seed, validation_size=None if c.validation_size < 0 else c.validation_size,
        data_dir=c.data_dir or None, augmentation=c.augmentation,
        sequence_length=c.sequence_length)
  except ValueError as e:  # sizes that do not fit the data set
    raise config_lib.ConfigError(f"config.dataset={c.dataset!r}: {e}") from None
  except FileNotFoundError as e:  # local text files missing
    if c.dataset not in data_lib.text.TEXT_DATASETS:
      raise
    raise config_lib.ConfigError(f"config.data_dir: {e}") from None
  workdir_lib.check_config(c, workdir)
  info = pipeline.info
  total = config_lib.total_steps(c, pipeline.steps_per_epoch)
  if total > config_lib.INT_MAX:
    raise config_lib.ConfigError(
        f"config.num_epochs: {c.num_epochs} epochs x {pipeline.steps_per_epoch} steps x "
        f"train_multiplier={c.train_multiplier} is {total} steps, more than a step counter "
        f"holds ({config_lib.INT_MAX})")
  if total < 1:
    raise config_lib.ConfigError(
        f"config.num_train_steps: the run would train 0 steps (num_train_steps="
        f"{c.num_train_steps}, num_epochs={c.num_epochs}, train_multiplier="
        f"{c.train_multiplier}); give at least one step")
  end = config_lib.end_step(c, total)
  if end < c.start_step:
    raise config_lib.ConfigError(f"config.end_step: resolves to {end}, before "
                                 f"start_step={c.start_step}")
  model = models.get_model(c.model, num_classes=info.num_classes,
                           width_multiplier=config_lib.width_multiplier(c),
                           dtype=jnp.dtype(c.dtype), dropout_rate=config_lib.dropout_rate(c))
  sample = jnp.zeros((1,) + tuple(info.input_shape), jnp.float32)
  params_shape = jax.eval_shape(
      lambda: model.init(jax.random.key(c.seed), sample, train=False))["params"]
  lottery_masks = initial_params = source_cost = None
  if c.method == "lottery":
    lottery_masks, initial_params, source_cost = workdir_lib.load_lottery_source(c, params_shape)
  costs = flops_lib.model_costs(model, info.input_shape)
  tx = make_optimizer(c, total=total, lottery_masks=lottery_masks,
                      output_layer=costs[-1].path if costs else None)
  sparse = c.method not in config_lib.DENSE_METHODS
  if sparse:
    check_sparse_optimizer(tx, params_shape)
    warn_if_far_from_sparsity(c, params_shape)
  return Setup(config=c, pipeline=pipeline, model=model, tx=tx, total_steps=total,
               sparse=sparse, costs=costs,
               dense_flops=flops_lib.reference_dense_flops(c, info.num_classes,
                                                          info.input_shape),
               initial_params=initial_params, source_cost=source_cost,
               drop_fraction_fn=schedules.make_drop_fraction_fn(
                   c.drop_schedule, initial=c.drop_fraction, start_step=c.start_step,
                   end_step=end))


def init_fn(s: Setup):
  """The function that builds the step-0 state (jit it, or eval_shape it)."""
  sample = jnp.zeros((1,) + tuple(s.pipeline.info.input_shape), jnp.float32)
  params = None if s.initial_params is None else s.initial_params["params"]
  return lambda: create_train_state(s.model, s.tx, sample, jax.random.key(s.config.seed),
                                    sparse=s.sparse, params=params)


def restore_or_create(s: Setup, ckpt: checkpoint_lib.Checkpointer, sharding,
                      workdir: str) -> tuple[TrainState, int]:
  """The newest good checkpoint, or the step-0 state (whose params are saved as
  ``initial_params`` for a later lottery ticket)."""
  init = init_fn(s)
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                        jax.eval_shape(init))
  restored = ckpt.restore_latest(target)
  if restored is not None:
    start_step, state = restored
    logging.info("Resumed %s at step %d of %d.", workdir, start_step, s.total_steps)
    return state, start_step
  state = jax.jit(init, out_shardings=sharding)()
  if s.sparse:
    workdir_lib.save_tree(paths.join(workdir, "initial_params"),
                          {"params": _to_host(state.params)})
  logging.info("Starting %s from scratch: %d steps.", workdir, s.total_steps)
  return state, 0


def masks_of(s: Setup, state: TrainState):
  return _to_host(rigl_jax.get_masks(state.opt_state)) if s.sparse else None


def training_flops(s: Setup, state: TrainState) -> tuple[float, float | None]:
  """(training FLOPs, mean forward FLOPs per example) over the steps taken, from the
  state's counter. Every method's per-step cost is affine in the step's forward
  FLOPs, so the total is the formula at the mean, times the steps and the batch."""
  steps = int(jax.device_get(state.step))
  if not steps:
    return 0.0, None
  total, compensation = np.asarray(jax.device_get(state.forward_flops_sum), np.float64)
  f_mean = float(total - compensation) / steps
  per_example = flops_lib.train_flops_per_step(
      flops_method(s.config), s.dense_flops, f_mean, update_every=s.config.update_every,
      f_final=f_mean)
  return per_example * s.config.batch_size * steps, f_mean


def flops_method(c) -> str:
  """The FLOP formula a method's training follows."""
  return {"pruning_global": "pruning", "lottery": "static", "srigl": "rigl"}.get(
      c.method, c.method)


DROP_AND_GROW_METHODS = ("set", "rigl", "snfs", "rigl_sg", "rigl_sm", "srigl")


def state_fields(s: Setup, state: TrainState, step: int) -> dict:
  """What the log records of the state after ``step``: densities, training FLOPs and
  the drop fraction in force."""
  masks = masks_of(s, state)
  fields = {
      "drop_fraction": (float(s.drop_fraction_fn(step - 1)) if s.config.method in
                        DROP_AND_GROW_METHODS else 0.0),
      "global_density": masks_lib.global_density(masks) if s.sparse else 1.0,
      "train_flops": training_flops(s, state)[0],
  }
  if s.sparse:  # per-kernel densities: they move under redistribution and pruning
    fields["layer_densities"] = {
        k: v for (k, v), m in zip(masks_lib.layer_densities(masks).items(),
                                  jax.tree.leaves(masks)) if masks_lib.is_kernel_shape(m.shape)}
  return fields


def evaluate(eval_step, state: TrainState, pipeline, split: str, to_global,
             beat=lambda what: None) -> dict:
  """Accuracy and mean loss over every example of ``split`` (every character, for
  text, with the loss also in bits per character)."""
  totals = {"correct": 0.0, "loss": 0.0, "count": 0.0}
  for i, batch in enumerate(pipeline.eval_batches(split)):
    out = jax.device_get(eval_step(state, to_global(batch)))
    beat(f"{split} batch {i + 1}")
    for k in totals:
      totals[k] += float(out[k])
  n = max(totals["count"], 1.0)
  result = {"accuracy": totals["correct"] / n, "loss": totals["loss"] / n}
  if pipeline.info.sequence_length:
    result["bits_per_char"] = result["loss"] / math.log(2)
  return result


def stop_if_nonfinite(c, state: TrainState, ckpt, log: run_log.RunLog) -> None:
  """With ``on_nonfinite="stop"``: raises once a step has had a non-finite loss or
  gradient (the state froze at the step before it; its last checkpoint is kept)."""
  bad = int(jax.device_get(state.nonfinite_step))
  if bad < 0 or c.on_nonfinite != "stop":
    return
  log.write_event({"step": int(jax.device_get(state.step)), "event": "nonfinite",
                   "nonfinite_step": bad})
  ckpt.close()
  latest = ckpt.latest_step()
  kept = (f"the last good checkpoint (step {latest}) is kept" if latest is not None
          else "no checkpoint had been written yet")
  raise FloatingPointError(
      f"non-finite loss or gradient at step {bad}; stopped, {kept}. Set "
      f"--config.on_nonfinite=skip to skip such batches instead.")


def cpu_collectives_need_sync() -> bool:
  """Whether to wait for each step before dispatching the next: XLA:CPU runs every
  device's share of a step on one shared thread pool, and a collective holds its
  thread until all devices arrive. With several steps in flight the pool fills with
  waiters of a later step while some devices still need a thread for the earlier
  one: a deadlock (16 CPU devices on 2 cores: every run here; hangs of 2 and 4
  processes x 4 devices were reported). Accelerators queue each device's work on its own stream and keep
  asynchronous dispatch."""
  return jax.default_backend() == "cpu" and jax.device_count() > 1


class StepPrograms:
  """The jitted train step of a run as one or two programs.

  Where the method updates masks, ``every_step`` is traced without the mask-update
  branch and compiled before the first step (about as fast as a dense step), and
  ``whole_step`` (the step with its update) runs on ``update_steps`` only; it is
  compiled on a thread of its own once the first step has run, while training
  goes on. Both are the same computation on their steps, so the run's numbers are
  those of the single program, bit for bit.
  """

  def __init__(self, every_step, whole_step=None, update_steps=()):
    self.every_step, self.whole_step = every_step, whole_step
    self.update_steps = frozenset(int(t) for t in update_steps)
    self._compiled = None  # the whole step, compiling on a thread (_CompiledOnThread)

  def __call__(self, step: int, state, batch):
    if step in self.update_steps:
      if self._compiled is None:  # (a run resumed at an update step) compiled here, once
        self._compiled = self.whole_step
      return self._compiled(state, batch)
    start_compiling = bool(self.update_steps) and self._compiled is None
    if start_compiling:  # shapes and shardings, read before the step donates the state
      specs = jax.tree.map(
          lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), (state, batch))
    out = self.every_step(state, batch)
    if start_compiling:
      self._compiled = _CompiledOnThread(self.whole_step, *specs)
    return out

  def wait_for_compile(self) -> None:
    """Returns once no compile runs on the thread (logging why it waits, if one does)."""
    if isinstance(self._compiled, _CompiledOnThread) and self._compiled.running():
      logging.info("Waiting for the compile of the update step to end before exiting.")
      self._compiled.join()


class _CompiledOnThread:
  """``jitted`` traced, lowered and compiled for ``specs`` on a thread of its own;
  a call waits for it, then runs the compiled program (or raises its error)."""

  def __init__(self, jitted, *specs):
    self._compiled, self._error = None, None
    # Not a daemon: at exit Python waits for the compile. A daemon thread stopped
    # inside XLA's compiler aborted the process ("terminate called ...", exit -6)
    # when a stop request or an error ended the run during the compile.
    self._thread = threading.Thread(target=self._compile, args=(jitted, specs), daemon=False,
                                    name="rigl_jax-compile")
    self._thread.start()

  def running(self) -> bool:
    return self._thread.is_alive()

  def join(self) -> None:
    self._thread.join()

  def _compile(self, jitted, specs):
    try:
      self._compiled = jitted.lower(*specs).compile()
    except BaseException as e:  # pylint: disable=broad-except
      self._error = e

  def __call__(self, *args):
    self.join()
    if self._error is not None:
      raise self._error
    return self._compiled(*args)


def train_loop(s: Setup, state: TrainState, start_step: int, train_step, evaluate_fn, ckpt,
               log: run_log.RunLog, to_global,
               beat=lambda what: None) -> tuple[TrainState, bool]:
  """Steps from ``start_step`` to the end, logging, evaluating and checkpointing on
  the config's intervals; returns the state and whether a stop was requested."""
  c = s.config
  batches = s.pipeline.train_batches(start_step)
  one_step_in_flight = cpu_collectives_need_sync()
  with Preemption() as preemption:
    for step in range(start_step, s.total_steps):
      state, metrics = train_step(step, state, to_global(next(batches)))
      if one_step_in_flight:
        jax.block_until_ready(metrics)
      log.add(metrics)
      done = step + 1
      beat(f"step {done}")
      if done % c.log_every == 0 or done == s.total_steps:
        log.write_train(done, state_fields(s, state, done))
        stop_if_nonfinite(c, state, ckpt, log)
      if (c.eval_every and done % c.eval_every == 0 and done != s.total_steps
          and s.pipeline.info.num_val):
        start = time.time()
        val = evaluate_fn(state, "val")
        log.write_eval(done, "val", val, seconds=time.time() - start)
      # Read once: a signal arriving after this point is handled after the next step.
      stop = preemption.check(done)
      if done % c.checkpoint_every == 0 or stop:
        # The checkpoint's metrics must be in the log before it: a record where an
        # uninterrupted run writes one too, else (a stop between log steps) kept aside
        # for the resumed run, so that the log reads as one run.
        if log.pending and (done % c.checkpoint_every == 0 or done == s.total_steps):
          log.write_train(done, state_fields(s, state, done))
        elif log.pending:
          log.save_pending(done)
        stop_if_nonfinite(c, state, ckpt, log)
        ckpt.save(done, state, force=stop)
        beat(f"the checkpoint of step {done}")
      if stop:
        return state, True
  stop_if_nonfinite(c, state, ckpt, log)
  ckpt.save(s.total_steps, state, force=True)
  return state, False


def summarize(s: Setup, state: TrainState, val: dict, test: dict, digest: str,
              wall_s: float) -> dict:
  """``summary.json``: final accuracies, densities and FLOPs (the report's way)."""
  c = s.config
  masks = masks_of(s, state)
  f_final = flops_lib.forward_flops(s.costs, masks)
  train_flops, f_mean = training_flops(s, state)
  train_mult, test_mult = flops_lib.multipliers(
      flops_method(c), s.dense_flops, f_final if f_mean is None else f_mean,
      update_every=c.update_every, f_final=f_final, train_scale=c.train_multiplier)
  text = s.pipeline.info.sequence_length
  summary = {
      "method": c.method, "model": c.model, "dataset": c.dataset,
      "distribution": c.distribution, "sparsity": c.sparsity, "seed": c.seed,
      "train_multiplier": c.train_multiplier,
      "test_accuracy": test["accuracy"], "test_loss": test["loss"],
      "val_accuracy": val["accuracy"], "val_loss": val["loss"],
      "global_density": masks_lib.global_density(masks) if s.sparse else 1.0,
      "layer_densities": masks_lib.layer_densities(masks) if s.sparse else {},
      "steps": s.total_steps,
      "dense_forward_flops": s.dense_flops, "sparse_forward_flops": f_final,
      "train_flops_multiplier": train_mult, "test_flops_multiplier": test_mult,
      "train_flops": train_flops,
      "state_crc32": digest,
      "wall_time_s": wall_s,
  }
  if text:  # language modelling: bits per character, and FLOPs per character
    summary.update(
        test_bits_per_char=test["bits_per_char"], val_bits_per_char=val.get("bits_per_char"),
        sequence_length=text, corpus_sha256=s.pipeline.info.corpus_digest,
        dense_forward_flops_per_char=s.dense_flops / text,
        sparse_forward_flops_per_char=f_final / text)
  if s.source_cost is not None:  # lottery: the pruning run that found the ticket, plus this
    summary.update(
        retrain_flops=train_flops, retrain_flops_multiplier=train_mult,
        source_train_flops=s.source_cost["train_flops"],
        source_train_flops_multiplier=s.source_cost["train_flops_multiplier"],
        train_flops=train_flops + s.source_cost["train_flops"],
        train_flops_multiplier=train_mult + s.source_cost["train_flops_multiplier"])
  return summary


# Logged to TensorBoard's HParams tab: what tells the runs of a sweep apart.
HPARAMS = ("method", "distribution", "sparsity", "model", "dataset", "seed",
           "train_multiplier", "learning_rate", "batch_size", "update_every",
           "drop_fraction", "drop_schedule", "end_fraction", "weight_decay", "optimizer")


def train_and_evaluate(c: ml_collections.ConfigDict, workdir: str, *,
                       stall_timeout_s: float | None = None, on_stall=None) -> dict:
  """Trains, evaluates, and writes ``summary.json``; resumes from the workdir's
  checkpoint. Returns the summary, or ``{"preempted": True, "steps": N}``.

  ``stall_timeout_s``: when no step, evaluation batch or checkpoint save finishes for
  this long (compilation included), ``on_stall(seconds, what)`` is called from a
  watchdog thread (:mod:`rigl_jax.watchdog`); the command line ends the process.
  """
  wall_start = time.time()
  c = ml_collections.ConfigDict(c)  # a private copy
  s = setup(c, workdir)
  try:
    workdir_lib.create(c, workdir)  # holds the workdir's lock until the run returns
    return _train_and_evaluate(s, workdir, wall_start, stall_timeout_s, on_stall)
  finally:
    workdir_lib.release_lock(workdir)


def _train_and_evaluate(s: Setup, workdir: str, wall_start: float, stall_timeout_s,
                        on_stall) -> dict:
  """The run in a created and locked workdir: state, steps, the loop and the summary."""
  c = s.config

  # Auto axes: the compiler places what the model computes. With jax's default
  # Explicit axes, flax's Dropout fails (its mask is replicated, the batch sharded).
  mesh = jax.make_mesh((jax.device_count(),), ("data",),
                       axis_types=(jax.sharding.AxisType.Auto,))
  replicated, batch_sharding = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  ckpt = checkpoint_lib.Checkpointer(paths.join(workdir, "checkpoints"),
                                     max_to_keep=c.keep_checkpoints,
                                     save_interval_steps=c.checkpoint_every)
  state, start_step = restore_or_create(s, ckpt, replicated, workdir)

  info = s.pipeline.info
  def jitted_step(mask_update: bool):
    return jax.jit(
        make_train_step(s.model, s.tx, c, info.num_classes,
                        learning_rate_fn(c, s.pipeline.steps_per_epoch), s.costs,
                        mask_update=mask_update),
        in_shardings=(replicated, batch_sharding), out_shardings=(replicated, replicated),
        donate_argnums=0)

  # On CPU the thread's compile would take cores from the training steps.
  separate = c.update_program == "separate" or (
      c.update_program == "auto" and jax.default_backend() != "cpu")
  update_steps = (rigl_jax.mask_update_steps(s.tx, start_step, s.total_steps)
                  if s.sparse and separate else ())
  train_step = (StepPrograms(jitted_step(False), jitted_step(True), update_steps)
                if len(update_steps) else StepPrograms(jitted_step(True)))
  eval_step = jax.jit(make_eval_step(s.model, info.num_classes),
                      in_shardings=(replicated, batch_sharding), out_shardings=replicated)

  def to_global(batch):
    return {k: jax.make_array_from_process_local_data(batch_sharding, v)
            for k, v in batch.items()}

  log = run_log.RunLog(workdir, start_step, s.total_steps,
                       hparams={k: c[k] for k in HPARAMS},
                       warn_skipped=c.on_nonfinite == "skip",
                       bits_per_char=bool(info.sequence_length))
  with (watchdog_lib.Watchdog(stall_timeout_s, on_stall) if stall_timeout_s
        else contextlib.nullcontext()) as watchdog:
    beat = watchdog.beat if watchdog is not None else lambda what: None

    def evaluate_fn(state, split):
      return evaluate(eval_step, state, s.pipeline, split, to_global, beat)

    return finish_run(s, state, start_step, train_step, evaluate_fn, ckpt, log, to_global,
                      beat, workdir, wall_start)


def finish_run(s: Setup, state: TrainState, start_step: int, train_step, evaluate_fn, ckpt,
               log: run_log.RunLog, to_global, beat, workdir: str, wall_start: float) -> dict:
  """The run from its first step to ``summary.json`` (see :func:`train_and_evaluate`)."""
  info = s.pipeline.info
  state, stopped = train_loop(s, state, start_step, train_step, evaluate_fn, ckpt, log,
                              to_global, beat)
  ckpt.close()
  steps = int(jax.device_get(state.step))
  if stopped:
    logging.info("Stop requested (SIGTERM or Ctrl-C): saved step %d and stopped; rerun the "
                 "same command to resume.", steps)
    if isinstance(train_step, StepPrograms):
      train_step.wait_for_compile()
    return {"preempted": True, "steps": steps}

  digest = state_digest(state)
  logging.info("Final state CRC32 %s (process %d of %d).", digest, jax.process_index(),
               jax.process_count())
  if s.sparse:
    workdir_lib.save_tree(paths.join(workdir, "final_masks"), masks_of(s, state))
    beat("saving the final masks")
  val = evaluate_fn(state, "val") if info.num_val else {"accuracy": None, "loss": None,
                                                        "bits_per_char": None}
  test = evaluate_fn(state, "test")
  if info.num_val:
    log.write_eval(steps, "val", val, final=True)
  log.write_eval(steps, "test", test, final=True)
  summary = summarize(s, state, val, test, digest, time.time() - wall_start)
  workdir_lib.write_summary(workdir, summary)
  logging.info("Done: test accuracy %.4f, val accuracy %s, global density %.4f.",
               summary["test_accuracy"], summary["val_accuracy"], summary["global_density"])
  return summary
