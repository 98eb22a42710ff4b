"""The agent's one source of wall-clock time (ms / µs since the Unix epoch).

A Raspberry Pi has no real-time clock: it boots at 1970 (or at a stale saved time) until NTP,
GNSS or the MCU sets it. Data taken before then must still get correct timestamps, so:

* while the clock is **synchronised**, :func:`now_ms` is the system wall clock;
* before that, :func:`now_ms` returns a **provisional** stamp: monotonic milliseconds since boot,
  always below :data:`PLAUSIBLE_AFTER_MS` and so never mistaken for a real time. The store keeps
  such rows unsealed (nothing provisional is ever sent) and, once the clock is synchronised,
  adds the offset ``true time - monotonic time`` learnt at that moment
  (:meth:`Clock.offset_ms`), giving every row the time it was really taken. The offset is only
  valid within one boot (the monotonic clock restarts at 0), so rows carry the boot they were
  stamped in: see ``Store.fix_times``.

Synchronised means: the system wall clock reads a plausible time (after 2025-01-01), or an
external source (GNSS, the MCU) has told us the true time with :meth:`Clock.sync`.

There is no process-wide clock: the composition root (agent/compose.py) makes one
:class:`Clock` and gives it, or its :meth:`Clock.now_ms`, to every component that stamps data;
a component built on its own (a test, a tool) makes its own. Tests pass a Clock with their own
``wall_ns``/``mono_ns`` (e.g. a wall clock stuck in 1970 that is "set by NTP" later).
"""
from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

# No clock we run on can legitimately be earlier than this (2025-01-01): a Pi without a
# real-time clock boots at its last saved time or 1970 until NTP or GNSS sets it.
PLAUSIBLE_AFTER_MS = 1_735_689_600_000
PLAUSIBLE_AFTER_US = PLAUSIBLE_AFTER_MS * 1000


def _read_boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:  # not Linux: one id per process is the safe approximation
        return f"process-{uuid.uuid4()}"


class Clock:
    """Wall time from the system clock once plausible, provisional monotonic time before.

    ``wall_ns`` / ``mono_ns`` default to ``time.time_ns`` / ``time.monotonic_ns``; ``boot_id``
    names the current boot (the kernel's, by default) so provisional stamps from an earlier boot
    are never shifted by this boot's offset.
    """

    def __init__(self, *, wall_ns: Callable[[], int] = time.time_ns,
                 mono_ns: Callable[[], int] = time.monotonic_ns, boot_id: str | None = None):
        self._wall_ns = wall_ns
        self._mono_ns = mono_ns
        self.boot_id = boot_id or _read_boot_id()
        self._external_offset_ns: int | None = None  # true - monotonic, from sync()
        self._lock = threading.Lock()

    # -- reading --------------------------------------------------------------------------
    def mono_ms(self) -> int:
        return self._mono_ns() // 1_000_000

    def _true_ns(self) -> int | None:
        wall = self._wall_ns()
        if wall >= PLAUSIBLE_AFTER_MS * 1_000_000:
            return wall
        with self._lock:
            off = self._external_offset_ns
        return None if off is None else self._mono_ns() + off

    def now_ns(self) -> int:
        true = self._true_ns()
        return true if true is not None else self._mono_ns()

    def now_ms(self) -> int:
        return self.now_ns() // 1_000_000

    def now_us(self) -> int:
        return self.now_ns() // 1_000

    def is_synced(self) -> bool:
        return self._true_ns() is not None

    def synced_now_ms(self) -> int | None:
        """:meth:`now_ms`, or None while not synchronised (PROTOCOL §3 skips ``exp`` then)."""
        true = self._true_ns()
        return None if true is None else true // 1_000_000

    def offset_ms(self) -> int | None:
        """``true time - monotonic time`` in ms now, or None while not synchronised."""
        mono = self._mono_ns()
        true = self._true_ns()
        return None if true is None else (true - mono) // 1_000_000

    # -- setting --------------------------------------------------------------------------
    def sync(self, true_ms: int) -> None:
        """An external source (GNSS fix, MCU RTC) says it is ``true_ms`` now.

        Used only while the system clock is not plausible; setting the system clock itself is
        the OS's job (chrony/timesyncd, gpsd).
        """
        if true_ms < PLAUSIBLE_AFTER_MS:
            raise ValueError(f"implausible time {true_ms}")
        with self._lock:
            self._external_offset_ns = true_ms * 1_000_000 - self._mono_ns()
        log.info("clock: synchronised from an external source")


def is_provisional_ms(t_ms: int) -> bool:
    """True for a provisional stamp (monotonic time since boot, taken before the clock was synced)."""
    return t_ms < PLAUSIBLE_AFTER_MS
