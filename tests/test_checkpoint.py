"""Tests for rigl_jax.checkpoint: round trips, retention, crash and corruption.

The crash tests run a child Python process (jax must be configured before it
is imported, and SIGKILL must hit a real process).
"""

import gc
import glob
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rigl_jax.checkpoint import QUARANTINE_DIR, Checkpointer, CheckpointRestoreError

# Orbax's failure path on a damaged step (which these tests provoke on
# purpose) leaves never-awaited read coroutines, and tensorstore may later call
# into the event loop orbax already closed. Python reports both as
# "unraisable" or RuntimeWarning; they are harmless noise, not failures.
pytestmark = [
    pytest.mark.filterwarnings(
        "ignore::pytest.PytestUnraisableExceptionWarning"),
    pytest.mark.filterwarnings(
        "ignore:coroutine .* was never awaited:RuntimeWarning"),
]


@pytest.fixture(autouse=True)
def _collect_orbax_garbage():
  yield
  gc.collect()  # finalize those leftovers while the filters above apply


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TMP_SUFFIX = ".orbax-checkpoint-tmp"


class SparseTrainingState(NamedTuple):
  """Same shape as the transform's state; local so this test stands alone."""
  step: Any
  masks: Any
  inner_state: Any
  method_state: Any
  rng: Any


def make_state(seed: int):
  """A trainer-like state with non-trivial values in every leaf.

  Values come from numpy (no per-op compiles, which are slow on a busy CPU);
  optax only provides the real state structures.
  """
  rng = np.random.default_rng(seed)

  def rand_like(x):
    x = np.asarray(x)
    if x.dtype == bool:
      return rng.random(x.shape) < 0.5
    if np.issubdtype(x.dtype, np.integer):
      return rng.integers(1, 1000, x.shape).astype(x.dtype)
    return rng.standard_normal(x.shape).astype(x.dtype)

  params = {
      "conv": {"kernel": np.zeros((3, 3, 2, 4), np.float32)},
      "dense": {"kernel": np.zeros((8, 5), np.float32)},
      # Big enough (16 KiB) to be stored out of line in its own data chunk.
      "big": {"kernel": np.zeros((64, 64), np.float32)},
  }
  params = jax.tree.map(rand_like, params)
  params["dense"]["bias"] = np.array([0.0, -0.0, np.nan, np.inf, 1e-38],
                                     np.float32)
  masks = jax.tree.map(lambda p: rng.random(p.shape) < 0.5, params)
  inner = optax.chain(optax.add_decayed_weights(1e-4),
                      optax.sgd(0.1, momentum=0.9, nesterov=True))
  method = optax.inject_hyperparams(optax.adam)(learning_rate=0.01)
  opt_state = SparseTrainingState(
      step=np.int32(7 + seed), masks=masks,
      inner_state=jax.tree.map(rand_like, inner.init(params)),
      method_state=jax.tree.map(rand_like, method.init(params)),
      rng=np.asarray(jax.random.key_data(jax.random.key(seed + 100))))
  state = {
      "params": params,
      "batch_stats": {"bn": {"mean": np.full((4,), seed, np.float32)}},
      "opt_state": opt_state,
      "step": np.int32(seed),
      "rng": np.asarray(jax.random.key_data(jax.random.key(seed))),
  }
  state = jax.device_put(state)  # all leaves become jax.Arrays
  state["typed_key"] = jax.random.key(seed)  # typed keys also round-trip
  return state


def _raw(x):
  if hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype,
                                                   jax.dtypes.prng_key):
    return str(x.dtype), np.asarray(jax.random.key_data(x))
  return str(x.dtype), np.asarray(x)


def assert_bit_identical(a, b):
  # PyTreeDef equality includes the NamedTuple classes, not just the shape.
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    (dx, ax), (dy, ay) = _raw(x), _raw(y)
    assert dx == dy and ax.shape == ay.shape
    assert ax.tobytes() == ay.tobytes()  # NaN, -0.0 included


def abstract_of(tree):
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
      tree)


def save_steps(directory, steps, **kwargs):
  ckpt = Checkpointer(directory, async_save=False, **kwargs)
  for step in steps:
    assert ckpt.save(step, make_state(step))
  ckpt.close()


def step_dirs(directory):
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


@pytest.mark.parametrize("async_save", [True, False])
def test_round_trip_is_bit_identical(tmp_path, async_save):
  state = make_state(3)
  with Checkpointer(tmp_path, async_save=async_save) as ckpt:
    assert ckpt.save(3, state)
    ckpt.wait_until_finished()
    assert ckpt.latest_step() == 3
  # A fresh Checkpointer, as after a restart; concrete and abstract targets.
  ckpt = Checkpointer(tmp_path)
  target = make_state(0)
  step, restored = ckpt.restore_latest(target)
  assert step == 3
  assert_bit_identical(restored, state)
  assert isinstance(restored["opt_state"], SparseTrainingState)
  step, restored = ckpt.restore_latest(abstract_of(target))
  assert step == 3
  assert_bit_identical(restored, state)
  ckpt.close()


def test_max_to_keep_and_save_interval(tmp_path):
  ckpt = Checkpointer(tmp_path, max_to_keep=2, save_interval_steps=2,
                      async_save=False)
  state = make_state(0)
  saved = [ckpt.save(s, state) for s in range(1, 7)]
  assert saved == [False, True, False, True, False, True]
  assert ckpt.all_steps() == [4, 6]
  assert ckpt.save(7, state, force=True)
  assert ckpt.save(7, state, force=True) is False  # a step is never rewritten
  assert ckpt.all_steps() == [6, 7]
  assert step_dirs(tmp_path) == [6, 7]
  ckpt.close()


def test_restore_without_checkpoints_returns_none(tmp_path):
  ckpt = Checkpointer(tmp_path / "empty")
  assert ckpt.latest_step() is None
  assert ckpt.all_steps() == []
  assert ckpt.restore_latest(make_state(0)) is None
  ckpt.close()


def _data_files(step_dir):
  """Orbax's OCDBT data files: btree nodes, and array chunks."""
  files = glob.glob(f"{step_dir}/default/d/*")
  files += glob.glob(f"{step_dir}/default/ocdbt.process_*/d/*")
  assert files
  return files


def _flip_a_byte_in_largest_data_file(step_dir):
  # The largest file holds the compressed chunk of params["big"]; orbax
  # reads the flipped chunk back without any error, only the CRC sees it.
  path = max(_data_files(step_dir), key=os.path.getsize)
  data = bytearray(open(path, "rb").read())
  data[len(data) // 2] ^= 0xFF
  open(path, "wb").write(bytes(data))


def _delete_data_files(step_dir):
  for f in _data_files(step_dir):
    os.remove(f)


def _garbage_array_metadata(step_dir):
  open(f"{step_dir}/default/_METADATA", "wb").write(os.urandom(300))


def _delete_step_metadata(step_dir):
  os.remove(f"{step_dir}/_CHECKPOINT_METADATA")


def _delete_item_dir(step_dir):
  shutil.rmtree(f"{step_dir}/default")


# (corruption, text the warning must contain: what caught it)
CORRUPTIONS = [
    (_flip_a_byte_in_largest_data_file, "CRC32 mismatch"),  # silent in orbax
    (_delete_data_files, "Error"),                          # orbax read error
    (_garbage_array_metadata, "Error"),                     # orbax parse error
    (_delete_step_metadata, "manifest"),
    (_delete_item_dir, "missing item folder"),
]


@pytest.mark.parametrize("corrupt,reason", CORRUPTIONS,
                         ids=[c.__name__ for c, _ in CORRUPTIONS])
def test_corrupted_latest_falls_back_to_previous(tmp_path, caplog, corrupt,
                                                 reason):
  save_steps(tmp_path, [1, 2])
  corrupt(tmp_path / "2")
  ckpt = Checkpointer(tmp_path)
  with caplog.at_level(logging.WARNING, logger="rigl_jax.checkpoint"):
    step, restored = ckpt.restore_latest(make_state(0))
  assert step == 1
  assert_bit_identical(restored, make_state(1))
  warnings = [r.getMessage() for r in caplog.records
              if r.levelno == logging.WARNING and r.name == "rigl_jax.checkpoint"]
  assert any("step 2 " in m and "unusable" in m and reason in m
             for m in warnings), warnings
  # The bad step is moved aside, so the resumed run can write step 2 again.
  assert ckpt.all_steps() == [1]
  assert len(os.listdir(tmp_path / QUARANTINE_DIR)) == 1
  assert ckpt.save(2, make_state(2), force=True)
  ckpt.wait_until_finished()
  step, restored = ckpt.restore_latest(make_state(0))
  assert step == 2
  assert_bit_identical(restored, make_state(2))
  ckpt.close()


def _deny_renames(monkeypatch, step_dir, *, in_place_too: bool):
  """Renames of ``step_dir`` fail like those of a step folder this user may not write (``chmod 000``
  as a non-root user): Linux refuses to move such a folder to another parent (it
  would have to rewrite its ``..``) but renames it within its parent."""
  from etils import epath  # pylint: disable=import-outside-toplevel
  real = type(epath.Path("/")).rename

  def rename(self, target):
    if str(self) == str(step_dir) and (in_place_too or epath.Path(target).parent != self.parent):
      raise PermissionError(13, "Permission denied", str(self))
    return real(self, target)

  monkeypatch.setattr(type(epath.Path("/")), "rename", rename)


def test_unmovable_bad_step_is_renamed_in_place(tmp_path, monkeypatch):
  save_steps(tmp_path, [1, 2])
  _delete_data_files(tmp_path / "2")
  _deny_renames(monkeypatch, tmp_path / "2", in_place_too=False)
  ckpt = Checkpointer(tmp_path)
  step, _ = ckpt.restore_latest(make_state(0))
  assert step == 1
  assert ckpt.all_steps() == [1]
  renamed = [n for n in os.listdir(tmp_path) if n.startswith(f"{QUARANTINE_DIR}-2.")]
  assert len(renamed) == 1, os.listdir(tmp_path)
  assert ckpt.save(2, make_state(2), force=True)  # the step number is free again
  ckpt.wait_until_finished()
  assert ckpt.restore_latest(make_state(0))[0] == 2
  ckpt.close()


def test_bad_step_that_cannot_be_renamed_stays_and_is_said(tmp_path, monkeypatch, caplog):
  save_steps(tmp_path, [1, 2])
  _delete_data_files(tmp_path / "2")
  _deny_renames(monkeypatch, tmp_path / "2", in_place_too=True)
  ckpt = Checkpointer(tmp_path, max_to_keep=None)
  with caplog.at_level(logging.WARNING, logger="rigl_jax.checkpoint"):
    step, restored = ckpt.restore_latest(make_state(0))  # no PermissionError
  assert step == 1
  assert_bit_identical(restored, make_state(1))
  assert any("Cannot move bad checkpoint step 2" in r.getMessage() and "skipped" in
             r.getMessage() for r in caplog.records)
  assert ckpt.all_steps() == [1, 2]
  assert not ckpt.save(2, make_state(2), force=True)  # that step exists: not overwritten
  assert ckpt.save(3, make_state(3), force=True)
  ckpt.wait_until_finished()
  step, restored = ckpt.restore_latest(make_state(0))  # the new step wins, no error
  assert step == 3
  assert_bit_identical(restored, make_state(3))
  ckpt.close()


def test_all_checkpoints_corrupted_raises(tmp_path):
  save_steps(tmp_path, [1, 2])
  _flip_a_byte_in_largest_data_file(tmp_path / "1")
  _delete_item_dir(tmp_path / "2")
  ckpt = Checkpointer(tmp_path)
  with pytest.raises(CheckpointRestoreError, match="step 2.*step 1"):
    ckpt.restore_latest(make_state(0))
  assert ckpt.all_steps() == [1, 2]  # nothing is moved when nothing is good
  ckpt.close()


def test_wrong_target_shape_raises(tmp_path):
  save_steps(tmp_path, [1])
  target = make_state(0)
  target["params"]["dense"]["kernel"] = jnp.zeros((8, 6))  # shape changed
  ckpt = Checkpointer(tmp_path)
  with pytest.raises(CheckpointRestoreError):
    ckpt.restore_latest(target)
  ckpt.close()


def test_leftover_temporary_dir_is_ignored_and_cleaned(tmp_path):
  save_steps(tmp_path, [1])
  # What a write killed before its commit-rename leaves behind: a partial
  # copy of a step under the temporary name.
  leftover = tmp_path / f"2{TMP_SUFFIX}"
  shutil.copytree(tmp_path / "1", leftover)
  _delete_data_files(leftover)
  ckpt = Checkpointer(tmp_path)
  assert ckpt.all_steps() == [1]
  step, restored = ckpt.restore_latest(make_state(0))
  assert step == 1
  assert_bit_identical(restored, make_state(1))
  assert ckpt.save(2, make_state(2))  # orbax waits for its cleanup first
  ckpt.wait_until_finished()
  assert not leftover.exists()
  assert ckpt.all_steps() == [1, 2]
  ckpt.close()


def _run_child(code, extra_env=None):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH",
                                                                 ""))
  env.update(extra_env or {})
  return subprocess.run([sys.executable, "-c", textwrap.dedent(code)],
                        env=env, cwd=REPO_ROOT, capture_output=True,
                        text=True, timeout=120)


def test_sigkill_during_async_save_keeps_last_good_step(tmp_path):
  code = f"""
      import os, signal
      import jax.numpy as jnp
      from rigl_jax.checkpoint import Checkpointer
      ckpt = Checkpointer({str(tmp_path)!r})
      ckpt.save(1, {{"w": jnp.full((1 << 22,), 1.0)}})
      ckpt.wait_until_finished()
      ckpt.save(2, {{"w": jnp.full((1 << 22,), 2.0)}})  # returns before commit
      print("TMP_AT_KILL", os.path.exists({str(tmp_path / ("2" + TMP_SUFFIX))!r}),
            flush=True)
      os.kill(os.getpid(), signal.SIGKILL)
  """
  child = _run_child(code)
  assert child.returncode == -9, child.stderr[-3000:]
  ckpt = Checkpointer(tmp_path)
  step, restored = ckpt.restore_latest({"w": jnp.zeros((1 << 22,))})
  # Either the write was cut (usual) and step 1 is back, or it had already
  # committed; in both cases the data is exactly what that step saved.
  assert step in (1, 2), child.stdout
  np.testing.assert_array_equal(np.asarray(restored["w"]), float(step))
  if "TMP_AT_KILL True" in child.stdout:
    assert step == 1
  assert ckpt.save(3, {"w": jnp.full((1 << 22,), 3.0)})
  ckpt.wait_until_finished()
  assert not glob.glob(f"{tmp_path}/*{TMP_SUFFIX}*")
  ckpt.close()


def test_two_device_sharded_round_trip(tmp_path):
  code = f"""
      import jax, jax.numpy as jnp, numpy as np
      from jax.sharding import NamedSharding, PartitionSpec as P
      from rigl_jax.checkpoint import Checkpointer
      assert jax.device_count() == 2, jax.devices()
      mesh = jax.make_mesh((2,), ("data",))
      rep = NamedSharding(mesh, P())
      state = {{"params": {{"w": jnp.arange(12.0).reshape(3, 4)}},
                "masks": {{"w": jnp.arange(12).reshape(3, 4) % 2 == 0}},
                "step": jnp.int32(5),
                "rng": jax.random.key_data(jax.random.key(0))}}
      state = jax.device_put(state, rep)
      ckpt = Checkpointer({str(tmp_path)!r})
      assert ckpt.save(5, state)
      ckpt.close()
      ckpt = Checkpointer({str(tmp_path)!r})
      target = jax.tree.map(
          lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), state)
      # Abstract target, then the concrete state itself as the target.
      for tgt in (target, state):
        step, restored = ckpt.restore_latest(tgt)
        assert step == 5
        for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
          assert a.sharding == rep, a.sharding
          assert len(a.addressable_shards) == 2
          assert a.dtype == b.dtype
          assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
      ckpt.close()
      print("SHARDED_OK")
  """
  child = _run_child(
      code, {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
  assert child.returncode == 0, child.stderr[-3000:]
  assert "SHARDED_OK" in child.stdout
