"""The RigL paper's character-level language model (Evci et al. 2020, section 4.3):
a GRU on WikiText-103, read from local raw files (nothing is downloaded).

  python -m rigl_jax.main --config=configs/charlm_wikitext103.py --workdir=runs/charlm \
      --config.data_dir=/path/to/wikitext-103-raw    # wiki.{train,valid,test}.raw

Sources. From the paper's section 4.3 text: WikiText-103 at the character level,
a vocabulary of 256, a shared embedding of width 128, a GRU with 512 units, a
readout of two linear layers of 256 and 128 units, next-step cross-entropy, the
Adam optimizer (``models/charlm.py`` builds exactly that as ``char_gru``). The
paper's remaining hyperparameters are in its appendix, whose text is not among
this project's references (``shared/reference`` holds the report and the paper's
results page, the authors' repository google-research/rigl @d39fc7d has no
language-model code, and the report did not reproduce this experiment). Every
value below marked "rigl_jax's choice" is therefore ours, not the paper's:
check it against the paper's appendix before quoting a number as a
reproduction, and override it on the command line.
"""

from rigl_jax import config as config_lib


def get_config():
  c = config_lib.base_config()
  c.model = "char_gru"                 # paper s4.3: embedding 128 (shared), GRU 512, readout 256, 128
  c.dataset = "wikitext103"            # paper s4.3
  c.data_dir = ""                      # the folder with wiki.{train,valid,test}.raw: set it
  c.optimizer = "adam"                 # paper s4.3
  c.method = "rigl"
  c.distribution = "erk"               # rigl_jax's choice (the image experiments' default)
  c.sparsity = 0.75                    # rigl_jax's choice
  c.dense_layers = ("embed",)          # the shared embedding stays dense: rigl_jax's choice
  c.sequence_length = 512              # rigl_jax's choice
  c.batch_size = 32                    # rigl_jax's choice
  c.eval_batch_size = 64
  c.num_train_steps = 200_000          # rigl_jax's choice
  c.learning_rate = 7e-4               # rigl_jax's choice
  c.momentum = 0.9                     # Adam's b1 (optax default)
  c.lr_drop_steps = (100_000, 150_000)  # rigl_jax's choice
  c.lr_drop_factor = 0.2
  c.weight_decay = 0.0                 # rigl_jax's choice
  c.grad_clip_norm = 10.0              # rigl_jax's choice
  c.update_every = 1000                # rigl_jax's choice
  c.drop_fraction = 0.3                # the image experiments' alpha
  c.end_fraction = 0.75                # the image experiments' T_end
  c.log_every = 1000
  c.eval_every = 10_000
  c.checkpoint_every = 5000
  return c
