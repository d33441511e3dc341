"""ResNet-50 on ImageNet-2012, the RigL paper's settings (Evci et al. 2020).

Batch 4096, 32k steps (about 100 epochs), lr 1.6 with 5 epochs of linear warm-up,
x0.1 at epochs 30, 70 and 90, weight decay 1e-4, label smoothing 0.1; RigL ERK
with alpha 0.3, dT 100 and T_end = 25k steps (first layer kept dense by ERK's loop).
"""

from rigl_jax import config as config_lib

STEPS_PER_EPOCH = 1_271_167 // 4096   # train split after carving 10k validation images


def get_config():
  c = config_lib.base_config()
  c.model = "resnet50_imagenet"
  c.dataset = "imagenet2012"
  c.validation_size = 10_000
  c.dtype = "bfloat16"
  c.method = "rigl"
  c.distribution = "erk"
  c.sparsity = 0.8
  c.update_every = 100
  c.drop_fraction = 0.3
  c.end_step = 25_000
  c.batch_size = 4096
  c.eval_batch_size = 1000
  c.num_train_steps = 32_000
  c.learning_rate = 1.6
  c.warmup_epochs = 5.0
  c.lr_drop_steps = tuple(e * STEPS_PER_EPOCH for e in (30, 70, 90))
  c.lr_drop_factor = 0.1
  c.momentum = 0.9
  c.nesterov = True
  c.weight_decay = 1e-4
  c.label_smoothing = 0.1
  c.log_every = 100
  c.eval_every = 2000
  c.checkpoint_every = 1000
  return c


def sweep():
  """The paper's ImageNet rows: RigL ERK at 80%/90%, 1x and 5x training."""
  return [dict(sparsity=s, train_multiplier=m) for s in (0.8, 0.9) for m in (1.0, 5.0)]
