"""PROTOCOL §6 on the device: consent, precision, stop/delete, retention, the button — with a real
gpsd (gpsfake playing the RAV4's real NMEA), the real SQLite store and, end to end, a real
broker and the reference cloud console."""
from __future__ import annotations

import threading
import time

import pytest
from gpiozero.pins.mock import MockFactory

from agent.cloud import schemas
from drivers.core.clock import Clock

now_ms = Clock().now_ms
from agent.owner.datakey import DataKey
from agent.owner.location import TABLE, Location
from drivers.core.model import Sample
from agent.owner.privacy import ButtonGesture, Privacy, enforce_positions, evaluate, retention_days
from agent.outbox.store import Store
from scripts.testbed.gps import needs_gpsd, reference_rows
from tests.support.privacy import DAY, config, consent, events, make_agent, telemetry_records
from scripts.testbed.wait import wait_until

REF_LATS = [float(r["lat_deg"]) for r in reference_rows()]


# --------------------------------------------------------------------------------------------
# Consent evaluation (pure)
# --------------------------------------------------------------------------------------------

def test_consent_is_off_unless_granted_valid_and_not_expired():
    now = 1_760_000_000_000
    assert evaluate(None, "location", now).mode == "off"
    assert evaluate(config(1), "location", now).reason == "absent"
    assert evaluate(config(1, location={"mode": "off"}), "location", now).reason == "off"
    ok = consent("precise", now=now, days=10)
    assert evaluate(config(1, location=ok), "location", now).mode == "precise"
    assert evaluate(config(1, location=ok), "location", ok["until"]).reason == "expired"
    too_long = {**ok, "until": ok["granted_at"] + 367 * DAY}
    assert evaluate(config(1, location=too_long), "location", now).reason == "invalid"
    assert evaluate(config(1, location={"mode": "coarse"}), "location", now).reason == "invalid"
    assert evaluate(config(1, location={**ok, "mode": "on"}), "location", now).reason == "invalid"
    assert evaluate(config(1, behaviour=consent("on", now=now)), "driving_behaviour", now).mode == "on"
    assert retention_days(config(1), "location") == 7
    assert retention_days(config(1), "driving_behaviour") == 30
    assert retention_days(config(1, retention={"location": 2}), "location") == 2


def test_enforce_positions_coarse_and_precise():
    pos = {"t": [0, 500, 1000, 61000], "lat": [37.721107, 37.7212, 37.7213, 37.7301],
           "lon": [-122.472312, -122.4723, -122.4722, -122.4718], "speed": [7.4, 8, 9, 10],
           "course": [6.2, 6, 6, 6], "prec_m": 12}
    coarse = enforce_positions(pos, "coarse")
    assert coarse["t"] == [0, 61000] and coarse["lat"] == [37.72, 37.73] and coarse["lon"] == [-122.47, -122.47]
    assert coarse["prec_m"] == 1000
    precise = enforce_positions(pos, "precise")
    assert precise["t"] == [0, 1000, 61000] and precise["lat"][0] == 37.721107 and precise["prec_m"] == 12


# --------------------------------------------------------------------------------------------
# Components on a real store with a real gpsd
# --------------------------------------------------------------------------------------------

class Rig:
    def __init__(self, tmp_path, gpsd_port: int, doc: dict):
        self.dir = tmp_path
        self.store = Store(tmp_path / "agent.db")
        self.events: list[dict] = []
        self.doc = doc
        self.shift = 0
        self.speed = 1  # the injected clock runs this many times faster than real time
        self._t0, self._m0 = now_ms(), time.monotonic()
        self.privacy = Privacy(self.store, config=lambda: self.doc, emit_event=self._emit, clock=self.clock)
        self.key = DataKey.in_dir(tmp_path)
        self.loc = Location(self.store, self.privacy, self.key, gpsd_port=gpsd_port,
                            clock=Clock(wall_ns=lambda: self.clock() * 1_000_000))

    def clock(self) -> int:
        return self._t0 + int((time.monotonic() - self._m0) * 1000 * self.speed) + self.shift

    def _emit(self, body: dict) -> None:
        schemas.validate("event", body)
        self.events.append(body)

    def rows(self) -> list[tuple[int, bytes]]:
        return [(t, bytes(b)) for t, b in self.store.query(f"SELECT t_ms, blob FROM {TABLE} ORDER BY t_ms")]

    def positions(self) -> list[dict]:
        return [{"t": t, **self.key.open_obj(b, TABLE.encode())} for t, b in self.rows()]

    def file_bytes(self) -> bytes:
        return b"".join(p.read_bytes() for p in self.dir.glob("agent.db*"))

    def close(self):
        self.privacy.stop()
        self.store.close()


@pytest.fixture
def rig_factory(tmp_path, gps):
    rigs = []

    def make(doc):
        r = Rig(tmp_path, gps.port, doc)
        rigs.append(r)
        return r
    yield make
    for r in rigs:
        r.close()


@needs_gpsd
def test_fresh_device_does_not_read_gpsd(rig_factory):
    rig = rig_factory(config(1))
    rig.privacy.start()
    assert rig.privacy.mode("location") == "off"
    assert not rig.loc.location_active()
    assert rig.loc._reader is None, "gpsd must not be read without consent"
    rig.privacy.tick()
    assert rig.rows() == [] and rig.events == []


@needs_gpsd
def test_precise_collects_at_most_1_hz_as_measured(rig_factory):
    rig = rig_factory(config(1, location=consent("precise")))
    rig.privacy.start()
    assert rig.loc.location_active()
    assert wait_until(lambda: len(rig.rows()) >= 6, 60), rig.loc.status()
    pos = rig.positions()
    deltas = [b["t"] - a["t"] for a, b in zip(pos, pos[1:])]
    assert all(d >= 950 for d in deltas), deltas
    assert any(abs(p["lat"] - ref) < 1e-7 for p in pos for ref in REF_LATS), "precise positions are unrounded"
    assert {p["prec_m"] for p in pos} == {30}   # the log has no HDOP: the documented fallback
    assert rig.events and rig.events[0]["state"] == "collecting"
    # Stored encrypted: no coordinate text or double appears in the database files.
    assert b"37.72" not in rig.file_bytes()


@needs_gpsd
def test_coarse_is_rounded_and_at_most_once_a_minute(rig_factory):
    rig = rig_factory(config(1, location=consent("coarse")))
    rig.speed = 40   # one real second is 40 s of the device's clock
    rig.privacy.start()
    assert wait_until(lambda: len(rig.rows()) >= 3, 60), rig.loc.status()
    pos = rig.positions()
    assert all(round(p["lat"], 2) == p["lat"] and round(p["lon"], 2) == p["lon"] for p in pos)
    assert all(p["prec_m"] == 1000 for p in pos)
    deltas = [b["t"] - a["t"] for a, b in zip(pos, pos[1:])]
    assert all(d >= 60_000 for d in deltas), deltas


@needs_gpsd
def test_expiry_with_the_clock_advanced_stops_and_deletes(rig_factory):
    rig = rig_factory(config(1, location=consent("precise", days=1)))
    rig.privacy.start()
    assert wait_until(lambda: len(rig.rows()) >= 3, 60)
    blobs = [b for _, b in rig.rows()]
    rig.shift = 2 * DAY                 # a day passes: the consent's until is behind us
    assert rig.privacy.mode("location") == "off"   # the gate closes at that instant
    rig.privacy.tick()
    assert not rig.loc.location_active() and rig.loc._reader is None
    assert rig.rows() == []
    ev = [e for e in rig.events if e["state"] == "expired"]
    assert ev and ev[0]["by"] == "expiry" and ev[0]["category"] == "location" and ev[0]["deleted"] >= 3
    data = rig.file_bytes()
    assert not any(b in data for b in blobs), "a deleted row is still in the database file or its WAL"
    n = len(rig.rows())
    time.sleep(1.5)
    assert len(rig.rows()) == n == 0


@needs_gpsd
def test_withdrawal_by_config_stops_and_deletes(rig_factory):
    rig = rig_factory(config(1, location=consent("precise")))
    rig.privacy.start()
    assert wait_until(lambda: len(rig.rows()) >= 2, 60)
    rig.doc = config(2, location={"mode": "off"})
    assert rig.privacy.apply_config(rig.doc) == []
    assert rig.rows() == [] and not rig.loc.location_active()
    ev = rig.events[-1]
    assert (ev["state"], ev["by"], ev["category"]) == ("withdrawn", "config", "location") and ev["deleted"] >= 2


@needs_gpsd
def test_button_gesture_pauses_and_only_the_car_resumes(rig_factory):
    from drivers.gpio import DongleIO

    rig = rig_factory(config(1, location=consent("precise")))
    rig.privacy.start()
    gesture = ButtonGesture(lambda: rig.privacy.toggle("owner_button"))
    io = DongleIO({"button": 26}, pin_factory=MockFactory())
    io.when_pressed = gesture.press   # as agent/compose.py wires it
    pin = io.button.pin
    try:
        assert wait_until(lambda: len(rig.rows()) >= 2, 60)
        for _ in range(3):   # three short presses
            pin.drive_low()
            pin.drive_high()
        assert wait_until(lambda: rig.privacy.paused("location"), 5)
        assert not rig.loc.location_active() and rig.rows() == []
        ev = rig.events[-1]
        assert (ev["state"], ev["by"]) == ("paused", "owner_button") and ev["deleted"] >= 2
        with pytest.raises(ValueError):
            rig.privacy.resume("config")    # nothing from the cloud resumes
        assert rig.privacy.control_handler({"action": "resume"})["privacy"]["location"]["state"] == "collecting"
        assert rig.loc.location_active()
        assert rig.events[-1]["state"] == "collecting" and rig.events[-1]["by"] == "cli"
        rig.privacy.control_handler({"action": "pause"})
        assert rig.events[-1]["by"] == "cli" and not rig.loc.location_active()
    finally:
        io.close()


def test_gesture_is_three_short_presses_not_a_long_one():
    t = [0.0]
    fired = []
    g = ButtonGesture(lambda: fired.append(1), clock=lambda: t[0])
    for hold in (0.1, 3.5, 0.1, 0.1):    # a technician long press in between breaks the gesture
        g.pressed()
        t[0] += hold
        g.released()
        t[0] += 0.2
    assert fired == []
    g.pressed(); t[0] += 0.1; g.released(); t[0] += 0.2
    assert fired == [1]


@needs_gpsd
def test_per_drive_starts_paused_at_ignition_on(rig_factory):
    rig = rig_factory(config(1, location=consent("coarse", per_drive=True)))
    rig.privacy.start()
    assert rig.loc.location_active()
    rig.privacy.on_ignition(True)
    assert rig.privacy.paused("location") and not rig.loc.location_active()
    rig.privacy.resume("owner_button")
    assert rig.loc.location_active()
    rig.privacy.on_ignition(False)
    rig.privacy.on_ignition(True)
    assert not rig.loc.location_active()


def test_retention_and_delete_data(tmp_path):
    store = Store(tmp_path / "agent.db")
    doc = config(1, location=consent("precise"), retention={"location": 2})
    p = Privacy(store, config=lambda: doc, emit_event=lambda b: None)
    key = DataKey.in_dir(tmp_path)
    loc = Location(store, p, key)
    now = now_ms()
    with store.batch() as c:
        for age_days in (0, 1, 3, 10):
            c.execute(f"INSERT INTO {TABLE}(t_ms, blob) VALUES (?, ?)",
                      (now - age_days * DAY, key.seal_obj({"lat": 1.0, "lon": 2.0}, TABLE.encode())))
    assert p.purge_expired_retention() == {"location": 2, "driving_behaviour": 0}
    with pytest.raises(ValueError, match="unknown data categories"):   # the command schema refuses these
        p.delete_data(["location", "other"])
    assert loc.pending() == 2   # nothing deleted by the refused call
    assert p.delete_data(["location", "driving_behaviour"]) == {"location": 2, "driving_behaviour": 0}
    assert loc.pending() == 0
    store.close()


def test_sealing_gate_strips_location_whatever_the_store_holds(tmp_path):
    store = Store(tmp_path / "agent.db")
    doc = config(1)
    p = Privacy(store, config=lambda: doc, emit_event=lambda b: None)
    key = DataKey.in_dir(tmp_path)
    loc = Location(store, p, key)
    with store.batch() as c:   # rows a bug (or an older version) left behind
        c.execute(f"INSERT INTO {TABLE}(t_ms, blob) VALUES (?, ?)",
                  (now_ms(), key.seal_obj({"lat": 37.72, "lon": -122.47, "speed": 1.0, "course": 2.0,
                                           "prec_m": 5, "mode": "precise"}, TABLE.encode())))
    body = {"t0": now_ms(), "signals": [], "positions": {"t": [0], "lat": [37.7211], "lon": [-122.47],
                                                          "speed": [1.0], "course": [0.0], "prec_m": 5}}
    out = p.body_filter(loc.contribute(body))
    assert "positions" not in out
    harsh = {"type": "health", "ts": 1, "kind": "harsh_braking", "level": "info", "detail": {"peak_ms2": 4.0}}
    assert p.body_filter(harsh) is None
    trip = {"type": "trip_end", "ts": 1, "distance_km": 3.0, "duration_s": 60, "behaviour": {"harsh_braking": 1},
            "lat": 37.7}
    assert p.body_filter(trip) == {"type": "trip_end", "ts": 1, "distance_km": 3.0, "duration_s": 60}
    store.close()


# --------------------------------------------------------------------------------------------
# End to end: a device, a real broker, the reference console
# --------------------------------------------------------------------------------------------

@pytest.fixture
def device(fleet, gps, tmp_path):
    agents = []

    def make(dev="priv-0001", **kw):
        a = make_agent(fleet, dev, gpsd_port=gps.port, sock_dir=tmp_path / "ctl", **kw)
        agents.append(a)
        a.start()
        return a
    yield make
    for a in agents:
        a.stop()


def _pump_samples(agent, stop: threading.Event):
    while not stop.wait(0.5):
        agent.ingest.put_samples([Sample("engine.rpm", "rpm", now_ms(), 900.0)])


@needs_gpsd
def test_e2e_fresh_device_sends_no_location_then_coarse_then_precise(fleet, device):
    from gpiozero.pins.mock import MockFactory

    from agent.settings import GpioSettings

    dev = "priv-0001"
    factory = MockFactory()
    agent = device(dev, pin_factory=factory)     # the agent's own LEDs, on gpiozero's mock pins
    c = fleet.console

    def location_led() -> bool:
        """The LED, read back from the (mock) pin after an update: held to the truth."""
        agent.indicators.update()
        return bool(factory.pin(GpioSettings().led_location).state)
    stop = threading.Event()
    pump = threading.Thread(target=_pump_samples, args=(agent, stop), daemon=True)
    pump.start()
    try:
        # No privacy section: location stays off (the default); uploads every second for the test.
        c.publish(dev, "config", config(1))
        assert c.wait_for(lambda r: r.get("dev") == dev and r.get("kind") == "telemetry", 60)
        time.sleep(3)
        assert all("positions" not in r["body"] for r in telemetry_records(c, dev))
        assert agent.location.pending() == 0 and agent.location._reader is None
        assert events(c, dev, "privacy") == []
        assert not location_led()

        now = now_ms()
        c.publish(dev, "config", config(2, location=consent("coarse", now=now)))
        rec = c.wait_for(lambda r: r.get("dev") == dev and "positions" in r.get("body", {}), 60)
        assert rec, agent.status()["owner_data"]
        assert events(c, dev, "privacy")[0] | {"ts": 0} == {"type": "privacy", "ts": 0, "category": "location",
                                                           "state": "collecting", "deleted": 0, "by": "config"}
        time.sleep(4)
        coarse = [r["body"]["positions"] for r in telemetry_records(c, dev) if "positions" in r["body"]]
        pts = [(r["body"]["t0"] + t) for r in telemetry_records(c, dev) if "positions" in r["body"]
               for t in r["body"]["positions"]["t"]]
        assert len(pts) == 1, "coarse: at most one fix per minute"
        assert agent.location.location_active() and location_led()
        assert all(p["prec_m"] == 1000 and all(round(v, 2) == v for v in p["lat"] + p["lon"]) for p in coarse)

        c.publish(dev, "config", config(3, location=consent("precise", now=now)))
        assert c.wait_for(lambda r: r.get("dev") == dev and "positions" in r.get("body", {})
                          and any(round(v, 2) != v for v in r["body"]["positions"]["lat"]), 60)
        time.sleep(4)
        precise = [r["body"]["t0"] + t for r in telemetry_records(c, dev) if "positions" in r["body"]
                   and r["body"]["positions"]["prec_m"] != 1000 for t in r["body"]["positions"]["t"]]
        precise.sort()
        assert len(precise) >= 4
        assert all(b - a >= 950 for a, b in zip(precise, precise[1:])), "precise: at most 1 Hz"

        # delete_data from the cloud: acked done with the counts.
        seq, _ = c.publish(dev, "command", {"op": "delete_data", "categories": ["location"], "request_id": "r-1"})
        ack = c.wait_for(lambda r: r.get("dev") == dev and r.get("kind") == "ack"
                         and r["body"]["ref_kind"] == "command" and r["body"]["ref_seq"] == seq, 30)
        assert ack and ack["body"]["status"] == "done" and "location" in ack["body"]["result"]["deleted"]

        # Withdrawal: collection stops, the cloud hears it, no position follows.
        c.publish(dev, "config", config(4, location={"mode": "off"}))
        assert c.wait_for(lambda r: r.get("dev") == dev and r.get("kind") == "event"
                          and r["body"].get("type") == "privacy" and r["body"]["state"] == "withdrawn", 30)
        assert not agent.location.location_active() and not location_led()
        n = len(c.records)
        time.sleep(3)
        assert all("positions" not in r.get("body", {}) for r in list(c.records)[n:] if r.get("dev") == dev)
    finally:
        stop.set()
        pump.join(5)
    assert not any(r.get("rejected") for r in c.records)


def test_driving_behaviour_withdrawn_deletes_unsent_harsh_events(tmp_path):
    from agent.health.driving import HarshEventDetector
    from agent.owner.owner_data import BehaviourRows

    store = Store(tmp_path / "agent.db")
    emitted = []
    doc = {"d": config(1, behaviour=consent("on"))}
    p = Privacy(store, config=lambda: doc["d"], emit_event=emitted.append)
    p.register("driving_behaviour", BehaviourRows(store, HarshEventDetector()))
    p.reconcile("config")
    assert p.allowed("driving_behaviour") and emitted[-1]["state"] == "collecting"
    store.add_event({"type": "health", "ts": now_ms(), "kind": "harsh_braking", "level": "info",
                     "detail": {"peak_ms2": 4.1}})
    store.add_event({"type": "dtc", "ts": now_ms(), "codes": [], "mil": False})
    doc["d"] = config(2, behaviour={"mode": "off"})
    p.apply_config(doc["d"])
    kinds = [r[0] for r in store.query("SELECT body FROM events")]
    assert len(kinds) == 1 and b"harsh_braking" not in kinds[0]
    assert emitted[-1] | {"ts": 0} == {"type": "privacy", "ts": 0, "category": "driving_behaviour",
                                       "state": "withdrawn", "deleted": 1, "by": "config"}
    store.close()
