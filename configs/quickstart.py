"""README's main job: LeNet-300-100 on the built-in mnist5k, RigL, ERK, 90% sparse.

20 epochs of 35 steps, about 10 s on 2 CPU cores (RigL 91.70% test accuracy, dense
93.90%: ``--config.method=dense``), with validation every 4 epochs in metrics.jsonl.
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
  c.num_epochs = 20
  c.learning_rate = 0.1
  c.lr_drop_steps = (350, 583)     # 50% and 83% of 700 steps
  c.weight_decay = 1e-4
  c.update_every = 50
  c.log_every = 100
  c.eval_every = 140               # a validation curve in metrics.jsonl
  c.checkpoint_every = 500
  return c
