"""rigl_jax: sparse training (RigL and friends) as an optax transformation."""
