"""Trips from engine speed and vehicle speed: start, end, distance, duration, fuel.

A trip starts with the first sample that shows the vehicle in use (engine speed above
``active_rpm`` or vehicle speed above 0) and is confirmed once it has lasted ``min_duration_s``
(only then is ``trip_start`` sent, stamped with the first sample's time). It ends when nothing
has shown use for ``end_after_s`` (samples saying rpm 0 and speed 0, or no samples at all —
the car was switched off and the adapter went quiet); ``trip_end`` is stamped with the last
active sample's time.

Distance is the trapezoid integral of vehicle speed over time; an interval longer than
``max_gap_s`` between two speed samples is not integrated (the car's motion in between is
unknown) and counted in ``gaps``. Fuel: fuel rate (L/h) integrated when the vehicle reports it,
else mass air flow (g/s) integrated and converted with the stoichiometric air-fuel ratio and the
fuel's density (petrol: 14.7, 745 g/L). Neither known: no ``fuel_l``.

Thresholds come from the cloud config's ``health.trips`` (docs/technician.md, config schema).
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, fields

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TripThresholds:
    active_rpm: float = 300.0
    end_after_s: float = 120.0
    min_duration_s: float = 10.0
    max_gap_s: float = 10.0
    afr: float = 14.7
    fuel_density_g_per_l: float = 745.0

    @classmethod
    def from_config(cls, section: dict | None) -> "TripThresholds":
        section = section or {}
        return cls(**{f.name: float(section[f.name]) for f in fields(cls)
                      if isinstance(section.get(f.name), (int, float)) and not isinstance(section.get(f.name), bool)})


@dataclass
class Trip:
    start_ms: int
    last_active_ms: int
    distance_km: float = 0.0
    fuel_l: float | None = None
    started_sent: bool = False
    gaps: int = 0
    odometer_start_km: float | None = None
    fuel_source: str | None = None

    @property
    def duration_s(self) -> float:
        return (self.last_active_ms - self.start_ms) / 1000.0

    def as_dict(self) -> dict:
        d = {"start_ms": self.start_ms, "duration_s": round(self.duration_s, 1),
             "distance_km": round(self.distance_km, 3)}
        if self.fuel_l is not None:
            d["fuel_l"] = round(self.fuel_l, 3)
        return d


class TripDetector:
    """Feed samples by role (``speed`` km/h, ``rpm``, ``maf`` g/s, ``fuel_rate`` L/h) in time
    order per role; ``tick(now_ms)`` closes a trip after silence. Events go to ``emit``."""

    def __init__(self, emit: Callable[[dict], None], *, thresholds: TripThresholds | None = None,
                 odometer_km: Callable[[], float | None] = lambda: None):
        self.emit = emit
        self.t = thresholds or TripThresholds()
        self._odometer = odometer_km
        self.trip: Trip | None = None
        self.last_trip: dict | None = None
        self.trips = 0
        self._speed: tuple[int, float] | None = None
        self._flow: dict[str, tuple[int, float]] = {}

    # -- input ----------------------------------------------------------------------------
    def feed(self, role: str, t_ms: int, value: float) -> None:
        if role == "speed":
            active = value > 0.5
        elif role == "rpm":
            active = value > self.t.active_rpm
        else:
            active = False
        if self.trip is not None and t_ms - self.trip.last_active_ms > self.t.end_after_s * 1000:
            self._end()
        if active:
            if self.trip is None:
                self.trip = Trip(start_ms=t_ms, last_active_ms=t_ms, odometer_start_km=self._odometer())
            self.trip.last_active_ms = max(self.trip.last_active_ms, t_ms)
        trip = self.trip
        if trip is None:
            if role == "speed":
                self._speed = (t_ms, value)
            elif role in ("maf", "fuel_rate"):
                self._flow[role] = (t_ms, value)
            return
        if role == "speed":
            self._integrate_speed(trip, t_ms, value)
        elif role in ("maf", "fuel_rate"):
            self._integrate_fuel(trip, role, t_ms, value)
        if not trip.started_sent and trip.duration_s >= self.t.min_duration_s:
            trip.started_sent = True
            if trip.odometer_start_km is None:
                # known only since the trip began (its first reading came after): back to the start
                now = self._odometer()
                if now is not None:
                    trip.odometer_start_km = max(0.0, now - trip.distance_km)
            body = {"type": "trip_start", "ts": trip.start_ms}
            if trip.odometer_start_km is not None:
                body["odometer_km"] = round(trip.odometer_start_km, 1)
            self.emit(body)

    def tick(self, now_ms: int) -> None:
        if self.trip is not None and now_ms - self.trip.last_active_ms > self.t.end_after_s * 1000:
            self._end()

    def flush(self) -> None:
        """Ends a trip in progress now (the agent stops)."""
        if self.trip is not None:
            self._end()

    # -- integration ----------------------------------------------------------------------
    def _integrate_speed(self, trip: Trip, t_ms: int, kmh: float) -> None:
        prev = self._speed
        self._speed = (t_ms, kmh)
        if prev is None or t_ms <= prev[0] or prev[0] < trip.start_ms:
            return
        dt_s = (t_ms - prev[0]) / 1000.0
        if dt_s > self.t.max_gap_s:
            trip.gaps += 1
            return
        trip.distance_km += (prev[1] + kmh) / 2.0 * dt_s / 3600.0

    def _integrate_fuel(self, trip: Trip, role: str, t_ms: int, value: float) -> None:
        if trip.fuel_source == "fuel_rate" and role == "maf":
            return  # the vehicle's own fuel rate beats an estimate from air flow
        if role == "fuel_rate" and trip.fuel_source == "maf":
            trip.fuel_l = 0.0  # the better source from here on (the MAF estimate so far is dropped)
        trip.fuel_source = role
        prev = self._flow.get(role)
        self._flow[role] = (t_ms, value)
        if prev is None or t_ms <= prev[0] or prev[0] < trip.start_ms:
            return
        dt_s = (t_ms - prev[0]) / 1000.0
        if dt_s > self.t.max_gap_s:
            return
        mean = (prev[1] + value) / 2.0
        if role == "fuel_rate":
            litres = mean * dt_s / 3600.0
        else:
            litres = mean * dt_s / self.t.afr / self.t.fuel_density_g_per_l
        trip.fuel_l = (trip.fuel_l or 0.0) + litres

    def _end(self) -> None:
        odo = self._odometer() if self.trip is not None and self.trip.started_sent else None
        trip, self.trip = self.trip, None
        self._speed = None
        self._flow.clear()
        if trip is None or not trip.started_sent:
            return  # too short to be a trip: never announced, nothing to close
        body: dict = {"type": "trip_end", "ts": trip.last_active_ms,
                      "distance_km": round(trip.distance_km, 3), "duration_s": round(trip.duration_s, 1)}
        if trip.fuel_l is not None:
            body["fuel_l"] = round(trip.fuel_l, 3)
        if odo is not None:
            body["odometer_km"] = round(odo, 1)
        self.trips += 1
        self.last_trip = {**trip.as_dict(), "end_ms": trip.last_active_ms, "gaps": trip.gaps}
        log.info("trip ended: %.2f km in %.0f s", trip.distance_km, trip.duration_s)
        self.emit(body)

    def status(self) -> dict:
        return {"in_trip": self.trip is not None and self.trip.started_sent,
                "current": self.trip.as_dict() if self.trip and self.trip.started_sent else None,
                "last": self.last_trip, "trips": self.trips}
