"""CIFAR ResNet-50 on CIFAR-100, the report's settings (Table 3).

SGD Nesterov momentum 0.9, lr 0.1 with a 1,760-step linear warm-up, x0.2 every
20k steps, weight decay 1e-4 on kernels, label smoothing 0.1, batch 128, 250
epochs, 45k/5k/10k split, random-resized crop + flip; RigL alpha 0.3, dT 100,
T_end at 75% of training. Sources below are files of the report's PyTorch code
(varun19299/rigl-reproducibility @97443be); README's "Fidelity" table lists them all.
"""

from rigl_jax import config as config_lib

# The report's pruning rows (Table 3 "Pruning"): global magnitude pruning of every
# kernel from step 700 to 65,918 every 100 steps (conf/specific/
# cifar100_resnet50_pruning.yaml l.17-19; its warm-up, l.39, is every run's).
PRUNING = dict(config_lib.PRUNING_BASELINE, start_step=700, end_step=65_918,
               update_every=100)


def get_config():
  c = config_lib.base_config()
  c.model = "resnet50_cifar"
  c.dataset = "cifar100"
  c.validation_size = 5000
  c.augmentation = "default"                 # RandomResizedCrop(32) + flip: data.py l.93-94
  c.method = "rigl"
  c.distribution = "erk"
  c.sparsity = 0.9
  c.update_every = 100
  c.drop_fraction = 0.3
  c.end_fraction = 0.75
  c.batch_size = 128
  c.num_epochs = 250                         # 87,750 steps
  c.learning_rate = 0.1
  # conf/specific/cifar100_resnet50_masking.yaml l.30 (the report's text says 2 epochs).
  c.warmup_steps = 1760
  c.lr_drop_steps = (20_000, 40_000, 60_000, 80_000)   # decay_frequency 20000, l.29
  c.lr_drop_factor = 0.2
  c.lr_drops_after_warmup = True   # StepLR starts after the warm-up: 21,760, 41,760, ...
  c.momentum = 0.9
  c.nesterov = True
  c.weight_decay = 1e-4
  c.label_smoothing = 0.1
  c.eval_every = 5000
  return c


def sweep():
  """The report's Table 3 grid (rigl_jax.launch expands it; one workdir per entry)."""
  return config_lib.report_table_grid(config_lib.TABLE3_ROWS, pruning=PRUNING)
