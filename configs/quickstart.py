"""README's main job: LeNet-300-100 on the built-in mnist5k, RigL, ERK, 90% sparse.

A few minutes on 2 CPU cores. Try ``--config.method=dense`` for the baseline.
"""

from rigl_jax import config as config_lib


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
  c.log_every = 100
  c.checkpoint_every = 500
  return c
