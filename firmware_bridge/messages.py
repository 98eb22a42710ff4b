"""Packets and messages of the agent <-> MCU protocol (docs/mcu-protocol.md §3-§5). Pure.

A packet (the body of one frame) is a 3-byte header and a payload::

    byte 0  ver_kind   high nibble: protocol version (1); low nibble: Kind
    byte 1  seq        request seq, echoed by its response/error; events: MCU's own counter
    byte 2  type       MsgType
    3..     payload    fixed little-endian layout per (kind, type), see below / the doc

Every message is a frozen dataclass with ``payload()`` and ``parse(payload)``. Decoding bytes
from the line raises :class:`MessageError` and nothing else.
"""
from __future__ import annotations

import logging
import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import ClassVar, Self

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


def _bool(value: int, what: str) -> bool:
    if value not in (0, 1):
        raise MessageError(f"{what}: {value} is not 0 or 1")
    return bool(value)


def _text(raw: bytes, what: str) -> str:
    if len(raw) > MAX_VERSION_LEN:
        raise MessageError(f"{what}: {len(raw)} bytes > {MAX_VERSION_LEN}")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MessageError(f"{what}: not UTF-8 ({e})") from None


@dataclass(frozen=True, slots=True)
class Message:
    """Base: a message with an empty payload. Subclasses set KIND/TYPE and, when they carry
    fixed fields, FMT plus ``_fields()``/``_build()``."""

    KIND: ClassVar[Kind]
    TYPE: ClassVar[MsgType | None] = None
    FMT: ClassVar[struct.Struct] = struct.Struct("<")

    def payload(self) -> bytes:
        return self.FMT.pack(*self._fields())

    def _fields(self) -> tuple:
        return ()

    @classmethod
    def parse(cls, payload: bytes) -> Self:
        if len(payload) != cls.FMT.size:
            raise MessageError(f"{cls.__name__}: payload of {len(payload)} bytes, "
                               f"expected {cls.FMT.size}")
        return cls._build(*cls.FMT.unpack(payload))

    @classmethod
    def _build(cls, *values: int | bytes) -> Self:
        return cls()


# --- requests (agent -> MCU) ------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class GetVersion(Message):
    KIND = Kind.REQUEST
    TYPE = MsgType.GET_VERSION


@dataclass(frozen=True, slots=True)
class GetIgnition(Message):
    KIND = Kind.REQUEST
    TYPE = MsgType.GET_IGNITION


@dataclass(frozen=True, slots=True)
class GetSupply(Message):
    KIND = Kind.REQUEST
    TYPE = MsgType.GET_SUPPLY


@dataclass(frozen=True, slots=True)
class GetWakeReason(Message):
    KIND = Kind.REQUEST
    TYPE = MsgType.GET_WAKE_REASON


@dataclass(frozen=True, slots=True)
class Sleep(Message):
    """Cut the Pi's power ``power_off_delay_s`` after the response; wake it after
    ``wake_after_s`` (counted from the cut; 0 = no timer) or on ignition/button."""

    KIND = Kind.REQUEST
    TYPE = MsgType.SLEEP
    FMT = struct.Struct("<IH")
    wake_after_s: int
    power_off_delay_s: int

    def _fields(self) -> tuple:
        return (self.wake_after_s, self.power_off_delay_s)

    @classmethod
    def _build(cls, wake_after_s: int, power_off_delay_s: int) -> Self:
        return cls(wake_after_s, power_off_delay_s)


@dataclass(frozen=True, slots=True)
class KickWatchdog(Message):
    KIND = Kind.REQUEST
    TYPE = MsgType.WDT_KICK


@dataclass(frozen=True, slots=True)
class SetWatchdog(Message):
    """Watchdog timeout in seconds from now (the call is also a kick); 0 disables it."""

    KIND = Kind.REQUEST
    TYPE = MsgType.WDT_SET
    FMT = struct.Struct("<H")
    timeout_s: int

    def _fields(self) -> tuple:
        return (self.timeout_s,)

    @classmethod
    def _build(cls, timeout_s: int) -> Self:
        return cls(timeout_s)


@dataclass(frozen=True, slots=True)
class SetSupplyReport(Message):
    """Period of EVT_SUPPLY in seconds; 0 stops it."""

    KIND = Kind.REQUEST
    TYPE = MsgType.SET_SUPPLY_REPORT
    FMT = struct.Struct("<H")
    period_s: int

    def _fields(self) -> tuple:
        return (self.period_s,)

    @classmethod
    def _build(cls, period_s: int) -> Self:
        return cls(period_s)


@dataclass(frozen=True, slots=True)
class FwBegin(Message):
    KIND = Kind.REQUEST
    TYPE = MsgType.FW_BEGIN
    FMT = struct.Struct(f"<I{SHA256_LEN}s{SIGNATURE_LEN}s")
    total_size: int
    sha256: bytes
    signature: bytes

    def _fields(self) -> tuple:
        if len(self.sha256) != SHA256_LEN or len(self.signature) != SIGNATURE_LEN:
            raise ValueError("FwBegin needs a 32-byte SHA-256 and a 64-byte Ed25519 signature")
        return (self.total_size, self.sha256, self.signature)

    @classmethod
    def _build(cls, total_size: int, sha256: bytes, signature: bytes) -> Self:
        return cls(total_size, sha256, signature)


@dataclass(frozen=True, slots=True)
class FwChunk(Message):
    KIND = Kind.REQUEST
    TYPE = MsgType.FW_CHUNK
    FMT = struct.Struct("<I")
    offset: int
    data: bytes

    def payload(self) -> bytes:
        if not 1 <= len(self.data) <= MAX_CHUNK:
            raise ValueError(f"chunk data must be 1..{MAX_CHUNK} bytes")
        return self.FMT.pack(self.offset) + self.data

    @classmethod
    def parse(cls, payload: bytes) -> Self:
        if not cls.FMT.size + 1 <= len(payload) <= cls.FMT.size + MAX_CHUNK:
            raise MessageError(f"FwChunk: payload of {len(payload)} bytes")
        (offset,) = cls.FMT.unpack_from(payload)
        return cls(offset, bytes(payload[cls.FMT.size:]))


@dataclass(frozen=True, slots=True)
class GetFwStatus(Message):
    KIND = Kind.REQUEST
    TYPE = MsgType.FW_STATUS


@dataclass(frozen=True, slots=True)
class FwSwitch(Message):
    """Verify the staged image (SHA-256, then Ed25519) and reboot into it on trial; without
    FW_CONFIRM within ``trial_s`` seconds of that reboot the MCU goes back to the old slot."""

    KIND = Kind.REQUEST
    TYPE = MsgType.FW_SWITCH
    FMT = struct.Struct("<H")
    trial_s: int

    def _fields(self) -> tuple:
        return (self.trial_s,)

    @classmethod
    def _build(cls, trial_s: int) -> Self:
        return cls(trial_s)


@dataclass(frozen=True, slots=True)
class FwConfirm(Message):
    KIND = Kind.REQUEST
    TYPE = MsgType.FW_CONFIRM
    FMT = struct.Struct(f"<{SHA256_LEN}s")
    sha256: bytes

    def _fields(self) -> tuple:
        return (self.sha256,)

    @classmethod
    def _build(cls, sha256: bytes) -> Self:
        return cls(sha256)


# --- responses (MCU -> agent) -----------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Ack(Message):
    """Empty success response (SLEEP, WDT_KICK, WDT_SET, SET_SUPPLY_REPORT, FW_SWITCH,
    FW_CONFIRM)."""

    KIND = Kind.RESPONSE


@dataclass(frozen=True, slots=True)
class VersionInfo(Message):
    KIND = Kind.RESPONSE
    TYPE = MsgType.GET_VERSION
    FMT = struct.Struct("<B")
    slot: int
    version: str

    def payload(self) -> bytes:
        raw = self.version.encode("utf-8")
        if len(raw) > MAX_VERSION_LEN:
            raise ValueError(f"version text longer than {MAX_VERSION_LEN} bytes")
        return self.FMT.pack(self.slot) + raw

    @classmethod
    def parse(cls, payload: bytes) -> Self:
        if len(payload) < 1:
            raise MessageError("VersionInfo: empty payload")
        return cls(payload[0], _text(payload[1:], "version"))


@dataclass(frozen=True, slots=True)
class IgnitionState(Message):
    KIND = Kind.RESPONSE
    TYPE = MsgType.GET_IGNITION
    FMT = struct.Struct("<B")
    on: bool

    def _fields(self) -> tuple:
        return (int(self.on),)

    @classmethod
    def _build(cls, on: int) -> Self:
        return cls(_bool(on, "ignition"))


@dataclass(frozen=True, slots=True)
class SupplyReading(Message):
    KIND = Kind.RESPONSE
    TYPE = MsgType.GET_SUPPLY
    FMT = struct.Struct("<H")
    millivolts: int

    def _fields(self) -> tuple:
        return (self.millivolts,)

    @classmethod
    def _build(cls, millivolts: int) -> Self:
        return cls(millivolts)


@dataclass(frozen=True, slots=True)
class WakeReasonInfo(Message):
    KIND = Kind.RESPONSE
    TYPE = MsgType.GET_WAKE_REASON
    FMT = struct.Struct("<B")
    reason: WakeReason

    def _fields(self) -> tuple:
        return (int(self.reason),)

    @classmethod
    def _build(cls, reason: int) -> Self:
        return cls(_enum(WakeReason, reason, "wake reason"))


@dataclass(frozen=True, slots=True)
class FwProgress(Message):
    """Response to FW_BEGIN and FW_CHUNK: bytes of the image stored so far."""

    KIND = Kind.RESPONSE
    FMT = struct.Struct("<I")
    stored: int

    def _fields(self) -> tuple:
        return (self.stored,)

    @classmethod
    def _build(cls, stored: int) -> Self:
        return cls(stored)


@dataclass(frozen=True, slots=True)
class FwStatus(Message):
    KIND = Kind.RESPONSE
    TYPE = MsgType.FW_STATUS
    FMT = struct.Struct(f"<BBII{SHA256_LEN}s")
    state: FwState
    active_slot: int
    total_size: int
    stored: int
    sha256: bytes

    def _fields(self) -> tuple:
        return (int(self.state), self.active_slot, self.total_size, self.stored, self.sha256)

    @classmethod
    def _build(cls, state: int, slot: int, total: int, stored: int, sha: bytes) -> Self:
        return cls(_enum(FwState, state, "fw state"), slot, total, stored, sha)


@dataclass(frozen=True, slots=True)
class ErrorReply(Message):
    """Kind.ERROR packet: the request was understood as far as its type and refused."""

    KIND = Kind.ERROR
    FMT = struct.Struct("<B")
    code: int

    def _fields(self) -> tuple:
        return (int(self.code),)

    @classmethod
    def _build(cls, code: int) -> Self:
        try:
            return cls(ErrorCode(code))
        except ValueError:
            return cls(code)  # a newer MCU's code: keep the number


# --- events (MCU -> agent, unsolicited) -------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Event(Message):
    """Base of everything the link hands to ``on_event``."""

    KIND = Kind.EVENT


@dataclass(frozen=True, slots=True)
class IgnitionChanged(Event):
    TYPE = MsgType.EVT_IGNITION
    FMT = struct.Struct("<B")
    on: bool

    def _fields(self) -> tuple:
        return (int(self.on),)

    @classmethod
    def _build(cls, on: int) -> Self:
        return cls(_bool(on, "ignition"))


@dataclass(frozen=True, slots=True)
class SupplyVoltage(Event):
    """Periodic supply report. On the wire: u16 millivolts."""

    TYPE = MsgType.EVT_SUPPLY
    FMT = struct.Struct("<H")
    volts: float

    def _fields(self) -> tuple:
        return (volts_to_mv(self.volts),)

    @classmethod
    def _build(cls, mv: int) -> Self:
        return cls(mv / 1000)


@dataclass(frozen=True, slots=True)
class McuBooted(Event):
    """Sent once after every MCU reset (power-on, firmware switch, rollback)."""

    TYPE = MsgType.EVT_BOOTED
    FMT = struct.Struct("<BB")
    slot: int
    fw_state: FwState
    version: str

    def payload(self) -> bytes:
        raw = self.version.encode("utf-8")
        if len(raw) > MAX_VERSION_LEN:
            raise ValueError(f"version text longer than {MAX_VERSION_LEN} bytes")
        return self.FMT.pack(self.slot, int(self.fw_state)) + raw

    @classmethod
    def parse(cls, payload: bytes) -> Self:
        if len(payload) < cls.FMT.size:
            raise MessageError("McuBooted: short payload")
        slot, state = cls.FMT.unpack_from(payload)
        return cls(slot, _enum(FwState, state, "fw state"),
                   _text(payload[cls.FMT.size:], "version"))


def volts_to_mv(volts: float) -> int:
    return max(0, min(0xFFFF, round(volts * 1000)))


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
