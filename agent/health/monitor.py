"""The health component: feeds the agent's samples through the rules and sends what they find.

Samples are recognised by role, from the active cloud config: the name an ``obd.pids`` entry
gives ``SPEED`` (speed), ``RPM`` (rpm), ``MAF`` (maf), ``FUEL_RATE`` (fuel_rate), ``ELM_VOLTAGE``
or ``CONTROL_MODULE_VOLTAGE`` (voltage); ``health.signals`` (``{role: signal name}``) names
others, e.g. a CAN signal or the MCU's supply voltage, and ``odometer``.

Rules (each its own module): trips (:mod:`.trips`), 12 V battery (:mod:`.battery12v`),
maintenance due (:mod:`.maintenance`), harsh driving (:mod:`.driving`, only with the owner's
consent), DTC severity (:mod:`.severity`). :meth:`HealthMonitor.snapshot` is the health part of
the ``report`` command.

Drivers hand samples over on their own threads; they are only queued there (bounded, drops
counted) and processed on the ``health`` thread, which also closes trips after silence and checks
maintenance once a minute.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

from drivers.core.clock import Clock
from agent.health import battery12v, maintenance, severity
from agent.health.driving import DrivingThresholds, HarshEventDetector, driving_behaviour_allowed
from agent.health.trips import TripDetector, TripThresholds
from drivers.core.model import Sample
from agent.technician.service_log import ServiceLog

log = logging.getLogger(__name__)

ROLE_PIDS = {"SPEED": "speed", "RPM": "rpm", "MAF": "maf", "FUEL_RATE": "fuel_rate",
             "ELM_VOLTAGE": "voltage", "CONTROL_MODULE_VOLTAGE": "voltage"}
ROLES = {"speed", "rpm", "maf", "fuel_rate", "voltage", "odometer"}
SPEED_UNITS = {"km/h": 1.0, "kph": 1.0, "kmh": 1.0, "m/s": 3.6, "mph": 1.609344}
LEVEL_ORDER = ("ok", "unknown", "info", "warn", "critical")
META_ODOMETER = "health.odometer"
META_NOTIFIED = "health.maintenance.notified"


def roles(config: dict) -> dict[str, str]:
    """``{sample name: role}`` for the active config."""
    out: dict[str, str] = {}
    for p in (config.get("obd") or {}).get("pids", []):
        role = ROLE_PIDS.get(str(p.get("pid", "")).upper())
        if role and p.get("name"):
            out[p["name"]] = role
    for role, name in ((config.get("health") or {}).get("signals") or {}).items():
        if role in ROLES and isinstance(name, str):
            out[name] = role
    return out


def config_problems(doc: dict) -> list[str]:
    """What of a config's ``health`` section cannot be used (it is otherwise schema-valid)."""
    section = doc.get("health") or {}
    problems = [f"health.signals.{r}: unknown role (known: {', '.join(sorted(ROLES))})"
                for r in (section.get("signals") or {}) if r not in ROLES]
    items = (section.get("maintenance") or {}).get("items") or {}
    problems += [f"health.maintenance.items.{k}: needs km or days" for k, v in items.items()
                 if not isinstance(v, dict) or not ({"km", "days"} & set(v))]
    return problems


class HealthMonitor:
    def __init__(self, *, store, emit_event: Callable[[dict], None], config: Callable[[], dict],
                 clock: Callable[[], int] | None = None, max_queued: int = 20_000,
                 driving_allowed: Callable[[], bool] | None = None):
        self.store = store
        # The consent gate for driving behaviour (PROTOCOL §6): the privacy module's when the
        # agent has one (it also honours a pause at the car), else the config read directly.
        self._driving_allowed = driving_allowed or (lambda: driving_behaviour_allowed(self._config(), self._clock()))
        self.emit = emit_event
        self._config = config
        self._clock = clock or Clock().now_ms
        self.service_log = ServiceLog(store)
        store.create_tables("health_battery (ts INTEGER PRIMARY KEY, rest_v REAL, crank_min_v REAL)")
        self._q: queue.Queue[list[Sample]] = queue.Queue(maxsize=max_queued)
        self.dropped = 0
        self.processed = 0
        self.latest: dict[str, tuple[int, float, str]] = {}   # name -> (t_ms, value, unit)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._config_id: int | None = None
        self._roles: dict[str, str] = {}
        self.trips = TripDetector(self._emit, odometer_km=self.odometer_km)
        self.starts = battery12v.StartDetector()
        self.battery_t = battery12v.BatteryThresholds()
        self.driving = HarshEventDetector()
        self.driving_allowed = False
        self.last_start: dict | None = None
        self._next_maintenance = 0.0
        self.errors = 0
        self._refresh_config()

    # -- input (any thread) -------------------------------------------------------------------
    def on_samples(self, samples: list[Sample]) -> None:
        try:
            self._q.put_nowait(samples)
        except queue.Full:
            self.dropped += len(samples)

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="health", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(10)
            self._thread = None
        self._drain()
        self.trips.flush()

    def apply_config(self, doc: dict) -> list[str]:
        self._refresh_config(doc)
        return config_problems(doc)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._refresh_config()
                self._drain(wait_s=0.5)
                self.tick(self._clock())
                if time.monotonic() >= self._next_maintenance:
                    self._next_maintenance = time.monotonic() + 60
                    self.check_maintenance()
            except Exception:
                self.errors += 1
                log.exception("health: processing failed; carrying on")
                self._stop.wait(1.0)

    def tick(self, now_ms: int) -> None:
        """Time passes without samples: a trip ends after its silence, the engine counts as off
        after ``health.battery_12v.off_after_s`` without engine speed (the health thread calls
        this twice a second; public for tests and replays)."""
        self.trips.tick(now_ms)
        self.starts.tick(now_ms)

    def wake_maintenance(self) -> None:
        """Re-checks maintenance at the next loop (a service record was just added)."""
        self._next_maintenance = 0.0

    # -- processing ---------------------------------------------------------------------------
    def _refresh_config(self, doc: dict | None = None) -> None:
        doc = doc if doc is not None else self._config()
        if id(doc) == self._config_id:
            return
        self._config_id = id(doc)
        section = doc.get("health") or {}
        self._roles = roles(doc)
        self.trips.t = TripThresholds.from_config(section.get("trips"))
        self.battery_t = battery12v.BatteryThresholds.from_config(section.get("battery_12v"))
        self.starts.t = self.battery_t
        self.driving.t = DrivingThresholds.from_config(section.get("driving"))

    def _drain(self, wait_s: float = 0.0) -> None:
        try:
            batch = self._q.get(timeout=wait_s) if wait_s else self._q.get_nowait()
        except queue.Empty:
            return
        batches = [batch]
        while True:
            try:
                batches.append(self._q.get_nowait())
            except queue.Empty:
                break
        samples = sorted((s for b in batches for s in b), key=lambda s: s.t_ms)
        self.process(samples)

    def process(self, samples: list[Sample]) -> None:
        """Runs the rules over ``samples`` (time order). Public for tests and replays."""
        allowed = bool(self._driving_allowed())
        if allowed != self.driving_allowed:
            self.driving_allowed = allowed
            self.driving.reset()
            log.info("health: driving behaviour %s", "analysed (owner consent in force)" if allowed
                     else "not analysed (no consent in force)")
        for s in samples:
            with self._lock:
                self.latest[s.name] = (s.t_ms, s.value, s.unit)
            role = self._roles.get(s.name)
            if role is None:
                continue
            value = float(s.value)
            if role == "speed":
                value *= SPEED_UNITS.get(s.unit.lower(), 1.0)
            self.processed += 1
            if role == "odometer":
                # with how far the trip in progress had gone then: a trip adds only what follows
                trip = self.trips.trip
                self.store.set_meta(META_ODOMETER, {
                    "km": value, "ts": s.t_ms, "trip_start": trip.start_ms if trip is not None else None,
                    "trip_km": trip.distance_km if trip is not None else 0.0})
                continue
            self.trips.feed(role, s.t_ms, value)
            reading = self.starts.feed(role, s.t_ms, value)
            if reading is not None:
                self._on_start(reading)
            if role == "speed" and allowed:
                event = self.driving.feed(s.t_ms, value)
                if event:
                    self._emit(event)

    def _emit(self, body: dict) -> None:
        if body["type"] == "trip_end":
            self._add_distance(body["distance_km"], body["ts"])
        self.emit(body)

    # -- odometer -----------------------------------------------------------------------------
    def _odometer_base(self) -> tuple[int, float, dict | None] | None:
        """(ts, km, the reading or None for a service record) the odometer counts from: the
        last reading or service record, whichever is newer."""
        meta = self.store.get_meta(META_ODOMETER)
        records = self.service_log.records()
        base = (int(meta["ts"]), float(meta["km"]), meta) if meta else None
        if records and (base is None or records[-1].get("ts", 0) > base[0]):
            base = (int(records[-1]["ts"]), float(records[-1]["odometer_km"]), None)
        return base

    @staticmethod
    def _since_base(base: tuple[int, float, dict | None], start_ms: int, distance_km: float) -> float:
        """How much of a trip (its start, its distance so far) lies after ``base``: all of it if
        it started after; what it drove since the reading if the reading was taken during it."""
        ts, _, reading = base
        if start_ms >= ts:
            return distance_km
        if reading is not None and reading.get("trip_start") == start_ms:
            return max(0.0, distance_km - float(reading.get("trip_km") or 0.0))
        return 0.0

    def odometer_km(self) -> float | None:
        """The best known odometer: the last reading or service record, plus trips since."""
        base = self._odometer_base()
        if base is None:
            return None
        trip = self.trips.trip
        extra = self._since_base(base, trip.start_ms, trip.distance_km) if trip is not None else 0.0
        return base[1] + extra

    def _add_distance(self, km: float, ts: int) -> None:
        base = self._odometer_base()
        if base is None:
            return
        last = self.trips.last_trip or {}
        start = int(last.get("start_ms", ts))
        added = self._since_base(base, start, km) if base[2] is not None else km
        self.store.set_meta(META_ODOMETER, {"km": round(base[1] + added, 3), "ts": ts,
                                            "trip_start": None, "trip_km": 0.0})

    # -- rules --------------------------------------------------------------------------------
    def _on_start(self, reading: battery12v.StartReading) -> None:
        with self.store.batch() as c:
            c.execute("INSERT OR REPLACE INTO health_battery(ts, rest_v, crank_min_v) VALUES (?,?,?)",
                      (reading.ts, reading.rest_v, reading.crank_min_v))
        trend = battery12v.trend(self.store.query("SELECT ts, rest_v FROM health_battery ORDER BY ts"),
                                 reading.ts, self.battery_t)
        level, reasons = battery12v.assess(reading, trend, self.battery_t)
        self.last_start = {"ts": reading.ts, "rest_v": reading.rest_v, "crank_min_v": reading.crank_min_v,
                           "level": level, "reasons": reasons, "trend": trend}
        log.info("health: engine start, resting %s V, cranking min %s V: %s", reading.rest_v,
                 reading.crank_min_v, level)
        if level in ("warn", "critical"):
            detail = {k: v for k, v in (("rest_v", reading.rest_v), ("crank_min_v", reading.crank_min_v))
                      if v is not None}
            detail["reasons"] = reasons
            if trend:
                detail["trend"] = trend
            self.emit({"type": "health", "ts": reading.ts, "kind": "battery_12v", "level": level,
                       "detail": detail})

    def maintenance_state(self) -> list[maintenance.Due]:
        section = (self._config().get("health") or {}).get("maintenance")
        return maintenance.due(section, self.service_log.last_by_item(), self.odometer_km(), self._clock())

    def check_maintenance(self) -> list[dict]:
        """Sends ``maintenance_due`` for each kind whose level rose since it was last told (a new
        service record of the kind starts it over). Returns the events sent."""
        notified = self.store.get_meta(META_NOTIFIED, {}) or {}
        sent = []
        for d in self.maintenance_state():
            if d.level not in ("warn", "critical"):
                continue
            before = notified.get(d.kind)
            if before and before[1] == d.last_hash and LEVEL_ORDER.index(before[0]) >= LEVEL_ORDER.index(d.level):
                continue
            body = maintenance.event_body(d, self._clock())
            with self.store.batch():
                self.emit(body)
                notified[d.kind] = [d.level, d.last_hash]
                self.store.set_meta(META_NOTIFIED, notified)
            sent.append(body)
        return sent

    # -- reporting ----------------------------------------------------------------------------
    def dtc_state(self) -> dict:
        from agent.vehicle.dtc import META_KEY
        last = self.store.get_meta(META_KEY) or []
        mil = any(k == "MIL" and v for k, v in last)
        codes = [{"code": k, "state": v} for k, v in last if k != "MIL"]
        return {"codes": codes, "mil": mil, "severity": severity.severity(codes, mil)}

    def snapshot(self) -> dict:
        """The health part of the ``report`` command's snapshot."""
        snap = {"trip": self.trips.status(), "engine_starts": self.starts.starts,
                "odometer_km": self.odometer_km(),
                "battery_12v": self.last_start or {"level": "unknown", "reasons": ["no engine start seen yet"]},
                "maintenance": [d.as_dict() for d in self.maintenance_state()],
                "dtc": self.dtc_state()}
        snap["driving"] = dict(self.driving.counts) if self.driving_allowed else "off (no owner consent)"
        return snap

    def live(self) -> dict[str, tuple[int, float, str]]:
        with self._lock:
            return dict(self.latest)

    def status(self) -> dict:
        return {"processed": self.processed, "dropped": self.dropped, "errors": self.errors,
                "in_trip": self.trips.trip is not None and self.trips.trip.started_sent,
                "trips": self.trips.trips, "engine_starts": self.starts.starts,
                "roles": sorted(set(self._roles.values())), "driving_behaviour": self.driving_allowed}
