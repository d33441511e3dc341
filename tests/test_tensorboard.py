"""TensorBoard events written without TensorFlow, read back with it."""

import glob

import pytest

from rigl_jax import tensorboard
from rigl_jax import train
from test_train import small_config


def test_crc32c_known_value():
  assert tensorboard.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value


def read_scalars(tf, path):
  seen, starts = {}, []
  for record in tf.data.TFRecordDataset(path):  # checks every record's CRCs
    event = tf.compat.v1.Event.FromString(record.numpy())
    if event.HasField("session_log"):
      starts.append((event.step, event.session_log.status))
    for value in event.summary.value:
      seen.setdefault(value.tag, []).append((event.step, value.simple_value))
  return seen, starts


def test_trainer_events_readable_by_tensorflow(tmp_path):
  tf = pytest.importorskip("tensorflow")
  train.train_and_evaluate(small_config(num_train_steps=20, eval_every=10), str(tmp_path))
  files = glob.glob(str(tmp_path / "tensorboard" / "events.out.tfevents.*"))
  assert len(files) == 1
  seen, starts = read_scalars(tf, files[0])
  assert not starts  # a fresh run purges nothing
  assert [step for step, _ in seen["loss"]] == [10, 20]
  assert seen["learning_rate"][0][1] == pytest.approx(0.1)
  assert 0.0 < seen["global_density"][0][1] < 0.2
  # Validation during training and at the end, test at the end, per-layer densities.
  assert [step for step, _ in seen["val/accuracy"]] == [10, 20]
  assert [step for step, _ in seen["test/accuracy"]] == [20]
  assert seen["density/fc1/kernel"][0][1] < 0.2 and "density/fc1/bias" not in seen
  assert "flops_total" not in seen and "flops_steps" not in seen


@pytest.mark.slow
def test_resumed_run_purges_points_from_its_resume_step(tmp_path):
  tf = pytest.importorskip("tensorflow")
  c = dict(num_train_steps=20, checkpoint_every=10)
  train.train_and_evaluate(small_config(**dict(c, num_train_steps=10)), str(tmp_path))
  train.train_and_evaluate(small_config(**dict(c, overwrite=True)), str(tmp_path))
  files = sorted(glob.glob(str(tmp_path / "tensorboard" / "events.out.tfevents.*")))
  assert len(files) == 2
  _, starts = read_scalars(tf, files[-1])
  assert starts == [(10, tf.compat.v1.SessionLog.START)]


@pytest.mark.slow
def test_hparams_of_the_run_read_by_tensorboards_hparams_plugin(tmp_path):
  """The HParams tab's data: the plugin's own parser reads the session start."""
  pytest.importorskip("tensorboard")
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=import-outside-toplevel
  from tensorboard.plugins.hparams import metadata  # pylint: disable=import-outside-toplevel
  c = small_config(num_train_steps=10, method="set", sparsity=0.8, seed=3)
  train.train_and_evaluate(c, str(tmp_path / "run"))
  acc = event_accumulator.EventAccumulator(str(tmp_path / "run" / "tensorboard"),
                                           size_guidance={event_accumulator.TENSORS: 0})
  acc.Reload()
  content = acc.PluginTagToContent("hparams")
  assert list(content) == [metadata.SESSION_START_INFO_TAG]
  info = metadata.parse_session_start_info_plugin_data(content[metadata.SESSION_START_INFO_TAG])
  hparams = {k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind"))
             for k, v in info.hparams.items()}
  assert set(hparams) == set(train.HPARAMS)
  assert hparams["method"] == "set" and hparams["distribution"] == c.distribution
  assert hparams["sparsity"] == pytest.approx(0.8) and hparams["seed"] == 3
  assert hparams["learning_rate"] == pytest.approx(c.learning_rate)
  assert info.group_name == "run"
  assert "loss" in acc.Tags()["scalars"]  # the metrics the tab infers from the scalars
