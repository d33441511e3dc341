"""ImageNet (tfds `imagenet2012`), streamed with tf.data: too big for memory.

Needs TensorFlow (`pip install 'rigl_jax[tf]'`), imported only when this
pipeline is built. Splits: train = `train[:-V]`, val = `train[-V:]` (V =
validation_size, 10,000 by default), test = tfds' `validation` (50,000).

Multi-host: each process reads its own contiguous part of the train split, so the
global batch is the concatenation of the local batches in process order, as for
the in-memory pipeline, but the rows of a global batch are not the same examples
as with another process count.

Order, determinism and resume: a process's part is cut into windows of `WINDOW`
consecutive records (tfds writes the records of a split shuffled); every epoch
takes the windows in an order drawn from (seed, epoch) and shuffles each window
whole with a seed from (seed, epoch, window); an epoch ends after
`steps_per_epoch` local batches. The stream is thus a function of (seed, step):
resuming at step k opens the window that holds the step's first example and skips
inside it before any decoding, so a resume at any step reads at most one window
(what a fresh start reads to fill its shuffle) instead of every record before it.
The augmentation of the example at position `i` of this process's stream uses the
stateless seed (seed, i * process_count + process_index).
"""

from __future__ import annotations

import math
from typing import Iterator

import numpy as np

from rigl_jax.data.base import (BatchLayout, DataInfo, Pipeline, check_eval_split,
                                check_validation_size)
from rigl_jax.data.tfds_small import describe_data_dir, missing_data_error

NAME = "imagenet2012"
NUM_CLASSES = 1000
IMAGE_SIZE = 224
RESIZE_SIZE = 256  # eval: shorter side resized to this, then centre crop 224
WINDOW = 16_384  # examples shuffled together; about 2 GB of encoded JPEGs per process
_WINDOW_ORDER_STREAM, _WINDOW_SHUFFLE_STREAM = 1, 2  # numpy seed streams
# ImageNet RGB statistics in [0, 255] pixel units.
MEAN_RGB = (0.485 * 255, 0.456 * 255, 0.406 * 255)
STDDEV_RGB = (0.229 * 255, 0.224 * 255, 0.225 * 255)


def _import_tf():
  try:
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(
        f"dataset {NAME!r} is streamed with tf.data and needs TensorFlow: "
        "`pip install 'rigl_jax[tf]'`") from e
  return tf


class ImageNetPipeline(Pipeline):
  """tf.data pipeline for `imagenet2012`; see the module docstring."""

  def __init__(self, layout: BatchLayout, seed: int, validation_size: int,
               data_dir: str | None, augment: bool = True):
    self._tf = _import_tf()
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    self._tfds = tfds
    self.layout = layout
    self._seed = seed
    self._data_dir = data_dir
    self._augment = augment

    num_train_all = self._num_examples("train")
    num_test = self._num_examples("validation")
    val = check_validation_size(NAME, validation_size, num_train_all)
    self._splits = {
        "train": f"train[:-{val}]" if val else "train",
        "val": f"train[-{val}:]" if val else None,
        "test": "validation",
    }
    self.info = DataInfo(name=NAME, num_classes=NUM_CLASSES,
                         input_shape=(IMAGE_SIZE, IMAGE_SIZE, 3),
                         num_train=num_train_all - val, num_val=val, num_test=num_test)
    if self.steps_per_epoch < 1:
      raise ValueError(f"global_batch_size={layout.global_batch_size} is larger "
                       f"than the {self.info.num_train} train examples")

  # -- reading ---------------------------------------------------------------

  def _load(self, split, *, shuffle_files: bool):
    """Encoded examples of `split` (image bytes are decoded in preprocessing)."""
    tfds = self._tfds
    read_config = tfds.ReadConfig(shuffle_seed=self._seed,
                                  shuffle_reshuffle_each_iteration=True)
    try:
      return tfds.load(NAME, split=split, data_dir=self._data_dir, download=False,
                       shuffle_files=shuffle_files, read_config=read_config,
                       decoders={"image": tfds.decode.SkipDecoding()})
    except AssertionError as e:  # tfds' "could not find data in ..."
      raise missing_data_error(NAME, self._data_dir) from e
    except NotImplementedError as e:  # prepared as array_record: no tf.data reader
      raise ValueError(
          f"dataset {NAME!r} in {describe_data_dir(self._data_dir)} is not prepared "
          "as TFRecord, which this streaming pipeline reads: run `tfds build "
          f"{NAME}` with the default file format") from e

  def _num_examples(self, split: str) -> int:
    # The cardinality of a tfds dataset is its split size (tfds asserts it), and
    # unlike `builder.info.splits` it also works under tfds.testing.mock_data.
    n = int(self._load(split, shuffle_files=False).cardinality())
    if n < 0:
      raise ValueError(f"dataset {NAME!r}: unknown size of split {split!r}")
    return n

  def _process_split(self, split: str, drop_remainder: bool):
    return self._tfds.split_for_jax_process(
        split, process_index=self.layout.process_index,
        process_count=self.layout.process_count, drop_remainder=drop_remainder)

  # -- preprocessing ---------------------------------------------------------

  def _normalize(self, image):
    tf = self._tf
    image = tf.cast(image, tf.float32)
    return (image - tf.constant(MEAN_RGB)) / tf.constant(STDDEV_RGB)

  def _train_image(self, image_bytes, seed):
    """Inception-style random-resized crop to 224 and random flip, stateless."""
    tf = self._tf
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.io.extract_jpeg_shape(image_bytes),
        bounding_boxes=tf.zeros([1, 0, 4], tf.float32), seed=crop_seed,
        min_object_covered=0.1, aspect_ratio_range=(3 / 4, 4 / 3),
        area_range=(0.08, 1.0), max_attempts=10,
        use_image_if_no_bounding_boxes=True)
    window = tf.stack([begin[0], begin[1], size[0], size[1]])
    image = tf.io.decode_and_crop_jpeg(image_bytes, window, channels=3)
    image = tf.image.resize(image, (IMAGE_SIZE, IMAGE_SIZE), method="bilinear")
    image = tf.image.stateless_random_flip_left_right(image, flip_seed)
    return self._normalize(image)

  def _eval_image(self, image_bytes):
    """Shorter side resized to 256, centre crop 224."""
    tf = self._tf
    image = tf.io.decode_jpeg(image_bytes, channels=3)
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = RESIZE_SIZE / tf.reduce_min(shape)
    new_shape = tf.cast(tf.math.round(shape * scale), tf.int32)
    image = tf.image.resize(image, new_shape, method="bilinear")
    top = (new_shape[0] - IMAGE_SIZE) // 2
    left = (new_shape[1] - IMAGE_SIZE) // 2
    image = tf.image.crop_to_bounding_box(image, top, left, IMAGE_SIZE, IMAGE_SIZE)
    return self._normalize(image)

  # -- streams ---------------------------------------------------------------

  def _window_bounds(self) -> list[tuple[int, int]]:
    """This process's part of the train split as windows [a, b) of record indices in
    tfds' ``train`` split: ``num_train // process_count`` records from
    ``process_index * that``, cut into windows of ``WINDOW`` records."""
    size = self.info.num_train // self.layout.process_count
    first = self.layout.process_index * size
    return [(first + a, first + min(a + WINDOW, size)) for a in range(0, size, WINDOW)]

  def _epoch(self, epoch: int, position: int):
    """The examples of ``epoch`` from ``position`` on (0-based, in this process's
    stream), enumerated with their index in the whole stream. The windows come in an
    order drawn from (seed, epoch); each window is shuffled whole with a seed from
    (seed, epoch, window). Starting at any position reads one window at most before
    the first example: a resume costs what a fresh start costs."""
    tf = self._tf
    per_epoch = self.steps_per_epoch * self.layout.local_batch_size
    windows = self._window_bounds()
    order = np.random.default_rng([self._seed, _WINDOW_ORDER_STREAM, epoch]).permutation(
        len(windows))
    parts, start = [], 0
    for w in order:
      a, b = windows[w]
      if start + (b - a) > position and start < per_epoch:
        ds = self._load(f"train[{a}:{b}]", shuffle_files=False).take(b - a)
        window_seed = int(np.random.default_rng(
            [self._seed, _WINDOW_SHUFFLE_STREAM, epoch, int(w)]).integers(2**31))
        ds = ds.shuffle(b - a, seed=window_seed, reshuffle_each_iteration=False)
        parts.append(ds.skip(max(position - start, 0)))
      start += b - a
    ds = parts[0]
    for part in parts[1:]:
      ds = ds.concatenate(part)
    ds = ds.take(per_epoch - position)  # the epoch's remainder is dropped, as before
    return ds.enumerate(start=epoch * per_epoch + position)

  def train_batches(self, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
    if start_step < 0:
      raise ValueError(f"start_step={start_step} must be >= 0")
    tf = self._tf
    local = self.layout.local_batch_size
    pi, pc = self.layout.process_index, self.layout.process_count
    spe = self.steps_per_epoch

    def prepare(index, example):
      seed = tf.stack([tf.constant(self._seed, tf.int64), index * pc + pi])
      if self._augment:
        image = self._train_image(example["image"], seed)
      else:
        image = self._eval_image(example["image"])
      return {"image": image, "label": tf.cast(example["label"], tf.int32)}

    epoch, step_in_epoch = divmod(start_step, spe)
    position = step_in_epoch * local
    while True:  # an epoch holds whole batches: no batch spans two epochs
      ds = self._epoch(epoch, position)
      ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
      ds = ds.batch(local, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
      yield from self._tfds.as_numpy(ds)
      epoch, position = epoch + 1, 0

  def eval_batches(self, split: str) -> Iterator[dict[str, np.ndarray]]:
    check_eval_split(self.info, split)
    tf = self._tf
    local = self.layout.local_eval_batch_size
    total = self.info.num_val if split == "val" else self.info.num_test
    # Every process must run the same number of eval steps: pad each part of
    # the split up to the batches needed by the largest part.
    num_batches = math.ceil(math.ceil(total / self.layout.process_count) / local)
    ds = self._load(self._process_split(self._splits[split], False), shuffle_files=False)
    ds = ds.map(lambda ex: {"image": self._eval_image(ex["image"]),
                            "label": tf.cast(ex["label"], tf.int32),
                            "mask": tf.constant(True)},
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    padding = tf.data.Dataset.from_tensors({
        "image": tf.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), tf.float32),
        "label": tf.constant(0, tf.int32), "mask": tf.constant(False)}).repeat()
    ds = ds.concatenate(padding).take(num_batches * local).batch(local)
    yield from self._tfds.as_numpy(ds.prefetch(tf.data.AUTOTUNE))
