r"""Runs a grid of trainer runs: ``python -m rigl_jax.launch.sweep --config=configs/X.py --sweep_dir=DIR``.

The grid is the config's ``sweep()``, or a product given here::

  # The report's Table 2 grid, 2 runs at a time on this machine:
  python -m rigl_jax.launch.sweep --config=configs/cifar10_wrn22_2.py --sweep_dir=runs/table2 \
      --concurrency=2
  # A product: methods x distributions x sparsities x training multipliers x seeds,
  # with overrides shared by every run (not part of the run names):
  python -m rigl_jax.launch.sweep --config=configs/quickstart.py --sweep_dir=runs/mnist \
      --methods=static,set,rigl --distributions=uniform,erk --sparsities=0.8,0.9 \
      --seeds=0,1,2 --set=num_epochs=20
  # Instead of running: a SLURM array script, or a TPU-pod script.
  python -m rigl_jax.launch.sweep --config=configs/cifar10_wrn22_2.py --sweep_dir=/shared/table2 \
      --emit=slurm --slurm_partition=gpu --slurm_setup='source ~/venv/bin/activate'
  # The report's learning-rate grid (lr x (alpha, dT) x 3 seeds) at one setting:
  python -m rigl_jax.launch.sweep --config=configs/cifar10_wrn22_2.py --sweep_dir=runs/lr_erk_90 \
      --grid=lr --set=distribution=erk --set=sparsity=0.9
  # Accelerator hours of the grid for step times you give (seconds per step):
  python -m rigl_jax.launch.sweep --config=configs/cifar10_wrn22_2.py --sweep_dir=runs/table2 \
      --estimate --seconds_per_step=a100=0.05 --seconds_per_step=v100=0.09

Each run's workdir is ``DIR/NAME`` (``method=rigl,distribution=erk,sparsity=0.9,seed=0``).
Finished runs (``summary.json``) are skipped, unfinished ones rerun and resume from
their checkpoints; ``DIR/status.json`` records every run's state and, for failed
runs, the exit code and the tail of stderr. ``DIR/sweep.json`` lists the runs.
Exit code 1 when a run failed or diverged.
"""

from __future__ import annotations

import os
import sys

from absl import flags

from rigl_jax import cli, paths
from rigl_jax.launch import cost, emit, grid, local

def define_flags():
  """Defines the command-line flags (only when run as a program, so that the launch
  modules import side by side)."""
  flags.DEFINE_string("config", None, "Config file (configs/X.py).")
  flags.DEFINE_string("sweep_dir", None, "Directory of the sweep's workdirs.")
  flags.DEFINE_integer("concurrency", 1, "Runs at a time (local; SLURM: %N).")
  flags.DEFINE_enum("emit", None, ["slurm", "tpu"],
                    "Write a SLURM array or TPU-pod script instead of running.")
  flags.DEFINE_enum("grid", "sweep", ["sweep", "lr"],
                    "sweep: the config's sweep() or the product flags; lr: the report's "
                    "learning-rate x (alpha, dT) grid.")
  flags.DEFINE_list("seeds", None, "Seeds: replace those of the grid.")
  flags.DEFINE_list("methods", None, "Product grid: methods.")
  flags.DEFINE_list("distributions", None, "Product grid: distributions.")
  flags.DEFINE_list("sparsities", None, "Product grid: sparsities.")
  flags.DEFINE_list("train_multipliers", None, "Product grid: training multipliers.")
  flags.DEFINE_multi_string("set", [], "KEY=VALUE override of every run (not in the names).")
  flags.DEFINE_bool("dry_run", False, "Print the runs and commands; run nothing.")
  flags.DEFINE_string("python", None, "Interpreter of the runs (default: this one locally, "
                      "'python' for SLURM, the Python 3.11 environment tpu_setup.sh makes, "
                      "~/rigl_jax_venv/bin/python, for TPU).")
  flags.DEFINE_bool("estimate", False, "Print accelerator hours of the grid; run nothing.")
  flags.DEFINE_multi_string("seconds_per_step", [], "LABEL=SECONDS per training step for "
                            "--estimate (e.g. a100=0.05), repeatable.")
  flags.DEFINE_integer("steps_per_epoch", None, "For --estimate with a data set of unknown size.")
  # SLURM.
  flags.DEFINE_string("slurm_partition", "", "#SBATCH --partition ('' leaves it out).")
  flags.DEFINE_integer("slurm_nodes", 1, "Nodes of each run (#SBATCH --nodes).")
  flags.DEFINE_integer("slurm_gpus_per_node", 1,
                       "GPUs of each node; one trainer process per GPU (#SBATCH "
                       "--ntasks-per-node); 0: one CPU-only process per node.")
  flags.DEFINE_string("slurm_gres", None, "#SBATCH --gres (default gpu:GPUS_PER_NODE; '' "
                      "leaves it out).")
  flags.DEFINE_integer("slurm_cpus", 8, "#SBATCH --cpus-per-task (per process).")
  flags.DEFINE_string("slurm_mem", "", "#SBATCH --mem ('' leaves it out).")
  flags.DEFINE_string("slurm_time", "24:00:00", "#SBATCH --time.")
  flags.DEFINE_multi_string("slurm_setup", [], "Shell line before each run (repeatable).")
  flags.DEFINE_string("script_dir", None, "With --emit: the local folder of the scripts "
                      "(default: --sweep_dir; needed when --sweep_dir is a gs:// URL).")
  flags.DEFINE_string("repo_dir", None, "The repository on the nodes (default: this "
                      "directory for SLURM, ~/rigl_jax for TPU).")
  # TPU pods.
  flags.DEFINE_string("tpu_name", "my-tpu-pod", "TPU VM name.")
  flags.DEFINE_string("tpu_type", None, "Accelerator type of the slice (v4-32, v5p-64, "
                      "v5litepod-16, v6e-16, ...): every run's batch must divide over its "
                      "chips; checked when the script is written. Required with --emit=tpu.")
  flags.DEFINE_string("tpu_zone", "", "TPU zone.")
  flags.DEFINE_string("tpu_project", "", "GCP project.")
  flags.DEFINE_multi_string("tpu_setup", [], "Shell command on each worker first (repeatable).")


def expand(config_path: str, *, seeds=None, methods=None, distributions=None,
           sparsities=None, train_multipliers=None, which: str = "sweep") -> list[dict]:
  """The grid's overrides: ``which="lr"``: the report's learning-rate grid (seeds 0, 1,
  2 unless given); else the product when any product axis is given, else the config's
  ``sweep()``; ``seeds`` replaces the seeds either way."""
  module = grid.load_config_module(config_path)
  if which == "lr":
    if methods or distributions or sparsities or train_multipliers:
      raise ValueError("--grid=lr takes no product axes; fix the setting with --set")
    return grid.lr_grid([int(s) for s in seeds] if seeds else (0, 1, 2))
  if which != "sweep":
    raise ValueError(f"unknown grid {which!r}")
  if methods or distributions or sparsities or train_multipliers:
    return grid.product_grid(methods=methods or (), distributions=distributions or (),
                             sparsities=sparsities or (),
                             train_multipliers=train_multipliers or (),
                             seeds=[int(s) for s in seeds] if seeds else (0,))
  runs = grid.config_sweep(module)
  return grid.with_seeds(runs, [int(s) for s in seeds]) if seeds else runs


def plan(config_path: str, sweep_dir: str, *, common_assignments=(), **grid_args):
  """(runs, common overrides, base config) of a sweep; every run's config passes the
  trainer's checks (ValueError naming the run and the field)."""
  module = grid.load_config_module(config_path)
  base = module.get_config()
  common = grid.parse_assignments(common_assignments, base)
  runs = grid.make_runs(expand(config_path, **grid_args), sweep_dir, base)
  grid.validate_runs(runs, base, common)  # fail here, not in N subprocesses
  return runs, common, base


def _check_flags(FLAGS) -> None:  # pylint: disable=invalid-name
  """The numeric flags' ranges, before any work."""
  for name, low in (("concurrency", 1), ("slurm_nodes", 1), ("slurm_gpus_per_node", 0),
                    ("slurm_cpus", 1)):
    cli.require(FLAGS[name].value >= low, f"--{name}",
                f"must be >= {low}, got {FLAGS[name].value}")
  cli.require(FLAGS.steps_per_epoch is None or FLAGS.steps_per_epoch >= 1,
              "--steps_per_epoch", f"must be >= 1, got {FLAGS.steps_per_epoch}")


def main(argv):
  FLAGS = flags.FLAGS  # pylint: disable=invalid-name
  config_path = grid.check_command_line(argv, FLAGS.config, FLAGS.sweep_dir)
  sweep_dir = FLAGS.sweep_dir
  _check_flags(FLAGS)
  try:
    runs, common, base = plan(
        config_path, sweep_dir, common_assignments=FLAGS.set,
        seeds=grid.parse_list("seeds", FLAGS.seeds, int),
        methods=FLAGS.methods, distributions=FLAGS.distributions,
        sparsities=grid.parse_list("sparsities", FLAGS.sparsities, float),
        train_multipliers=grid.parse_list("train_multipliers", FLAGS.train_multipliers, float),
        which=FLAGS.grid)
  except (ValueError, TypeError, FileNotFoundError, SyntaxError) as e:
    cli.fail(e)

  if FLAGS.estimate:
    try:
      seconds = cost.parse_seconds_per_step(FLAGS.seconds_per_step)
    except ValueError as e:
      cli.fail(f"--seconds_per_step: {e}")
    measured = cost.measured_seconds_per_step(sweep_dir)
    if measured is not None:
      seconds["measured here"] = measured
    configs = [grid.apply_overrides(base, common, r.overrides) for r in runs]
    print(cost.format_estimate(os.path.basename(config_path), cost.estimate(
        configs, seconds, spe=FLAGS.steps_per_epoch)))
    return

  if FLAGS.dry_run:
    for run in runs:
      state = "finished" if local.is_finished(run.workdir) else "to run"
      cmd = local.trainer_command(config_path, run, common, python=FLAGS.python or sys.executable)
      print(f"[{state}] {' '.join(cmd)}")
    print(f"{len(runs)} runs")
    return

  if FLAGS.emit:
    try:
      if FLAGS.emit == "tpu" and not FLAGS.tpu_type:
        raise ValueError("--tpu_type: needed with --emit=tpu (e.g. v4-32), to check that "
                         "every run's batch divides over the slice's chips")
      devices = (emit.tpu_devices(FLAGS.tpu_type) if FLAGS.emit == "tpu" else
                 FLAGS.slurm_nodes * max(FLAGS.slurm_gpus_per_node, 1))
      emit.check_runs_fit(runs, base, common, devices)
      if paths.is_url(sweep_dir) and not FLAGS.script_dir:
        raise ValueError(f"--script_dir: needed with a URL --sweep_dir ({sweep_dir}): a "
                         f"local folder for the scripts and their logs")
    except ValueError as e:
      cli.fail(e)
    try:
      grid.write_manifest(sweep_dir, config_path=config_path, common=common, runs=runs,
                          base_config=base)
    except OSError as e:
      cli.fail(f"--sweep_dir: {sweep_dir}: {e}")
    if FLAGS.script_dir:
      try:
        os.makedirs(FLAGS.script_dir, exist_ok=True)
      except OSError as e:
        cli.fail(f"--script_dir: {FLAGS.script_dir}: {e}")
  if FLAGS.emit == "slurm":
    script, listing = emit.write_slurm(
        runs, sweep_dir, config_path=config_path, common=common,
        repo_dir=FLAGS.repo_dir or os.getcwd(), python=FLAGS.python or "python",
        concurrency=FLAGS.concurrency if FLAGS.concurrency > 1 else None,
        job_name=os.path.splitext(os.path.basename(config_path))[0],
        partition=FLAGS.slurm_partition, nodes=FLAGS.slurm_nodes,
        gpus_per_node=FLAGS.slurm_gpus_per_node, gres=FLAGS.slurm_gres,
        cpus_per_task=FLAGS.slurm_cpus,
        mem=FLAGS.slurm_mem, time_limit=FLAGS.slurm_time, setup=FLAGS.slurm_setup,
        script_dir=FLAGS.script_dir)
    done = sum(local.is_finished(r.workdir) for r in runs)
    waiting = sum(bool(r.after) for r in runs)
    submit = os.path.join(os.path.dirname(script), emit.SLURM_SUBMIT)
    print(f"wrote {script}, {listing} and {submit}: {len(runs)} tasks ({done} already "
          f"finished, {waiting} waiting for another run)\nsubmit: bash {submit}")
    return
  if FLAGS.emit == "tpu":
    script = emit.write_tpu(
        runs, sweep_dir, config_path=config_path, common=common, tpu_name=FLAGS.tpu_name,
        zone=FLAGS.tpu_zone, project=FLAGS.tpu_project,
        repo_dir=FLAGS.repo_dir or "~/rigl_jax",
        python=FLAGS.python or "~/rigl_jax_venv/bin/python",
        setup=FLAGS.tpu_setup, script_dir=FLAGS.script_dir)
    setup = emit.write_tpu_setup(
        os.path.dirname(script), tpu_name=FLAGS.tpu_name, zone=FLAGS.tpu_zone,
        project=FLAGS.tpu_project, repo_dir=FLAGS.repo_dir or "~/rigl_jax")
    print(f"wrote {script}: {len(runs)} runs, one after another on all workers, and "
          f"{setup}\nonce per slice: bash {setup}\nthen: bash {script}")
    return

  if paths.is_url(sweep_dir):
    cli.fail(f"--sweep_dir: {sweep_dir} is a URL; a sweep on this machine keeps its "
             f"runs in a local folder (URLs are for --emit=slurm or --emit=tpu)")
  try:
    os.makedirs(sweep_dir, exist_ok=True)
  except OSError as e:
    cli.fail(f"--sweep_dir: {sweep_dir}: {e}")
  try:
    states = local.run_sweep(runs, sweep_dir, config_path=config_path, common=common,
                             base_config=base, concurrency=FLAGS.concurrency,
                             python=FLAGS.python or sys.executable)
  except local.SweepInUse as e:
    cli.fail(f"--sweep_dir: {e}")
  if any(s in (local.FAILED, local.DIVERGED) for s in states.values()):
    sys.exit(1)


if __name__ == "__main__":
  define_flags()
  cli.run(main)
