"""Crash-safe checkpoints for the trainer: a thin wrapper over orbax.

One checkpoint is one pytree, e.g.::

    {"params": ..., "batch_stats": ..., "opt_state": <optax state>,
     "step": int32[], "rng": uint32[2]}

saved with `orbax.checkpoint.CheckpointManager` (StandardSave/StandardRestore)
into ``<directory>/<step>/``. On top of orbax this module adds what a training
job that may be SIGKILLed at any moment needs:

* **Atomic writes** come from orbax: a step is written into
  ``<step>.orbax-checkpoint-tmp`` and renamed on commit. Unfinished temporary
  directories are never listed as steps and are deleted when the next
  `Checkpointer` is created (``cleanup_tmp_directories=True``).
* **Corruption detection.** Every save records a manifest (tree paths, shapes,
  dtypes and a CRC32 of each leaf's bytes) in the step's orbax metadata. A
  restore is accepted only if every stored value reads back (checked one
  value at a time before orbax sees the step), orbax reads the step without
  error, *and* the restored tree matches the manifest and the target.
  Without the CRC, a flipped byte in a data file restores silently as wrong
  numbers.
* **Fallback.** `restore_latest` walks from the newest step to older ones,
  logs a warning naming each unusable step, and returns the newest good one.
  The bad newer steps are moved to ``<directory>/quarantine/`` so that the
  resumed run can save those step numbers again (orbax refuses to save a step
  that exists or is older than the latest one). A step that cannot be moved
  there is renamed in place, or, failing that, left where it is with a warning.

Example::

    ckpt = Checkpointer("/tmp/run/checkpoints", max_to_keep=3)
    restored = ckpt.restore_latest(state)      # a concrete or abstract target
    if restored is not None:
      start_step, state = restored
    ...
    ckpt.save(step, state)                     # async: returns after the D2H copy
    ...
    ckpt.close()                               # waits for the last save

Only public orbax API is used; multi-process behaviour is orbax's
(every process calls `save`/`restore_latest`, the primary host writes the
metadata). Arrays that are neither fully addressable nor fully replicated
(truly sharded over several hosts) get no CRC, only shape/dtype checks.
"""

from __future__ import annotations

import gc
import logging
import os
import re
import shutil
import time
import zlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from etils import epath
from orbax.checkpoint import checkpoint_managers as ocp_managers

logger = logging.getLogger(__name__)

PyTree = Any

# Key of our manifest inside orbax's per-step custom metadata.
_MANIFEST_KEY = "rigl_jax_manifest"
_MANIFEST_VERSION = 1
# Orbax's item name for a single, unnamed checkpointable ("default item mode").
_ITEM_DIR = "default"
# How many stored values `_check_readable` reads concurrently.
_CHECK_READS_IN_FLIGHT = 64
# Where unusable steps are moved; not a number, so orbax never lists it.
QUARANTINE_DIR = "quarantine"


class CheckpointRestoreError(RuntimeError):
  """Checkpoints exist, but none of them could be restored and verified."""


class CheckpointSaveError(RuntimeError):
  """A step could not be written (disk full, no permission, ...). The steps saved
  before it are intact: orbax commits a step by renaming its temporary folder."""


def dir_bytes(path: str) -> int:
  """Total size of the files under ``path`` (a step's size on disk)."""
  return sum(os.path.getsize(os.path.join(root, name))
             for root, _, names in os.walk(path) for name in names)


def _save_failure(directory, e: BaseException) -> str:
  """One line on why a save failed: the OS error and the file, when the text has them
  (tensorstore reports a full disk as a ValueError whose text holds both)."""
  text = " ".join(str(e).split())
  reason = re.search(r"Failed to write \d+ bytes to file \d+: ([^\[]+?)\s*(?:\[|$)", text)
  target = re.search(r'Failed writing: "([^"]+)"', text)
  if isinstance(e, OSError) and e.strerror:
    reason_text, path = e.strerror, e.filename
  elif reason:
    reason_text, path = reason.group(1), target.group(1) if target else None
  else:
    reason_text, path = f"{type(e).__name__}: {text[:300]}", None
  where = f" (writing {path})" if path else ""
  return (f"cannot save a checkpoint in {directory}: {reason_text}{where}; the steps saved "
          f"before are intact")


class _BadCheckpoint(Exception):
  """A step failed verification (missing manifest, mismatch, bad CRC)."""


# ----------------------------------------------------------------------------
# Manifest: what a step must look like after restore.
# ----------------------------------------------------------------------------


def _is_typed_key(x) -> bool:
  return hasattr(x, "dtype") and jax.dtypes.issubdtype(
      x.dtype, jax.dtypes.prng_key)


def _host_bytes(x) -> np.ndarray | None:
  """The leaf's full value as a host numpy array, or None if not available.

  A replicated array is read from one local shard (works on every host); an
  array sharded over other hosts' devices cannot be read here at all.
  """
  if _is_typed_key(x):
    # Typed PRNG keys have no numpy dtype; their raw uint32 data identifies
    # them.
    x = jax.random.key_data(x)
  if isinstance(x, jax.Array):
    if x.is_fully_addressable:
      return np.asarray(x)
    if x.is_fully_replicated:
      return np.asarray(x.addressable_data(0))
    return None
  return np.asarray(x)


def _leaf_record(x, with_crc: bool) -> dict[str, Any]:
  """Shape, dtype and (optionally) CRC32 of one leaf, JSON-serializable."""
  if _is_typed_key(x) or isinstance(x, jax.Array):
    shape, dtype = tuple(x.shape), str(x.dtype)
  else:
    arr = np.asarray(x)
    shape, dtype = arr.shape, str(arr.dtype)
  host = _host_bytes(x) if with_crc else None
  crc = None
  if host is not None:
    # CRC32 over exactly the array's bytes (contiguous, viewed as uint8).
    crc = zlib.crc32(np.ascontiguousarray(host).reshape(-1).view(np.uint8))
  return {"shape": list(shape), "dtype": dtype, "crc32": crc}


def _manifest(tree: PyTree, with_crc: bool) -> dict[str, Any]:
  """Per-leaf records keyed by tree path, e.g. "['params']['w']"."""
  leaves = {
      jax.tree_util.keystr(path): _leaf_record(leaf, with_crc)
      for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
  }
  return {"version": _MANIFEST_VERSION, "leaves": leaves}


def _verify(restored: PyTree, target: PyTree, manifest: dict[str, Any]):
  """Raises _BadCheckpoint unless `restored` matches manifest and target.

  The target's dtypes must equal the saved ones: a resumed run is meant to
  continue bit for bit, so no silent casting.
  """
  if jax.tree.structure(restored) != jax.tree.structure(target):
    raise _BadCheckpoint(
        f"tree structure {jax.tree.structure(restored)} != target "
        f"{jax.tree.structure(target)}")
  expected = manifest["leaves"]
  got = jax.tree_util.tree_flatten_with_path(restored)[0]
  if sorted(expected) != sorted(jax.tree_util.keystr(p) for p, _ in got):
    raise _BadCheckpoint("leaf paths differ from the saved manifest")
  for (path, leaf), want in zip(got, jax.tree.leaves(target)):
    name = jax.tree_util.keystr(path)
    saved = expected[name]
    now = _leaf_record(leaf, with_crc=saved["crc32"] is not None)
    if (now["shape"], now["dtype"]) != (saved["shape"], saved["dtype"]):
      raise _BadCheckpoint(
          f"{name}: restored {now['shape']} {now['dtype']}, saved "
          f"{saved['shape']} {saved['dtype']}")
    if now["crc32"] is not None and now["crc32"] != saved["crc32"]:
      raise _BadCheckpoint(f"{name}: CRC32 mismatch (data corrupted)")
    if hasattr(want, "shape") and list(want.shape) != saved["shape"]:
      raise _BadCheckpoint(f"{name}: saved shape {saved['shape']} != target "
                           f"{list(want.shape)}")
    if hasattr(want, "dtype") and str(want.dtype) != saved["dtype"]:
      raise _BadCheckpoint(f"{name}: saved dtype {saved['dtype']} != target "
                           f"{want.dtype}")
    sharding = getattr(want, "sharding", None)
    if sharding is not None and isinstance(leaf, jax.Array):
      if not leaf.sharding.is_equivalent_to(sharding, leaf.ndim):
        raise _BadCheckpoint(f"{name}: sharding {leaf.sharding} != target "
                             f"{sharding}")


def _check_readable(item_dir: epath.Path):
  """Reads every value of the item's OCDBT store once, outside orbax.

  A truncated or missing data file then fails here, in the calling thread, instead
  of inside orbax's concurrent restore: there, the first failed read closes
  orbax's event loop while tensorstore still completes the other reads, and
  each of those prints an "Event loop is closed" traceback to stderr from a
  background thread, interleaved with the trainer's own output.
  """
  base = str(item_dir)
  if "://" not in base:
    base = "file://" + base
  try:
    store = ts.KvStore.open({"driver": "ocdbt", "base": base.rstrip("/") + "/"}).result()
    keys = store.list().result()
    # Reads in flight together (remote storage: round trips overlap), a bounded
    # number at a time (memory: one value per read is held until it is checked).
    for start in range(0, len(keys), _CHECK_READS_IN_FLIGHT):
      reads = [store.read(k) for k in keys[start:start + _CHECK_READS_IN_FLIGHT]]
      for read in reads:
        read.result()
  except Exception as e:  # pylint: disable=broad-except
    raise _BadCheckpoint(f"unreadable data in {item_dir}: {e}") from e


def tree_manifest(tree: PyTree) -> dict[str, Any]:
  """The integrity record of a whole tree (shape, dtype, CRC32 per leaf), as JSON."""
  return _manifest(tree, with_crc=True)


def verify_tree(restored: PyTree, target: PyTree, manifest: dict[str, Any]) -> None:
  """Raises ValueError unless ``restored`` matches ``manifest`` (and ``target``)."""
  if manifest.get("version") != _MANIFEST_VERSION:
    raise ValueError(f"unknown manifest version {manifest.get('version')!r}")
  try:
    _verify(restored, target, manifest)
  except _BadCheckpoint as e:
    raise ValueError(str(e)) from None


def check_readable(directory: str) -> None:
  """Reads every stored value of an orbax item folder once (see _check_readable)."""
  _check_readable(epath.Path(directory))


def _abstract(x):
  """Restore target for one leaf: jax arrays become ShapeDtypeStructs.

  Keeping `.sharding` makes orbax place the restored array exactly like the
  target; numpy arrays and scalars stay as they are (restored as numpy).
  """
  if isinstance(x, jax.Array):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
  return x


# ----------------------------------------------------------------------------
# Checkpointer
# ----------------------------------------------------------------------------


class Checkpointer:
  """Saves and restores one state pytree per step under `directory`.

  Args:
    directory: root folder (created if missing); steps live in
      ``<directory>/<step>``.
    max_to_keep: keep only the newest N steps (None keeps all).
    save_interval_steps: `save` writes only when ``step % N == 0`` (or when
      forced, or when JAX reports a preemption sync point).
    async_save: write in a background thread; `save` returns once the arrays
      are copied to host. Call `wait_until_finished` or `close` before exit.
    verify_checksums: record and check a CRC32 per leaf. Costs one extra
      device-to-host copy plus ~3 GB/s of hashing per save; turn off only
      for very large states.
  """

  def __init__(self,
               directory: str | os.PathLike,
               *,
               max_to_keep: int | None = 3,
               save_interval_steps: int = 1,
               async_save: bool = True,
               verify_checksums: bool = True):
    if max_to_keep is not None and max_to_keep < 1:
      raise ValueError(f"max_to_keep must be None or >= 1, got {max_to_keep}")
    if save_interval_steps < 1:
      raise ValueError(
          f"save_interval_steps must be >= 1, got {save_interval_steps}")
    directory = str(directory)
    if "://" not in directory:  # keep gs:// and friends untouched
      directory = os.path.abspath(directory)
    self._directory = epath.Path(directory)
    self._verify_checksums = verify_checksums
    options = ocp.CheckpointManagerOptions(
        # Save on multiples of the interval, and when a preemption is
        # signalled; deliberately not orbax's default "first call always
        # saves" policy, so `save` is predictable.
        save_decision_policy=ocp_managers.AnySavePolicy([
            ocp_managers.FixedIntervalPolicy(save_interval_steps),
            ocp_managers.PreemptionCheckpointingPolicy(),
        ]),
        preservation_policy=ocp_managers.LatestN(max_to_keep),
        # Remove `<step>.orbax-checkpoint-tmp` folders left by a killed write.
        cleanup_tmp_directories=True,
        enable_async_checkpointing=async_save,
    )
    self._manager = ocp.CheckpointManager(self._directory, options=options)

  @property
  def directory(self) -> epath.Path:
    return self._directory

  def latest_step(self) -> int | None:
    """Newest committed step (not verified; see `restore_latest`)."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """All committed steps, ascending."""
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: PyTree, *, force: bool = False) -> bool:
    """Saves `state` as `step`; returns whether a save was started.

    Skipped (False) when the interval policy says no and `force` is False,
    or when `step` already exists (the content of a step never changes).
    With async saving the write completes in the background.
    """
    step = int(step)
    if step in self._manager.all_steps():
      logger.info("Checkpoint for step %d already exists; not saving.", step)
      return False
    if not force and not self._manager.should_save(step):
      return False
    self._check_space(step)
    manifest = _manifest(state, self._verify_checksums)
    try:
      return bool(
          self._manager.save(
              step,
              args=ocp.args.StandardSave(state),
              force=force,
              custom_metadata={_MANIFEST_KEY: manifest},
          ))
    except Exception as e:  # pylint: disable=broad-except  # this one or the previous async one
      raise CheckpointSaveError(_save_failure(self._directory, e)) from e

  def _check_space(self, step: int) -> None:
    """Refuses to start a save that would not fit: the newest saved step's size on
    disk must be free. A write that fails halfway (a full disk) leaves orbax's
    background threads printing tracebacks; this check avoids it in the usual case."""
    directory = str(self._directory)
    latest = self._manager.latest_step()
    if "://" in directory or latest is None:
      return
    try:
      needed = dir_bytes(os.path.join(directory, str(latest)))
      free = shutil.disk_usage(directory).free
    except OSError:
      return
    if free < needed:
      raise CheckpointSaveError(
          f"cannot save step {step} in {directory}: {free / 1e6:.1f} MB free, and a step "
          f"takes about {needed / 1e6:.1f} MB (step {latest}); the steps saved before are "
          f"intact. Free some space and rerun to resume")

  def restore_latest(self, target: PyTree) -> tuple[int, PyTree] | None:
    """Restores the newest step that reads back intact.

    Args:
      target: a tree with the saved structure (NamedTuples included) whose
        leaves are concrete arrays or `jax.ShapeDtypeStruct`s; restored arrays
        get each target leaf's shape, dtype and sharding.

    Returns:
      ``(step, state)``, or None if the directory holds no checkpoint.

    Raises:
      CheckpointRestoreError: checkpoints exist but none is usable.
    """
    self.wait_until_finished()
    self._manager.reload()  # see steps written by an earlier process
    steps = sorted(self._manager.all_steps(), reverse=True)
    if not steps:
      return None
    abstract = jax.tree.map(_abstract, target)
    bad: list[tuple[int, str]] = []
    for step in steps:
      try:
        state = self._restore_step(step, abstract)
      # Orbax/tensorstore raise many unrelated types (ValueError, bare
      # Exception, UnicodeDecodeError, ...) for damaged files; any failure
      # means "this step is unusable", and the next older one is tried.
      except Exception as e:  # pylint: disable=broad-except
        reason = f"{type(e).__name__}: {e}"
        logger.warning(
            "Checkpoint step %d in %s is unusable, trying an older one. "
            "Reason: %s", step, self._directory, reason[:2000])
        bad.append((step, reason))
      else:
        if bad:
          self._quarantine([s for s, _ in bad])
          logger.warning("Restored checkpoint step %d after skipping bad "
                         "step(s) %s.", step, [s for s, _ in bad])
        return step, state
      # A failed orbax read leaves cyclic garbage (pending read coroutines,
      # partly restored device buffers); free it before the next attempt.
      gc.collect()
    details = "; ".join(f"step {s}: {r[:300]}" for s, r in bad)
    raise CheckpointRestoreError(
        f"None of the {len(steps)} checkpoint(s) in {self._directory} could "
        f"be restored into the given target: {details}")

  def wait_until_finished(self):
    """Blocks until a background save has committed."""
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointSaveError(_save_failure(self._directory, e)) from e

  def close(self):
    """Waits for pending saves and releases orbax's threads."""
    try:
      self._manager.close()
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointSaveError(_save_failure(self._directory, e)) from e

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc):
    self.close()

  # -- internals -------------------------------------------------------------

  def _restore_step(self, step: int, abstract: PyTree) -> PyTree:
    step_dir = self._directory / str(step)  # orbax's default step naming
    # Check before calling orbax: with the item folder gone, orbax would
    # lock this manager into multi-item mode and fail every later restore.
    if not (step_dir / _ITEM_DIR).is_dir():
      raise _BadCheckpoint(f"missing item folder {step_dir / _ITEM_DIR}")
    _check_readable(step_dir / _ITEM_DIR)
    restored = self._manager.restore(
        step, args=ocp.args.StandardRestore(abstract))
    # Read after `restore`: before it, a fresh manager does not know the
    # item's handler and logs a spurious warning while reading metadata.
    custom = self._manager.metadata(step).custom_metadata or {}
    manifest = custom.get(_MANIFEST_KEY)
    # Every step this class writes has a manifest; none means the metadata
    # file is missing or unreadable.
    if not manifest or manifest.get("version") != _MANIFEST_VERSION:
      raise _BadCheckpoint("missing or unreadable manifest in "
                           f"{step_dir}/_CHECKPOINT_METADATA")
    _verify(restored, abstract, manifest)
    return restored

  def _quarantine(self, steps: list[int]):
    """Moves unusable steps out of orbax's sight, keeping them for a look.

    A step folder the process may not write (another user's, or ``chmod 000``)
    cannot move to another folder, but can be renamed in place; if even that
    fails it stays, and is said so: it is skipped again on the next restore and
    its step number is not saved again (the next interval's step is).
    """
    if ocp.multihost.is_primary_host(0):
      qdir = self._directory / QUARANTINE_DIR
      for step in steps:
        source = self._directory / str(step)
        stamp = time.time_ns()
        try:
          qdir.mkdir(parents=True, exist_ok=True)
          dest = qdir / f"{step}.{stamp}"
          source.rename(dest)
        except OSError as first:
          # Same folder: no write permission on the step folder itself is needed.
          dest = self._directory / f"{QUARANTINE_DIR}-{step}.{stamp}"
          try:
            source.rename(dest)
          except OSError as second:
            logger.warning(
                "Cannot move bad checkpoint step %d out of the way (%s; %s); it stays in "
                "%s and is skipped at every restore. Remove it to stop this warning.",
                step, first, second, self._directory)
            continue
        logger.warning("Moved bad checkpoint step %d to %s.", step, dest)
    ocp.multihost.sync_global_processes("rigl_jax_checkpoint_quarantine")
    self._manager.reload()
