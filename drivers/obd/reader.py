"""OBD-II through an ELM327 adapter, using python-OBD.

:class:`ObdReader` is one connection: synchronous, never raises for adapter trouble (a missing
port, a dead or babbling adapter, NO DATA), answers ``(value, unit_text)`` or ``None``.
:class:`ObdPoller` owns a thread that keeps a reader connected (reconnecting with
:class:`agent.backoff.Backoff`), polls the configured PIDs (PROTOCOL §4 ``obd.pids``) each on
its own period and hands :class:`agent.model.Sample` lists to a sink; it also reads the trouble
codes every ``obd.dtc_period_s`` and reports changes as ``dtc`` event bodies (agent/vehicle/dtc.py).

Ports: ``port`` may be a symlink (a udev name such as ``/dev/serial/by-id/...``, or the link
``scripts.elm_emulator.ElmEmulator(link=...)`` keeps); it is resolved again at every connect, so
an adapter that comes back on another tty is found by the same name. :meth:`ObdPoller.set_port`
re-points a running poller explicitly.

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
import math
import os
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import obd
from obd import OBDStatus

from drivers.core import vin as vin_check
from drivers.core.backoff import Backoff
from drivers.core.clock import now_ms
from agent.vehicle.dtc import DtcReading, DtcTracker, describe
from drivers.core.model import Sample
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

    def read_dtcs(self, command_name: str = "GET_DTC") -> list[tuple[str, str]] | None:
        """Trouble codes as ``[(code, description)]`` from ``GET_DTC`` (stored, mode 03),
        ``GET_CURRENT_DTC`` (pending, 07) or ``GET_PERMANENT_DTC`` (permanent, 0A); ``[]`` when
        none, ``None`` when there is no answer. Descriptions: :func:`agent.dtc.describe`."""
        state = {"GET_DTC": "stored", "GET_CURRENT_DTC": "pending",
                 "GET_PERMANENT_DTC": "permanent"}.get(command_name)
        if state is None:
            self.last_error = f"{command_name}: not a trouble code command"
            return None
        codes = obd_diag.read_codes(self._send, state)
        return None if codes is None else [(c, describe(c)) for c in codes]

    def read_status(self) -> dict[str, Any] | None:
        """PID 01 01: MIL, number of stored codes, readiness monitors (see
        :func:`drivers.obd_diag.read_status`)."""
        return obd_diag.read_status(self._send)

    def read_freeze_frame(self) -> dict[str, Any] | None:
        """Freeze frame 00 (mode 02): the code that stored it and the values it holds."""
        if self._freeze is None:
            return None
        return self._freeze.read(self.supported_pids())

    def read_dtc_reading(self, *, freeze: bool = False) -> DtcReading:
        """Stored, pending and permanent codes, MIL and readiness (and the freeze frame when
        ``freeze`` and a code is stored). Parts the vehicle does not answer are ``None``."""
        reading = DtcReading()
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


@dataclass
class _Pid:
    name: str
    command: str
    period_s: float
    next_due: float = 0.0


Sink = Callable[[list[Sample]], None]


@dataclass
class _Request:
    kind: str  # "read_dtc" | "clear_dtc"
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    cancelled: bool = False


class ObdPoller:
    """Keeps an ELM327 connected and polls PIDs on their periods into ``sink``.

    ``sink`` is called from the poller's thread with small lists of samples; it must return
    quickly (hand the list to a queue). An exception from it is logged and the samples are
    dropped. ``on_vehicle({"vin", "vin_valid", "protocol"})`` is called when a vehicle is first
    seen and whenever its VIN or protocol changes.

    PIDs that are due together go out in one multi-PID request (up to 6, CAN only; see
    :meth:`ObdReader.read_pids` for the fallback to one PID per request).

    Trouble codes are read every ``dtc_period_s`` (and right after each connect):
    ``on_dtc(body)`` gets a PROTOCOL §4 ``dtc`` event body whenever the set of codes or the MIL
    changes (:class:`agent.dtc.DtcTracker`; ``dtc_store``, an ``agent.store.Store``, keeps the
    last reported set across restarts). :meth:`read_dtcs_now` and :meth:`clear_dtcs` run on the
    poller's thread, between requests.

    A connection is dropped and re-made (after a backoff wait) when the adapter is lost or
    ``fail_limit`` requests in a row get nothing; the backoff is reset once a connection has
    delivered ``stable_after`` samples. A PID whose every query fails, polled alone, keeps the
    poller reconnecting: that is by design, as it cannot tell such a PID from a dead link.
    """

    def __init__(self, port: str, pids: list[dict[str, Any]], sink: Sink, *,
                 clock: Callable[[], int] = now_ms, backoff: Backoff | None = None,
                 on_vehicle: Callable[[dict[str, Any]], None] | None = None,
                 on_dtc: Callable[[dict[str, Any]], None] | None = None,
                 dtc_period_s: float | None = 60.0, dtc_store: Any | None = None,
                 baudrate: int | None = None, protocol: str | int | None = None,
                 timeout_s: float = 2.0, fail_limit: int = 5, stable_after: int = 3,
                 batch_size: int = 16, batch_age_s: float = 0.5,
                 reader_factory: Callable[..., ObdReader] = ObdReader):
        self._port = port
        self._sink = sink
        self._clock = clock
        self._backoff = backoff or Backoff(0.5, 30.0)
        self._on_vehicle = on_vehicle
        self._reader_kwargs = {"baudrate": baudrate, "protocol": protocol, "timeout_s": timeout_s}
        self._reader_factory = reader_factory
        self._fail_limit = max(1, fail_limit)
        self._stable_after = stable_after
        self._batch_size = max(1, batch_size)
        self._batch_age_s = batch_age_s

        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._hold = threading.Event()  # set: send nothing to the vehicle (it is going to sleep)
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._pending_pids: list[_Pid] | None = None
        self._pending_port: str | None = None
        self._unknown: list[str] = []
        self._invalid: list[str] = []
        self._active: list[_Pid] = []
        self._configured: list[_Pid] = []
        self._unsupported: set[str] = set()
        self._unsupported_logged: set[str] = set()
        self._supported: set[str] | None = None  # from the last vehicle's PID bitmaps
        self._vehicle: tuple[str | None, str | None] | None = None
        self._reader: ObdReader | None = None
        self._batch: list[Sample] = []
        self._batch_started = 0.0
        self._good = 0  # samples on the current connection
        self._failures = 0  # failed requests in a row
        self._tracker = DtcTracker(on_dtc, store=dtc_store, clock=clock)
        self._dtc_period_s = self._check_period(dtc_period_s)
        self._dtc_due = 0.0
        self._freeze_for: tuple[str, ...] = ()
        self._freeze: dict[str, Any] | None = None
        self._requests: list[_Request] = []
        self._stats: dict[str, Any] = {
            "connected": False, "port": port, "protocol": None, "vin": None, "samples": 0,
            "errors": 0, "last_error": None, "connects": 0, "attempts": 0,
            "sink_errors": 0, "requests": 0, "multi_pid": None, "count_hint": None,
            "dtc_reads": 0, "dtc": None}
        self.apply_pids(pids)

    # -- public API --------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="obd-poller", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 10.0) -> bool:
        """Stops the thread; True if it ended within ``timeout`` (a connect attempt in progress
        is not interruptible)."""
        self._stop.set()
        self._wake.set()
        thread = self._thread
        if thread is None:
            return True
        thread.join(timeout)
        return not thread.is_alive()

    def apply_pids(self, pids: Iterable[dict[str, Any]]) -> list[str]:
        """Replaces the polled PIDs (thread-safe, effective at the next cycle, no reconnect).
        Entries naming a PID python-OBD does not know, and malformed entries, are logged,
        skipped and listed in :meth:`status` (``unknown_pids``, ``invalid_pids``); returns both."""
        parsed, unknown, invalid = self._parse_pids(pids)
        with self._lock:
            self._pending_pids = parsed
            self._unknown = unknown
            self._invalid = invalid
        self._wake.set()
        return unknown + invalid

    def apply_config(self, doc: dict[str, Any]) -> list[str]:
        """Applies the ``obd`` part of a PROTOCOL §4 config document (``pids`` and
        ``dtc_period_s``) at run time, without a reconnect. Returns what could not be applied:
        unknown PIDs, malformed entries, and PIDs the vehicle does not support (as its
        supported-PID bitmaps said at the last connect; unknown before the first one — those
        show later in :meth:`status` ``unsupported_pids``)."""
        problems: list[str] = []
        section = doc.get("obd") if isinstance(doc, dict) else None
        if not isinstance(section, dict):
            return ["obd: missing or not an object; OBD settings unchanged"]
        pids = section.get("pids", [])
        if not isinstance(pids, list):
            problems.append("obd.pids: not a list; PIDs unchanged")
        else:
            parsed, unknown, invalid = self._parse_pids(pids)
            problems += [f"obd.pids: unknown PID {p!r}" for p in unknown]
            problems += [f"obd.pids: malformed entry {p}" for p in invalid]
            with self._lock:
                supported = self._supported
            if supported is not None:
                problems += [f"obd.pids: {p.command} ({p.name}) is not supported by the vehicle"
                             for p in parsed if p.command not in supported]
            with self._lock:
                self._pending_pids = parsed
                self._unknown = unknown
                self._invalid = invalid
        if "dtc_period_s" in section:
            period = self._check_period(section.get("dtc_period_s"))
            if period is None:
                problems.append(f"obd.dtc_period_s: bad value {section.get('dtc_period_s')!r}; "
                                "DTC period unchanged")
            else:
                with self._lock:
                    if period != self._dtc_period_s:
                        self._dtc_period_s = period
                        self._dtc_due = min(self._dtc_due, time.monotonic() + period)
        self._wake.set()
        for p in problems:
            log.warning("OBD config: %s", p)
        return problems

    def set_port(self, port: str) -> None:
        """Points the poller at another port; it reconnects there at the next cycle."""
        with self._lock:
            self._pending_port = port
        self._wake.set()

    def read_dtcs_now(self, timeout_s: float = 30.0) -> dict[str, Any] | None:
        """Reads the trouble codes now (on the poller's thread) and returns the ``dtc`` event
        body (also reported through ``on_dtc`` if the set changed); ``None`` when no vehicle is
        connected or it does not answer within ``timeout_s``. Thread-safe."""
        return self._request("read_dtc", timeout_s)

    def clear_dtcs(self, timeout_s: float = 30.0) -> list[str] | None:
        """Mode 04 (on the poller's thread), then a fresh read (so ``on_dtc`` reports the empty
        set). Returns the codes that were set before, ``None`` if not connected, not confirmed
        by an ECU or not done within ``timeout_s``. Only for a confirmed technician request."""
        return self._request("clear_dtc", timeout_s)

    def status(self) -> dict[str, Any]:
        with self._lock:
            result = dict(self._stats)
            result["unknown_pids"] = list(self._unknown)
            result["invalid_pids"] = list(self._invalid)
            result["unsupported_pids"] = sorted(self._unsupported)
            result["polling"] = [p.command for p in self._active]
            result["dtc_period_s"] = self._dtc_period_s
            result["running"] = self._thread is not None and self._thread.is_alive()
            result["held"] = self._hold.is_set()
            return result

    # -- config ------------------------------------------------------------------------------

    @staticmethod
    def _check_period(period: Any) -> float | None:
        if period is None:
            return None
        if isinstance(period, bool) or not isinstance(period, (int, float)) \
                or not math.isfinite(period) or period <= 0:
            return None
        return float(period)

    def _parse_pids(self, pids: Iterable[Any]) -> tuple[list[_Pid], list[str], list[str]]:
        parsed: list[_Pid] = []
        unknown: list[str] = []
        invalid: list[str] = []
        for entry in pids or []:
            pid = self._parse_pid(entry)
            if isinstance(pid, _Pid):
                parsed.append(pid)
            elif pid == "unknown":
                unknown.append(str(entry.get("pid")))
            else:
                invalid.append(self._describe(entry))
        return parsed, unknown, invalid

    @staticmethod
    def _describe(entry: Any) -> str:
        if isinstance(entry, dict):
            return str(entry.get("pid") or entry.get("name") or entry)
        return repr(entry)

    @staticmethod
    def _parse_pid(entry: Any) -> _Pid | str:
        """A :class:`_Pid`, or ``"unknown"`` / ``"invalid"`` (logged)."""
        if not isinstance(entry, dict):
            log.warning("OBD config: ignoring %r (not an object)", entry)
            return "invalid"
        command, name, period = entry.get("pid"), entry.get("name"), entry.get("period_s")
        if not isinstance(command, str) or not command:
            log.warning("OBD config: entry %r has no PID, skipped", entry)
            return "invalid"
        if command_for(command) is None:
            log.warning("OBD config: unknown PID %r (signal %r), skipped", command, name)
            return "unknown"
        if not isinstance(name, str) or not name:
            log.warning("OBD config: PID %s has no signal name, skipped", command)
            return "invalid"
        if isinstance(period, bool) or not isinstance(period, (int, float)) \
                or not math.isfinite(period) or period <= 0:
            log.warning("OBD config: PID %s has a bad period_s %r, skipped", command, period)
            return "invalid"
        return _Pid(name=name, command=command, period_s=float(period))

    def _take_pending(self) -> None:
        with self._lock:
            pending, self._pending_pids = self._pending_pids, None
        if pending is None:
            return
        now = time.monotonic()
        previous = {(p.name, p.command): p.next_due for p in self._configured}
        for p in pending:
            p.next_due = previous.get((p.name, p.command), now)
        self._configured = pending
        self._select_active()

    def _select_active(self) -> None:
        reader = self._reader
        active: list[_Pid] = []
        unsupported: set[str] = set()
        for p in self._configured:
            if reader is not None and not reader.supports(p.command):
                unsupported.add(p.command)
                if p.command not in self._unsupported_logged:
                    self._unsupported_logged.add(p.command)
                    log.warning("OBD: the vehicle does not support %s (signal %s), skipped",
                                p.command, p.name)
                continue
            active.append(p)
        with self._lock:
            self._active = active
            if reader is not None:
                self._unsupported = unsupported

    # -- requests from other threads ---------------------------------------------------------

    def _request(self, kind: str, timeout_s: float) -> Any:
        thread = self._thread
        if thread is None or not thread.is_alive() or not self.status()["connected"]:
            return None
        request = _Request(kind)
        with self._lock:
            self._requests.append(request)
        self._wake.set()
        if not request.done.wait(timeout_s):
            with self._lock:
                request.cancelled = True
                if request in self._requests:
                    self._requests.remove(request)
            return None
        return request.result

    def _serve_requests(self) -> None:
        while True:
            with self._lock:
                if not self._requests:
                    return
                request = self._requests.pop(0)
            try:
                if request.kind == "read_dtc":
                    request.result = self._poll_dtcs()
                elif request.kind == "clear_dtc":
                    request.result = self._clear_dtcs()
            finally:
                request.done.set()

    def _fail_requests(self) -> None:
        with self._lock:
            requests, self._requests = self._requests, []
        for request in requests:
            request.done.set()

    # -- thread ------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    self._cycle()
                except Exception as e:  # noqa: BLE001 - the poller must survive anything
                    log.exception("OBD poller cycle failed")
                    self._record_error(f"internal error: {e!r}")
                    self._disconnect()
                    self._pause(self._backoff.next())
        finally:
            self._flush(force=True)
            self._disconnect()
            self._fail_requests()

    def hold(self) -> None:
        """Stops all requests to the vehicle (power management: the car is going to sleep, and
        polling would keep its ECUs awake). Connecting is held too: the protocol search sends
        requests on the bus. Pending one-off requests fail at once."""
        self._hold.set()
        self._wake.set()

    def release(self) -> None:
        """Resumes polling after :meth:`hold`."""
        self._hold.clear()
        self._wake.set()

    @property
    def held(self) -> bool:
        return self._hold.is_set()

    def _cycle(self) -> None:
        if self._hold.is_set():
            self._fail_requests()
            self._flush(force=True)
            if self._wake.wait(0.25):
                self._wake.clear()
            return
        with self._lock:
            new_port, self._pending_port = self._pending_port, None
        if new_port is not None and new_port != self._port:
            log.info("OBD: port changed from %s to %s", self._port, new_port)
            self._port = new_port
            with self._lock:
                self._stats["port"] = new_port
            self._disconnect()
        if self._reader is None:
            self._fail_requests()
            self._take_pending()
            if not self._connect():
                self._flush(force=True)
                self._pause(self._backoff.next())
            return
        self._take_pending()
        self._serve_requests()
        if self._reader is None:
            return
        now = time.monotonic()
        with self._lock:
            dtc_period = self._dtc_period_s
            dtc_due = self._dtc_due
        if dtc_period is not None and dtc_due <= now:
            with self._lock:
                self._dtc_due = now + dtc_period
            self._poll_dtcs()
            return
        due = [p for p in self._active if p.next_due <= now]
        if not due:
            self._flush(force=False)
            wait = min((p.next_due for p in self._active), default=now + 0.25) - now
            if dtc_period is not None:
                wait = min(wait, dtc_due - now)
            if self._batch:
                wait = min(wait, max(0.0, self._batch_started + self._batch_age_s - now))
            if self._wake.wait(min(max(wait, 0.0), 0.25)):
                self._wake.clear()
            return
        group = self._next_group(due)
        commands = list(dict.fromkeys(p.command for p in group))
        results = self._reader.read_pids(commands)
        t_ms = self._clock()
        with self._lock:
            self._stats["requests"] += 1
            self._stats["multi_pid"] = self._reader.multi_pid
            self._stats["count_hint"] = self._reader.count_hint
        for pid in group:
            pid.next_due += pid.period_s
            if pid.next_due < now:  # fell behind: don't burst to catch up
                pid.next_due = now + pid.period_s
        if not results:
            self._on_query_failure(group[0])
            return
        if len(results) < len(commands):
            self._record_error(self._reader.last_error or "some PIDs got no answer")
        if not self._batch:
            self._batch_started = time.monotonic()
        delivered = 0
        for pid in group:
            result = results.get(pid.command)
            if result is not None:
                self._batch.append(Sample(name=pid.name, unit=result[1], t_ms=t_ms,
                                          value=result[0]))
                delivered += 1
        before = self._good
        self._good += delivered
        self._failures = 0
        with self._lock:
            self._stats["samples"] += delivered
        if before < self._stable_after <= self._good:
            self._backoff.reset()
        self._flush(force=False)

    def _next_group(self, due: list[_Pid]) -> list[_Pid]:
        """The PIDs of the next request: the most overdue one and, when it can share a request,
        the other due PIDs that can (up to the reader's limit of distinct PIDs)."""
        reader = self._reader
        assert reader is not None
        ordered = sorted(due, key=lambda p: p.next_due)
        first = ordered[0]
        limit = reader.max_pids_per_request
        if limit <= 1 or not reader.can_group(first.command):
            return [p for p in ordered if p.command == first.command]
        commands: list[str] = [first.command]
        for p in ordered[1:]:
            if p.command not in commands and len(commands) < limit \
                    and reader.can_group(p.command):
                commands.append(p.command)
        return [p for p in ordered if p.command in commands]

    def _poll_dtcs(self) -> dict[str, Any] | None:
        reader = self._reader
        if reader is None:
            return None
        reading = reader.read_dtc_reading()
        reading.ts = self._clock()
        stored = tuple(sorted(reading.stored or ()))
        if stored and stored != self._freeze_for:
            self._freeze = reader.read_freeze_frame()
            self._freeze_for = stored
        elif reading.stored is not None and not stored:
            self._freeze, self._freeze_for = None, ()
        reading.freeze = self._freeze if stored else None
        body = self._tracker.update(reading)
        with self._lock:
            self._stats["dtc_reads"] += 1
            if body is not None:
                self._stats["dtc"] = {"codes": [(c["code"], c["state"]) for c in body["codes"]],
                                      "mil": body["mil"], "monitors": body.get("monitors")}
        if body is None:
            self._record_error(f"trouble codes: {reader.last_error or 'no answer'}")
        return body

    def _clear_dtcs(self) -> list[str] | None:
        reader = self._reader
        if reader is None:
            return None
        before = self._poll_dtcs()
        if not reader.clear_dtcs():
            self._record_error(f"clearing trouble codes: {reader.last_error or 'no answer'}")
            return None
        self._freeze, self._freeze_for = None, ()
        self._poll_dtcs()
        codes = [c["code"] for c in (before or {}).get("codes", [])]
        return list(dict.fromkeys(codes))

    def _connect(self) -> bool:
        with self._lock:
            self._stats["attempts"] += 1
        reader = self._reader_factory(self._port, **self._reader_kwargs)
        if not reader.connect():
            reader.close()
            self._record_error(reader.last_error or "connect failed")
            return False
        self._reader = reader
        self._good = 0
        self._failures = 0
        self._freeze, self._freeze_for = None, ()
        protocol = reader.protocol_name
        vin = reader.read_vin()
        supported = reader.supported_pids()
        with self._lock:
            self._stats.update(connected=True, protocol=protocol, vin=vin, multi_pid=None,
                               count_hint=None)
            self._stats["connects"] += 1
            self._supported = supported or None
            self._dtc_due = time.monotonic()  # codes first: they may have changed while away
        self._select_active()
        vehicle = (vin, protocol)
        if vehicle != self._vehicle:
            self._vehicle = vehicle
            valid, reason = vin_check.validate(vin)
            if vin is not None and not valid:
                log.warning("OBD: the vehicle reports a malformed VIN %r (%s); not trusted",
                            vin, reason)
            if self._on_vehicle is not None:
                try:
                    self._on_vehicle({"vin": vin, "vin_valid": valid, "protocol": protocol})
                except Exception:  # noqa: BLE001
                    log.exception("OBD on_vehicle callback failed")
        return True

    def _on_query_failure(self, pid: _Pid) -> None:
        reader = self._reader
        assert reader is not None
        self._failures += 1
        self._record_error(reader.last_error or f"{pid.command}: no answer")
        lost = not reader.connected
        if lost or self._failures >= self._fail_limit:
            reason = "adapter lost" if lost else f"{self._failures} requests in a row failed"
            log.warning("OBD: %s on %s, reconnecting", reason, self._port)
            self._disconnect()
            self._flush(force=True)
            self._pause(self._backoff.next())

    def _pause(self, seconds: float) -> None:
        """Waits ``seconds``; returns early on :meth:`stop` or :meth:`set_port`."""
        deadline = time.monotonic() + seconds
        while not self._stop.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            if self._wake.wait(min(remaining, 0.25)):
                self._wake.clear()
                with self._lock:
                    if self._pending_port is not None:
                        return

    def _disconnect(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.close()
        with self._lock:
            self._stats["connected"] = False
        self._fail_requests()

    def _record_error(self, message: str) -> None:
        with self._lock:
            self._stats["errors"] += 1
            previous = self._stats["last_error"]
            self._stats["last_error"] = message
        if message != previous:
            log.warning("OBD: %s", message)

    def _flush(self, *, force: bool) -> None:
        """Hands samples to the sink in lists of at most ``batch_size``: full lists at once, the
        rest when ``force`` or once the oldest waited ``batch_age_s``."""
        if not self._batch:
            return
        aged = time.monotonic() - self._batch_started >= self._batch_age_s
        while self._batch and (force or aged or len(self._batch) >= self._batch_size):
            batch = self._batch[:self._batch_size]
            del self._batch[:self._batch_size]
            self._hand_over(batch)

    def _hand_over(self, batch: list[Sample]) -> None:
        started = time.monotonic()
        try:
            self._sink(batch)
        except Exception:  # noqa: BLE001 - a broken sink must not stop acquisition
            with self._lock:
                self._stats["sink_errors"] += 1
            log.exception("OBD sink failed; %d samples dropped", len(batch))
        took = time.monotonic() - started
        if took > 0.5:
            log.warning("OBD sink took %.1f s; it must hand samples off, not process them", took)
