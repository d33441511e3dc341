"""``python -m rigl_jax.launch.finished WORKDIR``: exit 0 when WORKDIR holds a finished
run (its ``summary.json``), 1 when it does not, 2 on bad usage.

The emitted SLURM and TPU-pod scripts ask it instead of the shell's ``[ -f ... ]``,
which cannot see ``gs://`` workdirs.
"""

import sys

from rigl_jax.launch import local


def main(argv) -> int:
  if len(argv) != 2 or argv[1].startswith("-"):
    print("error: usage: python -m rigl_jax.launch.finished WORKDIR", file=sys.stderr)
    return 2
  return 0 if local.is_finished(argv[1]) else 1


if __name__ == "__main__":
  sys.exit(main(sys.argv))
