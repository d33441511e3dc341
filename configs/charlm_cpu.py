"""Character-level language modelling at CPU scale: a small GRU on the built-in
``pystdlib`` corpus (the installed Python standard library, no download), RigL,
ERK, 75% sparse. A few minutes on 2 CPU cores; prints bits per character.

The shape of the RigL paper's WikiText-103 experiment (configs/charlm_wikitext103.py)
at a size a laptop trains: embeddings dense, the GRU's input and recurrent matrices
and the readout sparse, Adam, next-byte cross-entropy.

  python -m rigl_jax.main --config=configs/charlm_cpu.py --workdir=/tmp/rigl_jax/charlm
  python -m rigl_jax.main --config=configs/charlm_cpu.py:char_transformer_small ...
"""

from rigl_jax import config as config_lib


def get_config(model: str = "char_gru_small"):
  c = config_lib.base_config()
  c.model = model
  c.dataset = "pystdlib"
  c.sequence_length = 64
  c.method = "rigl"
  c.distribution = "erk"
  c.sparsity = 0.75
  # The shared embedding table (and the Transformer's positions) stay dense.
  c.dense_layers = ("embed",)
  c.batch_size = 32
  c.eval_batch_size = 256
  c.num_train_steps = 2000
  c.optimizer = "adam"
  c.learning_rate = 2e-3
  c.momentum = 0.9                 # Adam's b1
  c.lr_drop_steps = (1000, 1500)
  c.lr_drop_factor = 0.3
  c.weight_decay = 0.0
  c.grad_clip_norm = 1.0
  c.update_every = 100
  c.drop_fraction = 0.3
  c.log_every = 100
  c.eval_every = 500
  c.checkpoint_every = 500
  return c
