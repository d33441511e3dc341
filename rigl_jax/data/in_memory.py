"""The pipeline for datasets that fit in memory (everything but ImageNet).

Batches are cut from numpy arrays held in memory. The train stream is a pure
function of (seed, step): the example order of epoch `e` is a permutation drawn
from `numpy.random.default_rng([seed, 0, e])` and the augmentation of step `s`
from `default_rng([seed, 1, s])`, so resuming at any step needs no saved state.
"""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np

from rigl_jax.data.base import BatchLayout, DataInfo, Pipeline, check_eval_split

Arrays = tuple[np.ndarray, np.ndarray]  # (images, labels)

# First entry of the seed sequence: keeps the permutation and augmentation
# streams apart even when an epoch number equals a step number.
_PERMUTATION_STREAM, _AUGMENT_STREAM = 0, 1


def carve_validation(train: Arrays, validation_size: int) -> tuple[Arrays, Arrays]:
  """Splits the last `validation_size` examples off the train arrays.

  Taken from the end, as tfds' `train[:-n]` / `train[-n:]` do (the report's
  `train[:45000]` / `train[45000:]` for CIFAR).
  """
  x, y = train
  cut = len(y) - validation_size
  return (x[:cut], y[:cut]), (x[cut:], y[cut:])


class ArrayPipeline(Pipeline):
  """Train and eval batches from in-memory arrays.

  Args:
    info: the dataset's `DataInfo` (sizes must match the arrays).
    splits: {"train", "val", "test"} -> (images, labels); images are raw
      (uint8 pixels or float features), labels integers.
    layout: global/local batch sizes and this process's rows.
    seed: non-negative int; the train stream depends on it and the step only.
    preprocess: raw images -> float32 model inputs (normalisation).
    augment: an augmentation with `sample(rng, n)` / `apply(images, params)`
      (e.g. `PadCropFlip`), applied to raw train images; None for none.
  """

  def __init__(self, info: DataInfo, splits: dict[str, Arrays], layout: BatchLayout,
               seed: int, preprocess: Callable[[np.ndarray], np.ndarray],
               augment=None):
    sizes = {k: len(v[1]) for k, v in splits.items()}
    expected = {"train": info.num_train, "val": info.num_val, "test": info.num_test}
    if sizes != expected:
      raise ValueError(f"split sizes {sizes} do not match DataInfo {expected}")
    self.info = info
    self.layout = layout
    self._splits = splits
    self._seed = seed
    self._preprocess = preprocess
    self._augment = augment
    if self.steps_per_epoch < 1:
      raise ValueError(
          f"global_batch_size={layout.global_batch_size} is larger than the "
          f"{info.num_train} train examples of dataset {info.name!r}")

  def _epoch_permutation(self, epoch: int) -> np.ndarray:
    rng = np.random.default_rng([self._seed, _PERMUTATION_STREAM, epoch])
    return rng.permutation(self.info.num_train)

  def train_batches(self, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
    if start_step < 0:
      raise ValueError(f"start_step={start_step} must be >= 0")
    images, labels = self._splits["train"]
    global_size = self.layout.global_batch_size
    rows = self.layout.local_rows(self.layout.local_batch_size)
    step, perm, perm_epoch = start_step, None, None
    while True:
      epoch, index_in_epoch = divmod(step, self.steps_per_epoch)
      if epoch != perm_epoch:
        perm, perm_epoch = self._epoch_permutation(epoch), epoch
      start = index_in_epoch * global_size
      idx = perm[start:start + global_size][rows]
      x = images[idx]
      if self._augment is not None:
        rng = np.random.default_rng([self._seed, _AUGMENT_STREAM, step])
        params = self._augment.sample(rng, global_size)
        x = self._augment.apply(x, {k: v[rows] for k, v in params.items()})
      yield {"image": self._preprocess(x), "label": labels[idx].astype(np.int32)}
      step += 1

  def eval_batches(self, split: str) -> Iterator[dict[str, np.ndarray]]:
    check_eval_split(self.info, split)
    images, labels = self._splits[split]
    n, global_size = len(labels), self.layout.eval_batch_size
    rows = self.layout.local_rows(self.layout.local_eval_batch_size)
    for start in range(0, n, global_size):
      idx = np.arange(start, start + global_size)[rows]
      mask = idx < n
      idx = np.where(mask, idx, 0)  # any valid index; the rows are zeroed below
      x = self._preprocess(images[idx])
      x[~mask] = 0.0
      y = np.where(mask, labels[idx], 0).astype(np.int32)
      yield {"image": x, "label": y, "mask": mask}
