"""OBD-II through an ELM327 adapter, using python-OBD.

:class:`ObdReader` is one connection: synchronous, never raises for adapter trouble (a missing
port, a dead or babbling adapter, NO DATA), answers ``(value, unit_text)`` or ``None``.
What to ask and when (scheduling, reconnects, trouble-code tracking) is the agent's OBD poller
(agent/vehicle/obd.py).

Ports: ``port`` may be a symlink (a udev name such as ``/dev/serial/by-id/...``, or the link
``scripts.elm_emulator.ElmEmulator(link=...)`` keeps); it is resolved again at every connect, so
an adapter that comes back on another tty is found by the same name.

Adapter bring-up is python-OBD's (``ATZ``, ``ATE0`` echo off, ``ATH1`` headers on, ``ATL0``,
``ATSP0`` protocol auto-detect unless a protocol is given, supported-PID walk ``01 00``, ``01 20``,
..., ``09 00``), plus ``ATAT1`` (adaptive timing; a clone answering ``?`` is logged and
tolerated). Every request goes through :meth:`ObdReader._send`, which keeps only the messages
that echo the request (``41 0C ..`` for ``01 0C``): ELM texts (``NO DATA``, ``?``,
``BUS INIT: ...ERROR``, ``CAN ERROR``, ``STOPPED``, ``BUFFER FULL``, ...), negative responses
and late answers to an earlier request are logged and give ``None``; dropped characters make
python-OBD's frame parser drop the frame. None of it is fatal; ``fail_limit`` requests in a row
without an answer make the poller reconnect.

Multi-PID (drivers/obd/multi.py): PIDs due together go out as one mode 01 request of up to six
PIDs on CAN protocols, with the ELM327 response-count hint (the frame count of the previous
answer) once known. An adapter answering ``?`` to the hint gets requests without it; a vehicle
whose multi-PID answers lack PIDs that single requests get (twice in a row) gets one PID per
request for the rest of the connection. Non-CAN protocols get one PID per request.

python-OBD notes (0.7.3) that shape this module:
- ``obd.OBD()`` connects inside its constructor; ``fast=False`` avoids its response-count
  shortcuts, which confuse adapters that answer slowly.
- Its VIN decoder strips the characters ``0``, ``1``, ``2`` and ``x`` off both ends (a
  ``strip()`` with a bytes literal meant as escapes), so VINs ending in ``0`` lose digits; the
  VIN is decoded here from the raw message instead.
- ``close()`` sends ``ATZ`` and does not wait for the answer; the adapter's reset banner then
  arrives during the next connect and fails its ``ATE0`` check. A reconnect to the same port
  therefore waits :data:`ATZ_SETTLE_S` after a close.
- Its pyserial port reads with a 10 s timeout, and a query whose answer holds no text (an
  adapter that sends just a prompt, or bytes that are not text) is read again up to ten times:
  up to 100 s per query. Once connected, the read timeout is lowered to ``timeout_s`` through
  the ELM327 object's private port attribute (python-OBD 0.7.x has no API for it; without the
  attribute, the 10 s stays; drivers/obd/elm327.py holds every use of python-OBD's internals).
  Connect attempts keep the 10 s, as the protocol search needs it: an adapter that answers the
  connect's supported-PID walk with text-less bytes can make one connect attempt take minutes
  (python-OBD offers no hook to shorten it).
- Its ``OBDCommand`` cuts or pads every answer to the command's length in place while decoding;
  commands whose answers need reshaping first (multi-PID, mode 02 with a frame number) are
  sent with no fixed length (drivers/obd/multi.py, drivers/obd/diag.py).
- Its DTC decoder reads an ELM text answer (``NO DATA``) as "no codes": the echo check above
  keeps that from ever clearing a reported set.
"""
from __future__ import annotations

import logging
import os
import re
import threading
import time
from typing import Any, Callable, Iterable

import obd
from obd import OBDStatus

from drivers.core import vin as vin_check
from drivers.obd import diag as obd_diag
from drivers.obd import elm327
from drivers.obd.multi import (CAN_PROTOCOL_IDS, MAX_PIDS_PER_REQUEST, MultiPidCommand,
                               adapter_error, answers_to, frame_count, is_multi_capable)
from drivers.obd.units import unit_text, value_and_unit  # noqa: F401 - re-exported

log = logging.getLogger(__name__)

#: Seconds to let an adapter finish the ATZ that python-OBD's close() sends.
ATZ_SETTLE_S = 1.0

_VIN_RE = re.compile(rb"[A-Z0-9]{17}")

_last_close: dict[str, float] = {}  # realpath -> monotonic time of our last close of it
_last_close_lock = threading.Lock()


def decode_vin(data: bytes | bytearray) -> str | None:
    """VIN text from the data of a mode 09 PID 02 answer (``49 02 01`` + 17 ASCII characters,
    possibly padded with NULs); ``None`` when no 17-character run is there."""
    body = bytes(data[2:]) if data[:2] == b"\x49\x02" else bytes(data)
    match = _VIN_RE.search(body)
    return match.group().decode("ascii") if match else None


def vin_is_valid(vin: str | None) -> bool:
    """:func:`agent.vin.validate`: 17 characters of the VIN alphabet (no I, O, Q), and the check
    digit for North American vehicles (WMI 1-5), where it is mandatory."""
    return vin_check.validate(vin)[0]


def command_for(name: str) -> Any | None:
    """The python-OBD command called ``name`` (e.g. ``"RPM"``), or ``None``."""
    try:
        if isinstance(name, str) and obd.commands.has_name(name):
            return obd.commands[name]
    except Exception:  # noqa: BLE001 - a library lookup must not crash the caller
        log.debug("lookup of OBD command %r failed", name, exc_info=True)
    return None


def _protocol_arg(protocol: str | int | None) -> str | None:
    if protocol is None:
        return None
    if isinstance(protocol, int):
        return f"{protocol:X}"
    return str(protocol).upper()


class ObdReader:
    """One connection to an ELM327 adapter. Not thread-safe: use it from one thread.

    Multi-PID state (per connection, so a reconnect to another car starts afresh):
    :attr:`multi_pid` is ``None`` until a multi-PID request was fully answered (``True``) or the
    vehicle was seen to leave out PIDs it answers one at a time (``False``: one PID per request
    from then on); :attr:`count_hint` likewise for the ELM327 response-count hint.
    """

    #: multi-PID requests whose answer lacked PIDs that single requests then got, before the
    #: reader falls back to one PID per request
    MULTI_MISS_LIMIT = 2

    def __init__(self, port: str, *, baudrate: int | None = None,
                 protocol: str | int | None = None, timeout_s: float = 2.0):
        self.port = port
        self.baudrate = baudrate
        self.protocol = _protocol_arg(protocol)
        self.timeout_s = timeout_s
        self.last_error: str | None = None
        self.multi_pid: bool | None = None
        self.count_hint: bool | None = None
        self._conn: Any | None = None
        self._device: str | None = None
        self._frame_counts: dict[bytes, int] = {}
        self._multi_misses = 0
        self._freeze: obd_diag.FreezeFrameReader | None = None

    def connect(self) -> bool:
        """Opens the adapter and talks to the vehicle. ``False`` (logged, :attr:`last_error`)
        when the port is missing, the adapter does not answer sensibly or no vehicle answers."""
        self.close()
        device = os.path.realpath(self.port)
        if not os.path.exists(device):
            return self._fail(f"port {self.port} does not exist")
        with _last_close_lock:
            closed_at = _last_close.get(device)
        if closed_at is not None:
            wait = closed_at + ATZ_SETTLE_S - time.monotonic()
            if wait > 0:
                time.sleep(wait)
        try:
            conn = obd.OBD(device, baudrate=self.baudrate, protocol=self.protocol, fast=False,
                           timeout=self.timeout_s)
        except Exception as e:  # noqa: BLE001 - python-OBD raises odd things on odd answers
            return self._fail(f"connecting to {self.port} failed: {e!r}")
        status = self._status(conn)
        if status != OBDStatus.CAR_CONNECTED:
            self._close_conn(conn, device)
            if status in (OBDStatus.ELM_CONNECTED, OBDStatus.OBD_CONNECTED):
                return self._fail(f"adapter on {self.port} answers but no vehicle does "
                                  f"(ignition off?): {status}")
            return self._fail(f"no working ELM327 adapter on {self.port}")
        elm327.set_read_timeout(conn, self.timeout_s)
        self._conn = conn
        self._device = device
        self.last_error = None
        self.multi_pid = None
        self.count_hint = None
        self._frame_counts = {}
        self._multi_misses = 0
        self._freeze = obd_diag.FreezeFrameReader(self._send)
        self._adapter_setting(b"ATAT1", "adaptive timing")
        log.info("OBD connected on %s (%s), protocol %s", self.port, device, self.protocol_name)
        return True

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            self._close_conn(conn, self._device)

    @property
    def connected(self) -> bool:
        """True while the adapter and the vehicle answer; False once the adapter is lost."""
        return self._conn is not None and self._status(self._conn) == OBDStatus.CAR_CONNECTED

    @property
    def protocol_name(self) -> str | None:
        if self._conn is None:
            return None
        try:
            return self._conn.protocol_name() or None
        except Exception:  # noqa: BLE001
            return None

    @property
    def protocol_id(self) -> str | None:
        if self._conn is None:
            return None
        try:
            return str(self._conn.protocol_id() or "") or None
        except Exception:  # noqa: BLE001
            return None

    @property
    def max_pids_per_request(self) -> int:
        """6 on CAN protocols until the vehicle shows it does not take multi-PID requests; 1 on
        the older protocols (J1850, ISO 9141, KWP2000), where J1979 has one PID per request."""
        if self.multi_pid is False or self.protocol_id not in CAN_PROTOCOL_IDS:
            return 1
        return MAX_PIDS_PER_REQUEST

    def can_group(self, command_name: str) -> bool:
        """True when ``command_name`` may share a multi-PID request with others."""
        return is_multi_capable(command_for(command_name))

    def supports(self, command_name: str) -> bool:
        cmd = command_for(command_name)
        if cmd is None or self._conn is None:
            return False
        try:
            return bool(self._conn.supports(cmd))
        except Exception:  # noqa: BLE001
            return False

    def supported_pids(self) -> set[str]:
        """python-OBD names of the commands the vehicle's supported-PID bitmaps (01 00, 01 20,
        ..., 09 00) and the adapter offer; empty when not connected."""
        if self._conn is None:
            return set()
        try:
            return {c.name for c in self._conn.supported_commands}
        except Exception:  # noqa: BLE001
            return set()

    def query(self, command_name: str) -> tuple[float, str] | None:
        """``(value, unit text)``; ``None`` for an unknown or unsupported command, NO DATA, an
        unparseable or non-numeric answer, or a lost adapter."""
        response = self._query(command_name)
        if response is None:
            return None
        try:
            result = value_and_unit(response.value)
        except Exception:  # noqa: BLE001
            result = None
        if result is None:
            self.last_error = f"{command_name}: not a numeric answer"
            log.debug("OBD %s: not a numeric answer: %r", command_name, response.value)
        return result

    def read_pids(self, command_names: Iterable[str]) -> dict[str, tuple[float, str]]:
        """``{name: (value, unit text)}`` for the PIDs that answered, asking up to
        :attr:`max_pids_per_request` PIDs in one mode 01 request (callers pass at most that
        many). Missing from the result: PIDs without an answer (see :attr:`last_error`)."""
        names = list(dict.fromkeys(command_names))
        results: dict[str, tuple[float, str]] = {}
        groupable = [n for n in names if self.can_group(n) and self.supports(n)]
        singles = [n for n in names if n not in groupable]
        if self.max_pids_per_request > 1 and len(groupable) >= 2:
            group = groupable[:self.max_pids_per_request]
            singles += groupable[len(group):]
            got, answered = self._query_group(group)
            results.update(got)
            missing = [n for n in group if n not in got]
            if not missing:
                self._multi_misses = 0
                if self.multi_pid is None:
                    self.multi_pid = True
                    log.info("OBD: the vehicle answers multi-PID requests")
            elif answered or self.multi_pid is None:
                retried = {n: v for n in missing if (v := self._query_single(n)) is not None}
                results.update(retried)
                if retried:
                    self._multi_misses += 1
                    log.info("OBD: a multi-PID answer lacked %s, which single requests got",
                             ", ".join(sorted(retried)))
                    if self._multi_misses >= self.MULTI_MISS_LIMIT:
                        self.multi_pid = False
                        log.warning("OBD: the vehicle does not answer multi-PID requests in "
                                    "full; falling back to one PID per request")
        else:
            singles = names
        for n in singles:
            value = self._query_single(n)
            if value is not None:
                results[n] = value
        return results

    def read_vin(self) -> str | None:
        response = self._query("VIN")
        if response is None:
            return None
        try:
            for message in response.messages:
                vin = decode_vin(message.data)
                if vin:
                    return vin
        except Exception:  # noqa: BLE001
            log.debug("OBD VIN answer not understood", exc_info=True)
        self.last_error = "VIN: answer not understood"
        return None

    def read_dtcs(self, command_name: str = "GET_DTC") -> list[str] | None:
        """Trouble codes from ``GET_DTC`` (stored, mode 03), ``GET_CURRENT_DTC`` (pending, 07) or
        ``GET_PERMANENT_DTC`` (permanent, 0A); ``[]`` when none, ``None`` when there is no
        answer. (Their descriptions are the agent's: agent/vehicle/dtc.py.)"""
        state = {"GET_DTC": "stored", "GET_CURRENT_DTC": "pending",
                 "GET_PERMANENT_DTC": "permanent"}.get(command_name)
        if state is None:
            self.last_error = f"{command_name}: not a trouble code command"
            return None
        return obd_diag.read_codes(self._send, state)

    def read_status(self) -> dict[str, Any] | None:
        """PID 01 01: MIL, number of stored codes, readiness monitors (see
        :func:`drivers.obd_diag.read_status`)."""
        return obd_diag.read_status(self._send)

    def read_freeze_frame(self) -> dict[str, Any] | None:
        """Freeze frame 00 (mode 02): the code that stored it and the values it holds."""
        if self._freeze is None:
            return None
        return self._freeze.read(self.supported_pids())

    def read_dtc_reading(self, *, freeze: bool = False) -> obd_diag.DtcReading:
        """Stored, pending and permanent codes, MIL and readiness (and the freeze frame when
        ``freeze`` and a code is stored). Parts the vehicle does not answer are ``None``."""
        reading = obd_diag.DtcReading()
        status = self.read_status()
        if status is not None:
            reading.mil = status["mil"]
            reading.monitors = status["monitors"]
        for state in ("stored", "pending", "permanent"):
            setattr(reading, state, obd_diag.read_codes(self._send, state))
        if freeze and reading.stored:
            reading.freeze = self.read_freeze_frame()
        return reading

    def clear_dtcs(self) -> bool:
        """Mode 04: clears the codes, freeze frame and readiness. True when an ECU confirmed.
        Only for a confirmed technician request (PROTOCOL §4 ``clear_dtc``)."""
        ok = obd_diag.clear_codes(self._send)
        log.warning("OBD: trouble codes %s", "cleared (mode 04)" if ok else "NOT cleared: "
                    f"{self.last_error or 'no confirmation'}")
        return ok

    # -- internals ---------------------------------------------------------------------------

    def _query_single(self, command_name: str) -> tuple[float, str] | None:
        """One PID in one request; with the response-count hint for mode 01 PIDs on CAN."""
        if self.protocol_id in CAN_PROTOCOL_IDS and self.can_group(command_name) \
                and self.supports(command_name):
            got, _ = self._query_group([command_name])
            return got.get(command_name)
        return self.query(command_name)

    def _query_group(self, command_names: list[str]) -> tuple[dict[str, tuple[float, str]], bool]:
        """One mode 01 request for ``command_names``; ``({name: value}, answered)``."""
        base = MultiPidCommand([command_for(n) for n in command_names])
        hint = self._frame_counts.get(base.request) if self.count_hint is not False else None
        messages = self._send(MultiPidCommand(base.commands, hint) if hint else base)
        if messages is None and hint:
            error = self.last_error
            messages = self._send(base)
            if messages is not None:
                self.count_hint = False
                log.info("OBD: the adapter does not take the response-count hint (%s); "
                         "requests go without it", error)
        if messages is None:
            return {}, False
        if hint:
            if self.count_hint is None:
                self.count_hint = True
                log.info("OBD: the adapter takes the response-count hint")
        else:
            frames = frame_count(messages)
            if 1 <= frames <= 15:
                self._frame_counts[base.request] = frames
        try:
            decoded = base(messages).value or {}
        except Exception:  # noqa: BLE001
            log.debug("OBD multi-PID answer not understood", exc_info=True)
            decoded = {}
        values: dict[str, tuple[float, str]] = {}
        for name, response in decoded.items():
            number = value_and_unit(response.value)
            if number is not None:
                values[name] = number
        missing = [n for n in command_names if n not in values]
        if missing:
            self.last_error = f"{', '.join(missing)}: no answer"
        return values, True

    def _query(self, command_name: str) -> Any | None:
        cmd = command_for(command_name)
        if cmd is None:
            self.last_error = f"unknown OBD command {command_name!r}"
            return None
        if self._conn is None:
            self.last_error = "not connected"
            return None
        try:
            if not self._conn.supports(cmd):
                self.last_error = f"{command_name}: not supported by the vehicle"
                return None
        except Exception as e:  # noqa: BLE001
            self.last_error = f"{command_name}: query failed: {e!r}"
            return None
        messages = self._send(cmd)
        if messages is None:
            return None
        try:
            response = cmd(messages)
        except Exception as e:  # noqa: BLE001
            self.last_error = f"{command_name}: answer not understood: {e!r}"
            log.debug("OBD answer to %s not understood", command_name, exc_info=True)
            return None
        if response is None or response.is_null():
            self.last_error = f"{command_name}: no answer"
            return None
        return response

    def _send(self, cmd: Any) -> list[Any] | None:
        """Sends ``cmd`` (python-OBD, unchecked) and returns the messages that answer it; ``None``
        (with :attr:`last_error`) for no answer, an ELM error text, a negative response, an
        answer to another request (a late answer) or a lost adapter."""
        name = getattr(cmd, "name", "?")
        if self._conn is None:
            self.last_error = "not connected"
            return None
        try:
            response = self._conn.query(cmd, force=True)
        except Exception as e:  # noqa: BLE001 - python-OBD raises odd things on odd answers
            self.last_error = f"{name}: query failed: {e!r}"
            log.debug("OBD query %s failed", name, exc_info=True)
            return None
        messages = list(getattr(response, "messages", None) or [])
        if cmd.mode is None:  # an adapter command (AT RV): its answer is text, not OBD data
            if messages:
                return messages
            self.last_error = f"{name}: no answer"
            return None
        good = answers_to(cmd, messages, bytes(cmd.command))
        others = [m for m in messages if m.parsed() and m not in good]
        if others:
            log.info("OBD %s: ignored %d message(s) that do not answer it (late answer or "
                     "negative response): %s", name, len(others),
                     "; ".join(bytes(m.data).hex(" ") for m in others))
        if good:
            return good
        error = adapter_error(messages)
        if error is not None:
            self.last_error = f"{name}: adapter says {error!r}"
        elif others:
            self.last_error = f"{name}: no matching answer"
        elif not messages:
            self.last_error = (f"{name}: no answer" if self.connected
                               else f"adapter on {self.port} lost")
        else:
            self.last_error = f"{name}: no answer"
        log.debug("OBD %s", self.last_error)
        return None

    def _adapter_setting(self, command: bytes, what: str) -> None:
        """An AT setting that helps but is not essential (clones answer ``?`` to some)."""
        try:
            lines = [m.raw() for m in elm327.send_and_parse(self._conn, command)]
        except Exception as e:  # noqa: BLE001
            lines = [repr(e)]
        if "OK" not in lines:
            log.info("OBD adapter: %s (%s) not set: %s", what, command.decode(), lines or "silence")

    def _fail(self, message: str) -> bool:
        self.last_error = message
        log.info("OBD: %s", message)
        return False

    @staticmethod
    def _status(conn: Any) -> Any:
        try:
            return conn.status()
        except Exception:  # noqa: BLE001
            return OBDStatus.NOT_CONNECTED

    @staticmethod
    def _close_conn(conn: Any, device: str | None) -> None:
        try:
            conn.close()
        except Exception:  # noqa: BLE001 - closing a vanished port raises inside python-OBD
            log.debug("closing the OBD connection failed", exc_info=True)
        if device is not None:
            with _last_close_lock:
                _last_close[device] = time.monotonic()
