"""Capped exponential backoff with full jitter, shared by every reconnect loop.

Mobile carriers block devices that hammer their network, so no loop of ours ever retries in a
tight loop: each failure doubles the ceiling up to ``max_s`` and the actual wait is drawn
uniformly from ``[min_s, ceiling]`` ("full jitter"), which also spreads a fleet that lost the
broker at the same moment.
"""
from __future__ import annotations

import random


class Backoff:
    def __init__(self, min_s: float = 1.0, max_s: float = 300.0, *, rng: random.Random | None = None):
        if min_s <= 0 or max_s < min_s:
            raise ValueError(f"backoff needs 0 < min_s <= max_s, got {min_s}, {max_s}")
        self.min_s = float(min_s)
        self.max_s = float(max_s)
        self._rng = rng or random.Random()
        self.failures = 0

    def next(self) -> float:
        """Records one more failure and returns how long to wait before the next attempt."""
        ceiling = min(self.max_s, self.min_s * (2 ** min(self.failures, 32)))
        self.failures += 1
        return self._rng.uniform(self.min_s, ceiling)

    def ceiling(self) -> float:
        """The largest wait the next call to :meth:`next` can return."""
        return min(self.max_s, self.min_s * (2 ** min(self.failures, 32)))

    def reset(self) -> None:
        """Call once a connection has proved stable (not merely opened)."""
        self.failures = 0
