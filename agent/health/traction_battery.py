"""Traction-battery health: SOH history per vehicle, a robust trend, and the 30-day warning.

Readings come from :mod:`agent.ev` snapshots (``ev.soh``, ``ev.odometer_km``, temperatures,
cell voltages). They are stored per vehicle (VIN, or the profile name when the VIN is unknown)
in this module's own tables, at most one SOH row per ``min_interval_s``:

- ``traction_battery_soh`` (vehicle, t_ms, soh, odometer_km, temp_c, soc);
- ``traction_battery_cells`` (vehicle, t_ms, v_min, v_max, spread_mv, current_a) — readings at
  rest (``|current| <= rest_current_a``), where cell spread means something;
- ``traction_battery_alerts`` (vehicle, reason, level, t_ms, detail) — the last state emitted,
  so an event is sent when a warning appears, changes level or clears, not on every reading.

The trend (:func:`fit_trend`), on daily medians of the last ``window_days``:

1. BMS SOH wanders with temperature and state of charge, and steps when the BMS recalibrates.
   Daily medians remove the within-day wander and single odd readings.
2. Level shifts are found where the median of the ``step_days`` days after a day differs from
   the median of the days before by more than ``step_pct``; the series is cut there.
3. Theil–Sen over the cut series: the median of all pairwise slopes *within* a segment (a step
   between segments never enters a slope, so a recalibration does not move the trend); the
   current level is the median of (reading − slope × t) over the last segment.
4. Temperature: the slope of the residuals against pack temperature (Theil–Sen again) is taken
   out and the fit repeated, so a cold winter is not read as ageing.
5. Uncertainty: Sen's distribution-free confidence interval of the slope (Kendall's S variance
   summed over segments, 95 %), giving the earliest and latest projected crossing dates.
   ``confidence`` is the share of pairwise slopes that are negative (0.5 = no trend).

Events (PROTOCOL §4 ``health``, kind ``traction_battery``):

- ``warn`` / reason ``soh_projection``: the level is above ``threshold_pct`` (default 70 %), the
  slope's whole confidence interval is below zero, and the projected crossing is within
  ``warn_days`` (30) — with the date, the trend per month and per 1,000 km, and the confidence;
- ``critical`` / reason ``soh_below_threshold``: the current level is at or below the threshold;
- ``warn`` / reason ``cell_spread``: the median at-rest cell spread over the last 7 days is
  above ``cell_spread_mv`` (50 mV) and larger than it was 30-90 days before (growing);
- ``warn`` / reason ``cell_out_of_range``: a cell below/above ``cell_v_range`` in the last day.

Too little history (fewer than ``min_days`` days with readings, or a span shorter than
``min_span_days``) gives no SOH warning, and :meth:`TractionBatteryHealth.report` says so.
"""
from __future__ import annotations

import json
import logging
import math
import statistics
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from typing import Any

from drivers.core.clock import Clock

log = logging.getLogger(__name__)

DAY_MS = 86_400_000
KIND = "traction_battery"


@dataclass(frozen=True)
class Settings:
    threshold_pct: float = 70.0
    warn_days: float = 30.0
    window_days: float = 180.0
    min_days: int = 30
    min_span_days: float = 45.0
    step_pct: float = 0.6
    step_days: int = 7
    cell_spread_mv: float = 50.0
    rest_current_a: float = 2.0
    cell_v_range: tuple[float, float] = (2.5, 4.25)
    min_interval_s: float = 600.0
    evaluate_interval_s: float = 3600.0


# -- robust statistics ------------------------------------------------------------------------

def theil_sen(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Median of pairwise slopes (pairs with equal x skipped); ``None`` with fewer than 2 xs."""
    slopes = [(ys[j] - ys[i]) / (xs[j] - xs[i])
              for i in range(len(xs)) for j in range(i + 1, len(xs)) if xs[j] != xs[i]]
    return statistics.median(slopes) if slopes else None


@dataclass(frozen=True)
class Trend:
    """Result of :func:`fit_trend`. ``status``: ``"ok"`` or ``"insufficient"``."""

    status: str
    days: int
    span_days: float
    reason: str = ""
    slope_per_day: float | None = None
    slope_low: float | None = None    # 95 % interval of the slope (most negative end)
    slope_high: float | None = None
    level: float | None = None        # SOH now, from the fit
    confidence: float | None = None
    steps: tuple[int, ...] = ()       # day numbers where the series was cut
    temp_coef: float = 0.0            # % SOH per degC taken out
    km_per_day: float | None = None

    def days_to(self, threshold: float, slope: float | None = None) -> float | None:
        s = self.slope_per_day if slope is None else slope
        if self.level is None or s is None or s >= 0:
            return None
        return max(0.0, (self.level - threshold) / -s)


def _daily(rows: Iterable[tuple[int, float, float | None, float | None]]) -> list[tuple[int, float, float | None, float | None]]:
    """(day, median SOH, median temperature, max odometer) per UTC day."""
    by_day: dict[int, list[tuple[float, float | None, float | None]]] = {}
    for t_ms, soh, odo, temp in rows:
        by_day.setdefault(t_ms // DAY_MS, []).append((soh, odo, temp))
    out = []
    for day in sorted(by_day):
        vals = by_day[day]
        temps = [t for _, _, t in vals if t is not None]
        odos = [o for _, o, _ in vals if o is not None]
        out.append((day, statistics.median(s for s, _, _ in vals),
                    statistics.median(temps) if temps else None, max(odos) if odos else None))
    return out


def _temperature_coefficient(rows: Sequence[tuple[int, float, float | None, float | None]],
                             min_readings: int = 60, trim_pct: float = 1.5) -> tuple[float, float]:
    """(% SOH per degC, reference temperature) from the readings *within* each day: the battery
    does not age within a day, so how a day's readings move with that day's temperature swing
    is the BMS's temperature sensitivity, free of the ageing trend (over months, a season's
    temperature change runs alongside the ageing and cannot be told apart from it). Pooled
    least squares of (SOH - day median) on (temperature - day median); readings more than
    ``trim_pct`` from their day's median (odd readings) are left out. (0, median temperature)
    when there are too few readings with a temperature."""
    by_day: dict[int, list[tuple[float, float]]] = {}
    temps = []
    for t_ms, soh, _odo, temp in rows:
        if temp is not None:
            by_day.setdefault(t_ms // DAY_MS, []).append((temp, soh))
            temps.append(temp)
    if not temps:
        return 0.0, 0.0
    tref = statistics.median(temps)
    sxy = sxx = 0.0
    used = 0
    for vals in by_day.values():
        if len(vals) < 2:
            continue
        mt = statistics.median(t for t, _ in vals)
        ms = statistics.median(s_ for _, s_ in vals)
        for t, s_ in vals:
            if abs(s_ - ms) > trim_pct:
                continue
            sxy += (t - mt) * (s_ - ms)
            sxx += (t - mt) ** 2
            used += 1
    if used < min_readings or sxx < used * 1.0:  # needs about 1 degC of swing within days
        return 0.0, tref
    return sxy / sxx, tref


def _find_steps(days: Sequence[int], ys: Sequence[float], step_pct: float, k: int) -> list[int]:
    """Indexes where a persistent level shift starts (medians of k days either side)."""
    n = len(ys)
    scores = []
    for i in range(k, n - k + 1):
        left = statistics.median(ys[i - k:i])
        right = statistics.median(ys[i:i + k])
        scores.append((abs(right - left), i))
    cuts: list[int] = []
    for score, i in sorted(scores, reverse=True):
        if score <= step_pct:
            break
        if all(abs(i - c) >= k for c in cuts):
            cuts.append(i)
    return sorted(cuts)


def _blocked_fit(xs: Sequence[float], ys: Sequence[float], cuts: Sequence[int]) -> tuple[list[float], list[tuple[int, int]]]:
    bounds = [0, *cuts, len(xs)]
    segments = [(bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)]
    slopes = []
    for a, b in segments:
        for i in range(a, b):
            xi, yi = xs[i], ys[i]
            for j in range(i + 1, b):
                if xs[j] != xi:
                    slopes.append((ys[j] - yi) / (xs[j] - xi))
    slopes.sort()
    return slopes, segments


def fit_trend(rows: Iterable[tuple[int, float, float | None, float | None]], now: int,
              settings: Settings = Settings(), tref: float | None = None) -> Trend:
    """The SOH trend from ``(t_ms, soh, odometer_km, temp_c)`` rows up to ``now`` (ms).

    ``tref``: the temperature the level is given at — the car's typical pack temperature; by
    default the median temperature of all ``rows`` given (pass the whole history, or its
    median, so the reference does not follow the season of the window)."""
    rows = [r for r in rows if r[0] <= now]
    if tref is None:
        all_temps = [r[3] for r in rows if r[3] is not None]
        tref = statistics.median(all_temps) if all_temps else None
    start = now - settings.window_days * DAY_MS
    window = [r for r in rows if start <= r[0]]
    daily = _daily(window)
    n = len(daily)
    span = (daily[-1][0] - daily[0][0]) if n else 0.0
    if n < settings.min_days or span < settings.min_span_days:
        return Trend("insufficient", n, span,
                     reason=(f"SOH readings on {_days(n)} over {_days(span)}; the trend needs "
                             f"readings on at least {_days(settings.min_days)} over "
                             f"{_days(settings.min_span_days)}"))
    temp_coef, window_tref = _temperature_coefficient(window)
    tref = window_tref if tref is None else tref
    if temp_coef:
        daily = _daily((t, soh - temp_coef * (temp - tref) if temp is not None else soh, odo, temp)
                       for t, soh, odo, temp in window)
    xs = [float(d[0]) for d in daily]
    ys = [d[1] for d in daily]
    cuts = _find_steps(xs, ys, settings.step_pct, settings.step_days)
    slopes, segments = _blocked_fit(xs, ys, cuts)
    if not slopes:
        return Trend("insufficient", n, span, reason="no usable pairs of readings")
    slope = statistics.median(slopes)
    a, b = segments[-1]
    level = statistics.median(ys[i] - slope * xs[i] for i in range(a, b)) + slope * (now / DAY_MS)
    # Sen's confidence interval for the slope (Kendall S variance over segments), 95 %
    big_n = len(slopes)
    var_s = sum((m := b_ - a_) * (m - 1) * (2 * m + 5) / 18.0 for a_, b_ in segments)
    c = 1.96 * math.sqrt(var_s)
    lo_i = max(0, int((big_n - c) / 2))
    hi_i = min(big_n - 1, int((big_n + c) / 2) + 1)
    negative = sum(1 for s in slopes if s < 0) / big_n
    odo = [(x, d[3]) for x, d in zip(xs, daily) if d[3] is not None]
    km_per_day = None
    if len(odo) >= 2 and odo[-1][0] > odo[0][0]:
        km_per_day = (odo[-1][1] - odo[0][1]) / (odo[-1][0] - odo[0][0])
    return Trend("ok", n, span, slope_per_day=slope, slope_low=slopes[lo_i], slope_high=slopes[hi_i],
                 level=level, confidence=round(negative, 3),
                 steps=tuple(int(xs[i]) for i in cuts), temp_coef=temp_coef, km_per_day=km_per_day)


def _date(ms: float) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).strftime("%Y-%m-%d")


def assess_soh(trend: Trend, now: int, settings: Settings) -> tuple[str | None, str, dict[str, Any]]:
    """``(level or None, reason, detail)`` for an SOH trend."""
    if trend.status != "ok" or trend.level is None:
        return None, "insufficient_history", {"reason": trend.reason}
    detail: dict[str, Any] = {
        "soh_pct": round(trend.level, 2), "threshold_pct": settings.threshold_pct,
        "trend_pct_per_month": round(trend.slope_per_day * 30.44, 3),
        "confidence": trend.confidence, "days_of_history": trend.days,
    }
    if trend.km_per_day:
        detail["trend_pct_per_1000km"] = round(trend.slope_per_day / trend.km_per_day * 1000, 3)
    if trend.level <= settings.threshold_pct:
        return "critical", "soh_below_threshold", detail
    days = trend.days_to(settings.threshold_pct)
    if days is None:
        return None, "soh_projection", detail
    detail.update(projected_date=_date(now + days * DAY_MS), projected_ms=int(now + days * DAY_MS),
                  days_to_threshold=round(days, 1))
    early = trend.days_to(settings.threshold_pct, trend.slope_low)
    late = trend.days_to(settings.threshold_pct, trend.slope_high)
    if early is not None:
        detail["projected_earliest"] = _date(now + early * DAY_MS)
    if late is not None:
        detail["projected_latest"] = _date(now + late * DAY_MS)
    significant = trend.slope_high is not None and trend.slope_high < 0
    if significant and days <= settings.warn_days:
        return "warn", "soh_projection", detail
    return None, "soh_projection", detail


# -- the component -----------------------------------------------------------------------------

class TractionBatteryHealth:
    """Stores readings, evaluates the rules, emits ``health`` events on changes.

    ``store`` is an :class:`agent.store.Store`; ``emit_event(body)`` the agent's event sink.
    Thread-safe: :meth:`observe` is called from the EV reader's thread, :meth:`report` from
    the CLI or a downlink command.
    """

    def __init__(self, store: Any, emit_event: Callable[[dict], None] | None = None, *,
                 settings: Settings = Settings(), clock: Callable[[], int] | None = None):
        self._store = store
        self._emit = emit_event
        self.settings = settings
        self._clock = clock or Clock().now_ms
        self._lock = threading.RLock()
        self._last_row: dict[str, int] = {}
        self._last_eval: dict[str, int] = {}
        store.create_tables(
            "traction_battery_soh (vehicle TEXT, t_ms INTEGER, soh REAL, odometer_km REAL, "
            "temp_c REAL, soc REAL)",
            "traction_battery_cells (vehicle TEXT, t_ms INTEGER, v_min REAL, v_max REAL, "
            "spread_mv REAL, current_a REAL)",
            "traction_battery_alerts (vehicle TEXT, reason TEXT, level TEXT, t_ms INTEGER, detail TEXT, "
            "PRIMARY KEY (vehicle, reason))",
            indexes=("idx_traction_battery_soh_vehicle_t_ms ON traction_battery_soh (vehicle, t_ms)",
                     "idx_traction_battery_cells_vehicle_t_ms ON traction_battery_cells (vehicle, t_ms)"))

    def apply_config(self, doc: Mapping[str, Any]) -> list[str]:
        """Reads optional ``ev.soh_threshold_pct``, ``ev.warn_days``, ``ev.cell_spread_mv``."""
        ev = doc.get("ev") if isinstance(doc, Mapping) else None
        if not isinstance(ev, Mapping):
            return []
        problems, changes = [], {}
        for key, attr, lo, hi in (("soh_threshold_pct", "threshold_pct", 1, 100),
                                  ("warn_days", "warn_days", 1, 365),
                                  ("cell_spread_mv", "cell_spread_mv", 1, 1000)):
            if key not in ev:
                continue
            value = ev[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
                problems.append(f"ev.{key}: {value!r} is not a number in [{lo}, {hi}]")
                continue
            changes[attr] = float(value)
        with self._lock:
            self.settings = replace(self.settings, **changes)
            self._last_eval.clear()
        return problems

    # -- input ---------------------------------------------------------------------------------

    def observe(self, vehicle: str, t_ms: int, values: Mapping[str, float]) -> list[dict]:
        """Records one snapshot's values; evaluates at most every ``evaluate_interval_s`` and
        returns the events emitted (if any)."""
        s = self.settings
        with self._lock:
            soh = values.get("ev.soh")
            if soh is not None and t_ms - self._last_row.get(vehicle, -10**15) >= s.min_interval_s * 1000:
                self._last_row[vehicle] = t_ms
                temp = values.get("ev.batt_t_max", values.get("ev.batt_t"))
                if "ev.batt_t_min" in values and "ev.batt_t_max" in values:
                    temp = (values["ev.batt_t_min"] + values["ev.batt_t_max"]) / 2
                self.add_soh(vehicle, t_ms, soh, values.get("ev.odometer_km"), temp,
                             values.get("ev.soc_bms"))
            cells = [v for k, v in values.items() if k.startswith("ev.cell_v.")]
            v_min = values.get("ev.cell_v_min", min(cells) if cells else None)
            v_max = values.get("ev.cell_v_max", max(cells) if cells else None)
            current = values.get("ev.pack_i")
            if v_min is not None and v_max is not None:
                self.add_cells(vehicle, t_ms, v_min, v_max, current)
            if t_ms - self._last_eval.get(vehicle, -10**15) >= s.evaluate_interval_s * 1000:
                return self.evaluate(vehicle, t_ms)
        return []

    def observe_snapshot(self, snapshot: Any) -> list[dict]:
        """:meth:`observe` for an :class:`agent.ev.Snapshot` (``EvReader(on_snapshot=...)``)."""
        return self.observe(snapshot.vehicle, snapshot.t_ms, snapshot.values)

    def add_soh(self, vehicle: str, t_ms: int, soh: float, odometer_km: float | None = None,
                temp_c: float | None = None, soc: float | None = None) -> None:
        with self._store.batch() as c:
            c.execute("INSERT INTO traction_battery_soh(vehicle, t_ms, soh, odometer_km, temp_c, soc)"
                      " VALUES (?,?,?,?,?,?)", (vehicle, int(t_ms), float(soh), odometer_km, temp_c, soc))

    def add_many_soh(self, vehicle: str, rows: Iterable[tuple[int, float, float | None, float | None]]) -> None:
        with self._store.batch() as c:
            c.executemany("INSERT INTO traction_battery_soh(vehicle, t_ms, soh, odometer_km, temp_c)"
                          " VALUES (?,?,?,?,?)", [(vehicle, int(t), float(s), o, tc) for t, s, o, tc in rows])

    def add_cells(self, vehicle: str, t_ms: int, v_min: float, v_max: float,
                  current_a: float | None) -> None:
        s = self.settings
        lo, hi = s.cell_v_range
        at_rest = current_a is not None and abs(current_a) <= s.rest_current_a
        out_of_range = v_min < lo or v_max > hi
        if not at_rest and not out_of_range:
            return
        with self._store.batch() as c:
            c.execute("INSERT INTO traction_battery_cells(vehicle, t_ms, v_min, v_max, spread_mv, current_a)"
                      " VALUES (?,?,?,?,?,?)",
                      (vehicle, int(t_ms), v_min, v_max, (v_max - v_min) * 1000.0, current_a))

    # -- evaluation ----------------------------------------------------------------------------

    def _typical_temp(self, vehicle: str) -> float | None:
        rows = self._store.query("SELECT AVG(temp_c) FROM traction_battery_soh WHERE vehicle=?"
                                 " AND temp_c IS NOT NULL", (vehicle,))
        return rows[0][0] if rows and rows[0][0] is not None else None

    def _soh_rows(self, vehicle: str, until: int) -> list[tuple[int, float, float | None, float | None]]:
        start = until - int(self.settings.window_days * DAY_MS)
        return [tuple(r) for r in self._store.query(
            "SELECT t_ms, soh, odometer_km, temp_c FROM traction_battery_soh"
            " WHERE vehicle=? AND t_ms BETWEEN ? AND ? ORDER BY t_ms", (vehicle, start, until))]

    def _cell_findings(self, vehicle: str, now: int) -> list[tuple[str, str, dict[str, Any]]]:
        s = self.settings
        rows = self._store.query(
            "SELECT t_ms, v_min, v_max, spread_mv, current_a FROM traction_battery_cells"
            " WHERE vehicle=? AND t_ms BETWEEN ? AND ? ORDER BY t_ms", (vehicle, now - 90 * DAY_MS, now))
        out: list[tuple[str, str, dict[str, Any]]] = []
        lo, hi = s.cell_v_range
        last_day = [r for r in rows if r[0] >= now - DAY_MS]
        bad = [r for r in last_day if r[1] < lo or r[2] > hi]
        if bad:
            worst = min(bad, key=lambda r: r[1]) if any(r[1] < lo for r in bad) else max(bad, key=lambda r: r[2])
            out.append(("warn", "cell_out_of_range",
                        {"cell_v_min": worst[1], "cell_v_max": worst[2], "range_v": [lo, hi]}))
        rest = [r for r in rows if r[4] is not None and abs(r[4]) <= s.rest_current_a]
        recent = [r[3] for r in rest if r[0] >= now - 7 * DAY_MS]
        before = [r[3] for r in rest if now - 90 * DAY_MS <= r[0] < now - 30 * DAY_MS]
        if len(recent) >= 3:
            spread = statistics.median(recent)
            earlier = statistics.median(before) if len(before) >= 3 else None
            growing = earlier is None or spread > earlier + 5.0
            if spread > s.cell_spread_mv and growing:
                detail = {"spread_mv": round(spread, 1), "limit_mv": s.cell_spread_mv}
                if earlier is not None:
                    detail["spread_mv_30_90_days_ago"] = round(earlier, 1)
                out.append(("warn", "cell_spread", detail))
        return out

    def findings(self, vehicle: str, now: int | None = None) -> tuple[Trend, list[tuple[str, str, dict[str, Any]]]]:
        """The trend and every active finding ``(level, reason, detail)`` — no side effects."""
        now = self._clock() if now is None else now
        trend = fit_trend(self._soh_rows(vehicle, now), now, self.settings,
                          tref=self._typical_temp(vehicle))
        found = []
        level, reason, detail = assess_soh(trend, now, self.settings)
        if level is not None:
            found.append((level, reason, detail))
        found.extend(self._cell_findings(vehicle, now))
        return trend, found

    def evaluate(self, vehicle: str, now: int | None = None) -> list[dict]:
        """Emits an event for each finding that is new or changed level, and an ``info`` event
        for one that cleared. Returns the events."""
        now = self._clock() if now is None else now
        with self._lock:
            self._last_eval[vehicle] = now
            _trend, found = self.findings(vehicle, now)
            previous = {r[0]: r[1] for r in self._store.query(
                "SELECT reason, level FROM traction_battery_alerts WHERE vehicle=?", (vehicle,))}
            events = []
            current = {reason: (level, detail) for level, reason, detail in found}
            # a SOH below the threshold replaces the projection warning
            if "soh_below_threshold" in current:
                current.pop("soh_projection", None)
            with self._store.batch() as c:
                for reason, (level, detail) in current.items():
                    if previous.get(reason) != level:
                        events.append(self._event(now, level, reason, vehicle, detail))
                        c.execute("INSERT OR REPLACE INTO traction_battery_alerts VALUES (?,?,?,?,?)",
                                  (vehicle, reason, level, now, json.dumps(detail)))
                for reason, level in previous.items():
                    if reason not in current and level != "cleared":
                        events.append(self._event(now, "info", reason, vehicle, {"cleared": True}))
                        c.execute("INSERT OR REPLACE INTO traction_battery_alerts VALUES (?,?,?,?,?)",
                                  (vehicle, reason, "cleared", now, "{}"))
        for body in events:
            if self._emit is not None:
                try:
                    self._emit(body)
                except Exception:  # noqa: BLE001 - a sink failure must not stop evaluation
                    log.exception("emitting a traction battery event failed")
        return events

    @staticmethod
    def _event(now: int, level: str, reason: str, vehicle: str, detail: Mapping[str, Any]) -> dict:
        return {"type": "health", "ts": int(now), "kind": KIND, "level": level,
                "detail": {"reason": reason, "vehicle": vehicle, **detail}}

    # -- report --------------------------------------------------------------------------------

    def vehicles(self) -> list[str]:
        return [r[0] for r in self._store.query(
            "SELECT vehicle FROM traction_battery_soh GROUP BY vehicle ORDER BY MAX(t_ms) DESC")]

    def report(self, vehicle: str | None = None, now: int | None = None,
               latest: Mapping[str, float] | None = None,
               units: Mapping[str, str] | None = None) -> dict[str, Any]:
        """Everything ``dongle battery`` shows, as plain data (see :func:`format_battery_report`).
        ``latest``: the last snapshot's values (the EV reader's :meth:`last_values`), ``units``
        theirs (:meth:`last_units`)."""
        now = self._clock() if now is None else now
        if vehicle is None:
            known = self.vehicles()
            vehicle = known[0] if known else None
        out: dict[str, Any] = {"vehicle": vehicle, "now_ms": now, "settings": asdict(self.settings),
                               "readings": dict(latest or {}),
                               "units": {k: v for k, v in (units or {}).items() if k in (latest or {})}}
        if vehicle is None:
            out.update(trend={"status": "insufficient", "reason": "no SOH readings yet"}, findings=[])
            return out
        last = self._store.query(
            "SELECT t_ms, soh, odometer_km, temp_c FROM traction_battery_soh WHERE vehicle=?"
            " ORDER BY t_ms DESC LIMIT 1", (vehicle,))
        if last:
            out["last_soh"] = {"t_ms": last[0][0], "soh_pct": last[0][1], "odometer_km": last[0][2],
                               "temp_c": last[0][3]}
        trend, found = self.findings(vehicle, now)
        t = asdict(trend)
        if trend.status == "ok":
            t["trend_pct_per_month"] = trend.slope_per_day * 30.44
            _lvl, _reason, detail = assess_soh(trend, now, self.settings)
            t.update({k: v for k, v in detail.items() if k.startswith("projected") or k in (
                "days_to_threshold", "trend_pct_per_1000km")})
        out["trend"] = t
        out["findings"] = [{"level": lvl, "reason": reason, **detail} for lvl, reason, detail in found]
        return out


def _days(n: float) -> str:
    """``1 day``, ``0 days``, ``12 days`` (``n`` rounded to whole days)."""
    n = round(n)
    return f"{n} day" if n == 1 else f"{n} days"


def format_battery_report(report: Mapping[str, Any]) -> str:
    """Text for ``dongle battery`` from :meth:`TractionBatteryHealth.report` (pure)."""
    lines = [f"Traction battery — vehicle {report.get('vehicle') or '(none seen)'}"]
    readings = report.get("readings") or {}
    units = report.get("units") or {}
    if readings:
        lines.append("Latest readings:")
        for name in sorted(k for k in readings if not k.startswith("ev.cell_v.")):
            lines.append(f"  {name:<22} {readings[name]:g} {units.get(name, '')}".rstrip())
    last = report.get("last_soh")
    if last:
        lines.append(f"Last stored SOH: {last['soh_pct']:.1f} % on {_date(last['t_ms'])}"
                     + (f" at {last['odometer_km']:.0f} km" if last.get("odometer_km") is not None else ""))
    trend = report.get("trend") or {}
    threshold = (report.get("settings") or {}).get("threshold_pct", 70.0)
    if trend.get("status") != "ok":
        lines.append(f"Trend: not enough history — {trend.get('reason', 'no readings')}. No SOH warning is possible yet.")
    else:
        lines.append(f"Trend: {trend['trend_pct_per_month']:+.2f} %/month"
                     + (f", {trend['trend_pct_per_1000km']:+.3f} %/1,000 km" if trend.get("trend_pct_per_1000km") is not None else "")
                     + f" (confidence {trend.get('confidence', 0):.2f}; {trend['days']} days of history"
                     + (f"; recalibration steps on {len(trend['steps'])} day(s) ignored" if trend.get("steps") else "")
                     + ")")
        lines.append(f"SOH now (fitted): {trend['level']:.1f} %; threshold {threshold:g} %")
        if trend.get("projected_date"):
            span = ""
            if trend.get("projected_earliest") and trend.get("projected_latest"):
                span = f" (95 %: {trend['projected_earliest']} .. {trend['projected_latest']})"
            lines.append(f"Projected to reach {threshold:g} % on {trend['projected_date']}, "
                         f"in {trend['days_to_threshold']:.0f} days{span}")
        elif trend["level"] > threshold:
            lines.append("No decline projected to reach the threshold.")
    findings = report.get("findings") or []
    if findings:
        lines.append("Warnings:")
        for f in findings:
            detail = ", ".join(f"{k}={v}" for k, v in f.items() if k not in ("level", "reason"))
            lines.append(f"  [{f['level'].upper()}] {f['reason']}: {detail}")
    else:
        lines.append("Warnings: none")
    return "\n".join(lines)
