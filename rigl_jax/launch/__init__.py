"""Launch tooling around the trainer: sweeps, hyperparameter tuning and result reports.

- ``python -m rigl_jax.launch.sweep``  expands a config's ``sweep()`` (or a product given on the
  command line) into runs, one workdir each, and runs them locally, or writes a SLURM
  array script or a TPU-pod script; ``--estimate`` prints accelerator hours.
- ``python -m rigl_jax.launch.tune``   Optuna TPE over RigL's (drop fraction, dT), or the
  report's learning-rate grid.
- ``python -m rigl_jax.launch.report`` tables (Markdown, CSV) and plots from a sweep directory.

Library modules: ``grid`` (configs, overrides, run names), ``local`` (the local runner
and ``status.json``), ``emit`` (SLURM / TPU scripts), ``cost`` (accelerator hours).
Nothing here is imported by ``rigl_jax``; optuna and matplotlib are imported lazily.
"""
