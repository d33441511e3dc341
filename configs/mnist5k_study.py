"""The CPU-scale study committed under results/: LeNet-300-100 on mnist5k.

60 epochs of 35 steps (batch 100), lr 0.1 dropped x0.2 at 50% and 83%, weight decay
1e-4, dT 50, alpha 0.3, T_end 75%, with uniform covering every layer: an MLP's first
layer holds 88% of its weights, so keeping it dense (the conv-net convention) would
leave a "90% sparse" uniform net at 10% sparsity. (The quickstart's settings when
the study was run; the quickstart has since been shortened to 20 epochs.)

    python -m rigl_jax.launch.sweep --config=configs/mnist5k_study.py --sweep_dir=runs/mnist5k --concurrency=2
    python -m rigl_jax.launch.report --sweep_dir=runs/mnist5k --out=results/mnist5k
"""

from rigl_jax import config as config_lib

# The report's pruning (global magnitude pruning of every kernel; configs/
# cifar10_wrn22_2.py), its start (step 700 of 87,750) and CIFAR-10 warm-up (3,500
# steps) scaled to this run's 2,100 steps: 17 and 84. T_end stays at 75%.
# The MLP's first layer holds most of its weights: unlike the report's conv
# nets (whose pruning rows keep the stem dense) it is pruned too.
PRUNING = dict(config_lib.PRUNING_BASELINE, start_step=17, warmup_steps=84,
               uniform_first_layer_dense=False)


def get_config():
  c = config_lib.base_config()
  c.model = "lenet_300_100"
  c.dataset = "mnist5k"
  c.method = "rigl"
  c.distribution = "erk"
  c.sparsity = 0.9
  c.batch_size = 100
  c.num_epochs = 60
  c.learning_rate = 0.1
  c.lr_drop_steps = (1050, 1750)   # 50% and 83% of 2,100 steps
  c.weight_decay = 1e-4
  c.update_every = 50
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
