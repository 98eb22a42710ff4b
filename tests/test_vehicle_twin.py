"""The vehicle twin (scripts/vehicle_sim): one car on OBD and CAN, driven by the real RAV4 drive.

The OBD side is the real ELM327-emulator on a pty, queried through python-OBD as the agent
queries it (drivers.obd.reader.ObdReader: multi-PID requests with the response-count hint, mode 02
with the frame number, modes 03/07/0A, mode 04). The CAN side runs on a python-can virtual bus.
Expected values come from the recording itself, decoded here independently of the twin: comma's
own wheel-speed reference CSV and the ENGINE_RPM frames read with the DBC.
"""
from __future__ import annotations

import bisect
import csv
import os
import threading
import time
import uuid
from contextlib import contextmanager

import can
import cantools
import obd
import pytest
from obd import OBDCommand
from obd.protocols import ECU

from drivers.core import vin as vin_check
from agent.health.battery12v import StartDetector
from agent.health.driving import HarshEventDetector
from agent.health.trips import TripDetector
from drivers.obd.reader import ObdReader
from scripts.testbed.shared_data import RAV4, RAV4_LOG
from scripts.vehicle_sim.can_twin import CanTwin, start_thread
from scripts.vehicle_sim.drive import Car, Drive, DriveClock, load_spec, vin_for
from scripts.vehicle_sim.elm_twin import TwinEmulator
from scripts.vehicle_sim.recording import load
from scripts.vehicle_sim.twin import VehicleTwin
from scripts.testbed.wait import wait_until

pytestmark = pytest.mark.skipif(not RAV4_LOG.exists(), reason="the RAV4 recording is not here")

DBC = RAV4 / "toyota_new_mc_pt_generated.dbc"
WAIT_S = 60.0


# -- the recording, read here on its own ---------------------------------------------------------

class Reference:
    """The recording's values by recording time (s from its first frame)."""

    def __init__(self):
        with can.LogReader(str(RAV4_LOG)) as reader:
            first = next(iter(reader)).timestamp
        db = cantools.database.load_file(str(DBC), strict=False)
        rpm_id = db.get_message_by_name("ENGINE_RPM").frame_id
        self.rpm_t, self.rpm = [], []
        with can.LogReader(str(RAV4_LOG)) as reader:
            for msg in reader:
                if msg.channel == "can0" and msg.arbitration_id == rpm_id:
                    self.rpm_t.append(msg.timestamp - first)
                    self.rpm.append(db.decode_message(rpm_id, msg.data)["RPM"])
        self.speed_t, self.speed = [], []
        with open(RAV4 / "reference_wheelspeed_speed.csv") as f:
            for row in csv.DictReader(f):
                self.speed_t.append(float(row["t_s"]) - first)
                self.speed.append(float(row["speed_mps_mean_of_wheels"]) * 3.6)

    @staticmethod
    def _held(ts: list[float], vs: list[float], t0: float, t1: float) -> list[float]:
        """Values a receiver held at some moment of [t0, t1]."""
        i0 = max(bisect.bisect_right(ts, t0) - 1, 0)
        i1 = max(bisect.bisect_right(ts, t1), i0 + 1)
        return vs[i0:i1]

    def rpm_between(self, t0: float, t1: float) -> list[float]:
        return self._held(self.rpm_t, self.rpm, t0, t1)

    def speed_between(self, t0: float, t1: float) -> list[float]:
        return self._held(self.speed_t, self.speed, t0, t1)


@pytest.fixture(scope="module")
def reference() -> Reference:
    return Reference()


@pytest.fixture(scope="module")
def drive() -> Drive:
    return Drive(Car(), load(frames=True))


def loop_time(drive: Drive, loop: int, phase: str, into: float = 0.0) -> float:
    return loop * drive.loop_s + drive.phase[phase].start + into


def rec_time(drive: Drive, t: float) -> float:
    """Recording time of drive time ``t`` (which must be in a recorded phase)."""
    n, u = drive.locate(t)
    return u - drive.phase["recorded"].start


def close_to_one_of(value: float, candidates: list[float], tolerance: float) -> bool:
    return any(abs(value - c) <= tolerance for c in candidates)


AWAKE = 36.6  # drive time in loop 0's recorded phase: the ECU answers for a minute from here


@contextmanager
def connected(car: Car | None = None, *, protocol: str | None = "6", stored: tuple[str, ...] = ()):
    """The twin's emulator and a connected ObdReader. ``protocol`` "6" (ISO 15765-4 CAN 11/500,
    as an agent configured with it) skips python-OBD's 3 s of auto-detection waits."""
    clock = DriveClock.starting(1.0, offset=AWAKE)
    with TwinEmulator(car or Car(), clock, stored=stored) as emu:
        reader = ObdReader(emu.port, protocol=protocol)
        try:
            assert reader.connect(), reader.last_error
            yield emu, reader
        finally:
            reader.close()


def position(emu: TwinEmulator, drive: Drive, loop: int, phase: str, into: float = 0.0,
             speed: float = 1.0) -> DriveClock:
    """Moves the connected twin to a moment of the drive; returns its new clock."""
    clock = DriveClock.starting(speed, offset=loop_time(drive, loop, phase, into))
    emu.set_clock(clock)
    return clock


def timed(clock: DriveClock, fn):
    """(drive time before, result, drive time after)."""
    t0 = clock.now()
    result = fn()
    return t0, result, clock.now()


def awake_reading(reader: ObdReader):
    """The next DTC reading the ECU answers (it is silent while the car is parked)."""
    def read():
        r = reader.read_dtc_reading(freeze=True)
        return r if r.answered else None
    return wait_until(read, timeout=WAIT_S)


# -- the model on its own ------------------------------------------------------------------------

def test_vin_is_valid_stable_and_per_car(drive):
    vin = vin_for("demo-0001")
    assert vin_check.validate(vin) == (True, "ok")
    assert vin == vin_for("demo-0001") == Car().vin
    other = vin_for("demo-0002")
    assert other != vin and vin_check.validate(other) == (True, "ok")
    # the recording's own car: same maker, model, year and plant; another serial
    assert drive.rec.vin == "2T3DFREVXHW665004"
    assert vin[:8] == drive.rec.vin[:8] and vin[9:11] == drive.rec.vin[9:11]
    assert vin[11:] != drive.rec.vin[11:]


def test_a_loop_is_a_plausible_drive(drive):
    """Values move smoothly (no 0 → 4,208 rpm jumps), the made-up phases accelerate no harder
    than the harsh-driving rule tolerates, and the known answers add up."""
    step = 0.1
    states = [drive.at(i * step) for i in range(int(2 * drive.loop_s / step))]
    harsh = HarshEventDetector()   # fed once a second, as the agent polls SPEED
    events = [e for s in states[::10] if (e := harsh.feed(int(s.t * 1000), s.speed_kmh))]
    assert events == []
    for a, b in zip(states, states[1:]):
        if a.phase == b.phase and a.phase != "recorded":
            assert abs(b.rpm - a.rpm) < 120, (a.phase, a.t)
        assert abs(b.coolant_c - a.coolant_c) < 0.5
        assert b.odometer_km >= a.odometer_km and b.fuel_l <= a.fuel_l
    truth = drive.truth(0.0, 2 * drive.loop_s)
    assert truth["trips"] == 2 and truth["engine_starts"] == 2
    integral = sum(s.speed_kmh * step / 3600.0 for s in states)
    assert truth["distance_km"] == pytest.approx(integral, rel=0.01)
    running = sum(step for s in states if s.running)
    assert truth["trip_duration_s"] == pytest.approx(running, abs=2 * step)
    loop0, loop1 = (drive.loop_truth(n) for n in (0, 1))
    assert loop0.coolant_start_c == Car().ambient_c            # a cold start
    assert loop1.coolant_start_c > loop0.coolant_start_c + 10  # the next one is warmer
    assert loop1.odometer_start_km == pytest.approx(loop0.odometer_end_km)
    parked = drive.at(loop0.trip_end_t + 1)
    assert (parked.ignition, parked.running, parked.speed_kmh) == (False, False, 0.0)
    assert 12.4 < parked.voltage < 13.1 and 13.8 < drive.at(loop0.trip_start_t + 30).voltage < 14.5


# -- OBD: python-OBD against the ELM327-emulator -------------------------------------------------

def test_obd_rpm_and_speed_are_the_recordings(drive, reference):
    # protocol auto-detection, as the agent's default config connects
    with connected(protocol=None) as (emu, reader):
        assert reader.protocol_name == "ISO 15765-4 (CAN 11/500)"
        clock = position(emu, drive, 1, "recorded", 1.0, speed=6.0)
        end = loop_time(drive, 1, "recorded", 41.0)
        checked, speeds = 0, []
        while (t0 := clock.now()) < end:
            t0, got, t1 = timed(clock, lambda: reader.read_pids(["RPM", "SPEED", "COOLANT_TEMP"]))
            assert got.keys() == {"RPM", "SPEED", "COOLANT_TEMP"}, (t0, got, reader.last_error)
            r0, r1 = rec_time(drive, t0), rec_time(drive, t1)
            assert close_to_one_of(got["RPM"][0], reference.rpm_between(r0, r1), 0.25), (r0, got)
            assert close_to_one_of(got["SPEED"][0], reference.speed_between(r0, r1), 0.5 + 1e-6), \
                (r0, got)
            checked += 1
            speeds.append(got["SPEED"][0])
            time.sleep(0.1)
        assert reader.multi_pid is True and reader.count_hint is True  # as the agent asks
    assert checked >= 40
    assert max(speeds) - min(speeds) > 15  # it followed the drive, not one value


def test_vin_is_the_same_across_emulator_starts():
    vins = []
    for _ in range(2):
        with connected() as (emu, reader):
            vins.append(reader.read_vin())
    assert vins[0] == vins[1] == Car().vin
    assert vin_check.validate(vins[0]) == (True, "ok")
    with connected(Car(name="demo-0002")) as (emu, reader):
        other = reader.read_vin()
    assert other != vins[0] and vin_check.validate(other) == (True, "ok")


def test_a_parked_car_does_not_connect_until_the_key_is_on(drive):
    """Ignition off: the adapter answers, no ECU does (python-OBD's auto-detection sees
    UNABLE TO CONNECT, as from a real ELM327); at key-on the car connects with its PIDs."""
    clock = DriveClock.starting(1.0, offset=loop_time(drive, 0, "parked", 10.0))
    with TwinEmulator(drive.car, clock) as emu:
        reader = ObdReader(emu.port)
        try:
            assert reader.connect() is False
            assert "ECUs do not" in reader.last_error
            position(emu, drive, 1, "key_on", 1.0)
            assert reader.connect(), reader.last_error
            assert {"RPM", "SPEED", "COOLANT_TEMP", "ENGINE_LOAD"} <= reader.supported_pids()
            assert reader.read_pids(["RPM", "SPEED"]) == {"RPM": (0.0, "rpm"), "SPEED": (0.0, "km/h")}
        finally:
            reader.close()


def test_a_code_set_while_the_engine_is_off_is_stored_once_it_runs(drive):
    """The freeze frame holds the car at the moment the code was stored; a later code does not
    replace it."""
    with connected() as (emu, reader):
        clock = position(emu, drive, 1, "key_on", 1.0, speed=4.0)
        set_at = emu.set_code("P0301")
        assert set_at["t"] == pytest.approx(loop_time(drive, 1, "warm_idle", 2.0))
        assert reader.read_dtcs("GET_DTC") == []    # the engine is off: not detected yet
        assert clock.now() < set_at["t"]
        codes = wait_until(lambda: reader.read_dtcs("GET_DTC"), timeout=WAIT_S)
        assert codes == ["P0301"]
        reading = reader.read_dtc_reading(freeze=True)
        assert reading.mil is True and reading.stored == ["P0301"]
        assert reading.permanent == ["P0301"]
        at = drive.at(set_at["t"])
        ff = reading.freeze
        assert ff["code"] == "P0301"
        assert ff["values"]["RUN_TIME"]["value"] == 2
        assert ff["values"]["RPM"]["value"] == pytest.approx(at.rpm, abs=0.25)
        assert ff["values"]["COOLANT_TEMP"]["value"] == round(at.coolant_c)
        assert ff["values"]["SPEED"]["value"] == 0

        # a second code while driving: stored at once; the freeze frame stays the first one's
        position(emu, drive, 1, "recorded", 3.0)
        second = emu.set_code("P0420")
        assert second["t"] == second["set_at"]
        reading = reader.read_dtc_reading(freeze=True)
        assert reading.stored == ["P0301", "P0420"]
        assert reading.freeze == ff
        live = reader.read_pids(["RPM"])["RPM"][0]
        assert abs(live - ff["values"]["RPM"]["value"]) > 100  # the live values moved on


def test_a_code_set_while_driving_freezes_the_recordings_values(drive, reference):
    with connected() as (emu, reader):
        position(emu, drive, 2, "recorded", 20.0)
        set_at = emu.set_code("P0171")
        assert set_at["t"] == set_at["set_at"]
        r = rec_time(drive, set_at["t"])
        ff = reader.read_freeze_frame()
        assert ff["code"] == "P0171"
        assert close_to_one_of(ff["values"]["RPM"]["value"], reference.rpm_between(r, r), 0.25)
        assert close_to_one_of(ff["values"]["SPEED"]["value"], reference.speed_between(r, r),
                               0.5 + 1e-6)
        at = drive.at(set_at["t"])
        assert ff["values"]["ENGINE_LOAD"]["value"] == pytest.approx(at.load_pct, abs=0.4)
        assert ff["values"]["COOLANT_TEMP"]["value"] == round(at.coolant_c)
        status = reader.read_status()
        assert status["mil"] is True and status["dtc_count"] == 1


def test_the_agents_clear_counts_the_stored_code_and_the_permanent_one_stays():
    """The poller's clear through the twin's ECU: the stored P0301 is cleared (the result and the
    dtc event say so), its permanent record (mode 0A) is still reported, MIL off."""
    from agent.vehicle.obd import ObdPoller
    from tests.test_obd import Collector
    events: list[dict] = []
    with connected(stored=("P0301",)) as (emu, reader):
        reader.close()   # the poller opens the port itself
        poller = ObdPoller(emu.port, [], Collector(), protocol="6", on_dtc=events.append,
                           dtc_period_s=3600)
        poller.start()
        try:
            assert wait_until(lambda: poller.status()["connected"], timeout=WAIT_S)
            before = poller.read_dtcs_now(30)
            assert {(c["code"], c["state"]) for c in before["codes"]} == {
                ("P0301", "stored"), ("P0301", "permanent")} and before["mil"] is True
            assert poller.clear_dtcs(30) == ["P0301"]
            after = events[-1]
            assert [(c["code"], c["state"]) for c in after["codes"]] == [("P0301", "permanent")]
            assert after["mil"] is False
        finally:
            assert poller.stop(30)


def test_clear_resets_the_monitors_which_complete_again_as_the_drive_goes_on():
    car = Car(parked_s=20.0)
    drive = Drive(car)
    warm = next(n for n in range(50) if drive.loop_truth(n).coolant_start_c >= 75.0)
    with connected(car, stored=("P0301",)) as (emu, reader):
        before = awake_reading(reader)
        assert before.mil and before.stored == ["P0301"]
        assert all(m["complete"] for m in before.monitors.values())
        clock = position(emu, drive, warm, "warm_idle", 1.0, speed=40.0)
        assert reader.clear_dtcs()
        cleared_at = emu.describe()["ecu"]["cleared_at"]
        assert cleared_at <= clock.now()
        after = awake_reading(reader)
        assert after.stored == [] and after.mil is False and after.freeze is None
        assert after.permanent == ["P0301"]          # until the monitors have run again
        available = {n for n, m in after.monitors.items() if m["available"]}
        assert len(available) == 8
        assert not any(after.monitors[n]["complete"] for n in available)
        assert wait_until(lambda: reader.query("DISTANCE_SINCE_DTC_CLEAR"))[0] <= 1

        completed: dict[str, float] = {}

        def all_complete() -> bool:
            status = reader.read_status()
            if status is not None:
                t = clock.now()
                for name in available:
                    if status["monitors"][name]["complete"]:
                        completed.setdefault(name, t)
            return completed.keys() == available

        assert wait_until(all_complete, timeout=120, interval=0.1), completed
        # one after the other, as each one's conditions were met
        assert completed["MISFIRE_MONITORING"] < completed["EVAPORATIVE_SYSTEM_MONITORING"]
        assert completed["EVAPORATIVE_SYSTEM_MONITORING"] - cleared_at > 500  # warm running s
        assert wait_until(lambda: reader.query("DISTANCE_SINCE_DTC_CLEAR"))[0] >= 4
        final = awake_reading(reader)
        assert final.permanent == [] and final.stored == []


def test_odometer_pid_a6_follows_the_distance(drive):
    """PID A6 (python-OBD 0.7.3 has no command for it: a custom one, as python-OBD allows)."""
    odometer = OBDCommand("ODOMETER", "Odometer", b"01A6", 6,
                          lambda m: int.from_bytes(bytes(m[0].data[2:6]), "big") / 10.0,
                          ECU.ENGINE, False)
    clock = DriveClock.starting(1.0, offset=AWAKE)
    with TwinEmulator(drive.car, clock) as emu:
        conn = obd.OBD(emu.port, protocol="6", fast=False)
        try:
            assert conn.status() == obd.OBDStatus.CAR_CONNECTED
            clock = position(emu, drive, 3, "recorded", 5.0, speed=10.0)
            t0, first, _ = timed(clock, lambda: conn.query(odometer, force=True).value)
            assert first == pytest.approx(drive.at(t0).odometer_km, abs=0.15)
            wait_until(lambda: clock.now() > loop_time(drive, 3, "recorded", 50.0), timeout=WAIT_S)
            t1, later, _ = timed(clock, lambda: conn.query(odometer, force=True).value)
            assert later == pytest.approx(drive.at(t1).odometer_km, abs=0.15)
            assert later - first == pytest.approx(drive.at(t1).distance_km - drive.at(t0).distance_km,
                                                  abs=0.15)
            assert later - first > 0.5
        finally:
            conn.close()


def test_loops_give_known_trips_and_engine_starts():
    """Engine off, parked (the ECU silent), key on, engine on: the agent's own trip and start
    rules, fed what python-OBD reads (stamped with drive time), find the loop's known answers
    (Drive.loop_truth)."""
    car = Car(parked_s=130.0)    # still longer than the trip rule's end_after_s (120 s)
    drive = Drive(car)
    events: list[dict] = []
    trips = TripDetector(events.append)
    starts = StartDetector()
    found_starts: list[float] = []
    longest = 0.0   # the longest request, drive s: a sample is stamped at its midpoint
    phases: list[str] = []
    halves: list = []
    with connected(car) as (emu, reader):
        clock = position(emu, drive, 0, "idle", 2.0, speed=20.0)
        end = loop_time(drive, 2, "key_on", 1.0)
        while clock.now() < end:
            t0, got, t1 = timed(clock, lambda: reader.read_pids(["RPM", "SPEED"]))
            t_ms = int((t0 + t1) / 2 * 1000)
            longest = max(longest, t1 - t0)
            if "RPM" in got and "SPEED" in got:
                rpm, speed = got["RPM"][0], got["SPEED"][0]
                trips.feed("rpm", t_ms, rpm)
                trips.feed("speed", t_ms, speed)
                start = starts.feed("rpm", t_ms, rpm)
                if start is not None:
                    found_starts.append(start.ts / 1000)
                seen = ("moving" if speed > 0 else "running" if rpm > 300 else
                        "cranking" if rpm > 0 else "off")
            elif got:
                halves.append((t0, got))  # an answer from both sides of the ignition going off
                continue
            else:
                trips.tick(t_ms)   # the ECU is silent: time passes for the trip rule
                seen = "silent"
            if not phases or phases[-1] != seen:
                phases.append(seen)
        assert reader.multi_pid is True
    assert halves == []   # one multi-PID answer is of one moment
    # the crank (1.2 drive s) may fall between two samples on a busy machine
    assert [p for p in phases if p != "cranking"][:6] == \
        ["running", "silent", "off", "running", "moving", "running"], phases
    loop1 = drive.loop_truth(1)

    def in_loop1(ts_ms: int) -> bool:
        return loop1.start_t * 1000 <= ts_ms < loop1.end_t * 1000

    trip_starts = [e for e in events if e["type"] == "trip_start" and in_loop1(e["ts"])]
    trip_ends = [e for e in events if e["type"] == "trip_end" and in_loop1(e["ts"])]
    assert len(trip_starts) == len(trip_ends) == loop1.trips == 1, events
    assert trip_starts[0]["ts"] / 1000 == pytest.approx(loop1.trip_start_t, abs=1.0)
    assert trip_ends[0]["distance_km"] == pytest.approx(loop1.distance_km, rel=0.02)
    assert trip_ends[0]["duration_s"] == pytest.approx(loop1.duration_s, abs=2.0)
    in_loop = [s for s in found_starts if loop1.start_t <= s < loop1.end_t]
    assert len(in_loop) == loop1.engine_starts == 1
    # the answer that showed the engine running may come from after its request's midpoint
    assert loop1.engine_start_t - longest / 2 <= in_loop[0] <= loop1.trip_start_t + 1.0


# -- CAN and OBD at the same moment -----------------------------------------------------------

class CanLog:
    """Receives WHEEL_SPEEDS on the twin's bus, each frame at the drive time the twin stamped."""

    def __init__(self, bus: can.BusABC, clock: DriveClock):
        self.db = cantools.database.load_file(str(DBC), strict=False)
        self.wheel_id = self.db.get_message_by_name("WHEEL_SPEEDS").frame_id
        self.bus = bus
        self.clock = clock
        self.frames: list[tuple[float, int]] = []     # (drive time, id) of every frame
        self.wheels: list[tuple[float, float]] = []   # (drive time, mean wheel speed)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            msg = self.bus.recv(0.1)
            if msg is None:
                continue
            t = self.clock.at_wall(msg.timestamp)
            with self._lock:
                self.frames.append((t, msg.arbitration_id))
                if msg.arbitration_id == self.wheel_id:
                    d = self.db.decode_message(msg.arbitration_id, msg.data)
                    self.wheels.append((t, sum(d[k] for k in d) / 4.0))

    def wheel_speeds(self, t0: float, t1: float) -> list[float]:
        with self._lock:
            return [v for t, v in self.wheels if t0 <= t <= t1]

    def last_frame(self) -> float | None:
        with self._lock:
            return self.frames[-1][0] if self.frames else None

    def frames_between(self, t0: float, t1: float) -> int:
        with self._lock:
            return sum(1 for t, _ in self.frames if t0 < t < t1)

    def close(self):
        self._stop.set()
        self._thread.join(5)
        self.bus.shutdown()


@pytest.fixture
def can_twin(drive):
    """Starts the twin's CAN side on a fresh virtual bus for a clock (stopping the one before)."""
    made = []

    def stop_all():
        while made:
            log, bus, thread, stop = made.pop()
            stop.set()
            thread.join(5)
            bus.shutdown()
            log.close()

    def start(speed: float, offset: float) -> tuple[CanLog, DriveClock]:
        """The CAN side and the clock it follows, set to ``offset`` as it starts sending."""
        stop_all()
        channel = f"twin-{uuid.uuid4().hex[:8]}"
        twin = CanTwin(drive, DriveClock.starting(speed, offset), channels=["can0"])
        # the frames keep the stamp the twin gives them (the drive moment their values belong
        # to), not the moment a loaded machine let the sending thread run
        bus = can.Bus(interface="virtual", channel=channel, preserve_timestamps=True)
        clock = twin.clock = DriveClock.starting(speed, offset)
        log = CanLog(can.Bus(interface="virtual", channel=channel), clock)
        thread, stop = start_thread(twin, bus)
        made.append((log, bus, thread, stop))
        return log, clock

    yield start
    stop_all()


def test_obd_speed_and_can_wheel_speed_agree(drive, can_twin):
    """Through the made-up pull-away, the recording and the stop, OBD and CAN show the same
    speed; then the ECU and the bus fall silent together while parked and wake together."""
    with connected() as (emu, reader):
        checked: dict[str, int] = {}

        def check(clock: DriveClock, log: CanLog, t_end: float) -> None:
            window = 0.1 * clock.speed  # a CAN sample period and more, drive s
            while clock.now() < t_end:
                t0, got, t1 = timed(clock, lambda: reader.read_pids(["SPEED"]))
                assert got, (t0, reader.last_error)
                assert wait_until(lambda: (log.last_frame() or 0) > t1 + window, timeout=5)
                can_values = log.wheel_speeds(t0 - window, t1 + window)
                assert close_to_one_of(got["SPEED"][0], can_values, 0.5 + 0.02), \
                    (t0, got, can_values)
                phase = drive.at(t0).phase
                checked[phase] = checked.get(phase, 0) + 1
                time.sleep(0.05)

        # at drive speed 1: faster, the twin thins the recording's frames to their recorded
        # rate in wall time, and the ECU's answer may hold a wheel sample the bus skipped
        log, clock = can_twin(1.0, loop_time(drive, 1, "warm_idle", 11.0))
        emu.set_clock(clock)
        check(clock, log, loop_time(drive, 1, "recorded", 6.0))
        log, clock = can_twin(1.0, loop_time(drive, 1, "recorded", drive.rec.duration_s - 4.0))
        emu.set_clock(clock)
        check(clock, log, loop_time(drive, 1, "idle", 3.0))
        assert checked.get("pull_away", 0) >= 5 and checked.get("stop", 0) >= 5, checked
        assert checked.get("recorded", 0) >= 10, checked

        # parked: no frames, no answers; the next loop's key-on wakes both
        park, wake = loop_time(drive, 1, "parked"), loop_time(drive, 2, "key_on")
        # 40 drive seconds (1.6 s here) of sending before the park, so a thread that starts late
        # on a loaded machine still leaves the bus's last seconds before the park in the log
        log, clock = can_twin(25.0, park - 40.0)
        emu.set_clock(clock)
        assert wait_until(lambda: not reader.read_pids(["SPEED"]), timeout=WAIT_S)
        assert clock.now() >= park
        assert wait_until(lambda: reader.read_pids(["SPEED"]), timeout=WAIT_S)
        assert clock.now() >= wake
        assert wait_until(lambda: log.frames_between(wake, wake + 10), timeout=WAIT_S)
        late = 0.05 * clock.speed   # frames go out in 10 ms batches: stamped up to a tick late
        assert log.frames_between(park + late, wake - 0.01) == 0
        assert log.frames_between(park - 10, park) > 20


def test_the_demo_starts_both_sides_from_one_place_and_resumes(tmp_path, drive):
    """VehicleTwin as the demo runs it: the emulator on a pty, the CAN side in its own process
    on udp_multicast, both from twin.json; stopped and started again, the drive goes on."""
    try:
        import msgpack  # noqa: F401  (python-can's udp_multicast interface needs it)
    except ImportError:
        pytest.skip("python-can's udp_multicast interface needs msgpack")
    group, mport = f"239.74.{os.getpid() % 200 + 1}.9", 44000 + os.getpid() % 2000
    try:
        rx = can.Bus(interface="udp_multicast", channel=group, port=mport)
    except (OSError, can.CanError) as e:
        pytest.skip(f"udp_multicast not usable here: {e}")
    log = None
    twin = VehicleTwin(tmp_path, Car(), speed=2.0, offset=loop_time(drive, 0, "pull_away"),
                       can={"interface": "udp_multicast", "channel": group, "port": mport})
    try:
        port = twin.start()
        log = CanLog(rx, twin.clock)
        try:
            wait_until(lambda: log.last_frame(), timeout=WAIT_S, what="a frame of the CAN side")
        except AssertionError:
            pytest.skip("multicast on loopback delivers nothing here (no multicast route)")
        reader = ObdReader(port, protocol="6")
        try:
            assert reader.connect(), reader.last_error
            checked = 0
            window = 0.25 * twin.clock.speed   # UDP between processes: a little more latency
            while checked < 15:
                t0, got, t1 = timed(twin.clock, lambda: reader.read_pids(["SPEED"]))
                assert wait_until(lambda: (log.last_frame() or 0) > t1 + window, timeout=5)
                assert close_to_one_of(got["SPEED"][0], log.wheel_speeds(t0 - window, t1 + window),
                                       0.5 + 0.02), (t0, got)
                checked += 1
                time.sleep(0.1)
        finally:
            reader.close()
        stopped_at = twin.clock.now()
    finally:
        twin.stop()
        if log is not None:
            log.close()
        else:
            rx.shutdown()
    resume_at = load_spec(tmp_path / "twin.json")[2]["resume_at"]
    assert resume_at == pytest.approx(drive.loop_s) and resume_at > stopped_at
    with VehicleTwin(tmp_path, Car()) as again:     # no CAN side this time
        assert again.now()["loop"] == 1 and again.now()["t"] >= resume_at
        reader = ObdReader(again.port, protocol="6")
        try:
            assert reader.connect(), reader.last_error
            assert reader.read_vin() == Car().vin
        finally:
            reader.close()


def test_the_ecu_keeps_its_memory_while_the_car_is_off(tmp_path, drive):
    """As an ECU does: a code stored in one run is there at the next key-on (before the engine
    runs) with its freeze frame; a clear made then is still in force at the run after, with
    the readiness monitors incomplete; --dtc given again changes nothing of a stored code."""
    def reading_of(twin: VehicleTwin):
        reader = ObdReader(twin.port, protocol="6")
        try:
            assert reader.connect(), reader.last_error
            return reader, awake_reading(reader)
        except BaseException:
            reader.close()
            raise

    with VehicleTwin(tmp_path, Car(), offset=AWAKE, stored=("P0301",)) as twin:
        reader, first = reading_of(twin)
        reader.close()
    assert first.stored == ["P0301"] and first.freeze["code"] == "P0301"
    with VehicleTwin(tmp_path, Car(), stored=("P0301",)) as again:
        assert again.now()["phase"] == "key_on"          # the engine has not run yet
        reader, second = reading_of(again)
        try:
            assert second.stored == ["P0301"] and second.mil is True
            assert second.freeze == first.freeze          # the moment it was stored, not now
            assert reader.clear_dtcs()
        finally:
            reader.close()
    with VehicleTwin(tmp_path, Car()) as third:
        reader, after = reading_of(third)
        reader.close()
        # the restart went on at the next loop: that loop's drive counts towards the monitors
        expected = third.emulator.describe()["ecu"]["monitors"]
    assert after.stored == [] and after.mil is False and after.freeze is None
    assert after.permanent == ["P0301"]                   # until the monitors have run again
    assert {n: m["complete"] for n, m in after.monitors.items() if m["available"]} == expected
    assert not all(expected.values())                     # the cold-engine loop left some to do


def test_a_lead_in_starts_the_car_parked_before_the_key_on_it_goes_on_from(tmp_path, drive):
    """The demo's lead-in: parked with the ignition off (no ECU answers) for lead_in_s, then
    the key-on the drive goes on from; stopped before it, the next run starts before it again."""
    for _ in range(2):
        with VehicleTwin(tmp_path, Car(), lead_in_s=60.0) as twin:
            now = twin.now()
            assert now["phase"] == "parked" and now["t"] < 0
            assert now["key_on_in"] == pytest.approx(60.0, abs=5.0)
            reader = ObdReader(twin.port)
            try:
                assert reader.connect() is False and "ECUs do not" in reader.last_error
            finally:
                reader.close()
        assert load_spec(tmp_path / "twin.json")[2]["resume_at"] == 0.0
    with pytest.raises(ValueError):
        VehicleTwin(tmp_path, Car(), lead_in_s=Car().parked_s)
