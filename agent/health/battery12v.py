"""The 12 V battery: resting voltage before each engine start, the dip while cranking, the trend.

An engine start is engine speed going from "off" to above ``off_rpm``. "Off" is a sample at or
below ``off_rpm``, or no engine speed at all for ``off_after_s``: a parked car's ECU does not
answer, and the OBD poller, backing off while the car is away, typically comes back a few
seconds after the key is turned, when the engine already runs. Such a start (no sample saw the
crank) is counted with no crank dip, and with a resting voltage only if voltage samples of the
rest window exist. At every start the rule takes from the voltage samples of the adapter
(``ELM_VOLTAGE``, AT RV), the ECU (``CONTROL_MODULE_VOLTAGE``) or the MCU:

- **resting voltage**: the median of the readings in the ``rest_window_s`` before the crank
  window (engine off, ignition on, no charging): 12.6 V is a full lead-acid battery, 12.2 V
  about half, below 12.0 V it is discharged;
- **crank dip**: the lowest reading from ``crank_window_s`` before the start to
  ``crank_window_s`` after it. A healthy battery stays above 9.6 V while cranking (the usual
  load-test limit); below it the starter may soon fail to turn the engine.

Each start is kept (``BatteryHistory``) and the resting voltages of the last ``trend_days`` are
fitted with a least-squares line: a fall faster than ``trend_warn_v_per_week`` warns, with the
days left until the fitted line reaches ``rest_critical_v`` — the warning comes while the car
still starts. Levels: ``warn`` / ``critical`` per threshold (``health.battery_12v`` in the cloud
config); a ``health`` event of kind ``battery_12v`` is produced for a start when any is reached.
"""
from __future__ import annotations

import logging
import statistics
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, fields

log = logging.getLogger(__name__)

DAY_MS = 86_400_000
LEVELS = ("ok", "info", "warn", "critical")


@dataclass(frozen=True)
class BatteryThresholds:
    rest_warn_v: float = 12.2
    rest_critical_v: float = 11.9
    crank_warn_v: float = 9.6
    crank_critical_v: float = 8.5
    rest_window_s: float = 60.0
    crank_window_s: float = 3.0
    trend_days: float = 30.0
    trend_min_points: int = 5
    trend_min_span_days: float = 3.0
    trend_warn_v_per_week: float = 0.1
    off_after_s: float = 60.0

    @classmethod
    def from_config(cls, section: dict | None) -> "BatteryThresholds":
        section = section or {}
        kw = {}
        for f in fields(cls):
            v = section.get(f.name)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                kw[f.name] = int(v) if f.type == "int" else float(v)
        return cls(**kw)


def worst(*levels: str) -> str:
    return max(levels, key=LEVELS.index, default="ok")


@dataclass(frozen=True)
class StartReading:
    ts: int
    rest_v: float | None
    crank_min_v: float | None


def trend(history: Iterable[tuple[int, float]], now_ms: int, t: BatteryThresholds) -> dict | None:
    """Least-squares slope of resting voltage over the last ``trend_days``: ``{"v_per_week",
    "points", "fitted_now_v", "days_to_critical"}``, or None with too few points or too short a span."""
    pts = [(ts, v) for ts, v in history if v is not None and now_ms - ts <= t.trend_days * DAY_MS]
    if len(pts) < t.trend_min_points:
        return None
    days = [(ts - now_ms) / DAY_MS for ts, _ in pts]
    if max(days) - min(days) < t.trend_min_span_days:
        return None
    fit = statistics.linear_regression(days, [v for _, v in pts])
    out = {"v_per_week": round(fit.slope * 7, 3), "points": len(pts), "fitted_now_v": round(fit.intercept, 2)}
    if fit.slope < 0:
        out["days_to_critical"] = max(0.0, round((fit.intercept - t.rest_critical_v) / -fit.slope, 1))
    return out


def assess(reading: StartReading, trend_info: dict | None, t: BatteryThresholds) -> tuple[str, list[str]]:
    """The level of one start and the reasons for it."""
    found: list[tuple[str, str]] = []
    if reading.rest_v is not None:
        if reading.rest_v < t.rest_critical_v:
            found.append(("critical", f"resting voltage {reading.rest_v:.2f} V is below "
                                      f"{t.rest_critical_v} V (discharged)"))
        elif reading.rest_v < t.rest_warn_v:
            found.append(("warn", f"resting voltage {reading.rest_v:.2f} V is below {t.rest_warn_v} V"))
    if reading.crank_min_v is not None:
        for level, limit in (("critical", t.crank_critical_v), ("warn", t.crank_warn_v)):
            if reading.crank_min_v < limit:
                found.append((level, f"voltage fell to {reading.crank_min_v:.2f} V while cranking "
                                     f"(below {limit} V)"))
                break
    if trend_info and trend_info["v_per_week"] <= -t.trend_warn_v_per_week:
        left = (f", {trend_info['days_to_critical']:.0f} days to {t.rest_critical_v} V"
                if "days_to_critical" in trend_info else "")
        found.append(("warn", f"resting voltage falling {-trend_info['v_per_week']:.2f} V per week{left}"))
    return worst(*(lvl for lvl, _ in found)), [why for _, why in found]


class StartDetector:
    """Finds engine starts in voltage and rpm samples and measures them (:class:`StartReading`).

    Feed samples in time order; :meth:`tick` lets time pass without samples (the health thread
    calls it), so that a silence of ``off_after_s`` counts as the engine off even before the
    next sample arrives; :meth:`engine_off` says so directly (e.g. the vehicle link is gone)."""

    def __init__(self, thresholds: BatteryThresholds | None = None, *, off_rpm: float = 50.0):
        self.t = thresholds or BatteryThresholds()
        self.off_rpm = off_rpm
        self._volts: deque[tuple[int, float]] = deque()
        self._running: bool | None = None     # None: not known yet (the agent just came up)
        self._last_rpm: int | None = None     # time of the last rpm sample
        self._since: int | None = None        # first tick without any rpm sample yet
        self._inferred = False                # off from a silence, not from a sample
        self._pending: int | None = None  # start time waiting for its crank window to pass
        self._pending_crank = False       # ... and whether a sample saw the engine off before it
        self.starts = 0

    def engine_off(self, t_ms: int) -> None:
        """From ``t_ms`` the engine is off (not seen running), whatever the last sample said."""
        if self._running is not False:
            log.debug("health: engine off from %d (no engine speed for a while)", t_ms)
            self._running = False
            self._inferred = True

    def tick(self, now_ms: int) -> None:
        """Time passes: no engine speed for ``off_after_s`` means the engine is off."""
        last = self._last_rpm if self._last_rpm is not None else self._since
        if last is None:
            self._since = now_ms
        elif now_ms - last > self.t.off_after_s * 1000:
            self.engine_off(last)

    def feed(self, role: str, t_ms: int, value: float) -> StartReading | None:
        out = None
        if role == "voltage":
            self._volts.append((t_ms, value))
            horizon = t_ms - (self.t.rest_window_s + 2 * self.t.crank_window_s + 5) * 1000
            while self._volts and self._volts[0][0] < horizon:
                self._volts.popleft()
        elif role == "rpm":
            self.tick(t_ms)
            running = value > self.off_rpm
            if running and self._running is False and self._pending is None:
                self._pending = t_ms
                self._pending_crank = not self._inferred
            if not running:
                self._inferred = False
            self._running = running
            self._last_rpm = t_ms
        if self._pending is not None and t_ms >= self._pending + self.t.crank_window_s * 1000:
            out = self._measure(self._pending, self._pending_crank)
            self._pending = None
            self.starts += 1
        return out

    def _measure(self, start: int, crank_seen: bool = True) -> StartReading:
        w = self.t.crank_window_s * 1000
        rest = [v for t, v in self._volts if start - w - self.t.rest_window_s * 1000 <= t < start - w]
        crank = [v for t, v in self._volts if start - w <= t <= start + w] if crank_seen else []
        return StartReading(ts=start, rest_v=round(statistics.median(rest), 3) if rest else None,
                            crank_min_v=round(min(crank), 3) if crank else None)
