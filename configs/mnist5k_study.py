"""The CPU-scale study committed under results/: LeNet-300-100 on mnist5k.

The quickstart settings (60 epochs of 35 steps, lr 0.1 dropped x0.2 at 50% and 83%,
dT 50, alpha 0.3, T_end 75%), with uniform covering every layer: an MLP's first
layer holds 88% of its weights, so keeping it dense (the conv-net convention) would
leave a "90% sparse" uniform net at 10% sparsity.

    python -m rigl_jax.launch.sweep --config=configs/mnist5k_study.py --sweep_dir=runs/mnist5k --concurrency=2
    python -m rigl_jax.launch.report --sweep_dir=runs/mnist5k --out=results/mnist5k
"""

import importlib.util
import os

from rigl_jax import config as config_lib

_spec = importlib.util.spec_from_file_location(
    "quickstart", os.path.join(os.path.dirname(os.path.abspath(__file__)), "quickstart.py"))
_quickstart = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_quickstart)


# The report's pruning (global magnitude pruning of every kernel; configs/
# cifar10_wrn22_2.py), its start (step 700 of 87,750) and CIFAR-10 warm-up (3,500
# steps) scaled to this run's 2,100 steps: 17 and 84. T_end stays at 75%.
PRUNING = dict(config_lib.PRUNING_BASELINE, start_step=17, warmup_steps=84)


def get_config():
  c = _quickstart.get_config()
  c.uniform_first_layer_dense = False
  c.log_every = 350
  c.checkpoint_every = 2100
  return c


def sweep():
  runs = []
  for seed in range(3):
    runs.append(dict(method="dense", sparsity=0.0, seed=seed))
    for sparsity in (0.8, 0.9, 0.95, 0.98):
      for method in ("static", "set", "rigl"):
        for distribution in ("uniform", "erk"):
          runs.append(dict(method=method, distribution=distribution, sparsity=sparsity,
                           seed=seed))
      for method in ("snfs", "small_dense"):
        runs.append(dict(method=method, distribution="erk", sparsity=sparsity, seed=seed))
      runs.append(dict(PRUNING, sparsity=sparsity, seed=seed))
      runs.append(dict(method="rigl", distribution="erk", sparsity=sparsity, seed=seed,
                       train_multiplier=2.0))
  return runs
