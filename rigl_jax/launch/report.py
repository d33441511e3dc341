r"""Tables and plots of a sweep: ``python -m rigl_jax.launch.report --sweep_dir=DIR --out=RESULTS_DIR``.

Reads every run of the sweep (the runs listed in ``DIR/sweep.json``, every workdir in
``DIR`` and every entry of ``DIR/status.json``): its ``summary.json``, ``config.json``
and ``metrics.jsonl``. Writes into RESULTS_DIR:

- ``table.md``, ``table.csv``: the layout of the report's Tables 2 and 3. One row per
  method + distribution (+ training multiplier, + any other field the sweep varies);
  per sparsity the test accuracy (%; for language models the test bits per character),
  mean +- sample std over the finished seeds with
  their count, and the (train, test) FLOP multipliers (means over seeds). A run that
  has no summary, failed, diverged or has a non-finite accuracy is counted in its
  cell as such, and listed under "Runs without a result"; none is dropped.
- ``runs.csv``: one line per run, raw numbers and status.
- ``accuracy_vs_sparsity.png``, ``accuracy_vs_train_flops.png``: per row (language models:
  ``bits_per_char_vs_sparsity.png``, ``bits_per_char_vs_train_flops.png``).
- ``layer_densities.png``: per-layer density of uniform / ER / ERK (from the runs'
  ``layer_densities``), one panel per sparsity.
- ``redistribution_*.png`` when the sweep has snfs / rigl_sg / rigl_sm runs: training
  FLOPs (as a multiplier of the dense step) over training from ``metrics.jsonl``,
  and the layer densities (over training when ``metrics.jsonl`` logs
  ``layer_densities``, else final against the initial distribution).

Every number comes from the run files; nothing is typed in.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import re
import statistics
from typing import Any, Sequence

from absl import flags

from rigl_jax import cli, names
from rigl_jax import paths as rigl_paths
from rigl_jax.launch import grid, local

OK, FAILED, DIVERGED, UNFINISHED, RUNNING, NOT_RUN = (
    "ok", "failed", "diverged", "unfinished", "running", "not run")
METHOD_NAMES = {"small_dense": "Small Dense", "static": "Static", "set": "SET", "rigl": "RigL",
                "snfs": "SNFS", "rigl_sg": "RigL-SG", "rigl_sm": "RigL-SM",
                "pruning": "Pruning", "pruning_global": "Pruning (global)",
                "lottery": "Lottery", "srigl": "SRigL", "dense": "Dense"}
METHOD_ORDER = tuple(METHOD_NAMES)
DISTRIBUTION_ORDER = names.DISTRIBUTION_NAMES
DISTRIBUTION_SUFFIX = {"uniform": "", "er": " (ER)", "erk": " (ERK)"}
NO_DISTRIBUTION = ("dense", "small_dense")     # methods without a sparsity distribution
REDISTRIBUTING = ("snfs", "rigl_sg", "rigl_sm")  # per-layer counts move during training
FIXED_LAYER_COUNTS = ("static", "set", "rigl")  # their final densities are the initial ones
# Fields that never make rows: they are the columns, the seeds, or do not change results.
_NOT_ROW_FIELDS = {"seed", "sparsity", "log_every", "eval_every", "checkpoint_every",
                   "keep_checkpoints", "overwrite", "data_dir"}


@dataclasses.dataclass
class RunResult:
  """One run of the sweep and what became of it."""
  name: str
  workdir: str
  fields: dict                      # the run's config fields (as far as known)
  status: str                       # OK, FAILED, DIVERGED, UNFINISHED, RUNNING, NOT_RUN
  detail: str = ""
  summary: dict | None = None

  @property
  def ok(self) -> bool:
    return self.status == OK


def _read_json(path: str):
  try:
    return json.loads(rigl_paths.read_text(path))
  except (OSError, json.JSONDecodeError, UnicodeDecodeError):
    return None


def read_metrics(workdir: str) -> list[dict]:
  """The JSON lines of ``metrics.jsonl`` ([] when missing; cut lines skipped)."""
  records = []
  try:
    text = rigl_paths.read_text(rigl_paths.join(workdir, "metrics.jsonl"), errors="replace")
  except OSError:
    return records
  for line in text.splitlines():
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:
      continue
  return records


def _finite(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _last_line(text: str) -> str:
  lines = [l.strip() for l in (text or "").splitlines() if l.strip()]
  return lines[-1][:300] if lines else ""


def _outcome(workdir: str, summary: dict | None, entry: dict) -> tuple[str, str]:
  """(status, detail) of one run."""
  if summary is not None:
    acc = summary.get("test_accuracy")
    if _finite(acc):
      return OK, ""
    return DIVERGED, f"non-finite test accuracy {acc!r}"
  state = entry.get("state")
  if state in (local.FAILED, local.DIVERGED):
    return state, f"exit {entry.get('returncode')}: {_last_line(entry.get('stderr_tail', ''))}"
  if any(r.get("event") == "nonfinite" for r in read_metrics(workdir)):
    return DIVERGED, "non-finite loss or gradient (metrics.jsonl)"
  if state == local.BLOCKED:
    return NOT_RUN, entry.get("stderr_tail", "") or "not started: its source did not finish"
  if state == local.RUNNING:
    return RUNNING, "running (status.json)"
  if rigl_paths.is_dir(workdir):
    return UNFINISHED, f"no summary.json{f' ({state})' if state else ''}"
  return NOT_RUN, "no workdir"


def collect(sweep_dir: str) -> list[RunResult]:
  """Every run of the sweep, in manifest order, then other workdirs by name."""
  manifest = grid.read_manifest(sweep_dir) or {}
  status = local.read_status(sweep_dir)
  base = dict(manifest.get("base_config", {}))
  base.update(manifest.get("common_overrides", {}))
  overrides = {r["name"]: r["overrides"] for r in manifest.get("runs", [])}
  names = list(overrides)
  for name, entry in status.items():
    if name not in overrides:
      names.append(name)
      overrides[name] = entry.get("overrides") or grid.parse_run_name(name)
  if rigl_paths.is_dir(sweep_dir):
    for name in rigl_paths.listdir(sweep_dir):
      workdir = rigl_paths.join(sweep_dir, name)
      is_run = any(rigl_paths.exists(rigl_paths.join(workdir, f))
                   for f in ("config.json", "summary.json", local.STDERR, "metrics.jsonl"))
      if name not in overrides and is_run:
        names.append(name)
        overrides[name] = grid.parse_run_name(name)
  results = []
  for name in names:
    workdir = rigl_paths.join(sweep_dir, name)
    summary = _read_json(rigl_paths.join(workdir, "summary.json"))
    fields = dict(base)
    fields.update(overrides[name])
    fields.update(_read_json(rigl_paths.join(workdir, "config.json")) or {})
    if summary:
      fields.update({k: summary[k] for k in ("method", "distribution", "sparsity", "seed",
                                             "train_multiplier") if k in summary})
    status_, detail = _outcome(workdir, summary, status.get(name, {}))
    results.append(RunResult(name, workdir, fields, status_, detail, summary))
  return results


# ----------------------------------------------------------------------------- rows


def row_fields(results: Sequence[RunResult]) -> list[str]:
  """Fields that make a row: method, distribution, train_multiplier, and every other
  field that takes more than one value among the runs of one method (learning_rate,
  ...). A field set for one method only (the pruning rows' start_step) labels no row."""
  keys = ["method", "distribution", "train_multiplier"]
  candidates = sorted({k for r in results for k in r.fields} - set(keys) - _NOT_ROW_FIELDS)
  for key in candidates:
    values = {}
    for r in results:
      if key in r.fields:
        values.setdefault(r.fields.get("method"), set()).add(
            json.dumps(_row_value(key, r.fields[key]), sort_keys=True))
    if any(len(v) > 1 for v in values.values()):
      keys.append(key)
  return keys


# Fields naming another run's workdir (of the same sparsity and seed): rows use that run's
# name without them.
_SOURCE_FIELDS = ("source_workdir", "distribution_source")


def _row_value(key: str, value):
  if key in _SOURCE_FIELDS and isinstance(value, str) and value:
    # A lottery run's source has the run's own sparsity and seed (the trainer demands
    # it): the row is the source without them.
    name = os.path.basename(os.path.normpath(value))
    return re.sub(r"(^|,)(seed|sparsity)=[^,]*", "", name).strip(",") or "source"
  return _hashable(value)


def _row_key(result: RunResult, keys: Sequence[str]) -> tuple:
  method = result.fields.get("method")
  return tuple(None if (k == "distribution" and method in NO_DISTRIBUTION) else
               _row_value(k, result.fields.get(k)) for k in keys)


def _hashable(value):
  if isinstance(value, list):
    return tuple(_hashable(v) for v in value)
  if isinstance(value, dict):
    return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
  return value


def column_of(result: RunResult) -> float:
  """The sparsity column of a run (dense runs: 0.0 whatever their sparsity field)."""
  if result.fields.get("method") == "dense":
    return 0.0
  return float(result.fields.get("sparsity", float("nan")))


def row_label(key: tuple, keys: Sequence[str]) -> str:
  values = dict(zip(keys, key))
  method = values.get("method")
  label = METHOD_NAMES.get(method, str(method))
  label += DISTRIBUTION_SUFFIX.get(values.get("distribution"), "")
  multiplier = values.get("train_multiplier")
  if _finite(multiplier) and multiplier != 1.0:
    label += f" {multiplier:g}x"
  for k in keys[3:]:
    # Strings as they are ("2:4"); run names make them file-safe, labels need not.
    value = values[k]
    label += f", {k}={value if isinstance(value, str) else grid.format_value(value)}"
  return label


def _rank(seq, value):
  return seq.index(value) if value in seq else len(seq)


def _row_sort_key(key: tuple, keys: Sequence[str]):
  values = dict(zip(keys, key))
  method = values.get("method")
  multiplier = values.get("train_multiplier")
  return (method == "dense", multiplier if _finite(multiplier) else 0.0,
          tuple((0, values[k], "") if _finite(values[k]) else (1, 0.0, str(values[k]))
                for k in keys[3:]),
          _rank(DISTRIBUTION_ORDER, values.get("distribution")),
          _rank(METHOD_ORDER, method), str(method))


@dataclasses.dataclass(frozen=True)
class Metric:
  """The number a table reports: a key of ``summary.json``, shown times ``scale``."""
  key: str
  scale: float
  name: str       # "test accuracy"
  unit: str       # "%"
  better: str     # "higher" or "lower"
  slug: str       # in file names

  @property
  def title(self) -> str:
    return self.name + (f" ({self.unit})" if self.unit else "")


ACCURACY = Metric("test_accuracy", 100.0, "test accuracy", "%", "higher", "accuracy")
BITS_PER_CHAR = Metric("test_bits_per_char", 1.0, "test bits per character", "", "lower",
                       "bits_per_char")


def metric_of(results: Sequence[RunResult]) -> Metric:
  """Bits per character for a language-modelling sweep, else test accuracy."""
  if any(_finite((r.summary or {}).get("test_bits_per_char")) for r in results):
    return BITS_PER_CHAR
  return ACCURACY


@dataclasses.dataclass
class Cell:
  """The runs of one row at one sparsity."""
  runs: list
  metric: Metric = ACCURACY

  @property
  def finished(self) -> list:
    return [r for r in self.runs if r.ok]

  def values(self, key: str) -> list[float]:
    return [float(r.summary[key]) for r in self.finished if _finite(r.summary.get(key))]

  @property
  def accuracies(self) -> list[float]:
    """The metric of the finished runs, scaled (test accuracy: in percent)."""
    return [self.metric.scale * a for a in self.values(self.metric.key)]

  def mean(self, key: str | None = None, scale: float | None = None) -> float | None:
    """Mean of ``key`` (default: the metric, scaled) over the finished runs."""
    if key is None:
      key, scale = self.metric.key, self.metric.scale if scale is None else scale
    scale = 1.0 if scale is None else scale
    values = self.values(key)
    return scale * statistics.fmean(values) if values else None

  def std(self, key: str | None = None, scale: float | None = None) -> float | None:
    """Sample standard deviation (n - 1); 0.0 for one run, None for none."""
    if key is None:
      key, scale = self.metric.key, self.metric.scale if scale is None else scale
    scale = 1.0 if scale is None else scale
    values = self.values(key)
    if not values:
      return None
    return scale * statistics.stdev(values) if len(values) > 1 else 0.0

  @property
  def problems(self) -> dict[str, int]:
    counts = {}
    for r in self.runs:
      if not r.ok:
        counts[r.status] = counts.get(r.status, 0) + 1
    return counts


@dataclasses.dataclass
class Row:
  key: tuple
  label: str
  fields: dict
  cells: dict        # sparsity -> Cell


def build_rows(results: Sequence[RunResult], metric: Metric | None = None
               ) -> tuple[list[Row], list[float]]:
  """Rows (sorted as in the report) and the sparsity columns (descending); the cells
  report ``metric`` (default: ``metric_of(results)``)."""
  metric = metric or metric_of(results)
  keys = row_fields(results)
  groups = {}
  for r in results:
    groups.setdefault(_row_key(r, keys), []).append(r)
  rows = []
  for key in sorted(groups, key=lambda k: _row_sort_key(k, keys)):
    cells = {}
    for r in groups[key]:
      cells.setdefault(column_of(r), Cell([], metric)).runs.append(r)
    rows.append(Row(key, row_label(key, keys), dict(zip(keys, key)), cells))
  columns = sorted({s for row in rows for s in row.cells}, reverse=True)
  return rows, columns


# ----------------------------------------------------------------------------- tables


def _column_title(sparsity: float) -> str:
  return "dense" if sparsity == 0.0 else f"{100 * sparsity:g}% sparse"


def accuracy_text(cell: Cell | None) -> str:
  """``92.40 ± 0.06 (n=3)`` (one seed: ``91.90 (n=1)``), with the runs without a result
  counted."""
  if cell is None:
    return ""
  problems = ", ".join(f"{n} {s}" for s, n in sorted(cell.problems.items()))
  n = len(cell.accuracies)
  if not n:
    return problems or "no runs"
  if n == 1:  # one seed has no spread to show
    text = f"{cell.mean():.2f} (n=1"
  else:
    text = f"{cell.mean():.2f} ± {cell.std():.2f} (n={n}"
  return text + (f"; {problems})" if problems else ")")


def flops_text(cell: Cell | None) -> str:
  if cell is None or not cell.finished:
    return ""
  train, test = cell.mean("train_flops_multiplier"), cell.mean("test_flops_multiplier")
  if train is None or test is None:
    return ""
  return f"{train:.2f}x, {test:.2f}x"


def markdown(rows: Sequence[Row], columns: Sequence[float], results: Sequence[RunResult],
             title: str, metric: Metric = ACCURACY) -> str:
  header = ["Method"]
  column = "Accuracy (Test)" if metric == ACCURACY else "Bits per char (Test)"
  for s in columns:
    header += [f"{_column_title(s)}: {column}", f"{_column_title(s)}: FLOPs (Train, Test)"]
  lines = [f"# {title}", "",
           f"{metric.title[0].upper() + metric.title[1:]}, {metric.better} is better: mean "
           "± sample standard deviation over the finished seeds (n); FLOPs: training and "
           "inference FLOPs as multiples of the dense model's, means over seeds. Runs "
           "without a result are counted in their cell.", "",
           "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for row in rows:
    cells = [row.label]
    for s in columns:
      cell = row.cells.get(s)
      cells += [accuracy_text(cell), flops_text(cell)]
    lines.append("| " + " | ".join(cells) + " |")
  bad = [r for r in results if not r.ok]
  finished = len(results) - len(bad)
  lines += ["", f"{finished} of {len(results)} runs finished."]
  if bad:
    lines += ["", "## Runs without a result", "", "| run | status | detail |", "|---|---|---|"]
    lines += [f"| {r.name} | {r.status} | {r.detail.replace('|', '/')} |" for r in bad]
  return "\n".join(lines) + "\n"


def table_csv_rows(rows: Sequence[Row], columns: Sequence[float]) -> list[dict]:
  """The table's numbers: per row and sparsity s, ``acc_mean@s`` (percent), ``acc_std@s``,
  ``n@s``, ``not_ok@s``, ``train_flops@s``, ``test_flops@s``, ``cell@s`` (the text)."""
  out = []
  for row in rows:
    record = {"row": row.label}
    record.update({k: "" if v is None else v for k, v in row.fields.items()})
    for s in columns:
      cell = row.cells.get(s)
      finished = cell.finished if cell else []
      record.update({
          f"acc_mean@{s:g}": cell.mean() if finished else "",
          f"acc_std@{s:g}": cell.std() if finished else "",
          f"n@{s:g}": len(cell.accuracies) if cell else 0,
          f"not_ok@{s:g}": sum(cell.problems.values()) if cell else 0,
          f"train_flops@{s:g}": cell.mean("train_flops_multiplier") if finished else "",
          f"test_flops@{s:g}": cell.mean("test_flops_multiplier") if finished else "",
          f"cell@{s:g}": accuracy_text(cell),
      })
    out.append(record)
  return out


RUN_COLUMNS = ("name", "status", "detail", "method", "distribution", "sparsity",
               "train_multiplier", "seed", "test_accuracy", "val_accuracy",
               "test_bits_per_char", "global_density",
               "train_flops_multiplier", "test_flops_multiplier", "steps", "wall_time_s")


def run_csv_rows(results: Sequence[RunResult]) -> list[dict]:
  out = []
  for r in results:
    record = {"name": r.name, "status": r.status, "detail": r.detail}
    for k in RUN_COLUMNS[3:8]:
      record[k] = r.fields.get(k, "")
    for k in RUN_COLUMNS[8:]:
      record[k] = (r.summary or {}).get(k, "")
    out.append(record)
  return out


def _write_csv(path: str, records: Sequence[dict]) -> None:
  fieldnames = []
  for record in records:
    fieldnames += [k for k in record if k not in fieldnames]
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=fieldnames)
    writer.writeheader()
    writer.writerows(records)


# ----------------------------------------------------------------------------- plots


def _pyplot():
  try:
    import matplotlib  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise ImportError("rigl_jax.launch.report's plots need matplotlib: pip install -e '.[launch]' "
                      "(or pip install matplotlib)") from None
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  return plt


def _save(fig, path: str) -> str:
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  _pyplot().close(fig)
  return path


def _metric_of_rows(rows: Sequence[Row]) -> Metric:
  return next((c.metric for row in rows for c in row.cells.values()), ACCURACY)


def plot_accuracy_vs_sparsity(rows: Sequence[Row], path: str) -> str | None:
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(7, 4.5))
  drawn = False
  for row in rows:
    points = sorted((s, c) for s, c in row.cells.items() if c.accuracies)
    if not points:
      continue
    if row.fields.get("method") == "dense":
      for s, c in points:
        ax.axhline(c.mean(), color="k", ls="--", lw=1, label=f"{row.label} (dense)")
      drawn = True
      continue
    xs = [s for s, _ in points]
    ax.errorbar(xs, [c.mean() for _, c in points], yerr=[c.std() for _, c in points],
                marker="o", capsize=3, label=row.label)
    drawn = True
  if not drawn:
    plt.close(fig)
    return None
  ax.set_xlabel("sparsity")
  metric = _metric_of_rows(rows)
  ax.set_ylabel(metric.title)
  ax.set_title(f"{metric.name.capitalize()} vs sparsity (mean ± std over seeds)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, ncol=2)
  return _save(fig, path)


def plot_accuracy_vs_flops(rows: Sequence[Row], path: str) -> str | None:
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(7, 4.5))
  drawn = False
  for row in rows:
    points = []
    for s, cell in sorted(row.cells.items()):
      flops = cell.mean("train_flops_multiplier")
      if cell.accuracies and flops is not None:
        points.append((flops, cell.mean(), cell.std(), s))
    if not points:
      continue
    points.sort()
    ax.errorbar([p[0] for p in points], [p[1] for p in points], yerr=[p[2] for p in points],
                marker="o", capsize=3, label=row.label)
    for flops, acc, _, s in points:
      ax.annotate(f"{s:g}", (flops, acc), fontsize=6, xytext=(3, 3), textcoords="offset points")
    drawn = True
  if not drawn:
    plt.close(fig)
    return None
  xs = [line.get_xdata() for line in ax.get_lines()]
  low = min(min(x) for x in xs if len(x))
  high = max(max(x) for x in xs if len(x))
  if low > 0 and high / low > 4:
    ax.set_xscale("log")
  from matplotlib import ticker  # pylint: disable=import-outside-toplevel
  ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:.3g}x"))
  ax.xaxis.set_minor_formatter(ticker.NullFormatter())
  ax.set_xlabel("training FLOPs (multiple of dense training)")
  metric = _metric_of_rows(rows)
  ax.set_ylabel(metric.title)
  ax.set_title(f"{metric.name.capitalize()} vs training FLOPs (labels: sparsity)")
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=7, ncol=2)
  return _save(fig, path)


def _is_weight(layer: str) -> bool:
  return not re.search(r"(bias|scale)$", layer)


def _mean_layer_densities(runs: Sequence[RunResult]) -> dict[str, float]:
  per_layer = {}
  for r in runs:
    for layer, d in (r.summary.get("layer_densities") or {}).items():
      if _is_weight(layer) and _finite(d):
        per_layer.setdefault(layer, []).append(float(d))
  return {k: statistics.fmean(v) for k, v in per_layer.items()}


def plot_layer_densities(results: Sequence[RunResult], path: str) -> str | None:
  """Per-layer density of uniform / ER / ERK, one panel per sparsity: runs of methods
  that keep their per-layer counts (static, set, rigl), finished, averaged over runs."""
  groups = {}
  for r in results:
    if r.ok and r.fields.get("method") in FIXED_LAYER_COUNTS and r.summary.get("layer_densities"):
      groups.setdefault((column_of(r), r.fields.get("distribution")), []).append(r)
  if not groups:
    return None
  plt = _pyplot()
  sparsities = sorted({s for s, _ in groups}, reverse=True)
  layers = sorted({l for runs in groups.values() for l in _mean_layer_densities(runs)})
  width = max(6.0, 0.35 * len(layers) + 2)
  fig, axes = plt.subplots(len(sparsities), 1, figsize=(width, 3.2 * len(sparsities)),
                           squeeze=False)
  for ax, s in zip(axes[:, 0], sparsities):
    dists = [d for d in DISTRIBUTION_ORDER if (s, d) in groups]
    bar = 0.8 / max(len(dists), 1)
    for i, d in enumerate(dists):
      densities = _mean_layer_densities(groups[(s, d)])
      xs = [j + (i - (len(dists) - 1) / 2) * bar for j in range(len(layers))]
      ax.bar(xs, [densities.get(l, float("nan")) for l in layers], width=bar,
             label=d.upper() if d != "uniform" else "uniform")
    ax.set_xticks(range(len(layers)))
    ax.set_xticklabels(layers, rotation=75, fontsize=6, ha="right")
    ax.set_ylabel("density")
    ax.set_ylim(0, 1.05)
    ax.set_title(f"Per-layer density at {100 * s:g}% sparsity")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
  return _save(fig, path)


def flops_over_training(result: RunResult) -> tuple[list[int], list[float]]:
  """(steps, training FLOPs per step as a multiple of a dense step) from ``metrics.jsonl``:
  the growth of ``train_flops`` between logged steps over ``3 x dense forward FLOPs x
  batch_size`` per step."""
  dense = (result.summary or {}).get("dense_forward_flops")
  batch = result.fields.get("batch_size")
  if not _finite(dense) or not dense or not batch:
    return [], []
  records = [r for r in read_metrics(result.workdir) if "train_flops" in r and "step" in r]
  steps, values, prev_step, prev_flops = [], [], 0, 0.0
  for rec in records:
    if rec["step"] > prev_step:
      per_step = (rec["train_flops"] - prev_flops) / (rec["step"] - prev_step)
      steps.append(rec["step"])
      values.append(per_step / (3.0 * dense * batch))
    prev_step, prev_flops = rec["step"], rec["train_flops"]
  return steps, values


def plot_redistribution(rows: Sequence[Row], results: Sequence[RunResult],
                        out_dir: str) -> list[str]:
  """Per redistribution row and sparsity: FLOPs over training and layer densities."""
  plt = _pyplot()
  paths = []
  for row in rows:
    if row.fields.get("method") not in REDISTRIBUTING:
      continue
    for s, cell in sorted(row.cells.items()):
      runs = cell.finished
      if not runs:
        continue
      fig, (ax_flops, ax_dens) = plt.subplots(1, 2, figsize=(12, 4.2))
      references = [r for r in results if r.ok and r.fields.get("method") == "rigl" and
                    column_of(r) == s and
                    r.fields.get("distribution") == row.fields.get("distribution")]
      for i, r in enumerate(runs + references[:1]):
        steps, values = flops_over_training(r)
        if steps:
          ref = r in references
          ax_flops.plot(steps, values, ls="--" if ref else "-",
                        label=("RigL (reference) " if ref else "") + f"seed {r.fields.get('seed')}")
      ax_flops.set_xlabel("step")
      ax_flops.set_ylabel("train FLOPs / dense step")
      ax_flops.set_title(f"{row.label}, {100 * s:g}% sparse: training FLOPs")
      ax_flops.grid(alpha=0.3)
      ax_flops.legend(fontsize=7)
      logged = [rec for rec in read_metrics(runs[0].workdir) if isinstance(
          rec.get("layer_densities"), dict)]
      if logged:
        layers = [l for l in logged[-1]["layer_densities"] if _is_weight(l)]
        for layer in layers:
          ax_dens.plot([rec["step"] for rec in logged],
                       [rec["layer_densities"].get(layer, float("nan")) for rec in logged],
                       label=layer)
        ax_dens.set_xlabel("step")
        ax_dens.set_title(f"layer densities over training (seed {runs[0].fields.get('seed')})")
      else:
        final = _mean_layer_densities(runs)
        initial = _mean_layer_densities(references) if references else {}
        layers = sorted(final)
        xs = range(len(layers))
        if initial:
          ax_dens.bar([x - 0.2 for x in xs], [initial.get(l, float("nan")) for l in layers],
                      width=0.4, label="initial (RigL, same distribution)")
        ax_dens.bar([x + 0.2 for x in xs] if initial else list(xs),
                    [final[l] for l in layers], width=0.4 if initial else 0.8,
                    label="final (mean over seeds)")
        ax_dens.set_xticks(list(xs))
        ax_dens.set_xticklabels(layers, rotation=75, fontsize=6, ha="right")
        ax_dens.set_title("final layer densities (metrics.jsonl logs none over training)")
      ax_dens.set_ylabel("density")
      ax_dens.grid(alpha=0.3)
      ax_dens.legend(fontsize=6)
      slug = re.sub(r"[^A-Za-z0-9]+", "_", f"{row.label}_{s:g}").strip("_").lower()
      paths.append(_save(fig, os.path.join(out_dir, f"redistribution_{slug}.png")))
  return paths


# ----------------------------------------------------------------------------- entry


def build_report(sweep_dir: str, out_dir: str, title: str | None = None) -> dict[str, Any]:
  """Writes the tables and plots; returns ``{"rows", "columns", "results", "files"}``."""
  results = collect(sweep_dir)
  if not results:
    raise ValueError(f"no runs found in {sweep_dir}")
  os.makedirs(out_dir, exist_ok=True)
  metric = metric_of(results)
  rows, columns = build_rows(results, metric)
  manifest = grid.read_manifest(sweep_dir) or {}
  title = title or (f"{os.path.basename(manifest.get('config', ''))} sweep: "
                    f"{os.path.abspath(sweep_dir)}")
  files = {"table.md": os.path.join(out_dir, "table.md")}
  with open(files["table.md"], "w") as f:
    f.write(markdown(rows, columns, results, title, metric))
  files["table.csv"] = os.path.join(out_dir, "table.csv")
  _write_csv(files["table.csv"], table_csv_rows(rows, columns))
  files["runs.csv"] = os.path.join(out_dir, "runs.csv")
  _write_csv(files["runs.csv"], run_csv_rows(results))
  plots = {
      f"{metric.slug}_vs_sparsity.png": lambda p: plot_accuracy_vs_sparsity(rows, p),
      f"{metric.slug}_vs_train_flops.png": lambda p: plot_accuracy_vs_flops(rows, p),
      "layer_densities.png": lambda p: plot_layer_densities(results, p),
  }
  for name, plot in plots.items():
    path = plot(os.path.join(out_dir, name))
    if path:
      files[name] = path
  for path in plot_redistribution(rows, results, out_dir):
    files[os.path.basename(path)] = path
  return {"rows": rows, "columns": columns, "results": results, "files": files}


def define_flags():
  """Defines the command-line flags (only when run as a program, so that the launch
  modules import side by side)."""
  flags.DEFINE_string("sweep_dir", None, "The sweep directory.")
  flags.DEFINE_string("out", None, "Where the tables and plots go.")
  flags.DEFINE_string("title", None, "Title of table.md.")


def main(argv):
  FLAGS = flags.FLAGS  # pylint: disable=invalid-name
  cli.no_arguments(argv)
  cli.require(bool(FLAGS.sweep_dir), "--sweep_dir", "required: the folder of the sweep's runs")
  cli.require(bool(FLAGS.out), "--out", "required: the folder for the tables and plots")
  try:
    report = build_report(FLAGS.sweep_dir, FLAGS.out, FLAGS.title)
  except ValueError as e:
    cli.fail(e)
  except OSError as e:
    cli.fail(e)  # its text names the path
  results = report["results"]
  ok = sum(r.ok for r in results)
  print(f"{ok} of {len(results)} runs finished; wrote " + ", ".join(sorted(report["files"])) +
        f" to {FLAGS.out}")


if __name__ == "__main__":
  define_flags()
  cli.run(main)
