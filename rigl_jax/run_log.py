"""The run log: ``metrics.jsonl``, TensorBoard events and the console line.

It only writes. What a resumed run needs (the step, the training FLOPs) lives in
the checkpointed state; a log shortened, damaged or deleted changes no result.

Example::

    log = RunLog(workdir, start_step=0, total_steps=1000, hparams={"method": "rigl"})
    for step in range(1000):
      state, metrics = train_step(state, batch)
      log.add(metrics)                          # device values, fetched when written
      if (step + 1) % 100 == 0:
        log.write_train(step + 1, {"global_density": 0.1})
    log.write_eval(1000, "test", {"accuracy": 0.9, "loss": 0.3})
"""

from __future__ import annotations

import json
import math
import time

import jax
import numpy as np
from absl import logging

from rigl_jax import paths, tensorboard


def finite_or_null(value):
  """NaN and infinities as JSON null (``json.dumps`` would write bare ``NaN``)."""
  if isinstance(value, float) and not math.isfinite(value):
    return None
  if isinstance(value, dict):
    return {k: finite_or_null(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [finite_or_null(v) for v in value]
  return value


PENDING = "metrics_pending.json"


class MetricsLog:
  """``metrics.jsonl``: one JSON line per record; lines past a restored step are
  dropped on resume so the file reads like one uninterrupted run."""

  def __init__(self, path: str, resume_step: int):
    self.path = path
    self.writer = jax.process_index() == 0  # one writer when processes share the workdir
    lines = []
    if paths.exists(path):
      # A damaged byte must not stop every rerun: such a line fails to parse and is dropped.
      for line in paths.read_text(path, errors="replace").splitlines(keepends=True):
        try:
          record = json.loads(line)
        except json.JSONDecodeError:
          continue  # a line cut short by a kill
        if record.get("step", math.inf) <= resume_step:
          lines.append(line if line.endswith("\n") else line + "\n")
      if self.writer:
        paths.write_atomic(path, "".join(lines))

  def write(self, record: dict) -> None:
    if self.writer:
      line = json.dumps(finite_or_null(record), sort_keys=True, allow_nan=False) + "\n"
      try:
        paths.append(self.path, line)
      except OSError as e:
        from rigl_jax import workdir  # pylint: disable=import-outside-toplevel
        raise workdir.WriteError(f"workdir: cannot write {self.path}: "
                                 f"{e.strerror or e}") from e


class RunLog:
  """Training and evaluation records of one process's part of a run.

  ``add`` collects each step's metrics (device arrays; fetched in one transfer when
  written); ``write_train`` averages them into one record with the steps per second
  and the given state fields; ``write_eval`` writes an evaluation. Compilation (the
  first step of the process) and evaluation time are left out of steps/s and the ETA.
  """

  def __init__(self, workdir: str, start_step: int, total_steps: int, *,
               hparams: dict | None = None, warn_skipped: bool = False,
               bits_per_char: bool = False):
    self.total_steps = total_steps
    self.warn_skipped = warn_skipped
    self.bits_per_char = bits_per_char  # language models: the loss also in bits per char
    self.metrics = MetricsLog(paths.join(workdir, "metrics.jsonl"), start_step)
    self.events = None
    if jax.process_index() == 0:
      self.events = tensorboard.ScalarWriter(paths.join(workdir, "tensorboard"), start_step)
      if hparams:
        self.events.write_hparams(hparams, group_name=paths.basename(paths.resolve(workdir)))
    self.pending: list = []
    self._pending_path = paths.join(workdir, PENDING)
    self._load_pending(start_step)
    self._compiled = False
    self._interval_start = time.time()
    self._timed_steps = 0

  def save_pending(self, step: int) -> None:
    """At a stop between two log steps: keeps the metrics of the steps since the last
    record in ``metrics_pending.json`` instead of writing a record an uninterrupted run
    would not write; the resumed run (from the checkpoint of ``step``) takes them up,
    so its next record averages the whole interval and the log reads as one run."""
    if not self.metrics.writer or not self.pending:
      return
    host = jax.device_get(self.pending)
    keys = sorted(host[0])
    saved = {"step": step, "dtypes": {k: str(np.asarray(host[0][k]).dtype) for k in keys},
             "values": {k: [np.asarray(m[k]).item() for m in host] for k in keys}}
    paths.write_atomic(self._pending_path, json.dumps(saved))

  def _load_pending(self, start_step: int) -> None:
    """The metrics a stop at ``start_step`` left (see save_pending); others are stale."""
    if not start_step or not paths.exists(self._pending_path):
      return
    try:
      saved = json.loads(paths.read_text(self._pending_path))
      if saved.get("step") != start_step:
        return
      values, dtypes = saved["values"], saved["dtypes"]
      count = len(next(iter(values.values())))
      self.pending = [{k: np.asarray(values[k][i], dtypes[k]) for k in values}
                      for i in range(count)]
    except (OSError, ValueError, KeyError, TypeError, StopIteration):
      self.pending = []  # a damaged file: the interval's record covers fewer steps

  def add(self, metrics: dict) -> None:
    """One step's metrics. The first call waits for the step: it compiled it."""
    self.pending.append(metrics)
    if not self._compiled:
      jax.block_until_ready(metrics)
      self._compiled = True
      self._interval_start = time.time()
    else:
      self._timed_steps += 1

  def _scalars(self, step: int, scalars: dict) -> None:
    if self.events is not None:
      self.events.write(step, {k: v for k, v in scalars.items()
                               if isinstance(v, (int, float)) and math.isfinite(v)})

  def write_train(self, step: int, state_fields: dict) -> dict:
    """Writes the steps added since the last call as one record, with ``state_fields``
    (densities, FLOPs, ... of the state after ``step``)."""
    host = jax.device_get(self.pending)
    elapsed = time.time() - self._interval_start
    rate = self._timed_steps / max(elapsed, 1e-9) if self._timed_steps else None
    record = {
        "step": step,
        "loss": float(np.mean([m["loss"] for m in host])),
        "accuracy": float(np.mean([m["accuracy"] for m in host])),
        "learning_rate": float(host[-1]["learning_rate"]),
        "steps_per_s": rate,
        "nonfinite": int(sum(m["nonfinite"] for m in host)),
        **state_fields,
    }
    if self.bits_per_char:
      record["bits_per_char"] = record["loss"] / math.log(2)
    self.metrics.write(record)
    self._scalars(step, {k: v for k, v in record.items()
                         if k not in ("step", "layer_densities")})
    self._scalars(step, {f"density/{k}": v
                         for k, v in record.get("layer_densities", {}).items()})
    speed = (f"{rate:.1f} steps/s  eta {(self.total_steps - step) / max(rate, 1e-9):.0f}s"
             if rate else "compiling")
    logging.info("step %d/%d  loss %.4f  acc %.4f  lr %.4g  density %.4f  %s", step,
                 self.total_steps, record["loss"], record["accuracy"],
                 record["learning_rate"], record.get("global_density", 1.0), speed)
    if record["nonfinite"] and self.warn_skipped:
      logging.warning("Skipped %d batch(es) with a non-finite loss or gradient in steps "
                      "%d-%d.", record["nonfinite"], step - len(host), step - 1)
    self.pending, self._interval_start, self._timed_steps = [], time.time(), 0
    return record

  def write_eval(self, step: int, split: str, metrics: dict, *, seconds: float = 0.0,
                 final: bool = False) -> None:
    """``{split}_{name}`` in metrics.jsonl, ``{split}/{name}`` in TensorBoard;
    ``seconds`` spent evaluating are left out of the training rate. A ``final``
    evaluation goes to TensorBoard only: summary.json holds it."""
    if not final:
      self.metrics.write({"step": step, **{f"{split}_{k}": v for k, v in metrics.items()}})
    self._scalars(step, {f"{split}/{k}": v for k, v in metrics.items()})
    self._interval_start += seconds

  def write_event(self, record: dict) -> None:
    """A record that is not a metric (e.g. the step of a non-finite loss)."""
    self.metrics.write(record)
