"""The OBD poller: what the agent asks of the car through the ELM327, and when.

:class:`ObdPoller` owns a thread that keeps a :class:`drivers.obd.reader.ObdReader` connected
(reconnecting with backoff), polls the configured PIDs (PROTOCOL §4 ``obd.pids``) each on its
own period and hands :class:`~drivers.core.model.Sample` lists to a sink (the ingest); it reads
the trouble codes every ``obd.dtc_period_s`` and reports changes as ``dtc`` event bodies
(:class:`agent.vehicle.dtc.DtcTracker`), serves on-demand reads and clears between requests,
and holds every request while power management lets the car sleep (:meth:`ObdPoller.hold`).

Sampling per PID (``period_s``): ``> 0`` polls every ``period_s``; ``0`` is "on change": the
PID is polled every ``on_change_poll_s`` (1 s) and a sample is sent when its value differs from
the last one sent, or when ``heartbeat_s`` (60 s) passed since then, so a constant value is
still seen (and the first value after every connect is sent).

Supported PIDs: the vehicle's bitmaps (``01 00``, ``01 20``, ...) say which PIDs it has. A PID
they leave out is not polled but asked about again with backoff (1 s doubling to 10 min) in
case the bitmap was answered during a bad spell; a PID whose bitmap did not answer at all is
polled anyway (the answers decide) while the bitmaps are asked again.

Faults: when no configured PID has delivered a sample for ``silence_s`` (30 s) while the poller
is not held (power management holds it while the car sleeps, so "not held" stands for "the
engine runs"), :meth:`status` shows ``fault`` and ``on_event`` gets a PROTOCOL §4 ``health``
event, ``kind`` ``obd_link``, ``level`` ``warn``; when samples come back (or the poller is
held), a ``health`` event of the same kind with ``level`` ``info`` ends it (docs/protocol.md).

The port and the protocol (python-OBD, multi-PID, mode 02/03/04/07/0A, the ELM327's quirks and
status lines) are the driver's: drivers/obd/.
"""
from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from agent.vehicle.dtc import DtcTracker
from drivers.core.backoff import Backoff
from drivers.core.clock import Clock
from drivers.core.model import Sample
from drivers.core import vin as vin_check
from drivers.obd import elm_lines
from drivers.obd.reader import ObdReader, command_for

log = logging.getLogger(__name__)

#: The ``health`` event kind of an OBD link fault (docs/protocol.md §11).
FAULT_KIND = "obd_link"


@dataclass
class _Pid:
    name: str
    command: str
    period_s: float  # 0: on change
    next_due: float = 0.0
    last_value: float | None = None  # on change: the last value sent
    last_sent: float = -math.inf  # on change: monotonic time it was sent

    @property
    def on_change(self) -> bool:
        return self.period_s == 0


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
    seen and whenever its VIN or protocol changes. ``on_event(body)`` gets the ``health`` events
    of link faults (see the module text).

    PIDs that are due together go out in one multi-PID request (up to 6, CAN only; see
    :meth:`ObdReader.read_pids` for the per-PID fall-back to single requests).

    Trouble codes are read every ``dtc_period_s`` (and right after each connect):
    ``on_dtc(body)`` gets a PROTOCOL §4 ``dtc`` event body whenever the set of codes or the MIL
    changes (:class:`agent.vehicle.dtc.DtcTracker`; ``dtc_store``, an ``agent.store.Store``,
    keeps the last reported set across restarts). :meth:`read_dtcs_now` and :meth:`clear_dtcs`
    run on the poller's thread, between requests.

    A connection is dropped and re-made (after a backoff wait) when the adapter is lost, answers
    a line that means it lost the vehicle (``UNABLE TO CONNECT``, a reset; see
    drivers/obd/elm_lines.py) or ``fail_limit`` requests in a row get nothing (a negative
    response is an answer: it does not count); the backoff is reset once a connection has
    delivered ``stable_after`` samples. A PID whose every query fails, polled alone, keeps the
    poller reconnecting: that is by design, as it cannot tell such a PID from a dead link.
    :meth:`stop` returns within its timeout: a request or a connect still running after
    :data:`ABORT_AFTER_S` is ended by closing the port under it.
    """

    #: :meth:`stop` lets a request in progress finish this long before it closes the port.
    ABORT_AFTER_S = 1.0

    def __init__(self, port: str, pids: list[dict[str, Any]], sink: Sink, *,
                 clock: Callable[[], int] | None = None, backoff: Backoff | None = None,
                 on_vehicle: Callable[[dict[str, Any]], None] | None = None,
                 on_dtc: Callable[[dict[str, Any]], None] | None = None,
                 on_event: Callable[[dict[str, Any]], None] | None = None,
                 dtc_period_s: float | None = 60.0, dtc_store: Any | None = None,
                 baudrate: int | None = None, protocol: str | int | None = None,
                 timeout_s: float = 2.0, fail_limit: int = 5, stable_after: int = 3,
                 batch_size: int = 16, batch_age_s: float = 0.5,
                 on_change_poll_s: float = 1.0, heartbeat_s: float = 60.0,
                 silence_s: float = 30.0, probe_backoff: Backoff | None = None,
                 reader_factory: Callable[..., ObdReader] = ObdReader):
        self._port = port
        self._sink = sink
        self._clock = clock or Clock().now_ms
        self._backoff = backoff or Backoff(0.5, 30.0)
        self._probe_backoff = probe_backoff or Backoff(1.0, 600.0)
        self._on_vehicle = on_vehicle
        self._on_event = on_event
        self._reader_kwargs = {"baudrate": baudrate, "protocol": protocol, "timeout_s": timeout_s}
        self._reader_factory = reader_factory
        self._fail_limit = max(1, fail_limit)
        self._stable_after = stable_after
        self._batch_size = max(1, batch_size)
        self._batch_age_s = batch_age_s
        self._on_change_poll_s = on_change_poll_s
        self._heartbeat_s = heartbeat_s
        self._silence_s = silence_s

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
        self._unverified: set[str] = set()  # polled though their bitmap did not answer
        self._unsupported_logged: set[str] = set()
        self._support: Callable[[str], bool | None] | None = None  # the connected reader's
        self._vehicle: tuple[str | None, str | None] | None = None
        self._reader: ObdReader | None = None
        self._live_reader: ObdReader | None = None  # connecting or connected (for stop/hold)
        self._connecting = False
        self._probe_due: float | None = None
        self._batch: list[Sample] = []
        self._batch_started = 0.0
        self._good = 0  # samples on the current connection
        self._failures = 0  # failed requests in a row
        self._quiet_from = time.monotonic()  # start of the current stretch without samples
        self._last_sample: float | None = None
        self._last_answer: float | None = None  # any answer of the vehicle (also a refusal)
        self._fault: dict[str, Any] | None = None
        self._fault_started = 0.0
        self._tracker = DtcTracker(on_dtc, store=dtc_store, clock=clock)
        self._dtc_period_s = self._check_period(dtc_period_s)
        self._dtc_due = 0.0
        self._freeze_for: tuple[str, ...] = ()
        self._freeze: dict[str, Any] | None = None
        self._requests: list[_Request] = []
        self._stats: dict[str, Any] = {
            "connected": False, "port": port, "protocol": None, "vin": None, "samples": 0,
            "errors": 0, "last_error": None, "connects": 0, "attempts": 0,
            "sink_errors": 0, "requests": 0, "multi_pid": None, "multi_pid_mode": "unknown",
            "single_pids": [], "multi_fallback_s": 0.0, "count_hint": None,
            "supported_known": None, "probes": 0, "faults": 0,
            "dtc_reads": 0, "dtc": None}
        self.apply_pids(pids)

    # -- public API --------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._quiet_from = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="obd-poller", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 10.0) -> bool:
        """Stops the thread; True if it ended within ``timeout``. A request or a connect still
        running after :data:`ABORT_AFTER_S` is ended by closing the port under it."""
        self._stop.set()
        self._wake.set()
        thread = self._thread
        if thread is None:
            return True
        deadline = math.inf if timeout is None else time.monotonic() + timeout
        thread.join(min(self.ABORT_AFTER_S, timeout if timeout is not None else math.inf))
        if thread.is_alive():
            with self._lock:
                reader = self._live_reader
            if reader is not None:
                log.info("OBD: stopping; closing the port under the request in progress")
                reader.abort()
            remaining = deadline - time.monotonic()
            thread.join(None if remaining == math.inf else max(0.0, remaining))
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
                support = self._support
            if support is not None:
                problems += [f"obd.pids: {p.command} ({p.name}) is not supported by the vehicle"
                             for p in parsed if support(p.command) is False]
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
        set). Returns the stored or pending codes that are no longer reported after (a permanent
        code stays until the ECU clears it itself), ``None`` if not connected, not confirmed
        by an ECU or not done within ``timeout_s``. Only for a confirmed technician request."""
        return self._request("clear_dtc", timeout_s)

    def status(self) -> dict[str, Any]:
        with self._lock:
            result = dict(self._stats)
            result["unknown_pids"] = list(self._unknown)
            result["invalid_pids"] = list(self._invalid)
            result["unsupported_pids"] = sorted(self._unsupported)
            result["unverified_pids"] = sorted(self._unverified)
            result["polling"] = [p.command for p in self._active]
            result["on_change"] = [p.command for p in self._configured if p.on_change]
            result["dtc_period_s"] = self._dtc_period_s
            result["running"] = self._thread is not None and self._thread.is_alive()
            result["held"] = self._hold.is_set()
            result["fault"] = dict(self._fault) if self._fault else None
            result["reprobe_in_s"] = (None if self._probe_due is None else
                                      round(max(0.0, self._probe_due - time.monotonic()), 1))
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
                or not math.isfinite(period) or period < 0:
            log.warning("OBD config: PID %s has a bad period_s %r, skipped", command, period)
            return "invalid"
        return _Pid(name=name, command=command, period_s=float(period))

    def _interval(self, pid: _Pid) -> float:
        return self._on_change_poll_s if pid.on_change else pid.period_s

    def _take_pending(self) -> None:
        with self._lock:
            pending, self._pending_pids = self._pending_pids, None
        if pending is None:
            return
        now = time.monotonic()
        previous = {(p.name, p.command, p.on_change): p for p in self._configured}
        for p in pending:
            old = previous.get((p.name, p.command, p.on_change))
            p.next_due = old.next_due if old is not None else now
            if old is not None:
                p.last_value, p.last_sent = old.last_value, old.last_sent
        if self._fault is None and {(p.name, p.command) for p in pending} \
                - {k[:2] for k in previous}:
            self._quiet_from = now  # new PIDs get their own silence_s to answer
        self._configured = pending
        self._select_active()

    def _select_active(self) -> None:
        reader = self._reader
        active: list[_Pid] = []
        unsupported: set[str] = set()
        unverified: set[str] = set()
        for p in self._configured:
            support = reader.support(p.command) if reader is not None else True
            if support is False:
                unsupported.add(p.command)
                if p.command not in self._unsupported_logged:
                    self._unsupported_logged.add(p.command)
                    log.warning("OBD: the vehicle does not support %s (signal %s), skipped; "
                                "asked again with backoff", p.command, p.name)
                continue
            if support is None:
                unverified.add(p.command)
            elif p.command in self._unsupported_logged:
                self._unsupported_logged.discard(p.command)
                log.info("OBD: the vehicle supports %s (signal %s) after all", p.command, p.name)
            active.append(p)
        with self._lock:
            self._active = active
            if reader is not None:
                self._unsupported = unsupported
                self._unverified = unverified
        if reader is not None:
            if unsupported or unverified or not reader.support_known:
                if self._probe_due is None:
                    self._probe_due = time.monotonic() + self._probe_backoff.next()
            else:
                self._probe_due = None
                self._probe_backoff.reset()

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
        while self._reader is not None:
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
        requests on the bus, so a connect in progress is ended. Pending one-off requests fail
        at once."""
        self._hold.set()
        self._wake.set()
        with self._lock:
            reader = self._live_reader if self._connecting else None
        if reader is not None:
            reader.abort()

    def release(self) -> None:
        """Resumes polling after :meth:`hold`."""
        self._hold.clear()
        self._wake.set()

    @property
    def held(self) -> bool:
        return self._hold.is_set()

    def _cycle(self) -> None:
        self._check_fault()
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
        if self._probe_due is not None and self._probe_due <= now:
            self._probe()
            return
        due = [p for p in self._active if p.next_due <= now]
        if not due:
            self._flush(force=False)
            wait = min((p.next_due for p in self._active), default=now + 0.25) - now
            if dtc_period is not None:
                wait = min(wait, dtc_due - now)
            if self._probe_due is not None:
                wait = min(wait, self._probe_due - now)
            if self._batch:
                wait = min(wait, max(0.0, self._batch_started + self._batch_age_s - now))
            if self._wake.wait(min(max(wait, 0.0), 0.25)):
                self._wake.clear()
            return
        self._poll(due, now)

    def _poll(self, due: list[_Pid], now: float) -> None:
        reader = self._reader
        assert reader is not None
        group = self._next_group(due)
        commands = list(dict.fromkeys(p.command for p in group))
        results = reader.read_pids(commands)
        t_ms = self._clock()
        with self._lock:
            self._stats["requests"] += 1
            self._stats["multi_pid"] = reader.multi_pid
            self._stats["multi_pid_mode"] = reader.multi_mode
            self._stats["single_pids"] = reader.single_pids
            self._stats["multi_fallback_s"] = round(reader.fallback_s, 3)
            self._stats["count_hint"] = reader.count_hint
        for pid in group:
            pid.next_due += self._interval(pid)
            if pid.next_due < now:  # fell behind: don't burst to catch up
                pid.next_due = now + self._interval(pid)
        if not results:
            self._after_request(False, reader.last_error or f"{group[0].command}: no answer")
            return
        if len(results) < len(commands):
            self._record_error(reader.last_error or "some PIDs got no answer")
        if not self._batch:
            self._batch_started = time.monotonic()
        delivered = 0
        for pid in group:
            result = results.get(pid.command)
            if result is None:
                continue
            if pid.on_change:
                if result[0] == pid.last_value and now - pid.last_sent < self._heartbeat_s:
                    continue
                pid.last_value, pid.last_sent = result[0], now
            self._batch.append(Sample(name=pid.name, unit=result[1], t_ms=t_ms,
                                      value=result[0]))
            delivered += 1
        before = self._good
        self._good += len(results)
        self._after_request(True)
        with self._lock:
            self._stats["samples"] += delivered
        self._delivered()
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

    def _probe(self) -> None:
        """Asks the supported-PID bitmaps again (for unsupported or unverified PIDs)."""
        reader = self._reader
        assert reader is not None
        self._probe_due = None
        answered = reader.probe_supported()
        with self._lock:
            self._stats["probes"] += 1
            self._stats["supported_known"] = reader.support_known
        if not self._after_request(answered, reader.last_error or "supported PIDs: no answer"):
            return
        self._select_active()

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
            self._after_request(False, f"trouble codes: {reader.last_error or 'no answer'}")
        else:
            self._after_request(True)
        return body

    def _clear_dtcs(self) -> list[str] | None:
        reader = self._reader
        if reader is None:
            return None
        before = self._poll_dtcs()
        if self._reader is None:
            return None
        if not reader.clear_dtcs():
            self._record_error(f"clearing trouble codes: {reader.last_error or 'no answer'}")
            return None
        self._freeze, self._freeze_for = None, ()
        after = self._poll_dtcs()
        # cleared = a stored or pending code no longer reported as such. A permanent code (mode
        # 0A) stays until the ECU's own monitor passes, whatever a scan tool sends: the stored
        # P0301 is cleared even though a permanent P0301 is still reported.
        left = {(c["code"], c["state"]) for c in (after or {}).get("codes", [])}
        codes = [c["code"] for c in (before or {}).get("codes", [])
                 if c["state"] != "permanent" and (c["code"], c["state"]) not in left]
        return list(dict.fromkeys(codes))

    def _connect(self) -> bool:
        with self._lock:
            self._stats["attempts"] += 1
        reader = self._reader_factory(self._port, **self._reader_kwargs)
        with self._lock:
            if self._stop.is_set() or self._hold.is_set():
                return False
            self._live_reader, self._connecting = reader, True
        try:
            ok = reader.connect()
        finally:
            with self._lock:
                self._connecting = False
        if not ok or self._stop.is_set() or self._hold.is_set():
            reader.close()
            with self._lock:
                self._live_reader = None
            self._record_error(reader.last_error or "connect failed")
            return False
        self._reader = reader
        self._good = 0
        self._failures = 0
        self._freeze, self._freeze_for = None, ()
        for p in self._configured:
            p.last_value, p.last_sent = None, -math.inf  # on change: send the first value again
        self._probe_due = None
        self._probe_backoff.reset()
        if reader.support_known:
            self._last_answer = time.monotonic()
        protocol = reader.protocol_name
        vin = reader.read_vin()
        with self._lock:
            self._stats.update(connected=True, protocol=protocol, vin=vin, multi_pid=None,
                               multi_pid_mode=reader.multi_mode, single_pids=[],
                               count_hint=None, supported_known=reader.support_known)
            self._stats["connects"] += 1
            self._support = reader.support
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

    def _after_request(self, answered: bool, error: str | None = None) -> bool:
        """Books one request (or DTC poll or probe); drops the connection when the adapter is
        lost, said it lost the vehicle, or ``fail_limit`` requests in a row failed. False when
        the connection was dropped."""
        reader = self._reader
        assert reader is not None
        refused = reader.outcome == elm_lines.REFUSED
        if answered or refused:
            self._last_answer = time.monotonic()
            self._failures = 0
        else:
            self._failures += 1
        if not answered:
            self._record_error(error or reader.last_error or "no answer")
        lost = not reader.connected
        if lost or reader.needs_reconnect or self._failures >= self._fail_limit:
            reason = ("adapter lost" if lost else
                      f"the adapter said {reader.last_error}" if reader.needs_reconnect else
                      f"{self._failures} requests in a row failed")
            log.warning("OBD: %s on %s, reconnecting", reason, self._port)
            self._disconnect()
            self._flush(force=True)
            self._pause(self._backoff.next())
            return False
        return True

    # -- faults ------------------------------------------------------------------------------

    def _delivered(self) -> None:
        now = time.monotonic()
        self._last_sample = now
        if self._fault is not None:
            self._end_fault("answering", now)

    def _check_fault(self) -> None:
        """Raises the link fault after ``silence_s`` without a sample (not held, PIDs
        configured); ends it when the poller is held."""
        now = time.monotonic()
        if self._hold.is_set() or not self._configured or self._stop.is_set():
            if self._fault is not None and not self._stop.is_set():
                self._end_fault("held" if self._hold.is_set() else "no_pids", now)
            self._quiet_from = now
            return
        if self._fault is not None:
            return
        since = max(self._quiet_from, self._last_sample or -math.inf)
        if now - since < self._silence_s:
            return
        reader = self._reader
        if reader is None:
            cause = "not_connected"
        elif self._last_answer is not None and self._last_answer > since:
            cause = "unsupported" if not self._active else "no_data"
        else:
            cause = "no_answer"
        with self._lock:
            detail = {"state": "no_answer", "cause": cause, "connected": reader is not None,
                      "silent_s": round(now - since, 1), "port": self._port,
                      "protocol": self._stats["protocol"], "last_error": self._stats["last_error"],
                      "polling": [p.command for p in self._active],
                      "unsupported_pids": sorted(self._unsupported),
                      "supported_known": self._stats["supported_known"],
                      "connects": self._stats["connects"]}
            self._fault = {**detail, "since_ms": self._clock() - int((now - since) * 1000)}
            self._fault_started = now
            self._stats["faults"] += 1
        log.warning("OBD: no PID has answered for %.0f s (%s; last error: %s)",
                    now - since, cause, detail["last_error"])
        self._emit({"type": "health", "ts": self._clock(), "kind": FAULT_KIND, "level": "warn",
                    "detail": detail})

    def _end_fault(self, state: str, now: float) -> None:
        with self._lock:
            fault, self._fault = self._fault, None
        if fault is None:
            return
        lasted = round(now - self._fault_started + fault["silent_s"], 1)
        log.info("OBD: link fault over (%s) after %.0f s without samples", state, lasted)
        self._emit({"type": "health", "ts": self._clock(), "kind": FAULT_KIND, "level": "info",
                    "detail": {"state": state, "silent_s": lasted, "cause": fault["cause"],
                               "port": self._port}})

    def _emit(self, body: dict[str, Any]) -> None:
        if self._on_event is None:
            return
        try:
            self._on_event(body)
        except Exception:  # noqa: BLE001 - a broken event sink must not stop the poller
            log.exception("OBD: sending the %s event failed", body.get("kind"))

    # -- plumbing ----------------------------------------------------------------------------

    def _pause(self, seconds: float) -> None:
        """Waits ``seconds``; returns early on :meth:`stop`, :meth:`set_port` and
        :meth:`release`."""
        deadline = time.monotonic() + seconds
        held = self._hold.is_set()
        while not self._stop.is_set():
            self._check_fault()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            if self._wake.wait(min(remaining, 0.25)):
                self._wake.clear()
                with self._lock:
                    if self._pending_port is not None:
                        return
                if held and not self._hold.is_set():
                    return

    def _disconnect(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.close()
        with self._lock:
            self._live_reader = None
            self._support = None
            self._stats["connected"] = False
        self._probe_due = None
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
