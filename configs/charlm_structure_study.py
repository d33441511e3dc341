"""What structure costs in bits per character: char_gru_small on pystdlib (issue 17).

The settings of configs/charlm_study.py (1,000 steps of 32 x 64 characters, Adam
2e-3, clipping at 1, dT 100, alpha 0.3, T_end 75%, ERK over every matrix but the
dense embedding). The grid of configs/mnist1d_structure_study.py: RigL
unstructured, constant fan-in and SRigL at 90% and 95%, RigL 2:4 against
unstructured at 50%; 3 seeds, 24 runs, about 40 minutes on 2 cores.

    python -m rigl_jax.launch.sweep --config=configs/charlm_structure_study.py --sweep_dir=runs/charlm_structure --concurrency=2
    python -m rigl_jax.launch.report --sweep_dir=runs/charlm_structure --out=results/charlm_structure
"""

import importlib.util
import os

_here = os.path.dirname(os.path.abspath(__file__))


def _load(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(_here, f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config():
  return _load("charlm_study").get_config()


def sweep():
  return _load("mnist1d_structure_study").structure_runs()
