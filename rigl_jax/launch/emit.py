"""Scripts that run a sweep elsewhere: a SLURM job array, or a multi-host TPU pod.

Both scripts skip runs whose workdir already holds ``summary.json`` and otherwise run
the same trainer command, which resumes from the run's latest checkpoint; so
submitting a script again finishes what a first submission left undone. Nothing is
submitted here.

SLURM (``sweep.slurm`` + ``slurm_runs.tsv``): one array task per run. Task ``i`` reads
line ``i + 1`` of the list (``NAME<TAB>COMMAND``). ``--signal=B:TERM@120`` sends
SIGTERM two minutes before the time limit; the command is ``exec``-ed, so the trainer
itself gets it, saves a checkpoint and exits 0.

TPU pod (``sweep_tpu.sh``): every run executes on all workers of the pod at once
(``gcloud compute tpus tpu-vm ssh --worker=all``, one process per host,
``--distributed``), the runs one after another. The sweep directory must be a path
every worker sees (a shared file system) and the repository must be installed on
every worker at ``repo_dir``.
"""

from __future__ import annotations

import os
import shlex
from typing import Sequence

from rigl_jax.launch import grid
from rigl_jax.launch import local

SLURM_SCRIPT, SLURM_LIST = "sweep.slurm", "slurm_runs.tsv"
TPU_SCRIPT = "sweep_tpu.sh"


def _write_script(path: str, text: str) -> str:
  with open(path, "w") as f:
    f.write(text)
  os.chmod(path, 0o755)
  return path


def write_slurm(runs: Sequence[grid.Run], sweep_dir: str, *, config_path: str,
                common: dict | None = None, repo_dir: str = ".", python: str = "python",
                concurrency: int | None = None, job_name: str = "rigl_jax",
                partition: str = "", gres: str = "gpu:1", cpus_per_task: int = 8,
                mem: str = "", time_limit: str = "24:00:00", setup: Sequence[str] = (),
                ) -> tuple[str, str]:
  """Writes ``sweep.slurm`` and ``slurm_runs.tsv`` into ``sweep_dir``; returns their paths.

  Args:
    runs: one array task each, in this order.
    config_path, common: the trainer's config file and the overrides of every run.
    repo_dir: the directory the tasks ``cd`` into (absolute paths are safest).
    python: the interpreter on the compute nodes.
    concurrency: at most this many tasks at once (``--array=0-N%C``); None: no limit.
    partition, gres, cpus_per_task, mem, time_limit: ``#SBATCH`` resources
      ('' leaves a field out).
    setup: shell lines run before the trainer (``module load ...``, ``source venv``).
  """
  if not runs:
    raise ValueError("no runs to write")
  sweep_dir = os.path.abspath(sweep_dir)
  os.makedirs(os.path.join(sweep_dir, "slurm"), exist_ok=True)
  list_path = os.path.join(sweep_dir, SLURM_LIST)
  with open(list_path, "w") as f:
    for run in runs:
      run = grid.Run(run.name, run.overrides, os.path.join(sweep_dir, run.name))
      cmd = local.trainer_command(config_path, run, common, python=python)
      f.write(f"{run.name}\t{shlex.join(cmd)}\n")
  array = f"0-{len(runs) - 1}" + (f"%{concurrency}" if concurrency else "")
  directives = [f"--job-name={job_name}", f"--array={array}",
                f"--output={sweep_dir}/slurm/%A_%a.out", f"--error={sweep_dir}/slurm/%A_%a.err",
                f"--cpus-per-task={cpus_per_task}", f"--time={time_limit}",
                "--signal=B:TERM@120", "--requeue"]
  if gres:
    directives.append(f"--gres={gres}")
  if partition:
    directives.append(f"--partition={partition}")
  if mem:
    directives.append(f"--mem={mem}")
  lines = [
      "#!/bin/bash",
      f"# {len(runs)} runs of {config_path}, written by `python -m rigl_jax.launch.sweep --emit=slurm`.",
      f"# Submit: sbatch {shlex.quote(os.path.join(sweep_dir, SLURM_SCRIPT))}",
      "# Finished runs (summary.json present) exit at once; submit again to resume the rest.",
      "# Run one task by hand: SLURM_ARRAY_TASK_ID=3 bash THIS_SCRIPT",
      *(f"#SBATCH {d}" for d in directives),
      "set -euo pipefail",
      f"SWEEP_DIR={shlex.quote(sweep_dir)}",
      f'LIST="$SWEEP_DIR/{SLURM_LIST}"',
      'TASK="${SLURM_ARRAY_TASK_ID:?SLURM_ARRAY_TASK_ID is not set}"',
      'LINE=$(sed -n "$((TASK + 1))p" "$LIST")',
      'if [[ -z "$LINE" ]]; then echo "no run $TASK in $LIST" >&2; exit 1; fi',
      "NAME=${LINE%%$'\\t'*}",
      "CMD=${LINE#*$'\\t'}",
      'if [[ -f "$SWEEP_DIR/$NAME/summary.json" ]]; then',
      '  echo "finished: $NAME"',
      "  exit 0",
      "fi",
      f"cd {shlex.quote(repo_dir)}",
      *setup,
      'echo "run $TASK: $NAME on $(hostname)"',
      'eval "exec $CMD"',
      "",
  ]
  return _write_script(os.path.join(sweep_dir, SLURM_SCRIPT), "\n".join(lines)), list_path


def write_tpu(runs: Sequence[grid.Run], sweep_dir: str, *, config_path: str,
              common: dict | None = None, tpu_name: str = "my-tpu-pod", zone: str = "",
              project: str = "", repo_dir: str = "~/rigl_jax", python: str = "python3",
              setup: Sequence[str] = ()) -> str:
  """Writes ``sweep_tpu.sh`` into ``sweep_dir``: the runs one after another, each on
  all workers of the pod; returns its path.

  ``TPU_NAME``, ``ZONE``, ``PROJECT`` and ``GCLOUD`` in the environment override the
  values written. ``repo_dir`` is expanded by the workers' shell (``~`` works).
  ``config_path`` is made relative to the current directory when it lies inside it
  (the repository is at another place on the workers). Failed runs are listed in
  ``SWEEP_DIR/tpu_failed.txt``; the script goes on and exits 1 at the end.
  """
  if not runs:
    raise ValueError("no runs to write")
  os.makedirs(sweep_dir, exist_ok=True)
  config_rel = os.path.relpath(config_path)
  if config_rel.startswith(".."):
    config_rel = config_path
  lines = [
      "#!/bin/bash",
      f"# {len(runs)} runs of {config_path} on a multi-host TPU pod, one after another,",
      "# written by `python -m rigl_jax.launch.sweep --emit=tpu`. Every run executes on all workers",
      "# (--worker=all) with --distributed; the sweep directory must be on a file system",
      "# every worker sees. Finished runs are skipped; run the script again to resume.",
      "set -uo pipefail",
      f"TPU_NAME=${{TPU_NAME:-{shlex.quote(tpu_name)}}}",
      f"ZONE=${{ZONE:-{shlex.quote(zone)}}}",
      f"PROJECT=${{PROJECT:-{shlex.quote(project)}}}",
      'GCLOUD="${GCLOUD:-gcloud}"',
      f"FAILED_LOG={shlex.quote(os.path.join(sweep_dir, 'tpu_failed.txt'))}",
      "failed=0",
      "",
      "run() {  # NAME REMOTE_COMMAND",
      '  echo "=== $1"',
      '  if ! "$GCLOUD" compute tpus tpu-vm ssh "$TPU_NAME" ${ZONE:+--zone="$ZONE"} \\',
      '      ${PROJECT:+--project="$PROJECT"} --worker=all --command="$2"; then',
      '    echo "$1" >> "$FAILED_LOG"',
      "    failed=$((failed + 1))",
      "  fi",
      "}",
      "",
  ]
  prefix = " && ".join([f"cd {repo_dir}", *setup])
  for run in runs:
    cmd = local.trainer_command(config_rel, run, common, python=python, distributed=True)
    summary = os.path.join(run.workdir, local.SUMMARY)
    remote = (f"{prefix} && if [ -f {shlex.quote(summary)} ]; then echo finished; "
              f"else {shlex.join(cmd)}; fi")
    lines.append(f"run {shlex.quote(run.name)} {shlex.quote(remote)}")
  lines += ["", 'echo "$failed failed run(s)"', "exit $((failed > 0))", ""]
  return _write_script(os.path.join(sweep_dir, TPU_SCRIPT), "\n".join(lines))
