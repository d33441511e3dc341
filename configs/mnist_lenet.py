"""LeNet-300-100 on the full tfds MNIST (55k/5k/10k); ``--config.model=lenet5`` for LeNet-5.

Needs MNIST prepared by tfds (``tfds build mnist``); see README.
"""

from rigl_jax import config as config_lib


def get_config():
  c = config_lib.base_config()
  c.model = "lenet_300_100"
  c.dataset = "mnist"
  c.method = "rigl"
  c.distribution = "erk"
  c.sparsity = 0.9
  c.batch_size = 100
  c.num_epochs = 30                  # 16,500 steps
  c.learning_rate = 0.1
  c.lr_drop_steps = (8_000, 13_000)
  c.lr_drop_factor = 0.1
  c.weight_decay = 1e-4
  c.update_every = 100
  return c
