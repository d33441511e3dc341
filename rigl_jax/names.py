"""The names of the core's methods and sparsity distributions: one list each.

Plain tuples with no imports, so that the trainer's config and ``--help`` can
name the allowed values without loading JAX. ``rigl_jax.methods.METHODS`` and
``rigl_jax.distributions`` are keyed by these names (checked at import).
"""

# rigl_jax.methods: the mask-update rules of sparse training.
METHOD_NAMES = ("static", "set", "rigl", "snfs", "rigl_sg", "rigl_sm", "pruning",
                "pruning_global", "srigl")
# rigl_jax.distributions: how the sparsity budget is spread over layers.
DISTRIBUTION_NAMES = ("uniform", "er", "erk")
