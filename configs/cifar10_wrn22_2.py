"""WRN-22-2 on CIFAR-10, the report's settings (Table 2).

SGD Nesterov momentum 0.9, lr 0.1 dropped x0.2 every 30k steps (30k and 60k within
87,750 steps), weight decay 5e-4 on kernels, batch 128, 250 epochs, 45k/5k/10k
split, reflect-pad-4 crop + flip, dropout 0.3 in every block; RigL alpha 0.3,
dT 100, T_end at 75% of training. README's "Fidelity" table gives the source of
every value; sources below are files of the report's PyTorch code
(varun19299/rigl-reproducibility @97443be).
"""

from rigl_jax import config as config_lib

# The report's pruning rows (Table 2 "Pruning"): global magnitude pruning of every
# kernel, from step 700 to 65,918 every 100 steps (conf/specific/
# cifar10_wrn_22_2_pruning.yaml l.17-19), with an lr warm-up that only the pruning
# runs use: 3,500 steps in makefiles/cifar10.mk l.38, which the code's warm-up
# scheduler runs as 10 epochs of 352 steps, 3,520; the lr drops count from its end
# (lr_drops_after_warmup): 33,520 and 63,520.
PRUNING = dict(config_lib.PRUNING_BASELINE, start_step=700, end_step=65_918,
               update_every=100, warmup_steps=3520)


def get_config():
  c = config_lib.base_config()
  c.model = "wrn_22_2"                       # dropout 0.3: models/__init__.py l.6
  c.dataset = "cifar10"
  c.validation_size = 5000                   # conf/specific/*.yaml validation_split: 0.1
  c.augmentation = "default"                 # reflect pad 4, crop 32, flip: data.py l.58-62
  c.method = "rigl"
  c.distribution = "erk"
  c.sparsity = 0.9
  c.update_every = 100                       # conf/specific/cifar10_wrn_22_2_masking.yaml
  c.drop_fraction = 0.3
  c.end_fraction = 0.75
  c.batch_size = 128
  c.num_epochs = 250
  c.learning_rate = 0.1
  c.lr_drop_steps = (30_000, 60_000)         # StepLR every 30,000 steps (decay_frequency)
  c.lr_drop_factor = 0.2
  c.lr_drops_after_warmup = True             # StepLR starts after the warm-up: main.py l.276-277
  c.momentum = 0.9
  c.nesterov = True
  c.weight_decay = 5e-4
  c.label_smoothing = 0.0
  c.eval_every = 5000
  return c


def sweep():
  """The report's Table 2 grid (rigl_jax.launch expands it; one workdir per entry)."""
  return config_lib.report_table_grid(config_lib.TABLE2_ROWS, pruning=PRUNING)
