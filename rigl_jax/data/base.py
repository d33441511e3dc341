"""Shared pieces of the input pipelines: `DataInfo`, the `Pipeline` interface and
the batch-size / split arithmetic every pipeline uses the same way."""

from __future__ import annotations

import abc
import dataclasses
from typing import Iterator

import numpy as np

DATASET_NAMES = ("mnist5k", "mnist1d", "mnist1d_50k", "mnist", "cifar10", "cifar100",
                 "imagenet2012", "pystdlib", "wikitext103")
EVAL_SPLITS = ("val", "test")


@dataclasses.dataclass(frozen=True)
class DataInfo:
  """What the trainer needs to know about a dataset.

  Attributes:
    name: one of `DATASET_NAMES`.
    num_classes: number of labels; labels are in `[0, num_classes)`.
    input_shape: shape of one example, e.g. `(28, 28, 1)` or `(40,)`.
    num_train: examples in the train split (after carving off validation).
    num_val: examples in the validation split (0 when there is none).
    num_test: examples in the test split.
    sequence_length: characters per example of a language-modelling set (labels
      are then one per character); 0 for classification sets.
    corpus_digest: SHA-256 of a text corpus ("" otherwise): runs on the same
      text have the same digest.
  """

  name: str
  num_classes: int
  input_shape: tuple[int, ...]
  num_train: int
  num_val: int
  num_test: int
  sequence_length: int = 0
  corpus_digest: str = ""


@dataclasses.dataclass(frozen=True)
class BatchLayout:
  """How a global batch is divided between processes (hosts).

  Process `i` owns rows `[i * local, (i + 1) * local)` of every global batch, so
  the global batch is the concatenation of the local ones in process order.
  """

  global_batch_size: int
  eval_batch_size: int
  process_index: int
  process_count: int

  def __post_init__(self):
    if self.process_count < 1 or not 0 <= self.process_index < self.process_count:
      raise ValueError(
          f"process_index={self.process_index} must be in [0, process_count="
          f"{self.process_count})")
    for field in ("global_batch_size", "eval_batch_size"):
      size = getattr(self, field)
      if size < 1:
        raise ValueError(f"{field}={size} must be positive")
      if size % self.process_count:
        raise ValueError(
            f"{field}={size} is not divisible by process_count="
            f"{self.process_count}: every process must get the same number of rows")

  @property
  def local_batch_size(self) -> int:
    return self.global_batch_size // self.process_count

  @property
  def local_eval_batch_size(self) -> int:
    return self.eval_batch_size // self.process_count

  def local_rows(self, local_size: int) -> slice:
    """Rows of a global batch (of `local_size * process_count` rows) owned here."""
    return slice(self.process_index * local_size, (self.process_index + 1) * local_size)


class Pipeline(abc.ABC):
  """Train and eval batches of one dataset for one process.

  Attributes:
    info: the dataset's `DataInfo`.
    layout: the `BatchLayout` (global/local batch sizes, process index/count).
    steps_per_epoch: `info.num_train // global_batch_size` (the remainder of
      each epoch is dropped).
  """

  info: DataInfo
  layout: BatchLayout

  @property
  def steps_per_epoch(self) -> int:
    return self.info.num_train // self.layout.global_batch_size

  @abc.abstractmethod
  def train_batches(self, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Infinite stream of local train batches, starting at global step `start_step`.

    Yields `{"image": float32 [local_batch, *input_shape], "label": int32
    [local_batch]}`. The stream is a pure function of (seed, step):
    `train_batches(k)` yields exactly what `train_batches(0)` yields from its
    k-th batch on, which is how a restored checkpoint resumes the data.
    """

  @abc.abstractmethod
  def eval_batches(self, split: str) -> Iterator[dict[str, np.ndarray]]:
    """One pass over `split` ("val" or "test") in fixed-shape local batches.

    Yields `{"image", "label", "mask"}`; the last batch is padded with zeros and
    `mask` (bool [local_eval_batch]) is True exactly for the real examples, so
    every example is counted once across all batches and processes.
    """


def check_eval_split(info: DataInfo, split: str) -> None:
  """Raises a clear error for an unknown or empty eval split."""
  if split not in EVAL_SPLITS:
    raise ValueError(f"eval split must be one of {EVAL_SPLITS}, got {split!r}")
  if split == "val" and info.num_val == 0:
    raise ValueError(
        f"dataset {info.name!r} has no validation split (validation_size=0); "
        "check `info.num_val` before asking for 'val' batches")


def check_validation_size(name: str, validation_size: int, num_train_part: int) -> int:
  """The validation split is carved from the train data and must leave some."""
  size = int(validation_size)
  if not 0 <= size < num_train_part:
    raise ValueError(
        f"validation_size={size} for dataset {name!r} must be in [0, "
        f"{num_train_part}): it is carved from the {num_train_part} train examples")
  return size


def check_seed(seed: int) -> int:
  """numpy's SeedSequence takes non-negative integers only."""
  seed = int(seed)
  if seed < 0:
    raise ValueError(f"seed={seed} must be a non-negative integer")
  return seed
