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


def mlp_config(**overrides):
  c = config_lib.base_config()
  c.model, c.dataset = "lenet_300_100", "mnist5k"
  c.num_train_steps = 50
  for k, v in overrides.items():
    c[k] = v
  return c


def test_pruning_train_flops_average_the_schedule_step_by_step():
  """Brute force: each step's densities from the cubic schedule, averaged."""
  from rigl_jax import masks, schedules  # pylint: disable=import-outside-toplevel
  c = mlp_config(method="pruning", distribution="uniform", uniform_first_layer_dense=False,
                 sparsity=0.9, update_every=10, start_step=5, end_step=35)
  out = flops.config_flops(c)
  sizes = {"fc1/kernel": 784 * 300, "fc2/kernel": 300 * 100, "head/kernel": 100 * 10}
  prune_at = [5, 15, 25, 35]
  total = 0.0
  for step in range(50):
    done = [t for t in prune_at if t < step]   # a pruning step's mask serves later steps
    sparsity = 0.0 if not done else schedules.polynomial_sparsity(
        done[-1], initial=0.0, final=0.9, start_step=5, end_step=35)
    # MLP layers cost 2 * nnz (+ ReLU and bias terms that do not depend on the mask).
    total += sum(2 * masks.num_active(n, sparsity) for n in sizes.values())
  dense_mults = sum(2 * n for n in sizes.values())
  expected = total / 50 / dense_mults
  constant = out["dense_forward_flops"] - dense_mults  # per-output terms
  assert (out["mean_sparse_forward_flops"] - constant) / dense_mults == pytest.approx(expected)
  assert out["test_multiplier"] == pytest.approx(0.1, abs=0.005)


def test_lottery_counts_its_pruning_run(tmp_path):
  pruning = mlp_config(method="pruning_global", distribution="uniform",
                       uniform_first_layer_dense=False, sparsity=0.9, update_every=10)
  pruning_cost = flops.config_flops(pruning)["train_multiplier"]
  # No source run yet: the report's pruning on this config.
  lottery = mlp_config(method="lottery", distribution="uniform",
                       uniform_first_layer_dense=False, sparsity=0.9, update_every=10,
                       source_workdir=str(tmp_path / "source"))
  out = flops.config_flops(lottery)
  assert out["source_train_multiplier"] == pytest.approx(pruning_cost)
  assert out["train_multiplier"] == pytest.approx(pruning_cost + out["test_multiplier"])
  # A source config (not yet run): its own settings.
  os.makedirs(tmp_path / "source")
  source = mlp_config(method="pruning", sparsity=0.9, update_every=10, start_step=20)
  (tmp_path / "source" / "config.json").write_text(source.to_json())
  out = flops.config_flops(lottery)
  assert out["source_train_multiplier"] == pytest.approx(
      flops.config_flops(source)["train_multiplier"])
  assert out["source_train_multiplier"] != pytest.approx(pruning_cost)
  # A finished source: its measured figure.
  (tmp_path / "source" / "summary.json").write_text(json.dumps({"train_flops_multiplier": 0.5}))
  out = flops.config_flops(lottery)
  assert out["source_train_multiplier"] == 0.5
  assert out["train_multiplier"] == pytest.approx(0.5 + out["test_multiplier"])


@pytest.mark.parametrize("config_file", ["cifar10_wrn22_2.py", "cifar100_resnet50.py"])
def test_report_grids_prune_globally_from_step_700(config_file):
  from rigl_jax.launch import grid  # pylint: disable=import-outside-toplevel
  module = grid.load_config_module(os.path.join(REPO, "configs", config_file))
  rows = [r for r in module.sweep() if "pruning" in r["method"]]
  assert len(rows) == 4 * 3
  for row in rows:
    assert row["method"] == "pruning_global"
    # The stem stays dense: PT Pruning.yaml l.4 `sparse_init: random` (random_init
    # skips the first layer), TF prune_first_layer=False.
    assert row["distribution"] == "uniform" and row["uniform_first_layer_dense"] is True
    assert (row["start_step"], row["end_step"], row["update_every"]) == (700, 65_918, 100)
  c = module.get_config()
  c.update({k: v for k, v in rows[0].items()})
  layers = flops.config_flops(c)["layers"]
  assert layers[0]["density"] == 1.0 and all(l["density"] < 1.0 for l in layers[1:-1])
  warmup = config_lib.warmup_steps(c, steps_per_epoch=351)
  # CIFAR-10: makefiles/cifar10.mk's 3,500 steps run as 10 epochs of 352 (3,520).
  assert warmup == (3520 if config_file.startswith("cifar10_") else 1760)
  # The lr drops count from the warm-up's end (PT main.py l.276-277, l.300).
  assert config_lib.lr_drop_steps(c, warmup) == (
      [33_520, 63_520] if config_file.startswith("cifar10_")
      else [21_760, 41_760, 61_760, 81_760])
  # The other rows warm up only on CIFAR-100 (both as the report's code does).
  other = module.get_config()
  assert config_lib.warmup_steps(other, 351) == (0 if config_file.startswith("cifar10_") else 1760)


def test_imagenet_config_is_the_authors():
  """google-research/rigl imagenet_train_eval.py: all 1,281,167 train images, no
  warm-up, lr x0.1 at (fractional) epochs 30, 70, 90 of batch 4096."""
  from rigl_jax.launch import grid  # pylint: disable=import-outside-toplevel
  c = grid.load_config_module(os.path.join(REPO, "configs", "imagenet_resnet50.py")).get_config()
  assert c.validation_size == 0 and c.warmup_steps == 0
  assert c.batch_size == 4096 and c.learning_rate == pytest.approx(0.1 * 4096 / 256)
  epochs = [step * 4096 / 1_281_167 for step in c.lr_drop_steps]
  for step, epoch, target in zip(c.lr_drop_steps, epochs, (30, 70, 90)):
    assert epoch >= target > (step - 1) * 4096 / 1_281_167  # the first step past the epoch


def test_lottery_config_alone_counts_this_configs_pruning_run():
  """`--config.method=lottery` without a source run: the source is this config's
  pruning_global run (the documented fallback), not a traceback."""
  result = subprocess.run(
      [sys.executable, "-m", "rigl_jax.flops", f"--config={REPO}/configs/quickstart.py",
       "--config.method=lottery"], capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  out = json.loads(result.stdout)
  assert out["source"] == "this config with method='pruning_global'"
  assert out["train_multiplier"] == pytest.approx(
      out["retrain_multiplier"] + out["source_train_multiplier"])
  assert out["source_train_multiplier"] > out["retrain_multiplier"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("args, expected", [
    (["--config.sparsity=2"], "error: config.sparsity: must be a number"),
    (["--config.method=magic"], "error: config.method: "),
    (["--config.structure=block:7x7"], "error: config.structure: structure: block:7x7 needs"),
])
def test_bad_input_is_one_error_line(args, expected):
  result = subprocess.run(
      [sys.executable, "-m", "rigl_jax.flops", f"--config={REPO}/configs/quickstart.py", *args],
      capture_output=True, text=True, timeout=300)
  lines = [l for l in result.stderr.splitlines() if l.strip() and l[:1] not in "IW"]
  assert result.returncode == 2, result.stderr[-2000:]
  assert "Traceback" not in result.stderr
  assert lines and lines[-1].startswith(expected), lines
