"""python-OBD's internals that drivers/obd/elm327.py relies on, checked on the installed library
and used for real through the adapter against the ELM327-emulator on a pty.

requirements.txt bounds python-OBD to 0.7.x for these; when an upgrade (or a bound moved by
hand) changes any of them, these tests fail naming the version and what is missing, before a
car does.
"""
from __future__ import annotations

import re

import obd
import pytest

from drivers.elm_isotp import PythonObdLines
from drivers.obd import elm327
from drivers.obd import port as obd_port
from scripts.vehicle_sim.elm_emulator import ElmEmulator

pytestmark = pytest.mark.timeout(120)

# name-mangled attributes, spelled out here as the library defines them
PROTOCOL, SEND = "_ELM327__protocol", "_ELM327__send"


def fail_on_gaps(gaps: list[str]) -> None:
    if gaps:
        pytest.fail(f"python-OBD {elm327.VERSION} (installed at {obd.__file__}) lacks what "
                    "drivers/obd/elm327.py uses:\n  - " + "\n  - ".join(gaps)
                    + "\nAdapt drivers/obd/elm327.py (and the bound in requirements.txt) before "
                    "taking this python-OBD.", pytrace=False)


def test_installed_python_obd_has_what_the_adapter_needs():
    assert elm327.VERSION == obd.__version__
    fail_on_gaps(elm327.missing())


def test_the_check_names_what_a_python_obd_release_took_away(monkeypatch):
    # the check itself must be able to fail: take the attributes away from the real class
    monkeypatch.delattr(elm327.ELM327, SEND)
    monkeypatch.delattr(elm327.ELM327, "send_and_parse")
    gaps = elm327.missing()
    assert f"obd.elm327.ELM327.{SEND} (method)" in gaps
    assert "obd.elm327.ELM327.send_and_parse (method)" in gaps


@pytest.fixture(scope="module")
def conn():
    with ElmEmulator("car") as emu:
        c = obd.OBD(emu.port, fast=False, timeout=2.0)
        try:
            assert c.status() == obd.OBDStatus.CAR_CONNECTED, c.status()
            yield c
        finally:
            c.close()


def test_a_real_connection_has_what_the_adapter_needs(conn):
    fail_on_gaps(elm327.missing(conn))


def test_line_parser_turns_answer_lines_into_messages(conn):
    parse = elm327.line_parser(conn)
    messages = parse(["7E8 04 41 0C 1A F8"])
    assert len(messages) == 1 and bytes(messages[0].data) == bytes.fromhex("410C1AF8")
    assert obd.commands.RPM(messages).value.magnitude == 0x1AF8 / 4
    # a status line becomes a message without data, as in python-OBD's send_and_parse
    text = parse(["NO DATA"])
    assert len(text) == 1 and not text[0].parsed() and text[0].raw() == "NO DATA"


def test_line_parser_missing_is_reported_not_raised(conn, monkeypatch):
    monkeypatch.delattr(conn.interface, PROTOCOL)
    with pytest.raises(AttributeError):
        elm327.line_parser(conn)
    assert (f"obd.elm327.ELM327 instance attribute {PROTOCOL} (the protocol's line parser)"
            in elm327.missing(conn))


def test_python_obd_opens_its_port_through_drivers_obd_port():
    # drivers/obd/port.py relies on python-OBD opening the port with serial.serial_for_url
    with ElmEmulator("car") as emu:
        slot = obd_port.open_url(emu.pty)
        c = obd.OBD(slot.url, protocol="6", fast=False)
        try:
            assert c.status() == obd.OBDStatus.CAR_CONNECTED
            assert isinstance(slot.port, obd_port.ObdSerial) and slot.port.port == emu.pty
        finally:
            c.close()
            slot.release()


def test_send_and_parse_answers_an_at_command(conn):
    lines = [m.raw() for m in elm327.send_and_parse(conn, b"ATAT1")]
    assert lines == ["OK"]
    volts = [m.raw() for m in elm327.send_and_parse(conn, b"ATRV")]
    assert len(volts) == 1 and re.fullmatch(r"\d+(\.\d+)?V", volts[0]), volts


def test_line_sender_returns_the_adapters_unparsed_lines(conn):
    send = elm327.line_sender(conn)
    banner = send(b"ATI")
    assert any("ELM327" in line for line in banner), banner
    # headers are on (python-OBD's ATH1): a CAN answer line starts with the ECU's id
    rpm = [line for line in send(b"010C") if line.strip()]
    assert rpm and all(re.match(r"7E[89A-F]", line.replace(" ", "")) for line in rpm), rpm
    assert any("410C" in line.replace(" ", "") for line in rpm), rpm
    # and python-OBD still answers normally afterwards
    assert not conn.query(obd.commands.RPM).is_null()


def test_elm_isotp_borrows_the_connection_through_the_adapter(conn):
    lines = PythonObdLines(conn).command("ATI", 2.0)
    assert lines and any("ELM327" in line for line in lines), lines


def test_message_like_is_decoded_by_python_obd(conn):
    real = conn.query(obd.commands.RPM, force=True).messages[0]
    copy = elm327.message_like(real, b"\x41\x0c\x1a\xf8")
    assert copy.frames is real.frames and copy.ecu == real.ecu
    assert obd.commands.RPM([copy]).value.magnitude == 0x1AF8 / 4
