"""The command-line tools' bad input: one ``error: WHAT: why`` line on stderr, exit 2.

``run(main)`` is absl's ``app.run`` with the flag errors absl reports in its own words
(an unknown flag, a value of the wrong type or outside an enum, a missing required
flag: two lines and exit 1) turned into that one line, and ``fail`` ends a tool the
same way from inside ``main``. The trainer (``rigl_jax.main``) has its own parser,
which also names ``config.FIELD`` overrides.
"""

from __future__ import annotations

import sys

EXIT_BAD_INPUT = 2


def fail(message, code: int = EXIT_BAD_INPUT):
  """Ends the process with ``error: MESSAGE`` (whitespace folded onto one line)."""
  sys.stdout.flush()
  sys.stderr.write(f"error: {' '.join(str(message).split())}\n")
  sys.stderr.flush()
  sys.exit(code)


def require(ok: bool, what: str, why: str) -> None:
  """``fail(f"{what}: {why}")`` unless ``ok``."""
  if not ok:
    fail(f"{what}: {why}")


def no_arguments(argv) -> None:
  """Every setting of the tools is a flag: positional arguments are an error."""
  require(len(argv) <= 1, "flags", f"unexpected argument(s) {' '.join(argv[1:])!r}: every "
          f"setting is a flag; see --help")


def run(main) -> None:
  """``absl.app.run(main)``, every flag error one ``error: flags: ...`` line."""
  from absl import app, flags  # pylint: disable=import-outside-toplevel

  def parse(argv):
    try:
      return flags.FLAGS(argv)
    except flags.Error as e:
      fail(f"flags: {e}")
    except (AttributeError, KeyError) as e:  # ml_collections: --config.KEY the config lacks
      key = str(e).strip("'\"")
      fail(f"config.{key}: unknown field (overrides cannot add fields; see "
           f"rigl_jax/config.py)")

  def checked_main(argv):
    try:
      return main(argv)
    except app.UsageError as e:
      fail(f"flags: {e}")

  app.run(checked_main, flags_parser=parse)
