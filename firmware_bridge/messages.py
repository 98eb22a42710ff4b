"""Packets and messages of the agent <-> MCU protocol (docs/mcu-protocol.md §3-§5). Pure.

A packet (the body of one frame) is a 3-byte header and a payload::

    byte 0  ver_kind   high nibble: protocol version (1); low nibble: Kind
    byte 1  seq        request seq, echoed by its response/error; events: MCU's own counter
    byte 2  type       MsgType
    3..     payload    fixed little-endian layout per (kind, type), see below / the doc

Every message is a frozen dataclass whose fields are its payload, in order: each field's
annotation says how it goes on the wire (``U16``, ``Bool``, ``Sha256``, ``Text``... are
``Annotated`` types carrying a :class:`Wire` codec), and :class:`Message` derives
``payload()`` and ``parse(payload)`` from that. Decoding bytes from the line raises
:class:`MessageError` and nothing else.
"""
from __future__ import annotations

import functools
import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass, fields
from enum import IntEnum
from typing import Annotated, Any, ClassVar, Self, get_type_hints

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
HEADER = struct.Struct("<BBB")
MAX_PAYLOAD = 256
#: Largest data field of one FW_CHUNK (payload = 4-byte offset + data).
MAX_CHUNK = MAX_PAYLOAD - 4
MAX_VERSION_LEN = 32
SHA256_LEN = 32
SIGNATURE_LEN = 64


class MessageError(ValueError):
    """A packet that does not follow the protocol (bad header, unknown type, wrong length...)."""


class Kind(IntEnum):
    REQUEST = 0   # agent -> MCU
    RESPONSE = 1  # MCU -> agent, success, same seq and type as the request
    ERROR = 2     # MCU -> agent, failure, same seq and type as the request
    EVENT = 3     # MCU -> agent, unsolicited


class MsgType(IntEnum):
    GET_VERSION = 0x01
    GET_IGNITION = 0x02
    GET_SUPPLY = 0x03
    GET_WAKE_REASON = 0x04
    SLEEP = 0x05
    WDT_KICK = 0x06
    WDT_SET = 0x07
    SET_SUPPLY_REPORT = 0x08
    FW_BEGIN = 0x10
    FW_CHUNK = 0x11
    FW_STATUS = 0x12
    FW_SWITCH = 0x13
    FW_CONFIRM = 0x14
    EVT_IGNITION = 0x40
    EVT_SUPPLY = 0x41
    EVT_BOOTED = 0x42


class ErrorCode(IntEnum):
    UNKNOWN_TYPE = 1
    BAD_LENGTH = 2
    BAD_VALUE = 3
    BAD_STATE = 4
    BAD_OFFSET = 5
    TOO_LARGE = 6
    BAD_HASH = 7
    BAD_SIGNATURE = 8
    FLASH = 9


class WakeReason(IntEnum):
    POWER_ON = 0
    IGNITION = 1
    TIMER = 2
    BUTTON = 3
    WATCHDOG = 4

    @property
    def label(self) -> str:
        return self.name.lower()


class FwState(IntEnum):
    IDLE = 0         # no update session
    RECEIVING = 1    # FW_BEGIN accepted, stored < total
    COMPLETE = 2     # stored == total, waiting for FW_SWITCH
    TRIAL = 3        # running the new image, waiting for FW_CONFIRM
    COMMITTED = 4    # new image confirmed and permanent
    ROLLED_BACK = 5  # new image not confirmed in time; running the old one again
    REJECTED = 6     # FW_SWITCH refused: hash or signature did not verify; staging discarded

    @property
    def label(self) -> str:
        return self.name.lower()


def _enum(enum: type[IntEnum], value: int, what: str) -> IntEnum:
    try:
        return enum(value)
    except ValueError:
        raise MessageError(f"{what}: unknown value {value}") from None


def _bool(value: int) -> bool:
    if value not in (0, 1):
        raise ValueError(f"{value} is not 0 or 1")
    return bool(value)


def _error_code(value: int) -> int:
    try:
        return ErrorCode(value)
    except ValueError:
        return value  # a newer MCU's code: keep the number


def volts_to_mv(volts: float) -> int:
    return max(0, min(0xFFFF, round(volts * 1000)))


def _as_is(value: Any) -> Any:
    return value


# --- field codecs -----------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Wire:
    """How one message field goes on the wire; attached to the field's type with
    ``Annotated[type, Wire(...)]``.

    ``fmt`` is the field's :mod:`struct` code. ``fmt=None`` marks the variable-length rest of
    the payload (the last field only), ``min_len..max_len`` bytes. ``encode`` turns the
    attribute into what ``struct`` packs (or the tail's bytes); ``decode`` turns the unpacked
    value back and raises ``ValueError`` for a value the protocol does not allow.
    """

    fmt: str | None
    encode: Callable[[Any], Any] = _as_is
    decode: Callable[[Any], Any] = _as_is
    min_len: int = 0
    max_len: int = 0

    @classmethod
    def blob(cls, size: int) -> Wire:
        def exact(raw: bytes) -> bytes:
            if len(raw) != size:
                raise ValueError(f"{len(raw)} bytes, must be {size}")
            return bytes(raw)
        return cls(f"{size}s", exact)

    @classmethod
    def u8_enum(cls, enum: type[IntEnum]) -> Wire:
        return cls("B", decode=enum)


U8 = Annotated[int, Wire("B")]
U16 = Annotated[int, Wire("H")]
U32 = Annotated[int, Wire("I")]
Bool = Annotated[bool, Wire("B", decode=_bool)]
Millivolts = Annotated[float, Wire("H", volts_to_mv, lambda mv: mv / 1000)]  # volts in Python
Sha256 = Annotated[bytes, Wire.blob(SHA256_LEN)]
Signature = Annotated[bytes, Wire.blob(SIGNATURE_LEN)]
#: Version text: UTF-8, 0..32 bytes, filling the rest of the payload.
Text = Annotated[str, Wire(None, lambda s: s.encode("utf-8"), lambda b: b.decode("utf-8"),
                           0, MAX_VERSION_LEN)]
#: FW_CHUNK data: 1..252 bytes, the rest of the payload.
Chunk = Annotated[bytes, Wire(None, bytes, min_len=1, max_len=MAX_CHUNK)]


@dataclass(frozen=True, slots=True)
class _Layout:
    codecs: tuple[tuple[str, Wire], ...]   # (field, codec) in payload order; a tail comes last
    fixed: struct.Struct                   # the fixed-size fields
    tail: Wire | None
    lengths: range                         # payload lengths parse accepts


@functools.cache
def _layout(cls: type) -> _Layout:
    """The wire layout of a message class, read from its dataclass fields' annotations."""
    hints = get_type_hints(cls, include_extras=True)
    codecs: list[tuple[str, Wire]] = []
    for f in fields(cls):
        wire = next((a for a in getattr(hints[f.name], "__metadata__", ()) if isinstance(a, Wire)),
                    None)
        if wire is None:
            raise TypeError(f"{cls.__name__}.{f.name}: no Wire codec in its annotation")
        if codecs and codecs[-1][1].fmt is None:
            raise TypeError(f"{cls.__name__}.{f.name}: only the last field can be a tail")
        codecs.append((f.name, wire))
    tail = codecs[-1][1] if codecs and codecs[-1][1].fmt is None else None
    fixed = struct.Struct("<" + "".join(w.fmt for _, w in codecs if w.fmt is not None))
    lo, hi = (tail.min_len, tail.max_len) if tail else (0, 0)
    return _Layout(tuple(codecs), fixed, tail, range(fixed.size + lo, fixed.size + hi + 1))


@dataclass(frozen=True, slots=True)
class Message:
    """Base of every message: the payload is the dataclass fields in order, each encoded as
    its annotation's :class:`Wire` says (no fields: an empty payload). Subclasses set
    KIND and TYPE (None for answers shared by several request types)."""

    KIND: ClassVar[Kind]
    TYPE: ClassVar[MsgType | None] = None

    def payload(self) -> bytes:
        """Raises ``ValueError`` for a field the wire cannot carry (``struct.error`` for an
        integer out of its range)."""
        layout = _layout(type(self))
        values = []
        for name, wire in layout.codecs:
            try:
                values.append(wire.encode(getattr(self, name)))
            except ValueError as e:
                raise ValueError(f"{type(self).__name__}.{name}: {e}") from None
        if layout.tail is None:
            return layout.fixed.pack(*values)
        raw = values.pop()
        if not layout.tail.min_len <= len(raw) <= layout.tail.max_len:
            raise ValueError(f"{type(self).__name__}.{layout.codecs[-1][0]}: {len(raw)} bytes, "
                             f"must be {layout.tail.min_len}..{layout.tail.max_len}")
        return layout.fixed.pack(*values) + raw

    @classmethod
    def parse(cls, payload: bytes) -> Self:
        """Raises :class:`MessageError` for a payload that is not this message."""
        layout = _layout(cls)
        lengths = layout.lengths
        if len(payload) not in lengths:
            want = (str(lengths.start) if len(lengths) == 1
                    else f"{lengths.start}..{lengths.stop - 1}")
            raise MessageError(f"{cls.__name__}: payload of {len(payload)} bytes, expected {want}")
        raw = list(layout.fixed.unpack_from(payload))
        if layout.tail is not None:
            raw.append(bytes(payload[layout.fixed.size:]))
        values = []
        for (name, wire), value in zip(layout.codecs, raw):
            try:
                values.append(wire.decode(value))
            except ValueError as e:
                raise MessageError(f"{cls.__name__}.{name}: {e}") from None
        return cls(*values)


# --- requests (agent -> MCU) ------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Request(Message):
    """Base of everything the agent sends."""

    KIND = Kind.REQUEST


@dataclass(frozen=True, slots=True)
class GetVersion(Request):
    TYPE = MsgType.GET_VERSION


@dataclass(frozen=True, slots=True)
class GetIgnition(Request):
    TYPE = MsgType.GET_IGNITION


@dataclass(frozen=True, slots=True)
class GetSupply(Request):
    TYPE = MsgType.GET_SUPPLY


@dataclass(frozen=True, slots=True)
class GetWakeReason(Request):
    TYPE = MsgType.GET_WAKE_REASON


@dataclass(frozen=True, slots=True)
class Sleep(Request):
    """Cut the Pi's power ``power_off_delay_s`` after the response; wake it after
    ``wake_after_s`` (counted from the cut; 0 = no timer) or on ignition/button."""

    TYPE = MsgType.SLEEP
    wake_after_s: U32
    power_off_delay_s: U16


@dataclass(frozen=True, slots=True)
class KickWatchdog(Request):
    TYPE = MsgType.WDT_KICK


@dataclass(frozen=True, slots=True)
class SetWatchdog(Request):
    """Watchdog timeout in seconds from now (the call is also a kick); 0 disables it."""

    TYPE = MsgType.WDT_SET
    timeout_s: U16


@dataclass(frozen=True, slots=True)
class SetSupplyReport(Request):
    """Period of EVT_SUPPLY in seconds; 0 stops it."""

    TYPE = MsgType.SET_SUPPLY_REPORT
    period_s: U16


@dataclass(frozen=True, slots=True)
class FwBegin(Request):
    TYPE = MsgType.FW_BEGIN
    total_size: U32
    sha256: Sha256
    signature: Signature  # Ed25519


@dataclass(frozen=True, slots=True)
class FwChunk(Request):
    TYPE = MsgType.FW_CHUNK
    offset: U32
    data: Chunk


@dataclass(frozen=True, slots=True)
class GetFwStatus(Request):
    TYPE = MsgType.FW_STATUS


@dataclass(frozen=True, slots=True)
class FwSwitch(Request):
    """Verify the staged image (SHA-256, then Ed25519) and reboot into it on trial; without
    FW_CONFIRM within ``trial_s`` seconds of that reboot the MCU goes back to the old slot."""

    TYPE = MsgType.FW_SWITCH
    trial_s: U16


@dataclass(frozen=True, slots=True)
class FwConfirm(Request):
    TYPE = MsgType.FW_CONFIRM
    sha256: Sha256


# --- responses (MCU -> agent) -----------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Response(Message):
    """Base of the MCU's success answers."""

    KIND = Kind.RESPONSE


@dataclass(frozen=True, slots=True)
class Ack(Response):
    """Empty success response (SLEEP, WDT_KICK, WDT_SET, SET_SUPPLY_REPORT, FW_SWITCH,
    FW_CONFIRM)."""


@dataclass(frozen=True, slots=True)
class VersionInfo(Response):
    TYPE = MsgType.GET_VERSION
    slot: U8
    version: Text


@dataclass(frozen=True, slots=True)
class IgnitionState(Response):
    TYPE = MsgType.GET_IGNITION
    on: Bool


@dataclass(frozen=True, slots=True)
class SupplyReading(Response):
    TYPE = MsgType.GET_SUPPLY
    millivolts: U16


@dataclass(frozen=True, slots=True)
class WakeReasonInfo(Response):
    TYPE = MsgType.GET_WAKE_REASON
    reason: Annotated[WakeReason, Wire.u8_enum(WakeReason)]


@dataclass(frozen=True, slots=True)
class FwProgress(Response):
    """Response to FW_BEGIN and FW_CHUNK: bytes of the image stored so far."""

    stored: U32


FwStateU8 = Annotated[FwState, Wire.u8_enum(FwState)]


@dataclass(frozen=True, slots=True)
class FwStatus(Response):
    TYPE = MsgType.FW_STATUS
    state: FwStateU8
    active_slot: U8
    total_size: U32
    stored: U32
    sha256: Sha256


@dataclass(frozen=True, slots=True)
class ErrorReply(Message):
    """Kind.ERROR packet: the request was understood as far as its type and refused.
    ``code`` is an :class:`ErrorCode`, or the bare number of a code this side does not know."""

    KIND = Kind.ERROR
    code: Annotated[int, Wire("B", decode=_error_code)]


# --- events (MCU -> agent, unsolicited) -------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Event(Message):
    """Base of everything the link hands to ``on_event``."""

    KIND = Kind.EVENT


@dataclass(frozen=True, slots=True)
class IgnitionChanged(Event):
    TYPE = MsgType.EVT_IGNITION
    on: Bool


@dataclass(frozen=True, slots=True)
class SupplyVoltage(Event):
    """Periodic supply report. On the wire: u16 millivolts."""

    TYPE = MsgType.EVT_SUPPLY
    volts: Millivolts


@dataclass(frozen=True, slots=True)
class McuBooted(Event):
    """Sent once after every MCU reset (power-on, firmware switch, rollback)."""

    TYPE = MsgType.EVT_BOOTED
    slot: U8
    fw_state: FwStateU8
    version: Text


REQUESTS: dict[MsgType, type[Message]] = {c.TYPE: c for c in (
    GetVersion, GetIgnition, GetSupply, GetWakeReason, Sleep, KickWatchdog, SetWatchdog,
    SetSupplyReport, FwBegin, FwChunk, GetFwStatus, FwSwitch, FwConfirm)}

RESPONSES: dict[MsgType, type[Message]] = {
    MsgType.GET_VERSION: VersionInfo,
    MsgType.GET_IGNITION: IgnitionState,
    MsgType.GET_SUPPLY: SupplyReading,
    MsgType.GET_WAKE_REASON: WakeReasonInfo,
    MsgType.SLEEP: Ack,
    MsgType.WDT_KICK: Ack,
    MsgType.WDT_SET: Ack,
    MsgType.SET_SUPPLY_REPORT: Ack,
    MsgType.FW_BEGIN: FwProgress,
    MsgType.FW_CHUNK: FwProgress,
    MsgType.FW_STATUS: FwStatus,
    MsgType.FW_SWITCH: Ack,
    MsgType.FW_CONFIRM: Ack,
}

EVENTS: dict[MsgType, type[Message]] = {c.TYPE: c for c in (
    IgnitionChanged, SupplyVoltage, McuBooted)}


@dataclass(frozen=True, slots=True)
class Packet:
    kind: Kind
    seq: int
    type: int  # MsgType, or an unknown number (answered with UNKNOWN_TYPE)
    payload: bytes


def encode_packet(seq: int, msg: Message, *, msg_type: MsgType | None = None) -> bytes:
    """Message -> packet bytes (frame body). ``msg_type`` is needed for the messages that
    answer several request types (:class:`Ack`, :class:`FwProgress`, :class:`ErrorReply`)."""
    t = msg.TYPE if msg.TYPE is not None else msg_type
    if t is None:
        raise ValueError(f"{type(msg).__name__} needs msg_type")
    payload = msg.payload()
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    return HEADER.pack((PROTOCOL_VERSION << 4) | msg.KIND, seq & 0xFF, int(t)) + payload


def decode_packet(body: bytes) -> Packet:
    """Frame body -> header fields and raw payload. Raises :class:`MessageError`."""
    if len(body) < HEADER.size:
        raise MessageError(f"packet of {len(body)} bytes is shorter than the header")
    ver_kind, seq, t = HEADER.unpack_from(body)
    if ver_kind >> 4 != PROTOCOL_VERSION:
        raise MessageError(f"protocol version {ver_kind >> 4}, expected {PROTOCOL_VERSION}")
    kind = _enum(Kind, ver_kind & 0x0F, "kind")
    payload = bytes(body[HEADER.size:])
    if len(payload) > MAX_PAYLOAD:
        raise MessageError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    try:
        t = MsgType(t)
    except ValueError:
        pass
    return Packet(kind, seq, t, payload)


def parse_message(packet: Packet) -> Message:
    """Payload of a packet -> its message, by (kind, type). Raises :class:`MessageError`."""
    if packet.kind is Kind.ERROR:
        return ErrorReply.parse(packet.payload)
    table = {Kind.REQUEST: REQUESTS, Kind.RESPONSE: RESPONSES, Kind.EVENT: EVENTS}[packet.kind]
    cls = table.get(packet.type)  # type: ignore[call-overload]
    if cls is None:
        raise MessageError(f"unknown {packet.kind.name.lower()} type {int(packet.type):#04x}")
    return cls.parse(packet.payload)
