"""OBD-II through an ELM327 adapter, using python-OBD.

:class:`ObdReader` is one connection: synchronous, never raises for adapter trouble (a missing
port, a dead or babbling adapter, NO DATA), answers ``(value, unit_text)`` or ``None``.
What to ask and when (scheduling, reconnects, trouble-code tracking) is the agent's OBD poller
(agent/vehicle/obd.py).

Ports: ``port`` may be a symlink (a udev name such as ``/dev/serial/by-id/...``, or the link
``scripts.vehicle_sim.elm_emulator.ElmEmulator(link=...)`` keeps); it is resolved again at every
connect, so an adapter that comes back on another tty is found by the same name. python-OBD
opens it through drivers/obd/port.py, which bounds every command in time (10 s while connecting,
``timeout_s`` after) and lets :meth:`ObdReader.abort` end a connect or a query from another
thread (the poller's ``stop``).

Adapter bring-up is python-OBD's (``ATZ``, ``ATE0`` echo off, ``ATH1`` headers on, ``ATL0``,
``ATSP0`` protocol auto-detect unless a protocol is given, its supported-PID walk), plus
``ATAT1`` (adaptive timing; a clone answering ``?`` is logged and tolerated) and our own walk of
the supported-PID bitmaps (``01 00``, ``01 20``, ..., ``09 00``), which keeps apart "the vehicle
said no" from "no answer" (python-OBD's walk takes a bitmap that did not answer for "none of
these PIDs": a bad spell at connect then silenced them for good). :meth:`ObdReader.support` is
``True``, ``False`` or ``None`` (unknown: that bitmap did not answer); :meth:`probe_supported`
walks again.

Every request goes through :meth:`ObdReader._send`: the adapter's lines come back unparsed, the
status lines among them are sorted out by drivers/obd/elm_lines.py (its table says what each
means: ``NO DATA``, ``CAN ERROR``, ``STOPPED``, ``UNABLE TO CONNECT``, a negative response
``7F 01 12``, garbled text, ...), the data lines go to python-OBD's parser, and only messages
that echo the request (``41 0C ..`` for ``01 0C``) count; late answers to an earlier request are
logged and dropped. :attr:`ObdReader.outcome` is the table's handling for the last request
(``None`` when it was answered) and :attr:`ObdReader.needs_reconnect` is set by the lines that
mean the adapter lost the vehicle or its settings.

Multi-PID (drivers/obd/multi.py): PIDs due together go out as one mode 01 request of up to six
PIDs on CAN protocols, with the ELM327 response-count hint (the frame count of the previous
answer) once known. An adapter answering ``?`` to the hint gets requests without it. A PID that
multi-PID answers leave out while single requests get it (:data:`MULTI_MISS_LIMIT` times in a
row) is asked on its own for a while (10 s, doubling to 10 min while it keeps being left out,
back to 10 s after 50 good multi-PID answers), then tried in a group again: the fall-back is per PID, never for the whole connection, and never
for an answer that failed as a whole (a bus error, NO DATA for everything). Non-CAN protocols get
one PID per request. :attr:`ObdReader.multi_mode` and :attr:`ObdReader.fallback_s` show it.

python-OBD notes (0.7.3) that shape this module:
- ``obd.OBD()`` connects inside its constructor; ``fast=False`` avoids its response-count
  shortcuts, which confuse adapters that answer slowly.
- ``OBD.query`` turns the adapter's status lines into empty messages and decodes the answer
  (a multi-PID command's decoder would run twice); requests here go through the adapter's line
  I/O and python-OBD's parser instead (drivers/obd/elm327.py), with the status lines sorted out
  in between.
- Its VIN decoder strips the characters ``0``, ``1``, ``2`` and ``x`` off both ends (a
  ``strip()`` with a bytes literal meant as escapes), so VINs ending in ``0`` lose digits; the
  VIN is decoded here from the raw message instead.
- ``close()`` sends ``ATZ`` and does not wait for the answer; the adapter's reset banner then
  arrives during the next connect and fails its ``ATE0`` check. A reconnect to the same port
  therefore waits :data:`ATZ_SETTLE_S` after a close.
- Its ``OBDCommand`` cuts or pads every answer to the command's length in place while decoding;
  commands whose answers need reshaping first (multi-PID, mode 02 with a frame number) are
  sent with no fixed length (drivers/obd/multi.py, drivers/obd/diag.py).
- Its DTC decoder reads an ELM text answer (``NO DATA``) as "no codes": the echo check above
  keeps that from ever clearing a reported set.
"""
from __future__ import annotations

import functools
import logging
import os
import re
import threading
import time
from typing import Any, Callable, Iterable

import obd
from obd import OBDStatus

from drivers.core import vin as vin_check
from drivers.core.backoff import Backoff
from drivers.obd import diag as obd_diag
from drivers.obd import elm327, elm_lines
from drivers.obd import port as obd_port
from drivers.obd.multi import (CAN_PROTOCOL_IDS, MAX_PIDS_PER_REQUEST, DecodeCache,
                               MultiPidCommand, answers_to, frame_count, is_multi_capable)
from drivers.obd.units import unit_text, value_and_unit  # noqa: F401 - re-exported

log = logging.getLogger(__name__)

#: Seconds to let an adapter finish the ATZ that python-OBD's close() sends.
ATZ_SETTLE_S = 1.0
#: Multi-PID answers in a row that left a PID out (which a single request then got) before that
#: PID is asked on its own for a while.
MULTI_MISS_LIMIT = 2
#: How long such a PID is asked on its own: the first time, and at most (doubling in between,
#: until it has been answered in :data:`SOLO_FORGET_AFTER` multi-PID answers in a row).
SOLO_MIN_S, SOLO_MAX_S = 10.0, 600.0
SOLO_FORGET_AFTER = 50
#: Outcome of a request when the adapter itself is gone.
LOST = "lost"

_VIN_RE = re.compile(rb"[A-Z0-9]{17}")

_last_close: dict[str, float] = {}  # realpath -> monotonic time of our last close of it
_last_close_lock = threading.Lock()

_MODE01_GETTERS = tuple(c for c in obd.commands.pid_getters() if c.mode == 1)
_MODE09_GETTER = obd.commands.PIDS_9A


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
    if not isinstance(name, str):
        return None
    try:
        return _command(name)
    except Exception:  # noqa: BLE001 - a library lookup must not crash the caller
        log.debug("lookup of OBD command %r failed", name, exc_info=True)
    return None


@functools.lru_cache(maxsize=512)
def _command(name: str) -> Any | None:
    return obd.commands[name] if obd.commands.has_name(name) else None


@functools.lru_cache(maxsize=512)
def _groupable(name: str) -> bool:
    return is_multi_capable(command_for(name))


def _protocol_arg(protocol: str | int | None) -> str | None:
    if protocol is None:
        return None
    if isinstance(protocol, int):
        return f"{protocol:X}"
    return str(protocol).upper()


class ObdReader:
    """One connection to an ELM327 adapter. Not thread-safe: use it from one thread (except
    :meth:`abort`, which any thread may call).

    Multi-PID state (per connection, so a reconnect to another car starts afresh):
    :attr:`multi_pid` is ``None`` until a multi-PID request was fully answered (``True``), and
    ``False`` while every PID asked is in the per-PID fall-back; :attr:`count_hint` likewise for
    the ELM327 response-count hint.
    """

    def __init__(self, port: str, *, baudrate: int | None = None,
                 protocol: str | int | None = None, timeout_s: float = 2.0,
                 clock: Callable[[], float] = time.monotonic):
        self.port = port
        self.baudrate = baudrate
        self.protocol = _protocol_arg(protocol)
        self.timeout_s = timeout_s
        self.last_error: str | None = None
        #: elm_lines handling of the last request (``None``: answered; :data:`LOST`: no adapter)
        self.outcome: str | None = None
        #: set by an answer meaning the adapter lost the vehicle or its settings
        self.needs_reconnect = False
        #: the last request got nothing at all from the adapter (not even a prompt) in time
        self.silent = False
        self.multi_pid: bool | None = None
        self.count_hint: bool | None = None
        self.requests = {"multi": 0, "single": 0}
        self._clock = clock
        self._conn: Any | None = None
        self._protocol_id: str | None = None
        self._device: str | None = None
        self._slot: obd_port.PortSlot | None = None
        self._slot_lock = threading.Lock()
        self._aborted = threading.Event()
        self._send_lines: Callable[[bytes], list[str]] | None = None
        self._parse: Callable[[list[str]], list[Any]] | None = None
        self._status_text: str | None = None
        self._bitmaps: dict[int, int | None] = {}  # mode 01 range base -> mask, None: no answer
        self._support_cache: dict[str, bool | None] = {}
        self._decoded = DecodeCache()
        self._vin_bitmap: int | None = None
        self._frame_counts: dict[tuple[str, ...], int] = {}
        self._multi_cmds: dict[tuple[tuple[str, ...], int | None], MultiPidCommand] = {}
        self._misses: dict[str, int] = {}
        self._solo: dict[str, tuple[float, Backoff]] = {}  # name -> (asked alone until, backoff)
        self._solo_backoff: dict[str, Backoff] = {}
        self._streak: dict[str, int] = {}  # grouped answers in a row since a fall-back
        self._asked: set[str] = set()  # groupable PIDs asked on this connection
        self._groups_answered: set[tuple[str, ...]] = set()  # requests answered at least once
        self._fallback_total = 0.0
        self._fallback_since: float | None = None
        self._freeze: obd_diag.FreezeFrameReader | None = None

    # -- connection --------------------------------------------------------------------------

    def connect(self) -> bool:
        """Opens the adapter and talks to the vehicle. ``False`` (logged, :attr:`last_error`)
        when the port is missing, the adapter does not answer sensibly, no vehicle answers, or
        :meth:`abort` was called."""
        self.close()
        device = os.path.realpath(self.port)
        if not os.path.exists(device):
            return self._fail(f"port {self.port} does not exist")
        with _last_close_lock:
            closed_at = _last_close.get(device)
        if closed_at is not None:
            wait = closed_at + ATZ_SETTLE_S - time.monotonic()
            if wait > 0 and self._aborted.wait(wait):
                return self._fail("connect interrupted (stopping)")
        slot = obd_port.open_url(device)
        with self._slot_lock:
            if self._aborted.is_set():
                slot.release()
                return self._fail("connect interrupted (stopping)")
            self._slot = slot
        try:
            conn = obd.OBD(slot.url, baudrate=self.baudrate, protocol=self.protocol, fast=False,
                           timeout=self.timeout_s)
        except Exception as e:  # noqa: BLE001 - python-OBD raises odd things on odd answers
            self._release_slot(device)
            return self._fail(f"connecting to {self.port} failed: {e!r}")
        if slot.aborted:
            self._close_conn(conn, device)
            self._release_slot(None)
            return self._fail("connect interrupted (stopping)")
        status = self._status(conn)
        if status != OBDStatus.CAR_CONNECTED:
            self._close_conn(conn, device)
            self._release_slot(None)
            if status == OBDStatus.OBD_CONNECTED:   # python-OBD: the car's port has power
                return self._fail(f"adapter on {self.port} answers, the vehicle's ECUs do not "
                                  "(ignition off?)")
            if status == OBDStatus.ELM_CONNECTED:   # ... and no OBD protocol was found
                return self._fail(f"adapter on {self.port} answers but finds no vehicle "
                                  "(plugged in? ignition on?)")
            return self._fail(f"no working ELM327 adapter on {self.port}")
        try:
            self._send_lines = elm327.line_sender(conn)
            self._parse = elm327.line_parser(conn)
        except AttributeError as e:
            self._close_conn(conn, device)
            self._release_slot(None)
            return self._fail(f"python-OBD {elm327.VERSION} lacks what the reader needs: {e}")
        slot.budget_s = self.timeout_s
        self._conn = conn
        self._protocol_id = self._read_protocol_id()
        self._device = device
        self.last_error = None
        self.outcome = None
        self.needs_reconnect = False
        self.multi_pid = None
        self.count_hint = None
        self._frame_counts = {}
        self._misses = {}
        self._bitmaps, self._vin_bitmap, self._support_cache = {}, None, {}
        self._solo = {}
        self._solo_backoff = {}
        self._streak = {}
        self._asked = set()
        self._groups_answered = set()
        self._fallback_total, self._fallback_since = 0.0, None
        self._freeze = obd_diag.FreezeFrameReader(self._send)
        self._adapter_setting(b"ATAT1", "adaptive timing")
        self.probe_supported()
        log.info("OBD connected on %s (%s), protocol %s%s", self.port, device, self.protocol_name,
                 "" if self.support_known else "; supported PIDs unknown (no bitmap answered)")
        return True

    def abort(self) -> None:
        """Ends a connect or a request in progress on another thread, and every later one: the
        reader is done (thread-safe)."""
        self._aborted.set()
        with self._slot_lock:
            slot = self._slot
        if slot is not None:
            slot.abort()

    @property
    def aborted(self) -> bool:
        return self._aborted.is_set()

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            self._close_conn(conn, self._device)
        self._release_slot(None)

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
        return self._protocol_id if self._conn is not None else None

    def _read_protocol_id(self) -> str | None:
        try:
            return str(self._conn.protocol_id() or "") or None
        except Exception:  # noqa: BLE001
            return None

    # -- what the vehicle supports -----------------------------------------------------------

    @property
    def support_known(self) -> bool:
        """True once the first mode 01 bitmap (``01 00``) answered on this connection."""
        return self._bitmaps.get(0) is not None

    def probe_supported(self) -> bool:
        """Walks the supported-PID bitmaps again (``01 00``, then ``01 20`` if ``01 00`` says
        so, ...; ``09 00`` until it answered once). Ranges that do not answer stay unknown (and
        keep what an earlier walk learnt). True when ``01 00`` answered."""
        answered_any = False
        base = 0
        for getter in _MODE01_GETTERS:
            if getter.pid != base:
                break
            mask = self._bitmap(getter)
            if mask is None:
                break
            answered_any = True
            self._bitmaps[base] = mask
            if not mask & 1:  # bit 32 of the range: the next range exists
                for later in range(base + 0x20, 0x100, 0x20):
                    self._bitmaps[later] = 0
                break
            base += 0x20
        if self._vin_bitmap is None:
            self._vin_bitmap = self._bitmap(_MODE09_GETTER)
        self._support_cache = {}
        if base == 0 and not answered_any:
            self.last_error = f"supported PIDs: {self.last_error or 'no answer'}"
        return self._bitmaps.get(0) is not None

    def support(self, command_name: str) -> bool | None:
        """``True``/``False`` as the vehicle's bitmaps say, ``None`` when the bitmap of the PID's
        range did not answer (yet). Commands outside modes 01, 02 and 09 (trouble codes, adapter
        commands) are ``True``; unknown names ``False``."""
        known = self._support_cache.get(command_name, self)
        if known is self:
            known = self._support_cache[command_name] = self._support_of(command_name)
        return known  # type: ignore[return-value]

    def _support_of(self, command_name: str) -> bool | None:
        cmd = command_for(command_name)
        if cmd is None:
            return False
        mode, pid = cmd.mode, cmd.pid
        if mode in (1, 2) and pid is not None:
            if pid == 0:
                return True
            base = (pid - 1) // 0x20 * 0x20
            mask = self._bitmaps.get(base)
            if mask is None:
                return None
            return bool(mask >> (0x20 - (pid - base)) & 1)
        if mode == 9 and pid is not None:
            if pid == 0:
                return True
            if self._vin_bitmap is None:
                return None
            return pid <= 0x20 and bool(self._vin_bitmap >> (0x20 - pid) & 1)
        return True

    def supports(self, command_name: str) -> bool:
        """True unless the vehicle's bitmaps say it does not (or the name is unknown)."""
        return self._conn is not None and self.support(command_name) is not False

    def supported_pids(self) -> set[str]:
        """python-OBD names of the mode 01, 02 and 09 commands the bitmaps said are supported
        (ranges that did not answer left out); empty when not connected."""
        if self._conn is None:
            return set()
        names: set[str] = set()
        for mode in (1, 2, 9):
            for cmd in obd.commands[mode]:
                if cmd is not None and self.support(cmd.name) is True:
                    names.add(cmd.name)
        return names

    def _bitmap(self, getter: Any) -> int | None:
        messages = self._send(getter)
        if not messages:
            return None
        # python-OBD's choice: the engine's bitmap where the engine answered (its PID commands
        # take the engine's answer too)
        messages = [m for m in messages if m.ecu & getter.ecu] or messages
        data = bytes(messages[0].data)
        if getter.mode == 9 and len(data) == 7:  # non-CAN: a message count byte first
            data = data[:2] + data[3:]
        if len(data) < 6:
            self.last_error = f"{getter.name}: bitmap cut short ({data.hex(' ')})"
            return None
        return int.from_bytes(data[2:6], "big")

    # -- live data ---------------------------------------------------------------------------

    @property
    def max_pids_per_request(self) -> int:
        """6 on CAN protocols; 1 on the older protocols (J1850, ISO 9141, KWP2000), where J1979
        has one PID per request."""
        if self.protocol_id not in CAN_PROTOCOL_IDS:
            return 1
        return MAX_PIDS_PER_REQUEST

    def can_group(self, command_name: str) -> bool:
        """True when ``command_name`` may share a multi-PID request with others now (a fixed-length
        mode 01 PID, not in the per-PID fall-back)."""
        if not _groupable(command_name):
            return False
        solo = self._solo.get(command_name)
        return solo is None or solo[0] <= self._clock()

    @property
    def single_pids(self) -> list[str]:
        """The PIDs asked on their own for now (multi-PID answers left them out)."""
        now = self._clock()
        return sorted(n for n, (until, _) in self._solo.items() if until > now)

    @property
    def multi_mode(self) -> str:
        """``"single"`` (non-CAN protocol, or the fall-back leaves at most one PID to group),
        ``"partial"`` (some PIDs in the fall-back), ``"multi"`` (none) or ``"unknown"`` (no
        multi-PID request answered in full yet)."""
        if self._conn is not None and self.protocol_id not in CAN_PROTOCOL_IDS:
            return "single"
        solo = set(self.single_pids)
        if solo:
            return "single" if len(self._asked - solo) <= 1 else "partial"
        return "multi" if self.multi_pid else "unknown"

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
        many). Missing from the result: PIDs without an answer (see :attr:`last_error` and
        :attr:`outcome`)."""
        names = list(dict.fromkeys(command_names))
        results: dict[str, tuple[float, str]] = {}
        self.silent = False
        groupable = [n for n in names if self.can_group(n) and self.supports(n)]
        singles = [n for n in names if n not in groupable]
        if self.max_pids_per_request > 1 and len(groupable) >= 2:
            group = groupable[:self.max_pids_per_request]
            singles += groupable[len(group):]
            self._asked.update(group)
            got, answered = self._query_group(group)
            results.update(got)
            for n in got:
                self._answered_in_group(n)
            missing = [n for n in group if n not in got]
            if not missing:
                if self.multi_pid is None:
                    log.info("OBD: the vehicle answers multi-PID requests")
                self.multi_pid = True
            elif answered or (self.outcome in (elm_lines.NO_DATA, elm_lines.REFUSED)
                              and tuple(group) not in self._groups_answered):
                # left out of an answer, or a group never answered refused as a whole (an
                # ECU without multi-PID): ask alone. A bus error or a lost adapter spoils
                # singles as well, and NO DATA to a group answered before is a silent ECU
                # (engine off): those wait for the next poll
                outcome, error = self.outcome, self.last_error
                retried = {n: v for n in missing if (v := self._query_single(n)) is not None}
                results.update(retried)
                for n in retried:
                    self._left_out(n)
                if retried:
                    log.info("OBD: a multi-PID answer lacked %s, which single requests got",
                             ", ".join(sorted(retried)))
                if len(retried) < len(missing):
                    self.outcome, self.last_error = outcome, error
        else:
            singles = names
        for n in singles:
            if self._link_down():
                break
            value = self._query_single(n)
            if value is not None:
                results[n] = value
        if self.multi_mode == "single":
            self.multi_pid = False
        self._note_fallback()
        return results

    @property
    def fallback_s(self) -> float:
        """Seconds of this connection during which some PID was in the per-PID fall-back."""
        since = self._fallback_since
        return self._fallback_total + (self._clock() - since if since is not None else 0.0)

    def _note_fallback(self) -> None:
        now, solo = self._clock(), bool(self.single_pids)
        if solo and self._fallback_since is None:
            self._fallback_since = now
        elif not solo and self._fallback_since is not None:
            self._fallback_total += now - self._fallback_since
            self._fallback_since = None

    def _answered_in_group(self, name: str) -> None:
        self._misses.pop(name, None)
        if self._solo.pop(name, None) is not None:
            log.info("OBD: %s is answered in multi-PID requests again", name)
        if name in self._solo_backoff:
            streak = self._streak.get(name, 0) + 1
            self._streak[name] = streak
            if streak >= SOLO_FORGET_AFTER:  # answered in groups long enough: start afresh
                del self._solo_backoff[name]
                self._streak.pop(name, None)

    def _left_out(self, name: str) -> None:
        self._streak.pop(name, None)
        misses = self._misses.get(name, 0) + 1
        self._misses[name] = misses
        if misses < MULTI_MISS_LIMIT:
            return
        backoff = self._solo_backoff.setdefault(name, Backoff(SOLO_MIN_S, SOLO_MAX_S))
        seconds = backoff.ceiling()
        backoff.next()
        self._solo[name] = (self._clock() + seconds, backoff)
        self._misses.pop(name, None)
        log.warning("OBD: multi-PID answers leave %s out; asking it on its own for %.0f s",
                    name, seconds)

    # -- identity and diagnostics ------------------------------------------------------------

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
        :func:`drivers.obd.diag.read_status`)."""
        return obd_diag.read_status(self._send)

    def read_freeze_frame(self) -> dict[str, Any] | None:
        """Freeze frame 00 (mode 02): the code that stored it and the values it holds."""
        if self._freeze is None:
            return None
        return self._freeze.read(self.supported_pids() or None)

    def read_dtc_reading(self, *, freeze: bool = False) -> obd_diag.DtcReading:
        """Stored, pending and permanent codes, MIL and readiness (and the freeze frame when
        ``freeze`` and a code is stored). Parts the vehicle does not answer are ``None``."""
        reading = obd_diag.DtcReading()
        self.silent = False
        status = self.read_status()
        if status is not None:
            reading.mil = status["mil"]
            reading.monitors = status["monitors"]
        for state in ("stored", "pending", "permanent"):
            if self._link_down():
                break  # a silent or lost adapter: the other parts would only wait as long
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
        if self.protocol_id in CAN_PROTOCOL_IDS and _groupable(command_name) \
                and self.supports(command_name):
            self.requests["single"] += 1
            got, _ = self._query_group([command_name])
            return got.get(command_name)
        return self.query(command_name)

    def _multi_command(self, names: tuple[str, ...], hint: int | None) -> MultiPidCommand:
        key = (names, hint)
        cmd = self._multi_cmds.get(key)
        if cmd is None:
            if len(self._multi_cmds) > 256:  # PID sets change with the config: stay bounded
                self._multi_cmds.clear()
            cmd = MultiPidCommand([command_for(n) for n in names], hint)
            self._multi_cmds[key] = cmd
        return cmd

    def _query_group(self, command_names: list[str]) -> tuple[dict[str, tuple[float, str]], bool]:
        """One mode 01 request for ``command_names``; ``({name: value}, answered)``."""
        key = tuple(command_names)
        if len(key) > 1:
            self.requests["multi"] += 1
        base = self._multi_command(key, None)
        hint = self._frame_counts.get(key) if self.count_hint is not False else None
        messages = self._send(self._multi_command(key, hint) if hint else base, base.request)
        if messages is None and hint:
            if self._status_text == "?":  # the adapter does not know the hint
                error = self.last_error
                messages = self._send(base)
                if messages is not None:
                    self.count_hint = False
                    log.info("OBD: the adapter does not take the response-count hint (%s); "
                             "requests go without it", error)
            else:  # perhaps a wrong count: learn it again from an answer without the hint
                self._frame_counts.pop(key, None)
        if messages is None:
            return {}, False
        self._groups_answered.add(key)
        if hint:
            if self.count_hint is None:
                self.count_hint = True
                log.info("OBD: the adapter takes the response-count hint")
        else:
            frames = frame_count(messages)
            if 1 <= frames <= 15:
                self._frame_counts[key] = frames
        try:
            values = base.values(messages, self._decoded)
        except Exception:  # noqa: BLE001
            log.debug("OBD multi-PID answer not understood", exc_info=True)
            values = {}
        missing = [n for n in command_names if n not in values]
        if missing:
            self._failed(elm_lines.RETRY, f"{', '.join(missing)}: not in the answer "
                                          f"({' '.join(bytes(m.data).hex() for m in messages)})")
        return values, True

    def _query(self, command_name: str) -> Any | None:
        cmd = command_for(command_name)
        if cmd is None:
            self.last_error = f"unknown OBD command {command_name!r}"
            return None
        if self._conn is None:
            self.last_error = "not connected"
            return None
        if not self.supports(command_name):
            self.last_error = f"{command_name}: not supported by the vehicle"
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

    def _send(self, cmd: Any, request: bytes | None = None) -> list[Any] | None:
        """Sends ``cmd`` (python-OBD, unchecked) and returns the messages that answer it
        (``request``: what they must echo, when the command carries the count hint); ``None``
        (with :attr:`last_error` and :attr:`outcome`) for no answer, an adapter status line, a
        negative response, an answer to another request (a late answer) or a lost adapter."""
        name = getattr(cmd, "name", "?")
        self._status_text = None
        self.silent = False
        conn, send, parse = self._conn, self._send_lines, self._parse
        if conn is None or send is None or parse is None:
            return self._failed(LOST, "not connected")
        if self._status(conn) == OBDStatus.NOT_CONNECTED:
            return self._failed(LOST, f"adapter on {self.port} lost")
        try:
            lines = send(bytes(cmd.command))
        except Exception as e:  # noqa: BLE001 - python-OBD raises odd things on odd answers
            log.debug("OBD query %s failed", name, exc_info=True)
            return self._failed(elm_lines.RETRY, f"{name}: query failed: {e!r}")
        if self._status(conn) == OBDStatus.NOT_CONNECTED:
            return self._failed(LOST, f"adapter on {self.port} lost")
        if not lines:
            self.silent = True
            return self._failed(elm_lines.RETRY, f"{name}: the adapter said nothing within "
                                                 f"{self.timeout_s:g} s")
        if cmd.mode is None:  # an adapter command (AT RV): its answer is text, not OBD data
            messages = parse(lines) if lines else []
            if messages:
                self.outcome = None
                return messages
            return self._failed(elm_lines.RETRY, f"{name}: no answer")
        verdict = elm_lines.classify(lines)
        try:
            messages = parse(verdict.data) if verdict.data else []
        except Exception as e:  # noqa: BLE001
            log.debug("python-OBD could not parse %r", verdict.data, exc_info=True)
            messages = []
            verdict.handling = verdict.handling or elm_lines.RETRY
            verdict.text, verdict.meaning = verdict.text or repr(e), "parser failed"
        good = answers_to(cmd, messages, request or bytes(cmd.command))
        others = [m for m in messages if m.parsed() and m not in good]
        if others:
            log.info("OBD %s: ignored %d message(s) that do not answer it (late answer?): %s",
                     name, len(others), "; ".join(bytes(m.data).hex(" ") for m in others))
        if good:
            self.outcome = None
            return good
        garbled = len(verdict.data) - frame_count(messages)
        if verdict.handling not in (None, elm_lines.INFO):
            self._status_text = verdict.text
            return self._failed(verdict.handling, f"{name}: adapter says {verdict.text!r} "
                                                  f"({verdict.meaning})")
        if garbled > 0:
            return self._failed(elm_lines.RETRY, f"{name}: answer garbled ({garbled} of "
                                                 f"{len(verdict.data)} lines not understood)")
        if others:
            return self._failed(elm_lines.RETRY, f"{name}: no matching answer")
        return self._failed(elm_lines.RETRY, f"{name}: no answer")

    def _link_down(self) -> bool:
        return self.silent or self.outcome == LOST or self.needs_reconnect

    def _failed(self, outcome: str, message: str) -> None:
        self.outcome = outcome
        self.last_error = message
        if outcome == elm_lines.RECONNECT:
            self.needs_reconnect = True
        log.debug("OBD %s", message)
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

    def _release_slot(self, device: str | None) -> None:
        with self._slot_lock:
            slot, self._slot = self._slot, None
        if slot is not None:
            slot.release()
        if device is not None:
            with _last_close_lock:
                _last_close[device] = time.monotonic()

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
