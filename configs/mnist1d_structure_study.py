"""What structure costs in accuracy: LeNet-300-100 on mnist1d_50k (issue 17's study).

The settings of configs/mnist1d_study.py (20 epochs of 273 steps, dT 100, alpha 0.3,
T_end 75%, ERK over every layer). Rows, 3 seeds each: RigL unstructured, RigL with
constant fan-in and SRigL (constant fan-in plus neuron ablation, gamma_sal 0.3, the
output layer never ablated) at 90% and 95%; RigL 2:4 against unstructured RigL at
50% (2:4's density). 24 runs, about 4 minutes on 2 cores.

    python -m rigl_jax.launch.sweep --config=configs/mnist1d_structure_study.py --sweep_dir=runs/mnist1d_structure --concurrency=2
    python -m rigl_jax.launch.report --sweep_dir=runs/mnist1d_structure --out=results/mnist1d_structure
"""

import importlib.util
import os

_spec = importlib.util.spec_from_file_location(
    "mnist1d_study", os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                  "mnist1d_study.py"))
_base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_base)


def get_config():
  return _base.get_config()


def structure_runs(seeds=(0, 1, 2)):
  """The study's grid, shared with configs/charlm_structure_study.py."""
  runs = []
  for seed in seeds:
    for sparsity in (0.9, 0.95):
      runs.append(dict(method="rigl", structure="unstructured", sparsity=sparsity, seed=seed))
      runs.append(dict(method="rigl", structure="constant_fan_in", sparsity=sparsity, seed=seed))
      runs.append(dict(method="srigl", structure="constant_fan_in", sparsity=sparsity,
                       seed=seed))
    runs.append(dict(method="rigl", structure="unstructured", sparsity=0.5, seed=seed))
    runs.append(dict(method="rigl", structure="2:4", sparsity=0.5, seed=seed))
  return runs


def sweep():
  return structure_runs()
