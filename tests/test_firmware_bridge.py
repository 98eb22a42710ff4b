"""firmware_bridge: framing and messages (pure), McuLink against the MCU simulator over a real
pty through pyserial, and the port interface that picks one or the other from the settings."""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import random
import re
import struct
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from crccheck.crc import Crc16CcittFalse
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from firmware_bridge import framing, messages as m
from firmware_bridge.framing import CrcError, Deframer, FrameError
from firmware_bridge.link import (
    FirmwareRejected, FirmwareRolledBack, McuLink, McuRejected, McuTimeout)
from firmware_bridge.port import McuError, McuLinkClosed, McuPort, check_spec, make_port
from firmware_bridge.sim import McuSimulator, SimulatedLink, make_image
from scripts.testbed.wait import wait_until

pytestmark = pytest.mark.timeout(120)


# --- framing ----------------------------------------------------------------------------------

def test_crc16_is_ccitt_false() -> None:
    assert framing.crc16(b"123456789") == 0x29B1


@settings(deadline=None)  # no timing: a loaded CI machine is slow
@given(st.binary(max_size=300))
def test_crc16_matches_crccheck(data: bytes) -> None:
    assert framing.crc16(data) == Crc16CcittFalse.calc(data)


_R254 = bytes(range(1, 255))
COBS_VECTORS = [  # Wikipedia "Consistent Overhead Byte Stuffing", encoding examples
    (b"\x00", b"\x01\x01"),
    (b"\x00\x00", b"\x01\x01\x01"),
    (b"\x00\x11\x00", b"\x01\x02\x11\x01"),
    (b"\x11\x22\x00\x33", b"\x03\x11\x22\x02\x33"),
    (b"\x11\x22\x33\x44", b"\x05\x11\x22\x33\x44"),
    (b"\x11\x00\x00\x00", b"\x02\x11\x01\x01\x01"),
    (_R254, b"\xff" + _R254),
    (b"\x00" + _R254, b"\x01\xff" + _R254),
    (bytes(range(1, 256)), b"\xff" + _R254 + b"\x02\xff"),
    (bytes(range(2, 256)) + b"\x00", b"\xff" + bytes(range(2, 256)) + b"\x01\x01"),
    (bytes(range(3, 256)) + b"\x00\x01", b"\xfe" + bytes(range(3, 256)) + b"\x02\x01"),
]


@pytest.mark.parametrize(("raw", "encoded"), COBS_VECTORS)
def test_cobs_known_vectors(raw: bytes, encoded: bytes) -> None:
    assert framing.cobs_encode(raw) == encoded
    assert framing.cobs_decode(encoded) == raw


@settings(deadline=None)  # no timing: a loaded CI machine is slow
@given(st.binary(max_size=1200))
def test_cobs_round_trip_and_no_zero(data: bytes) -> None:
    enc = framing.cobs_encode(data)
    assert 0 not in enc
    assert len(enc) <= len(data) + 1 + len(data) // 254
    assert framing.cobs_decode(enc) == data


@settings(deadline=None)  # no timing: a loaded CI machine is slow
@given(st.binary(min_size=1, max_size=framing.MAX_BODY))
def test_frame_round_trip(body: bytes) -> None:
    wire = framing.encode_frame(body)
    assert wire[0] == 0 and wire[-1] == 0 and 0 not in wire[1:-1]
    assert len(wire) - 2 <= framing.MAX_ENCODED
    assert framing.decode_frame(wire[1:-1]) == body
    assert Deframer().feed(wire) == [body]


@settings(deadline=None)  # no timing: a loaded CI machine is slow
@given(st.binary(max_size=600))
def test_garbage_raises_only_frame_error(garbage: bytes) -> None:
    try:
        framing.decode_frame(garbage)
    except FrameError:
        pass
    Deframer().feed(garbage)  # never raises


@settings(deadline=None)  # no timing: a loaded CI machine is slow
@given(st.lists(st.binary(max_size=400), max_size=8))
def test_deframer_never_raises_and_recovers(chunks: list[bytes]) -> None:
    d = Deframer()
    for c in chunks:
        d.feed(c)
    good = m.encode_packet(7, m.GetIgnition())
    assert d.feed(framing.encode_frame(good)) == [good]


@pytest.mark.parametrize("body", [
    m.encode_packet(1, m.SupplyReading(12600), msg_type=m.MsgType.GET_SUPPLY),
    m.encode_packet(200, m.FwChunk(4096, bytes(range(256))[:m.MAX_CHUNK])),
])
def test_every_single_bit_flip_is_rejected(body: bytes) -> None:
    wire = framing.encode_frame(body)
    for i in range(1, len(wire) - 1):
        for bit in range(8):
            bad = bytearray(wire)
            bad[i] ^= 1 << bit
            d = Deframer()
            assert d.feed(bytes(bad)) == [], (i, bit)
            assert d.bad_frames >= 1
    inner = bytearray(wire[1:-1])
    inner[-1] ^= 0x01 if inner[-1] != 0x01 else 0x02  # corrupt the CRC only
    with pytest.raises(CrcError):
        framing.decode_frame(bytes(inner))


def test_deframer_resyncs_after_garbage_truncation_and_overlong_runs() -> None:
    a, b = b"\x10\x01\x02", b"\x10\x02\x03\xff"
    fa, fb = framing.encode_frame(a), framing.encode_frame(b)
    d = Deframer()
    stream = b"noise\xff\x00" + fa[: len(fa) // 2] + fb + b"\x55" * 1000 + fa + b"\x00\x00" + fb
    # fed in small pieces, as a serial port returns them
    out = [body for i in range(0, len(stream), 7) for body in d.feed(stream[i:i + 7])]
    assert out == [b, a, b]
    assert d.bad_frames == 3  # the noise, the truncated frame, the overlong run


# --- messages ---------------------------------------------------------------------------------

SHA = hashlib.sha256(b"x").digest()
SHA_HEX = "2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881"  # SHA-256 of b"x"
T = m.MsgType

# Every message type as packet bytes (seq 0x2A), captured from the hand-written encoders
# messages.py had before its codec table (commit 2ac5801): the wire format must not move.
WIRE: list[tuple[m.Message, m.MsgType | None, str]] = [
    (m.GetVersion(), None, "102a01"),
    (m.GetIgnition(), None, "102a02"),
    (m.GetSupply(), None, "102a03"),
    (m.GetWakeReason(), None, "102a04"),
    (m.Sleep(3600, 10), None, "102a05100e00000a00"),
    (m.Sleep(0, 0), None, "102a05000000000000"),
    (m.Sleep(0xFFFFFFFF, 0xFFFF), None, "102a05ffffffffffff"),
    (m.KickWatchdog(), None, "102a06"),
    (m.SetWatchdog(30), None, "102a071e00"),
    (m.SetWatchdog(0), None, "102a070000"),
    (m.SetWatchdog(0xFFFF), None, "102a07ffff"),
    (m.SetSupplyReport(5), None, "102a080500"),
    (m.SetSupplyReport(0), None, "102a080000"),
    (m.FwBegin(70000, SHA, bytes(range(64))), None,
     "102a10" "70110100" + SHA_HEX + bytes(range(64)).hex()),
    (m.FwBegin(0xFFFFFFFF, bytes(32), bytes(64)), None, "102a10" "ffffffff" + "00" * 96),
    (m.FwChunk(65536, b"\x00\x01\xff"), None, "102a11000001000001ff"),
    (m.FwChunk(0, b"\x00"), None, "102a110000000000"),
    (m.FwChunk(0xFFFFFFFF, bytes(range(252))), None, "102a11ffffffff" + bytes(range(252)).hex()),
    (m.GetFwStatus(), None, "102a12"),
    (m.FwSwitch(60), None, "102a133c00"),
    (m.FwSwitch(0), None, "102a130000"),
    (m.FwConfirm(SHA), None, "102a14" + SHA_HEX),
    (m.VersionInfo(1, "2.1.0-rc1"), None, "112a0101322e312e302d726331"),
    (m.VersionInfo(0, ""), None, "112a0100"),
    (m.VersionInfo(1, "\u00fc" * 16), None, "112a0101" + "c3bc" * 16),
    (m.IgnitionState(True), None, "112a0201"),
    (m.IgnitionState(False), None, "112a0200"),
    (m.SupplyReading(11870), None, "112a035e2e"),
    (m.SupplyReading(0xFFFF), None, "112a03ffff"),
    *[(m.WakeReasonInfo(r), None, f"112a04{r:02x}") for r in m.WakeReason],
    (m.Ack(), T.SLEEP, "112a05"),
    (m.Ack(), T.FW_CONFIRM, "112a14"),
    (m.FwProgress(1234), T.FW_CHUNK, "112a11d2040000"),
    (m.FwProgress(0), T.FW_BEGIN, "112a1000000000"),
    *[(m.FwStatus(s, s % 2, 70000, 1234, SHA), None,
       f"112a12{s:02x}{s % 2:02x}" "70110100" "d2040000" + SHA_HEX) for s in m.FwState],
    (m.FwStatus(m.FwState.IDLE, 0, 0, 0, bytes(32)), None, "112a12" + "00" * 42),
    *[(m.ErrorReply(c), T.FW_SWITCH, f"122a13{c:02x}") for c in m.ErrorCode],
    (m.ErrorReply(200), T.GET_VERSION, "122a01c8"),  # a newer MCU's code: kept as a number
    (m.IgnitionChanged(False), None, "132a4000"),
    (m.IgnitionChanged(True), None, "132a4001"),
    (m.SupplyVoltage(13.812), None, "132a41f435"),
    (m.SupplyVoltage(0.0), None, "132a410000"),
    (m.SupplyVoltage(65.535), None, "132a41ffff"),
    (m.McuBooted(1, m.FwState.TRIAL, "2.0.0"), None, "132a420103322e302e30"),
    (m.McuBooted(0, m.FwState.ROLLED_BACK, ""), None, "132a420005"),
]


def test_wire_covers_every_message_type() -> None:
    every = {*m.REQUESTS.values(), *m.RESPONSES.values(), *m.EVENTS.values(), m.ErrorReply}
    assert every <= {type(msg) for msg, _, _ in WIRE}


@pytest.mark.parametrize(("msg", "msg_type", "wire"), WIRE, ids=lambda x: type(x).__name__)
def test_message_wire_bytes_and_round_trip(msg: m.Message, msg_type: m.MsgType | None,
                                           wire: str) -> None:
    body = m.encode_packet(0x2A, msg, msg_type=msg_type)
    assert body.hex() == wire
    packet = m.decode_packet(bytes.fromhex(wire))
    assert (packet.kind, packet.seq) == (msg.KIND, 0x2A)
    assert m.parse_message(packet) == msg


# Payload lengths each (kind, type) accepts (zero-filled payloads), captured like WIRE:
# kind, the types, the lengths ("a..b": a to b inclusive). Types not listed take none.
ACCEPTED_LENGTHS = """
REQUEST   GET_VERSION GET_IGNITION GET_SUPPLY GET_WAKE_REASON WDT_KICK FW_STATUS  0
REQUEST   SLEEP                                                                  6
REQUEST   WDT_SET SET_SUPPLY_REPORT FW_SWITCH                                    2
REQUEST   FW_BEGIN                                                               100
REQUEST   FW_CHUNK                                                               5..256
REQUEST   FW_CONFIRM                                                             32
RESPONSE  GET_VERSION                                                            1..33
RESPONSE  GET_IGNITION GET_WAKE_REASON                                           1
RESPONSE  GET_SUPPLY                                                             2
RESPONSE  SLEEP WDT_KICK WDT_SET SET_SUPPLY_REPORT FW_SWITCH FW_CONFIRM          0
RESPONSE  FW_BEGIN FW_CHUNK                                                      4
RESPONSE  FW_STATUS                                                              42
ERROR     *                                                                      1
EVENT     EVT_IGNITION                                                           1
EVENT     EVT_SUPPLY                                                             2
EVENT     EVT_BOOTED                                                             2..34
"""


def _accepted_lengths() -> dict[tuple[m.Kind, m.MsgType], list[int]]:
    table = {}
    for line in ACCEPTED_LENGTHS.strip().splitlines():
        kind, *types, lengths = line.split()
        lo, _, hi = lengths.partition("..")
        for t in m.MsgType if types == ["*"] else [T[name] for name in types]:
            table[m.Kind[kind], t] = list(range(int(lo), int(hi or lo) + 1))
    return table


@pytest.mark.parametrize("kind", list(m.Kind), ids=lambda k: k.name)
def test_parse_accepts_exactly_the_documented_lengths(kind: m.Kind) -> None:
    for t in m.MsgType:
        accepted = []
        for n in range(m.MAX_PAYLOAD + 1):
            try:
                m.parse_message(m.Packet(kind, 1, t, bytes(n)))
            except m.MessageError:
                continue
            accepted.append(n)
        assert accepted == _accepted_lengths().get((kind, t), []), t


def test_encoders_refuse_what_the_wire_cannot_carry() -> None:
    for msg in (m.FwBegin(1, SHA[:31], bytes(64)), m.FwBegin(1, SHA, bytes(63)),
                m.FwChunk(0, b""), m.FwChunk(0, bytes(m.MAX_CHUNK + 1)),
                m.VersionInfo(0, "x" * 33), m.McuBooted(0, m.FwState.IDLE, "\u00fc" * 17)):
        with pytest.raises(ValueError):
            msg.payload()
    for msg in (m.SetWatchdog(0x10000), m.Sleep(-1, 0), m.FwProgress(1 << 32), m.FwSwitch(1.5)):
        with pytest.raises(struct.error):
            msg.payload()
    # volts are clamped to what a u16 of millivolts holds
    assert m.SupplyVoltage(70.0).payload() == b"\xff\xff"
    assert m.SupplyVoltage(-1.0).payload() == b"\x00\x00"


def test_a_message_field_without_a_codec_is_a_declaration_error() -> None:
    @dataclasses.dataclass(frozen=True, slots=True)
    class Untyped(m.Message):
        KIND = m.Kind.REQUEST
        value: int

    @dataclasses.dataclass(frozen=True, slots=True)
    class TailFirst(m.Message):
        KIND = m.Kind.REQUEST
        version: m.Text
        slot: m.U8

    for cls, args in ((Untyped, (1,)), (TailFirst, ("1.0", 0))):
        with pytest.raises(TypeError, match=cls.__name__):
            cls(*args).payload()


def test_documented_example_bytes() -> None:
    # The worked example in docs/mcu-protocol.md §6.
    wire = framing.encode_frame(m.encode_packet(0x05, m.SetWatchdog(30)))
    assert wire.hex(" ") == "00 05 10 05 07 1e 03 ff 0c 00"
    wire = framing.encode_frame(
        m.encode_packet(0x05, m.SupplyReading(12600), msg_type=m.MsgType.GET_SUPPLY))
    assert framing.decode_frame(wire[1:-1]) == bytes.fromhex("11 05 03 38 31")
    assert wire.hex(" ") == "00 08 11 05 03 38 31 5c f0 00"
    assert framing.encode_frame(m.encode_packet(0, m.IgnitionChanged(True))).hex(" ") \
        == "00 02 13 05 40 01 56 19 00"
    assert framing.encode_frame(m.encode_packet(
        6, m.ErrorReply(m.ErrorCode.BAD_SIGNATURE), msg_type=m.MsgType.FW_SWITCH)).hex(" ") \
        == "00 07 12 06 13 08 87 17 00"


def test_bad_payloads_raise_message_error() -> None:
    with pytest.raises(m.MessageError):  # wrong length
        m.parse_message(m.Packet(m.Kind.REQUEST, 1, m.MsgType.WDT_SET, b"\x01"))
    with pytest.raises(m.MessageError):  # ignition must be 0/1
        m.parse_message(m.Packet(m.Kind.EVENT, 1, m.MsgType.EVT_IGNITION, b"\x02"))
    with pytest.raises(m.MessageError):  # unknown wake reason
        m.parse_message(m.Packet(m.Kind.RESPONSE, 1, m.MsgType.GET_WAKE_REASON, b"\x09"))
    with pytest.raises(m.MessageError):  # protocol version 2
        m.decode_packet(b"\x21\x01\x02")


@settings(deadline=None)  # no timing: a loaded CI machine is slow
@given(st.binary(max_size=300))
def test_random_packets_raise_only_message_error(body: bytes) -> None:
    try:
        m.parse_message(m.decode_packet(body))
    except m.MessageError:
        pass


# --- link against the simulator ---------------------------------------------------------------

class Events:
    def __init__(self) -> None:
        self.items: list[m.Event] = []
        self._lock = threading.Lock()

    def __call__(self, event: m.Event) -> None:
        with self._lock:
            self.items.append(event)

    def of(self, cls: type) -> list:
        with self._lock:
            return [e for e in self.items if isinstance(e, cls)]


@pytest.fixture(scope="module")
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def sim(key: Ed25519PrivateKey) -> Iterator[McuSimulator]:
    with McuSimulator(key.public_key(), version="1.0.0", supply_v=12.6) as s:
        yield s


@pytest.fixture
def events() -> Events:
    return Events()


@pytest.fixture
def link(sim: McuSimulator, events: Events) -> Iterator[McuLink]:
    with McuLink(sim.port, on_event=events, timeout_s=2.0, retries=3) as lk:
        yield lk


def test_queries(sim: McuSimulator, link: McuLink) -> None:
    assert link.firmware_version() == "1.0.0"
    assert link.ignition() is False
    assert link.supply_voltage() == pytest.approx(12.6)
    assert link.wake_reason() == "power_on"
    sim.set_ignition(True)
    sim.set_supply_voltage(11.87)
    assert link.ignition() is True
    assert link.supply_voltage() == pytest.approx(11.87)
    assert link.stats.bad_frames == 0 and link.stats.retries == 0


def test_ignition_events(sim: McuSimulator, link: McuLink, events: Events) -> None:
    sim.set_ignition(True)
    assert wait_until(lambda: events.of(m.IgnitionChanged))
    sim.set_ignition(False)
    assert wait_until(lambda: len(events.of(m.IgnitionChanged)) == 2)
    assert events.of(m.IgnitionChanged) == [m.IgnitionChanged(True), m.IgnitionChanged(False)]


def test_a_failing_callback_does_not_stop_events(sim: McuSimulator) -> None:
    seen: list[m.Event] = []

    def cb(e: m.Event) -> None:
        seen.append(e)
        raise RuntimeError("callback bug")

    with McuLink(sim.port, on_event=cb) as lk:
        sim.set_ignition(True)
        sim.set_ignition(False)
        assert wait_until(lambda: len(seen) == 2)
        assert lk.ignition() is False


def test_periodic_supply_event(sim: McuSimulator, link: McuLink, events: Events) -> None:
    link.set_supply_report(5)
    sim.set_supply_voltage(13.9)
    sim.advance(5)
    assert wait_until(lambda: events.of(m.SupplyVoltage))
    assert events.of(m.SupplyVoltage)[0].volts == pytest.approx(13.9)
    link.set_supply_report(0)
    n = len(events.of(m.SupplyVoltage))
    sim.advance(60)
    link.ignition()  # a round trip: anything the simulator sent before is in by now
    assert len(events.of(m.SupplyVoltage)) == n


def test_sleep_and_wake_on_timer(sim: McuSimulator, link: McuLink) -> None:
    link.sleep(600, power_off_delay_s=5)
    assert sim.pi_powered
    sim.advance(5)
    assert not sim.pi_powered
    assert sim.power_log[-1].action == "cut" and sim.power_log[-1].reason == "sleep"
    assert sim.wake_timer_s == pytest.approx(600, abs=1)
    sim.advance(590)
    assert not sim.pi_powered
    sim.advance(11)
    assert sim.pi_powered
    assert link.wake_reason() == "timer"


def test_sleep_wakes_on_ignition_and_button(sim: McuSimulator, link: McuLink) -> None:
    link.sleep(0, power_off_delay_s=1)
    sim.advance(1)
    assert not sim.pi_powered and sim.wake_timer_s is None
    sim.advance(100_000)
    assert not sim.pi_powered  # no timer: stays off
    sim.set_ignition(True)
    assert sim.pi_powered
    assert link.wake_reason() == "ignition"
    sim.set_ignition(False)
    link.sleep(0, power_off_delay_s=1)
    sim.advance(1)
    assert not sim.pi_powered
    sim.press_button()
    assert sim.pi_powered
    assert link.wake_reason() == "button"


def test_watchdog_kicked_keeps_power_unkicked_cuts_it(sim: McuSimulator, link: McuLink) -> None:
    link.set_watchdog(10)
    assert sim.watchdog_timeout_s == 10
    for _ in range(5):
        sim.advance(6)
        link.kick_watchdog()
    assert sim.pi_powered and sim.power_log == []
    sim.advance(11)
    assert not sim.pi_powered
    assert [(p.action, p.reason) for p in sim.power_log] == [("cut", "watchdog")]
    sim.advance(3)
    assert sim.pi_powered
    assert sim.power_log[-1].action == "restore"
    assert link.wake_reason() == "watchdog"
    assert sim.watchdog_timeout_s == 300  # back to the boot default until the agent sets it


def test_corrupted_response_is_rejected_and_retried(sim: McuSimulator, link: McuLink) -> None:
    link.timeout_s = 0.3
    flipped = []

    def hook(packet: m.Packet, wire: bytes) -> bytes:
        if not flipped:
            flipped.append(packet.seq)
            bad = bytearray(wire)
            bad[4] ^= 0x10
            return bytes(bad)
        return wire

    sim.response_hook = hook
    sim.set_supply_voltage(12.34)
    assert link.supply_voltage() == pytest.approx(12.34)
    assert link.stats.bad_frames == 1 and link.stats.retries >= 1
    assert len(sim.received(m.MsgType.GET_SUPPLY)) >= 2
    assert {p.seq for p in sim.received(m.MsgType.GET_SUPPLY)} == {flipped[0]}  # same seq
    assert link.ignition() is False


def test_truncated_response_then_recovery(sim: McuSimulator, link: McuLink) -> None:
    link.timeout_s = 0.3
    cut = []

    def hook(packet: m.Packet, wire: bytes) -> bytes:
        if not cut:
            cut.append(1)
            return wire[: len(wire) // 2]  # no trailing delimiter
        return wire

    sim.response_hook = hook
    assert link.firmware_version() == "1.0.0"
    assert link.stats.bad_frames == 1  # the stub, ended by the retry's leading 0x00
    assert link.wake_reason() == "power_on"


def test_garbage_between_frames_costs_nothing(sim: McuSimulator, link: McuLink) -> None:
    rnd = random.Random(1)
    garbage = [rnd.randbytes(40), b"\x55" * 700, b"\xff\x00\x00\x01", rnd.randbytes(3)]

    def hook(packet: m.Packet, wire: bytes) -> bytes:
        return garbage[packet.seq % len(garbage)] + wire + garbage[(packet.seq + 1) % 4]

    sim.response_hook = hook
    sim.inject(b"\x42" * 50)
    for _ in range(8):
        assert link.supply_voltage() == pytest.approx(12.6)
        assert link.ignition() is False
    assert link.stats.bad_frames >= 8
    assert link.stats.retries == 0
    assert len(sim.received(m.MsgType.GET_SUPPLY)) == 8  # each request reached the MCU once


def test_stale_reordered_and_duplicated_responses_are_ignored(
        sim: McuSimulator, link: McuLink) -> None:
    link.timeout_s = 0.3
    held: list[bytes] = []

    def fake(seq: int, msg: m.Message, t: m.MsgType) -> bytes:
        return framing.encode_frame(m.encode_packet(seq, msg, msg_type=t))

    def hook(packet: m.Packet, wire: bytes) -> bytes:
        if packet.type == m.MsgType.GET_IGNITION and not held:
            held.append(wire)  # delay the first answer: the link retries
            return b""
        if packet.type == m.MsgType.GET_SUPPLY:
            return (held.pop() if held else b"") \
                + fake(packet.seq - 1, m.SupplyReading(9999), m.MsgType.GET_SUPPLY) \
                + fake(packet.seq, m.IgnitionState(True), m.MsgType.GET_IGNITION) \
                + wire + wire  # the real answer, duplicated
        return wire

    sim.response_hook = hook
    assert link.ignition() is False
    assert link.supply_voltage() == pytest.approx(12.6)  # not 9.999, not the held answer
    assert link.firmware_version() == "1.0.0"
    assert link.stats.stale_responses >= 4  # held, older seq, wrong type, duplicate
    assert link.stats.bad_packets == 0 and link.stats.bad_frames == 0


def test_no_response_times_out_after_retries(sim: McuSimulator, link: McuLink) -> None:
    link.timeout_s = 0.2
    sim.response_hook = lambda packet, wire: b""
    with pytest.raises(McuTimeout, match="GET_VERSION"):
        link.firmware_version()
    attempts = sim.received(m.MsgType.GET_VERSION)
    assert len(attempts) == 1 + link.retries
    assert len({p.seq for p in attempts}) == 1
    assert link.stats.timeouts == 1
    sim.response_hook = None
    assert link.firmware_version() == "1.0.0"


def test_error_reply_raises_rejected(link: McuLink) -> None:
    with pytest.raises(McuRejected) as e:
        link.request(m.FwChunk(0, b"abc"))  # no FW_BEGIN yet
    assert e.value.code == m.ErrorCode.BAD_STATE
    with pytest.raises(McuRejected) as e:
        link.confirm_firmware(SHA)
    assert e.value.code == m.ErrorCode.BAD_STATE
    assert link.ignition() is False


# --- firmware update --------------------------------------------------------------------------

def test_firmware_update_full(sim: McuSimulator, link: McuLink, events: Events,
                              key: Ed25519PrivateKey) -> None:
    image = make_image("2.0.0", 20_000, seed=2)
    seen: list[tuple[int, int]] = []
    assert link.update_firmware(image, key.sign(image), progress=lambda a, b: seen.append((a, b))) \
        == "2.0.0"
    assert sim.active_slot == 1 and sim.slots[1] is not None and sim.slots[1].image == image
    assert sim.fw_state is m.FwState.COMMITTED
    assert seen[0] == (0, 20_000) and seen[-1] == (20_000, 20_000)
    assert [a for a, _ in seen] == sorted(a for a, _ in seen)
    assert wait_until(lambda: events.of(m.McuBooted))
    assert events.of(m.McuBooted)[0] == m.McuBooted(1, m.FwState.TRIAL, "2.0.0")
    st = link.firmware_status()
    assert (st.state, st.active_slot, st.sha256) == (
        m.FwState.COMMITTED, 1, hashlib.sha256(image).digest())
    sim.advance(3600)  # committed: no rollback later
    assert link.firmware_version() == "2.0.0"
    # and a second update goes to the other slot
    image3 = make_image("3.0.0", 5_000, seed=3)
    assert link.update_firmware(image3, key.sign(image3)) == "3.0.0"
    assert sim.active_slot == 0


def test_firmware_transfer_cut_and_resumed(sim: McuSimulator, link: McuLink, events: Events,
                                           key: Ed25519PrivateKey) -> None:
    image = make_image("2.0.0", 30_000, seed=4)
    link.timeout_s = 0.2
    link.retries = 1

    def hook(packet: m.Packet, wire: bytes) -> bytes:
        cut = packet.type == m.MsgType.FW_CHUNK and \
            m.FwChunk.parse(packet.payload).offset >= len(image) // 2
        return b"" if cut else wire  # the line dies half-way

    sim.response_hook = hook
    with pytest.raises(McuTimeout):
        link.update_firmware(image, key.sign(image))
    link.close()
    sim.response_hook = None
    first_phase = len(sim.chunk_offsets)
    # the agent restarts: a new link, fresh seq numbers
    with McuLink(sim.port, on_event=events, timeout_s=2.0) as again:
        link_status = again.firmware_status()
        stored = link_status.stored
        assert link_status.state is m.FwState.RECEIVING
        assert len(image) // 2 <= stored < len(image)
        assert again.update_firmware(image, key.sign(image)) == "2.0.0"
    resumed = sim.chunk_offsets[first_phase:]
    assert resumed[0] == stored
    assert sorted(set(resumed)) == list(range(stored, len(image), 192))  # only the rest
    assert sim.slots[1] is not None and sim.slots[1].image == image


def test_bad_signature_is_refused_before_switching(sim: McuSimulator, link: McuLink,
                                                   key: Ed25519PrivateKey) -> None:
    image = make_image("2.0.0", 10_000, seed=5)
    other = Ed25519PrivateKey.generate()
    with pytest.raises(FirmwareRejected, match="BAD_SIGNATURE"):
        link.update_firmware(image, other.sign(image))
    assert sim.reboots == 0 and sim.active_slot == 0 and sim.slots[1] is None
    assert link.firmware_status().state is m.FwState.REJECTED
    assert link.firmware_version() == "1.0.0"
    tampered = image[:-1] + bytes([image[-1] ^ 1])
    with pytest.raises(FirmwareRejected):
        link.update_firmware(tampered, key.sign(image))  # signature of another image
    assert sim.reboots == 0 and sim.slots[1] is None
    assert link.update_firmware(image, key.sign(image)) == "2.0.0"  # the right one still goes


def test_image_that_never_handshakes_falls_back(sim: McuSimulator, link: McuLink,
                                               events: Events, key: Ed25519PrivateKey) -> None:
    image = make_image("2.0.0-broken", 8_000, healthy=False, seed=6)
    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(link.update_firmware, image, key.sign(image), trial_s=30)
        assert wait_until(lambda: sim.fw_state is m.FwState.TRIAL)
        assert sim.active_slot == 1
        sim.advance(31)  # nobody confirmed within the trial window
        with pytest.raises(FirmwareRolledBack):
            fut.result(timeout=60)
    assert sim.active_slot == 0 and sim.version == "1.0.0"
    assert link.firmware_version() == "1.0.0"
    assert link.firmware_status().state is m.FwState.ROLLED_BACK
    assert wait_until(lambda: events.of(m.McuBooted))
    assert events.of(m.McuBooted)[-1] == m.McuBooted(0, m.FwState.ROLLED_BACK, "1.0.0")


def test_unconfirmed_trial_rolls_back(sim: McuSimulator, link: McuLink,
                                      key: Ed25519PrivateKey) -> None:
    image = make_image("2.0.0", 8_000, seed=7)
    assert link.update_firmware(image, key.sign(image), trial_s=20, confirm=False) == "2.0.0"
    assert link.firmware_status().state is m.FwState.TRIAL
    sim.advance(21)
    assert wait_until(lambda: sim.reboots == 2 and sim.version == "1.0.0")
    assert link.firmware_version() == "1.0.0"
    assert link.firmware_status().state is m.FwState.ROLLED_BACK


# --- the port: McuLink on a UART, or on the simulator's pty -----------------------------------

@pytest.fixture
def sim_port(request: pytest.FixtureRequest,
             events: Events) -> Callable[[str], SimulatedLink]:
    """make_port for a ``sim`` spec; the simulators it starts end with the test."""
    def make(spec: str) -> SimulatedLink:
        port = make_port(spec, on_event=events, timeout_s=2.0)
        assert isinstance(port, SimulatedLink)
        request.addfinalizer(port.simulator.stop)
        request.addfinalizer(port.close)  # finalizers run last-in first-out
        return port
    return make


def test_make_port_picks_the_implementation_from_the_setting(
        sim: McuSimulator, events: Events, sim_port: Callable[[str], SimulatedLink]) -> None:
    assert make_port("", on_event=events) is None
    uart = make_port(sim.port, on_event=events)
    assert type(uart) is McuLink and isinstance(uart, McuPort)
    twin = sim_port("sim")
    assert isinstance(twin, McuPort) and twin.simulator.port != sim.port
    with uart:
        twin.open()
        assert uart.ignition() is False  # the fixture's simulator
        assert twin.ignition() is True   # "sim" starts with the key turned (see sim_options)
        assert uart.status()["open"] and "simulated" not in uart.status()
        assert twin.status()["simulated"] and twin.status()["port"] == twin.simulator.port


def test_sim_port_is_the_simulator_in_process_and_outlives_the_link(
        events: Events, sim_port: Callable[[str], SimulatedLink]) -> None:
    port = sim_port("sim://?version=3.1.4&ignition=off&supply_v=11.9")
    port.open()
    assert (port.firmware_version(), port.ignition()) == ("3.1.4", False)
    assert port.supply_voltage() == pytest.approx(11.9)
    port.simulator.set_ignition(True)
    assert wait_until(lambda: events.of(m.IgnitionChanged))
    assert events.of(m.IgnitionChanged) == [m.IgnitionChanged(True)]
    port.set_watchdog(30)
    port.close()
    assert not port.status()["open"]
    port.open()  # the MCU kept running while the agent's port was closed
    assert port.ignition() is True and port.simulator.watchdog_timeout_s == 30
    assert port.status()["frames"] >= 5 and port.status()["bad_frames"] == 0


def test_sim_port_verifies_images_with_the_configured_key(
        tmp_path, key: Ed25519PrivateKey, events: Events,
        sim_port: Callable[[str], SimulatedLink]) -> None:
    pem = tmp_path / "mcu-fw.pub"
    pem.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    image = make_image("2.0.0", 4000, seed=8)
    port = sim_port(f"sim://?pubkey={pem}")
    port.open()
    assert port.update_firmware(image, key.sign(image), trial_s=5) == "2.0.0"
    assert port.simulator.fw_state is m.FwState.COMMITTED
    stranger = sim_port("sim")  # no pubkey: a key nobody signs with
    stranger.open()
    with pytest.raises(FirmwareRejected, match="BAD_SIGNATURE"):
        stranger.update_firmware(image, key.sign(image))


@pytest.mark.parametrize("spec", [
    "sim:foo", "sim://host", "sim://?bogus=1", "sim://?ignition=maybe", "sim://?supply_v=x",
    "sim://?supply_v=nan", "sim://?pubkey=/nonexistent/key.pem", "sim://?version"])
def test_unreadable_sim_settings_raise_value_error(spec: str, events: Events) -> None:
    with pytest.raises(ValueError, match="mcu_port"):
        check_spec(spec)
    with pytest.raises(ValueError, match="mcu_port"):
        make_port(spec, on_event=events)


def test_check_spec_passes_what_make_port_can_use(tmp_path) -> None:
    for spec in ("", "sim", "sim://?ignition=off&supply_v=11.5", "/dev/serial0",
                 str(tmp_path / "missing"), "rfc2217://localhost:7000"):
        check_spec(spec)  # a missing device is a missing MCU, found out by open()


def test_a_port_that_cannot_be_opened_raises_mcu_error(tmp_path, events: Events) -> None:
    port = make_port(str(tmp_path / "ttyNONE"), on_event=events)
    assert port is not None
    with pytest.raises(McuLinkClosed, match="cannot open MCU port"):
        port.open()
    assert port.status()["open"] is False and "No such file" in port.status()["error"]
    with pytest.raises(McuError):
        port.ignition()


def _modules_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True, cwd=Path(__file__).resolve().parent.parent).stdout
    return set(out.split())


def test_the_port_loads_only_what_it_needs() -> None:
    port = _modules_after("import firmware_bridge.port")
    assert "serial" not in port and "firmware_bridge.sim" not in port
    link = _modules_after("import firmware_bridge.link")
    assert "firmware_bridge.sim" not in link and "cryptography" not in link


def test_the_shipped_twin_imports_no_test_tools_and_nothing_above_it() -> None:
    loaded = {name.split(".")[0] for name in _modules_after("import firmware_bridge.sim")}
    assert not loaded & {"agent", "drivers", "scripts", "tests"}
    dev_tools = {re.split(r"[<>=\s#]", line.strip(), maxsplit=1)[0].lower().replace("_", "-")
                 for line in (Path(__file__).resolve().parent.parent / "requirements-dev.txt")
                 .read_text().splitlines() if line.strip() and not line.startswith("#")}
    owners = importlib.metadata.packages_distributions()
    loaded_dists = {d.lower().replace("_", "-") for name in loaded for d in owners.get(name, ())}
    assert "cryptography" in loaded_dists  # the check sees installed distributions at all
    assert not loaded_dists & dev_tools
