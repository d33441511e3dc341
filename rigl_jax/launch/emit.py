"""Scripts that run a sweep elsewhere: a SLURM job array, or a multi-host TPU pod.

Both scripts skip runs whose workdir already holds ``summary.json`` and otherwise run
the same trainer command, which resumes from the run's latest checkpoint; so
submitting a script again finishes what a first submission left undone. Nothing is
submitted here.

SLURM (``submit.sh``, ``sweep.slurm``, ``slurm_runs*.tsv``): one array task per run;
task ``i`` runs the line of its list that starts with ``i`` (``TASK<TAB>NAME<TAB>
WORKDIR<TAB>COMMAND``). ``submit.sh`` submits the runs that wait for none as one
array, then the runs that wait for one of them (a lottery ticket for its pruning run)
as a second array whose task ``i`` has its source's task id and starts after task
``i`` of the first array has finished with exit 0 (``--dependency=aftercorr``).
``--signal=TERM@120`` sends SIGTERM two minutes before the time limit to the trainer,
which saves a checkpoint and exits 0; the task then requeues itself.

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

from rigl_jax import paths
from rigl_jax.launch import grid
from rigl_jax.launch import local

SLURM_SCRIPT, SLURM_LIST, SLURM_SUBMIT = "sweep.slurm", "slurm_runs.tsv", "submit.sh"
TPU_SCRIPT, TPU_SETUP_SCRIPT = "sweep_tpu.sh", "tpu_setup.sh"


def _dirs(sweep_dir: str, script_dir: str | None) -> tuple[str, str]:
  """(the sweep's folder or URL, the local folder of the scripts)."""
  if script_dir is None:
    if paths.is_url(sweep_dir):
      raise ValueError(f"--script_dir: needed with a URL sweep_dir ({sweep_dir}): a local "
                       f"folder for the scripts and their logs")
    script_dir = sweep_dir
  return paths.resolve(sweep_dir), os.path.abspath(script_dir)


def _write_script(path: str, text: str) -> str:
  with open(path, "w") as f:
    f.write(text)
  os.chmod(path, 0o755)
  return path


# Chips (JAX devices) of a Cloud TPU slice: v4 and v5p names count TensorCores (two
# per chip), v5e and v6e names count chips.
_TPU_CORES_PER_CHIP = {"v4": 2, "v5p": 2, "v5litepod": 1, "v5e": 1, "v6e": 1}


def tpu_devices(accelerator_type: str) -> int:
  """The JAX device count of a slice, e.g. ``v4-32`` -> 16, ``v5litepod-16`` -> 16."""
  generation, _, size = accelerator_type.partition("-")
  if generation not in _TPU_CORES_PER_CHIP or not size.isdigit() or int(size) < 1:
    raise ValueError(f"--tpu_type: {accelerator_type!r} is not a TPU slice type such as "
                     f"v4-32, v5p-64, v5litepod-16 or v6e-16 (generations: "
                     f"{', '.join(_TPU_CORES_PER_CHIP)})")
  return max(int(size) // _TPU_CORES_PER_CHIP[generation], 1)


def check_runs_fit(runs: Sequence[grid.Run], base_config, common: dict | None,
                   devices: int) -> None:
  """Validates every run's config for ``devices`` devices now, on the submitting
  machine, instead of on the cluster: a batch that does not divide over the devices
  fails here, naming the run and the field."""
  grid.validate_runs(runs, base_config, common or {}, devices)


def write_slurm(runs: Sequence[grid.Run], sweep_dir: str, *, config_path: str,
                common: dict | None = None, repo_dir: str = ".", python: str = "python",
                concurrency: int | None = None, job_name: str = "rigl_jax",
                partition: str = "", nodes: int = 1, gpus_per_node: int = 1,
                gres: str | None = None, cpus_per_task: int = 8, mem: str = "",
                time_limit: str = "24:00:00", setup: Sequence[str] = (),
                script_dir: str | None = None) -> tuple[str, str]:
  """Writes ``sweep.slurm`` and ``slurm_runs.tsv`` into ``script_dir`` (default:
  ``sweep_dir``); returns their paths. The runs' workdirs are in ``sweep_dir``, a
  shared folder or a ``gs://`` URL (then ``script_dir`` must be given: a local folder
  that also takes SLURM's logs).

  Every run is one array task of ``nodes`` x ``gpus_per_node`` processes, one per GPU
  (``srun``; jax's SLURM detection gives process ``SLURM_LOCALID`` the GPU of that
  index among the node's). More than one process adds ``--distributed``.

  Args:
    runs: one array task each, in this order.
    config_path, common: the trainer's config file and the overrides of every run.
    repo_dir: the directory the tasks ``cd`` into (absolute paths are safest).
    python: the interpreter on the compute nodes.
    concurrency: at most this many tasks at once (``--array=0-N%C``); None: no limit.
    partition, cpus_per_task, mem, time_limit: ``#SBATCH`` resources ('' leaves a
      field out); ``cpus_per_task`` is per process.
    nodes, gpus_per_node: the allocation of one run; ``gpus_per_node=0`` runs one
      CPU-only process per node.
    gres: replaces the ``--gres=gpu:G`` line ('' leaves it out).
    setup: shell lines run before the trainer (``module load ...``, ``source venv``).
  """
  if not runs:
    raise ValueError("no runs to write")
  if nodes < 1 or gpus_per_node < 0:
    raise ValueError(f"nodes must be >= 1 and gpus_per_node >= 0, got {nodes} and "
                     f"{gpus_per_node}")
  tasks_per_node = max(gpus_per_node, 1)
  processes = nodes * tasks_per_node
  sweep_dir, script_dir = _dirs(sweep_dir, script_dir)
  os.makedirs(os.path.join(script_dir, "slurm"), exist_ok=True)
  waves = _slurm_waves(runs)
  list_paths = []
  for number, wave in enumerate(waves):
    list_path = os.path.join(script_dir, SLURM_LIST if number == 0 else
                             SLURM_LIST.replace(".tsv", f"_after{number}.tsv"))
    with open(list_path, "w") as f:
      for task, run in wave:
        run = grid.relocate(run, sweep_dir)
        cmd = local.trainer_command(config_path, run, common, python=python,
                                    distributed=processes > 1)
        f.write(f"{task}\t{run.name}\t{run.workdir}\t{shlex.join(cmd)}\n")
    list_paths.append(list_path)
  array = f"0-{len(waves[0]) - 1}" + (f"%{concurrency}" if concurrency else "")
  if gres is None:
    gres = f"gpu:{gpus_per_node}" if gpus_per_node else ""
  directives = [f"--job-name={job_name}", f"--array={array}",
                f"--output={script_dir}/slurm/%A_%a.out", f"--error={script_dir}/slurm/%A_%a.err",
                "--open-mode=append", f"--nodes={nodes}", f"--ntasks-per-node={tasks_per_node}",
                f"--cpus-per-task={cpus_per_task}", f"--time={time_limit}",
                # Without "B:" the signal goes to the job steps (every trainer process),
                # not to this shell, which then requeues the task (below).
                "--signal=TERM@120", "--requeue"]
  if gres:
    directives.append(f"--gres={gres}")
  if partition:
    directives.append(f"--partition={partition}")
  if mem:
    directives.append(f"--mem={mem}")
  lines = [
      "#!/bin/bash",
      f"# {len(runs)} runs of {config_path}, written by `python -m rigl_jax.launch.sweep --emit=slurm`.",
      f"# Each run: {nodes} node(s) x {tasks_per_node} process(es), one per GPU.",
      f"# Submit: bash {shlex.quote(os.path.join(script_dir, SLURM_SUBMIT))} (it sbatches this "
      "script once per list of runs).",
      "# Finished runs (summary.json present) exit at once. A run stopped by the time limit",
      "# saves a checkpoint, and the task requeues itself; it resumes when it starts again.",
      *(f"#SBATCH {d}" for d in directives),
      "set -uo pipefail",
      "# The list of runs: the first argument (submit.sh passes the lists of the runs that",
      "# wait for others), by default the runs that wait for none.",
      f"LIST=\"${{1:-{list_paths[0]}}}\"",
      f"PYTHON={shlex.quote(python)}",
      'TASK="${SLURM_ARRAY_TASK_ID:?SLURM_ARRAY_TASK_ID is not set}"',
      "LINE=$(awk -F'\\t' -v t=\"$TASK\" '$1 == t' \"$LIST\")",
      'if [[ -z "$LINE" ]]; then echo "no run $TASK in $LIST" >&2; exit 1; fi',
      "IFS=$'\t' read -r _ NAME WORKDIR CMD <<< \"$LINE\"",
      f"cd {shlex.quote(repo_dir)} || exit 1",
      "set -e  # a failing setup line stops the task",
      *setup,
      "set +e",
      'if "$PYTHON" -m rigl_jax.launch.finished "$WORKDIR"; then',
      '  echo "finished: $NAME"',
      "  exit 0",
      "fi",
      'echo "run $TASK: $NAME on ${SLURM_JOB_NODELIST:-$(hostname)}"',
      f"srun --kill-on-bad-exit=1 --nodes={nodes} --ntasks-per-node={tasks_per_node} "
      'bash -c "exec $CMD"',
      "rc=$?",
      'if [[ $rc -eq 0 ]] && ! "$PYTHON" -m rigl_jax.launch.finished "$WORKDIR"; then',
      '  echo "run $NAME stopped before its end (time limit or preemption): requeueing"',
      '  scontrol requeue "$SLURM_JOB_ID" || {',
      f'    echo "requeue failed: run {shlex.quote(os.path.join(script_dir, SLURM_SUBMIT))} '
      'again (finished runs are skipped)" >&2; exit 1; }',
      "fi",
      'exit "$rc"',
      "",
  ]
  script = _write_script(os.path.join(script_dir, SLURM_SCRIPT), "\n".join(lines))
  _write_slurm_submit(script_dir, script, waves, list_paths, concurrency)
  return script, list_paths[0]


def _slurm_waves(runs: Sequence[grid.Run]) -> list[list[tuple[int, grid.Run]]]:
  """(array task id, run) per submission. The runs without a source are the first
  array, tasks 0..N-1; a run with a source gets its source's task id in a later array
  that waits task by task (``--dependency=aftercorr``); a second run of one source
  goes to the next such array."""
  first = [r for r in runs if not r.after]
  task_of = {r.name: i for i, r in enumerate(first)}
  waves = [list(enumerate(first))]
  for run in runs:
    if not run.after:
      continue
    if run.after[0] not in task_of:
      raise ValueError(f"run {run.name} needs run {run.after[0]}, which is not among the "
                       f"runs of the script")
    task = task_of[run.after[0]]
    for wave in waves[1:]:
      if all(t != task for t, _ in wave):
        wave.append((task, run))
        break
    else:
      waves.append([(task, run)])
  if not waves[0]:
    raise ValueError("every run waits for another run: none can start")
  return waves


def _write_slurm_submit(script_dir: str, script: str, waves, list_paths,
                        concurrency: int | None) -> str:
  """``submit.sh``: sbatch the first array, then each array of waiting runs with
  ``--dependency=aftercorr`` on it (task i starts once task i of the first array has
  ended with exit 0; ``--kill-on-invalid-dep=yes`` cancels it when that task failed)."""
  limit = f"%{concurrency}" if concurrency else ""
  lines = [
      "#!/bin/bash",
      "# Submits the sweep: the runs that wait for none, then the runs that wait for one",
      "# of them (a lottery ticket for its pruning run), written by `python -m",
      "# rigl_jax.launch.sweep --emit=slurm`. Submit it again after an interruption:",
      "# finished runs end at once.",
      "set -euo pipefail",
      'SBATCH="${SBATCH:-sbatch}"',
      f'FIRST=$("$SBATCH" --parsable {shlex.quote(script)} {shlex.quote(list_paths[0])})',
      'FIRST="${FIRST%%;*}"  # --parsable prints JOBID or JOBID;CLUSTER',
      f'echo "submitted job $FIRST: {len(waves[0])} runs"',
  ]
  for wave, list_path in zip(waves[1:], list_paths[1:]):
    tasks = ",".join(str(t) for t, _ in sorted(wave, key=lambda tr: tr[0]))
    lines += [
        f'JOB=$("$SBATCH" --parsable --dependency=aftercorr:"$FIRST" '
        f'--kill-on-invalid-dep=yes --array={tasks}{limit} {shlex.quote(script)} '
        f'{shlex.quote(list_path)})',
        f'echo "submitted job ${{JOB%%;*}}: {len(wave)} runs, each after the task of its '
        f'source in job $FIRST"',
    ]
  lines.append("")
  return _write_script(os.path.join(script_dir, SLURM_SUBMIT), "\n".join(lines))


def write_tpu(runs: Sequence[grid.Run], sweep_dir: str, *, config_path: str,
              common: dict | None = None, tpu_name: str = "my-tpu-pod", zone: str = "",
              project: str = "", repo_dir: str = "~/rigl_jax",
              python: str = "~/rigl_jax_venv/bin/python", setup: Sequence[str] = (),
              log_dir: str = "~/rigl_jax_logs", poll_s: int = 60,
              script_dir: str | None = None) -> str:
  """Writes ``sweep_tpu.sh`` into ``script_dir`` (default: ``sweep_dir``; needed when
  ``sweep_dir`` is a ``gs://`` URL, as pods keep their runs): the runs one after
  another, each on all workers of the pod; returns its path.

  Each run starts detached on every worker (``setsid nohup``, so a dropped SSH
  connection leaves it running), with its output in ``LOG_DIR/SWEEP/RUN/worker-HOST.log``
  and its exit code beside it on each worker; the script then polls the workers every
  ``poll_s`` seconds (a failed poll is retried) until every process has ended. Run the
  script again after an interruption: finished runs are skipped, runs still going are
  waited for, the others resume from their checkpoints.

  ``TPU_NAME``, ``ZONE``, ``PROJECT``, ``GCLOUD`` and ``POLL_S`` in the environment
  override the values written. ``repo_dir``, ``python`` and ``log_dir`` are expanded
  by the workers' shell (``~`` works); ``python`` is the Python 3.11 environment that
  :func:`write_tpu_setup` makes. ``config_path`` is made relative to the current
  directory when it lies inside it (the repository is at another place on the
  workers). A run with a source (a lottery ticket) comes after the runs without one
  and is not started when its source did not finish. Failed runs are listed in
  ``SWEEP_DIR/tpu_failed.txt``; the script goes
  on and exits 1 at the end.
  """
  if not runs:
    raise ValueError("no runs to write")
  sweep_dir, script_dir = _dirs(sweep_dir, script_dir)
  os.makedirs(script_dir, exist_ok=True)
  config_rel = os.path.relpath(config_path)
  if config_rel.startswith(".."):
    config_rel = config_path
  sweep_name = paths.basename(sweep_dir)
  lines = [
      "#!/bin/bash",
      f"# {len(runs)} runs of {config_path} on a multi-host TPU pod slice, one after another,",
      "# written by `python -m rigl_jax.launch.sweep --emit=tpu`. Every run starts detached on",
      "# all workers (one process per host, --distributed) and this script polls until it",
      "# ends; a dropped connection does not stop a run. Run the script again to resume.",
      "set -uo pipefail",
      f"TPU_NAME=${{TPU_NAME:-{shlex.quote(tpu_name)}}}",
      f"ZONE=${{ZONE:-{shlex.quote(zone)}}}",
      f"PROJECT=${{PROJECT:-{shlex.quote(project)}}}",
      'GCLOUD="${GCLOUD:-gcloud}"',
      f'POLL_S="${{POLL_S:-{poll_s}}}"',
      f"FAILED_LOG={shlex.quote(os.path.join(script_dir, 'tpu_failed.txt'))}",
      "failed=0",
      'NOT_DONE=" "  # runs that did not finish: the runs that need them do not start',
      "",
      "on_all_workers() {  # REMOTE_COMMAND",
      '  "$GCLOUD" compute tpus tpu-vm ssh "$TPU_NAME" ${ZONE:+--zone="$ZONE"} \\',
      '      ${PROJECT:+--project="$PROJECT"} --worker=all --command="$1"',
      "}",
      "",
      "run() {  # NAME START_COMMAND POLL_COMMAND [SOURCE_RUN]",
      '  echo "=== $1"',
      '  if [[ -n "${4:-}" && "$NOT_DONE" == *" $4 "* ]]; then',
      '    echo "$1: not started: run $4 did not finish" >&2',
      '    echo "$1" >> "$FAILED_LOG"; failed=$((failed + 1)); NOT_DONE+="$1 "; return',
      "  fi",
      "  local out",
      '  if ! out=$(on_all_workers "$2"); then',
      '    echo "$out"; echo "$1: could not start it on every worker" >&2',
      '    echo "$1" >> "$FAILED_LOG"; failed=$((failed + 1)); NOT_DONE+="$1 "; return',
      "  fi",
      '  echo "$out"',
      '  grep -qE "^rigl_jax: (started|running)" <<< "$out" || return 0  # finished before',
      "  while true; do",
      '    sleep "$POLL_S"',
      '    if ! out=$(on_all_workers "$3"); then',
      '      echo "$1: polling the workers failed; the run goes on there, trying again" >&2',
      "      continue",
      "    fi",
      '    grep -q "^rigl_jax: running" <<< "$out" || break',
      "  done",
      '  echo "$out"',
      "  # The summary decides: a worker that found the run finished has no exit code.",
      '  if grep -q "^rigl_jax: finished" <<< "$out"; then',
      "    return 0",
      '  elif grep "^rigl_jax: exit" <<< "$out" | grep -qv "^rigl_jax: exit 0 "; then',
      '    echo "$1" >> "$FAILED_LOG"; failed=$((failed + 1)); NOT_DONE+="$1 "',
      "  else",
      '    echo "$1: stopped before its end (preempted?); run this script again to resume"',
      '    NOT_DONE+="$1 "',
      "  fi",
      "}",
      "",
  ]
  prefix = " && ".join([f"cd {repo_dir}", *setup])
  for run in grid.in_dependency_order(runs):  # a lottery ticket after its pruning run
    cmd = shlex.join(local.trainer_command(config_rel, run, common, python="PYTHON",
                                           distributed=True)[1:])
    logs = f"{log_dir}/{shlex.quote(sweep_name)}/{shlex.quote(run.name)}"
    workdir = shlex.quote(run.workdir)
    finished = f"{python} -m rigl_jax.launch.finished {workdir}"
    # $0: the log folder, $1: the host name (the detached shell's arguments). With -w,
    # setsid stays as the run's parent (it may fork), so its pid tells whether it runs.
    detached = (f'{python} {cmd} > "$0/worker-$1.log" 2>&1; echo $? > "$0/exit_code.$1"')
    alive = 'kill -0 "$(cat "$L/pid.$H" 2>/dev/null)" 2>/dev/null'
    start = (f"{prefix} && L={logs} && H=$(hostname) && mkdir -p \"$L\" && "
             f"if {finished}; then echo \"rigl_jax: finished on $H\"; "
             f"elif {alive}; then echo \"rigl_jax: running on $H\"; "
             f"else rm -f \"$L/exit_code.$H\"; "
             f"setsid -w nohup bash -c {shlex.quote(detached)} \"$L\" \"$H\" "
             f"< /dev/null > /dev/null 2>&1 & echo $! > \"$L/pid.$H\"; "
             f"echo \"rigl_jax: started on $H\"; fi")
    poll = (f"{prefix} && L={logs} && H=$(hostname) && "
            f"if {alive}; then echo \"rigl_jax: running on $H\"; "
            f"elif [ -f \"$L/exit_code.$H\" ]; then "
            f"echo \"rigl_jax: exit $(cat \"$L/exit_code.$H\") on $H\"; "
            f"else echo \"rigl_jax: exit lost on $H\"; fi; "
            f"if {finished}; then echo \"rigl_jax: finished on $H\"; fi")
    lines.append(f"run {shlex.quote(run.name)} {shlex.quote(start)} {shlex.quote(poll)}" +
                 "".join(f" {shlex.quote(a)}" for a in run.after))
  lines += ["", 'echo "$failed failed run(s)"', "exit $((failed > 0))", ""]
  return _write_script(os.path.join(script_dir, TPU_SCRIPT), "\n".join(lines))


def write_tpu_setup(script_dir: str, *, tpu_name: str = "my-tpu-pod", zone: str = "",
                    project: str = "", repo_dir: str = "~/rigl_jax",
                    venv: str = "~/rigl_jax_venv", local_repo: str | None = None) -> str:
  """Writes ``tpu_setup.sh``: once per slice, it copies this repository (its committed
  files, ``git archive``) to ``repo_dir`` on every worker and makes a Python 3.11
  environment there (``uv``: the workers' stock python3 is 3.10 on the TPU images, and
  jax 0.10 needs 3.11) with ``jax[tpu]`` and the trainer; returns its path."""
  local_repo = os.path.abspath(local_repo or os.path.dirname(os.path.dirname(
      os.path.dirname(os.path.abspath(__file__)))))
  os.makedirs(script_dir, exist_ok=True)
  remote = " && ".join([
      "set -e",
      f"mkdir -p {repo_dir}",
      f"tar -xzf ~/rigl_jax_src.tar.gz -C {repo_dir}",
      "python3 -m pip install --user --quiet --upgrade uv",
      f"~/.local/bin/uv venv --python 3.11 --allow-existing {venv}",
      f"cd {repo_dir}",
      f"~/.local/bin/uv pip install --python {venv}/bin/python -c constraints.txt "
      "'jax[tpu]' -e '.[train,gcs]'",
      f"{venv}/bin/python -c 'import jax; print(jax.process_index(), jax.local_device_count(), "
      "jax.device_count())'",
  ])
  lines = [
      "#!/bin/bash",
      "# Once per TPU slice: this repository and a Python 3.11 environment on every worker,",
      "# written by `python -m rigl_jax.launch.sweep --emit=tpu`.",
      "set -euo pipefail",
      f"TPU_NAME=${{TPU_NAME:-{shlex.quote(tpu_name)}}}",
      f"ZONE=${{ZONE:-{shlex.quote(zone)}}}",
      f"PROJECT=${{PROJECT:-{shlex.quote(project)}}}",
      'GCLOUD="${GCLOUD:-gcloud}"',
      'ARCHIVE="$(mktemp -d)/rigl_jax_src.tar.gz"',
      f"git -C {shlex.quote(local_repo)} archive --format=tar.gz -o \"$ARCHIVE\" HEAD",
      '"$GCLOUD" compute tpus tpu-vm scp "$ARCHIVE" "$TPU_NAME":~/rigl_jax_src.tar.gz \\',
      '    ${ZONE:+--zone="$ZONE"} ${PROJECT:+--project="$PROJECT"} --worker=all',
      '"$GCLOUD" compute tpus tpu-vm ssh "$TPU_NAME" ${ZONE:+--zone="$ZONE"} \\',
      f'    ${{PROJECT:+--project="$PROJECT"}} --worker=all --command={shlex.quote(remote)}',
      "",
  ]
  return _write_script(os.path.join(script_dir, TPU_SETUP_SCRIPT), "\n".join(lines))
