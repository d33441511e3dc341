"""The trainer: ``train_and_evaluate(config, workdir)``.

One jitted train step over a ``jax.make_mesh`` of every device (batch sharded on
the ``data`` axis, state replicated), the sparse-training transform from the core,
orbax checkpoints with exact resume, and ``metrics.jsonl`` / ``summary.json`` in
the workdir.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
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
from rigl_jax import models, schedules
from rigl_jax import tensorboard

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
  drops = jnp.asarray(config_lib.lr_drop_steps(c) or [np.iinfo(np.int32).max], jnp.int32)
  n_drops = len(config_lib.lr_drop_steps(c))

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

  def initial_masks(self, key, params, sparsities):
    del key, sparsities
    return jax.tree.map(lambda m, p: jnp.asarray(m, bool).reshape(jnp.shape(p)), self.masks, params)


def custom_from_run(c) -> dict[str, float]:
  """Per-layer sparsities read from a finished run's ``summary.json`` (the report's
  re-initialisation experiment): one anchored regex per layer, so every layer leaves
  the budget with exactly the density it ended with (dense ones at 0.0)."""
  path = os.path.join(c.distribution_source, "summary.json")
  if not os.path.exists(path):
    raise config_lib.ConfigError(
        f"config.distribution_source: {c.distribution_source!r} has no summary.json; it "
        f"must be the workdir of a finished sparse run")
  summary = _read_json(path, "distribution_source")
  if summary.get("model") != c.model or not summary.get("layer_densities"):
    raise config_lib.ConfigError(
        f"config.distribution_source: the run in {c.distribution_source!r} trained a sparse "
        f"{summary.get('model')!r}; this run needs a sparse {c.model!r} run")
  return {f"^{re.escape(p)}$": 1.0 - d for p, d in summary["layer_densities"].items()}


def warn_if_far_from_sparsity(c, params_shape) -> None:
  """Warns when the kernels as a whole end up much denser than ``config.sparsity``
  (uniform keeps the first layer dense, and an MLP's first layer holds most weights)."""
  if c.method == "lottery" or c.distribution_source:
    return
  sparsities = rigl_jax.sparsity_distribution(
      params_shape, c.sparsity, c.distribution, dense=list(c.dense_layers) or None,
      custom=dict(c.custom_sparsity) or None,
      uniform_first_layer_dense=c.uniform_first_layer_dense)
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


def make_optimizer(c, *, total: int, lottery_masks=None) -> optax.GradientTransformation:
  """SGD (Nesterov) with kernel-only weight decay, wrapped for sparse training."""
  sgd = optax.inject_hyperparams(optax.sgd)(
      learning_rate=c.learning_rate, momentum=c.momentum, nesterov=c.nesterov)
  inner = optax.chain(optax.add_decayed_weights(c.weight_decay, mask=_kernels_only), sgd)
  if c.method in config_lib.DENSE_METHODS:
    return inner
  method = GivenMasks(lottery_masks) if c.method == "lottery" else c.method
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
      custom=(custom_from_run(c) if c.distribution_source
              else dict(c.custom_sparsity) or None),
      uniform_first_layer_dense=c.uniform_first_layer_dense,
      seed=c.seed,
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


def make_train_step(model, tx, c, num_classes: int, lr_fn, costs):
  skip_bad = c.on_nonfinite == "skip"
  sparse = c.method not in config_lib.DENSE_METHODS

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
    updates, opt_state = tx.update(grads, opt_state, state.params)
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
  def eval_step(state: TrainState, batch):
    logits = model.apply({"params": state.params, "batch_stats": state.batch_stats},
                         batch["image"], train=False)
    weight = batch["mask"].astype(jnp.float32)
    loss = cross_entropy(logits, batch["label"], num_classes, 0.0)
    correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
    return {"correct": jnp.sum(correct * weight), "loss": jnp.sum(loss * weight),
            "count": jnp.sum(weight)}
  return eval_step


# ----------------------------------------------------------------------------- helpers


class Preemption:
  """Turns SIGTERM and a first Ctrl-C (SIGINT) into a flag the loop checks after each
  step: the run saves and exits 0. A second Ctrl-C stops at once (the last
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
    signals = (signal.SIGINT,) if self._multi_process else (signal.SIGTERM, signal.SIGINT)
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
    if signum == signal.SIGINT:
      if self.requested:
        raise KeyboardInterrupt
      logging.warning("Ctrl-C: saving after this step; press Ctrl-C again to stop at once.")
    self.requested = True

  def __exit__(self, *exc):
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)


def _write_json_atomic(path: str, obj) -> None:
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def _read_json(path: str, field: str) -> dict:
  """A JSON object from a file; a damaged file is a ConfigError naming ``field``."""
  try:
    with open(path) as f:
      obj = json.load(f)
  except (OSError, ValueError) as e:
    raise config_lib.ConfigError(f"config.{field}: cannot read {path}: {e}") from None
  if not isinstance(obj, dict):
    raise config_lib.ConfigError(f"config.{field}: {path} does not hold a JSON object")
  return obj


def _config_dict(c) -> dict:
  return json.loads(c.to_json_best_effort())


# Fields that may change when a run is resumed: they do not change its numbers.
_RESUMABLE_FIELDS = ("log_every", "checkpoint_every", "keep_checkpoints", "overwrite",
                     "data_dir", "eval_every")


def check_workdir_config(c, workdir: str) -> None:
  """Refuses a workdir holding a run of another config (unless ``overwrite``)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path) or c.overwrite:
    return
  saved = _read_json(path, "overwrite")
  asked = _config_dict(c)
  diff = sorted(k for k in set(saved) | set(asked)
                if k not in _RESUMABLE_FIELDS and saved.get(k) != asked.get(k))
  if diff:
    k = diff[0]
    raise config_lib.ConfigError(
        f"config.{k}: the workdir {workdir} holds a run with {k}={saved.get(k)!r}, not "
        f"{asked.get(k)!r} (differing fields: {', '.join(diff)}); use another workdir or "
        f"--config.overwrite=True")


class MetricsLog:
  """``metrics.jsonl``: one JSON line per logged step; lines past a restored step are
  dropped on resume so the file reads like one uninterrupted run."""

  def __init__(self, path: str, resume_step: int):
    self.path = path
    self.last = {}
    lines = []
    if os.path.exists(path):
      # A damaged byte must not stop every rerun: such a line fails to parse and is dropped.
      with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
          try:
            record = json.loads(line)
          except json.JSONDecodeError:
            continue  # a line cut short by a kill
          if record.get("step", math.inf) <= resume_step:
            lines.append(line if line.endswith("\n") else line + "\n")
            self.last = record
      if jax.process_index() == 0:  # one writer when processes share the workdir
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
          f.writelines(lines)
        os.replace(tmp, path)

  def write(self, record: dict) -> None:
    if jax.process_index() != 0:
      return
    with open(self.path, "a") as f:
      f.write(json.dumps(_finite_or_null(record), sort_keys=True, allow_nan=False) + "\n")
    self.last = record


def _finite_or_null(value):
  """NaN and infinities as JSON null (``json.dumps`` would write bare ``NaN``)."""
  if isinstance(value, float) and not math.isfinite(value):
    return None
  if isinstance(value, dict):
    return {k: _finite_or_null(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_finite_or_null(v) for v in value]
  return value


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


def _save_tree(directory: str, tree) -> None:
  """A small side checkpoint (initial params, final masks), written atomically by orbax."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.abspath(directory), tree, force=True)


def _load_tree(directory: str, target):
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(os.path.abspath(directory), target)


def load_lottery_source(c, params_shape):
  """The final masks, the initial params and the training cost (``train_flops``,
  ``train_flops_multiplier`` of its summary) of the pruning run in ``source_workdir``:
  a lottery ticket's training cost includes that run, as in the report's Table 2."""
  source = c.source_workdir

  def require(name):
    if not os.path.exists(os.path.join(source, name)):
      raise config_lib.ConfigError(
          f"config.source_workdir: {source!r} has no {name}; it must be the workdir of a "
          f"finished sparse run (e.g. method 'pruning')")

  require("config.json")
  source_config = _read_json(os.path.join(source, "config.json"), "source_workdir")
  for field in ("model", "dataset"):
    if source_config.get(field) != c[field]:
      raise config_lib.ConfigError(
          f"config.source_workdir: the source run trained {field}="
          f"{source_config.get(field)!r}, this run asks for {c[field]!r}")
  for name in ("summary.json", "final_masks", "initial_params"):
    require(name)
  mask_target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.bool_), params_shape)
  summary = _read_json(os.path.join(source, "summary.json"), "source_workdir")
  cost = {}
  for key in ("train_flops", "train_flops_multiplier"):
    if not isinstance(summary.get(key), (int, float)):
      raise config_lib.ConfigError(
          f"config.source_workdir: {source!r}/summary.json has no number {key!r}")
    cost[key] = float(summary[key])
  masks = _load_tree(os.path.join(source, "final_masks"), mask_target)
  initial = _load_tree(os.path.join(source, "initial_params"), None)
  return masks, initial, cost


# ----------------------------------------------------------------------------- main loop


def check_workdir_path(workdir: str) -> None:
  """Refuses a workdir that cannot be created, before any directory is made (a
  failed ``os.makedirs`` would leave its parents behind)."""
  path = os.path.abspath(workdir)
  existing = path
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  try:
    name_max = os.pathconf(existing, "PC_NAME_MAX")
  except (OSError, ValueError):
    name_max = 255
  for part in path.split(os.sep):
    if len(os.fsencode(part)) > name_max:
      raise config_lib.ConfigError(
          f"workdir: the path component {part[:32]!r}... is {len(os.fsencode(part))} bytes "
          f"long; this file system allows {name_max}")
  if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
    if existing != path:
      raise config_lib.ConfigError(f"workdir: cannot create {workdir!r}: {existing!r} is not "
                                   f"a writable directory")


# What the trainer writes in a workdir: name -> whether it is a directory.
WORKDIR_ENTRIES = {"config.json": False, "metrics.jsonl": False, "summary.json": False,
                   "checkpoints": True, "tensorboard": True, "initial_params": True,
                   "final_masks": True}


def setup(c: ml_collections.ConfigDict, workdir: str):
  """Validates the config and builds data, model and optimizer; writes nothing."""
  config_lib.validate(c, device_count=jax.device_count())
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise config_lib.ConfigError(f"workdir: {workdir!r} exists and is not a directory")
  check_workdir_path(workdir)
  for name, is_dir in WORKDIR_ENTRIES.items():
    path = os.path.join(workdir, name)
    if os.path.exists(path) and os.path.isdir(path) != is_dir:
      raise config_lib.ConfigError(
          f"workdir: {path} must be a {'directory' if is_dir else 'file'}; move it away or "
          f"use another workdir")
  try:
    pipeline = data_lib.get_pipeline(
        c.dataset, global_batch_size=c.batch_size, eval_batch_size=c.eval_batch_size,
        seed=c.seed, validation_size=None if c.validation_size < 0 else c.validation_size,
        data_dir=c.data_dir or None, augmentation=c.augmentation)
  except ValueError as e:  # sizes that do not fit the data set
    raise config_lib.ConfigError(f"config.dataset={c.dataset!r}: {e}") from None
  check_workdir_config(c, workdir)
  total = config_lib.total_steps(c, pipeline.steps_per_epoch)
  end = config_lib.end_step(c, total)
  if end < c.start_step:
    raise config_lib.ConfigError(f"config.end_step: resolves to {end}, before "
                                 f"start_step={c.start_step}")
  model = models.get_model(c.model, num_classes=pipeline.info.num_classes,
                           width_multiplier=config_lib.width_multiplier(c),
                           dtype=jnp.dtype(c.dtype), dropout_rate=config_lib.dropout_rate(c))
  return pipeline, model, total


def train_and_evaluate(c: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains, evaluates, and writes ``summary.json``; resumes from the workdir's checkpoint."""
  wall_start = time.time()
  c = ml_collections.ConfigDict(c)  # a private copy
  pipeline, model, total = setup(c, workdir)
  info = pipeline.info

  # Auto axes: the compiler places what the model computes. With jax's default
  # Explicit axes, flax's Dropout fails (its mask is replicated, the batch sharded).
  mesh = jax.make_mesh((jax.device_count(),), ("data",),
                       axis_types=(jax.sharding.AxisType.Auto,))
  replicated = NamedSharding(mesh, P())
  batch_sharding = NamedSharding(mesh, P("data"))

  sample = jnp.zeros((1,) + tuple(info.input_shape), jnp.float32)
  key = jax.random.key(c.seed)
  variables_shape = jax.eval_shape(lambda: model.init(key, sample, train=False))
  params_shape = variables_shape["params"]

  lottery_masks = initial_params = source_cost = None
  if c.method == "lottery":
    lottery_masks, initial_params, source_cost = load_lottery_source(c, params_shape)
  tx = make_optimizer(c, total=total, lottery_masks=lottery_masks)
  sparse = c.method not in config_lib.DENSE_METHODS
  if sparse:  # bad patterns, nothing to sparsify: fail before compiling the step
    try:
      jax.eval_shape(tx.init, params_shape)
    except ValueError as e:
      field = {"dense": "dense_layers", "custom": "custom_sparsity",
               "sparsity": "sparsity"}.get(str(e).split(":")[0], "model")
      raise config_lib.ConfigError(f"config.{field}: {e}") from None
    warn_if_far_from_sparsity(c, params_shape)
  costs = flops_lib.model_costs(model, info.input_shape)

  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise config_lib.ConfigError(f"workdir: cannot create {workdir!r}: {e.strerror}") from None
  if jax.process_index() == 0:
    _write_json_atomic(os.path.join(workdir, "config.json"), _config_dict(c))

  def init_state():
    return create_train_state(model, tx, sample, key, sparse=sparse,
                              params=None if initial_params is None else initial_params["params"])

  state_shape = jax.eval_shape(init_state)
  state_target = jax.tree.map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated), state_shape)
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                     max_to_keep=c.keep_checkpoints,
                                     save_interval_steps=c.checkpoint_every)
  restored = ckpt.restore_latest(state_target)
  if restored is None:
    state = jax.jit(init_state, out_shardings=replicated)()
    start_step = 0
    if sparse:  # every process: orbax saves are collective (the primary one writes)
      _save_tree(os.path.join(workdir, "initial_params"), {"params": _to_host(state.params)})
    logging.info("Starting %s from scratch: %d steps.", workdir, total)
  else:
    start_step, state = restored
    logging.info("Resumed %s at step %d of %d.", workdir, start_step, total)

  lr_fn = learning_rate_fn(c, pipeline.steps_per_epoch)
  train_step = jax.jit(make_train_step(model, tx, c, info.num_classes, lr_fn, costs),
                       in_shardings=(replicated, batch_sharding),
                       out_shardings=(replicated, replicated), donate_argnums=0)
  eval_step = jax.jit(make_eval_step(model, info.num_classes),
                      in_shardings=(replicated, batch_sharding), out_shardings=replicated)

  def to_global(batch):
    return {k: jax.make_array_from_process_local_data(batch_sharding, v)
            for k, v in batch.items()}

  def evaluate(split: str) -> dict:
    totals = {"correct": 0.0, "loss": 0.0, "count": 0.0}
    for batch in pipeline.eval_batches(split):
      out = jax.device_get(eval_step(state, to_global(batch)))
      for k in totals:
        totals[k] += float(out[k])
    n = max(totals["count"], 1.0)
    return {"accuracy": totals["correct"] / n, "loss": totals["loss"] / n}

  metrics_log = MetricsLog(os.path.join(workdir, "metrics.jsonl"), start_step)
  events = (tensorboard.ScalarWriter(os.path.join(workdir, "tensorboard"), start_step)
            if jax.process_index() == 0 else None)

  def write_events(step: int, scalars: dict) -> None:
    if events is not None:
      events.write(step, {k: v for k, v in scalars.items()
                          if isinstance(v, (int, float)) and math.isfinite(v)})
  f_dense = flops_lib.reference_dense_flops(c, info.num_classes, info.input_shape)
  flops_method = {"pruning_global": "pruning", "lottery": "static"}.get(c.method, c.method)

  def flops_so_far() -> tuple[float, float | None]:
    """(training FLOPs, mean forward FLOPs per example) over the steps taken, from the
    state. Every method's per-step cost is affine in the step's forward FLOPs, so the
    total is the formula at the mean, times the steps and the batch."""
    steps = int(jax.device_get(state.step))
    if not steps:
      return 0.0, None
    total, compensation = (float(x) for x in np.asarray(jax.device_get(state.forward_flops_sum),
                                                         np.float64))
    f_mean = (total - compensation) / steps
    per_example = flops_lib.train_flops_per_step(flops_method, f_dense, f_mean,
                                                 update_every=c.update_every, f_final=f_mean)
    return per_example * c.batch_size * steps, f_mean
  end = config_lib.end_step(c, total)
  drop_fn = schedules.make_drop_fraction_fn(c.drop_schedule, initial=c.drop_fraction,
                                            start_step=c.start_step, end_step=end)

  def masks_now():
    return _to_host(rigl_jax.get_masks(state.opt_state)) if sparse else None

  def log(step: int, pending: list, interval_s: float, steps_done: int, timed_steps: int):
    host = jax.device_get(pending)
    masks = masks_now()
    train_flops, _ = flops_so_far()
    record = {
        "step": step,
        "loss": float(np.mean([m["loss"] for m in host])),
        "accuracy": float(np.mean([m["accuracy"] for m in host])),
        "learning_rate": float(host[-1]["learning_rate"]),
        "drop_fraction": float(drop_fn(step - 1)) if c.method in ("set", "rigl", "snfs",
                                                                 "rigl_sg", "rigl_sm") else 0.0,
        "global_density": masks_lib.global_density(masks)
                          if sparse else 1.0,
        # Compilation (the process's first step) is left out of the rate.
        "steps_per_s": timed_steps / max(interval_s, 1e-9) if timed_steps else None,
        "train_flops": train_flops,
        "nonfinite": int(sum(m["nonfinite"] for m in host)),
    }
    if sparse:  # per-kernel densities: they move under redistribution and pruning
      record["layer_densities"] = {
          k: v for (k, v), m in zip(masks_lib.layer_densities(masks).items(),
                                    jax.tree.leaves(masks)) if m.ndim >= 2}
    metrics_log.write(record)
    write_events(step, {k: v for k, v in record.items() if k != "step"})
    write_events(step, {f"density/{k}": v for k, v in record.get("layer_densities", {}).items()})
    rate = record["steps_per_s"]
    speed = (f"{rate:.1f} steps/s  eta {(total - step) / max(rate, 1e-9):.0f}s" if rate
             else "compiling")
    logging.info("step %d/%d  loss %.4f  acc %.4f  lr %.4g  density %.4f  %s", step, total,
                 record["loss"], record["accuracy"], record["learning_rate"],
                 record["global_density"], speed)
    if record["nonfinite"] and c.on_nonfinite == "skip":
      logging.warning("Skipped %d batch(es) with a non-finite loss or gradient in steps "
                      "%d-%d.", record["nonfinite"], step - steps_done, step - 1)
    return record

  def check_finite():
    bad = int(jax.device_get(state.nonfinite_step))
    if bad >= 0 and c.on_nonfinite == "stop":
      metrics_log.write({"step": int(jax.device_get(state.step)), "event": "nonfinite",
                         "nonfinite_step": bad})
      ckpt.close()
      latest = ckpt.latest_step()
      kept = (f"the last good checkpoint (step {latest}) is kept" if latest is not None
              else "no checkpoint had been written yet")
      raise FloatingPointError(
          f"non-finite loss or gradient at step {bad}; stopped, {kept}. Set "
          f"--config.on_nonfinite=skip to skip such batches instead.")

  batches = pipeline.train_batches(start_step)
  pending, interval_start, interval_steps, timed_steps = [], time.time(), 0, 0
  preempted = False
  with Preemption() as preemption:
    for step in range(start_step, total):
      state, metrics = train_step(state, to_global(next(batches)))
      pending.append(metrics)
      interval_steps += 1
      if step == start_step:  # this step compiled the train step: time the ones after it
        jax.block_until_ready(metrics)
        interval_start = time.time()
      else:
        timed_steps += 1
      done = step + 1
      if done % c.log_every == 0 or done == total:
        log(done, pending, time.time() - interval_start, interval_steps, timed_steps)
        pending, interval_start, interval_steps, timed_steps = [], time.time(), 0, 0
        check_finite()
      if c.eval_every and done % c.eval_every == 0 and done != total and info.num_val:
        val = evaluate("val")
        metrics_log.write({"step": done, "val_accuracy": val["accuracy"], "val_loss": val["loss"]})
        write_events(done, {"val/accuracy": val["accuracy"], "val/loss": val["loss"]})
        if not pending:  # evaluation time is not training time
          interval_start = time.time()
      # Read once: a SIGTERM arriving after this point is handled after the next step.
      stop = preemption.check(done)
      if done % c.checkpoint_every == 0 or stop:
        if pending:  # the checkpoint's metrics line must be in the log before it
          log(done, pending, time.time() - interval_start, interval_steps, timed_steps)
          pending, interval_start, interval_steps, timed_steps = [], time.time(), 0, 0
        check_finite()
        ckpt.save(done, state, force=stop)
      if stop:
        preempted = True
        break
  if not preempted:
    check_finite()
    ckpt.save(total, state, force=True)
  ckpt.close()
  if preempted:
    logging.info("Stop requested (SIGTERM or Ctrl-C): saved step %d and stopped; rerun the "
                 "same command to resume.",
                 int(jax.device_get(state.step)))
    return {"preempted": True, "steps": int(jax.device_get(state.step))}

  digest = state_digest(state)
  logging.info("Final state CRC32 %s (process %d of %d).", digest, jax.process_index(),
               jax.process_count())
  masks = masks_now()
  if sparse:  # every process: orbax saves are collective (the primary one writes)
    _save_tree(os.path.join(workdir, "final_masks"), masks)
  val = evaluate("val") if info.num_val else {"accuracy": None, "loss": None}
  test = evaluate("test")
  write_events(total, {"val/accuracy": val["accuracy"], "val/loss": val["loss"],
                       "test/accuracy": test["accuracy"], "test/loss": test["loss"]})
  f_final = flops_lib.forward_flops(costs, masks)
  train_flops, f_mean = flops_so_far()
  f_mean = f_final if f_mean is None else f_mean
  train_mult, test_mult = flops_lib.multipliers(
      flops_method, f_dense, f_mean, update_every=c.update_every, f_final=f_final,
      train_scale=c.train_multiplier)
  summary = {
      "method": c.method, "model": c.model, "dataset": c.dataset,
      "distribution": c.distribution, "sparsity": c.sparsity, "seed": c.seed,
      "train_multiplier": c.train_multiplier,
      "test_accuracy": test["accuracy"], "test_loss": test["loss"],
      "val_accuracy": val["accuracy"], "val_loss": val["loss"],
      "global_density": (masks_lib.global_density(masks)
                         if sparse else 1.0),
      "layer_densities": masks_lib.layer_densities(masks) if sparse else {},
      "steps": total,
      "dense_forward_flops": f_dense, "sparse_forward_flops": f_final,
      "train_flops_multiplier": train_mult, "test_flops_multiplier": test_mult,
      "train_flops": train_flops,
      "state_crc32": digest,
      "wall_time_s": time.time() - wall_start,
  }
  if source_cost is not None:  # lottery: the pruning run that found the ticket, plus this one
    summary.update(
        retrain_flops=train_flops, retrain_flops_multiplier=train_mult,
        source_train_flops=source_cost["train_flops"],
        source_train_flops_multiplier=source_cost["train_flops_multiplier"],
        train_flops=train_flops + source_cost["train_flops"],
        train_flops_multiplier=train_mult + source_cost["train_flops_multiplier"])
  if jax.process_index() == 0:
    _write_json_atomic(os.path.join(workdir, "summary.json"), summary)
  logging.info("Done: test accuracy %.4f, val accuracy %s, global density %.4f.",
               summary["test_accuracy"], summary["val_accuracy"], summary["global_density"])
  return summary
