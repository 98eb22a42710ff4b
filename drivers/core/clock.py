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

Synchronised means, in this order:

* the system wall clock is trusted: it reads no earlier than the **floor** (the newest time this
  device knows has passed: 2025-01-01, raised by the composition root to the last true time the
  store saved and by every authenticated downlink ``ts``, less :data:`FLOOR_SLACK_MS`) and, when
  the clock is built with ``kernel_synced`` (the agent's default, ``[clock] synced_by =
  "kernel"``), the kernel says an NTP client has disciplined it: :func:`kernel_ntp_synced`, the
  rule systemd itself uses for ``timedatectl show -p NTPSynchronized`` (adjtimex ``maxerror``
  below 16 s; systemd-timesyncd and chrony set it when they synchronise, the kernel lets it grow
  by 0.5 ms/s and marks the clock unsynchronised at 16 s). A Pi has no RTC: fake-hwclock or
  timesyncd's clock file restore a saved, stale time at boot, after the floor, so "plausible"
  is not "synchronised";
* or an external source (GNSS, the MCU) has told us the true time with :meth:`Clock.sync`.

While not synchronised, :meth:`Clock.not_before_ms` is still a lower bound on the true time (the
floor, plus the monotonic time since it was learnt in this boot): a downlink ``exp`` below it
has passed for certain, so no stale clock reopens the window a replayed envelope needs.

There is no process-wide clock: the composition root (agent/compose.py) makes one
:class:`Clock` and gives it, or its :meth:`Clock.now_ms`, to every component that stamps data;
a component built on its own (a test, a tool) makes its own. Tests pass a Clock with their own
``wall_ns``/``mono_ns`` (e.g. a wall clock stuck in 1970 that is "set by NTP" later).
"""
from __future__ import annotations

import ctypes
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
#: A trusted wall clock may read this much earlier than the floor (the cloud's clock and ours
#: differ by a little; a stale clock is hours or months behind).
FLOOR_SLACK_MS = 10 * 60 * 1000
#: How long one answer of ``kernel_synced`` is reused (it is a system call; now_ms() is hot).
KERNEL_CHECK_EVERY_NS = 1_000_000_000
#: adjtimex: the kernel's NTP_PHASE_LIMIT, 16 s in µs. systemd's ntp_synced() (src/basic/time-util.c)
#: calls the clock synchronised while ``maxerror`` is below it.
_MAXERROR_UNSYNC_US = 16_000_000


class _Timeval(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_usec", ctypes.c_long)]


class _Timex(ctypes.Structure):
    """struct timex (linux/timex.h) on LP64 Linux (the Pi's aarch64, x86_64)."""
    _fields_ = [("modes", ctypes.c_uint), ("offset", ctypes.c_long), ("freq", ctypes.c_long),
                ("maxerror", ctypes.c_long), ("esterror", ctypes.c_long), ("status", ctypes.c_int),
                ("constant", ctypes.c_long), ("precision", ctypes.c_long), ("tolerance", ctypes.c_long),
                ("time", _Timeval), ("tick", ctypes.c_long), ("ppsfreq", ctypes.c_long),
                ("jitter", ctypes.c_long), ("shift", ctypes.c_int), ("stabil", ctypes.c_long),
                ("jitcnt", ctypes.c_long), ("calcnt", ctypes.c_long), ("errcnt", ctypes.c_long),
                ("stbcnt", ctypes.c_long), ("tai", ctypes.c_int), ("_pad", ctypes.c_int * 11)]


_libc = None


def kernel_timex() -> tuple[int, int, int] | None:
    """``(adjtimex return value, status, maxerror µs)`` from a read-only adjtimex(2), or None
    where there is none (not Linux)."""
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
        tx = _Timex()  # modes = 0: read only, needs no privilege
        rc = _libc.adjtimex(ctypes.byref(tx))
    except (OSError, AttributeError):
        return None
    if rc < 0:
        return None
    return rc, tx.status, tx.maxerror


def kernel_ntp_synced() -> bool:
    """True when the kernel says an NTP client (systemd-timesyncd, chrony, ntpd) has synchronised
    the system clock: systemd's own rule (``timedatectl show -p NTPSynchronized``)."""
    tx = kernel_timex()
    return tx is not None and tx[2] < _MAXERROR_UNSYNC_US


def _read_boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:  # not Linux: one id per process is the safe approximation
        return f"process-{uuid.uuid4()}"


class Clock:
    """Wall time from the system clock once trusted, provisional monotonic time before.

    ``wall_ns`` / ``mono_ns`` default to ``time.time_ns`` / ``time.monotonic_ns``; ``boot_id``
    names the current boot (the kernel's, by default) so provisional stamps from an earlier boot
    are never shifted by this boot's offset. ``kernel_synced`` (e.g. :func:`kernel_ntp_synced`)
    is asked, at most once a second, whether an NTP client synchronised the system clock; None
    trusts any wall time after the floor (a lab machine, a device with a battery-backed RTC).
    ``floor_ms`` is the newest time known to have passed (:meth:`raise_floor` moves it on).
    """

    def __init__(self, *, wall_ns: Callable[[], int] = time.time_ns,
                 mono_ns: Callable[[], int] = time.monotonic_ns, boot_id: str | None = None,
                 kernel_synced: Callable[[], bool] | None = None, floor_ms: int = PLAUSIBLE_AFTER_MS):
        self._wall_ns = wall_ns
        self._mono_ns = mono_ns
        self.boot_id = boot_id or _read_boot_id()
        self._kernel_synced = kernel_synced
        self._kernel_ok = False
        self._kernel_checked_ns: int | None = None
        self._external_offset_ns: int | None = None  # true - monotonic, from sync()
        self._floor_ms = max(int(floor_ms), PLAUSIBLE_AFTER_MS)
        self._floor_mono_ns: int | None = None  # when the floor was learnt in this boot
        self._trusted_wall: bool | None = None  # last answer, to log changes once
        self._lock = threading.Lock()

    # -- reading --------------------------------------------------------------------------
    def mono_ms(self) -> int:
        return self._mono_ns() // 1_000_000

    def _kernel_says_synced(self) -> bool:
        if self._kernel_synced is None:
            return True
        now = self._mono_ns()
        checked = self._kernel_checked_ns
        if checked is None or now - checked >= KERNEL_CHECK_EVERY_NS:
            try:
                self._kernel_ok = bool(self._kernel_synced())
            except Exception:  # a failing probe never stops the stamping: not synced
                log.exception("clock: the kernel's synchronisation state could not be read")
                self._kernel_ok = False
            self._kernel_checked_ns = now
        return self._kernel_ok

    def _wall_trusted(self, wall_ns: int) -> bool:
        earliest = max(PLAUSIBLE_AFTER_MS, self._floor_ms - FLOOR_SLACK_MS)
        ok = wall_ns >= earliest * 1_000_000 and self._kernel_says_synced()
        if ok != self._trusted_wall:
            self._trusted_wall = ok
            if ok:
                log.info("clock: system clock synchronised (%s)", self.source_name)
            elif self._kernel_says_synced():
                log.warning("clock: system clock reads %d ms, before the newest trusted time %d ms: "
                            "not trusted", wall_ns // 1_000_000, self._floor_ms)
        return ok

    @property
    def source_name(self) -> str:
        return "kernel NTP status" if self._kernel_synced is not None else "wall clock after the floor"

    def _true_ns(self) -> int | None:
        wall = self._wall_ns()
        if self._wall_trusted(wall):
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

    def floor_ms(self) -> int:
        """The newest time known to have passed, as learnt (never moves back)."""
        return self._floor_ms

    def not_before_ms(self) -> int:
        """A time the true time is certainly not before: the true time when synchronised, else
        the floor plus the monotonic time since it was learnt (in this boot)."""
        true = self._true_ns()
        if true is not None:
            return true // 1_000_000
        with self._lock:
            floor, since = self._floor_ms, self._floor_mono_ns
        return floor if since is None else floor + (self._mono_ns() - since) // 1_000_000

    def status(self) -> dict:
        """For ``dongle status``: synchronised or not, by what, and the floor."""
        return {"synced": self.is_synced(), "source": self.source_name,
                "kernel_synced": self._kernel_says_synced() if self._kernel_synced else None,
                "external": self._external_offset_ns is not None, "floor_ms": self._floor_ms}

    # -- setting --------------------------------------------------------------------------
    def raise_floor(self, trusted_ms: int) -> bool:
        """A trusted source (an authenticated downlink ``ts``, a synchronised reading) says the
        time is at least ``trusted_ms``. True if the floor moved."""
        with self._lock:
            if trusted_ms <= self._floor_ms:
                return False
            self._floor_ms = int(trusted_ms)
            self._floor_mono_ns = self._mono_ns()
        return True

    def sync(self, true_ms: int) -> None:
        """An external source (GNSS fix, MCU RTC) says it is ``true_ms`` now.

        Used only while the system clock is not trusted; setting the system clock itself is
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
