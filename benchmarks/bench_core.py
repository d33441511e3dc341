"""Overhead of the ``sparse_training`` transform, measured on this machine.

Usage:
  python benchmarks/bench_core.py            # LeNet-300-100, LeNet-5, WRN-22-2
  python benchmarks/bench_core.py --quick    # no WRN-22-2, fewer repetitions
  python benchmarks/bench_core.py --out bench_core.json
  python benchmarks/bench_core.py --models wrn_22_2 --reps 3   # WRN-22-2 alone, faster

For every model it times, interleaved in one loop (the order rotates each
repetition so no variant always runs first):

* ``dense``:   a jitted train step with the plain optax optimizer;
* ``masked``:  the same step with ``rigl_jax.sparse_training(..., method="rigl")``
               on a step that is NOT a mask-update step;
* ``update``:  the same masked step on a step where the mask update fires
               (the ``jax.lax.cond`` true branch);
* ``rigl_fn``: the RigL mask update alone (``method.update``), jitted, on the
               real params, dense grads and masks of the model;
* ``set_fn``, ``snfs_fn``, ``rigl_sg_fn``: the same for SET, SNFS and
               RigL-SG (``UPDATE_METHODS``); SNFS's method state (its dense
               gradient momentum) is ``init`` + one ``observe`` of the grads;
* ``cfi_fn``, ``srigl_fn``, ``block_fn``: the RigL update under constant
               fan-in, SRigL's (constant fan-in plus ablation) and RigL's under
               4x4 blocks, at the same 90%; ``nm_fn`` RigL under 2:4 and
               ``rigl50_fn`` unstructured RigL, both at 50% (2:4's density).
               A layer whose shape a structure cannot hold (the 3-channel
               stem for 2:4, a 100x10 head for blocks) stays unstructured.
* ``dense_again``: a second dense runner; ``dense_again / dense`` is the noise
               floor of this run (1.00 on a quiet machine);
* ``opt_dense`` / ``opt_masked``: the optimizer part alone (``tx.update`` +
               ``apply_updates`` on fixed grads), whose difference divided by
               the dense step is a low-noise estimate of the masked overhead.

Read the output (metrics as rows, one column per model):

* ``masked_over_dense``: step-time ratio masked/dense on a non-update step
  (ratio of medians; ``..._paired`` is the median of per-repetition ratios).
  Target: <= 1.05 on the conv nets.
* ``update_extra_over_step``: (update step - normal step) / normal step, and
  ``rigl_fn_over_step``: the update function alone / normal step; both are the
  cost of one mask update in train steps. Target: <= 0.05 on WRN-22-2.
  ``update_extra`` is a difference of two step times, so on a loaded machine
  it carries their noise; ``rigl_fn`` is measured directly.
* ``{cfi,srigl,block}_over_rigl``, ``nm_over_rigl50``: a structured update over
  the unstructured one at the same sparsity. Target: <= 1 (issue 17: a mask
  update with structure costs no more than the unstructured one).
* ``update_cost_amortised_dT100``: ``rigl_fn_over_step`` / dT (100);
  ``{set,snfs,rigl_sg}_fn_over_step`` and ``..._amortised_dT100`` the same
  for the other methods. Target: amortised <= 0.01 (1% of training time).

A train step is forward, backward, SGD with Nesterov momentum 0.9 and weight
decay (``optax.chain``), the BatchNorm statistics update and
``optax.apply_updates``; params, batch stats and optimizer state are donated as
a real trainer would. Compilation is timed separately and excluded, and each
variant is warmed up before timing. The figures to read are ratios of times
taken in the same loop, because absolute times on a shared machine are noise.
"""

from __future__ import annotations

import table  # benchmarks/table.py (the script's folder is on sys.path)

import argparse
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import rigl_jax
from rigl_jax import distributions
from rigl_jax import methods as methods_lib
from rigl_jax import schedules
from rigl_jax import structure as structure_lib
from rigl_jax.models import get_model

SPARSITY = 0.9
UPDATE_EVERY = 100
END_STEP = 10_000
NORMAL_STEP = 1     # not a mask-update step (step 0 and multiples of dT are special)
UPDATE_STEP = 100   # a mask-update step: start_step + 1 * dT < end_step

# name, batch, input shape (HWC), repetitions (full, quick), calls per sample
MODELS = [
    ("lenet_300_100", 128, (28, 28, 1), (100, 30), 10),
    ("lenet5", 128, (28, 28, 1), (30, 6), 2),
    ("wrn_22_2", 128, (32, 32, 3), (10, 0), 1),
]


def inner_optimizer():
  """SGD, Nesterov momentum 0.9, weight decay 5e-4 (the RigL CIFAR recipe)."""
  return optax.chain(optax.add_decayed_weights(5e-4),
                     optax.sgd(0.1, momentum=0.9, nesterov=True))


def sparse_optimizer():
  return rigl_jax.sparse_training(
      inner_optimizer(), method="rigl", sparsity=SPARSITY, distribution="erk",
      update_every=UPDATE_EVERY, end_step=END_STEP)


def make_loss_fn(model):
  def loss_fn(params, batch_stats, x, y):
    # A fixed dropout key: the benchmark times the step, not the draws.
    logits, new_vars = model.apply({"params": params, "batch_stats": batch_stats}, x,
                                   train=True, mutable=["batch_stats"],
                                   rngs={"dropout": jax.random.key(0)})
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, new_vars.get("batch_stats", batch_stats)
  return loss_fn


def make_train_step(loss_fn, tx, **update_args):
  def train_step(params, batch_stats, opt_state, x, y):
    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, batch_stats, x, y)
    updates, opt_state = tx.update(grads, opt_state, params, **update_args)
    params = optax.apply_updates(params, updates)
    return params, batch_stats, opt_state, loss
  return jax.jit(train_step, donate_argnums=(0, 1, 2))


def compile_timed(jitted, *args):
  """(compiled executable, seconds to trace + lower + compile)."""
  t0 = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  return compiled, time.perf_counter() - t0


def copy_tree(tree):
  return jax.tree.map(lambda a: jnp.array(a, copy=True), tree)


class Runner:
  """Times a donated step ``fn(*state, *args) -> (*new_state, ..., loss)``.

  Every sample starts from a fresh copy of the same initial state (made before
  the clock starts) and runs ``calls`` steps back to back, so all variants
  time the same numbers: a state trained on for hundreds of steps on one fixed
  batch drifts (the dense LeNet-5 reaches NaN in about 20 steps at lr 0.1),
  and NaN or exploding values would time different arithmetic. The last
  element of ``state`` is the optimizer state; with ``set_step`` its step
  counter is set before every call, so the masked step always takes the same
  ``lax.cond`` branch.
  """

  def __init__(self, fn, state, args, set_step=None):
    self.fn, self.init_state, self.args, self.set_step = fn, tuple(state), tuple(args), set_step
    self.last_loss = None

  def sample(self, calls: int) -> float:
    """Seconds per call, averaged over ``calls`` calls dispatched back to back."""
    state = copy_tree(self.init_state)
    n = len(state)
    steps = [None] * calls
    if self.set_step is not None:
      steps = [jnp.asarray(self.set_step, jnp.int32) for _ in range(calls)]
    jax.block_until_ready((state, steps))
    out = None
    t0 = time.perf_counter()
    for s in steps:
      if s is not None:
        state = state[:-1] + (state[-1]._replace(step=s),)
      out = self.fn(*state, *self.args)
      state = tuple(out[:n])
    jax.block_until_ready(out)
    dt = time.perf_counter() - t0
    self.last_loss = out[n] if len(out) > n else None
    return dt / calls


class FnRunner:
  """Times a jitted function of fixed (not donated) arguments."""

  def __init__(self, fn, *args):
    self.fn, self.args = fn, args

  def sample(self, calls: int) -> float:
    t0 = time.perf_counter()
    out = None
    for _ in range(calls):
      out = self.fn(*self.args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / calls


# Methods whose update alone is timed: rigl (the reference), set (random
# growth), snfs (dense momentum growth + redistribution) and rigl_sg (gradient
# growth + redistribution). Each gets a runner "<name>_fn".
UPDATE_METHODS = ("rigl", "set", "snfs", "rigl_sg")
# Structured updates: runner name -> (method, structure, sparsity).
STRUCTURED = {"cfi": ("rigl", "constant_fan_in", SPARSITY),
              "srigl": ("srigl", "constant_fan_in", SPARSITY),
              "block": ("rigl", "block:4x4", SPARSITY),
              "nm": ("rigl", "2:4", 0.5), "rigl50": ("rigl", None, 0.5)}
# Each structured runner over its unstructured reference at the same sparsity.
STRUCTURED_RATIOS = {"cfi": "rigl", "srigl": "rigl", "block": "rigl", "nm": "rigl50"}


def structure_where_it_fits(params, structure):
  """``{path regex: structure}`` for the kernels whose shape holds ``structure``."""
  if structure is None or structure == "constant_fan_in":
    return structure
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    name = rigl_jax.masks.path_to_str(path)
    layout = structure_lib.Layout(structure_lib.parse(structure), 0, tuple(leaf.shape))
    if leaf.ndim < 2:
      continue
    try:
      structure_lib.check_fits(layout, name)
    except rigl_jax.ArgumentError:
      continue
    out[f"^{name}$"] = structure
  return out


def structured_masks(name, params):
  """The initial masks of a structured runner (the transform's own init)."""
  method, structure, sparsity = STRUCTURED[name]
  tx = rigl_jax.sparse_training(inner_optimizer(), method=method, sparsity=sparsity,
                                structure=structure_where_it_fits(params, structure),
                                update_every=UPDATE_EVERY, end_step=END_STEP)
  return rigl_jax.get_masks(tx.init(params))


def make_method_update_fn(name, params, structure=None, sparsity=SPARSITY):
  """``method.update`` of method ``name`` alone, on real params/grads/masks, jitted.

  Returns ``(fn, method_state_of(grads))``: ``fn(params, grads, masks, step,
  method_state)``. The method state is the method's own ``init`` after one
  ``observe`` of the real grads (RigL-SM's dense gradient momentum); SNFS
  ranks and redistributes by the inner optimizer's momentum, for which a
  trace equal to the real grads stands in. Either way the update works on
  non-zero scores.
  """
  method = methods_lib.get_method(name)
  drop_fraction_fn = schedules.make_drop_fraction_fn(
      "cosine", initial=0.3, start_step=0, end_step=END_STEP)
  max_drop = schedules.max_drop_fraction("cosine", 0.3)
  structure = structure_where_it_fits(params, structure)
  sparsities = distributions.sparsity_distribution(params, sparsity, "erk",
                                                   structure=structure)
  layouts = structure_lib.layouts(params, structure, sparse=jax.tree.map(
      lambda s: s > 0, sparsities))
  layouts = None if structure_lib.is_trivial(layouts) else layouts

  def update(params, grads, masks, step, method_state):
    ctx = methods_lib.UpdateContext(
        step=step, key=jax.random.fold_in(jax.random.key(0), step),
        drop_fraction=jnp.asarray(drop_fraction_fn(step), jnp.float32),
        masks=masks, params=params, grads=grads, sparsities=sparsities,
        max_drop_fraction=max_drop, start_step=0, end_step=END_STEP,
        update_every=UPDATE_EVERY,
        # SNFS reads the inner optimizer's momentum: an sgd-momentum state
        # holding the grads stands in for it.
        inner_state=(optax.TraceState(trace=grads),), layouts=layouts)
    new_masks, _ = method.update(ctx, method_state)
    return new_masks

  def state_of(grads, masks):
    return method.observe(method.init(params, masks), grads, masks)
  return jax.jit(update), state_of


def make_rigl_update_fn(params):
  """The RigL update alone (kept for callers of the old API): ``fn(params, grads, masks, step)``."""
  fn, _ = make_method_update_fn("rigl", params)
  return jax.jit(lambda p, g, m, s: fn(p, g, m, s, ()))


def make_opt_only(tx):
  """The optimizer part of a step alone: ``tx.update`` + ``apply_updates`` on fixed grads."""
  def opt_only(params, opt_state, grads):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state
  return jax.jit(opt_only, donate_argnums=(0, 1))


def bench_model(name, batch, hwc, reps, calls, warmup, log):
  log(f"[{name}] batch {batch}, input {hwc}, {reps} reps x {calls} calls")
  model = get_model(name, num_classes=10)
  variables = model.init(jax.random.key(0), jnp.zeros((1,) + hwc), train=False)
  params = variables["params"]
  batch_stats = variables.get("batch_stats", {})
  x = jax.random.normal(jax.random.key(1), (batch,) + hwc, jnp.float32)
  y = jax.random.randint(jax.random.key(2), (batch,), 0, 10)
  n_params = sum(int(np.size(p)) for p in jax.tree.leaves(params))
  loss_fn = make_loss_fn(model)

  # Dense baseline: the plain optax optimizer.
  dense_tx = inner_optimizer()
  dense_state = dense_tx.init(params)
  dense_step, dense_compile = compile_timed(
      make_train_step(loss_fn, dense_tx), params, batch_stats, dense_state, x, y)

  # Masked: one compiled step serves the normal and the mask-update step; the
  # step counter (an input) decides which branch of the lax.cond runs.
  sparse_tx = sparse_optimizer()
  sparse_state = sparse_tx.init(params)
  sparse_params = rigl_jax.apply_masks(params, sparse_state)
  masked_step, masked_compile = compile_timed(
      make_train_step(loss_fn, sparse_tx), sparse_params, batch_stats, sparse_state, x, y)
  masks = rigl_jax.get_masks(sparse_state)
  n_active = sum(int(np.asarray(m).sum()) for m in jax.tree.leaves(masks))

  # Real dense grads, for the RigL update alone and the optimizer-only timing.
  grads = jax.jit(jax.grad(lambda p: loss_fn(p, batch_stats, x, y)[0]))(sparse_params)
  step_arr = jnp.asarray(UPDATE_STEP, jnp.int32)
  update_fns, update_compile = {}, {}
  for m in UPDATE_METHODS:
    fn, state_of = make_method_update_fn(m, sparse_params)
    m_state = state_of(grads, masks)
    compiled, update_compile[m] = compile_timed(fn, sparse_params, grads, masks, step_arr, m_state)
    update_fns[m] = FnRunner(compiled, sparse_params, grads, masks, step_arr, m_state)
  for label, (m, structure, sparsity) in STRUCTURED.items():
    fn, _ = make_method_update_fn(m, sparse_params, structure, sparsity)
    # The dense initial params under the structured masks (not the RigL-masked
    # ones, where most structured-active weights would be exactly 0 and tie).
    s_masks = structured_masks(label, params)
    args = (rigl_jax.masks.apply_masks(params, s_masks), grads, s_masks, step_arr, ())
    compiled, update_compile[label] = compile_timed(fn, *args)
    update_fns[label] = FnRunner(compiled, *args)
  rigl_compile = update_compile["rigl"]
  opt_dense, _ = compile_timed(make_opt_only(dense_tx), params, dense_state, grads)
  opt_masked, _ = compile_timed(make_opt_only(sparse_tx), sparse_params, sparse_state, grads)

  def train_runner(step_fn, p, state, set_step=None):
    return Runner(step_fn, (p, batch_stats, state), (x, y), set_step)

  runners = {
      "dense": train_runner(dense_step, params, dense_state),
      # A second, identical dense runner: its ratio to "dense" is the noise floor.
      "dense_again": train_runner(dense_step, params, dense_state),
      "masked": train_runner(masked_step, sparse_params, sparse_state, NORMAL_STEP),
      "update": train_runner(masked_step, sparse_params, sparse_state, UPDATE_STEP),
      **{f"{m}_fn": update_fns[m] for m in UPDATE_METHODS},
      **{f"{m}_fn": update_fns[m] for m in STRUCTURED},
      "opt_dense": Runner(opt_dense, (params, dense_state), (grads,)),
      "opt_masked": Runner(opt_masked, (sparse_params, sparse_state), (grads,), NORMAL_STEP),
  }
  names = list(runners)
  for _ in range(warmup):
    for n in names:
      runners[n].sample(calls)

  times = {n: [] for n in names}
  t_loop = time.perf_counter()
  for r in range(reps):
    order = names[r % len(names):] + names[:r % len(names)]  # rotate: no fixed first
    for n in order:
      times[n].append(runners[n].sample(calls))
  loop_s = time.perf_counter() - t_loop

  med = {n: statistics.median(v) for n, v in times.items()}
  losses = {n: float(r.last_loss) for n, r in runners.items()
            if getattr(r, "last_loss", None) is not None}
  if not all(np.isfinite(v) for v in losses.values()):
    log(f"[{name}] WARNING: non-finite loss after a sample: {losses}")

  def paired(a, b):
    """Median over repetitions of the ratio a/b within the same repetition."""
    return statistics.median(ta / tb for ta, tb in zip(times[a], times[b]))

  row = {
      "model": name, "batch": batch, "input": list(hwc), "params": n_params,
      "active_params": n_active, "reps": reps, "calls_per_sample": calls,
      "dense_ms": 1e3 * med["dense"], "masked_ms": 1e3 * med["masked"],
      "update_step_ms": 1e3 * med["update"], "rigl_fn_ms": 1e3 * med["rigl_fn"],
      "opt_dense_ms": 1e3 * med["opt_dense"], "opt_masked_ms": 1e3 * med["opt_masked"],
      # 1. step-time overhead of the transform on a non-update step
      "masked_over_dense": med["masked"] / med["dense"],
      "masked_over_dense_paired": paired("masked", "dense"),
      "noise_floor": med["dense_again"] / med["dense"],
      # the same overhead from the optimizer part alone (less noisy, no fusion effects)
      "opt_overhead_over_step": (med["opt_masked"] - med["opt_dense"]) / med["dense"],
      # 2. cost of one mask update, in train steps, two ways
      "update_extra_over_step": (med["update"] - med["masked"]) / med["masked"],
      "rigl_fn_over_step": med["rigl_fn"] / med["masked"],
      "rigl_fn_over_step_paired": paired("rigl_fn", "masked"),
      "compile_dense_s": dense_compile, "compile_masked_s": masked_compile,
      "compile_rigl_fn_s": rigl_compile, "timed_loop_s": loop_s,
      "last_losses": losses,
  }
  # Amortised from the update function alone: a small time measured directly,
  # whereas update_extra is a difference of two step times, as noisy as they are.
  row["update_cost_amortised_dT100"] = row["rigl_fn_over_step"] / UPDATE_EVERY
  for m in UPDATE_METHODS:
    if m == "rigl":
      continue
    row[f"{m}_fn_ms"] = 1e3 * med[f"{m}_fn"]
    row[f"{m}_fn_over_step"] = med[f"{m}_fn"] / med["masked"]
    row[f"{m}_fn_over_step_paired"] = paired(f"{m}_fn", "masked")
    row[f"{m}_amortised_dT100"] = row[f"{m}_fn_over_step"] / UPDATE_EVERY
    row[f"compile_{m}_fn_s"] = update_compile[m]
  for label, reference in STRUCTURED_RATIOS.items():
    row[f"{label}_fn_ms"] = 1e3 * med[f"{label}_fn"]
    row[f"{label}_over_{reference}"] = med[f"{label}_fn"] / med[f"{reference}_fn"]
    row[f"{label}_over_{reference}_paired"] = paired(f"{label}_fn", f"{reference}_fn")
    row[f"compile_{label}_fn_s"] = update_compile[label]
  row["rigl50_fn_ms"] = 1e3 * med["rigl50_fn"]
  log(f"[{name}] structured update / unstructured: " + ", ".join(
      f"{label} {row[f'{label}_over_{ref}']:.2f}" for label, ref in STRUCTURED_RATIOS.items()))
  log(f"[{name}] masked/dense {row['masked_over_dense']:.3f} (noise floor "
      f"{row['noise_floor']:.3f}), update {row['update_extra_over_step']:.3f} / "
      f"rigl_fn {row['rigl_fn_over_step']:.3f} set_fn {row['set_fn_over_step']:.3f} "
      f"snfs_fn {row['snfs_fn_over_step']:.3f} rigl_sg_fn {row['rigl_sg_fn_over_step']:.3f} "
      f"steps; {loop_s:.0f} s timed")
  return row


ROWS = [  # (metric, format), printed one per line, one column per model
    ("batch", "{}"), ("params", "{}"), ("active_params", "{}"),
    ("reps", "{}"), ("calls_per_sample", "{}"),
    ("dense_ms", "{:.2f}"), ("masked_ms", "{:.2f}"),
    ("masked_over_dense", "{:.3f}"), ("masked_over_dense_paired", "{:.3f}"),
    ("noise_floor", "{:.3f}"),
    ("opt_dense_ms", "{:.3f}"), ("opt_masked_ms", "{:.3f}"),
    ("opt_overhead_over_step", "{:.4f}"),
    ("update_step_ms", "{:.2f}"), ("update_extra_over_step", "{:.3f}"),
    ("rigl_fn_ms", "{:.2f}"), ("rigl_fn_over_step", "{:.3f}"),
    ("rigl_fn_over_step_paired", "{:.3f}"),
    ("update_cost_amortised_dT100", "{:.5f}"),
    ("set_fn_ms", "{:.2f}"), ("set_fn_over_step", "{:.3f}"),
    ("set_fn_over_step_paired", "{:.3f}"), ("set_amortised_dT100", "{:.5f}"),
    ("snfs_fn_ms", "{:.2f}"), ("snfs_fn_over_step", "{:.3f}"),
    ("snfs_fn_over_step_paired", "{:.3f}"), ("snfs_amortised_dT100", "{:.5f}"),
    ("rigl_sg_fn_ms", "{:.2f}"), ("rigl_sg_fn_over_step", "{:.3f}"),
    ("rigl_sg_fn_over_step_paired", "{:.3f}"), ("rigl_sg_amortised_dT100", "{:.5f}"),
    ("cfi_fn_ms", "{:.2f}"), ("cfi_over_rigl", "{:.2f}"), ("cfi_over_rigl_paired", "{:.2f}"),
    ("srigl_fn_ms", "{:.2f}"), ("srigl_over_rigl", "{:.2f}"),
    ("srigl_over_rigl_paired", "{:.2f}"),
    ("block_fn_ms", "{:.2f}"), ("block_over_rigl", "{:.2f}"),
    ("block_over_rigl_paired", "{:.2f}"),
    ("rigl50_fn_ms", "{:.2f}"), ("nm_fn_ms", "{:.2f}"), ("nm_over_rigl50", "{:.2f}"),
    ("nm_over_rigl50_paired", "{:.2f}"),
    ("compile_dense_s", "{:.1f}"), ("compile_masked_s", "{:.1f}"),
    ("compile_rigl_fn_s", "{:.1f}"), ("timed_loop_s", "{:.0f}"),
]


def format_table(rows):
  """Metrics as rows, one column per model."""
  return table.metric_table(rows, "model", ROWS)


def summary_rows(result):
  """(benchmark, model, metric, value, target, verdict) rows for ``run_all.py``."""
  out = []
  for r in result["rows"]:
    m = r["model"]
    conv = m != "lenet_300_100"
    out.append(("core", m, "noise_floor (dense_again/dense)", f"{r['noise_floor']:.3f}", "", ""))
    v = r["masked_over_dense"]
    # Beyond 1.05 but by less than this run's noise floor: cannot tell.
    verdict = ("met" if v <= 1.05 else "inconclusive (noise)"
               if v - 1.05 <= abs(r["noise_floor"] - 1) else "MISSED")
    out.append(("core", m, "masked/dense step time", f"{v:.3f} (paired {r['masked_over_dense_paired']:.3f})",
                "<= 1.05 (conv nets)", verdict if conv else "n/a"))
    out.append(("core", m, "opt overhead / dense step", f"{r['opt_overhead_over_step']:.4f}", "", ""))
    out.append(("core", m, "compile masked / dense step",
                f"{r['compile_masked_s']:.1f} / {r['compile_dense_s']:.1f} s = "
                f"{r['compile_masked_s'] / r['compile_dense_s']:.2f}x", "", ""))
    for meth in UPDATE_METHODS:
      over = r[f"{meth}_fn_over_step"]
      amort = over / UPDATE_EVERY
      if meth == "rigl":
        out.append(("core", m, "rigl update / step", f"{over:.3f} (paired {r['rigl_fn_over_step_paired']:.3f})",
                    "<= 0.05 on WRN-22-2", ("met" if over <= 0.05 else "MISSED")
                    if m == "wrn_22_2" else "n/a"))
      else:
        out.append(("core", m, f"{meth} update / step",
                    f"{over:.3f} (paired {r[f'{meth}_fn_over_step_paired']:.3f})", "", ""))
      out.append(("core", m, f"{meth} update amortised dT=100", f"{100 * amort:.3f}% of step",
                  "<= 1%", "met" if amort <= 0.01 else "MISSED"))
    for label, reference in STRUCTURED_RATIOS.items():
      v = r[f"{label}_over_{reference}"]
      out.append(("core", m, f"{label} update / {reference} update",
                  f"{v:.2f} (paired {r[f'{label}_over_{reference}_paired']:.2f})", "<= 1",
                  "met" if v <= 1.0 else "MISSED"))
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true",
                      help="skip WRN-22-2 and use fewer repetitions (< 2 min)")
  parser.add_argument("--out", default=None, help="write the results as JSON here")
  parser.add_argument("--models", default=None,
                      help="comma-separated subset of " + ",".join(m[0] for m in MODELS))
  parser.add_argument("--reps", type=int, default=None,
                      help="override the repetitions of every model (fewer: faster, noisier)")
  args = parser.parse_args(argv)
  log = lambda msg: print(msg, file=sys.stderr, flush=True)

  selected = args.models.split(",") if args.models else None
  rows = []
  t0 = time.perf_counter()
  load_before = os.getloadavg()
  for name, batch, hwc, (reps_full, reps_quick), calls in MODELS:
    reps = reps_quick if args.quick else reps_full
    if selected is not None:
      if name not in selected:
        continue
      reps = reps or reps_full
    if args.reps:
      reps = args.reps
    if reps == 0:
      continue
    rows.append(bench_model(name, batch, hwc, reps, calls,
                            warmup=1 if name == "wrn_22_2" else 2, log=log))
  result = {
      "benchmark": "bench_core",
      "config": {"method": "rigl", "update_methods": list(UPDATE_METHODS), "sparsity": SPARSITY, "distribution": "erk",
                 "update_every": UPDATE_EVERY, "end_step": END_STEP,
                 "optimizer": "chain(add_decayed_weights(5e-4), sgd(0.1, momentum=0.9, "
                              "nesterov=True))",
                 "normal_step": NORMAL_STEP, "update_step": UPDATE_STEP},
      "quick": args.quick,
      "machine": {"platform": platform.platform(), "python": platform.python_version(),
                  "jax": jax.__version__, "backend": jax.default_backend(),
                  "cpu_count": os.cpu_count(), "loadavg_before": load_before,
                  "loadavg_after": os.getloadavg()},
      "total_s": time.perf_counter() - t0,
      "rows": rows,
  }
  return table.finish(result, format_table(rows), args.out)


if __name__ == "__main__":
  main()
