"""Schedules: when masks change, and by how much.

Every function here works on Python ints and on traced jnp scalars alike, so the
same code decides the update step inside a jitted optimizer and in a unit test.
"""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp
import numpy as np

DROP_SCHEDULES = ("cosine", "constant")


def is_update_step(step, *, update_every: int, start_step: int, end_step: int):
  """True on steps ``start_step + k * update_every`` (k >= 1) that are below ``end_step``.

  Step 0 of a schedule is skipped: nothing has been trained yet, and the method's
  first decision should see at least ``update_every`` steps of gradients.
  """
  since = step - start_step
  return (since > 0) & (since % update_every == 0) & (step < end_step)


def cosine_drop_fraction(step, *, initial: float, start_step: int, end_step: int):
  """The RigL paper's schedule: ``initial / 2 * (1 + cos(pi * t / T))``, t from start_step."""
  t = jnp.clip((step - start_step) / max(end_step - start_step, 1), 0.0, 1.0)
  return initial / 2.0 * (1.0 + jnp.cos(jnp.pi * t))


def constant_drop_fraction(step, *, initial: float, start_step: int, end_step: int):
  del start_step, end_step
  return jnp.full(jnp.shape(step), initial, jnp.float32)


def make_drop_fraction_fn(schedule: str | Callable, *, initial: float, start_step: int,
                          end_step: int) -> Callable:
  """``fn(step) -> drop fraction`` for a named schedule or a user callable ``fn(step)``."""
  if callable(schedule):
    return schedule
  fns = {"cosine": cosine_drop_fraction, "constant": constant_drop_fraction}
  if schedule not in fns:
    raise ValueError(f"drop_schedule must be one of {DROP_SCHEDULES} or a callable "
                     f"fn(step) -> fraction, got {schedule!r}.")
  fn = fns[schedule]
  return lambda step: fn(step, initial=initial, start_step=start_step, end_step=end_step)


def max_drop_fraction(schedule: str | Callable, initial: float) -> float:
  """Upper bound of the schedule's values, which sizes the static top-k of an update."""
  return float(initial) if schedule in DROP_SCHEDULES else 1.0


def polynomial_sparsity(step, *, initial: float, final: float, start_step: int,
                        end_step: int, power: float = 3.0):
  """Zhu & Gupta's target sparsity ``s_f + (s_i - s_f) * (1 - progress)^power``.

  A jax array (or tracer) step gives a jax float32 result; a Python or numpy
  step gives a numpy float64 one, so static tables of exact counts can be built
  from the same formula without float32 rounding.
  """
  xp = jnp if isinstance(step, jnp.ndarray) else np
  progress = xp.clip((step - start_step) / max(end_step - start_step, 1), 0.0, 1.0)
  return final + (initial - final) * (1.0 - progress) ** power


def pruning_steps(*, update_every: int, start_step: int, end_step: int) -> np.ndarray:
  """The steps on which gradual pruning prunes: ``start_step + k * update_every``
  (k >= 1) up to and including ``end_step``, and ``end_step`` itself always, so the
  final target is reached exactly there even when the interval does not divide
  ``end_step - start_step``.
  """
  grid = np.arange(start_step + update_every, end_step + 1, update_every)
  return np.union1d(grid, [end_step]).astype(np.int64)


def is_pruning_step(step, *, update_every: int, start_step: int, end_step: int):
  """True on the steps :func:`pruning_steps` lists (works on traced steps)."""
  since = step - start_step
  on_grid = (since > 0) & (since % update_every == 0) & (step <= end_step)
  return on_grid | (step == end_step)


def num_update_steps(*, update_every: int, start_step: int, end_step: int) -> int:
  """How many update steps ``is_update_step`` marks."""
  steps = np.arange(start_step + update_every, end_step, update_every)
  return int(steps.size)
