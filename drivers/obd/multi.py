"""Multi-PID mode 01 requests and answer checks, as an extension of python-OBD.

SAE J1979 lets one mode 01 request carry up to six PIDs on CAN (ISO 15765-4): ``01 0C 0D 05``
is answered by each ECU with one (ISO-TP multi-frame) message ``41 0C a b 0D c 05 d`` holding the
PIDs it supports, each followed by its data. python-OBD 0.7 sends one PID per request; here
:class:`MultiPidCommand` is an :class:`obd.OBDCommand` for such a request whose "decoder" splits
every ECU's answer into one ``41 <pid> <data>`` message per PID and hands those to the PID's own
python-OBD command, so values and units come from python-OBD's decoders. The PID lengths come from
python-OBD's command table (``OBDCommand.bytes`` counts the ``41 <pid>`` bytes).

ELM327 response-count hint: a single hex digit after the request (``010C0D052``) makes the
adapter return as soon as that many CAN frames arrived instead of waiting out its timeout for
more ECUs. :class:`MultiPidCommand` appends it when asked; the caller learns the count from the
previous answer (:func:`frame_count`) and drops the hint where an adapter (or the emulator)
answers ``?`` to it.

Decoding: :meth:`MultiPidCommand.values` splits each ECU's answer into the PIDs' bytes and runs
python-OBD's own decoder once per distinct answer (:class:`DecodeCache`; pint quantities and
their unit texts were half the poller's CPU).

Answer checks (:func:`answers_to`): python-OBD decodes whatever messages come back — a late
answer to the previous request, or an ELM text such as ``NO DATA`` (which becomes an empty
message that the DTC decoder reads as "no codes"). :func:`answers_to` keeps only messages whose
first bytes echo the request (``0x40 + mode``, and the PID for modes 01, 02 and 09). What the
ELM327's own texts mean is drivers/obd/elm_lines.py's.
"""
from __future__ import annotations

import logging
from typing import Any, Iterable, Sequence

from obd import OBDCommand, OBDResponse
from obd.protocols import ECU

from drivers.obd.elm327 import Message, message_like
from drivers.obd.units import value_and_unit

log = logging.getLogger(__name__)

#: At most six PIDs in one mode 01 request (SAE J1979, CAN only).
MAX_PIDS_PER_REQUEST = 6
#: python-OBD / ELM327 protocol ids of ISO 15765-4 (CAN).
CAN_PROTOCOL_IDS = frozenset({"6", "7", "8", "9"})

_PID_ECHO_MODES = (1, 2, 9)


def is_multi_capable(cmd: Any) -> bool:
    """True for a python-OBD mode 01 command with a fixed answer length (one that can share a
    request with others)."""
    return (isinstance(cmd, OBDCommand) and cmd.mode == 1 and cmd.pid is not None
            and isinstance(cmd.bytes, int) and cmd.bytes > 2 and len(cmd.command) == 4)


class MultiPidCommand(OBDCommand):
    """A mode 01 request for 1 to :data:`MAX_PIDS_PER_REQUEST` python-OBD commands.

    Its response's ``value`` is a dict ``{command name: OBDResponse}`` for the PIDs some ECU
    answered, each decoded by that PID's own python-OBD command (absent PIDs are left out).
    Send it with ``obd.OBD.query(cmd, force=True)``: python-OBD's supported-command check does
    not know it.
    """

    def __init__(self, commands: Sequence[OBDCommand], count_hint: int | None = None):
        commands = tuple(commands)
        if not 1 <= len(commands) <= MAX_PIDS_PER_REQUEST:
            raise ValueError(f"1 to {MAX_PIDS_PER_REQUEST} PIDs per request, not {len(commands)}")
        for c in commands:
            if not is_multi_capable(c):
                raise ValueError(f"{getattr(c, 'name', c)!r} is not a fixed-length mode 01 PID")
        if len({c.pid for c in commands}) != len(commands):
            raise ValueError("a PID appears twice in one request")
        if count_hint is not None and not 1 <= count_hint <= 15:
            raise ValueError(f"response-count hint must be 1..15, not {count_hint}")
        self.commands = commands
        self.count_hint = count_hint
        self._by_pid = {c.pid: c for c in commands}
        self._ecus = {c.name: c.ecu for c in commands}
        self.request = b"01" + b"".join(c.command[2:] for c in commands)
        command = self.request + (b"%X" % count_hint if count_hint else b"")
        super().__init__("+".join(c.name for c in commands),
                         "Multi-PID: " + ", ".join(c.desc for c in commands),
                         command, 0, self._decode, ECU.ALL, False)

    def _decode(self, messages: list[Message]) -> dict[str, OBDResponse]:
        return decode_split(messages, self.commands)

    def values(self, messages: Iterable[Message], cache: DecodeCache
               ) -> dict[str, tuple[float, str]]:
        """``{name: (value, unit text)}`` for the PIDs the answer holds: python-OBD's choice of
        ECU (the first message from an ECU the PID's command accepts, in python-OBD's order) and
        its decoder, through ``cache``."""
        parts: dict[str, bytes] = {}
        for message in messages:
            ecu = message.ecu
            for name, part in split_data(bytes(message.data), self._by_pid).items():
                if name not in parts and self._ecus[name] & ecu:
                    parts[name] = part
        out: dict[str, tuple[float, str]] = {}
        for cmd in self.commands:
            part = parts.get(cmd.name)
            if part is not None:
                value = cache.value(cmd, part)
                if value is not None:
                    out[cmd.name] = value
        return out

    def clone(self) -> "MultiPidCommand":
        return MultiPidCommand(self.commands, self.count_hint)


class DecodeCache:
    """``(value, unit text)`` of a python-OBD command's answer data (``41 0C 1A F8``), decoded
    by python-OBD itself the first time a command sees that data and remembered after: python-OBD
    builds a pint quantity per answer and pint's unit text costs as much again, while a live
    PID's answers repeat (one-byte PIDs have 256 answers at most). At most ``per_command``
    answers are kept per command (then that command's table starts afresh). One per reader
    (not thread-safe)."""

    _MISSING = object()

    def __init__(self, per_command: int = 1024):
        self.per_command = per_command
        self._tables: dict[str, dict[bytes, tuple[float, str] | None]] = {}
        self._template = Message([])
        self.hits = self.misses = 0

    def value(self, cmd: Any, data: bytes) -> tuple[float, str] | None:
        table = self._tables.get(cmd.name)
        if table is None:
            table = self._tables[cmd.name] = {}
        found = table.get(data, self._MISSING)
        if found is not self._MISSING:
            self.hits += 1
            return found  # type: ignore[return-value]
        self.misses += 1
        message = message_like(self._template, data)
        message.ecu = cmd.ecu  # python-OBD's ECU filter was applied by the caller
        try:
            response = cmd([message])
            found = None if response.is_null() else value_and_unit(response.value)
        except Exception:  # noqa: BLE001 - a decoder fed odd bytes must not stop the others
            log.debug("decoding %s from %s failed", cmd.name, data.hex(), exc_info=True)
            found = None
        if len(table) >= self.per_command:
            table.clear()
        table[data] = found
        return found


def split_data(data: bytes, by_pid: dict[int, OBDCommand]) -> dict[str, bytes]:
    """One ECU's answer ``41 p1 d.. p2 d..`` as ``{name: b"\\x41" + p + data}``, for the PIDs of
    ``by_pid`` it holds. Parsing stops at a PID that was not asked for (its length is unknown)
    or at data cut short; what came before is kept."""
    out: dict[str, bytes] = {}
    if len(data) < 2 or data[0] != 0x41:
        return out
    i, end = 1, len(data)
    while i < end:
        cmd = by_pid.get(data[i])
        if cmd is None:
            if any(data[i:]):  # trailing zero padding is normal; anything else is worth a note
                log.debug("multi-PID answer %s: PID %02X not asked for, rest ignored",
                          data.hex(), data[i])
            break
        size = cmd.bytes - 2
        if i + 1 + size > end:
            log.debug("multi-PID answer %s: data of PID %02X cut short", data.hex(), data[i])
            break
        if cmd.name not in out:
            out[cmd.name] = b"\x41" + data[i:i + 1 + size]
        i += 1 + size
    return out


def split_message(message: Message, commands: Iterable[OBDCommand]) -> dict[str, Message]:
    """:func:`split_data` of a python-OBD message, as messages (with its frames and ECU)."""
    parts = split_data(bytes(message.data), {c.pid: c for c in commands})
    return {name: message_like(message, part) for name, part in parts.items()}


def decode_split(messages: Iterable[Message], commands: Sequence[OBDCommand]
                 ) -> dict[str, OBDResponse]:
    """Splits every ECU's multi-PID answer and decodes each PID with its python-OBD command."""
    per_pid: dict[str, list[Message]] = {}
    for message in messages:
        for name, part in split_message(message, commands).items():
            per_pid.setdefault(name, []).append(part)
    out: dict[str, OBDResponse] = {}
    for cmd in commands:
        parts = per_pid.get(cmd.name)
        if not parts:
            continue
        try:
            response = cmd(parts)  # python-OBD's own ECU filter and decoder
        except Exception:  # noqa: BLE001 - a decoder fed odd bytes must not stop the others
            log.debug("decoding %s from a multi-PID answer failed", cmd.name, exc_info=True)
            continue
        if not response.is_null():
            out[cmd.name] = response
    return out


def frame_count(messages: Iterable[Message]) -> int:
    """CAN frames the ECUs sent in answer (the number the response-count hint gives)."""
    return sum(len(m.frames) for m in messages if m.parsed())


def echoes(cmd: OBDCommand, message: Message, request: bytes | None = None) -> bool:
    """True when ``message`` answers ``cmd``: data starts ``0x40 + mode`` (and the PID for modes
    01, 02 and 09; for a multi-PID request, the first PID asked)."""
    data = message.data
    mode = cmd.mode
    if not data or mode is None:
        return False
    if data[0] != 0x40 + mode:
        return False
    if mode in _PID_ECHO_MODES:
        request = request if request is not None else bytes(cmd.command)
        if len(request) < 4:
            return True
        try:
            pids = {int(request[i:i + 2], 16) for i in range(2, len(request) - 1, 2)}
        except ValueError:
            return True
        return len(data) >= 2 and data[1] in pids
    return True


def answers_to(cmd: OBDCommand, messages: Iterable[Message] | None,
               request: bytes | None = None) -> list[Message]:
    """The messages that really answer ``cmd`` (see :func:`echoes`)."""
    return [m for m in messages or [] if m.parsed() and echoes(cmd, m, request)]
