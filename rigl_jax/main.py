"""Command line: ``python -m rigl_jax.main --config=configs/X.py --workdir=DIR``.

Overrides go after the config: ``--config.sparsity=0.8 --config.method=set``.
Rerunning the same command resumes from the workdir's latest checkpoint.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the summary.")
flags.DEFINE_bool("distributed", False,
                  "Call jax.distributed.initialize() first (multi-process runs on pods).")
config_flags.DEFINE_config_file("config", None, "A config file from configs/.",
                                lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


class _QuietLibraries:
  """Drops INFO lines of orbax and friends: they log every checkpoint step in detail."""

  def filter(self, record) -> bool:
    return record.levelno >= 30 or "orbax" not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_QuietLibraries())
  import jax  # pylint: disable=import-outside-toplevel
  if FLAGS.distributed:
    jax.distributed.initialize()
  from rigl_jax import config as config_lib  # pylint: disable=import-outside-toplevel
  from rigl_jax import train  # pylint: disable=import-outside-toplevel
  try:
    summary = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except (config_lib.ConfigError, FileNotFoundError, ImportError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  if summary.get("preempted"):
    print(f"preempted at step {summary['steps']}; rerun the same command to resume")
    return
  logging.flush()
  acc = summary["test_accuracy"]
  print(f"test_accuracy={acc:.4f} val_accuracy={summary['val_accuracy']} "
        f"global_density={summary['global_density']:.4f} steps={summary['steps']} "
        f"train_flops_multiplier={summary['train_flops_multiplier']:.3f} "
        f"test_flops_multiplier={summary['test_flops_multiplier']:.3f}")


if __name__ == "__main__":
  app.run(main)
