r"""RigL's hyperparameters as in the report (Section 5.3).

TPE (default): Optuna's TPE sampler over the drop fraction alpha in [0.1, 0.6] and
dT in {50, 100, ..., 950}; the objective is the validation accuracy averaged over the
seeds, each seed a full trainer run in its own workdir
``SWEEP_DIR/STUDY_NAME/drop_fraction=A,update_every=T,seed=S``::

  python -m rigl_jax.launch.tune --config=configs/cifar10_wrn22_2.py --sweep_dir=runs/tune_erk_90 \
      --set=distribution=erk --set=sparsity=0.9 --seeds=0,1,2 --n_trials=15

The study lives in ``SWEEP_DIR/optuna.db`` (SQLite). A killed study resumes with the
same command (``load_if_exists``): the trial that was running (killed, Ctrl-C or
SIGTERM) is marked failed and its (alpha, dT) tried again first, its runs resuming from
their checkpoints; finished runs are read back, not retrained. One process per study. Each trial's per-seed validation
and test accuracies are stored as trial attributes and in
``SWEEP_DIR/STUDY_NAME/trials.csv`` (STUDY_NAME: ``tpe,<the --set values>``).

Learning-rate grid: lr in {0.1, 0.05, 0.01, 0.005} x (alpha, dT) in {(0.3, 100),
(0.4, 200), (0.4, 500), (0.5, 750)} x seeds, run like a sweep (``launch.sweep
--grid=lr`` is the same grid with SLURM/TPU emission), then reported into
``SWEEP_DIR/report``::

  python -m rigl_jax.launch.tune --mode=lr_grid --config=configs/cifar10_wrn22_2.py \
      --sweep_dir=runs/lr_erk_90 --set=distribution=erk --set=sparsity=0.9 --concurrency=2

``--estimate --seconds_per_step=LABEL=SECONDS`` prints the accelerator hours instead.
Optuna is imported only when TPE runs (``pip install -e '.[launch]'``).
"""

from __future__ import annotations

import csv
import json
import os
import statistics
import sys
from typing import Callable, Sequence

from absl import flags

from rigl_jax import cli
from rigl_jax.launch import grid, local

ALPHA_RANGE = (0.1, 0.6)
DT_VALUES = tuple(range(50, 951, 50))     # 50, 100, ..., 950
DB = "optuna.db"
TRIALS_CSV = "trials.csv"

TrainFn = Callable[[object, str], dict]    # (config, workdir) -> summary


def import_optuna():
  """optuna, or an ImportError that says how to install it."""
  try:
    import optuna  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise ImportError("rigl_jax.launch.tune needs optuna: pip install -e '.[launch]' "
                      "(or pip install optuna)") from None
  return optuna


def train_in_process(config, workdir: str) -> dict:
  """The trainer in this process (the default ``train_fn``)."""
  from rigl_jax import train  # pylint: disable=import-outside-toplevel
  return train.train_and_evaluate(config, workdir)


def storage_url(study_dir: str) -> str:
  return f"sqlite:///{os.path.abspath(os.path.join(study_dir, DB))}"


# Fields that do not change a run's numbers: left out of default study names.
_BOOKKEEPING = ("log_every", "eval_every", "checkpoint_every", "keep_checkpoints", "overwrite",
                "data_dir")


def default_study_name(fixed: dict) -> str:
  """``tpe`` plus the fixed settings: ``tpe,distribution=erk,sparsity=0.9``."""
  setting = {k: v for k, v in fixed.items() if k not in _BOOKKEEPING}
  return "tpe" + (f",{grid.run_name(setting)}" if setting else "")


def seed_run(config, workdir: str, train_fn: TrainFn) -> dict:
  """One seed of a trial: its summary, read back when the run has finished.

  A run that stops on a non-finite loss (``FloatingPointError``) counts as diverged,
  with validation and test accuracy 0.
  """
  path = os.path.join(workdir, local.SUMMARY)
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  try:
    summary = train_fn(config, workdir)
  except FloatingPointError as e:
    return {"val_accuracy": 0.0, "test_accuracy": 0.0, "diverged": str(e)}
  if summary.get("preempted"):  # SIGTERM: the trainer saved a checkpoint and returned
    raise KeyboardInterrupt(f"{workdir} preempted at step {summary.get('steps')}")
  return summary


def make_objective(config, study_dir: str, seeds: Sequence[int], *,
                   train_fn: TrainFn = train_in_process,
                   alpha_range: tuple[float, float] = ALPHA_RANGE,
                   dt_values: Sequence[int] = DT_VALUES) -> Callable:
  """The TPE objective: mean validation accuracy over ``seeds`` at the trial's
  (alpha, dT); workdirs ``study_dir/drop_fraction=A,update_every=T,seed=S``
  (``run_tpe`` passes ``SWEEP_DIR/STUDY_NAME`` as ``study_dir``).

  Args:
    config: the full config of the setting (sparsity, distribution, ... fixed).
    study_dir: where the runs go.
    seeds: one trainer run per seed.
    train_fn: ``(config, workdir) -> summary`` (default: the trainer in-process).
    alpha_range: drop fraction bounds (uniform).
    dt_values: evenly spaced dT values, sampled as an ordered integer.
  """
  dt_values = sorted(int(v) for v in dt_values)
  step = dt_values[1] - dt_values[0] if len(dt_values) > 1 else 1
  if any(b - a != step for a, b in zip(dt_values, dt_values[1:])):
    raise ValueError(f"dt_values must be evenly spaced, got {dt_values}")

  def objective(trial) -> float:
    alpha = trial.suggest_float("drop_fraction", *alpha_range)
    dt = trial.suggest_int("update_every", dt_values[0], dt_values[-1], step=step)
    vals, tests, diverged = [], [], []
    for seed in seeds:
      overrides = {"drop_fraction": alpha, "update_every": dt, "seed": int(seed)}
      workdir = os.path.join(study_dir, grid.run_name(overrides))
      try:
        summary = seed_run(grid.apply_overrides(config, overrides), workdir, train_fn)
      except KeyboardInterrupt:
        trial.set_user_attr("interrupted", True)  # tried again when the study resumes
        raise
      if summary.get("val_accuracy") is None:
        raise ValueError("tuning needs a validation split: the run reported no "
                         "val_accuracy (set validation_size > 0)")
      vals.append(float(summary["val_accuracy"]))
      tests.append(float(summary["test_accuracy"]))
      if "diverged" in summary:
        diverged.append(int(seed))
    trial.set_user_attr("seeds", [int(s) for s in seeds])
    trial.set_user_attr("val_accuracies", vals)
    trial.set_user_attr("test_accuracies", tests)
    trial.set_user_attr("diverged_seeds", diverged)
    return statistics.fmean(vals)

  return objective


def _trial_params(trial) -> dict:
  """A trial's parameters; for an enqueued (waiting) trial, the ones it will get."""
  return dict(trial.params) or dict(trial.system_attrs.get("fixed_params", {}))


def recover_interrupted_trials(study) -> int:
  """Trials cut short by a killed or interrupted process are tried again.

  A trial left RUNNING (the process was killed) is marked failed; such trials and the
  failed ones marked ``interrupted`` (Ctrl-C, SIGTERM) get their parameters enqueued,
  unless a later trial already has them. Their finished seeds are read back, the
  others resume from their checkpoints. Returns the number enqueued.
  """
  optuna = import_optuna()
  states = optuna.trial.TrialState
  trials = study.get_trials(deepcopy=False)
  retry = []
  for trial in trials:
    if trial.state == states.RUNNING:
      study.tell(trial.number, state=states.FAIL)
      retry.append(trial)
    elif trial.state == states.FAIL and trial.user_attrs.get("interrupted"):
      retry.append(trial)
  enqueued = 0
  for trial in retry:
    params = _trial_params(trial)
    later = [t for t in trials if t.number > trial.number and _trial_params(t) == params]
    if params and not later:
      study.enqueue_trial(params, skip_if_exists=False)
      enqueued += 1
  return enqueued


def run_tpe(config, study_dir: str, *, seeds: Sequence[int] = (0, 1, 2), n_trials: int = 15,
            study_name: str = "tpe", train_fn: TrainFn = train_in_process,
            sampler_seed: int = 0, alpha_range: tuple[float, float] = ALPHA_RANGE,
            dt_values: Sequence[int] = DT_VALUES):
  """Runs (or resumes) the study until it has ``n_trials`` complete trials; returns it.

  The study is ``study_name`` in ``study_dir/optuna.db`` (several settings can share a
  directory); its runs and ``trials.csv`` are in ``study_dir/study_name/``.
  """
  optuna = import_optuna()
  runs_dir = os.path.join(study_dir, study_name)
  os.makedirs(runs_dir, exist_ok=True)
  csv_path = os.path.join(runs_dir, TRIALS_CSV)
  storage = storage_url(study_dir)
  try:  # a resumed study's sampler must not replay the random draws of its first start
    previous = len(optuna.load_study(study_name=study_name, storage=storage).trials)
  except KeyError:
    previous = 0
  study = optuna.create_study(
      study_name=study_name, storage=storage, direction="maximize",
      sampler=optuna.samplers.TPESampler(seed=sampler_seed + previous), load_if_exists=True)
  recovered = recover_interrupted_trials(study)
  if recovered:
    print(f"{study_name}: {recovered} interrupted trial(s) enqueued again")
  complete = optuna.trial.TrialState.COMPLETE
  done = len(study.get_trials(deepcopy=False, states=(complete,)))
  objective = make_objective(config, runs_dir, seeds, train_fn=train_fn,
                             alpha_range=alpha_range, dt_values=dt_values)
  save_csv = lambda study, trial: write_trials_csv(study, csv_path)
  while done < n_trials:
    study.optimize(objective, n_trials=n_trials - done, callbacks=[save_csv])
    new_done = len(study.get_trials(deepcopy=False, states=(complete,)))
    if new_done == done:
      break  # every trial failed; their exceptions went to the log
    done = new_done
  write_trials_csv(study, csv_path)
  return study


def trials_rows(study) -> list[dict]:
  rows = []
  for t in study.get_trials(deepcopy=False):
    vals, tests = t.user_attrs.get("val_accuracies", []), t.user_attrs.get("test_accuracies", [])
    rows.append({
        "number": t.number, "state": t.state.name,
        "drop_fraction": t.params.get("drop_fraction"), "update_every": t.params.get("update_every"),
        "val_accuracy_mean": t.value if t.value is not None else "",
        "test_accuracy_mean": statistics.fmean(tests) if tests else "",
        "test_accuracy_std": statistics.stdev(tests) if len(tests) > 1 else "",
        "val_accuracies": " ".join(f"{v:.4f}" for v in vals),
        "test_accuracies": " ".join(f"{v:.4f}" for v in tests),
        "diverged_seeds": " ".join(map(str, t.user_attrs.get("diverged_seeds", []))),
    })
  return rows


def write_trials_csv(study, path: str) -> None:
  rows = trials_rows(study)
  if not rows:
    return
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)


def run_lr_grid(config_path: str, sweep_dir: str, *, seeds: Sequence[int] = (0, 1, 2),
                fixed: dict | None = None, concurrency: int = 1, python: str = sys.executable,
                learning_rates: Sequence[float] = grid.LR_GRID_LEARNING_RATES,
                pairs: Sequence[tuple[float, int]] = grid.LR_GRID_PAIRS) -> dict[str, str]:
  """The learning-rate grid as a local sweep (one trainer subprocess per run, finished
  runs skipped), then its report in ``SWEEP_DIR/report``; returns the runs' states."""
  from rigl_jax.launch import report  # pylint: disable=import-outside-toplevel
  base = grid.load_config_module(config_path).get_config()
  runs = grid.make_runs(grid.lr_grid(seeds, learning_rates, pairs), sweep_dir, base)
  states = local.run_sweep(runs, sweep_dir, config_path=config_path, common=fixed or {},
                           base_config=base, concurrency=concurrency, python=python)
  out = os.path.join(sweep_dir, "report")
  report.build_report(sweep_dir, out, title=f"Learning-rate grid: {sweep_dir}")
  print(f"report: {os.path.join(out, 'table.md')}")
  return states


# ----------------------------------------------------------------------------- command line


def define_flags():
  """Defines the command-line flags (only when run as a program, so that the launch
  modules import side by side)."""
  flags.DEFINE_string("config", None, "Config file (configs/X.py).")
  flags.DEFINE_string("sweep_dir", None, "Study directory (runs, optuna.db).")
  flags.DEFINE_enum("mode", "tpe", ["tpe", "lr_grid"], "TPE study or the lr grid.")
  flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds averaged per trial / grid point.")
  flags.DEFINE_multi_string("set", [], "KEY=VALUE fixed for every run (sparsity, ...).")
  flags.DEFINE_integer("n_trials", 15, "TPE: complete trials wanted.")
  flags.DEFINE_string("study_name", None, "TPE: default 'tpe,<--set values>'.")
  flags.DEFINE_integer("sampler_seed", 0, "TPE sampler seed.")
  flags.DEFINE_float("alpha_low", ALPHA_RANGE[0], "TPE: smallest drop fraction.")
  flags.DEFINE_float("alpha_high", ALPHA_RANGE[1], "TPE: largest drop fraction.")
  flags.DEFINE_list("dt_values", [str(v) for v in DT_VALUES], "TPE: evenly spaced dT values.")
  flags.DEFINE_integer("concurrency", 1, "lr_grid: runs at a time.")
  flags.DEFINE_bool("estimate", False, "Print the accelerator hours of the study; run nothing.")
  flags.DEFINE_multi_string("seconds_per_step", [], "LABEL=SECONDS per training step for "
                            "--estimate (e.g. a100=0.05), repeatable.")


def main(argv):
  FLAGS = flags.FLAGS  # pylint: disable=invalid-name
  config_path = grid.check_command_line(argv, FLAGS.config, FLAGS.sweep_dir)
  for name, low in (("n_trials", 1), ("concurrency", 1)):
    cli.require(FLAGS[name].value >= low, f"--{name}",
                f"must be >= {low}, got {FLAGS[name].value}")
  cli.require(0.0 < FLAGS.alpha_low <= FLAGS.alpha_high < 1.0, "--alpha_low",
              f"and --alpha_high must satisfy 0 < alpha_low <= alpha_high < 1, got "
              f"{FLAGS.alpha_low} and {FLAGS.alpha_high}")
  try:
    base = grid.load_config_module(config_path).get_config()
    fixed = grid.parse_assignments(FLAGS.set, base)
    seeds = grid.parse_list("seeds", FLAGS.seeds, int)
    dt_values = grid.parse_list("dt_values", FLAGS.dt_values, int)
    cli.require(bool(seeds), "--seeds", "needs at least one seed")
    cli.require(bool(dt_values) and min(dt_values) >= 1, "--dt_values",
                f"must be update intervals >= 1, got {FLAGS.dt_values}")
    # Every run of the study has this config with its own (alpha, dT) or lr: check now.
    grid.validate_runs(grid.make_runs([{}], FLAGS.sweep_dir, base), base, fixed)
  except (ValueError, TypeError, FileNotFoundError, SyntaxError) as e:
    cli.fail(e)
  sweep_dir = FLAGS.sweep_dir

  if FLAGS.estimate:  # n_trials x seeds runs (TPE) or the grid's runs, each a full training
    from rigl_jax.launch import cost  # pylint: disable=import-outside-toplevel
    if FLAGS.mode == "lr_grid":
      configs = [grid.apply_overrides(base, fixed, o) for o in grid.lr_grid(seeds)]
    else:
      configs = [grid.apply_overrides(base, fixed)] * (FLAGS.n_trials * len(seeds))
    try:
      seconds = cost.parse_seconds_per_step(FLAGS.seconds_per_step)
    except ValueError as e:
      cli.fail(f"--seconds_per_step: {e}")
    print(cost.format_estimate(f"{FLAGS.mode} on {os.path.basename(config_path)}", cost.estimate(
        configs, seconds)))
    return

  if FLAGS.mode == "lr_grid":
    try:
      states = run_lr_grid(config_path, sweep_dir, seeds=seeds, fixed=fixed,
                           concurrency=FLAGS.concurrency)
    except local.SweepInUse as e:
      cli.fail(f"--sweep_dir: {e}")
    if any(s in (local.FAILED, local.DIVERGED) for s in states.values()):
      sys.exit(1)
    return

  config = grid.apply_overrides(base, fixed)
  study_name = FLAGS.study_name or default_study_name(fixed)
  study_dir = sweep_dir
  try:
    study = run_tpe(config, study_dir, seeds=seeds, n_trials=FLAGS.n_trials,
                    study_name=study_name, sampler_seed=FLAGS.sampler_seed,
                    alpha_range=(FLAGS.alpha_low, FLAGS.alpha_high),
                    dt_values=dt_values)
  except KeyboardInterrupt as e:
    print(f"interrupted ({e}); run the same command to resume the study", file=sys.stderr)
    sys.exit(130)
  best = study.best_trial
  print(f"{study_name}: best of {len(study.trials)} trials: drop_fraction="
        f"{best.params['drop_fraction']:.4f} update_every={best.params['update_every']} "
        f"val_accuracy={best.value:.4f} test_accuracies={best.user_attrs.get('test_accuracies')}"
        f"\ntrials: {os.path.join(study_dir, study_name, TRIALS_CSV)}")


if __name__ == "__main__":
  define_flags()
  cli.run(main)
