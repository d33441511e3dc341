"""``python -m rigl_jax.flops``: a config's FLOPs without training."""

import json
import os
import subprocess
import sys

import pytest

from rigl_jax import config as config_lib
from rigl_jax import flops

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def wrn_config(**overrides):
  c = config_lib.base_config()
  c.model, c.dataset = "wrn_22_2", "cifar10"
  for k, v in overrides.items():
    c[k] = v
  return c


@pytest.mark.parametrize("distribution, sparsity, test_mult", [
    ("erk", 0.9, 0.17), ("erk", 0.8, 0.35), ("uniform", 0.9, 0.10), ("uniform", 0.8, 0.20)])
def test_report_table2_test_multipliers(distribution, sparsity, test_mult):
  out = flops.config_flops(wrn_config(distribution=distribution, sparsity=sparsity))
  assert out["dense_forward_flops"] == pytest.approx(3.15e8, rel=0.01)
  assert out["test_multiplier"] == pytest.approx(test_mult, abs=0.01)


def test_command_line_prints_json():
  result = subprocess.run(
      [sys.executable, "-m", "rigl_jax.flops", f"--config={REPO}/configs/quickstart.py",
       "--config.sparsity=0.8"], capture_output=True, text=True, timeout=300, check=True)
  out = json.loads(result.stdout)
  for key in ("dense_forward_flops", "sparse_forward_flops", "test_multiplier",
              "train_multiplier", "layers"):
    assert key in out
  assert {l["path"] for l in out["layers"]} == {"fc1/kernel", "fc2/kernel", "head/kernel"}
  assert out["sparse_forward_flops"] < 0.3 * out["dense_forward_flops"]
