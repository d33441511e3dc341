"""WRN-22-2 on CIFAR-10, the report's settings (Table 2).

SGD Nesterov momentum 0.9, lr 0.1 dropped x0.2 at steps 30k and 60k, weight decay
5e-4 on kernels, batch 128, 250 epochs, 45k/5k/10k split, pad-4 crop + flip;
RigL alpha 0.3, dT 100, T_end at 75% of training.
"""

from rigl_jax import config as config_lib


def get_config():
  c = config_lib.base_config()
  c.model = "wrn_22_2"
  c.dataset = "cifar10"
  c.validation_size = 5000
  c.method = "rigl"
  c.distribution = "erk"
  c.sparsity = 0.9
  c.update_every = 100
  c.drop_fraction = 0.3
  c.end_fraction = 0.75
  c.batch_size = 128
  c.num_epochs = 250
  c.learning_rate = 0.1
  c.lr_drop_steps = (30_000, 60_000)
  c.lr_drop_factor = 0.2
  c.momentum = 0.9
  c.nesterov = True
  c.weight_decay = 5e-4
  c.label_smoothing = 0.0
  c.eval_every = 5000
  return c


def sweep():
  """The report's Table 2 grid (launch/ expands it; one workdir per entry)."""
  return config_lib.report_table_grid()
