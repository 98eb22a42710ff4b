"""Driving events: harsh braking and harsh acceleration, from vehicle speed.

The acceleration between two consecutive speed samples at most ``max_dt_s`` apart is
``(v2 - v1) / dt``. An episode starts when it goes beyond ``harsh_brake_ms2`` (as a deceleration)
or ``harsh_accel_ms2`` and ends at the first interval back under the threshold (or a gap); it
yields one event with the peak, the speeds at its ends and its duration. Defaults: 3.5 m/s²
braking, 3.0 m/s² acceleration (about 0.36 g / 0.31 g, the usual telematics thresholds); the
cloud config's ``health.driving`` overrides them.

Driving behaviour is personal data (PROTOCOL §6): nothing here is computed, kept or sent unless
the config's ``privacy.driving_behaviour`` consent is ``on`` and not expired
(:func:`driving_behaviour_allowed`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, fields

log = logging.getLogger(__name__)


def driving_behaviour_allowed(config: dict | None, now_ms: int) -> bool:
    """True while the owner's consent for driving behaviour is in force.

    Reads the config's ``privacy`` section directly (PROTOCOL §6: absent, ``off`` or past
    ``until`` means no). To be replaced by the privacy module's check once it exists, so that a
    pause at the car is honoured too."""
    consent = ((config or {}).get("privacy") or {}).get("driving_behaviour")
    if not isinstance(consent, dict) or consent.get("mode") != "on":
        return False
    granted, until = consent.get("granted_at"), consent.get("until")
    if not isinstance(until, int) or not isinstance(granted, int):
        return False
    return granted <= now_ms < until


@dataclass(frozen=True)
class DrivingThresholds:
    harsh_brake_ms2: float = 3.5
    harsh_accel_ms2: float = 3.0
    max_dt_s: float = 2.5

    @classmethod
    def from_config(cls, section: dict | None) -> "DrivingThresholds":
        section = section or {}
        return cls(**{f.name: float(section[f.name]) for f in fields(cls)
                      if isinstance(section.get(f.name), (int, float)) and not isinstance(section.get(f.name), bool)})


@dataclass
class _Episode:
    kind: str
    start_ms: int
    from_kmh: float
    to_kmh: float
    peak_ms2: float
    end_ms: int


class HarshEventDetector:
    """Feed ``(t_ms, speed km/h)`` in time order; returns a ``health`` event body per episode."""

    def __init__(self, thresholds: DrivingThresholds | None = None):
        self.t = thresholds or DrivingThresholds()
        self._prev: tuple[int, float] | None = None
        self._ep: _Episode | None = None
        self.counts = {"harsh_braking": 0, "harsh_acceleration": 0}

    def reset(self) -> None:
        self._prev = None
        self._ep = None

    def feed(self, t_ms: int, kmh: float) -> dict | None:
        prev, self._prev = self._prev, (t_ms, kmh)
        if prev is None or t_ms <= prev[0]:
            return None
        dt = (t_ms - prev[0]) / 1000.0
        if dt > self.t.max_dt_s:
            return self._close()
        a = (kmh - prev[1]) / 3.6 / dt
        kind = "harsh_braking" if a <= -self.t.harsh_brake_ms2 else \
            "harsh_acceleration" if a >= self.t.harsh_accel_ms2 else None
        ep = self._ep
        if ep is not None and kind == ep.kind:
            ep.to_kmh, ep.end_ms = kmh, t_ms
            ep.peak_ms2 = max(ep.peak_ms2, abs(a))
            return None
        out = self._close()
        if kind is not None:
            self._ep = _Episode(kind, prev[0], prev[1], kmh, abs(a), t_ms)
        return out

    def _close(self) -> dict | None:
        ep, self._ep = self._ep, None
        if ep is None:
            return None
        self.counts[ep.kind] += 1
        return {"type": "health", "ts": ep.start_ms, "kind": ep.kind, "level": "info",
                "detail": {"peak_ms2": round(ep.peak_ms2, 2), "from_kmh": round(ep.from_kmh, 1),
                           "to_kmh": round(ep.to_kmh, 1), "duration_s": round((ep.end_ms - ep.start_ms) / 1000, 1)}}
