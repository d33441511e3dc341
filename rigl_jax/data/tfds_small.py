"""Loading the small tfds datasets (mnist, cifar10, cifar100) fully into numpy.

The data must already be prepared in `data_dir` (`tfds build NAME
--data_dir=DIR`); nothing is downloaded here. Two on-disk formats are read:

* array_record (`tfds build ... --file_format=array_record`): random access
  through `tfds.data_source`, no TensorFlow needed;
* TFRecord (tfds' default): read once with `tfds.load`, which needs
  TensorFlow (`pip install 'rigl_jax[tf]'`).

Whole splits are loaded ("train" and "test"); the validation split is carved
from the end of "train" by the caller, which equals tfds' `train[-n:]`.
"""

from __future__ import annotations

import importlib.util

import numpy as np

Arrays = tuple[np.ndarray, np.ndarray]
_READ_CHUNK = 5_000  # examples read at a time (bounds the temporary lists)


def tensorflow_available() -> bool:
  return importlib.util.find_spec("tensorflow") is not None


def describe_data_dir(data_dir: str | None) -> str:
  return (f"data_dir={data_dir!r}" if data_dir else
          "the default tfds data_dir ($TFDS_DATA_DIR or ~/tensorflow_datasets)")


def missing_data_error(name: str, data_dir: str | None) -> FileNotFoundError:
  """The error for a dataset that was never prepared in `data_dir`."""
  target = f" --data_dir={data_dir}" if data_dir else ""
  hint = ""
  if name == "imagenet2012":
    hint = (" imagenet2012 cannot be downloaded by tfds: first put ILSVRC2012_img_"
            "train.tar and ILSVRC2012_img_val.tar in <data_dir>/downloads/manual/.")
  return FileNotFoundError(
      f"dataset {name!r}: no prepared tfds data found in {describe_data_dir(data_dir)}. "
      f"Prepare it once with `tfds build {name}{target}` (add "
      f"`--file_format=array_record` to read it without TensorFlow), or "
      f"`tfds.builder({name!r}, data_dir=...).download_and_prepare()`.{hint}")


def load_splits(name: str, splits: tuple[str, ...], data_dir: str | None
                ) -> dict[str, Arrays]:
  """{split: (images uint8 [n, h, w, c], labels int32 [n])} for whole tfds splits."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  try:
    sources = tfds.data_source(name, split=list(splits), data_dir=data_dir,
                               download=False)
  except NotImplementedError:
    # Not a random-access format: prepared as TFRecord, or not prepared at all
    # (the dataset's code then reports its default format, TFRecord).
    sources = None
  except (AssertionError, FileNotFoundError) as e:  # missing random-access files
    raise missing_data_error(name, data_dir) from e
  if sources is not None:
    return {s: _source_to_arrays(src) for s, src in zip(splits, sources)}

  if not tensorflow_available():
    if not tfds.builder(name, data_dir=data_dir).is_prepared():
      raise missing_data_error(name, data_dir)
    raise ImportError(
        f"dataset {name!r} in {describe_data_dir(data_dir)} is prepared as TFRecord, "
        "which is read with TensorFlow: `pip install 'rigl_jax[tf]'`, or prepare it "
        f"again with `tfds build {name} --file_format=array_record`.")
  out = {}
  for s in splits:
    try:
      ds = tfds.load(name, split=s, data_dir=data_dir, download=False)
    except AssertionError as e:  # tfds' "could not find data in ..."
      raise missing_data_error(name, data_dir) from e
    # Read in chunks rather than with tfds.load(batch_size=-1): that batches
    # with a huge batch size, which aborts the whole process (std::length_error)
    # under tfds.testing.mock_data.
    ds = ds.map(lambda ex: (ex["image"], ex["label"])).batch(_READ_CHUNK)
    chunks = list(tfds.as_numpy(ds))
    out[s] = (np.concatenate([c[0] for c in chunks]).astype(np.uint8),
              np.concatenate([c[1] for c in chunks]).astype(np.int32))
  return out


def _source_to_arrays(source) -> Arrays:
  """Reads every record of a tfds data source (decoded numpy dicts)."""
  n = len(source)
  records = []
  for start in range(0, n, _READ_CHUNK):
    records.extend(_read_records(source, list(range(start, min(start + _READ_CHUNK, n)))))
  images = np.stack([r["image"] for r in records]).astype(np.uint8)
  labels = np.asarray([r["label"] for r in records], np.int32)
  return images, labels


def _read_records(source, keys: list[int]) -> list:
  # The batched read is about 2x faster than one record at a time (CIFAR-10's
  # 60,000 images: tens of seconds on 2 busy cores), but the source mocked by
  # tfds.testing.mock_data (tfds 4.9.10) fails it with a TypeError.
  try:
    return list(source.__getitems__(keys))
  except TypeError:
    return [source[k] for k in keys]
