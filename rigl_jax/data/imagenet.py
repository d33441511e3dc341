"""ImageNet (tfds `imagenet2012`), streamed with tf.data: too big for memory.

Needs TensorFlow (`pip install 'rigl_jax[tf]'`), imported only when this
pipeline is built. Splits: train = `train[:-V]`, val = `train[-V:]` (V =
validation_size, 10,000 by default), test = tfds' `validation` (50,000).

Multi-host: each process reads its own contiguous part of a split
(`tfds.split_for_jax_process`), so the global batch is the concatenation of the
local batches in process order, as for the in-memory pipeline, but the rows of
a global batch are not the same examples as with another process count.

Determinism and resume: file order (`ReadConfig(shuffle_seed=seed)`) and the
example shuffle buffer are seeded, tf.data runs deterministically, and the
augmentation of the example at position `i` of this process's stream uses the
stateless seed (seed, i * process_count + process_index). Resuming at step k
skips the first `k * local_batch` raw records before any decoding, so the
stream matches the one that was interrupted; the skip still reads those
records (minutes for a late step of a long run).
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
SHUFFLE_BUFFER = 16_384  # examples; about 2 GB of encoded JPEGs per process
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

  def train_batches(self, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
    if start_step < 0:
      raise ValueError(f"start_step={start_step} must be >= 0")
    tf = self._tf
    local = self.layout.local_batch_size
    pi, pc = self.layout.process_index, self.layout.process_count
    ds = self._load(self._process_split(self._splits["train"], True), shuffle_files=True)
    ds = ds.repeat().shuffle(SHUFFLE_BUFFER, seed=self._seed,
                             reshuffle_each_iteration=True)
    ds = ds.enumerate().skip(start_step * local)  # skip before decoding: cheap

    def prepare(index, example):
      seed = tf.stack([tf.constant(self._seed, tf.int64), index * pc + pi])
      if self._augment:
        image = self._train_image(example["image"], seed)
      else:
        image = self._eval_image(example["image"])
      return {"image": image, "label": tf.cast(example["label"], tf.int32)}

    ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(local, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    yield from self._tfds.as_numpy(ds)

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
