"""TensorBoard events written without TensorFlow, read back with it."""

import glob

import pytest

from rigl_jax import tensorboard
from rigl_jax import train
from test_train import small_config


def test_crc32c_known_value():
  assert tensorboard.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value


def test_trainer_events_readable_by_tensorflow(tmp_path):
  tf = pytest.importorskip("tensorflow")
  train.train_and_evaluate(small_config(num_train_steps=20), str(tmp_path))
  files = glob.glob(str(tmp_path / "tensorboard" / "events.out.tfevents.*"))
  assert len(files) == 1
  seen = {}
  for record in tf.data.TFRecordDataset(files[0]):  # checks every record's CRCs
    event = tf.compat.v1.Event.FromString(record.numpy())
    for value in event.summary.value:
      seen.setdefault(value.tag, []).append((event.step, value.simple_value))
  assert [step for step, _ in seen["loss"]] == [10, 20]
  assert seen["learning_rate"][0][1] == pytest.approx(0.1)
  assert 0.0 < seen["global_density"][0][1] < 0.2
