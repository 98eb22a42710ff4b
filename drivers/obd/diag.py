"""Diagnostics over python-OBD: trouble code lists, MIL and readiness, freeze frame, clearing.

Every function takes ``send(cmd) -> list[Message] | None``: one request, returning the messages
that really answer it (see :func:`drivers.obd_multi.answers_to`) or ``None`` when nothing did
(``NO DATA``, an adapter error, a negative response ``7F ..``, a lost link). :class:`ObdReader`
provides it. Values are decoded by python-OBD's own decoders.

What python-OBD 0.7.3 lacks and is added here:
- mode 0A (permanent codes): :data:`GET_PERMANENT_DTC`, same layout as modes 03 and 07.
- mode 02 with a frame number: J1979 asks ``02 <pid> <frame>`` and the answer repeats the frame
  (``42 0C 00 1A F8``); python-OBD sends ``02 <pid>`` and decodes as if there were no frame byte.
  :func:`read_freeze_frame` asks for frame 00 and strips the frame byte before python-OBD's
  decoder runs, and falls back to python-OBD's form for ECUs (and the emulator) that only
  answer that one.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

import obd
from obd import OBDCommand, decoders
from obd.codes import BASE_TESTS, COMPRESSION_TESTS, SPARK_TESTS
from obd.protocols import ECU

from drivers.obd.elm327 import Message, message_like
from drivers.obd.units import value_and_unit

log = logging.getLogger(__name__)


@dataclass
class DtcReading:
    """What one DTC poll got from the vehicle; ``None`` for what did not answer (e.g. mode 0A on
    cars made before permanent codes existed)."""

    stored: list[str] | None = None
    pending: list[str] | None = None
    permanent: list[str] | None = None
    mil: bool | None = None
    monitors: dict[str, Any] | None = None
    freeze: dict[str, Any] | None = None
    ts: int | None = None

    @property
    def answered(self) -> bool:
        """True when the vehicle answered at least one of the code lists or PID 01 01."""
        return any(x is not None for x in (self.stored, self.pending, self.permanent, self.mil))

Send = Callable[[OBDCommand], "list[Message] | None"]

GET_PERMANENT_DTC = OBDCommand("GET_PERMANENT_DTC", "Get permanent DTCs", b"0A", 0, decoders.dtc,
                               ECU.ALL, False)

#: state name (PROTOCOL §4 ``dtc`` event) -> python-OBD command
DTC_COMMANDS: dict[str, OBDCommand] = {
    "stored": obd.commands.GET_DTC,
    "pending": obd.commands.GET_CURRENT_DTC,
    "permanent": GET_PERMANENT_DTC,
}

#: mode 01 PIDs read from the freeze frame (those the vehicle supports in mode 01).
FREEZE_PIDS = ("ENGINE_LOAD", "COOLANT_TEMP", "SHORT_FUEL_TRIM_1", "LONG_FUEL_TRIM_1",
               "INTAKE_PRESSURE", "RPM", "SPEED", "TIMING_ADVANCE", "INTAKE_TEMP", "MAF",
               "THROTTLE_POS", "RUN_TIME")


def read_codes(send: Send, state: str) -> list[str] | None:
    """The codes one of modes 03/07/0A reports (``["P0301", ...]``, in answer order, no
    duplicates); ``[]`` for none; ``None`` when no ECU answered."""
    cmd = DTC_COMMANDS[state]
    messages = send(cmd)
    if messages is None:
        return None
    try:
        decoded = cmd(messages).value or []
    except Exception:  # noqa: BLE001
        log.debug("mode %s answer not understood", cmd.command, exc_info=True)
        return None
    codes: list[str] = []
    for item in decoded:
        code = str(item[0]) if isinstance(item, tuple) else str(item)
        if code not in codes:
            codes.append(code)
    return codes


def read_status(send: Send) -> dict[str, Any] | None:
    """PID 01 01: ``{"mil": bool, "dtc_count": int, "ignition": "spark"|"compression"|"",
    "monitors": {NAME: {"available": bool, "complete": bool}}}``; ``None`` without an answer."""
    cmd = obd.commands.STATUS
    messages = send(cmd)
    if messages is None:
        return None
    try:
        status = cmd(messages).value
    except Exception:  # noqa: BLE001
        log.debug("PID 01 01 answer not understood", exc_info=True)
        return None
    if status is None:
        return None
    monitors: dict[str, dict[str, bool]] = {}
    for name in BASE_TESTS + SPARK_TESTS + COMPRESSION_TESTS:
        test = getattr(status, name, None) if name else None
        if test is not None and getattr(test, "name", ""):  # nameless: python-OBD's placeholder
            monitors[name] = {"available": bool(test.available), "complete": bool(test.complete)}
    return {"mil": bool(status.MIL), "dtc_count": int(status.DTC_count),
            "ignition": str(status.ignition_type or "").lower(), "monitors": monitors}


def _request(cmd: OBDCommand, frame: int | None) -> OBDCommand:
    """``cmd`` as sent: with the frame number (or without), and with no fixed length, since
    python-OBD cuts answers to the length in place, before the frame byte can be removed."""
    request = cmd.clone()
    if frame is not None:
        request.command = cmd.command + b"%02X" % frame
    request.bytes = 0
    return request


def _strip_frame(messages: list[Message], cmd: OBDCommand) -> list[Message]:
    """``42 pid frame data`` -> ``42 pid data`` where the answer carries the frame byte (one
    byte longer than python-OBD's length for the PID)."""
    out = []
    for m in messages:
        data = bytearray(m.data)
        if cmd.bytes and len(data) == cmd.bytes + 1:
            del data[2]
        out.append(message_like(m, data))
    return out


class FreezeFrameReader:
    """Reads mode 02 frame 00, remembering which request form the ECU answers (with the frame
    number, or python-OBD's without). One per connection."""

    def __init__(self, send: Send):
        self._send = send
        self._forms: list[bool] = [True, False]  # with frame number first

    def query(self, cmd: OBDCommand) -> Any | None:
        """The decoded value of a python-OBD mode 02 command, or ``None``."""
        for with_frame in list(self._forms):
            request = _request(cmd, 0 if with_frame else None)
            messages = self._send(request)
            if not messages:
                continue
            if self._forms[0] != with_frame:
                self._forms.remove(with_frame)
                self._forms.insert(0, with_frame)
                log.info("OBD freeze frame: the ECU answers mode 02 %s the frame number",
                         "with" if with_frame else "without")
            try:
                response = cmd(_strip_frame(messages, cmd))
            except Exception:  # noqa: BLE001
                log.debug("freeze frame %s not understood", cmd.name, exc_info=True)
                return None
            return None if response.is_null() else response.value
        return None

    def read(self, supported: set[str] | None = None) -> dict[str, Any] | None:
        """``{"code": "P0301", "values": {PID: {"value": float, "unit": text}}}`` for frame 00;
        ``None`` when no freeze frame is stored (or the ECU does not answer mode 02).
        ``supported``: the vehicle's mode 01 PIDs (python-OBD names), to skip the rest."""
        dtc = self.query(obd.commands.DTC_FREEZE_DTC)
        # 0000 is "no code" (python-OBD's own check for it compares a bytearray with a tuple)
        if not dtc or not isinstance(dtc, tuple) or not dtc[0] or dtc[0] == "P0000":
            return None
        values: dict[str, dict[str, Any]] = {}
        for name in FREEZE_PIDS:
            if supported is not None and name not in supported:
                continue
            mode2 = f"DTC_{name}"
            if not obd.commands.has_name(mode2):
                continue
            number = value_and_unit(self.query(obd.commands[mode2]))
            if number is not None:
                values[name] = {"value": number[0], "unit": number[1]}
        return {"code": str(dtc[0]), "values": values}


def clear_codes(send: Send) -> bool:
    """Mode 04: clears stored codes, freeze frame and readiness. True when an ECU confirmed
    (``44``)."""
    return bool(send(obd.commands.CLEAR_DTC))
