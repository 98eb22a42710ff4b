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
