"""drivers/obd/reader.py against the ELM327-emulator on a pty (scripts/vehicle_sim/elm_emulator.py).

Expected values are decoded here independently (SAE J1979 formulas) from the emulator's own
scenario table: the 'car' scenario serves each PID's list of answers in sequence, so the
emulator's request counter for that PID tells which answer the next request gets.

One emulator is shared by the module; tests that change its answers undo the change. Tests that
kill an emulator start their own. The "broken adapter" is a small pty peer written here, since no
real broken adapter exists on this machine.
"""
from __future__ import annotations

import itertools
import logging
import os
import random
import re
import select
import threading
import time
import tty
from collections.abc import Callable

import obd as python_obd
import pytest
from elm.obd_message import ObdMessage  # test peer only (CC BY-NC-SA), never in agent/drivers

from drivers.core.backoff import Backoff
from drivers.core.model import Sample
from agent.vehicle.obd import ObdPoller
from drivers.obd.reader import ObdReader, decode_vin, unit_text, value_and_unit, vin_is_valid
from scripts.vehicle_sim.elm_emulator import ElmEmulator, dtc_to_hex
from scripts.testbed.wait import wait_until

pytestmark = pytest.mark.timeout(120)

CAN_11_500 = "ISO 15765-4 (CAN 11/500)"

# SAE J1979 mode 01 decoders, written out here so the driver is checked against the standard.
DECODE = {
    "RPM": lambda d: (d[2] * 256 + d[3]) / 4,
    "SPEED": lambda d: float(d[2]),
    "COOLANT_TEMP": lambda d: float(d[2] - 40),
    "ENGINE_LOAD": lambda d: d[2] * 100 / 255,
}
UNITS = {"RPM": "rpm", "SPEED": "km/h", "COOLANT_TEMP": "degC", "ENGINE_LOAD": "%"}
NAMES = {"RPM": "engine.rpm", "SPEED": "vehicle.speed", "COOLANT_TEMP": "engine.coolant_temp",
         "ENGINE_LOAD": "engine.load"}


def scenario_answers(pid: str, tag: str = "data") -> list[bytes]:
    """The first ``<tag>`` payload of each answer the 'car' scenario lists for ``pid``."""
    response = ObdMessage["car"][pid]["Response"]
    answers = response if isinstance(response, (list, tuple)) else [response]
    return [bytes.fromhex(re.search(f"<{tag}>(.*?)</{tag}>", a).group(1)) for a in answers]


def expected_values(pid: str) -> set[float]:
    return {DECODE[pid](d) for d in scenario_answers(pid)}


class Collector:
    """A sink: keeps every list it is handed."""

    def __init__(self, fail_first: int = 0):
        self.batches: list[list[Sample]] = []
        self._fail = fail_first
        self._lock = threading.Lock()

    def __call__(self, batch: list[Sample]) -> None:
        with self._lock:
            if self._fail:
                self._fail -= 1
                raise RuntimeError("sink refuses")
            self.batches.append(list(batch))

    @property
    def samples(self) -> list[Sample]:
        with self._lock:
            return [s for b in self.batches for s in b]

    def count(self, name: str) -> int:
        return sum(1 for s in self.samples if s.name == name)


def pid_config(*entries: tuple[str, float]) -> list[dict]:
    return [{"name": NAMES[pid], "pid": pid, "period_s": period} for pid, period in entries]


@pytest.fixture(scope="module")
def emu():
    with ElmEmulator("car") as e:
        yield e


@pytest.fixture
def pollers():
    """Stops every poller a test made, even when it fails."""
    made: list[ObdPoller] = []
    yield made
    for p in made:
        assert p.stop(30), "poller thread did not stop"


# -- pure helpers --------------------------------------------------------------------------------


def test_unit_text_maps_python_obd_units():
    u = python_obd.Unit
    assert unit_text(u.rpm) == "rpm"
    assert unit_text(u.kph) == "km/h"
    assert unit_text(u.celsius) == "degC"
    assert unit_text(u.percent) == "%"
    assert unit_text(u.volt) == "V"
    assert unit_text(u.kilopascal) == "kPa"
    assert unit_text(u.gps) == "g/s"
    assert unit_text(u.second) == "s"
    assert unit_text(u.kilometer) == "km"
    assert unit_text(u.liters_per_hour) == "L/h"
    assert unit_text(u.degree) == "deg"
    assert unit_text(u.dimensionless) == ""
    assert unit_text(u.milliohm) == "mΩ"  # not in the table: pint's short form
    assert value_and_unit(u.Quantity(55, u.celsius)) == (55.0, "degC")
    assert isinstance(value_and_unit(u.Quantity(55, u.celsius))[0], float)
    assert value_and_unit("FUEL SYSTEM OPEN") is None
    assert value_and_unit(u.Quantity(float("nan"), u.volt)) is None


def test_vin_decoding_keeps_trailing_zeros():
    # python-OBD's own decoder would return "WP0ZZZ99ZTS39" for this answer
    data = b"\x49\x02\x01WP0ZZZ99ZTS390000\x00\x00"
    assert decode_vin(data) == "WP0ZZZ99ZTS390000"
    assert vin_is_valid("WP0ZZZ99ZTS390000")
    assert not vin_is_valid("WP0ZZZ99ZTS39000O")  # O is not a VIN character
    assert vin_is_valid("1HGCM82633A004352")  # North American: check digit 3 is right
    assert not vin_is_valid("1HGCM82643A004352")  # ... and 4 is not (agent.vin)
    assert not vin_is_valid("WP0ZZZ99ZTS3900") and not vin_is_valid(None)
    assert decode_vin(b"\x49\x02\x01garbage") is None
    assert dtc_to_hex("P0301") == "0301" and dtc_to_hex("U0100") == "C100"


# -- ObdReader -----------------------------------------------------------------------------------


class TestReader:
    @pytest.fixture(scope="class")
    @classmethod
    def reader(cls, emu):
        r = ObdReader(emu.port, timeout_s=2.0)  # protocol auto-detected
        assert r.connect(), r.last_error
        yield r
        r.close()

    def test_connects_and_detects_the_protocol(self, reader):
        assert reader.connected
        assert reader.protocol_name == CAN_11_500

    @pytest.mark.parametrize("pid", ["RPM", "SPEED", "COOLANT_TEMP", "ENGINE_LOAD"])
    def test_default_pids_track_the_emulator(self, reader, emu, pid):
        answers = scenario_answers(pid)
        assert reader.supports(pid)
        for _ in range(4):  # the emulator moves on to its next answer each time
            served = emu.request_count(pid)
            expected = DECODE[pid](answers[served % len(answers)])
            value, unit = reader.query(pid)
            assert unit == UNITS[pid]
            assert value == pytest.approx(expected)
            assert emu.request_count(pid) == served + 1

    def test_answer_changed_at_run_time_is_read(self, reader, emu):
        emu.set_answer("RPM", "41 0C 1A F8")
        try:
            assert reader.query("RPM") == (1726.0, "rpm")
            assert reader.query("RPM") == (1726.0, "rpm")
        finally:
            emu.clear_answer("RPM")
        assert reader.query("RPM")[0] in expected_values("RPM")

    def test_adapter_voltage(self, reader, emu):
        emu.set_answer_xml("AT_R_VOLT", "<writeln>12.6V</writeln>")
        try:
            assert reader.query("ELM_VOLTAGE") == (12.6, "V")
        finally:
            emu.clear_answer("AT_R_VOLT")

    def test_vin_matches_the_emulator(self, reader, emu):
        answers = scenario_answers("VIN", tag="pos_answer")
        served = emu.request_count("VIN")
        expected = answers[served % len(answers)][1:].decode("ascii")  # after the count byte
        vin = reader.read_vin()
        assert vin == expected
        assert vin_is_valid(vin)

    def test_dtcs_injected_into_the_emulator(self, reader, emu):
        assert reader.read_dtcs() == []
        emu.set_dtcs(stored=["P0301", "P0420", "U0100"], pending=["P0171"])
        try:
            assert reader.read_dtcs() == ["P0301", "P0420", "U0100"]
            assert reader.read_dtcs("GET_CURRENT_DTC") == ["P0171"]
        finally:
            emu.set_dtcs()
        assert reader.read_dtcs() == []

    def test_no_data_unsupported_and_unknown_give_none(self, reader, emu):
        emu.set_answer_xml("SPEED", "<writeln>NO DATA</writeln>")
        try:
            assert reader.query("SPEED") is None
        finally:
            emu.clear_answer("SPEED")
        assert not reader.supports("FUEL_RATE")  # not in the car scenario's PID bitmap
        assert reader.query("FUEL_RATE") is None
        assert reader.query("NOT_A_PID") is None
        assert reader.query("STATUS") is None  # answers, but not with a number
        assert reader.connected
        assert reader.query("SPEED")[0] in expected_values("SPEED")


def test_reader_on_a_missing_port(tmp_path):
    r = ObdReader(str(tmp_path / "ttyOBD0"))
    assert r.connect() is False
    assert not r.connected
    assert "does not exist" in r.last_error
    assert r.query("RPM") is None and r.read_vin() is None and r.read_dtcs() is None
    r.close()


# -- ObdPoller -----------------------------------------------------------------------------------


def test_poller_delivers_every_pid_at_its_period(emu, pollers):
    sink = Collector()
    vehicles: list[dict] = []
    t0 = 1_700_000_000_000
    ticks = itertools.count(t0)
    poller = ObdPoller(emu.port, pid_config(("RPM", 0.2), ("SPEED", 0.4), ("COOLANT_TEMP", 0.8),
                                            ("ENGINE_LOAD", 0.8)),
                       sink, clock=lambda: next(ticks), on_vehicle=vehicles.append, protocol="6",
                       batch_size=4)
    pollers.append(poller)
    poller.start()
    wait_until(lambda: sink.count("engine.rpm") >= 16, what="16 RPM samples")
    status = poller.status()
    assert poller.stop(30)

    samples = sink.samples
    counts = {name: sink.count(name) for name in NAMES.values()}
    rpm = counts["engine.rpm"]
    assert 0.3 * rpm <= counts["vehicle.speed"] <= 0.75 * rpm, counts
    assert 0.1 * rpm <= counts["engine.coolant_temp"] <= 0.45 * rpm, counts
    assert 0.1 * rpm <= counts["engine.load"] <= 0.45 * rpm, counts
    for pid, name in NAMES.items():
        mine = [s for s in samples if s.name == name]
        assert {s.unit for s in mine} == {UNITS[pid]}
        assert all(isinstance(s.value, float) for s in mine)
        allowed = expected_values(pid)
        assert all(any(s.value == pytest.approx(v) for v in allowed) for s in mine), pid
    stamps = [s.t_ms for s in samples]
    assert stamps == sorted(stamps) and stamps[0] >= t0  # the injected clock, in order
    assert all(1 <= len(b) <= 4 for b in sink.batches)
    assert status["connected"] and status["protocol"] == CAN_11_500
    assert status["samples"] >= 16 and status["errors"] == 0 and status["connects"] == 1
    assert poller.status()["samples"] == len(samples)  # every sample reached the sink
    assert len(vehicles) == 1
    assert vehicles[0]["protocol"] == CAN_11_500 and vin_is_valid(vehicles[0]["vin"])
    assert vehicles[0]["vin_valid"] is True and status["vin"] == vehicles[0]["vin"]


def test_apply_pids_changes_what_is_polled_without_reconnecting(emu, pollers):
    sink = Collector()
    poller = ObdPoller(emu.port, pid_config(("RPM", 0.1)), sink, protocol="6")
    pollers.append(poller)
    poller.start()
    wait_until(lambda: sink.count("engine.rpm") >= 3, what="RPM samples")
    poller.apply_pids(pid_config(("SPEED", 0.1)))
    wait_until(lambda: sink.count("vehicle.speed") >= 3, what="SPEED samples")
    rpm_after_switch = sink.count("engine.rpm")
    wait_until(lambda: sink.count("vehicle.speed") >= 10, what="more SPEED samples")
    assert sink.count("engine.rpm") == rpm_after_switch
    status = poller.status()
    assert status["polling"] == ["SPEED"]
    assert status["connects"] == 1 and status["attempts"] == 1


def test_unknown_and_unsupported_pids_are_skipped_and_reported(emu, pollers, caplog):
    caplog.set_level(logging.WARNING, logger="drivers.obd.reader")
    sink = Collector(fail_first=1)  # a sink that raises once must not stop the poller
    pids = pid_config(("RPM", 0.05)) + [
        {"name": "x.bogus", "pid": "NOT_A_PID", "period_s": 0.05},
        {"name": "fuel.rate", "pid": "FUEL_RATE", "period_s": 0.05},  # unsupported by the car
        {"name": "bad.period", "pid": "SPEED", "period_s": -1},
        "not an object",
    ]
    poller = ObdPoller(emu.port, pids, sink, protocol="6", batch_size=2)
    pollers.append(poller)
    poller.start()
    wait_until(lambda: sink.count("engine.rpm") >= 10, what="RPM samples")
    poller.apply_pids(pids)  # the same config again: no second log line for FUEL_RATE
    wait_until(lambda: sink.count("engine.rpm") >= 20, what="more RPM samples")
    status = poller.status()
    assert status["unknown_pids"] == ["NOT_A_PID"]
    assert len(status["invalid_pids"]) == 2
    assert status["unsupported_pids"] == ["FUEL_RATE"]
    assert status["polling"] == ["RPM"]
    assert status["sink_errors"] == 1 and status["running"]
    assert {s.name for s in sink.samples} == {"engine.rpm"}
    fuel_lines = [r for r in caplog.records if "FUEL_RATE" in r.getMessage()]
    assert len(fuel_lines) == 1
    assert any("NOT_A_PID" in r.getMessage() for r in caplog.records)


def test_missing_port_retries_then_connects_when_it_appears(emu, tmp_path, pollers):
    port = tmp_path / "ttyOBD"
    sink = Collector()
    poller = ObdPoller(str(port), pid_config(("RPM", 0.1)), sink, protocol="6",
                       backoff=Backoff(0.02, 0.05))
    pollers.append(poller)
    poller.start()
    wait_until(lambda: poller.status()["attempts"] >= 5, what="5 connect attempts")
    status = poller.status()
    assert not status["connected"] and status["running"]
    assert status["samples"] == 0 and status["errors"] >= 5
    assert "does not exist" in status["last_error"]
    os.symlink(emu.pty, port)  # the adapter is plugged in
    wait_until(lambda: sink.count("engine.rpm") >= 3, what="RPM samples after plug-in")
    assert poller.status()["connected"]


def test_set_port_reconnects_and_reports_the_new_vin(emu, tmp_path, pollers):
    vehicles: list[dict] = []
    sink = Collector()
    poller = ObdPoller(emu.port, pid_config(("SPEED", 0.1)), sink, protocol="6",
                       on_vehicle=vehicles.append)
    pollers.append(poller)
    poller.start()
    wait_until(lambda: sink.count("vehicle.speed") >= 2, what="SPEED samples")
    other = tmp_path / "ttyOBD-other"
    os.symlink(emu.pty, other)
    served = emu.request_count("VIN")  # the emulator serves the next VIN of its list
    answers = scenario_answers("VIN", tag="pos_answer")
    next_vin = answers[served % len(answers)][1:].decode("ascii")
    poller.set_port(str(other))
    wait_until(lambda: poller.status()["connects"] >= 2 and len(vehicles) >= 2, what="reconnect")
    assert poller.status()["port"] == str(other)
    assert vehicles[1]["vin"] == next_vin != vehicles[0]["vin"]
    n = sink.count("vehicle.speed")
    wait_until(lambda: sink.count("vehicle.speed") >= n + 2, what="SPEED samples after re-point")


def test_emulator_killed_and_restarted_poller_reconnects(tmp_path, pollers):
    # The poller is given a stable symlink (like /dev/serial/by-id/...), which each emulator
    # points at its own pty; a killed emulator takes its pty and the link with it.
    link = tmp_path / "obd0"
    vehicles: list[dict] = []
    sink = Collector()
    first = ElmEmulator("car", link=link)
    first.start()
    try:
        poller = ObdPoller(str(link), pid_config(("RPM", 0.1)), sink, protocol="6",
                           backoff=Backoff(0.1, 0.5), on_vehicle=vehicles.append)
        pollers.append(poller)
        poller.start()
        wait_until(lambda: sink.count("engine.rpm") >= 3, what="RPM samples")
        first.kill()
        wait_until(lambda: not poller.status()["connected"], what="loss detected")
        assert poller.status()["running"]
        before = sink.count("engine.rpm")
    finally:
        first.kill()
    with ElmEmulator("car", link=link):
        wait_until(lambda: sink.count("engine.rpm") >= before + 3, what="RPM after restart")
        status = poller.status()
        assert status["connected"] and status["connects"] == 2
        assert status["errors"] >= 1 and status["last_error"]
        assert poller.stop(30)
    # both emulators were fresh, so both served the first VIN of their list: same vehicle
    assert len(vehicles) == 1


# -- an adapter that answers garbage -------------------------------------------------------------

GARBAGE = [b"?", b"BUS INIT: ...ERROR", b"CAN ERROR", b"STOPPED", b"NO DATA",
           b"\x00\xff\xfe\x80", b"BUFFER FULL", b"7E8 10"]


class GarbagePeer:
    """A pty whose far end answers each command line with whatever ``answer`` returns."""

    def __init__(self, answer: Callable[[str], bytes]):
        self.answer = answer
        self.commands: list[str] = []
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave)
        self.port = os.ttyname(self.slave)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        buffer = b""
        while not self._stop.is_set():
            ready, _, _ = select.select([self.master], [], [], 0.05)
            if not ready:
                continue
            try:
                buffer += os.read(self.master, 1024)
            except OSError:
                return
            while b"\r" in buffer:
                line, buffer = buffer.split(b"\r", 1)
                cmd = line.decode("latin-1").strip()
                self.commands.append(cmd)
                os.write(self.master, self.answer(cmd) + b"\r\r>")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        os.close(self.master)
        os.close(self.slave)


def garbage_answers(seed: int) -> Callable[[], bytes]:
    rng = random.Random(seed)
    canned = itertools.cycle(GARBAGE)

    def next_answer() -> bytes:
        if rng.random() < 0.4:  # random bytes, never the prompt character
            return bytes(rng.choice([b for b in range(256) if b != ord(">")])
                         for _ in range(rng.randint(1, 40)))
        return next(canned)
    return next_answer


def test_adapter_answering_garbage_to_everything(pollers):
    garbage = garbage_answers(1)
    peer = GarbagePeer(lambda cmd: garbage())
    try:
        sink = Collector()
        poller = ObdPoller(peer.port, pid_config(("RPM", 0.1)), sink,
                           backoff=Backoff(0.05, 0.1))
        pollers.append(poller)
        poller.start()
        wait_until(lambda: poller.status()["attempts"] >= 3, timeout=60, what="3 attempts")
        wait_until(lambda: peer.commands.count("ATZ") >= 3, what="the peer to see 3 resets")
        status = poller.status()
        assert status["running"] and not status["connected"]
        assert status["errors"] >= 2 and status["last_error"]
        assert status["samples"] == 0 and sink.samples == []
        assert poller.stop(30)
    finally:
        peer.close()


def test_adapter_that_connects_then_answers_garbage_to_obd_requests(pollers):
    garbage = garbage_answers(2)

    def answer(cmd: str) -> bytes:
        at = {"ATZ": b"ELM327 v1.5", "ATRV": b"12.6V", "AT RV": b"12.6V", "ATDPN": b"A6"}
        if cmd in at:
            return at[cmd]
        if cmd.startswith("AT"):
            return b"OK"
        if cmd == "0100":  # claims RPM, SPEED, ... so that they are queried
            return b"7E8 06 41 00 BE 3F A8 13"
        if cmd in ("0120", "0140", "0600", "0900"):
            # python-OBD's connect walks these bitmaps with a fixed 10 s read timeout and
            # re-reads an answer without text up to ten times: garbage here would make each
            # connect take minutes (a python-OBD limit, see drivers/obd/reader.py)
            return b"NO DATA"
        return garbage()

    peer = GarbagePeer(answer)
    try:
        vehicles: list[dict] = []
        sink = Collector()
        # timeout_s bounds python-OBD's re-reads of an answer with no text in it
        dtc_events: list[dict] = []
        poller = ObdPoller(peer.port, pid_config(("RPM", 0.05), ("SPEED", 0.05)), sink,
                           protocol="6", backoff=Backoff(0.05, 0.1), fail_limit=3,
                           timeout_s=0.1, on_vehicle=vehicles.append,
                           on_dtc=dtc_events.append, dtc_period_s=0.2)
        pollers.append(poller)
        poller.start()
        wait_until(lambda: poller.status()["connects"] >= 2, timeout=60, what="a reconnect")
        status = poller.status()
        assert status["running"]
        assert status["errors"] >= 3 and status["last_error"]
        assert status["samples"] == 0 and sink.samples == []
        assert sum(c.startswith("010C") for c in peer.commands) >= 2  # RPM was really asked for
        # and the trouble codes, polled on across the reconnects (their period is 0.2 s, but a
        # poll waits its turn behind the PID requests that time out)
        wait_until(lambda: peer.commands.count("03") >= 2, timeout=60, what="a second DTC poll")
        assert poller.status()["samples"] == 0 and sink.samples == []
        assert dtc_events == []  # garbage is never taken for a set of codes
        assert vehicles == [{"vin": None, "vin_valid": False, "protocol": CAN_11_500}]
        assert poller.stop(30)
    finally:
        peer.close()


def test_hold_stops_every_request_until_released(tmp_path):
    """Power management holds the poller while the car goes to sleep: not one request reaches
    the car (the emulator's own request counter proves it), and release resumes polling."""
    with ElmEmulator("car", workdir=tmp_path / "elm") as emu:
        got: list = []
        poller = ObdPoller(emu.port, [{"name": "rpm", "pid": "RPM", "period_s": 0.2}], got.extend)
        poller.start()
        try:
            deadline = time.monotonic() + 60
            while not got and time.monotonic() < deadline:
                time.sleep(0.1)
            assert got
            poller.hold()
            time.sleep(1.0)  # let a request already on the wire finish
            before = emu.request_count("RPM")
            n = len(got)
            time.sleep(2.0)
            assert emu.request_count("RPM") == before and poller.status()["held"]
            poller.release()
            deadline = time.monotonic() + 30
            while len(got) <= n + 2 and time.monotonic() < deadline:
                time.sleep(0.1)
            assert len(got) > n + 2 and emu.request_count("RPM") > before
        finally:
            poller.stop()


# -- period_s 0: on change, with a heartbeat -----------------------------------------------------


def test_period_zero_sends_changes_and_a_heartbeat(emu, pollers):
    emu.set_answer("RPM", "41 0C 1A F8")  # 1726 rpm, held constant
    try:
        sink = Collector()
        poller = ObdPoller(emu.port, [{"name": "engine.rpm", "pid": "RPM", "period_s": 0}],
                           sink, protocol="6", dtc_period_s=None, on_change_poll_s=0.05,
                           heartbeat_s=1.0, batch_age_s=0.0)
        pollers.append(poller)
        served = emu.request_count("RPM")
        started = time.monotonic()
        poller.start()
        wait_until(lambda: sink.count("engine.rpm") >= 3, what="the first value and 2 heartbeats")
        polls = emu.request_count("RPM") - served
        elapsed = time.monotonic() - started
        constant = sink.samples
        assert {s.value for s in constant} == {1726.0} and constant[0].unit == "rpm"
        assert len(constant) <= elapsed / 1.0 + 1  # one per heartbeat, not one per poll
        assert polls >= 5 * len(constant)  # while it was polled all along
        assert poller.status()["on_change"] == ["RPM"]
        emu.set_answer("RPM", "41 0C 0F A0")  # 1000 rpm
        wait_until(lambda: any(s.value == 1000.0 for s in sink.samples), what="the change")
        after = sink.samples[len(constant):]
        assert after[0].value == 1000.0  # the change is sent as it is seen, nothing before it
        assert all(s.value == 1726.0 for s in sink.samples[:len(constant)])
    finally:
        emu.clear_answer("RPM")


def test_the_config_schema_allows_period_zero_for_obd_pids():
    from agent.cloud import schemas
    doc = {"version": 1, "upload": {"interval_s": 30},
           "can": {"signals": [], "raw": {"enabled": False, "ids": []}},
           "obd": {"pids": [{"name": "engine.rpm", "pid": "RPM", "period_s": 0}],
                   "dtc_period_s": 60}}
    schemas.validate("config", doc)
    doc["obd"]["pids"][0]["period_s"] = -1
    with pytest.raises(schemas.SchemaError):
        schemas.validate("config", doc)
    doc["obd"]["pids"][0]["period_s"] = 1
    doc["obd"]["dtc_period_s"] = 0  # the DTC period stays > 0
    with pytest.raises(schemas.SchemaError):
        schemas.validate("config", doc)
