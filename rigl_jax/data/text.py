"""Character-level language-modelling data: bytes in, the next byte out.

The vocabulary is the 256 byte values of the UTF-8 text (no tokenizer, nothing
to fit), so "bits per character" is bits per byte, as in byte-level WikiText-103
and enwik8 results.

Two corpora:

* ``pystdlib``: the installed Python standard library's top-level modules
  (``<stdlib>/*.py``, 168 files and 4.7 MB for CPython 3.11.7): real text present
  on every machine that runs rigl_jax, no download. Each file goes to test, val
  or train by a hash of its name (1/20, 1/20, the rest), so every split is whole
  files. Another Python version gives another corpus: ``DataInfo.corpus_digest``
  (SHA-256 of the three splits) is recorded in ``summary.json``.
* ``wikitext103``: WikiText-103's raw character-level files, read from
  ``data_dir`` (``wiki.train.raw``, ``wiki.valid.raw``, ``wiki.test.raw`` of
  ``wikitext-103-raw-v1.zip``, unzipped). Nothing is downloaded; tfds (4.9.10)
  has no WikiText builder to read it from instead.

Training examples are windows of ``sequence_length + 1`` bytes at offsets drawn
from ``default_rng([seed, 2, step])``: a pure function of (seed, step), so a
resumed run reads exactly the batches an uninterrupted one would. Each process
takes its rows of the global batch. Evaluation predicts every byte of a split
but its first exactly once: consecutive windows of ``sequence_length`` (the last
one padded, its padding masked), batched and split over processes like the
image sets' eval batches.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sysconfig
from typing import Iterator

import numpy as np

from rigl_jax.data.base import BatchLayout, DataInfo, Pipeline, check_eval_split

VOCAB_SIZE = 256
TEXT_DATASETS = ("pystdlib", "wikitext103")
WIKITEXT103_FILES = {"train": "wiki.train.raw", "val": "wiki.valid.raw",
                     "test": "wiki.test.raw"}
_TRAIN_STREAM = 2  # keeps these offsets apart from the image sets' streams


def _split_of(name: str) -> str:
  bucket = int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little") % 20
  return "test" if bucket == 0 else "val" if bucket == 1 else "train"


@functools.lru_cache(maxsize=None)
def pystdlib() -> dict[str, np.ndarray]:
  """The installed standard library's top-level modules as uint8 arrays per split."""
  stdlib = sysconfig.get_paths()["stdlib"]
  names = sorted(n for n in os.listdir(stdlib) if n.endswith(".py"))
  parts: dict[str, list[bytes]] = {"train": [], "val": [], "test": []}
  for name in names:
    with open(os.path.join(stdlib, name), "rb") as f:
      parts[_split_of(name)].append(f.read())
  if not all(parts.values()):
    raise FileNotFoundError(f"dataset 'pystdlib': too few modules in {stdlib} to fill the "
                            f"train, val and test splits")
  return {split: np.frombuffer(b"".join(texts), np.uint8) for split, texts in parts.items()}


def wikitext103(data_dir: str | None) -> dict[str, np.ndarray]:
  """WikiText-103's raw files from ``data_dir`` as uint8 arrays per split."""
  if not data_dir:
    raise FileNotFoundError(
        "dataset 'wikitext103' is read from local files: set data_dir to the folder "
        "holding wiki.train.raw, wiki.valid.raw and wiki.test.raw (wikitext-103-raw-v1.zip, "
        "unzipped)")
  root = os.path.expanduser(data_dir)
  splits = {}
  for split, name in WIKITEXT103_FILES.items():
    path = os.path.join(root, name)
    try:
      splits[split] = np.fromfile(path, np.uint8)
    except OSError as e:
      raise FileNotFoundError(
          f"dataset 'wikitext103': cannot read {path}: {e.strerror or e}; data_dir must hold "
          f"wiki.train.raw, wiki.valid.raw and wiki.test.raw") from None
    if splits[split].size < 2:
      raise FileNotFoundError(f"dataset 'wikitext103': {path} is empty")
  return splits


def load_corpus(name: str, data_dir: str | None = None) -> dict[str, np.ndarray]:
  if name == "pystdlib":
    return pystdlib()
  if name == "wikitext103":
    return wikitext103(data_dir)
  raise ValueError(f"unknown text dataset {name!r}; one of {TEXT_DATASETS}")


def corpus_digest(splits: dict[str, np.ndarray]) -> str:
  digest = hashlib.sha256()
  for split in ("train", "val", "test"):
    digest.update(splits[split].tobytes())
  return digest.hexdigest()


class TextPipeline(Pipeline):
  """Next-byte prediction batches: ``{"image": int32 [local_batch, L], "label": int32
  [local_batch, L]}`` for training; eval batches add ``"mask"`` (bool, same shape).

  ``info.num_train`` counts the training windows that fit in the train split
  without overlap, so an epoch is about one pass over the text.
  """

  def __init__(self, name: str, splits: dict[str, np.ndarray], layout: BatchLayout,
               seed: int, sequence_length: int, use_validation: bool = True):
    length = int(sequence_length)
    if length < 1:
      raise ValueError(f"sequence_length={length} must be >= 1")
    if splits["train"].size < length + 1:
      raise ValueError(f"sequence_length={length} is longer than the {splits['train'].size} "
                       f"bytes of the train split")
    self._splits = dict(splits)
    if not use_validation:
      self._splits["val"] = np.zeros([0], np.uint8)
    self._seed = seed
    self.sequence_length = length
    self.layout = layout
    # Eval windows: every byte but the first is a label once, the last window padded.
    eval_windows = {s: -(-max(self._splits[s].size - 1, 0) // length) for s in ("val", "test")}
    self.info = DataInfo(name=name, num_classes=VOCAB_SIZE, input_shape=(length,),
                         num_train=(splits["train"].size - 1) // length,
                         num_val=eval_windows["val"], num_test=eval_windows["test"],
                         sequence_length=length, corpus_digest=corpus_digest(splits))
    if self.steps_per_epoch < 1:
      raise ValueError(f"global_batch_size={layout.global_batch_size} is larger than the "
                       f"{self.info.num_train} train windows of dataset {name!r}")

  def train_batches(self, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
    text, length = self._splits["train"], self.sequence_length
    rows = self.layout.local_rows(self.layout.local_batch_size)
    offsets_in_window = np.arange(length + 1)
    step = start_step
    while True:
      rng = np.random.default_rng([self._seed, _TRAIN_STREAM, step])
      starts = rng.integers(0, text.size - length, size=self.layout.global_batch_size)
      windows = text[starts[rows, None] + offsets_in_window].astype(np.int32)
      yield {"image": windows[:, :-1], "label": windows[:, 1:]}
      step += 1

  def eval_batches(self, split: str) -> Iterator[dict[str, np.ndarray]]:
    check_eval_split(self.info, split)
    text, length = self._splits[split], self.sequence_length
    count = self.info.num_val if split == "val" else self.info.num_test
    batch = self.layout.eval_batch_size
    rows = self.layout.local_rows(self.layout.local_eval_batch_size)
    for first in range(0, count, batch):
      index = np.arange(first, first + batch)[rows]
      positions = index[:, None] * length + np.arange(length + 1)
      valid = positions < text.size
      windows = np.where(valid, text[np.minimum(positions, text.size - 1)], 0).astype(np.int32)
      yield {"image": windows[:, :-1], "label": windows[:, 1:], "mask": valid[:, 1:]}
