"""The CPU-scale study committed under results/: LeNet-300-100 on mnist5k.

The quickstart settings (60 epochs of 35 steps, lr 0.1 dropped x0.2 at 50% and 83%,
dT 50, alpha 0.3, T_end 75%), with uniform covering every layer: an MLP's first
layer holds 88% of its weights, so keeping it dense (the conv-net convention) would
leave a "90% sparse" uniform net at 10% sparsity.

    python -m launch.sweep --config=configs/mnist5k_study.py --sweep_dir=runs/mnist5k --concurrency=2
    python -m launch.report --sweep_dir=runs/mnist5k --out=results/mnist5k
"""

import importlib.util
import os

_spec = importlib.util.spec_from_file_location(
    "quickstart", os.path.join(os.path.dirname(os.path.abspath(__file__)), "quickstart.py"))
_quickstart = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_quickstart)


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
      for method in ("snfs", "pruning", "small_dense"):
        runs.append(dict(method=method, distribution="erk", sparsity=sparsity, seed=seed))
      runs.append(dict(method="rigl", distribution="erk", sparsity=sparsity, seed=seed,
                       train_multiplier=2.0))
  return runs
