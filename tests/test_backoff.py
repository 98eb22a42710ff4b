"""drivers/core/backoff.py: capped exponential backoff with full jitter (deterministic, seeded rngs)."""
from __future__ import annotations

import random

import pytest

from drivers.core.backoff import Backoff


def test_first_wait_is_the_minimum_and_ceiling_doubles_up_to_the_cap() -> None:
    b = Backoff(0.5, 10.0, rng=random.Random(1))
    ceilings = []
    for _ in range(8):
        ceilings.append(b.ceiling())
        b.next()
    assert ceilings == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0]
    assert b.failures == 8


def test_every_wait_lies_between_min_and_the_ceiling_announced_before_it() -> None:
    b = Backoff(0.2, 30.0, rng=random.Random(7))
    for _ in range(200):
        ceiling = b.ceiling()
        wait = b.next()
        assert 0.2 <= wait <= ceiling <= 30.0


def test_cap_holds_after_very_many_failures() -> None:
    b = Backoff(1.0, 300.0, rng=random.Random(3))
    waits = [b.next() for _ in range(1000)]  # 2**1000 would overflow a float without the cap
    assert max(waits) <= 300.0
    assert b.ceiling() == 300.0


def test_reset_starts_over_from_the_minimum() -> None:
    b = Backoff(1.0, 60.0, rng=random.Random(5))
    for _ in range(10):
        b.next()
    assert b.ceiling() == 60.0
    b.reset()
    assert b.failures == 0
    assert b.ceiling() == 1.0
    assert b.next() == 1.0  # the first wait after a reset is exactly min_s


def test_jitter_spreads_over_the_whole_range_at_the_cap() -> None:
    b = Backoff(1.0, 100.0, rng=random.Random(11))
    for _ in range(10):
        b.next()
    waits = [b.next() for _ in range(2000)]
    # Full jitter: uniform over [min, max], so both ends and the middle are populated.
    assert min(waits) < 5.0
    assert max(waits) > 95.0
    assert sum(1 for w in waits if 40.0 <= w <= 60.0) > 200
    assert len(set(waits)) == len(waits)


def test_same_seed_same_schedule_different_seed_different_schedule() -> None:
    def schedule(seed: int) -> list[float]:
        b = Backoff(0.1, 5.0, rng=random.Random(seed))
        return [b.next() for _ in range(20)]

    assert schedule(42) == schedule(42)
    assert schedule(42) != schedule(43)


def test_fleet_started_together_does_not_retry_in_lockstep() -> None:
    fleet = [Backoff(1.0, 300.0, rng=random.Random(i)) for i in range(50)]
    for b in fleet:
        for _ in range(8):
            b.next()
    waits = [b.next() for b in fleet]
    assert len({round(w, 3) for w in waits}) == len(waits)


def test_min_equal_max_is_a_constant_wait() -> None:
    b = Backoff(2.0, 2.0, rng=random.Random(0))
    assert [b.next() for _ in range(5)] == [2.0] * 5


@pytest.mark.parametrize("min_s, max_s", [(0, 1), (-1, 1), (2, 1)])
def test_invalid_bounds_are_refused(min_s: float, max_s: float) -> None:
    with pytest.raises(ValueError):
        Backoff(min_s, max_s)
