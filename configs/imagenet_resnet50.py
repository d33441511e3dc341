"""ResNet-50 on ImageNet-2012, the RigL paper's settings (Evci et al. 2020).

Batch 4096, 32k steps (about 100 epochs), lr 1.6 (0.1 x 4096 / 256) with no
warm-up, x0.1 at epochs 30, 70 and 90, weight decay 1e-4, label smoothing 0.1,
all 1,281,167 train images (the test split is ImageNet's validation set); RigL
ERK with alpha 0.3, dT 100 and T_end = 25k steps. ERK sparsifies the stem conv
too (the authors' README runs `--first_layer_sparsity=-1`); its density comes out
of ERK's scores like any other layer's. Sources: google-research/rigl @d39fc7d
`rigl/imagenet_resnet/imagenet_train_eval.py` (l.140 num_train_images, l.287
LR_SCHEDULE starting at epoch 0 = no warm-up, l.319 lr scaling, l.243
maskupdate_end_step 25000).
"""

from rigl_jax import config as config_lib

NUM_TRAIN_IMAGES = 1_281_167
BATCH_SIZE = 4096


def get_config():
  c = config_lib.base_config()
  c.model = "resnet50_imagenet"
  c.dataset = "imagenet2012"
  c.validation_size = 0                    # train on all of `train`, as the authors did
  c.dtype = "bfloat16"
  c.method = "rigl"
  c.distribution = "erk"
  c.sparsity = 0.8
  c.update_every = 100
  c.drop_fraction = 0.3
  c.end_step = 25_000
  c.batch_size = BATCH_SIZE
  c.eval_batch_size = 1000
  c.num_train_steps = 32_000
  c.learning_rate = 1.6
  c.warmup_steps = 0
  # The authors' epochs are fractional (step * batch / images): drop at the first
  # step whose epoch reaches 30, 70, 90.
  c.lr_drop_steps = tuple(-(-e * NUM_TRAIN_IMAGES // BATCH_SIZE) for e in (30, 70, 90))
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
