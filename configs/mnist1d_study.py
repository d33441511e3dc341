"""The second CPU-scale study: LeNet-300-100 on mnist1d_50k (35,000 train examples).

mnist5k fits its 3,500 train images by 30% of training, so it cannot test the
report's claims about training longer. mnist1d with 50,000 generated samples
(40-dim signals, 10 classes; `rigl_jax.data.builtin`) is harder and large enough
that a dense MLP still gains from 20 to 40 epochs. Settings: 20 epochs of 273
steps (batch 128), lr 0.1 dropped x0.2 at 50% and 83%, weight decay 1e-4, the
report's dT 100 and alpha 0.3, T_end 75%, ERK over every layer. Rows: dense 1x/2x,
Static, SET, RigL 1x/2x (ERK) and the report's pruning, at 80/90/95%, 3 seeds.

    python -m rigl_jax.launch.sweep --config=configs/mnist1d_study.py --sweep_dir=runs/mnist1d --concurrency=2
    python -m rigl_jax.launch.report --sweep_dir=runs/mnist1d --out=results/mnist1d
"""

from rigl_jax import config as config_lib

STEPS = 20 * 273

# The report's pruning (configs/cifar10_wrn22_2.py): global magnitude pruning of
# every kernel; its start (700 of 87,750 steps) and warm-up (3,500) scaled to 5,460
# steps: 44 and 218.
# The MLP's first layer holds most of its weights: unlike the report's conv
# nets (whose pruning rows keep the stem dense) it is pruned too.
PRUNING = dict(config_lib.PRUNING_BASELINE, start_step=44, warmup_steps=218,
               uniform_first_layer_dense=False)


def get_config():
  c = config_lib.base_config()
  c.model = "lenet_300_100"
  c.dataset = "mnist1d_50k"
  c.method = "rigl"
  c.distribution = "erk"
  c.uniform_first_layer_dense = False
  c.sparsity = 0.9
  c.batch_size = 128
  c.num_epochs = 20
  c.learning_rate = 0.1
  c.lr_drop_steps = (STEPS // 2, STEPS * 5 // 6)
  c.weight_decay = 1e-4
  c.update_every = 100
  c.log_every = 546
  c.eval_every = 1365
  c.checkpoint_every = 2730
  return c


def sweep():
  runs = []
  for seed in range(3):
    for multiplier in (1.0, 2.0):
      runs.append(dict(method="dense", sparsity=0.0, train_multiplier=multiplier, seed=seed))
    for sparsity in (0.8, 0.9, 0.95):
      for method in ("static", "set", "rigl"):
        runs.append(dict(method=method, distribution="erk", sparsity=sparsity, seed=seed))
      runs.append(dict(method="rigl", distribution="erk", sparsity=sparsity,
                       train_multiplier=2.0, seed=seed))
      runs.append(dict(PRUNING, sparsity=sparsity, seed=seed))
  return runs
