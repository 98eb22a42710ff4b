"""The health rules (trips, engine starts, 12 V battery, maintenance) on the vehicle twin, with
known answers: the twin's drive (scripts/vehicle_sim/drive.py) says when each loop's engine
starts, how far the car goes and when it parks; the agent's own HealthMonitor (a real Store,
its clock the drive clock) must find the same.

Two ways of feeding it: the drive model sampled as the OBD poller sees the car (once a second
while the ECU answers, and only from ``reconnect_s`` after each key-on: the poller backs off
while the car is parked), fast and exact; and the real chain, the ELM327-emulator on a pty
answering as the twin, the agent's ObdPoller and the HealthMonitor on its own thread, run with
the twin's speed factor (every agent component given the drive clock).
"""
from __future__ import annotations

import math
import threading

import pytest

from agent.cloud import schemas
from agent.health.monitor import HealthMonitor
from agent.outbox.store import Store
from agent.vehicle.obd import ObdPoller
from drivers.core.backoff import Backoff
from drivers.core.model import Sample
from scripts.testbed.shared_data import RAV4_LOG
from scripts.testbed.wait import wait_until
from scripts.vehicle_sim.drive import Car, Drive, DriveClock, State

pytestmark = pytest.mark.skipif(not RAV4_LOG.exists(), reason="the RAV4 recording is not here")

T0 = 1_750_000_000_000   # drive time 0 on the agent's clock (ms)

#: the demo's OBD PIDs that the health rules use (scripts/demo.py DEMO_CONFIG)
PIDS = [{"name": "engine.rpm", "pid": "RPM", "period_s": 1},
        {"name": "vehicle.speed", "pid": "SPEED", "period_s": 1},
        {"name": "engine.maf", "pid": "MAF", "period_s": 1},
        {"name": "ecu.voltage", "pid": "CONTROL_MODULE_VOLTAGE", "period_s": 1}]


def ms(t: float) -> int:
    return T0 + round(t * 1000)


@pytest.fixture(scope="module")
def drive() -> Drive:
    return Drive(Car())


def obd_samples(state: State, t_ms: int, odometer: bool = False) -> list[Sample]:
    """What the poller hands over for one multi-PID answer, in the units and resolution of the
    ECU's encoding (PID 0C in 1/4 rpm, 0D in km/h, 10 in 1/100 g/s, 42 in mV); ``odometer``:
    and the odometer as a CAN signal would give it (0.1 km)."""
    out = [Sample("engine.rpm", "rpm", t_ms, round(state.rpm * 4) / 4),
           Sample("vehicle.speed", "km/h", t_ms, float(round(state.speed_kmh))),
           Sample("engine.maf", "g/s", t_ms, round(state.maf_gs * 100) / 100),
           Sample("ecu.voltage", "V", t_ms, round(state.voltage * 1000) / 1000)]
    if odometer:
        out.append(Sample("can.odometer", "km", t_ms, round(state.odometer_km, 1)))
    return out


def connected(drive: Drive, t: float, reconnect_s: float, holes: tuple[tuple[float, float], ...]) -> bool:
    """Whether the poller gets an answer at drive time ``t``."""
    state = drive.at(t)
    if not state.ignition or state.u < reconnect_s:
        return False
    return not any(a <= t < b for a, b in holes)


class Agent:
    """The health part of the agent on the drive clock: a HealthMonitor with a real Store."""

    def __init__(self, tmp_path, config: dict | None = None):
        self.store = Store(tmp_path / "agent.db")
        self.events: list[dict] = []
        self.config = config or {"version": 1, "obd": {"pids": PIDS}}
        self.now = T0
        self.monitor = HealthMonitor(store=self.store, emit_event=self.events.append,
                                     config=lambda: self.config, clock=lambda: self.now)
        self.readings: list[dict] = []
        self.odometer = "odometer" in ((self.config.get("health") or {}).get("signals") or {})

    def run(self, drive: Drive, t0: float, t1: float, *, reconnect_s: float,
            holes: tuple[tuple[float, float], ...] = (), every: float = 1.0,
            each_loop=None) -> None:
        """Drive times [t0, t1): a tick of the health thread and, when the poller is
        connected, one answer, every ``every`` s; ``each_loop(n)`` at each loop's key-on."""
        steps = round((t1 - t0) / every)
        loop = None
        for i in range(steps):
            t = t0 + i * every
            self.now = ms(t)
            state = drive.at(t)
            if each_loop and t >= 0 and state.loop != loop:
                loop = state.loop
                each_loop(loop)
            self.monitor.tick(self.now)
            if connected(drive, t, reconnect_s, holes):
                self.monitor.process(obd_samples(state, self.now, self.odometer))
                start = self.monitor.last_start
                if start and (not self.readings or self.readings[-1]["ts"] != start["ts"]):
                    self.readings.append(start)

    def of(self, kind: str) -> list[dict]:
        return [e for e in self.events if e["type"] == kind]

    def close(self):
        self.store.close()


@pytest.fixture
def agent(tmp_path):
    a = Agent(tmp_path)
    yield a
    a.close()


def test_each_loop_is_one_trip_and_one_engine_start_when_the_poller_comes_back_late(drive, agent):
    """The demo's case: parked, the poller backs off; it is back 12 s after key-on, when the
    engine has run for 2.8 s. No sample saw the crank, and still each loop is an engine start
    (the silence was the engine off) and a trip, with the twin's distance and fuel."""
    loops = 4
    agent.run(drive, -100.0, loops * drive.loop_s, reconnect_s=12.0)
    truths = [drive.loop_truth(n) for n in range(loops)]
    status = agent.monitor.status()
    assert status["engine_starts"] == loops, agent.readings
    # the first answer: the first whole second (the sampling grid) 12 s after key-on
    first = [math.ceil(lt.start_t + 12.0) for lt in truths]
    assert [r["ts"] for r in agent.readings] == [ms(t) for t in first]
    for r in agent.readings:   # nothing saw the crank or the rest before it
        assert (r["rest_v"], r["crank_min_v"], r["level"]) == (None, None, "ok")

    starts, ends = agent.of("trip_start"), agent.of("trip_end")
    assert len(starts) == len(ends) == status["trips"] == loops
    for lt, t_first, start, end in zip(truths, first, starts, ends):
        schemas.validate("event", start)
        schemas.validate("event", end)
        assert start["ts"] == ms(t_first)
        # the last sample of the idle, up to 1 s before the ignition goes off
        assert ms(lt.trip_end_t - 1.0) <= end["ts"] <= ms(lt.trip_end_t)
        assert end["duration_s"] == pytest.approx(lt.trip_end_t - t_first, abs=1.0)
        # the car stands still until pull-away (21.2 s): the whole distance is seen
        assert end["distance_km"] == pytest.approx(lt.distance_km, rel=0.01)
        # fuel from the air flow, from the first sample on (2.8 s of warm idle unseen)
        seen_fuel = drive.at(t_first).fuel_l - drive.at(lt.trip_end_t).fuel_l
        assert end["fuel_l"] == pytest.approx(seen_fuel, rel=0.03)
        assert seen_fuel < lt.fuel_l
    assert agent.monitor.trips.trip is None   # the last one has ended, 120 s into the park


def test_a_start_the_poller_sees_is_measured_with_its_rest_and_crank(drive, agent):
    """Back 4 s after key-on: the samples see the ignition-on rest and the crank (10.1 V),
    and the start is stamped at the crank."""
    agent.run(drive, -100.0, 2 * drive.loop_s, reconnect_s=4.0)
    assert agent.monitor.status()["engine_starts"] == 2
    for n, reading in enumerate(agent.readings):
        lt = drive.loop_truth(n)
        assert ms(lt.engine_start_t) <= reading["ts"] < ms(lt.trip_start_t)
        assert reading["crank_min_v"] == pytest.approx(10.1, abs=0.001)
        key_on = drive.at(lt.start_t + 5.0).voltage   # the battery at rest, ignition on
        assert reading["rest_v"] == pytest.approx(key_on, abs=0.001)
        assert reading["level"] == "ok"
    # a cold battery before loop 0; one with the surface charge of a drive 150 s before loop 1
    assert agent.readings[1]["rest_v"] > agent.readings[0]["rest_v"] + 0.2


def test_a_short_link_drop_while_driving_is_neither_a_start_nor_a_new_trip(drive, agent):
    """20 s without answers in the middle of the recorded minute (the poller reconnecting):
    one trip, one start; the hole is longer than max_gap_s, so its distance is not counted."""
    lt = drive.loop_truth(0)
    hole = (lt.drive_start_t + 30.0, lt.drive_start_t + 50.0)
    agent.run(drive, -100.0, drive.loop_s, reconnect_s=4.0, holes=(hole,))
    assert agent.monitor.status()["engine_starts"] == 1
    (end,) = agent.of("trip_end")
    assert len(agent.of("trip_start")) == 1
    # the last sample before the hole and the first after it bound the uncounted stretch
    unseen = drive.at(hole[1]).distance_km - drive.at(hole[0] - 1.0).distance_km
    assert end["distance_km"] == pytest.approx(lt.distance_km - unseen, rel=0.01)
    assert unseen > 0.1


def test_maintenance_comes_due_in_the_loop_the_odometer_reaches_it(drive, tmp_path):
    """A service record at the twin's odometer before loop 0; oil every 1,002.6 km, told
    1,000 km ahead: due once the trips add up to 2.6 km, which the twin says is in loop 2."""
    section = {"items": {"oil_change": {"km": 1002.6}}, "ahead_km": 1000}
    agent = Agent(tmp_path, {"version": 1, "obd": {"pids": PIDS}, "health": {"maintenance": section}})
    try:
        odometer0 = drive.at(0.0).odometer_km
        agent.monitor.service_log.append("b-1", odometer0, ["oil_change"], "anna", ts=ms(-100.0))
        due_after: dict[int, list[dict]] = {}

        def each_loop(n: int) -> None:
            due_after[n - 1] = agent.monitor.check_maintenance()

        loops = 4
        agent.run(drive, -100.0, loops * drive.loop_s, reconnect_s=12.0, each_loop=each_loop)
        due_after[loops - 1] = agent.monitor.check_maintenance()
        crossing = next(n for n in range(loops)
                        if drive.loop_truth(n).odometer_end_km - odometer0 >= 2.6)
        assert crossing == 2
        told = {n: [(e["detail"]["item"], e["level"]) for e in evs] for n, evs in due_after.items() if evs}
        assert told == {crossing: [("oil_change", "warn")]}
        # the agent's odometer (service record + trips) is the twin's, to the trips' accuracy
        assert agent.monitor.odometer_km() == pytest.approx(drive.at(loops * drive.loop_s).odometer_km,
                                                             abs=0.01 * loops * drive.loop_distance_km)
        (event,) = due_after[crossing]
        schemas.validate("event", event)
        expected_left = 1002.6 - sum(e["distance_km"] for e in agent.of("trip_end")[:crossing + 1])
        assert event["detail"]["due_in_km"] == pytest.approx(expected_left, abs=0.05)
    finally:
        agent.close()


def test_an_odometer_signal_and_the_trips_give_the_twins_odometer(drive, tmp_path):
    """With the car's odometer as a signal (here 0.1 km, as from CAN), trip events carry it and
    the agent's odometer follows the twin's over loops: a trip adds only what it drove after
    the last reading (not the whole trip on top of a reading taken during it)."""
    config = {"version": 1, "obd": {"pids": PIDS}, "health": {"signals": {"odometer": "can.odometer"}}}
    agent = Agent(tmp_path, config)
    try:
        loops = 3
        for n in range(loops):
            agent.run(drive, n * drive.loop_s - (100.0 if n == 0 else 0.0), (n + 1) * drive.loop_s,
                      reconnect_s=12.0)
            assert agent.monitor.odometer_km() == pytest.approx(
                drive.at((n + 1) * drive.loop_s).odometer_km, abs=0.1), n
        starts, ends = agent.of("trip_start"), agent.of("trip_end")
        assert len(starts) == len(ends) == loops
        for n, (start, end) in enumerate(zip(starts, ends)):
            lt = drive.loop_truth(n)
            assert start["odometer_km"] == pytest.approx(lt.odometer_start_km, abs=0.1)
            assert end["odometer_km"] == pytest.approx(lt.odometer_end_km, abs=0.1)
    finally:
        agent.close()


# -- the real chain: ELM327-emulator, ObdPoller, HealthMonitor on its thread, at speed -------

SPEED = 8.0


@pytest.mark.slow
def test_the_agents_poller_and_health_rules_find_the_twins_trips_and_starts(tmp_path):
    """At 8x: the emulator's drive clock, the poller's stamps and the health rules' clock are
    one drive clock; the poller's backoff is the agent's (0.5 to 30 s) in drive time. From the
    recorded minute of loop 0 to the end of loop 2's trip: two parks, two trips, two starts.
    Parks of 80 s and a trip rule ending trips after 60 s keep it to a minute."""
    from scripts.vehicle_sim.elm_twin import TwinEmulator

    car = Car(parked_s=80.0)   # longer than end_after_s and off_after_s (60 s)
    drive = Drive(car)
    clock = DriveClock.starting(SPEED, offset=drive.phase["recorded"].start + 5.0)
    now = lambda: T0 + round(clock.now() * 1000)  # noqa: E731
    store = Store(tmp_path / "agent.db")
    events: list[dict] = []
    lock = threading.Lock()

    def emit(body: dict) -> None:
        with lock:
            events.append(body)

    config = {"version": 1, "obd": {"pids": [dict(p, period_s=1 / SPEED) for p in PIDS]},
              "health": {"trips": {"end_after_s": 60}}}
    monitor = HealthMonitor(store=store, emit_event=emit, config=lambda: config, clock=now)
    seen: list[Sample] = []     # what the rules got

    def sink(samples: list[Sample]) -> None:
        with lock:
            seen.extend(samples)
        monitor.on_samples(samples)

    def trip_ends() -> int:
        with lock:
            return sum(1 for e in events if e["type"] == "trip_end")

    with TwinEmulator(car, clock) as emu:
        poller = ObdPoller(emu.port, config["obd"]["pids"], sink, clock=now,
                           backoff=Backoff(0.5 / SPEED, 30.0 / SPEED), dtc_period_s=None)
        monitor.start()
        up_ms = now()
        poller.start()
        try:
            end = drive.loop_truth(2).trip_end_t + 61.0
            wait_until(lambda: clock.now() > end, timeout=(end - clock.now()) / SPEED + 60,
                       interval=0.5, what="60 s into loop 2's park")
            wait_until(lambda: trip_ends() >= 3, timeout=30, what=f"three trip_end events: {events}")
        finally:
            poller.stop()
            monitor.stop()
    try:
        starts = [r[0] for r in store.query("SELECT ts FROM health_battery ORDER BY ts")]
    finally:
        store.close()
    trips = [e for e in events if e["type"] in ("trip_start", "trip_end")]
    status = monitor.status()
    # loop 0's trip (seen from its recorded minute) and loops 1 and 2, each after a park
    assert [e["type"] for e in trips] == ["trip_start", "trip_end"] * 3, trips
    assert status["trips"] == 3

    def active(s: Sample) -> bool:
        return (s.name == "engine.rpm" and s.value > 300) or (s.name == "vehicle.speed" and s.value > 0.5)

    # loop 0 was running when the agent came up: a start only if the first answer took longer
    # than off_after_s (60 s) to come (the rule cannot tell that from a car just started)
    first0 = min(s.t_ms for s in seen if s.name == "engine.rpm")
    loop0 = [first0] if first0 - up_ms > 60_000 else []
    assert [t for t in starts if t < ms(drive.loop_s)] == loop0
    for n, (start, end) in ((1, trips[2:4]), (2, trips[4:6])):
        lt = drive.loop_truth(n)
        first = min(s.t_ms for s in seen if s.t_ms >= ms(lt.start_t) and active(s))
        assert ms(lt.start_t) < first < ms(lt.drive_end_t)
        assert start["ts"] == first
        # the engine start: the first running answer after the park (the crank unseen, or seen)
        (at,) = [t for t in starts if ms(lt.start_t) <= t < ms(lt.end_t)]
        assert ms(lt.engine_start_t) <= at <= first
        # the distance the twin drove from the first answer the agent got to the park
        expected = drive.at(lt.trip_end_t).distance_km - drive.at((first - T0) / 1000).distance_km
        assert end["distance_km"] == pytest.approx(expected, rel=0.03, abs=0.01)
        assert ms(lt.trip_end_t - 2.0) <= end["ts"] <= ms(lt.trip_end_t)
    assert status["engine_starts"] == len(starts) == 2 + len(loop0)
    assert status["errors"] == 0 and status["dropped"] == 0
