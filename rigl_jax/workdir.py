"""What a run keeps in its workdir, besides checkpoints and the run log.

::

    WORKDIR/
      .lock            held by the run using the workdir (one run per workdir)
      config.json      the config; a rerun with another config is refused (the guard)
      summary.json     the final numbers of a finished run
      initial_params/  the params at step 0 (a lottery ticket restarts from them)
      final_masks/     the masks at the end (a lottery ticket's masks); each of the two
                       with its CRC manifest beside it (NAME.manifest.json)
      checkpoints/     rigl_jax.checkpoint
      metrics.jsonl    rigl_jax.run_log (metrics_pending.json: an interval cut by a stop)
      tensorboard/     rigl_jax.run_log

Other runs read two of them: a lottery ticket its source run's masks, initial
params and training cost (:func:`load_lottery_source`), and a re-initialised run
its source run's final layer densities (:func:`densities_from_run`). Every problem
is a :class:`rigl_jax.config.ConfigError` naming the field or ``workdir``.
"""

from __future__ import annotations

import json
import os
import re

import jax
import jax.numpy as jnp
from absl import logging

from rigl_jax import config as config_lib
from rigl_jax import paths

class WriteError(Exception):
  """A file of the workdir could not be written (disk full, read-only, permissions);
  the message starts with ``workdir:`` and names the file and the cause."""


def _cause(e: BaseException) -> str:
  if isinstance(e, OSError) and e.strerror:
    return e.strerror
  text = " ".join(str(e).split())
  return f"{type(e).__name__}: {text[-300:]}" if text else type(e).__name__


# What the trainer writes in a workdir: name -> whether it is a directory.
ENTRIES = {".lock": False, "config.json": False, "metrics.jsonl": False, "summary.json": False,
           "checkpoints": True, "tensorboard": True, "initial_params": True,
           "final_masks": True}

# Fields that may change when a run is resumed: they do not change its numbers.
RESUMABLE_FIELDS = ("log_every", "checkpoint_every", "keep_checkpoints", "overwrite",
                    "data_dir", "eval_every", "update_program")


# ----------------------------------------------------------------------------- files


def write_json_atomic(path: str, obj) -> None:
  """Writes a temporary file and renames it: a kill leaves the old file or the new one."""
  paths.write_atomic(path, json.dumps(obj, indent=2, sort_keys=True))


def read_json(path: str, field: str) -> dict:
  """A JSON object from a file; a damaged file is a ConfigError naming ``field``."""
  try:
    obj = json.loads(paths.read_text(path))
  except (OSError, ValueError) as e:
    raise config_lib.ConfigError(f"config.{field}: cannot read {path}: {e}") from None
  if not isinstance(obj, dict):
    raise config_lib.ConfigError(f"config.{field}: {path} does not hold a JSON object")
  return obj


def config_dict(c) -> dict:
  return json.loads(c.to_json_best_effort())


def save_tree(directory: str, tree) -> None:
  """A small side checkpoint (initial params, final masks), written atomically by orbax,
  with its integrity manifest (shape, dtype, CRC32 per leaf) in ``DIRECTORY.manifest.json``
  written first: a later reader (a lottery ticket) checks what it reads against it.
  Every process calls it: orbax saves are collective (the primary process writes)."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  from rigl_jax import checkpoint as checkpoint_lib  # pylint: disable=import-outside-toplevel
  try:
    if jax.process_index() == 0:
      paths.write_atomic(f"{paths.resolve(directory)}{MANIFEST_SUFFIX}",
                         json.dumps(checkpoint_lib.tree_manifest(tree), sort_keys=True))
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(paths.resolve(directory), tree, force=True)
  except Exception as e:  # pylint: disable=broad-except  # orbax and tensorstore raise many types
    raise WriteError(f"workdir: cannot write {directory}: {_cause(e)}") from e


MANIFEST_SUFFIX = ".manifest.json"


def load_tree(directory: str, target, field: str = "source_workdir"):
  """The tree ``save_tree`` wrote, checked against its manifest; a missing, truncated or
  altered file is a ConfigError naming ``field`` and the folder. (Trees saved before
  manifests were written load unchecked, with a warning.)"""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  from rigl_jax import checkpoint as checkpoint_lib  # pylint: disable=import-outside-toplevel
  path = paths.resolve(directory)
  manifest = None
  if paths.exists(path + MANIFEST_SUFFIX):
    manifest = read_json(path + MANIFEST_SUFFIX, field)
  else:
    logging.warning("%s has no integrity manifest (saved by an older rigl_jax): read "
                    "unchecked.", path)
  try:
    checkpoint_lib.check_readable(path)
    with ocp.StandardCheckpointer() as ckptr:
      tree = ckptr.restore(path, target)
    if manifest is not None:
      checkpoint_lib.verify_tree(tree, tree if target is None else target, manifest)
  except Exception as e:  # pylint: disable=broad-except  # orbax raises many types
    raise config_lib.ConfigError(
        f"config.{field}: {path} is damaged or incomplete ({type(e).__name__}: "
        f"{' '.join(str(e).split())[:300]}); rerun the run that wrote it") from None
  return tree


# ----------------------------------------------------------------------------- checks


def check_path(workdir: str) -> None:
  """Refuses a workdir that cannot be created or holds the wrong kind of entry, before
  any directory is made (a failed ``os.makedirs`` would leave its parents behind). A
  URL (``gs://bucket/...``) needs its bucket to exist."""
  if paths.is_url(workdir):
    try:
      paths.makedirs(workdir)  # creates nothing: checks the bucket
    except (OSError, ValueError, ImportError) as e:
      raise config_lib.ConfigError(f"workdir: cannot use {workdir!r}: {e}") from None
    return
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise config_lib.ConfigError(f"workdir: {workdir!r} exists and is not a directory")
  path = os.path.abspath(workdir)
  existing = path
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  try:
    name_max = os.pathconf(existing, "PC_NAME_MAX")
  except (OSError, ValueError):
    name_max = 255
  try:
    path_max = os.pathconf(existing, "PC_PATH_MAX")
  except (OSError, ValueError):
    path_max = 4096
  # The longest file the run writes below it (checkpoints/STEP/default/...) needs room too.
  if len(os.fsencode(path)) + 256 > path_max:
    raise config_lib.ConfigError(
        f"workdir: the path {path[:48]!r}... is {len(os.fsencode(path))} bytes long; this file "
        f"system allows {path_max} bytes for a whole path, and the run's files need about 256 "
        f"more")
  for part in path.split(os.sep):
    if len(os.fsencode(part)) > name_max:
      raise config_lib.ConfigError(
          f"workdir: the path component {part[:32]!r}... is {len(os.fsencode(part))} bytes "
          f"long; this file system allows {name_max}")
  if existing == path and not os.access(path, os.W_OK | os.X_OK):
    raise config_lib.ConfigError(f"workdir: {workdir!r} is not writable by this user")
  if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
    if existing != path:
      raise config_lib.ConfigError(f"workdir: cannot create {workdir!r}: {existing!r} is not "
                                   f"a writable directory")
  for name, is_dir in ENTRIES.items():
    entry = os.path.join(workdir, name)
    if os.path.exists(entry) and os.path.isdir(entry) != is_dir:
      raise config_lib.ConfigError(
          f"workdir: {entry} must be a {'directory' if is_dir else 'file'}; move it away or "
          f"use another workdir")


def check_config(c, workdir: str) -> None:
  """The guard: refuses a workdir holding a run of another config (unless ``overwrite``)."""
  path = paths.join(workdir, "config.json")
  if not paths.exists(path) or c.overwrite:
    return
  # A run started before a field existed ran with that field's default.
  saved = {**config_dict(config_lib.base_config()), **read_json(path, "overwrite")}
  asked = config_dict(c)
  diff = sorted(k for k in set(saved) | set(asked)
                if k not in RESUMABLE_FIELDS and saved.get(k) != asked.get(k))
  if diff and not has_checkpoint(workdir):
    # Nothing trained yet (a run that failed before its first checkpoint): not a run
    # to protect, so the corrected command starts afresh.
    logging.warning("The workdir %s holds no checkpoint of its earlier config (differing: "
                    "%s): starting afresh with this one.", workdir, ", ".join(diff))
    return
  if diff:
    k = diff[0]
    raise config_lib.ConfigError(
        f"config.{k}: the workdir {workdir} holds a run with {k}={saved.get(k)!r}, not "
        f"{asked.get(k)!r} (differing fields: {', '.join(diff)}); use another workdir or "
        f"--config.overwrite=True")


def has_checkpoint(workdir: str) -> bool:
  """Whether the workdir holds a finished run or at least one checkpoint step."""
  ckpt_dir = paths.join(workdir, "checkpoints")
  return (paths.exists(paths.join(workdir, "summary.json")) or
          (paths.is_dir(ckpt_dir) and any(n.isdigit() for n in paths.listdir(ckpt_dir))))


def create(c, workdir: str) -> None:
  """Makes the workdir and writes ``config.json`` (process 0); with several processes,
  checks that they all see the same workdir (:func:`check_shared`)."""
  try:
    paths.makedirs(workdir)
  except OSError as e:
    raise config_lib.ConfigError(
        f"workdir: cannot create {workdir!r}: {e.strerror or e}") from None
  if jax.process_index() == 0:
    hold_lock(workdir)
    write_file(paths.join(workdir, "config.json"), config_dict(c))
  if jax.process_count() > 1:
    check_shared(workdir)


LOCK = ".lock"
_held_locks = {}  # workdir -> its open lock file: held until released or the process ends


def hold_lock(workdir: str) -> None:
  """One run per workdir: an advisory lock (``flock``) on ``WORKDIR/.lock`` that this
  process holds until it exits. The kernel drops it when the process dies, SIGKILL
  included, so a killed run never leaves the workdir locked. A second run gets a
  ConfigError naming the holder's process id. (Object stores have no locks: a gs://
  workdir is not locked.)"""
  if paths.is_url(workdir):
    return
  import fcntl  # pylint: disable=import-outside-toplevel
  path = os.path.join(workdir, LOCK)
  try:
    f = open(path, "a+")  # pylint: disable=consider-using-with
  except OSError as e:
    raise config_lib.ConfigError(f"workdir: cannot open {path}: {e.strerror}") from None
  try:
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError:
    f.seek(0)
    holder = f.read().strip() or "?"
    f.close()
    raise config_lib.ConfigError(
        f"workdir: {workdir} is in use by process {holder} (one run per workdir); wait for "
        f"it to end or stop it, then rerun to resume") from None
  f.seek(0)
  f.truncate()
  f.write(str(os.getpid()))
  f.flush()
  _held_locks[os.path.abspath(workdir)] = f


def release_lock(workdir: str) -> None:
  """Ends this process's hold on the workdir (the end of ``train_and_evaluate``)."""
  f = _held_locks.pop(os.path.abspath(workdir), None) if not paths.is_url(workdir) else None
  if f is not None:
    f.close()  # closing the file drops the flock


SHARED_TOKEN = ".shared_token"


def check_shared(workdir: str) -> None:
  """Process 0 writes a fresh random token into the workdir and sends it to the
  others, which must read the same token back: otherwise the processes do not share
  one workdir (a pod's local disks), and only process 0's files would hold the run.
  Every process gets the same answer, so all of them stop with the same error."""
  import secrets  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  path = paths.join(workdir, SHARED_TOKEN)
  token = np.zeros([16], np.uint8)
  if jax.process_index() == 0:
    token = np.frombuffer(secrets.token_bytes(16), np.uint8).copy()
    paths.write_atomic(path, token.tobytes().hex())
  token = np.asarray(multihost_utils.broadcast_one_to_all(token))  # also a barrier
  try:
    seen = paths.read_text(path).strip() == token.tobytes().hex()
  except OSError:
    seen = False
  everyone = np.asarray(multihost_utils.process_allgather(np.asarray([seen], np.int32)))
  missing = [i for i, ok in enumerate(everyone.reshape(-1)) if not ok]
  if missing:
    raise config_lib.ConfigError(
        f"workdir: {workdir} is not shared: process(es) {', '.join(map(str, missing))} of "
        f"{jax.process_count()} do not see the file {path} that process 0 wrote. Every "
        f"process must see one workdir: a shared file system or a gs:// URL")


def write_file(path: str, obj) -> None:
  """``write_json_atomic``, with a failure as one :class:`WriteError`."""
  try:
    write_json_atomic(path, obj)
  except OSError as e:
    raise WriteError(f"workdir: cannot write {path}: {_cause(e)}") from e


def write_summary(workdir: str, summary: dict) -> None:
  if jax.process_index() == 0:
    write_file(paths.join(workdir, "summary.json"), summary)


# ----------------------------------------------------------------------------- other runs


# Fields a lottery run must share with its source pruning run.
LOTTERY_SOURCE_FIELDS = ("model", "dataset", "sparsity", "distribution")


def load_lottery_source(c, params_shape):
  """The final masks, the initial params and the training cost (``train_flops``,
  ``train_flops_multiplier`` of its summary) of the pruning run in ``source_workdir``:
  a lottery ticket's training cost includes that run, as in the report's Table 2."""
  source = c.source_workdir

  def require(name):
    if not paths.exists(paths.join(source, name)):
      raise config_lib.ConfigError(
          f"config.source_workdir: {source!r} has no {name}; it must be the workdir of a "
          f"finished sparse run (e.g. method 'pruning')")

  require("config.json")
  source_config = read_json(paths.join(source, "config.json"), "source_workdir")
  # A ticket retrains its source's masks: a run filed under another sparsity,
  # model, data set or distribution would be a wrong row of the report.
  for field in LOTTERY_SOURCE_FIELDS:
    if source_config.get(field, config_lib.base_config()[field]) != c[field]:
      raise config_lib.ConfigError(
          f"config.{field}: the source run in {source!r} trained {field}="
          f"{source_config.get(field)!r}; a lottery ticket retrains its source's masks, "
          f"so {field} must be {source_config.get(field)!r}, got {c[field]!r}")
  for name in ("summary.json", "final_masks", "initial_params"):
    require(name)
  mask_target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.bool_), params_shape)
  summary = read_json(paths.join(source, "summary.json"), "source_workdir")
  cost = {}
  for key in ("train_flops", "train_flops_multiplier"):
    if not isinstance(summary.get(key), (int, float)):
      raise config_lib.ConfigError(
          f"config.source_workdir: {source!r}/summary.json has no number {key!r}")
    cost[key] = float(summary[key])
  masks = load_tree(paths.join(source, "final_masks"), mask_target)
  initial = load_tree(paths.join(source, "initial_params"), None)
  return masks, initial, cost


def densities_from_run(c) -> dict[str, float]:
  """Per-layer sparsities read from a finished run's ``summary.json`` (the report's
  re-initialisation experiment): one anchored regex per layer, so every layer leaves
  the budget with exactly the density it ended with (dense ones at 0.0)."""
  path = paths.join(c.distribution_source, "summary.json")
  if not paths.exists(path):
    raise config_lib.ConfigError(
        f"config.distribution_source: {c.distribution_source!r} has no summary.json; it "
        f"must be the workdir of a finished sparse run")
  summary = read_json(path, "distribution_source")
  if summary.get("model") != c.model or not summary.get("layer_densities"):
    raise config_lib.ConfigError(
        f"config.distribution_source: the run in {c.distribution_source!r} trained a sparse "
        f"{summary.get('model')!r}; this run needs a sparse {c.model!r} run")
  return {f"^{re.escape(p)}$": 1.0 - d for p, d in summary["layer_densities"].items()}
