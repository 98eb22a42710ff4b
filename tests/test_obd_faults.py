"""OBD must not go quiet on its own (issue 20 items 3 and 4), through the real path: the
ELM327-emulator on a pty, behind scripts/vehicle_sim/pty_relay.py, whose ``intercept`` plays a bad
adapter or a bad spell of the car (it answers chosen command lines itself, the rest reach the
emulator). Emulator answers are also changed through its own interpreter (``set_answer_xml``).

- every ELM327 status line gets the handling drivers/obd/elm_lines.py's table gives it;
- after a spell of odd answers the poller recovers its samples and still stops within its
  timeout; a connect or a query that hangs on a silent adapter is ended by ``stop``;
- a bad spell while the supported-PID bitmaps are asked (at a reconnect) never silences a PID:
  unanswered bitmaps leave support unknown, wrong ones are asked again with backoff;
- no PID answering while the poller is not held is a fault in ``status`` and a ``health`` event;
- multi-PID falls back per PID, comes back after a backoff, and ignores transient errors.
"""
from __future__ import annotations

import re
import threading
import time

import obd as python_obd
import pytest

from agent.cloud import schemas
from agent.vehicle.obd import FAULT_KIND, ObdPoller
from drivers.core.backoff import Backoff
from drivers.obd import elm_lines
from drivers.obd.reader import MULTI_MISS_LIMIT, SOLO_MIN_S, ObdReader
from scripts.testbed.wait import wait_until
from scripts.vehicle_sim.pty_relay import PtyRelay
from tests.test_obd import Collector, pollers  # noqa: F401 - pollers is a fixture
from tests.test_obd_multi import emu, relay  # noqa: F401 - module-scoped fixtures

pytestmark = pytest.mark.timeout(180)

HEX_REQUEST = re.compile(rb"[0-9A-F]+")  # any OBD request (AT commands are not hex)
RPM_REQUEST = re.compile(rb"010C[0-9A-F]?")  # RPM alone, with or without the count hint
MULTI_REQUEST = re.compile(rb"01([0-9A-F]{2}){2,6}[0-9A-F]?")
BITMAPS = ("ELM_PIDS_A", "ELM_PIDS_B", "ELM_PIDS_C")
SIX = ["RPM", "SPEED", "COOLANT_TEMP", "ENGINE_LOAD", "THROTTLE_POS", "INTAKE_TEMP"]


class Spell:
    """A relay ``intercept``: while on, answers the command lines ``match`` fits with ``answer``
    (bytes, or a function of the line), and counts them."""

    def __init__(self, answer, match: re.Pattern = HEX_REQUEST, *, on: bool = False,
                 limit: int | None = None):
        self.answer = answer
        self.match = match
        self.on = threading.Event()
        if on:
            self.on.set()
        self.limit = limit
        self.hits = 0

    def __call__(self, line: bytes) -> bytes | None:
        if not self.on.is_set() or not self.match.fullmatch(line):
            return None
        if self.limit is not None and self.hits >= self.limit:
            return None
        self.hits += 1
        return self.answer(line) if callable(self.answer) else self.answer


def elm(text: str) -> bytes:
    """An adapter answer: the line(s) and the prompt, as python-OBD has the adapter set
    (echo off, line feeds off)."""
    return text.encode("latin-1").replace(b"\n", b"\r") + b"\r\r>"


@pytest.fixture(autouse=True)
def clean(emu, relay):
    yield
    relay.intercept = None
    for name in BITMAPS + ("RPM",):
        emu.clear_answer(name)
    emu.set_multi_pid("full")


@pytest.fixture
def reader(relay):
    r = ObdReader(relay.port, protocol="6", timeout_s=1.0)
    assert r.connect(), r.last_error
    yield r
    r.close()


def poller_on(relay, pollers, pids=("RPM",), **kw) -> tuple[ObdPoller, Collector]:
    sink = Collector()
    config = [{"name": f"x.{p.lower()}", "pid": p, "period_s": kw.pop("period_s", 0.1)}
              for p in pids]
    kw.setdefault("backoff", Backoff(0.05, 0.3))
    kw.setdefault("dtc_period_s", None)
    kw.setdefault("timeout_s", 1.0)
    poller = ObdPoller(relay.port, config, sink, protocol="6", **kw)
    pollers.append(poller)
    poller.start()
    return poller, sink


# -- the table, line by line, through the reader -------------------------------------------------

# one answer per table entry (the line as an adapter prints it), and negative / garbled answers
CASES = [(e.prefix if e.prefix not in ("ERR", "ELM327", "BUS INIT") else
          {"ERR": "ERR94", "ELM327": "ELM327 v1.5", "BUS INIT": "BUS INIT: ...ERROR"}[e.prefix],
          e.handling) for e in elm_lines.TABLE if e.handling != elm_lines.INFO]
CASES += [("7E8 03 7F 01 12", elm_lines.REFUSED), ("7E8 03 7F 01 31", elm_lines.REFUSED),
          ("7E8 03 7F 01 78", elm_lines.RETRY), ("7E8 04 41 0C 1A F8 <DATA ERROR", elm_lines.RETRY),
          ("7E8 04 41 0C 1G F8", elm_lines.RETRY), ("7E8 04 41 0C 1A", elm_lines.RETRY),
          ("\x00\xfe\x80", elm_lines.RETRY), ("7E8 04 41 0D 32", elm_lines.RETRY)]


@pytest.mark.parametrize("text,handling", CASES, ids=[c[0] for c in CASES])
def test_every_status_line_gets_the_tables_handling(reader, relay, text, handling):
    relay.intercept = Spell(elm(text), RPM_REQUEST, on=True)
    assert reader.read_pids(["RPM"]) == {}
    assert reader.outcome == handling, reader.last_error
    assert reader.needs_reconnect is (handling == elm_lines.RECONNECT)
    if elm_lines.lookup(text) is not elm_lines.lookup("not a status line"):
        assert text in reader.last_error  # named in the error, with its meaning
    if handling == elm_lines.REFUSED:
        assert "negative response" in reader.last_error
    relay.intercept = None
    if handling != elm_lines.RECONNECT:  # the same connection goes on
        assert reader.read_pids(["RPM"])["RPM"][1] == "rpm"


@pytest.mark.parametrize("text", ["SEARCHING...\n7E8 04 41 0C 1A F8", "7E8 04 41 0C 1A F8\nOK",
                                  ">7E8 04 41 0C 1A F8", "7E8 04 41 0C 1A F8\n7E9 03 7F 01 12",
                                  "BUS INIT: ...OK\n7E8 04 41 0C 1A F8"])
def test_progress_lines_stray_prompts_and_other_ecus_keep_the_data(reader, relay, text):
    relay.intercept = Spell(elm(text), RPM_REQUEST, on=True)
    assert reader.read_pids(["RPM"]) == {"RPM": (1726.0, "rpm")}
    assert reader.outcome is None and not reader.needs_reconnect


# -- the poller after a spell of odd lines -------------------------------------------------------

ODD = ["UNABLE TO CONNECT", "CAN ERROR", "STOPPED", "7E8 04 41 0C 1A F8 <DATA ERROR",
       "7E8 03 7F 01 12", "7E8 04 41 0C 1G F8", "BUFFER FULL", "7E8 04 41>\n0C 1A F8",
       "NO DATA", "BUS INIT: ...ERROR", "7E8 06 41 00 BE"]


@pytest.mark.parametrize("text", ODD)
def test_poller_recovers_after_a_spell_of_odd_lines_and_stops_in_time(relay, pollers, text):
    """Every OBD request, bitmaps and trouble codes included, gets ``text`` for a spell long
    enough for reconnects (fail_limit) to happen during it; then the car answers again."""
    poller, sink = poller_on(relay, pollers, ("RPM", "SPEED"), fail_limit=3,
                             dtc_period_s=0.5, probe_backoff=Backoff(0.1, 0.5))
    wait_until(lambda: sink.count("x.rpm") >= 3, what="samples before the spell")
    spell = Spell(elm(text))
    relay.intercept = spell
    spell.on.set()
    # long enough for a reconnect during the spell (where the line makes the poller reconnect)
    wait_until(lambda: spell.hits >= 10 or poller.status()["attempts"] >= 3, timeout=60,
               what="10 requests answered with the odd line")
    attempts = poller.status()["attempts"]
    spell.on.clear()
    before = sink.count("x.rpm")
    wait_until(lambda: sink.count("x.rpm") >= before + 5 and sink.count("x.speed") >= 8,
               timeout=60, what=f"samples again after {text!r}")
    status = poller.status()
    assert status["connected"] and status["polling"] == ["RPM", "SPEED"]
    assert status["unsupported_pids"] == []
    handling = elm_lines.classify(text.split("\n")).handling
    if handling == elm_lines.RECONNECT:
        assert status["attempts"] > 1
    elif handling == elm_lines.REFUSED:  # the car answers: no reason to reconnect
        assert status["attempts"] == attempts == 1
    started = time.monotonic()
    assert poller.stop(5)
    assert time.monotonic() - started < 5


def test_stop_ends_a_connect_hanging_on_a_silent_adapter(relay, pollers):
    # python-OBD reads each answer with a 10 s timeout and again for a second: a silent adapter
    # held one connect for minutes, and stop() timed out
    relay.intercept = Spell(b"", re.compile(rb".*"), on=True)
    poller, _ = poller_on(relay, pollers)
    wait_until(lambda: relay.intercept.hits >= 1, what="the connect to start")
    started = time.monotonic()
    assert poller.stop(3)
    assert time.monotonic() - started < 3
    assert not poller.status()["running"]


def test_stop_ends_a_query_hanging_on_an_adapter_gone_silent(relay, pollers):
    poller, sink = poller_on(relay, pollers, timeout_s=5.0)
    wait_until(lambda: sink.count("x.rpm") >= 2, what="samples")
    spell = Spell(b"", on=True)  # a prompt never comes
    relay.intercept = spell
    wait_until(lambda: spell.hits >= 1, what="a request to hang")
    started = time.monotonic()
    assert poller.stop(3)
    assert time.monotonic() - started < 3


# -- supported PIDs: a bad spell while they are asked --------------------------------------------

@pytest.mark.parametrize("text", ["NO DATA", "BUS INIT: ...ERROR", "7E8 06 41 00 BE",
                                  "CAN ERROR"])
def test_bitmaps_unanswered_at_connect_leave_support_unknown_not_denied(
        emu, relay, pollers, text):
    for name in BITMAPS:
        emu.set_answer_xml(name, f"<writeln>{text}</writeln>")
    poller, sink = poller_on(relay, pollers, probe_backoff=Backoff(0.2, 0.5))
    wait_until(lambda: sink.count("x.rpm") >= 5, what="RPM polled though no bitmap answered")
    status = poller.status()
    assert status["supported_known"] is False and status["unverified_pids"] == ["RPM"]
    assert status["unsupported_pids"] == [] and status["connects"] == 1
    for name in BITMAPS:
        emu.clear_answer(name)
    wait_until(lambda: poller.status()["supported_known"] is True, what="bitmaps asked again")
    status = poller.status()
    assert status["unverified_pids"] == [] and status["reprobe_in_s"] is None
    assert status["probes"] >= 1


def test_a_wrong_bitmap_is_asked_again_with_backoff(emu, relay, pollers):
    # a bitmap that answers but says "nothing supported" (an ECU waking up does that)
    emu.set_answer("ELM_PIDS_A", "41 00 00 00 00 00")
    poller, sink = poller_on(relay, pollers, probe_backoff=Backoff(0.2, 0.4))
    wait_until(lambda: poller.status()["unsupported_pids"] == ["RPM"], what="RPM unsupported")
    assert poller.status()["polling"] == [] and poller.status()["reprobe_in_s"] is not None
    wait_until(lambda: poller.status()["probes"] >= 2, what="asked again")
    assert sink.count("x.rpm") == 0
    emu.clear_answer("ELM_PIDS_A")
    wait_until(lambda: sink.count("x.rpm") >= 5, what="RPM after the bitmap said yes")
    assert poller.status()["unsupported_pids"] == [] and poller.status()["connects"] == 1


def test_bitmap_ranges_are_known_one_by_one(emu, relay):
    emu.set_answer_xml("ELM_PIDS_B", "<writeln>NO DATA</writeln>")
    reader = ObdReader(relay.port, protocol="6", timeout_s=1.0)
    assert reader.connect(), reader.last_error
    assert reader.support_known  # 01 00 answered, 01 20 not
    assert reader.support("RPM") is True  # 0x0C, first range
    assert reader.support("FUEL_INJECT_TIMING") is None  # 0x5D: behind the unanswered range
    assert reader.support("DISTANCE_W_MIL") is None  # 0x21
    emu.clear_answer("ELM_PIDS_B")
    assert reader.probe_supported() is True
    assert reader.support("DISTANCE_W_MIL") is True
    assert reader.support("FUEL_RATE") is False  # 0x5E: the car scenario has not got it
    reader.close()


# -- the fault -----------------------------------------------------------------------------------

def test_no_pid_answering_while_awake_is_a_fault_in_status_and_an_event(relay, pollers):
    events: list[dict] = []

    def on_event(body: dict) -> None:
        schemas.validate("event", body)
        events.append(body)

    # silence_s longer than a connect takes (about 2 s here)
    poller, sink = poller_on(relay, pollers, on_event=on_event, silence_s=4.0,
                             dtc_period_s=0.5)
    wait_until(lambda: sink.count("x.rpm") >= 3, what="samples")
    assert poller.status()["fault"] is None and events == []
    spell = Spell(elm("NO DATA"), on=True)
    relay.intercept = spell
    wait_until(lambda: events, what="the fault event")
    warn = events[0]
    assert warn["type"] == "health" and warn["kind"] == FAULT_KIND == "obd_link"
    assert warn["level"] == "warn" and warn["detail"]["state"] == "no_answer"
    assert warn["detail"]["polling"] == ["RPM"] and "NO DATA" in warn["detail"]["last_error"]
    fault = poller.status()["fault"]
    assert fault["cause"] in ("no_answer", "not_connected") and fault["since_ms"] > 0
    spell.on.clear()
    wait_until(lambda: len(events) >= 2, what="the end of the fault")
    assert events[1]["kind"] == FAULT_KIND and events[1]["level"] == "info"
    assert events[1]["detail"]["state"] == "answering"
    assert poller.status()["fault"] is None and poller.status()["faults"] == 1
    # held (the car going to sleep), silence is no fault, and a fault in progress ends
    spell.on.set()
    wait_until(lambda: len(events) >= 3, what="a second fault")
    poller.hold()
    wait_until(lambda: len(events) >= 4, what="the fault ended by the hold")
    assert events[3]["level"] == "info" and events[3]["detail"]["state"] == "held"
    assert poller.status()["fault"] is None and poller.status()["held"]


# -- multi-PID: per PID, with backoff ------------------------------------------------------------

def mark(relay: PtyRelay) -> None:
    relay.lines.clear()


def obd_requests(relay: PtyRelay) -> list[str]:
    """The mode 01 requests since :func:`mark`."""
    return [line.decode() for line in list(relay.lines) if re.fullmatch(rb"01[0-9A-F]+", line)]


def test_multi_pid_falls_back_per_pid_and_comes_back_after_backoff(emu, relay):
    now = [1000.0]
    reader = ObdReader(relay.port, protocol="6", timeout_s=1.0, clock=lambda: now[0])
    assert reader.connect(), reader.last_error
    try:
        assert set(reader.read_pids(SIX)) == set(SIX) and reader.multi_mode == "multi"
        emu.set_multi_pid("first")  # a spell of answers holding only the first PID
        for _ in range(MULTI_MISS_LIMIT):
            assert set(reader.read_pids(SIX)) == set(SIX)  # singles fill in
        assert reader.single_pids == sorted(SIX[1:]) and reader.multi_mode == "single"
        assert reader.multi_pid is False
        emu.set_multi_pid("full")
        mark(relay)
        assert set(reader.read_pids(SIX)) == set(SIX)
        assert len(obd_requests(relay)) == 6  # still one PID per request ...
        now[0] += SOLO_MIN_S + 0.1  # ... until the backoff is over
        mark(relay)
        assert set(reader.read_pids(SIX)) == set(SIX)
        assert len(obd_requests(relay)) == 1
        assert reader.multi_mode == "multi" and reader.single_pids == [] and reader.multi_pid
        assert reader.fallback_s == pytest.approx(SOLO_MIN_S + 0.1)
        # left out again soon: asked alone twice as long
        emu.set_multi_pid("first")
        for _ in range(MULTI_MISS_LIMIT):
            reader.read_pids(SIX)
        assert reader.single_pids == sorted(SIX[1:])
        emu.set_multi_pid("full")
        now[0] += SOLO_MIN_S + 0.1
        mark(relay)
        reader.read_pids(SIX)
        assert len(obd_requests(relay)) == 6
        now[0] += SOLO_MIN_S
        mark(relay)
        reader.read_pids(SIX)
        assert len(obd_requests(relay)) == 1 and reader.multi_mode == "multi"
    finally:
        reader.close()


@pytest.mark.parametrize("text", ["CAN ERROR", "BUFFER FULL", "STOPPED", "7E8 10 0B 41 0C 1A"])
def test_transient_errors_never_switch_multi_pid_off(relay, text):
    # at the start of a connection, before any multi-PID answer was seen
    relay.intercept = Spell(elm(text), MULTI_REQUEST, on=True, limit=2 * MULTI_MISS_LIMIT)
    reader = ObdReader(relay.port, protocol="6", timeout_s=1.0)
    assert reader.connect(), reader.last_error
    try:
        for _ in range(2 * MULTI_MISS_LIMIT):
            reader.read_pids(SIX)
            assert reader.outcome == elm_lines.RETRY, reader.last_error
        mark(relay)
        assert set(reader.read_pids(SIX)) == set(SIX)
        assert len(obd_requests(relay)) == 1
        assert reader.multi_mode == "multi" and reader.single_pids == []
    finally:
        reader.close()


def test_poller_status_shows_the_multi_pid_mode(emu, relay, pollers):
    poller, sink = poller_on(relay, pollers, SIX[:3], period_s=0.05)
    wait_until(lambda: poller.status()["multi_pid_mode"] == "multi", what="multi-PID")
    mark(relay)
    emu.set_multi_pid("first")
    wait_until(lambda: poller.status()["multi_pid_mode"] == "single", what="the fall-back")
    # the emulator answered the first PID of each multi-PID request; the poller orders a request
    # by when its PIDs fell due, so which one led the last request is read from the link
    groups = [r for r in obd_requests(relay) if MULTI_REQUEST.fullmatch(r.encode())]
    by_hex = {python_obd.commands[n].command[2:].decode(): n for n in SIX}
    answered = by_hex[groups[-1][2:4]]
    assert poller.status()["single_pids"] == sorted(set(SIX[:3]) - {answered})
    assert poller.status()["multi_pid"] is False
    n = sink.count("x.speed")
    wait_until(lambda: sink.count("x.speed") >= n + 5, what="samples in the fall-back")


def test_a_silent_ecu_costs_one_request_per_poll_not_seven(reader, relay):
    # the engine stops: NO DATA to everything. A group answered before is not asked again PID
    # by PID (each NO DATA waits out the adapter's timeout on a real car)
    assert set(reader.read_pids(SIX)) == set(SIX)
    relay.intercept = Spell(elm("NO DATA"), on=True)
    mark(relay)
    assert reader.read_pids(SIX) == {} and reader.outcome == elm_lines.NO_DATA
    assert len(obd_requests(relay)) == 1
    assert reader.multi_mode == "multi"  # and no fall-back for it
