"""The agent's one source of wall-clock time (ms since the Unix epoch).

Everything that stamps data takes a ``clock`` callable defaulting to :func:`now_ms`, so tests
can inject time and a later change (monotonic time plus an offset learnt once the clock is
synchronised) happens in one place.
"""
from __future__ import annotations

import time


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def now_us() -> int:
    return time.time_ns() // 1_000


# No clock we run on can legitimately be earlier than this (2025-01-01): a Pi without a
# real-time clock boots at its last saved time or 1970 until NTP or GNSS sets it.
_PLAUSIBLE_AFTER_MS = 1_735_689_600_000


def is_synced(now: int | None = None) -> bool:
    """True once the wall clock is plausible (set by NTP, GNSS or the MCU)."""
    return (now_ms() if now is None else now) >= _PLAUSIBLE_AFTER_MS


def synced_now_ms() -> int | None:
    """``now_ms()``, or None while the clock is not synchronised (PROTOCOL §3 skips ``exp`` then)."""
    now = now_ms()
    return now if is_synced(now) else None
