"""rigl_jax: sparse training (RigL and friends) as an optax transformation.

The core (masks, distributions, schedules, methods, transform) depends on JAX,
optax and numpy only; models, data and the trainer live in their own modules.
Names are imported on first use, so that ``python -m rigl_jax.main --help`` and
the launch tools start without loading JAX.
"""

import importlib

__version__ = "0.1.0"

# Public name -> the module that defines it.
_EXPORTS = {
    "DISTRIBUTIONS": "distributions", "sparsity_distribution": "distributions",
    "global_density": "masks", "layer_densities": "masks", "random_masks": "masks",
    "sparsifiable": "masks", "ArgumentError": "masks",
    "METHODS": "methods", "Method": "methods", "UpdateContext": "methods",
    "get_method": "methods", "redistribute_counts": "methods", "SRigL": "methods",
    "Structure": "structure",
    "SparseTrainingState": "transform", "apply_masks": "transform", "find_state": "transform",
    "get_masks": "transform", "mask_update_steps": "transform", "skip_step": "transform",
    "sparse_training": "transform",
}
_SUBMODULES = ("distributions", "masks", "methods", "names", "schedules", "selection",
               "structure", "transform")

__all__ = sorted(_EXPORTS)


def __getattr__(name):
  if name in _EXPORTS:
    value = getattr(importlib.import_module(f"rigl_jax.{_EXPORTS[name]}"), name)
  elif name in _SUBMODULES:
    value = importlib.import_module(f"rigl_jax.{name}")
  else:
    raise AttributeError(f"module 'rigl_jax' has no attribute {name!r}")
  globals()[name] = value
  return value


def __dir__():
  return sorted(set(globals()) | set(_EXPORTS) | set(_SUBMODULES))
