"""Test options: ``--run-slow`` runs the long fault-injection and multi-device tests
(CI does); without it they are skipped, so the default suite stays short."""

import contextlib
import glob
import os
import tempfile

import pytest


def pytest_addoption(parser):
  parser.addoption("--run-slow", action="store_true",
                   help="also run the tests marked slow (as CI does)")


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: a long run; skipped unless --run-slow")


def pytest_collection_modifyitems(config, items):
  if config.getoption("--run-slow"):
    return
  skip = pytest.mark.skip(reason="slow: run with --run-slow (CI does)")
  for item in items:
    if "slow" in item.keywords:
      item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _remove_empty_tfds_tempdirs():
  """tfds' DatasetInfo.initialize_from_bucket makes a mkdtemp('tfds') directory that it
  leaves behind empty (tfds.testing.mock_data reaches it); remove the new empty ones."""
  pattern = os.path.join(tempfile.gettempdir(), "tmp*tfds")
  before = set(glob.glob(pattern))
  yield
  for path in set(glob.glob(pattern)) - before:
    with contextlib.suppress(OSError):
      os.rmdir(path)  # only an empty directory goes
