"""Accelerator hours of a grid: steps per run x seconds per step.

Nothing here is a measured fact about any accelerator: seconds per step are either
given (``--seconds_per_step=a100=0.05``, a number you measured or trust for your
hardware) or measured from the ``steps_per_s`` lines of runs already in a sweep
directory. Assumptions of the estimate, stated in its output:

- Every run of a grid takes the same time per step. Sparse methods here simulate
  sparsity with masks on dense kernels, so a step costs about the same for every
  method and sparsity; small_dense runs are cheaper (the estimate is an upper bound
  for them) and methods with dense gradients (snfs) are not slower per step.
- Only training steps are counted: evaluation, compilation and checkpoints are not.
- A run's steps follow the trainer: ``num_train_steps`` when set, else
  ``num_epochs x steps_per_epoch``, times ``train_multiplier``; ``steps_per_epoch`` is
  ``(train split - validation) // batch_size`` from the split sizes below.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from typing import Sequence

import ml_collections

from rigl_jax import config as config_lib


def steps_per_epoch(c: ml_collections.ConfigDict) -> int:
  """Train steps per epoch of config ``c`` (KeyError for a data set of unknown size)."""
  from rigl_jax import data  # pylint: disable=import-outside-toplevel
  if c.dataset not in data.TRAIN_SPLIT_SIZES:
    raise KeyError(f"no train split size known for dataset {c.dataset!r}; set "
                   f"num_train_steps or pass steps_per_epoch")
  return data.train_steps_per_epoch(c.dataset, c.batch_size, c.validation_size)


def run_steps(c: ml_collections.ConfigDict, spe: int | None = None) -> int:
  """Training steps of one run, as the trainer counts them."""
  if c.num_train_steps >= 0:
    return config_lib.total_steps(c, 1)
  return config_lib.total_steps(c, spe if spe is not None else steps_per_epoch(c))


def measured_seconds_per_step(sweep_dir: str) -> float | None:
  """Median of ``1 / steps_per_s`` over the metrics lines of the runs in ``sweep_dir``.

  The first line of every run (it includes compilation) is left out. None when no
  run has logged yet.
  """
  samples = []
  if not os.path.isdir(sweep_dir):
    return None
  for name in sorted(os.listdir(sweep_dir)):
    path = os.path.join(sweep_dir, name, "metrics.jsonl")
    if not os.path.exists(path):
      continue
    with open(path) as f:
      records = [json.loads(line) for line in f if line.strip()]
    rates = [r["steps_per_s"] for r in records if r.get("steps_per_s")]
    samples += [1.0 / r for r in rates[1:] if r > 0 and math.isfinite(r)]
  return statistics.median(samples) if samples else None


def estimate(configs: Sequence[ml_collections.ConfigDict], seconds_per_step: dict[str, float],
             spe: int | None = None) -> dict:
  """``{"runs", "steps", "hours": {label: accelerator hours}}`` for the given runs.

  Args:
    configs: the resolved config of every run of the grid.
    seconds_per_step: ``{label: seconds}``, e.g. ``{"a100": 0.05, "measured": 0.2}``;
      labels are free text (one accelerator each).
    spe: steps per epoch, when the data set's split size is not in
      ``rigl_jax.data.TRAIN_SPLIT_SIZES``.
  """
  steps = sum(run_steps(c, spe) for c in configs)
  return {"runs": len(configs), "steps": steps,
          "hours": {label: steps * s / 3600.0 for label, s in seconds_per_step.items()}}


def format_estimate(title: str, result: dict) -> str:
  lines = [f"{title}: {result['runs']} runs, {result['steps']:,} training steps"]
  if not result["hours"]:
    lines.append("  no seconds per step given or measured: pass --seconds_per_step=LABEL=SECONDS")
  for label, hours in result["hours"].items():
    lines.append(f"  {label}: {hours:,.1f} accelerator-hours ({hours / 24:,.1f} days on one)")
  lines.append("  assumptions: the same time per step for every method and sparsity (masked "
               "dense kernels), training steps only (no eval, compilation, checkpoints)")
  return "\n".join(lines)


def parse_seconds_per_step(items: Sequence[str]) -> dict[str, float]:
  """``["a100=0.05", "v100=0.09"]`` -> ``{"a100": 0.05, "v100": 0.09}``."""
  out = {}
  for item in items or ():
    label, _, value = item.partition("=")
    if not value:
      raise ValueError(f"expected LABEL=SECONDS, got {item!r}")
    seconds = float(value)
    if not seconds > 0:
      raise ValueError(f"seconds per step must be > 0, got {item!r}")
    out[label] = seconds
  return out
