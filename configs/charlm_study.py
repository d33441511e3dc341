"""The CPU-scale character-level LM study: RigL against the methods of the RigL
paper's section 4.3 (Static, SET, pruning, dense, Small-Dense) on the built-in
``pystdlib`` corpus.

configs/charlm_cpu.py shortened to 1,000 steps (batch 32 of 64 characters, about
2M characters, half an epoch of the corpus): a small GRU (embedding 64, 256 units,
readout 128 and 64), Adam 2e-3 dropped x0.3 at 50% and 75%, clipping at norm 1,
dT 100, alpha 0.3, T_end 75%, ERK over every matrix but the shared embedding
(dense). Pruning: gradual magnitude pruning of each layer to the same ERK
targets, from step 100 to step 750 (T_end), every 100 steps. Rows: dense,
and Small-Dense, Static, SET, RigL, pruning at 75% and 90%, plus RigL trained 3x
longer at 90% and 2x at 75% (about pruning's training FLOPs), 3 seeds (39 runs,
about 45 minutes on 2 cores with --concurrency=2). Test split only (no
validation) to keep the runs short.

    python -m rigl_jax.launch.sweep --config=configs/charlm_study.py --sweep_dir=runs/charlm --concurrency=2
    python -m rigl_jax.launch.report --sweep_dir=runs/charlm --out=results/charlm
"""

import importlib.util
import os

_spec = importlib.util.spec_from_file_location(
    "charlm_cpu", os.path.join(os.path.dirname(os.path.abspath(__file__)), "charlm_cpu.py"))
_charlm_cpu = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_charlm_cpu)

STEPS = 1000


def get_config():
  c = _charlm_cpu.get_config()
  c.num_train_steps = STEPS
  c.lr_drop_steps = (STEPS // 2, STEPS * 3 // 4)
  c.validation_size = 0
  c.eval_every = 0
  c.checkpoint_every = STEPS
  c.start_step = 0
  return c


def sweep():
  runs = []
  for seed in range(3):
    runs.append(dict(method="dense", sparsity=0.0, seed=seed))
    for sparsity in (0.75, 0.9):
      for method in ("small_dense", "static", "set", "rigl"):
        runs.append(dict(method=method, sparsity=sparsity, seed=seed))
      runs.append(dict(method="pruning", sparsity=sparsity, start_step=100, seed=seed))
    # RigL trained longer, to the training FLOPs of pruning (0.42x at 90%, 0.52x at 75%).
    runs.append(dict(method="rigl", sparsity=0.9, train_multiplier=3.0, seed=seed))
    runs.append(dict(method="rigl", sparsity=0.75, train_multiplier=2.0, seed=seed))
  return runs
