"""rigl_jax.launch: sweep expansion and names, the local runner and status.json, SLURM/TPU
scripts (run against stubs, never submitted), accelerator hours, the report on tiny
real runs, and the Optuna study with a stub trainer."""

import csv
import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from rigl_jax.launch import cost, emit, grid, local, report, sweep, tune

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(REPO, "configs", "quickstart.py")
CIFAR10 = os.path.join(REPO, "configs", "cifar10_wrn22_2.py")

# A stand-in for `python -m rigl_jax.main ...`: what it does depends on the seed in the
# workdir's name. seed=13: exit 3 ("boom" on stderr); seed=14: exit 0 without a
# summary (preempted); seed=15: a FloatingPointError; seed=16: a summary with a NaN
# accuracy; else a summary with accuracy 0.5. Every call appends its workdir to
# $STUB_LOG.
STUB = textwrap.dedent("""\
    import json, os, sys
    if sys.argv[1:3] == ["-m", "rigl_jax.launch.finished"]:  # the scripts' finished check
      sys.exit(0 if os.path.exists(os.path.join(sys.argv[3], "summary.json")) else 1)
    workdir = [a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--workdir=")][0]
    if os.environ.get("STUB_LOG"):
      with open(os.environ["STUB_LOG"], "a") as f:
        f.write(workdir + "\\n")
    os.makedirs(workdir, exist_ok=True)
    name = os.path.basename(workdir)
    if "seed=13" in name:
      print("Traceback: something\\nRuntimeError: boom", file=sys.stderr)
      sys.exit(3)
    if "seed=14" in name:
      sys.exit(0)
    if "seed=15" in name:
      print("FloatingPointError: non-finite loss or gradient at step 7", file=sys.stderr)
      sys.exit(1)
    acc = float("nan") if "seed=16" in name else 0.5
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump({"test_accuracy": acc, "val_accuracy": acc, "argv": sys.argv[1:]}, f)
    """)


@pytest.fixture
def stub(tmp_path):
  """(python file, executable file, log path) of the stub trainer."""
  path = tmp_path / "stub_trainer.py"
  path.write_text(STUB)
  exe = tmp_path / "stub_python"
  exe.write_text(f"#!{sys.executable}\n" + STUB)
  exe.chmod(0o755)
  return str(path), str(exe), str(tmp_path / "stub.log")


def read_log(path):
  return open(path).read().split() if os.path.exists(path) else []


# ----------------------------------------------------------------------------- grids


def test_product_grid_names_and_dense_collapse():
  runs = grid.product_grid(methods=["dense", "static", "rigl"], distributions=["uniform", "erk"],
                           sparsities=[0.8, 0.9], train_multipliers=[1, 2], seeds=[0, 1])
  # dense: one setting per multiplier and seed; static/rigl: 2 x 2 x 2 x 2 x 2.
  assert len(runs) == 2 * 2 + 2 * 2 * 2 * 2 * 2
  names = [grid.run_name(r) for r in runs]
  assert len(set(names)) == len(names)
  assert "method=rigl,distribution=erk,sparsity=0.9,train_multiplier=2.0,seed=1" in names
  assert "method=dense,sparsity=0.0,train_multiplier=1.0,seed=0" in names
  assert not any(n.startswith("method=dense,distribution") for n in names)
  # Stable: the order of the keys does not matter, int and float settings agree.
  assert grid.run_name({"seed": 0, "sparsity": 0.9, "method": "set"}) == \
      "method=set,sparsity=0.9,seed=0"
  made = grid.make_runs([{"train_multiplier": 2, "seed": 1}], "/sweep")
  assert made[0].name == "train_multiplier=2.0,seed=1"
  assert made[0].workdir == "/sweep/train_multiplier=2.0,seed=1"
  assert grid.parse_run_name(made[0].name) == {"train_multiplier": 2.0, "seed": 1}
  with pytest.raises(ValueError, match="share the workdir"):
    grid.make_runs([{"seed": 0}, {"seed": 0}], "/sweep")
  with pytest.raises(ValueError, match="unknown config field"):
    grid.make_runs([{"sparsty": 0.9}], "/sweep")


def test_config_sweep_expansion_and_seeds(tmp_path):
  table2 = sweep.expand(CIFAR10)
  # 3 seeds x (4 sparsities x the 15 sparse rows of Table 2 + dense).
  assert len(table2) == 3 * (4 * 15 + 1)
  one_seed = sweep.expand(CIFAR10, seeds=["0"])
  assert len(one_seed) == 61 and {r["seed"] for r in one_seed} == {0}
  five = sweep.expand(CIFAR10, seeds=["0", "1", "2", "3", "4"])
  assert len(five) == 5 * 61
  # A lottery run's source follows its seed.
  for run in five:
    if run["method"] == "lottery":
      assert run["source_workdir"]["seed"] == run["seed"]
      assert run["source_workdir"]["sparsity"] == run["sparsity"]
  runs, common, _ = sweep.plan(QUICKSTART, str(tmp_path), common_assignments=["num_epochs=3"])
  assert [r.name for r in runs] == ["default"] and common == {"num_epochs": 3}
  lr = sweep.expand(CIFAR10, which="lr")
  assert len(lr) == 4 * 4 * 3
  assert {(r["drop_fraction"], r["update_every"]) for r in lr} == set(grid.LR_GRID_PAIRS)
  assert {r["learning_rate"] for r in lr} == {0.1, 0.05, 0.01, 0.005}
  with pytest.raises(ValueError, match="unknown config field"):
    sweep.plan(QUICKSTART, str(tmp_path), common_assignments=["nope=1"])
  with pytest.raises(ValueError):
    sweep.plan(QUICKSTART, str(tmp_path), common_assignments=["sparsity=abc"])


# The rows of the report's Tables 2 and 3 as printed (shared/reference, the report's
# section 5): label and train FLOPs at 90% sparsity. A label's first row is trained 1x;
# a later row of the same label with k times its train FLOPs is trained k x.
REPORT_TABLE2 = (("Small Dense", 0.11), ("Static", 0.10), ("SET", 0.10), ("RigL", 0.10),
                 ("SET (ERK)", 0.17), ("RigL (ERK)", 0.17), ("Static", 0.20),
                 ("Lottery", 0.45), ("SET", 0.20), ("SNFS", 0.51), ("SNFS (ERK)", 0.52),
                 ("SNFS", 1.02), ("RigL", 0.20), ("Pruning", 0.32), ("RigL (ERK)", 0.34),
                 ("Dense Baseline", 1.0))
REPORT_TABLE3 = (("Static", 0.10), ("Small Dense", 0.11), ("SET", 0.10), ("RigL", 0.10),
                 ("Static (ERK)", 0.22), ("SET (ERK)", 0.22), ("RigL (ERK)", 0.23),
                 ("SNFS", 0.58), ("SNFS (ERK)", 0.59), ("Pruning", 0.36), ("RigL", 0.20),
                 ("Lottery", 0.62), ("RigL", 0.30), ("RigL (ERK)", 0.46),
                 ("Dense Baseline", 1.0))


def _report_rows(table):
  """{(label, training multiplier)} of a table."""
  first, rows = {}, []
  for label, flops in table:
    first.setdefault(label, flops)
    rows.append((label, round(flops / first[label])))
  assert len(set(rows)) == len(rows)
  return rows


@pytest.mark.parametrize("config,table", [(CIFAR10, REPORT_TABLE2),
                                          (os.path.join(REPO, "configs", "cifar100_resnet50.py"),
                                           REPORT_TABLE3)])
def test_the_grids_hold_every_row_of_the_report_tables(tmp_path, config, table):
  """Every row of the table, at 90% and 80% for seeds 0-2, is one run of the config's
  sweep, and the report files it under that row: the rows the report makes from the
  grid are the table's rows, no more."""
  sweep_dir = str(tmp_path / "sweep")
  runs, common, base = sweep.plan(config, sweep_dir)
  grid.write_manifest(sweep_dir, config_path=config, common=common, runs=runs,
                      base_config=base)
  for run in runs:  # a finished run per grid point: the report reads its fields
    os.makedirs(run.workdir)
    with open(os.path.join(run.workdir, "config.json"), "w") as f:
      f.write(grid.apply_overrides(base, common, run.overrides).to_json_best_effort())
    with open(os.path.join(run.workdir, "summary.json"), "w") as f:
      json.dump({"test_accuracy": 0.5}, f)
  rows, columns = report.build_rows(report.collect(sweep_dir))
  assert {0.8, 0.9} <= set(columns)
  # The report's labels: "Pruning (global)" is the report's "Pruning", "Dense" its
  # "Dense Baseline"; a k x row is "LABEL k x".
  ours = []
  for row in rows:
    label = row.label.replace("Pruning (global)", "Pruning").replace("Dense", "Dense Baseline")
    label = label.replace("Small Dense Baseline", "Small Dense")
    multiplier = 1
    if label.endswith("x") and label.rsplit(" ", 1)[-1][:-1].isdigit():
      label, text = label.rsplit(" ", 1)
      multiplier = int(text[:-1])
    ours.append((label, multiplier))
    for sparsity in ((0.0,) if label == "Dense Baseline" else (0.8, 0.9)):
      assert sorted(int(r.fields["seed"]) for r in row.cells[sparsity].runs) == [0, 1, 2], \
          (row.label, sparsity)
  assert sorted(ours) == sorted(_report_rows(table))


def test_lottery_runs_wait_for_their_pruning_runs_in_the_grid():
  runs = grid.make_runs(grid.with_seeds(sweep.expand(CIFAR10), [4]), "/sweep")
  by_name = {r.name: r for r in runs}
  lottery = by_name["method=lottery,distribution=uniform,sparsity=0.9,seed=4"]
  source = by_name[lottery.after[0]]
  assert source.overrides["method"] == "pruning_global"
  assert (source.overrides["sparsity"], source.overrides["seed"]) == (0.9, 4)
  assert lottery.overrides["source_workdir"] == source.workdir
  assert sum(bool(r.after) for r in runs) == 4  # one lottery run per sparsity
  with pytest.raises(ValueError, match="needs run method=set,seed=0 first"):
    grid.make_runs([{"method": "lottery", "seed": 0,
                     "source_workdir": {"method": "set", "seed": 0}}], "/sweep")
  with pytest.raises(ValueError, match="a source must not have a source of its own"):
    grid.make_runs([{"method": "set", "seed": 0},
                    {"method": "lottery", "seed": 1, "source_workdir": {"method": "set",
                                                                        "seed": 0}},
                    {"method": "lottery", "seed": 2, "source_workdir": {
                        "method": "lottery", "seed": 1}}], "/sweep")


def _lottery_pair(sweep_dir, seeds):
  """A stand-in source and a lottery run waiting for it, per seed (the stub decides
  by the seed in the name)."""
  overrides = []
  for seed in seeds:
    overrides.append({"method": "lottery", "seed": seed,
                      "source_workdir": {"method": "pruning", "seed": seed}})
    overrides.append({"method": "pruning", "seed": seed})
  return grid.make_runs(overrides, sweep_dir)


@pytest.mark.slow
def test_a_real_sweep_trains_the_lottery_ticket_of_its_pruning_run(tmp_path):
  """The trainer itself: a pruning run and its lottery ticket from a config's sweep(),
  two at a time; the lottery run waits, then reads the pruning run's masks."""
  config = tmp_path / "lottery_config.py"
  config.write_text(textwrap.dedent(f"""\
      import importlib.util
      from rigl_jax import config as config_lib
      _spec = importlib.util.spec_from_file_location("quickstart", {QUICKSTART!r})
      _quickstart = importlib.util.module_from_spec(_spec)
      _spec.loader.exec_module(_quickstart)

      def get_config():
        c = _quickstart.get_config()
        c.num_train_steps, c.update_every, c.log_every, c.eval_every = 40, 5, 10, 40
        return c

      def sweep():
        return config_lib.report_table_grid(
            (("lottery", None, 1.0), ("pruning", None, 1.0)), seeds=(0,), sparsities=(0.9,),
            pruning=dict(config_lib.PRUNING_BASELINE, start_step=5, end_step=30))
      """))
  sweep_dir = str(tmp_path / "sweep")
  proc = subprocess.run([sys.executable, "-m", "rigl_jax.launch.sweep", f"--config={config}",
                         f"--sweep_dir={sweep_dir}", "--concurrency=2"], cwd=REPO,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  lines = proc.stdout.splitlines()
  pruning_done = next(i for i, l in enumerate(lines) if l.startswith("finished") and "pruning" in l)
  lottery_start = next(i for i, l in enumerate(lines) if l.startswith("start") and "lottery" in l)
  assert pruning_done < lottery_start
  lottery = json.load(open(os.path.join(
      sweep_dir, "method=lottery,distribution=uniform,sparsity=0.9,seed=0", "summary.json")))
  assert 0.0 < lottery["test_accuracy"] <= 1.0
  # Its training FLOPs include the pruning run's (the report's Table 2).
  pruning = json.load(open(os.path.join(sweep_dir, next(
      n for n in os.listdir(sweep_dir) if n.startswith("method=pruning_global")), "summary.json")))
  assert lottery["train_flops_multiplier"] > pruning["train_flops_multiplier"]


# ----------------------------------------------------------------------------- local runner


def test_run_local_starts_a_lottery_run_after_its_source_and_blocks_it_on_failure(
    tmp_path, stub):
  stub_py, _, log = stub
  sweep_dir = str(tmp_path / "sweep")
  runs = _lottery_pair(sweep_dir, (0, 13))
  command = lambda run: [sys.executable, stub_py, f"--workdir={run.workdir}"]
  states = local.run_local(runs, sweep_dir, command, concurrency=2, poll_s=0.05,
                           env={"STUB_LOG": log}, log=lambda _: None)
  names = {(r.overrides["method"], r.overrides["seed"]): r for r in runs}
  assert states[names["lottery", 0].name] == "finished"
  assert states[names["pruning", 13].name] == "failed"
  assert states[names["lottery", 13].name] == "blocked"
  started = read_log(log)
  # The lottery run listed first started after its source; the blocked one never.
  assert started.index(names["pruning", 0].workdir) < started.index(names["lottery", 0].workdir)
  assert names["lottery", 13].workdir not in started
  entry = local.read_status(sweep_dir)[names["lottery", 13].name]
  assert entry["state"] == "blocked" and names["pruning", 13].name in entry["stderr_tail"]
  result = {r.name: r for r in report.collect(sweep_dir)}[names["lottery", 13].name]
  assert result.status == report.NOT_RUN and "did not finish" in result.detail



def test_run_local_skips_finished_reruns_unfinished_records_failures(tmp_path, stub):
  stub_py, _, log = stub
  sweep_dir = str(tmp_path / "sweep")
  runs = grid.make_runs([{"seed": s} for s in (0, 1, 13, 14, 15)], sweep_dir)
  by_seed = {r.overrides["seed"]: r for r in runs}
  # seed 0 finished earlier; seed 1 was interrupted (a checkpoint, no summary).
  os.makedirs(by_seed[0].workdir)
  open(os.path.join(by_seed[0].workdir, "summary.json"), "w").write("{}")
  os.makedirs(os.path.join(by_seed[1].workdir, "checkpoints", "100"))
  command = lambda run: [sys.executable, stub_py, f"--workdir={run.workdir}"]

  states = local.run_local(runs, sweep_dir, command, concurrency=2, poll_s=0.05,
                           env={"STUB_LOG": log}, log=lambda _: None)
  assert states == {r.name: s for r, s in zip(runs, ["finished", "finished", "failed",
                                                      "incomplete", "diverged"])}
  assert sorted(read_log(log)) == sorted(by_seed[s].workdir for s in (1, 13, 14, 15))
  status = local.read_status(sweep_dir)
  failed = status[by_seed[13].name]
  assert failed["state"] == "failed" and failed["returncode"] == 3
  assert "RuntimeError: boom" in failed["stderr_tail"] and failed["attempts"] == 1
  assert status[by_seed[15].name]["returncode"] == 1
  assert status[by_seed[1].name]["state"] == "finished"
  assert status[by_seed[14].name]["state"] == "incomplete"

  # Again: finished runs are skipped, the others run again; attempts are counted.
  os.remove(log)
  local.run_local(runs, sweep_dir, command, concurrency=1, poll_s=0.05,
                  env={"STUB_LOG": log}, log=lambda _: None)
  assert sorted(read_log(log)) == sorted(by_seed[s].workdir for s in (13, 14, 15))
  assert local.read_status(sweep_dir)[by_seed[13].name]["attempts"] == 2


def test_sweep_lock_refuses_a_second_sweep(tmp_path):
  with local.sweep_lock(str(tmp_path)):
    with pytest.raises(RuntimeError, match="another sweep"):
      with local.sweep_lock(str(tmp_path)):
        pass


def test_sweep_and_report_command_lines_with_stub_trainer(tmp_path, stub):
  _, exe, log = stub
  sweep_dir = str(tmp_path / "sweep")
  cmd = [sys.executable, "-m", "rigl_jax.launch.sweep", f"--config={QUICKSTART}", f"--sweep_dir={sweep_dir}",
         "--methods=set,rigl", "--seeds=0,13", "--set=num_train_steps=7", f"--python={exe}"]
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120,
                        env=dict(os.environ, STUB_LOG=log))
  assert proc.returncode == 1, proc.stderr  # the seed-13 runs fail
  status = local.read_status(sweep_dir)
  assert {n: e["state"] for n, e in status.items()} == {
      "method=set,seed=0": "finished", "method=rigl,seed=0": "finished",
      "method=set,seed=13": "failed", "method=rigl,seed=13": "failed"}
  summary = json.load(open(os.path.join(sweep_dir, "method=rigl,seed=0", "summary.json")))
  assert summary["argv"] == ["-m", "rigl_jax.main", f"--config={QUICKSTART}",
                             f"--workdir={sweep_dir}/method=rigl,seed=0",
                             "--config.num_train_steps=7", "--config.method=rigl",
                             "--config.seed=0"]
  manifest = grid.read_manifest(sweep_dir)
  assert len(manifest["runs"]) == 4 and manifest["common_overrides"] == {"num_train_steps": 7}

  out = str(tmp_path / "results")
  proc = subprocess.run([sys.executable, "-m", "rigl_jax.launch.report", f"--sweep_dir={sweep_dir}",
                         f"--out={out}"], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  table = open(os.path.join(out, "table.md")).read()
  assert "| SET (ERK) | 50.00 (n=1; 1 failed) |" in table
  assert "| method=rigl,seed=13 | failed | exit 3: RuntimeError: boom |" in table


# ----------------------------------------------------------------------------- emitted scripts


def fake_tools(tmp_path, **scripts):
  """Executables named after the keywords, in a folder to put first on PATH."""
  folder = tmp_path / "fake_bin"
  folder.mkdir(exist_ok=True)
  for name, body in scripts.items():
    (folder / name).write_text(textwrap.dedent(body))
    (folder / name).chmod(0o755)
  return str(folder)


def test_slurm_script_content_and_one_task(tmp_path, stub):
  _, exe, log = stub
  sweep_dir = str(tmp_path / "sweep")
  runs = grid.make_runs([{"method": "rigl", "seed": 0}, {"method": "set", "seed": 1},
                         {"method": "static", "seed": 2}, {"method": "set", "seed": 14}],
                        sweep_dir)
  script, listing = emit.write_slurm(runs, sweep_dir, config_path=QUICKSTART,
                                     common={"num_epochs": 5}, repo_dir=REPO, python=exe,
                                     concurrency=2, partition="gpu", setup=["echo setup-ran"])
  text = open(script).read()
  for line in ("#SBATCH --array=0-3%2", "#SBATCH --gres=gpu:1", "#SBATCH --partition=gpu",
               "#SBATCH --signal=TERM@120", "#SBATCH --requeue", "#SBATCH --time=24:00:00",
               "#SBATCH --nodes=1", "#SBATCH --ntasks-per-node=1",
               f"#SBATCH --output={sweep_dir}/slurm/%A_%a.out", "echo setup-ran"):
    assert line in text.splitlines(), line
  assert "--distributed" not in open(listing).read()  # one process per run
  assert os.path.isdir(os.path.join(sweep_dir, "slurm"))
  lines = open(listing).read().splitlines()
  assert [l.split("\t")[:3] for l in lines] == [[str(i), r.name, r.workdir]
                                                 for i, r in enumerate(runs)]
  assert "--config.num_epochs=5 --config.method=set --config.seed=1" in lines[1]

  tools = fake_tools(tmp_path, srun="""\
      #!/bin/bash
      while [[ "$1" == --* ]]; do shift; done
      exec "$@"
      """, scontrol="""\
      #!/bin/bash
      echo "$@" >> "$SCONTROL_LOG"
      """)
  scontrol_log = str(tmp_path / "scontrol.log")
  env = dict(os.environ, STUB_LOG=log, SLURM_ARRAY_TASK_ID="1", SLURM_JOB_ID="77",
             PATH=f"{tools}:{os.environ['PATH']}", SCONTROL_LOG=scontrol_log)
  proc = subprocess.run(["bash", script], capture_output=True, text=True, env=env, timeout=60)
  assert proc.returncode == 0, proc.stderr
  assert read_log(log) == [runs[1].workdir] and "setup-ran" in proc.stdout
  assert not os.path.exists(scontrol_log)  # finished: nothing to requeue
  # The task of a finished run does nothing.
  proc = subprocess.run(["bash", script], capture_output=True, text=True, env=env, timeout=60)
  assert "finished: method=set,seed=1" in proc.stdout and read_log(log) == [runs[1].workdir]
  # A run that exits 0 unfinished (stopped by the time limit) requeues its task.
  env["SLURM_ARRAY_TASK_ID"], env["SLURM_JOB_ID"] = "3", "78"
  proc = subprocess.run(["bash", script], capture_output=True, text=True, env=env, timeout=60)
  assert proc.returncode == 0 and "requeueing" in proc.stdout, proc.stdout + proc.stderr
  assert open(scontrol_log).read().split() == ["requeue", "78"]


def test_slurm_submits_lottery_runs_after_their_sources_task_by_task(tmp_path, stub):
  _, exe, log = stub
  sweep_dir = str(tmp_path / "sweep")
  runs = _lottery_pair(sweep_dir, (0, 1)) + grid.make_runs([{"method": "set", "seed": 2}],
                                                           sweep_dir)
  script, listing = emit.write_slurm(runs, sweep_dir, config_path=QUICKSTART, repo_dir=REPO,
                                     python=exe, concurrency=2)
  first = [l.split("\t")[:3] for l in open(listing).read().splitlines()]
  # The runs that wait for none: tasks 0-2 (pruning 0, pruning 1, set).
  assert [t for t, _, _ in first] == ["0", "1", "2"]
  assert "method=lottery" not in open(listing).read()
  after = os.path.join(sweep_dir, "slurm_runs_after1.tsv")
  waiting = [l.split("\t") for l in open(after).read().splitlines()]
  by_name = {r.name: r for r in runs}
  for task, name, workdir, cmd in waiting:  # each lottery run has its source's task id
    source = by_name[by_name[name].after[0]]
    assert first[int(task)][1] == source.name and workdir == by_name[name].workdir
    assert f"--config.source_workdir={source.workdir}" in cmd

  sbatch_log = str(tmp_path / "sbatch.log")
  tools = fake_tools(tmp_path, sbatch="""\
      #!/bin/bash
      echo "$@" >> "$SBATCH_LOG"
      echo "$((1000 + $(wc -l < "$SBATCH_LOG")));cluster"
      """)
  env = dict(os.environ, PATH=f"{tools}:{os.environ['PATH']}", SBATCH_LOG=sbatch_log)
  proc = subprocess.run(["bash", os.path.join(sweep_dir, "submit.sh")], capture_output=True,
                        text=True, env=env, timeout=60)
  assert proc.returncode == 0, proc.stderr
  calls = open(sbatch_log).read().splitlines()
  assert calls[0] == f"--parsable {script} {listing}"
  assert calls[1] == (f"--parsable --dependency=aftercorr:1001 --kill-on-invalid-dep=yes "
                      f"--array=0,1%2 {script} {after}")
  # Task 1 of the second array runs the lottery run of seed 1.
  tools_run = fake_tools(tmp_path, srun="""\
      #!/bin/bash
      while [[ "$1" == --* ]]; do shift; done
      exec "$@"
      """)
  env = dict(os.environ, STUB_LOG=log, SLURM_ARRAY_TASK_ID="1", SLURM_JOB_ID="9",
             PATH=f"{tools_run}:{os.environ['PATH']}")
  proc = subprocess.run(["bash", script, after], capture_output=True, text=True, env=env,
                        timeout=60)
  assert proc.returncode == 0, proc.stderr
  lottery_1 = [r for r in runs if r.after and r.overrides["seed"] == 1][0]
  assert read_log(log) == [lottery_1.workdir]


def test_slurm_multinode_script_and_device_check(tmp_path):
  sweep_dir = str(tmp_path / "sweep")
  runs = grid.make_runs([{"method": "rigl", "seed": 0}], sweep_dir)
  script, listing = emit.write_slurm(runs, sweep_dir, config_path=QUICKSTART, nodes=4,
                                     gpus_per_node=8, python="python")
  text = open(script).read().splitlines()
  for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=8", "#SBATCH --gres=gpu:8"):
    assert line in text, line
  assert any(l.startswith("srun --kill-on-bad-exit=1 --nodes=4 --ntasks-per-node=8 ")
             for l in text)
  assert "-m rigl_jax.main --distributed --config=" in open(listing).read()
  base = grid.load_config_module(QUICKSTART).get_config()  # batch 100
  emit.check_runs_fit(runs, base, {}, 4)
  with pytest.raises(ValueError, match=r"method=rigl,seed=0 on 32 devices: config\.batch_size"):
    emit.check_runs_fit(runs, base, {}, 32)
  assert emit.tpu_devices("v4-32") == 16 and emit.tpu_devices("v5litepod-16") == 16
  assert emit.tpu_devices("v5p-128") == 64 and emit.tpu_devices("v6e-256") == 256
  with pytest.raises(ValueError, match="--tpu_type"):
    emit.tpu_devices("v9-8")


@pytest.mark.slow
def test_sweep_refuses_a_batch_that_does_not_divide_over_the_pod_when_emitting(tmp_path):
  sweep_dir = str(tmp_path / "sweep")
  base = [sys.executable, "-m", "rigl_jax.launch.sweep", f"--config={CIFAR10}",
          f"--sweep_dir={sweep_dir}", "--emit=tpu"]
  proc = subprocess.run(base, cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith(
      "error: --tpu_type: needed"), proc.stderr
  # CIFAR's batch of 128 does not divide over a v5p-96's 48 chips.
  proc = subprocess.run(base + ["--tpu_type=v5p-96"], cwd=REPO, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 2, proc.stderr
  assert "on 48 devices: config.batch_size: 128 is not divisible" in proc.stderr
  assert not os.path.exists(os.path.join(sweep_dir, "sweep_tpu.sh"))
  proc = subprocess.run(base + ["--tpu_type=v4-32"], cwd=REPO, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert os.path.exists(os.path.join(sweep_dir, "sweep_tpu.sh"))


# A fake gcloud for a pod of two workers: runs --command once per worker, each with its
# own HOME and host name, and logs its arguments. With FAIL_ONCE set, the first poll
# fails as a dropped connection would.
FAKE_GCLOUD = """\
    #!/bin/bash
    printf '%s\\n' "$@" >> "$GCLOUD_LOG"; echo ---- >> "$GCLOUD_LOG"
    for a in "$@"; do case "$a" in --command=*) cmd="${a#--command=}";; esac; done
    if [[ -n "${FAIL_ONCE:-}" && "$cmd" != *nohup* && ! -f "$FAIL_ONCE" ]]; then
      touch "$FAIL_ONCE"; echo "ssh: connection reset" >&2; exit 255
    fi
    rc=0
    for w in 0 1; do
      mkdir -p "$PODS/worker$w"
      HOME="$PODS/worker$w" bash -c "hostname() { echo tpu-worker-$w; }; $cmd" || rc=$?
    done
    exit $rc
    """


@pytest.mark.slow
def test_tpu_script_starts_detached_polls_and_resumes(tmp_path, stub, monkeypatch):
  monkeypatch.chdir(REPO)  # the config path is written relative to the repository
  _, exe, log = stub
  sweep_dir = str(tmp_path / "sweep")
  runs = grid.make_runs([{"method": "rigl", "seed": 0}, {"method": "rigl", "seed": 13},
                         {"method": "rigl", "seed": 14}], sweep_dir)
  script = emit.write_tpu(runs, sweep_dir, config_path=QUICKSTART, common={"batch_size": 64},
                          tpu_name="pod-1", zone="us-central2-b", repo_dir=REPO, python=exe,
                          poll_s=1)
  text = open(script).read()
  assert text.count("\nrun ") == 3 and "TPU_NAME=${TPU_NAME:-pod-1}" in text
  gcloud = fake_tools(tmp_path, gcloud=FAKE_GCLOUD)
  gcloud_log = str(tmp_path / "gcloud.log")
  env = dict(os.environ, GCLOUD=f"{gcloud}/gcloud", GCLOUD_LOG=gcloud_log, STUB_LOG=log,
             PODS=str(tmp_path / "pods"), POLL_S="0.2", FAIL_ONCE=str(tmp_path / "failed"))
  proc = subprocess.run(["bash", script], capture_output=True, text=True, env=env, timeout=120)
  assert proc.returncode == 1, proc.stdout + proc.stderr  # the seed-13 run fails
  assert "polling the workers failed; the run goes on there" in proc.stderr
  calls = [c.strip().split("\n") for c in open(gcloud_log).read().split("----") if c.strip()]
  for call in calls:
    assert call[:6] == ["compute", "tpus", "tpu-vm", "ssh", "pod-1", "--zone=us-central2-b"]
    assert "--worker=all" in call
  starts = [c for c in calls if "nohup" in c[-1]]
  assert len(starts) == 3
  for call, run in zip(starts, runs):
    remote = call[-1]
    assert "-m rigl_jax.main --distributed --config=configs/quickstart.py" in remote
    assert f"--config.batch_size=64 --config.method=rigl --config.seed={run.overrides['seed']}" \
        in remote
  # Both workers ran each unfinished run, detached, with their own logs and exit codes
  # (the fake's workers start one after the other, so worker 1 may find seed 0, which
  # the stub finishes at once, already finished).
  started = read_log(log)
  assert set(started) == {r.workdir for r in runs}
  assert started.count(runs[1].workdir) == started.count(runs[2].workdir) == 2
  for w in (0, 1):
    logs = tmp_path / "pods" / f"worker{w}" / "rigl_jax_logs" / "sweep"
    assert (logs / runs[1].name / f"exit_code.tpu-worker-{w}").read_text().strip() == "3"
    assert "RuntimeError: boom" in (logs / runs[1].name / f"worker-tpu-worker-{w}.log").read_text()
  assert open(os.path.join(sweep_dir, "tpu_failed.txt")).read().split() == [runs[1].name]
  assert f"{runs[2].name}: stopped before its end" in proc.stdout  # seed 14: exit 0, unfinished
  # Again: the finished run is skipped on the workers, the others start again.
  subprocess.run(["bash", script], capture_output=True, text=True, env=env, timeout=120)
  again = read_log(log)[len(started):]
  assert sorted(again) == sorted(r.workdir for r in runs[1:] for _ in range(2))


def test_tpu_script_runs_sources_first_and_skips_runs_whose_source_failed(
    tmp_path, stub, monkeypatch):
  monkeypatch.chdir(REPO)
  _, exe, log = stub
  sweep_dir = str(tmp_path / "sweep")
  runs = _lottery_pair(sweep_dir, (0, 13))
  script = emit.write_tpu(runs, sweep_dir, config_path=QUICKSTART, repo_dir=REPO,
                          python=exe, poll_s=1)
  gcloud = fake_tools(tmp_path, gcloud=FAKE_GCLOUD)
  env = dict(os.environ, GCLOUD=f"{gcloud}/gcloud", GCLOUD_LOG=str(tmp_path / "gcloud.log"),
             STUB_LOG=log, PODS=str(tmp_path / "pods"), POLL_S="0.2")
  proc = subprocess.run(["bash", script], capture_output=True, text=True, env=env, timeout=120)
  assert proc.returncode == 1, proc.stdout + proc.stderr
  names = {(r.overrides["method"], r.overrides["seed"]): r for r in runs}
  started = list(dict.fromkeys(read_log(log)))  # both workers log each start
  assert started == [names["pruning", 0].workdir, names["pruning", 13].workdir,
                     names["lottery", 0].workdir]
  assert (f"{names['lottery', 13].name}: not started: run {names['pruning', 13].name} "
          f"did not finish") in proc.stderr
  assert open(os.path.join(sweep_dir, "tpu_failed.txt")).read().split() == [
      names["pruning", 13].name, names["lottery", 13].name]


# ----------------------------------------------------------------------------- hours


def test_accelerator_hours(tmp_path):
  module = grid.load_config_module(CIFAR10)
  base = module.get_config()
  configs = [grid.apply_overrides(base, r.overrides)
             for r in grid.make_runs(sweep.expand(CIFAR10), str(tmp_path), base)]
  steps_per_run = 250 * ((50_000 - 5_000) // 128)  # 87,750, as the report
  result = cost.estimate(configs, {"a100": 0.05, "v100": 0.1})
  # Per seed and sparsity 10 rows trained 1x and 5 trained 2x; 3 dense runs.
  one_x_runs = 3 * 4 * (10 + 5 * 2) + 3
  assert result["runs"] == 183 and result["steps"] == one_x_runs * steps_per_run
  assert math.isclose(result["hours"]["v100"], one_x_runs * steps_per_run * 0.1 / 3600)
  longer = [grid.apply_overrides(base, {"train_multiplier": m}) for m in (1.0, 2.0, 3.0)]
  assert cost.estimate(longer, {})["steps"] == 6 * steps_per_run
  assert "no seconds per step" in cost.format_estimate("x", cost.estimate(longer, {}))
  assert cost.parse_seconds_per_step(["a100=0.05"]) == {"a100": 0.05}
  with pytest.raises(ValueError):
    cost.parse_seconds_per_step(["a100"])
  # Measured: the median over the runs' metrics, first line (compilation) left out.
  for name, rates in (("a", [0.1, 4.0, 5.0]), ("b", [0.5, 2.0])):
    os.makedirs(tmp_path / name)
    with open(tmp_path / name / "metrics.jsonl", "w") as f:
      for r in rates:
        f.write(json.dumps({"step": 1, "steps_per_s": r}) + "\n")
  assert math.isclose(cost.measured_seconds_per_step(str(tmp_path)), 0.25)


# ----------------------------------------------------------------------------- report


TRAIN_JOBS = textwrap.dedent("""\
    import json, sys
    from rigl_jax.launch import grid
    from rigl_jax import train
    jobs = json.load(open(sys.argv[1]))
    base = grid.load_config_module(jobs["config"]).get_config()
    for job in jobs["runs"]:
      overrides = grid.normalize(dict(jobs["common"], **job["overrides"]), base)
      train.train_and_evaluate(grid.apply_overrides(base, overrides), job["workdir"])
    """)


@pytest.fixture(scope="module")
def real_sweep(tmp_path_factory):
  """RigL and RigL-SG (redistribution), ERK 90%, seeds 0 and 1: tiny real runs of
  LeNet-300-100 on mnist5k (20 steps). Seed 2 of RigL fails (recorded in status.json),
  seed 2 of RigL-SG has a NaN accuracy."""
  tmp = tmp_path_factory.mktemp("real")
  sweep_dir = str(tmp / "sweep")
  common = ["num_train_steps=20", "batch_size=50", "eval_batch_size=500", "update_every=5",
            "lr_drop_steps=(15,)", "log_every=5", "checkpoint_every=20"]
  runs, common, base = sweep.plan(QUICKSTART, sweep_dir, common_assignments=common,
                                  methods=["rigl", "rigl_sg"], distributions=["erk"],
                                  sparsities=["0.9"], seeds=["0", "1", "2"])
  grid.write_manifest(sweep_dir, config_path=QUICKSTART, common=common, runs=runs,
                      base_config=base)
  # train_and_evaluate of the seed 0 and 1 runs, in one process that caches compilations
  # (the seeds share most programs), so that the jax cache settings stay out of pytest.
  jobs = {"config": QUICKSTART, "common": common,
          "runs": [{"overrides": r.overrides, "workdir": r.workdir}
                   for r in runs if r.overrides["seed"] < 2]}
  (tmp / "jobs.json").write_text(json.dumps(jobs))
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(tmp / "jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
  proc = subprocess.run([sys.executable, "-c", TRAIN_JOBS, str(tmp / "jobs.json")], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  # Seed 2 of RigL: a stub trainer that exits 3 (the stub fails for "seed=13" names).
  stub_path = os.path.join(sweep_dir, "stub.py")
  open(stub_path, "w").write(STUB)
  names = {r.name: r for r in runs}
  failing = names["method=rigl,distribution=erk,sparsity=0.9,seed=2"]
  states = local.run_local([failing], sweep_dir, lambda r: [
      sys.executable, stub_path, f"--workdir={r.workdir}/seed=13"], log=lambda _: None,
                           poll_s=0.05)
  assert states == {failing.name: "failed"}
  # Seed 2 of RigL-SG: a summary whose accuracy is not finite.
  nan_run = names["method=rigl_sg,distribution=erk,sparsity=0.9,seed=2"]
  os.makedirs(nan_run.workdir)
  with open(os.path.join(nan_run.workdir, "summary.json"), "w") as f:
    json.dump({"test_accuracy": float("nan"), "val_accuracy": float("nan")}, f)
  return sweep_dir, runs


@pytest.mark.slow
def test_report_tables_and_plots_from_real_runs(real_sweep, tmp_path):
  sweep_dir, runs = real_sweep
  out = str(tmp_path / "results")
  result = report.build_report(sweep_dir, out)
  summaries = {}
  for run in runs:
    path = os.path.join(run.workdir, "summary.json")
    if run.overrides["seed"] < 2:
      summaries.setdefault(run.overrides["method"], []).append(json.load(open(path)))
  table = list(csv.DictReader(open(os.path.join(out, "table.csv"))))
  assert [r["row"] for r in table] == ["RigL (ERK)", "RigL-SG (ERK)"]
  md = open(os.path.join(out, "table.md")).read()
  for row, method, problem in ((table[0], "rigl", "failed"), (table[1], "rigl_sg", "diverged")):
    acc = np.array([s["test_accuracy"] for s in summaries[method]]) * 100
    assert math.isclose(float(row["acc_mean@0.9"]), acc.mean(), rel_tol=1e-9)
    assert math.isclose(float(row["acc_std@0.9"]), acc.std(ddof=1), rel_tol=1e-9)
    assert row["n@0.9"] == "2" and row["not_ok@0.9"] == "1"
    train_mult = np.mean([s["train_flops_multiplier"] for s in summaries[method]])
    assert math.isclose(float(row["train_flops@0.9"]), train_mult, rel_tol=1e-9)
    cell = f"{acc.mean():.2f} ± {acc.std(ddof=1):.2f} (n=2; 1 {problem})"
    assert row["cell@0.9"] == cell and cell in md
  assert "| method=rigl,distribution=erk,sparsity=0.9,seed=2 | failed | exit 3:" in md
  assert "| method=rigl_sg,distribution=erk,sparsity=0.9,seed=2 | diverged | non-finite" in md
  by_name = {r["name"]: r for r in csv.DictReader(open(os.path.join(out, "runs.csv")))}
  assert len(by_name) == 6
  assert by_name["method=rigl,distribution=erk,sparsity=0.9,seed=2"]["status"] == "failed"
  for name in ("accuracy_vs_sparsity.png", "accuracy_vs_train_flops.png", "layer_densities.png",
               "redistribution_rigl_sg_erk_0_9.png"):
    assert name in result["files"], sorted(result["files"])
    data = open(os.path.join(out, name), "rb").read()
    assert data.startswith(b"\x89PNG") and len(data) > 5000, name


@pytest.mark.slow
def test_report_flops_over_training_and_unfinished_runs(real_sweep, tmp_path):
  sweep_dir, runs = real_sweep
  results = {r.name: r for r in report.collect(sweep_dir)}
  sg = results["method=rigl_sg,distribution=erk,sparsity=0.9,seed=0"]
  steps, values = report.flops_over_training(sg)
  assert steps == [5, 10, 15, 20]
  # The mean per-step multiplier over training is the run's train FLOPs over dense.
  dense_train = 3 * sg.summary["dense_forward_flops"] * sg.fields["batch_size"] * 20
  assert math.isclose(np.mean(values), sg.summary["train_flops"] / dense_train, rel_tol=1e-9)
  # A workdir without a summary and without a status entry is an unfinished run.
  extra = os.path.join(sweep_dir, "method=set,distribution=erk,sparsity=0.9,seed=0")
  os.makedirs(extra, exist_ok=True)
  open(os.path.join(extra, "config.json"), "w").write(json.dumps({"method": "set"}))
  try:
    rows, _ = report.build_rows(report.collect(sweep_dir))
    set_row = [r for r in rows if r.label == "SET (ERK)"][0]
    assert report.accuracy_text(set_row.cells[0.9]) == "1 unfinished"
  finally:
    os.remove(os.path.join(extra, "config.json"))
    os.rmdir(extra)


# ----------------------------------------------------------------------------- tuning


def fake_accuracy(alpha, dt, seed):
  return 0.9 - (alpha - 0.35) ** 2 - 1e-5 * abs(dt - 300) + 0.001 * seed


def make_stub_train(calls):
  def train_fn(config, workdir):
    calls.append(workdir)
    if config.seed == 7:
      raise FloatingPointError("non-finite loss")
    acc = fake_accuracy(config.drop_fraction, config.update_every, config.seed)
    summary = {"val_accuracy": acc, "test_accuracy": acc - 0.01}
    os.makedirs(workdir, exist_ok=True)
    json.dump(summary, open(os.path.join(workdir, "summary.json"), "w"))
    return summary
  return train_fn


def test_tpe_objective_study_and_resume(tmp_path):
  optuna = pytest.importorskip("optuna")
  optuna.logging.set_verbosity(optuna.logging.WARNING)
  from rigl_jax import config as config_lib  # pylint: disable=import-outside-toplevel
  config = config_lib.base_config()
  calls = []
  study = tune.run_tpe(config, str(tmp_path), seeds=(0, 1), n_trials=3, study_name="s",
                       train_fn=make_stub_train(calls))
  trials = study.trials
  assert [t.state.name for t in trials] == ["COMPLETE"] * 3 and len(calls) == 6
  for t in trials:
    alpha, dt = t.params["drop_fraction"], t.params["update_every"]
    assert 0.1 <= alpha <= 0.6 and dt in range(50, 951, 50)
    expected = np.mean([fake_accuracy(alpha, dt, s) for s in (0, 1)])
    assert math.isclose(t.value, expected, rel_tol=1e-12)
    for seed in (0, 1):
      name = grid.run_name({"drop_fraction": alpha, "update_every": dt, "seed": seed})
      assert os.path.exists(tmp_path / "s" / name / "summary.json")
  assert os.path.exists(tmp_path / "optuna.db")
  assert len(list(csv.DictReader(open(tmp_path / "s" / "trials.csv")))) == 3

  # A killed process leaves a RUNNING trial; resuming fails it and tries its params again.
  killed = optuna.load_study(study_name="s", storage=tune.storage_url(str(tmp_path))).ask()
  stale = {"drop_fraction": killed.suggest_float("drop_fraction", 0.1, 0.6),
           "update_every": killed.suggest_int("update_every", 50, 950, step=50)}
  study = tune.run_tpe(config, str(tmp_path), seeds=(0, 1), n_trials=4, study_name="s",
                       train_fn=make_stub_train(calls))
  assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3 + ["FAIL", "COMPLETE"]
  assert study.trials[-1].params == stale and len(calls) == 8

  # Ctrl-C (or SIGTERM, the trainer then returns "preempted") in the second seed of a
  # trial: the trial fails as interrupted; resuming tries its params again and reads
  # its finished first seed back.
  def interrupted_train(config, workdir):
    if config.seed == 1:
      return {"preempted": True, "steps": 3}
    return make_stub_train(calls)(config, workdir)
  with pytest.raises(KeyboardInterrupt):
    tune.run_tpe(config, str(tmp_path), seeds=(0, 1), n_trials=5, study_name="s",
                 train_fn=interrupted_train)
  cut = optuna.load_study(study_name="s", storage=tune.storage_url(str(tmp_path))).trials[-1]
  assert cut.state.name == "FAIL" and cut.user_attrs["interrupted"] and len(calls) == 9
  study = tune.run_tpe(config, str(tmp_path), seeds=(0, 1), n_trials=5, study_name="s",
                       train_fn=make_stub_train(calls))
  assert study.trials[-1].state.name == "COMPLETE" and study.trials[-1].params == cut.params
  assert len(calls) == 10 and len(study.trials) == 7  # only seed 1 ran again
  # A resumed study does not replay the sampler's draws of its first start.
  assert len({tuple(sorted(t.params.items())) for t in study.trials}) == 5

  # Finished runs are read back, not retrained; a diverged seed counts as accuracy 0.
  objective = tune.make_objective(config, str(tmp_path / "s"), (0, 7),
                                  train_fn=make_stub_train(calls))
  trial = optuna.trial.FixedTrial(stale)
  value = objective(trial)
  assert len(calls) == 11  # seed 0 was on disk; seed 7 ran (and diverged)
  assert math.isclose(value, fake_accuracy(stale["drop_fraction"], stale["update_every"], 0) / 2)
  assert trial.user_attrs["diverged_seeds"] == [7]


def test_tune_without_optuna_says_how_to_install(monkeypatch):
  monkeypatch.setitem(sys.modules, "optuna", None)
  with pytest.raises(ImportError, match="pip install"):
    tune.import_optuna()


def test_lr_grid_mode_runs_the_grid_and_reports(tmp_path, stub, monkeypatch):
  _, exe, log = stub
  monkeypatch.setenv("STUB_LOG", log)
  sweep_dir = str(tmp_path / "lr")
  states = tune.run_lr_grid(QUICKSTART, sweep_dir, seeds=(0, 13), fixed={"sparsity": 0.8},
                            python=exe, learning_rates=(10.0, 2.0), pairs=((0.3, 100),))
  assert sorted(states.values()) == ["failed", "failed", "finished", "finished"]
  assert len(read_log(log)) == 4
  argv = json.load(open(os.path.join(
      sweep_dir, "learning_rate=2.0,drop_fraction=0.3,update_every=100,seed=0",
      "summary.json")))["argv"]
  assert "--config.sparsity=0.8" in argv and "--config.learning_rate=2.0" in argv
  table = list(csv.DictReader(open(os.path.join(sweep_dir, "report", "table.csv"))))
  assert [r["row"] for r in table] == [  # numbers sort as numbers
      "RigL (ERK), learning_rate=2.0", "RigL (ERK), learning_rate=10.0"]
  assert all(r["n@0.8"] == "1" and r["not_ok@0.8"] == "1" for r in table)


def test_row_fields_ignore_settings_of_one_method_only():
  """The pruning rows' own schedule labels no row; a field varied within a method does."""
  def result(**fields):
    return report.RunResult(name="x", workdir="x", fields=fields, status=report.OK)

  runs = [result(method="rigl", distribution="erk", start_step=0, learning_rate=0.1),
          result(method="rigl", distribution="erk", start_step=0, learning_rate=0.05),
          result(method="pruning_global", distribution="uniform", start_step=700,
                 learning_rate=0.1)]
  assert report.row_fields(runs) == ["method", "distribution", "train_multiplier",
                                     "learning_rate"]
  runs.append(result(method="pruning_global", distribution="uniform", start_step=0))
  assert "start_step" in report.row_fields(runs)


def test_one_seed_shows_no_spread():
  def cell(*accuracies):
    return report.Cell(runs=[report.RunResult(name=f"r{i}", workdir="x", fields={},
                                              status=report.OK,
                                              summary={"test_accuracy": a})
                             for i, a in enumerate(accuracies)])

  assert report.accuracy_text(cell(0.919)) == "91.90 (n=1)"
  assert report.accuracy_text(cell(0.92, 0.93)) == "92.50 ± 0.71 (n=2)"


def test_language_model_sweeps_report_bits_per_char(tmp_path):
  """A sweep whose runs have test_bits_per_char is tabled and plotted in it."""
  sweep = tmp_path / "sweep"
  for method, sparsity, bits in (("dense", 0.0, 2.0), ("rigl", 0.75, 2.25),
                                 ("rigl", 0.75, 2.35), ("static", 0.75, 2.5)):
    workdir = sweep / f"method={method},sparsity={sparsity},seed={int(bits * 100)}"
    workdir.mkdir(parents=True)
    summary = {"method": method, "distribution": "erk", "sparsity": sparsity,
               "seed": int(bits * 100), "train_multiplier": 1.0, "test_accuracy": 0.5,
               "test_bits_per_char": bits, "train_flops_multiplier": 0.3,
               "test_flops_multiplier": 0.3, "global_density": 0.25, "layer_densities": {}}
    (workdir / "summary.json").write_text(json.dumps(summary))
  out = report.build_report(str(sweep), str(tmp_path / "out"))
  table = (tmp_path / "out" / "table.md").read_text()
  assert "75% sparse: Bits per char (Test)" in table and "lower is better" in table
  assert "| RigL (ERK) | 2.30 ± 0.07 (n=2) |" in table
  assert "| Dense |  |  | 2.00 (n=1) |" in table
  assert os.path.exists(tmp_path / "out" / "bits_per_char_vs_sparsity.png")
  assert "bits_per_char_vs_train_flops.png" in out["files"]


def test_tpu_setup_script_copies_the_repository_and_makes_a_python_3_11_environment(
    tmp_path):
  script = emit.write_tpu_setup(str(tmp_path), tpu_name="pod-1", zone="us-central2-b",
                                local_repo=REPO)
  text = open(script).read()
  assert subprocess.run(["bash", "-n", script], capture_output=True).returncode == 0
  assert f"git -C {REPO} archive --format=tar.gz" in text
  assert "tpu-vm scp" in text and text.count("--worker=all") == 2
  for part in ("uv venv --python 3.11", "jax[tpu]", ".[train,gcs]", "-c constraints.txt"):
    assert part in text, part
  # The archive it copies holds the package and the constraints the install reads.
  archive = tmp_path / "src.tar.gz"
  subprocess.run(["git", "-C", REPO, "archive", "--format=tar.gz", "-o", str(archive), "HEAD"],
                 check=True)
  import tarfile  # pylint: disable=import-outside-toplevel
  names = tarfile.open(archive).getnames()
  assert "constraints.txt" in names and "rigl_jax/main.py" in names
