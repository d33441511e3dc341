"""Command line: ``python -m rigl_jax.main --config=configs/X.py --workdir=DIR``.

Overrides go after the config: ``--config.sparsity=0.8 --config.method=set``.
Rerunning the same command resumes from the workdir's latest checkpoint.
"""

import difflib
import os
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from rigl_jax import config as _config_lib

flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the summary.")
flags.DEFINE_bool("distributed", False,
                  "Call jax.distributed.initialize() first: multi-process runs (pods, clusters, "
                  "or several processes on one machine with --coordinator_address).")
flags.DEFINE_string("coordinator_address", None,
                    "With --distributed: HOST:PORT of process 0's coordination service (then "
                    "also give --num_processes and --process_id). Unset: jax detects the "
                    "cluster (TPU pods, SLURM, ...).")
flags.DEFINE_integer("num_processes", None, "With --coordinator_address: number of processes.")
flags.DEFINE_integer("process_id", None,
                     "With --coordinator_address: this process's index; 0 runs the coordinator.")
flags.DEFINE_integer("heartbeat_timeout_s", 10,
                     "With --distributed: a peer silent for this long counts as dead, and the "
                     "run stops with an error instead of hanging.")
flags.DEFINE_integer("shutdown_timeout_s", 10,
                     "With --distributed: the longest wait for the other processes at exit.")
flags.DEFINE_integer("init_timeout_s", 300,
                     "With --distributed: the longest wait for every process to join.")
flags.DEFINE_integer("stall_timeout_s", 1800,
                     "A run in which no training step, evaluation batch or checkpoint save "
                     "finishes for this long (compilation included) stops with an error "
                     "line instead of hanging: a stuck collective never ends by itself. "
                     "0 turns the watchdog off.")
flags.DEFINE_string("compilation_cache_dir", os.path.join("~", ".cache", "rigl_jax", "jax"),
                    "JAX's persistent compilation cache: a rerun, a resume or another run of "
                    "the same shapes skips compiling. '' turns it off; the environment "
                    "variable JAX_COMPILATION_CACHE_DIR, when set, takes precedence.")
config_flags.DEFINE_config_file("config", None, "A config file from configs/.",
                                lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS
# absl prints the main module's docstring for --help: list the config fields there.
__doc__ += "\n" + _config_lib.describe_fields() + "\n"  # pylint: disable=redefined-builtin


class _QuietLibraries:
  """Drops INFO lines of orbax and friends (they log every checkpoint step in detail),
  and the tracebacks of orbax's errors: a failed save reaches the trainer, which names
  the cause in one line."""

  def filter(self, record) -> bool:
    if (record.levelno < 30 and "xla_bridge" in record.pathname and
        str(record.msg).startswith("Unable to initialize backend")):
      return False  # JAX trying each platform it knows (tpu on a CPU machine): not news
    if "orbax" not in record.pathname:
      return True
    record.exc_info = record.exc_text = None
    return record.levelno >= 30


def _is_closed_event_loop(kind, value) -> bool:
  return kind is RuntimeError and str(value) == "Event loop is closed"


def _quiet_closed_event_loops() -> None:
  """After a failed asynchronous save, tensorstore completes the other writes into
  orbax's closed event loop, and each prints a 'RuntimeError: Event loop is closed'
  traceback (through whichever hook its thread reaches): noise after the fact, since
  the save error itself reaches the trainer. Every other error is printed as usual."""
  import threading  # pylint: disable=import-outside-toplevel
  hook, thread_hook, unraisable_hook = sys.excepthook, threading.excepthook, sys.unraisablehook
  sys.excepthook = lambda kind, value, tb: (
      None if _is_closed_event_loop(kind, value) else hook(kind, value, tb))
  threading.excepthook = lambda args: (
      None if _is_closed_event_loop(args.exc_type, args.exc_value) else thread_hook(args))
  sys.unraisablehook = lambda u: (
      None if _is_closed_event_loop(u.exc_type, u.exc_value) else unraisable_hook(u))


EXIT_FAILED = 1     # anything else: a lost peer, no usable checkpoint, a crash
EXIT_BAD_INPUT = 2  # a bad flag or config field; nothing was written
EXIT_DIVERGED = 3   # a non-finite loss or gradient with on_nonfinite="stop"
EXIT_INTERRUPTED = 130  # a second Ctrl-C (the shell's code for SIGINT)


def _fail(message, code: int, *, at_once: bool = False):
  """Ends the process with ``error: MESSAGE`` on one line of stderr. ``at_once``
  skips the interpreter's shutdown, which would wait for (and print the tracebacks
  of) background threads left by a failed write."""
  logging.flush()
  # One write call, so that output from other threads cannot split the line.
  sys.stderr.write(f"error: {' '.join(str(message).split())}\n")
  sys.stderr.flush()
  if at_once:
    sys.stdout.flush()
    os._exit(code)  # pylint: disable=protected-access
  sys.exit(code)


def _unknown_override(argv) -> str | None:
  """The key of the first ``--config.a.b=...`` override the shared config lacks."""
  from rigl_jax import config as config_lib  # pylint: disable=import-outside-toplevel
  base = config_lib.base_config()
  for arg in argv[1:]:
    match = re.match(r"--config\.([^=]+)", arg)
    if not match:
      continue
    node = base
    for part in match.group(1).split("."):
      if not hasattr(node, "keys") or part not in node:
        return match.group(1)
      node = node[part]
  return None


def _config_file(argv) -> str:
  """The --config flag's value as given (file path and its ':args')."""
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      return arg.split("=", 1)[1]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return "?"


def _last_line(text: str) -> str:
  """The exception line that ends a traceback quoted in ``text``."""
  match = re.findall(r"(\w+(?:Error|Exception)\b: .*?)(?=$| File \")", " ".join(text.split()))
  return match[-1] if match else " ".join(text.split())[-300:]


def parse_flags(argv):
  """absl's parser, with every bad flag turned into one ``error: ...`` line and exit 2."""
  try:
    return FLAGS(argv)
  except SystemExit:
    raise
  except flags.Error as e:  # a value of the wrong type, a missing flag, a bad config file
    match = re.match(r"flag --config\.([\w.]+)=.*?: (.*)", str(e), re.S)
    if match:
      _fail(f"config.{match.group(1)}: {match.group(2)}", EXIT_BAD_INPUT)
    if "Error whilst parsing config file" in str(e):  # its text embeds a traceback
      _fail(f"flags: --config: {_config_file(argv)}: {_last_line(str(e))}", EXIT_BAD_INPUT)
    _fail(f"flags: {e}", EXIT_BAD_INPUT)
  except (AttributeError, KeyError) as e:  # ml_collections: an override of a missing key
    key = _unknown_override(argv)
    if key is None:
      _fail(f"flags: --config: {_config_file(argv)}: {type(e).__name__}: {e}", EXIT_BAD_INPUT)
    from rigl_jax import config as config_lib  # pylint: disable=import-outside-toplevel
    close = [] if "." in key else difflib.get_close_matches(key, list(config_lib.base_config()), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    _fail(f"config.{key}: unknown field ({hint}overrides cannot add fields; see "
          f"rigl_jax/config.py)", EXIT_BAD_INPUT)
  except Exception as e:  # pylint: disable=broad-except  # a config file that fails to load
    _fail(f"flags: --config: {_config_file(argv)}: {type(e).__name__}: {e}", EXIT_BAD_INPUT)


def _initialize_distributed(jax):
  kwargs = {"initialization_timeout": FLAGS.init_timeout_s,
            "heartbeat_timeout_seconds": FLAGS.heartbeat_timeout_s,
            "shutdown_timeout_seconds": FLAGS.shutdown_timeout_s}
  if FLAGS.coordinator_address:
    n, i = FLAGS.num_processes, FLAGS.process_id
    if n is None or n < 1 or i is None or not 0 <= i < n:
      _fail(f"flags: --coordinator_address needs --num_processes >= 1 and --process_id in "
            f"[0, num_processes), got {n} and {i}", EXIT_BAD_INPUT)
    kwargs.update(coordinator_address=FLAGS.coordinator_address, num_processes=n, process_id=i)
  # jax aborts the process (SIGABRT, a C++ stack) when its own timeout passes: stop
  # first, with one line. The wait is in C++, which lets this timer thread run.
  kwargs["initialization_timeout"] = FLAGS.init_timeout_s + 60
  import threading  # pylint: disable=import-outside-toplevel
  who = f"process {FLAGS.process_id}" if FLAGS.process_id is not None else "this process"
  watchdog = threading.Timer(FLAGS.init_timeout_s, _fail, kwargs={
      "message": f"distributed: {who} waited --init_timeout_s={FLAGS.init_timeout_s} s for "
                 f"every process to join"
                 + (f" the coordinator at {FLAGS.coordinator_address}"
                    if FLAGS.coordinator_address else "")
                 + "; a process did not start or died before connecting. Start them all "
                   "again",
      "code": EXIT_FAILED, "at_once": True})
  watchdog.daemon = True
  watchdog.start()
  try:
    jax.distributed.initialize(**kwargs)
  finally:
    watchdog.cancel()


def main(argv):
  if len(argv) > 1:
    _fail(f"flags: unexpected argument(s) {' '.join(argv[1:])!r}: every setting is a flag "
          f"(--workdir=..., --config.FIELD=...); see --help", EXIT_BAD_INPUT)
  logging.get_absl_handler().addFilter(_QuietLibraries())
  # gcsfs logs a traceback for each object-store rename it then does by copy and delete
  # (the quarantine of a bad checkpoint step on gs://): noise, the fallback works.
  import logging as py_logging  # pylint: disable=import-outside-toplevel
  py_logging.getLogger("gcsfs").setLevel(py_logging.CRITICAL)
  _quiet_closed_event_loops()
  try:
    FLAGS.config.keys()  # ml_collections reports a config file that failed to load only now
  except Exception as e:  # pylint: disable=broad-except
    _fail(f"flags: --config: {e}", EXIT_BAD_INPUT)
  for name in ("stall_timeout_s", "init_timeout_s", "heartbeat_timeout_s",
               "shutdown_timeout_s"):
    low = 0 if name == "stall_timeout_s" else 1
    if FLAGS[name].value < low:
      _fail(f"flags: --{name} must be >= {low}, got {FLAGS[name].value}", EXIT_BAD_INPUT)
  import jax  # pylint: disable=import-outside-toplevel
  if FLAGS.compilation_cache_dir and not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    jax.config.update("jax_compilation_cache_dir",
                      os.path.expanduser(FLAGS.compilation_cache_dir))
  if FLAGS.distributed:
    _initialize_distributed(jax)
  try:
    jax.devices()
  except Exception as e:  # pylint: disable=broad-except  # JAX_PLATFORMS names a missing platform
    detail = _last_line(str(e)) if str(e) else "no backend could be started"
    _fail(f"devices: JAX_PLATFORMS={os.environ.get('JAX_PLATFORMS', '')!r}: {detail}; "
          f"unset it or name a platform this machine has", EXIT_BAD_INPUT)
  from rigl_jax import checkpoint as checkpoint_lib  # pylint: disable=import-outside-toplevel
  from rigl_jax import config as config_lib  # pylint: disable=import-outside-toplevel
  from rigl_jax import train  # pylint: disable=import-outside-toplevel
  from rigl_jax import workdir as workdir_lib  # pylint: disable=import-outside-toplevel
  def on_stall(seconds, what):
    _fail(f"stalled: process {jax.process_index()} of {jax.process_count()}: nothing "
          f"finished for {seconds:.0f} s (--stall_timeout_s={FLAGS.stall_timeout_s}) after "
          f"{what}; a collective is stuck or a peer stopped responding. The last checkpoint "
          f"is kept: rerun the same command to resume", EXIT_FAILED, at_once=True)

  try:
    summary = train.train_and_evaluate(FLAGS.config, FLAGS.workdir,
                                       stall_timeout_s=FLAGS.stall_timeout_s or None,
                                       on_stall=on_stall)
  except (config_lib.ConfigError, FileNotFoundError, ImportError) as e:
    _fail(e, EXIT_BAD_INPUT)
  except FloatingPointError as e:
    _fail(f"training diverged: {e}", EXIT_DIVERGED)
  except KeyboardInterrupt:
    _fail("interrupted by a second Ctrl-C: stopped at once; the last checkpoint is kept, "
          "rerun the same command to resume from it", EXIT_INTERRUPTED)
  except checkpoint_lib.CheckpointSaveError as e:
    _fail(f"checkpoints: {e}", EXIT_FAILED, at_once=True)
  except workdir_lib.WriteError as e:
    _fail(e, EXIT_FAILED, at_once=True)
  except checkpoint_lib.CheckpointRestoreError as e:
    _fail(f"checkpoints: {e} Move the checkpoints folder away to start over.", EXIT_FAILED)
  except Exception as e:  # pylint: disable=broad-except
    if not FLAGS.distributed:
      raise
    # A lost peer shows up here as a collective or coordination error. Exit at once:
    # a normal exit would wait in jax's shutdown barrier for the dead process.
    logging.exception("Stopping this process.")
    logging.flush()
    print(f"error: process {jax.process_index()}: {type(e).__name__}: "
          f"{' '.join(str(e).split())[:500]}", file=sys.stderr, flush=True)
    os._exit(EXIT_FAILED)  # pylint: disable=protected-access
  if summary.get("preempted"):
    print(f"preempted at step {summary['steps']}; rerun the same command to resume")
    return
  logging.flush()
  acc = summary["test_accuracy"]
  bits = (f"test_bits_per_char={summary['test_bits_per_char']:.4f} "
          if summary.get("test_bits_per_char") is not None else "")
  print(f"{bits}test_accuracy={acc:.4f} val_accuracy={summary['val_accuracy']} "
        f"global_density={summary['global_density']:.4f} steps={summary['steps']} "
        f"train_flops_multiplier={summary['train_flops_multiplier']:.3f} "
        f"test_flops_multiplier={summary['test_flops_multiplier']:.3f}")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
