"""Multi-PID mode 01 requests (drivers/obd/multi.py, ObdReader.read_pids) against the real
ELM327-emulator on a pty.

The emulator answers multi-PID requests itself (``Elm.multi_pid_answer``: one ISO-TP answer with
every supported PID) and answers ``?`` to a multi-PID request carrying the ELM327 response-count
hint; ``ElmEmulator.set_multi_pid("first"|"none")`` makes it behave like ECUs that take one PID
per request. A ``PtyRelay`` (no delay) between reader and emulator records the request lines, so
the tests see what went over the link.
"""
from __future__ import annotations

import random
import re
import threading

import obd as python_obd
import pytest
from elm.obd_message import ObdMessage  # test peer only (CC BY-NC-SA), never in agent/drivers

from drivers.core.backoff import Backoff
from agent.vehicle.obd import ObdPoller
from drivers.obd.reader import ObdReader
from drivers.obd.multi import MAX_PIDS_PER_REQUEST, MultiPidCommand, answers_to, split_message
from scripts.vehicle_sim.elm_emulator import ElmEmulator
from scripts.vehicle_sim.pty_relay import PtyRelay
from scripts.testbed.wait import wait_until
from tests.test_obd import Collector

pytestmark = pytest.mark.timeout(120)

SIX = ["RPM", "SPEED", "COOLANT_TEMP", "ENGINE_LOAD", "THROTTLE_POS", "INTAKE_TEMP"]
# SAE J1979 formulas, independent of python-OBD
DECODE = {
    "RPM": lambda d: (d[0] * 256 + d[1]) / 4,
    "SPEED": lambda d: float(d[0]),
    "COOLANT_TEMP": lambda d: float(d[0] - 40),
    "ENGINE_LOAD": lambda d: d[0] * 100 / 255,
    "THROTTLE_POS": lambda d: d[0] * 100 / 255,
    "INTAKE_TEMP": lambda d: float(d[0] - 40),
}
FIXED = {"RPM": "1A F8", "SPEED": "32", "COOLANT_TEMP": "5A", "ENGINE_LOAD": "80",
         "THROTTLE_POS": "33", "INTAKE_TEMP": "3C"}
PID_HEX = {n: python_obd.commands[n].command[2:].decode() for n in SIX}


def scenario_data(pid: str) -> list[bytes]:
    """The data bytes (after ``41 <pid>``) of each answer the 'car' scenario lists for ``pid``."""
    response = ObdMessage["car"][pid]["Response"]
    answers = response if isinstance(response, (list, tuple)) else [response]
    return [bytes.fromhex(re.search("<data>(.*?)</data>", a).group(1))[2:] for a in answers]


def obd_requests(relay: PtyRelay) -> list[str]:
    return [line.decode() for line in relay.lines if re.fullmatch(rb"0[0-9A-F]+", line)]


@pytest.fixture(scope="module")
def emu():
    with ElmEmulator("car") as e:
        yield e


@pytest.fixture(scope="module")
def relay(emu):
    with PtyRelay(emu.pty, delay_s=0.0) as r:
        yield r


@pytest.fixture
def reader(relay, emu):
    emu.set_multi_pid("full")
    r = ObdReader(relay.port, protocol="6", timeout_s=2.0)
    assert r.connect(), r.last_error
    yield r
    r.close()
    emu.set_multi_pid("full")


@pytest.fixture
def fixed_answers(emu):
    for name, data in FIXED.items():
        emu.set_answer(name, f"41 {PID_HEX[name]} {data}")
    yield {n: DECODE[n](bytes.fromhex(d)) for n, d in FIXED.items()}
    for name in FIXED:
        emu.clear_answer(name)


# -- the command itself --------------------------------------------------------------------------


def test_multi_pid_command_builds_the_request():
    cmds = [python_obd.commands[n] for n in ("RPM", "SPEED", "COOLANT_TEMP")]
    assert MultiPidCommand(cmds).command == b"010C0D05"
    assert MultiPidCommand(cmds, count_hint=2).command == b"010C0D052"
    assert MultiPidCommand(cmds, count_hint=12).command == b"010C0D05C"
    with pytest.raises(ValueError):
        MultiPidCommand([python_obd.commands[n] for n in SIX + ["MAF"]])  # 7 > 6
    with pytest.raises(ValueError):
        MultiPidCommand([python_obd.commands.RPM, python_obd.commands.GET_DTC])  # not mode 01
    with pytest.raises(ValueError):
        MultiPidCommand([python_obd.commands.RPM, python_obd.commands.RPM])
    with pytest.raises(ValueError):
        MultiPidCommand(cmds, count_hint=16)
    assert MAX_PIDS_PER_REQUEST == 6


def test_split_stops_at_a_pid_not_asked_for_and_at_short_data():
    from obd.protocols.protocol import Message
    m = Message([])
    m.data = bytearray.fromhex("410C1AF80D32" "11" "80")  # PID 11 was not asked for
    parts = split_message(m, [python_obd.commands.RPM, python_obd.commands.SPEED])
    assert {k: bytes(v.data).hex() for k, v in parts.items()} == {"RPM": "410c1af8",
                                                                  "SPEED": "410d32"}
    m.data = bytearray.fromhex("410C1AF80D")  # SPEED's byte missing
    assert list(split_message(m, [python_obd.commands.RPM, python_obd.commands.SPEED])) == ["RPM"]


# -- against the emulator ------------------------------------------------------------------------


def test_six_pids_in_one_request_equal_six_single_requests(reader, relay, fixed_answers):
    before = len(obd_requests(relay))
    multi = reader.read_pids(SIX)
    sent = obd_requests(relay)[before:]
    assert sent == ["010C0D050411" + "0F"]  # one request for all six
    singles = {n: reader.query(n) for n in SIX}
    assert multi == singles
    assert {n: v for n, (v, _) in multi.items()} == pytest.approx(fixed_answers)
    assert multi["RPM"] == (1726.0, "rpm") and multi["SPEED"] == (50.0, "km/h")
    assert reader.multi_pid is True


def test_multi_pid_values_follow_the_scenario(reader, emu):
    # no overrides: the emulator serves each PID's list of answers in sequence, also inside a
    # multi-PID answer, so its counters say which answer each PID gets next
    for _ in range(3):
        served = {n: emu.request_count(n) for n in SIX}
        values = reader.read_pids(SIX)
        assert set(values) == set(SIX)
        for name in SIX:
            data = scenario_data(name)
            expected = DECODE[name](data[served[name] % len(data)])
            assert values[name][0] == pytest.approx(expected), name
            assert emu.request_count(name) == served[name] + 1


def test_count_hint_refused_by_the_emulator_falls_back_without_losing_answers(
        reader, relay, fixed_answers):
    for _ in range(3):
        assert set(reader.read_pids(["RPM", "SPEED"])) == {"RPM", "SPEED"}
    sent = [r for r in obd_requests(relay) if r.startswith("010C0D")]
    assert sent[-3:] == ["010C0D1", "010C0D", "010C0D"]  # hinted once, refused ('?'), dropped
    assert reader.count_hint is False and reader.multi_pid is True


@pytest.mark.parametrize("mode", ["first", "none"])
def test_vehicle_without_multi_pid_falls_back_to_one_pid_per_request(
        reader, relay, emu, fixed_answers, mode):
    emu.set_multi_pid(mode)
    for _ in range(4):
        values = reader.read_pids(SIX)
        assert {n: v for n, (v, _) in values.items()} == pytest.approx(fixed_answers)
    assert reader.multi_pid is False and reader.multi_mode == "single"
    assert len(set(reader.single_pids) & set(SIX)) >= 5  # "first": the first PID never left out
    before = len(obd_requests(relay))
    reader.read_pids(SIX)
    sent = obd_requests(relay)[before:]
    assert len(sent) == 6 and all(re.fullmatch("01[0-9A-F]{2}[1-9A-F]?", r) for r in sent), sent


def test_poller_groups_due_pids_and_survives_dropped_characters(relay, fixed_answers):
    """Answers with characters dropped (hex digits, spaces, the prompt) never stop the poller
    and never turn into wrong values."""
    rng = random.Random(7)
    droppable = set(b"0123456789ABCDEF >")
    lossy_now = threading.Event()  # after bring-up: python-OBD's connect has 10 s timeouts

    def drop_some(data: bytes) -> bytes:
        if lossy_now.is_set() and rng.random() < 0.25:
            spots = [i for i, b in enumerate(data) if b in droppable]
            if spots:
                i = rng.choice(spots)
                return data[:i] + data[i + 1:]
        return data

    relay.mangle = drop_some  # the module's relay: one reader of the emulator's pty at a time
    try:
        sink = Collector()
        config = [{"name": f"x.{n.lower()}", "pid": n, "period_s": 0.05} for n in SIX]
        poller = ObdPoller(relay.port, config, sink, protocol="6", timeout_s=0.3,
                           dtc_period_s=None, backoff=Backoff(0.05, 0.2), fail_limit=10)
        poller.start()
        try:
            wait_until(lambda: poller.status()["samples"] > 0, what="the first samples")
            lossy_now.set()
            wait_until(lambda: all(sink.count(f"x.{n.lower()}") >= 10 for n in SIX), timeout=90,
                     what="10 samples of every PID over the lossy link")
            status = poller.status()
            assert status["running"]
        finally:
            assert poller.stop(30)
    finally:
        relay.mangle = None
    assert status["errors"] >= 1 and status["last_error"]
    for s in sink.samples:
        name = s.name.split(".", 1)[1].upper()
        assert s.value == pytest.approx(fixed_answers[name]), s
    assert status["requests"] < status["samples"]  # several PIDs per request


def test_answer_checks_reject_late_answers_and_name_adapter_errors(reader, emu):
    emu.set_answer("SPEED", "41 0C 1A F8")  # an RPM answer where SPEED's should be
    try:
        assert reader.query("SPEED") is None
        assert "no matching answer" in reader.last_error
    finally:
        emu.clear_answer("SPEED")
    for text in ("CAN ERROR", "BUS INIT: ...ERROR", "STOPPED", "?"):
        emu.set_answer_xml("RPM", f"<writeln>{text}</writeln>")
        try:
            assert reader.read_pids(["RPM"]) == {}
            assert text in reader.last_error
        finally:
            emu.clear_answer("RPM")
    assert reader.connected and reader.query("RPM") is not None
    assert answers_to(python_obd.commands.RPM, []) == []
