"""UDS requests through an ELM327 adapter: the dongle's path when it has no CAN controller.

The ELM327 does the ISO-TP transport itself (it sends the flow control and collects the
consecutive frames); this module configures it for one ECU at a time and reads what it prints:

- ``ATE0 ATL0 ATS0 ATH1 ATCAF1``: no echo, no spaces, CAN ids shown, PCI bytes shown — every
  line is one CAN frame, ``7EC103E620101EFFBE7`` (the format OBDb's captures are in);
- ``ATSP6`` / ``ATSP7``: ISO 15765-4 CAN 500 kbit/s with 11-bit / 29-bit ids (switched per ECU);
- ``ATSH`` (+ ``ATCP`` for the top bits of a 29-bit id): the request id; ``ATCRA``: show only the
  ECU's answer id; ``ATFCSH`` / ``ATFCSD 300000`` / ``ATFCSM1``: send our flow control from the
  request id (the ELM's automatic one assumes the answer id minus 8, wrong for e.g. 79B/7BB);
- ``ATST``: how long to wait for an answer (4 ms steps).

The printed frames go through can-isotp's receive logic (:class:`drivers.uds.IsoTpReplay`): a
sequence gap, a frame cut short or a line garbled on the serial link means no message, never a
wrong one. ``7F xx 78`` (response pending) lines are followed by the answer within ``ATST``; if
only the pending answer arrived the request is asked once more. ``NO DATA`` is a timeout;
``CAN ERROR``, ``BUFFER FULL``, ``?`` and a missing prompt are transport errors.

Line I/O: :class:`SerialLines` owns a pyserial port. :class:`PythonObdLines` borrows the
connection of a python-OBD ``obd.OBD`` (python-OBD 0.7.x's private line I/O, through
:func:`drivers.obd.elm327.line_sender`) so one adapter serves both the PID poller and this
module — the caller must not run the two at the same time, and :meth:`ElmIsoTp.release` puts
back what python-OBD expects (``ATSH 7DF``, ``ATAR``, ``ATFCSM0``, its protocol) before the
poller queries again.
"""
from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Sequence
from typing import Any, Protocol

import isotp

from drivers.uds import NRC_RESPONSE_PENDING, IsoTpReplay, Outcome, Target, UdsStats, check_echo

log = logging.getLogger(__name__)

_HEX_RE = re.compile(r"^[0-9A-F]+$")
#: What an ELM327 prints instead of data, and what each means for us.
_ERRORS = {"NO DATA": "timeout", "CAN ERROR": "transport", "BUS ERROR": "transport",
           "BUFFER FULL": "transport", "UNABLE TO CONNECT": "transport", "STOPPED": "transport",
           "?": "transport", "ERR": "transport", "BUS BUSY": "transport", "FB ERROR": "transport",
           "LV RESET": "transport", "ACT ALERT": "transport"}


class LineIO(Protocol):
    """Sends one command line to the adapter and returns its answer lines (prompt removed)."""

    def command(self, text: str, timeout_s: float) -> list[str] | None: ...

    def close(self) -> None: ...


def parse_frames(lines: Sequence[str], target: Target) -> tuple[list[tuple[int, bytes]], list[str]]:
    """``(frames from target.rx, error words)`` from ELM327 output with headers on (spaces on or
    off). Lines of other ids are dropped; an unparsable line is reported as ``"garbled"``."""
    width = 8 if target.extended else 3
    frames: list[tuple[int, bytes]] = []
    errors: list[str] = []
    for line in lines:
        text = line.strip().upper()
        if not text or text in ("OK", ">") or text.startswith("SEARCHING"):
            continue
        word = next((w for w in _ERRORS if text.startswith(w)), None)
        if word is not None:
            errors.append(word)
            continue
        compact = text.replace(" ", "")
        if len(compact) <= width or not _HEX_RE.match(compact) or (len(compact) - width) % 2:
            errors.append("garbled")
            continue
        can_id = int(compact[:width], 16)
        if can_id != target.rx:
            continue
        frames.append((can_id, bytes.fromhex(compact[width:])))
    return frames, errors


def payloads_from_lines(lines: Sequence[str], target: Target) -> tuple[list[bytes], list[str]]:
    """The complete ISO-TP messages in ELM327 output (via can-isotp), and the errors seen
    (ELM words, ``"garbled"`` lines, can-isotp error names)."""
    frames, errors = parse_frames(lines, target)
    replay = IsoTpReplay(_rx_address(target))
    payloads = replay.feed(frames)
    replay.finish()
    errors.extend(sorted(replay.errors.elements()))
    return payloads, errors


def _rx_address(target: Target) -> isotp.Address:
    mode = isotp.AddressingMode.Normal_29bits if target.extended else isotp.AddressingMode.Normal_11bits
    return isotp.Address(mode, txid=target.tx, rxid=target.rx)


class SerialLines:
    """ELM327 line I/O over pyserial (a USB/Bluetooth adapter or a pty)."""

    def __init__(self, port: str, baudrate: int = 38400):
        import serial  # pyserial: only needed on this path

        self._serial = serial.Serial(port, baudrate=baudrate, timeout=0.05, write_timeout=2.0)

    def command(self, text: str, timeout_s: float) -> list[str] | None:
        ser = self._serial
        ser.reset_input_buffer()
        ser.write(text.encode("ascii") + b"\r")
        ser.flush()
        buf = bytearray()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            chunk = ser.read(ser.in_waiting or 1)
            if chunk:
                buf += chunk
                if b">" in buf:
                    text_out = buf[:buf.index(b">")].decode("ascii", "replace")
                    return [ln.strip() for ln in re.split(r"[\r\n]+", text_out) if ln.strip()]
        return None

    def close(self) -> None:
        try:
            self._serial.close()
        except Exception:  # noqa: BLE001
            log.debug("closing the serial port failed", exc_info=True)


class PythonObdLines:
    """ELM327 line I/O through a connected python-OBD ``obd.OBD`` (0.7.x, private API)."""

    def __init__(self, connection: Any):
        from drivers.obd import elm327  # python-OBD (and pint) only on this path

        self._send = elm327.line_sender(connection)

    def command(self, text: str, timeout_s: float) -> list[str] | None:
        try:
            lines = self._send(text.encode("ascii"))
        except Exception as e:  # noqa: BLE001
            log.debug("python-OBD send %s failed: %s", text, e)
            return None
        return [ln.strip() for ln in lines if ln.strip()]

    def close(self) -> None:
        """The python-OBD connection belongs to its owner; nothing to close here."""


class ElmIsoTp:
    """UDS requests (0x22, 0x21, 0x01) through an ELM327. Same interface as
    :class:`drivers.uds.UdsClient`: :meth:`request`, :meth:`read`, :meth:`status`, :meth:`close`.

    ``p2_s`` becomes the adapter's ``ATST``; ``count_hint``: append the expected number of
    answers to each request (ELM327 v1.3+), so the adapter returns as soon as the answer is
    complete instead of waiting ``ATST`` for more ECUs.
    """

    def __init__(self, lines: LineIO, *, p2_s: float = 1.0, count_hint: bool = True,
                 restore_protocol: str | None = None):
        self._io = lines
        self._p2_s = p2_s
        self._count_hint = count_hint
        self._restore_protocol = restore_protocol
        self._lock = threading.Lock()
        self._ready = False
        self._protocol: str | None = None
        self._target: Target | None = None
        self.stats = UdsStats()
        self.adapter: str | None = None

    @classmethod
    def open_serial(cls, port: str, baudrate: int = 38400, **kw: Any) -> ElmIsoTp:
        return cls(SerialLines(port, baudrate), **kw)

    @classmethod
    def from_python_obd(cls, connection: Any, **kw: Any) -> ElmIsoTp:
        """Borrows a python-OBD connection; :meth:`release` hands the adapter back."""
        protocol = None
        try:
            protocol = connection.protocol_id()
        except Exception:  # noqa: BLE001
            pass
        return cls(PythonObdLines(connection), restore_protocol=protocol, **kw)

    # -- adapter setup -------------------------------------------------------------------------

    def _at(self, command: str, timeout_s: float = 2.0) -> bool:
        lines = self._io.command(command, timeout_s)
        if lines is None:
            raise ConnectionError(f"{command}: no prompt from the adapter")
        if any(ln.strip() == "?" for ln in lines):
            raise ConnectionError(f"{command}: adapter answered '?'")
        return True

    def _setup(self) -> None:
        if self._ready:
            return
        lines = self._io.command("ATZ", 5.0)
        if lines is None:
            raise ConnectionError("ATZ: no prompt from the adapter")
        self.adapter = next((ln for ln in lines if "ELM" in ln.upper()), None)
        for cmd in ("ATE0", "ATL0", "ATS0", "ATH1", "ATCAF1", "ATAT1",
                    f"ATST{max(1, min(255, round(self._p2_s * 1000 / 4))):02X}"):
            self._at(cmd)
        self._ready = True
        self._protocol = None
        self._target = None

    def _select(self, target: Target) -> None:
        protocol = "7" if target.extended else "6"
        if protocol != self._protocol:
            self._at(f"ATSP{protocol}")
            self._protocol = protocol
            self._target = None
        if target == self._target:
            return
        if target.extended:
            self._at(f"ATCP{(target.tx >> 24) & 0x1F:02X}")
            self._at(f"ATSH{target.tx & 0xFFFFFF:06X}")
            self._at(f"ATCRA{target.rx:08X}")
            self._at(f"ATFCSH{target.tx:08X}")
        else:
            self._at(f"ATSH{target.tx:03X}")
            self._at(f"ATCRA{target.rx:03X}")
            self._at(f"ATFCSH{target.tx:03X}")
        self._at("ATFCSD300000")
        self._at("ATFCSM1")
        self._target = target

    # -- requests ------------------------------------------------------------------------------

    def request(self, target: Target, payload: bytes) -> Outcome:
        with self._lock:
            started = time.monotonic()
            try:
                self._setup()
                self._select(target)
                outcome = self._exchange(target, payload)
            except (ConnectionError, OSError, ValueError) as e:
                self._ready = False
                self.stats.transport_errors[type(e).__name__] += 1
                self.stats.last_error = f"{target}: {e}"
                log.warning("ELM327 %s %s: %s", target, payload.hex(), e)
                outcome = Outcome(False, error="transport")
            outcome = Outcome(outcome.ok, outcome.response, outcome.error, outcome.nrc,
                              outcome.pending, time.monotonic() - started)
            self.stats.record(outcome)
            if not outcome.ok and outcome.error not in ("negative",) and not self.stats.last_error:
                self.stats.last_error = f"{target} {payload.hex()}: {outcome.error}"
            return outcome

    def read(self, req: Any) -> Outcome:
        return self.request(Target.of(req), req.payload)

    def _exchange(self, target: Target, payload: bytes) -> Outcome:
        pending = 0
        hint = self._count_hint
        for _attempt in range(3):
            text = payload.hex().upper() + ("1" if hint else "")
            lines = self._io.command(text, self._p2_s + 3.0)
            if lines is None:
                raise ConnectionError(f"{text}: no prompt from the adapter")
            payloads, errors = payloads_from_lines(lines, target)
            for err in errors:
                if err not in _ERRORS or _ERRORS[err] == "transport":
                    self.stats.transport_errors[err] += 1
            final = None
            for p in payloads:
                if len(p) >= 3 and p[0] == 0x7F and p[2] == NRC_RESPONSE_PENDING:
                    pending += 1
                    continue
                final = p
            if final is None:
                if payloads and pending:  # only "pending" arrived: listen again, without the hint
                    hint = False
                    continue
                kind = "transport" if any(_ERRORS.get(e) == "transport" for e in errors) else "timeout"
                if errors:
                    self.stats.last_error = f"{target} {payload.hex()}: {', '.join(errors)}"
                return Outcome(False, error=kind, pending=pending)
            if final[0] == 0x7F:
                nrc = final[2] if len(final) >= 3 else None
                return Outcome(False, error="negative", nrc=nrc, pending=pending)
            if not check_echo(payload, final):
                return Outcome(False, error="invalid", pending=pending)
            return Outcome(True, final, pending=pending)
        return Outcome(False, error="timeout", pending=pending)

    # -- lifecycle -----------------------------------------------------------------------------

    def release(self) -> None:
        """Puts back the settings python-OBD relies on (when the adapter is borrowed)."""
        with self._lock:
            if not self._ready:
                return
            try:
                for cmd in ("ATFCSM0", "ATAR", "ATCP18", "ATSH7DF", "ATS1"):
                    self._at(cmd)
                if self._restore_protocol:
                    self._at(f"ATSP{self._restore_protocol}")
            except (ConnectionError, OSError) as e:
                log.warning("ELM327: restoring settings failed: %s", e)
            self._ready = False

    def close(self) -> None:
        self.release()
        self._io.close()

    def __enter__(self) -> ElmIsoTp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def status(self) -> dict[str, Any]:
        return {"path": "elm327", "adapter": self.adapter, **self.stats.as_dict()}
