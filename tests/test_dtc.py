"""Trouble codes: the packaged description table, DtcTracker, and the poller's DTC path against
the real ELM327-emulator (codes injected and cleared at run time through its interpreter).

The emulator's PID 01 01 reports the MIL and count from its stored codes; its mode 04 empties all
three lists until the next ATZ (which a reconnect sends) or ``set_dtcs``.
"""
from __future__ import annotations

import csv
import re
import threading

import pytest

from agent.cloud import schemas
from agent.vehicle.dtc import DtcReading, DtcTracker, describe, descriptions
from agent.outbox.store import Store
from agent.vehicle.obd import ObdPoller
from drivers.obd.reader import ObdReader
from scripts.vehicle_sim.elm_emulator import ElmEmulator
from scripts.testbed.wait import wait_until
from tests.test_obd import Collector
from scripts.testbed.shared_data import SHARED_DATA

pytestmark = pytest.mark.timeout(120)

MODE_03_ENTRIES = ("GET_DTC", "SHOW_DIAG_TC")  # the 'car' scenario has two for mode 03
SHARED_TABLE = str(SHARED_DATA / "dtc/obdex_P0xxx_titles.csv")


class Events:
    """An on_dtc callback keeping every body (validated against the protocol schema)."""

    def __init__(self):
        self.bodies: list[dict] = []
        self._lock = threading.Lock()

    def __call__(self, body: dict) -> None:
        schemas.validate("event", body)
        with self._lock:
            self.bodies.append(body)

    def __len__(self) -> int:
        with self._lock:
            return len(self.bodies)

    @property
    def last(self) -> dict:
        with self._lock:
            return self.bodies[-1]


def codes_of(body: dict) -> set[tuple[str, str]]:
    return {(c["code"], c["state"]) for c in body["codes"]}


# -- descriptions --------------------------------------------------------------------------------


def test_packaged_table_holds_the_shared_cc0_facts():
    table = descriptions()
    with open(SHARED_TABLE, newline="") as f:
        source = {r["code"]: r["title_en"].strip() for r in csv.DictReader(f)}
    assert len(table) == len(source) == 3705
    assert table == source
    assert all(re.fullmatch(r"P0[0-9A-F]{3}", c) for c in table)


def test_describe():
    assert describe("P0301") == "Cylinder 1 Misfire Detected"
    assert describe("p0420") == "Catalyst System Efficiency Below Threshold (Bank 1)"
    assert describe("P0171") == "System Too Lean (Bank 1)"
    assert describe("U0100")  # not in the table: python-OBD's table or a generic text
    assert "manufacturer-specific" in describe("B1FFF")


# -- DtcTracker ----------------------------------------------------------------------------------


def test_tracker_reports_changes_only():
    events = Events()
    tracker = DtcTracker(events, clock=lambda: 1_700_000_000_000)
    assert tracker.update(DtcReading(stored=[], pending=[], permanent=[], mil=False)) is not None
    assert len(events) == 0  # nothing to report at start
    assert tracker.update(DtcReading()) is None  # no answer at all
    tracker.update(DtcReading(stored=["P0301"], pending=[], permanent=None, mil=True))
    assert len(events) == 1
    assert events.last["codes"] == [{"code": "P0301", "state": "stored",
                                     "desc": "Cylinder 1 Misfire Detected"}]
    assert events.last["mil"] is True and events.last["ts"] == 1_700_000_000_000
    tracker.update(DtcReading(stored=["P0301"], pending=[], permanent=None, mil=True))
    tracker.update(DtcReading(stored=None, pending=None, permanent=None, mil=True))  # partial
    assert len(events) == 1
    tracker.update(DtcReading(stored=["P0301"], pending=["P0171"], permanent=[], mil=True))
    assert len(events) == 2 and codes_of(events.last) == {("P0301", "stored"),
                                                          ("P0171", "pending")}
    tracker.update(DtcReading(stored=[], pending=[], permanent=[], mil=False))
    assert len(events) == 3 and events.last["codes"] == [] and events.last["mil"] is False


def test_tracker_with_a_store_survives_restarts_and_retries_a_failed_report(tmp_path):
    store = Store(tmp_path / "agent.db")
    try:
        events = Events()
        DtcTracker(events, store=store).update(DtcReading(stored=["P0420"], mil=True))
        assert len(events) == 1
        again = DtcTracker(events, store=store)  # a restart with the same codes: nothing new
        again.update(DtcReading(stored=["P0420"], pending=[], permanent=[], mil=True))
        assert len(events) == 1
        calls = []

        def broken(body):
            calls.append(body)
            raise RuntimeError("sink down")

        restarted = DtcTracker(broken, store=store)  # codes cleared while the agent was off
        restarted.update(DtcReading(stored=[], pending=[], permanent=[], mil=False))
        restarted._on_dtc = events
        restarted.update(DtcReading(stored=[], pending=[], permanent=[], mil=False))
        assert len(calls) == 1 and len(events) == 2 and events.last["codes"] == []
        assert len(events.bodies) == 2
    finally:
        store.close()


# -- against the emulator ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def emu():
    with ElmEmulator("car") as e:
        yield e


@pytest.fixture
def clean(emu):
    emu.set_dtcs()
    emu.set_freeze_frame(None)
    yield emu
    emu.set_dtcs()
    emu.set_freeze_frame(None)


def test_reader_reads_codes_status_and_freeze_frame(emu, clean):
    reader = ObdReader(emu.port, protocol="6")
    assert reader.connect(), reader.last_error
    try:
        status = reader.read_status()
        assert status["mil"] is False and status["dtc_count"] == 0
        assert "MISFIRE_MONITORING" in status["monitors"]
        assert reader.read_freeze_frame() is None  # frame 00 holds code 0000: none
        emu.set_dtcs(stored=["P0301"], pending=["P0171"], permanent=["P0301"])
        emu.set_freeze_frame("P0301", {"DTC_RPM": "1A F8", "DTC_SPEED": "32",
                                       "DTC_COOLANT_TEMP": "5A"})
        reading = reader.read_dtc_reading(freeze=True)
        assert (reading.stored, reading.pending, reading.permanent) == (
            ["P0301"], ["P0171"], ["P0301"])
        assert reading.mil is True
        assert reading.freeze == {"code": "P0301", "values": {
            "RPM": {"value": 1726.0, "unit": "rpm"}, "SPEED": {"value": 50.0, "unit": "km/h"},
            "COOLANT_TEMP": {"value": 50.0, "unit": "degC"}}}
        assert reader.read_dtcs("GET_PERMANENT_DTC") == ["P0301"]
        assert reader.clear_dtcs() is True
        assert reader.read_dtcs() == [] and reader.read_status()["mil"] is False
    finally:
        reader.close()


def test_no_data_is_not_read_as_no_codes(emu, clean):
    reader = ObdReader(emu.port, protocol="6")
    assert reader.connect(), reader.last_error
    try:
        emu.set_dtcs(stored=["P0420"])
        for text in ("NO DATA", "CAN ERROR", "STOPPED"):
            for name in MODE_03_ENTRIES:
                emu.set_answer_xml(name, f"<writeln>{text}</writeln>")
            try:
                assert reader.read_dtcs() is None, text
                assert text in reader.last_error
            finally:
                for name in MODE_03_ENTRIES:
                    emu.clear_answer(name)
        assert reader.read_dtcs() == ["P0420"]
    finally:
        reader.close()


def test_poller_reports_injected_and_cleared_codes(emu, clean):
    events = Events()
    sink = Collector()
    poller = ObdPoller(emu.port, [{"name": "engine.rpm", "pid": "RPM", "period_s": 0.2}], sink,
                       protocol="6", on_dtc=events, dtc_period_s=0.3)
    poller.start()
    try:
        wait_until(lambda: poller.status()["dtc_reads"] >= 2, what="two DTC polls")
        assert len(events) == 0  # a clean car at start: nothing to report
        emu.set_freeze_frame("P0301", {"DTC_RPM": "1A F8"})
        emu.set_dtcs(stored=["P0301", "P0420"], pending=["P0171"], permanent=["P0420"])
        wait_until(lambda: len(events) >= 1, what="a dtc event")
        body = events.last
        assert codes_of(body) == {("P0301", "stored"), ("P0420", "stored"),
                                  ("P0171", "pending"), ("P0420", "permanent")}
        descs = {c["code"]: c["desc"] for c in body["codes"]}
        assert descs["P0301"] == "Cylinder 1 Misfire Detected"
        assert descs["P0171"] == "System Too Lean (Bank 1)"
        assert body["mil"] is True
        assert body["freeze"] == {"code": "P0301",
                                  "values": {"RPM": {"value": 1726.0, "unit": "rpm"}}}
        assert set(body["monitors"]) >= {"MISFIRE_MONITORING", "CATALYST_MONITORING"}
        n = len(events)
        wait_until(lambda: poller.status()["dtc_reads"] >= 6, what="more DTC polls")
        assert len(events) == n  # unchanged set: no new event

        emu.set_dtcs()  # the codes go away (repaired, or cleared by a workshop tool)
        wait_until(lambda: len(events) > n, what="the event for the cleared codes")
        assert events.last["codes"] == [] and events.last["mil"] is False
        assert "freeze" not in events.last
        assert sink.count("engine.rpm") > 0  # PIDs kept flowing between DTC polls
    finally:
        assert poller.stop(30)


def test_read_dtcs_now_and_clear_dtcs_run_on_the_poller_thread(emu, clean):
    events = Events()
    poller = ObdPoller(emu.port, [], Collector(), protocol="6", on_dtc=events,
                       dtc_period_s=3600)
    assert poller.read_dtcs_now(1) is None  # not running
    poller.start()
    try:
        wait_until(lambda: poller.status()["connected"], what="connected")
        body = poller.read_dtcs_now(30)
        assert body is not None and body["type"] == "dtc" and body["codes"] == []
        schemas.validate("event", body)
        emu.set_dtcs(stored=["P0300"])
        body = poller.read_dtcs_now(30)
        assert codes_of(body) == {("P0300", "stored")} and body["mil"] is True
        assert events.last == body  # the change was reported too
        cleared = poller.clear_dtcs(30)
        assert cleared == ["P0300"]
        assert events.last["codes"] == [] and events.last["mil"] is False
        assert poller.read_dtcs_now(30)["codes"] == []
    finally:
        assert poller.stop(30)
    assert poller.read_dtcs_now(1) is None and poller.clear_dtcs(1) is None


def test_apply_config_reports_unknown_and_unsupported_pids(emu, clean):
    poller = ObdPoller(emu.port, [], Collector(), protocol="6", dtc_period_s=60)
    doc = {"version": 3, "upload": {"interval_s": 5}, "can": {"signals": []},
           "obd": {"pids": [{"name": "engine.rpm", "pid": "RPM", "period_s": 0.5},
                            {"name": "x.bogus", "pid": "NOT_A_PID", "period_s": 1},
                            {"name": "fuel.rate", "pid": "FUEL_RATE", "period_s": 1}],
                   "dtc_period_s": 5}}
    poller.start()
    try:
        before = poller.apply_config(doc)  # before the first connect: support not known yet
        assert before == ["obd.pids: unknown PID 'NOT_A_PID'"]
        wait_until(lambda: poller.status()["connected"], what="connected")
        problems = poller.apply_config(doc)
        assert "obd.pids: unknown PID 'NOT_A_PID'" in problems
        assert any("FUEL_RATE" in p and "not supported" in p for p in problems)
        assert len(problems) == 2
        wait_until(lambda: poller.status()["polling"] == ["RPM"], what="RPM polled")
        assert poller.status()["dtc_period_s"] == 5.0
        bad = poller.apply_config({"obd": {"pids": [], "dtc_period_s": -1}})
        assert bad == ["obd.dtc_period_s: bad value -1; DTC period unchanged"]
        assert poller.status()["dtc_period_s"] == 5.0
        assert poller.apply_config({}) != []
    finally:
        assert poller.stop(30)
