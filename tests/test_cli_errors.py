"""Bad input to the launch tools, the FLOP tool and the export: one ``error:`` line naming
the flag, field or path, exit 2, no traceback, nothing started."""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = "configs/quickstart.py"

SWEEP = ["-m", "rigl_jax.launch.sweep", f"--config={QUICKSTART}"]
TUNE = ["-m", "rigl_jax.launch.tune", f"--config={QUICKSTART}"]

CASES = [
    # launch.sweep
    (SWEEP, "error: --sweep_dir: required"),
    (SWEEP + ["--sweep_dir=S", "--bogus=1"], "error: flags: Unknown command line flag 'bogus'"),
    (SWEEP + ["--sweep_dir=S", "--emit=pbs"], "error: flags: flag --emit=pbs: value should be"),
    (SWEEP + ["--sweep_dir=S", "--concurrency=0"], "error: --concurrency: must be >= 1, got 0"),
    (SWEEP + ["--sweep_dir=S", "--emit=slurm", "--slurm_nodes=0"],
     "error: --slurm_nodes: must be >= 1"),
    (SWEEP + ["--sweep_dir=S", "--sparsities=abc"], "error: --sparsities: expected a comma"),
    (SWEEP + ["--sweep_dir=S", "--methods=rigll"],
     "error: run method=rigll,seed=0: config.method: must be one of"),
    (SWEEP + ["--sweep_dir=S", "--methods=rigl", "--sparsities=1.5"],
     "error: run method=rigl,sparsity=1.5,seed=0: config.sparsity: must be a number in"),
    (SWEEP + ["--sweep_dir=S", "--set=batch_size"], "error: --set: expected KEY=VALUE"),
    (SWEEP + ["--sweep_dir=S", "--estimate", "--seconds_per_step=fast"],
     "error: --seconds_per_step: expected LABEL=SECONDS"),
    (SWEEP + ["--sweep_dir=/dev/null/S"], "error: --sweep_dir: /dev/null/S:"),
    (["-m", "rigl_jax.launch.sweep", "--config=README.md", "--sweep_dir=S"],
     "error: config file"),
    # launch.tune and launch.report
    (TUNE + ["--sweep_dir=S", "--n_trials=0"], "error: --n_trials: must be >= 1, got 0"),
    (TUNE + ["--sweep_dir=S", "--dt_values=a,b"], "error: --dt_values: expected a comma"),
    (TUNE + ["--sweep_dir=S", "--set=sparsity=3"], "error: run default: config.sparsity:"),
    (["-m", "rigl_jax.launch.report", "--sweep_dir=S"], "error: --out: required"),
    # the FLOP tool and the export
    (["-m", "rigl_jax.flops", f"--config={QUICKSTART}", "--config.bogus=1"],
     "error: config.bogus: unknown field"),
    (["-m", "rigl_jax.flops", "--config=configs/nope.py"], "error: flags: --config:"),
    (["-m", "rigl_jax.export"], "error: flags: flag --workdir=None"),
    (["-m", "rigl_jax.export", "--workdir=S", "--max_density=7"],
     "error: --max_density: must be in [0, 1], got 7.0"),
]


@pytest.mark.parametrize("argv,expected", CASES, ids=[" ".join(c[0][1:]) for c in CASES])
def test_a_bad_command_line_is_one_error_line(tmp_path, argv, expected):
  argv = [a.replace("=S", f"={tmp_path / 'S'}") for a in argv]
  expected = expected.replace(" S", f" {tmp_path / 'S'}")
  proc = subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True,
                        timeout=120)
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 2, proc.stderr
  assert "Traceback" not in proc.stderr and lines[-1].startswith(expected), proc.stderr
  assert [line for line in lines if line.startswith("error:")] == [lines[-1]]
  assert not os.path.exists(tmp_path / "S")  # nothing was started or written
