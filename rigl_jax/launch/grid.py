"""Runs of a sweep: config files, typed overrides, the product grid and run names.

A run is a dict of config overrides (``{"method": "rigl", "sparsity": 0.9, "seed": 0}``)
on top of a config file's ``get_config()``; its workdir is ``SWEEP_DIR/NAME`` where NAME
lists the overrides in a fixed order::

    method=rigl,distribution=erk,sparsity=0.9,seed=0

The same overrides always give the same name, so a rerun of a sweep finds its runs.
``sweep.json`` in the sweep directory records the config, the overrides shared by all
runs and every run, so the report knows which runs were asked for.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import itertools
import json
import os
import re
from typing import Any, Iterable, Sequence

import ml_collections

from rigl_jax import config as config_lib
from rigl_jax import paths

# Keys first in a run name, in this order; other keys follow sorted; the seed comes last.
NAME_ORDER = ("method", "distribution", "sparsity", "train_multiplier", "learning_rate",
              "drop_fraction", "update_every")
MANIFEST = "sweep.json"
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]")


@dataclasses.dataclass(frozen=True)
class Run:
  """One training run of a sweep."""
  name: str                  # the workdir's base name, from the overrides
  overrides: dict            # {config field: value}, this run only
  workdir: str               # SWEEP_DIR/name
  after: tuple = ()          # names of runs of the sweep that must finish first


# ----------------------------------------------------------------------------- configs


def load_config_module(path: str):
  """Imports a ``configs/*.py`` file by path (it must define ``get_config()``)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config file {path!r} does not exist")
  if not path.endswith(".py"):
    raise ValueError(f"config file {path!r} is not a Python file (configs/NAME.py)")
  name = "launch_config_" + re.sub(r"\W", "_", os.path.splitext(os.path.basename(path))[0])
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except Exception as e:  # pylint: disable=broad-except  # a config file that fails to load
    raise ValueError(f"config file {path!r} failed to load: {type(e).__name__}: {e}") from None
  if not hasattr(module, "get_config"):
    raise ValueError(f"config file {path!r} has no get_config()")
  return module


def parse_value(text: str, reference: Any) -> Any:
  """A command-line string as a value of ``reference``'s type (bool, int, float, str,
  tuple/list via ``ast.literal_eval``)."""
  if isinstance(reference, bool):
    lowered = text.strip().lower()
    if lowered not in ("true", "false", "1", "0"):
      raise ValueError(f"expected True or False, got {text!r}")
    return lowered in ("true", "1")
  if isinstance(reference, int):
    return int(text)
  if isinstance(reference, float):
    return float(text)
  if isinstance(reference, (tuple, list)):
    value = ast.literal_eval(text)
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)
  if isinstance(reference, str):
    return text
  return ast.literal_eval(text)


def coerce(key: str, value: Any, base: ml_collections.ConfigDict | None = None) -> Any:
  """``value`` with the type of field ``key`` (an int for a float field becomes a float,
  a string is parsed), so that equal settings get equal names."""
  base = base if base is not None else config_lib.base_config()
  if key not in base:
    raise ValueError(f"unknown config field {key!r}; known fields: {', '.join(sorted(base))}")
  reference = base[key]
  if isinstance(value, str) and not isinstance(reference, str):
    return parse_value(value, reference)
  if isinstance(reference, float) and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  if isinstance(reference, (tuple, list)) and isinstance(value, list):
    return tuple(value)
  return value


def normalize(overrides: dict, base: ml_collections.ConfigDict | None = None) -> dict:
  """Every override coerced to its field's type (raises on unknown fields)."""
  return {k: coerce(k, v, base) for k, v in overrides.items()}


def parse_assignments(assignments: Iterable[str],
                      base: ml_collections.ConfigDict | None = None) -> dict:
  """``["num_train_steps=20", "method=set"]`` -> typed overrides."""
  out = {}
  for item in assignments or ():
    if "=" not in item:
      raise ValueError(f"--set: expected KEY=VALUE, got {item!r}")
    key, text = item.split("=", 1)
    try:
      out[key.strip()] = coerce(key.strip(), text, base)
    except (ValueError, SyntaxError) as e:
      raise ValueError(f"--set: {item!r}: {e}") from None
  return out


def apply_overrides(config: ml_collections.ConfigDict, *override_dicts: dict):
  """A copy of ``config`` with the overrides set (later dicts win)."""
  c = ml_collections.ConfigDict(config)
  for overrides in override_dicts:
    for key, value in overrides.items():
      if key not in c:
        raise ValueError(f"unknown config field {key!r}")
      c[key] = value
  return c


# ----------------------------------------------------------------------------- names


def format_value(value: Any) -> str:
  """The text of one value in a run name (floats via repr: ``0.9``, ``2.0``)."""
  if isinstance(value, bool):
    text = str(value)
  elif isinstance(value, float):
    text = repr(value)
  elif isinstance(value, (tuple, list)):
    text = "-".join(format_value(v) for v in value)
  else:
    text = str(value)
  return _UNSAFE.sub("_", text)


def _key_rank(key: str):
  if key == "seed":
    return (2, 0, key)
  if key in NAME_ORDER:
    return (0, NAME_ORDER.index(key), key)
  return (1, 0, key)


def ordered_items(overrides: dict) -> list[tuple[str, Any]]:
  return sorted(overrides.items(), key=lambda kv: _key_rank(kv[0]))


def run_name(overrides: dict) -> str:
  """``method=rigl,distribution=erk,sparsity=0.9,seed=0``; ``default`` for no overrides."""
  if not overrides:
    return "default"
  return ",".join(f"{k}={format_value(v)}" for k, v in ordered_items(overrides))


def parse_run_name(name: str) -> dict:
  """Best-effort inverse of :func:`run_name` (values typed via the base config)."""
  out = {}
  if name == "default":
    return out
  base = config_lib.base_config()
  for part in name.split(","):
    if "=" not in part:
      return {}
    key, text = part.split("=", 1)
    try:
      out[key] = coerce(key, text, base)
    except (ValueError, SyntaxError):
      out[key] = text
  return out


# ----------------------------------------------------------------------------- grids


def product_grid(*, methods: Sequence[str] = (), distributions: Sequence[str] = (),
                 sparsities: Sequence[float] = (), train_multipliers: Sequence[float] = (),
                 seeds: Sequence[int] = (0,)) -> list[dict]:
  """methods x distributions x sparsities x training multipliers x seeds.

  An empty axis is left to the config (and out of the names). ``dense`` ignores the
  distribution and runs at sparsity 0.0; ``small_dense`` ignores the distribution.
  Duplicates this creates are dropped; the order is stable.
  """
  axes = [("method", list(methods)), ("distribution", list(distributions)),
          ("sparsity", [float(s) for s in sparsities]),
          ("train_multiplier", [float(m) for m in train_multipliers]),
          ("seed", [int(s) for s in seeds])]
  axes = [(k, v) for k, v in axes if v]
  runs, seen = [], set()
  for values in itertools.product(*(v for _, v in axes)):
    run = dict(zip((k for k, _ in axes), values))
    if run.get("method") in config_lib.DENSE_METHODS:
      run.pop("distribution", None)
      if run["method"] == "dense" and "sparsity" in run:
        run["sparsity"] = 0.0
    key = run_name(run)
    if key not in seen:
      seen.add(key)
      runs.append(run)
  return runs


def with_seeds(runs: Sequence[dict], seeds: Sequence[int]) -> list[dict]:
  """Replaces the seeds of ``runs``: every distinct setting once per seed in ``seeds``."""
  settings, seen = [], set()
  for run in runs:
    setting = {k: v for k, v in run.items() if k != "seed"}
    key = run_name({k: ({**v, "seed": None} if isinstance(v, dict) else v)
                    for k, v in setting.items()})
    if key not in seen:
      seen.add(key)
      settings.append(setting)
  out = []
  for seed in seeds:
    for setting in settings:
      run = dict(setting, seed=int(seed))
      if isinstance(run.get(SOURCE_FIELD), dict):  # the source run of the same seed
        run[SOURCE_FIELD] = dict(run[SOURCE_FIELD], seed=int(seed))
      out.append(run)
  return out


# The report's learning-rate grid (Section 5.3): lr x (alpha, dT), with each seed.
LR_GRID_LEARNING_RATES = (0.1, 0.05, 0.01, 0.005)
LR_GRID_PAIRS = ((0.3, 100), (0.4, 200), (0.4, 500), (0.5, 750))


def lr_grid(seeds: Sequence[int] = (0, 1, 2),
            learning_rates: Sequence[float] = LR_GRID_LEARNING_RATES,
            pairs: Sequence[tuple[float, int]] = LR_GRID_PAIRS) -> list[dict]:
  """learning_rate x (drop_fraction, update_every) x seeds, seeds outermost."""
  return [dict(learning_rate=float(lr), drop_fraction=float(alpha), update_every=int(dt),
               seed=int(seed))
          for seed in seeds for lr in learning_rates for alpha, dt in pairs]


def config_sweep(module) -> list[dict]:
  """The config file's ``sweep()`` (one run of the config as it is when it has none)."""
  if hasattr(module, "sweep"):
    runs = [dict(r) for r in module.sweep()]
    if not runs:
      raise ValueError("the config's sweep() returned no runs")
    return runs
  return [{}]


# A run's source (a lottery ticket's pruning run) given as that run's overrides (a dict)
# instead of a path: the source is a run of the same sweep, and the run waits for it.
SOURCE_FIELD = "source_workdir"


def make_runs(overrides_list: Sequence[dict], sweep_dir: str,
              base: ml_collections.ConfigDict | None = None) -> list[Run]:
  """Typed :class:`Run` objects with their workdirs; raises on duplicate names.

  ``source_workdir`` given as a dict is the overrides of another run of the list: it
  becomes that run's workdir, the run waits for it (``Run.after``), and it stays out of
  the run's name (a lottery run is named by its own settings,
  ``method=lottery,distribution=uniform,sparsity=0.9,seed=0``)."""
  runs, names, sources = [], {}, {}
  for overrides in overrides_list:
    overrides = dict(overrides)
    source = overrides.pop(SOURCE_FIELD, None) if isinstance(
        overrides.get(SOURCE_FIELD), dict) else None
    overrides = normalize(overrides, base)
    name = run_name(overrides)
    if name in names:
      raise ValueError(f"two runs share the workdir name {name!r}: {names[name]} and "
                       f"{overrides}")
    names[name] = overrides
    after = ()
    if source is not None:
      source_name = run_name(normalize(source, base))
      overrides[SOURCE_FIELD] = paths.join(sweep_dir, source_name)
      sources[name] = source_name
      after = (source_name,)
    runs.append(Run(name=name, overrides=overrides, workdir=paths.join(sweep_dir, name),
                    after=after))
  for name, source_name in sources.items():
    if source_name not in names:
      raise ValueError(f"run {name} needs run {source_name} first ({SOURCE_FIELD}), and "
                       f"the grid has no such run")
    if source_name in sources:
      raise ValueError(f"run {name} needs run {source_name}, which needs "
                       f"{sources[source_name]}: a source must not have a source of its own")
  return runs


def relocate(run: Run, sweep_dir: str) -> Run:
  """``run`` with its workdir, and the workdir of the source it waits for, in
  ``sweep_dir`` (the scripts write absolute paths or URLs)."""
  overrides = dict(run.overrides)
  if run.after:
    overrides[SOURCE_FIELD] = paths.join(sweep_dir, run.after[0])
  return Run(run.name, overrides, paths.join(sweep_dir, run.name), run.after)


def in_dependency_order(runs: Sequence[Run]) -> list[Run]:
  """The runs without a source first, then the others, each group in its order."""
  return [r for r in runs if not r.after] + [r for r in runs if r.after]


# ----------------------------------------------------------------------------- manifest


def _jsonable(value):
  if isinstance(value, tuple):
    return list(value)
  return value


def write_manifest(sweep_dir: str, *, config_path: str, common: dict, runs: Sequence[Run],
                   base_config: ml_collections.ConfigDict) -> str:
  """``SWEEP_DIR/sweep.json``: the config, shared overrides, base config and the runs
  (merged with the runs listed by earlier invocations on the same directory)."""
  paths.makedirs(sweep_dir)
  listed = [{"name": r.name, "overrides": {k: _jsonable(v) for k, v in r.overrides.items()}}
            for r in runs]
  previous = read_manifest(sweep_dir) or {}
  names = {r["name"] for r in listed}
  # Runs asked for by earlier invocations stay listed (e.g. a first pass with one seed).
  kept = [r for r in previous.get("runs", []) if r["name"] not in names]
  manifest = {
      "config": os.path.abspath(config_path),
      "common_overrides": {k: _jsonable(v) for k, v in common.items()},
      "base_config": json.loads(base_config.to_json_best_effort()),
      "runs": kept + listed,
  }
  path = paths.join(sweep_dir, MANIFEST)
  paths.write_atomic(path, json.dumps(manifest, indent=2, sort_keys=True))
  return path


def read_manifest(sweep_dir: str) -> dict | None:
  path = paths.join(sweep_dir, MANIFEST)
  if not paths.exists(path):
    return None
  return json.loads(paths.read_text(path))


def check_command_line(argv, config: str | None, sweep_dir: str | None) -> str:
  """The launch tools' shared checks; returns the config file's absolute path."""
  from rigl_jax import cli  # pylint: disable=import-outside-toplevel
  cli.no_arguments(argv)
  cli.require(bool(config), "--config", "required: a config file, configs/NAME.py")
  cli.require(bool(sweep_dir), "--sweep_dir", "required: the folder of the sweep's runs")
  return os.path.abspath(config)


def parse_list(flag: str, values, kind):
  """A list flag's values as ``kind`` (int, float); a bad one raises naming the flag."""
  try:
    return [kind(v) for v in values] if values else values
  except ValueError:
    raise ValueError(f"--{flag}: expected a comma-separated list of {kind.__name__} "
                     f"values, got {','.join(values)!r}") from None


def validate_runs(runs: Sequence[Run], base: ml_collections.ConfigDict, common: dict,
                  device_count: int = 1) -> None:
  """Every run's config passes the trainer's checks, now rather than in N processes:
  raises ValueError naming the run and the field."""
  for run in runs:
    c = apply_overrides(base, common, run.overrides)
    try:
      config_lib.validate(c, device_count=device_count)
    except config_lib.ConfigError as e:
      where = f" on {device_count} devices" if device_count > 1 else ""
      raise ValueError(f"run {run.name}{where}: {e}") from None
