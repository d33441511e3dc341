"""rigl_jax: sparse training (RigL and friends) as an optax transformation.

The core (masks, distributions, schedules, methods, transform) depends on JAX,
optax and numpy only; models, data and the trainer live in their own modules.
"""

from rigl_jax.distributions import DISTRIBUTIONS, sparsity_distribution
from rigl_jax.masks import global_density, layer_densities, random_masks, sparsifiable
from rigl_jax.methods import METHODS, Method, UpdateContext, get_method, redistribute_counts
from rigl_jax.transform import (
    SparseTrainingState,
    apply_masks,
    find_state,
    get_masks,
    skip_step,
    sparse_training,
)

__version__ = "0.1.0"
