"""A stall watchdog: ends a run that makes no progress, instead of letting it hang.

A collective that never completes (a peer stuck in another program, a runtime
deadlock) blocks every process of a run while each of them stays alive, so neither
the heartbeat nor SIGTERM (handled between steps) can end it. The trainer calls
:meth:`Watchdog.beat` after every step, evaluation batch and checkpoint save; when
no beat comes for ``timeout_s``, ``on_stall`` runs once on the watchdog's thread
(the trainer's ends the process with one ``error:`` line).
"""

from __future__ import annotations

import threading
import time
from typing import Callable


class Watchdog:
  """Calls ``on_stall(seconds_since_last_beat, what)`` once when :meth:`beat` has not
  been called for ``timeout_s`` seconds; use it as a context manager.

  Example::

    with Watchdog(600, on_stall=lambda s, what: os._exit(1)) as watchdog:
      for batch in batches:
        state = train_step(state, batch)
        watchdog.beat("step 12")
  """

  def __init__(self, timeout_s: float, on_stall: Callable[[float, str], None], *,
               clock: Callable[[], float] = time.monotonic, poll_s: float | None = None):
    if not timeout_s > 0:
      raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
    self.timeout_s = float(timeout_s)
    self._on_stall = on_stall
    self._clock = clock
    self._poll_s = poll_s if poll_s is not None else min(1.0, self.timeout_s / 10)
    self._last = clock()
    self._what = "the start"
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._watch, name="rigl_jax-watchdog", daemon=True)
    self.fired = False

  def beat(self, what: str = "") -> None:
    """Progress: the clock restarts. ``what`` names it for the stall message."""
    self._last = self._clock()
    self._what = what or self._what

  def _watch(self) -> None:
    while not self._stop.wait(self._poll_s):
      quiet = self._clock() - self._last
      if quiet >= self.timeout_s:
        self.fired = True
        self._on_stall(quiet, self._what)
        return

  def __enter__(self) -> "Watchdog":
    self.beat()
    self._thread.start()
    return self

  def __exit__(self, *exc) -> None:
    self._stop.set()
    self._thread.join()
