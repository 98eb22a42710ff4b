"""CAN buses in, :class:`~drivers.core.model.FrameBatch` batches out.

python-can's interfaces are the hardware abstraction (socketcan, slcan, and the ``virtual`` /
``udp_multicast`` twins); this module only opens them from the local settings and reads them.

Receive path: one thread per bus calls ``bus.recv()``, checks the message and appends it to the
bus's bounded deque — nothing else, so no slow consumer can stall reception (python-can #401); a
full deque drops the message and counts it. A consumer thread drains the deques in batches, one
:class:`FrameBatch` (columns, no object per frame) per bus, and calls ``on_frames``.

What enters is checked where it enters (PROTOCOL §4 frames): an id out of range for its form
(11-bit above 0x7FF, 29-bit above 0x1FFFFFFF) or a payload over 8 bytes on a classic frame (64
on CAN FD) is dropped and counted per bus (``invalid``); error frames and remote frames are
counted, never passed on. A message the interface cannot parse (a garbled line from a serial
adapter, which python-can's slcan driver raises as ``ValueError`` inside ``recv``) is skipped and
counted (``unparsable``); only a failure of the port itself (unplugged adapter, socket gone) is
logged, counted and answered by reopening the bus with backoff. Nothing ends the reader
(python-can #907 is a Notifier thread dying on one driver error, which is why this is not a
``can.Notifier``).
"""
from __future__ import annotations

import collections
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import can

from drivers.core.backoff import Backoff
from drivers.core.clock import Clock
from drivers.core.local_file import LocalFileError
from drivers.core.model import EXT_FLAG, Frame, FrameBatch, frame_problem

if TYPE_CHECKING:
    from cantools.database.can import Database

log = logging.getLogger(__name__)

#: Settings keys that are ours, not python-can's.
_OWN_KEYS = frozenset({"name", "dbc"})
#: A message timestamp (kernel or adapter time) is kept when it is within this of the agent's
#: clock; otherwise (seconds since boot, as in recordings, zero, or a wall clock the agent does
#: not trust yet: a Pi boots at a stale saved time) the frame is stamped with the clock itself.
_TRUST_WINDOW_US = 60_000_000
#: Message timestamps outside these (seconds since the epoch) are not epoch time.
_EPOCH_MIN_S = 1_500_000_000.0
_EPOCH_MAX_S = 4_102_444_800.0

# SocketCAN error-frame classes (linux/can/error.h), carried in the error frame's id.
_CAN_ERR_CRTL = 0x004
_CAN_ERR_BUSOFF = 0x040
_CAN_ERR_RESTARTED = 0x100
_CAN_ERR_CRTL_PASSIVE = 0x10 | 0x20  # RX_PASSIVE | TX_PASSIVE in data[1]

Filters = list[dict[str, Any]] | None

#: Receive buffer asked for on a bus's kernel socket (SocketCAN, udp_multicast): at 10,000
#: frames/s the default 208 KiB holds ~30 ms of frames, less than one pause of the reader (a
#: garbage collection, a busy core), and the kernel drops what does not fit. The kernel caps
#: the request at ``net.core.rmem_max`` (docs/performance.md).
RCVBUF_BYTES = 1 << 20
_SO_MEMINFO = 55        # linux/sock_diag.h: getsockopt(SOL_SOCKET) -> u32[SK_MEMINFO_VARS]
_SK_MEMINFO_RCVBUF = 1
_SK_MEMINFO_DROPS = 8


class DbcError(LocalFileError):
    """A DBC file that cannot be read or parsed (the message says where and why)."""


def load_dbc(path: str | Path) -> Database:
    """A DBC loaded the way real-world files need it (``strict=False``: overlapping signals).
    Raises :class:`DbcError` naming the file and the problem (cantools' own words, e.g. the
    line and column of a syntax error).

    cantools is imported here, not with this module: an agent whose buses name no DBC (raw
    capture only) does without it (~2 MB of RSS)."""
    import cantools
    from cantools.database.can import Database
    try:
        db = cantools.database.load_file(str(path), database_format="dbc", strict=False)
    except OSError as e:
        raise DbcError(path, f"cannot read it: {e.strerror or e}") from None
    except Exception as e:  # cantools: UnsupportedDatabaseFormatError (syntax), ValueError, KeyError, ...
        text = " ".join(str(e).split()).removeprefix("DBC: ")
        if len(text) > 1 and text[0] == text[-1] == '"':
            text = text[1:-1]
        text = text or type(e).__name__
        raise DbcError(path, f"not a valid DBC file: {text[:300]}") from None
    if not isinstance(db, Database):
        raise DbcError(path, "not a CAN database")
    return db


def bus_kwargs(setting: Mapping[str, Any], can_filters: Filters = None) -> dict[str, Any]:
    """``can.Bus`` keyword arguments for one bus setting (our own keys removed)."""
    kwargs = {k: v for k, v in setting.items() if k not in _OWN_KEYS and v is not None}
    if can_filters is not None:
        kwargs["can_filters"] = can_filters
    return kwargs


def open_bus(setting: Mapping[str, Any], can_filters: Filters = None) -> can.BusABC:
    bus = can.Bus(**bus_kwargs(setting, can_filters))
    with _kernel_socket(bus) as sock:
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF_BYTES)
            except OSError as e:
                log.debug("CAN bus %s: SO_RCVBUF: %s", setting.get("name"), e)
    return bus


class _kernel_socket:
    """``with _kernel_socket(bus) as sock``: the bus's kernel socket (a duplicate of its
    descriptor, closed after), or None for a bus without one (slcan's serial port, virtual)."""

    def __init__(self, bus: can.BusABC | None):
        self._sock: socket.socket | None = None
        try:
            fd = bus.fileno() if bus is not None else -1
        except Exception:   # NotImplementedError (virtual), a closed bus
            fd = -1
        if isinstance(fd, int) and fd >= 0:
            dup = os.dup(fd)
            try:
                self._sock = socket.socket(fileno=dup)
            except OSError:   # not a socket
                os.close(dup)

    def __enter__(self) -> socket.socket | None:
        return self._sock

    def __exit__(self, *exc: object) -> None:
        if self._sock is not None:
            self._sock.close()


def socket_meminfo(bus: can.BusABC | None) -> tuple[int, int] | None:
    """(receive buffer bytes, datagrams dropped by the kernel) of the bus's socket, from
    SO_MEMINFO (Linux 4.6+); None without a kernel socket."""
    with _kernel_socket(bus) as sock:
        if sock is None:
            return None
        try:
            info = struct.unpack("9I", sock.getsockopt(socket.SOL_SOCKET, _SO_MEMINFO, 36)[:36])
        except (OSError, struct.error):
            return None
    return info[_SK_MEMINFO_RCVBUF], info[_SK_MEMINFO_DROPS]


def _filters_for(name: str, can_filters: Filters | Mapping[str, Filters]) -> Filters:
    if isinstance(can_filters, Mapping):
        return can_filters.get(name)
    return can_filters


def open_buses(bus_settings: Sequence[Mapping[str, Any]],
               can_filters: Filters | Mapping[str, Filters] = None) -> dict[str, can.BusABC]:
    """Opens every bus of the local settings: ``{name: bus}``.

    ``can_filters`` is one filter list for all buses or a map bus name → filter list (see
    :attr:`agent.can_decode.CanDecoder.can_filters`; ``None`` = no filtering). Raises on the first
    bus that fails to open, after closing those already opened; :meth:`CanReader.from_settings`
    is the form that keeps retrying instead.
    """
    buses: dict[str, can.BusABC] = {}
    try:
        for setting in bus_settings:
            name = setting["name"]
            buses[name] = open_bus(setting, _filters_for(name, can_filters))
    except BaseException:
        for bus in buses.values():
            _shutdown_quietly(bus)
        raise
    return buses


def wall_agrees(now_us: int, wall_us: int) -> bool:
    """The agent's clock (``now_us``) and the system's wall clock (``wall_us``, what the kernel
    stamps frames with) agree to within :data:`_TRUST_WINDOW_US`: a Pi booted at a stale saved
    time and not yet synchronised makes them disagree (the agent's clock is then provisional)."""
    return abs(now_us - wall_us) <= _TRUST_WINDOW_US


def trusted_timestamp(ts_s: float, now_us: int, wall_us: int) -> float:
    """A received message's own timestamp ``ts_s`` (kernel or adapter time, seconds) when it is
    epoch time and the system clock behind it agrees with the agent's (:func:`wall_agrees`);
    otherwise (seconds since boot, as in recordings, zero, or a stale system clock) ``now_us``,
    the agent's clock, in seconds. The reader applies the same rule per frame, with
    :func:`wall_agrees` re-checked once a second."""
    return ts_s if timestamp_kept(ts_s, wall_agrees(now_us, wall_us)) else now_us / 1_000_000


def timestamp_kept(ts_s: float, wall_ok: bool) -> bool:
    """The rule of :func:`trusted_timestamp`, with :func:`wall_agrees` already known."""
    return wall_ok and _EPOCH_MIN_S <= ts_s <= _EPOCH_MAX_S


def _shutdown_quietly(bus: can.BusABC | None) -> None:
    if bus is None:
        return
    try:
        bus.shutdown()
    except Exception as e:  # a dead adapter may fail to close; nothing more to do about it
        log.debug("shutting down %s: %s", bus, e)


def _bad_message(e: BaseException) -> bool:
    """Whether an exception from ``recv()`` is one unparsable message (skip it) rather than the
    port failing (reopen it). python-can's slcan driver raises a bare ``ValueError``/``IndexError``
    for a garbled line, and ``CanOperationError`` from a ``UnicodeDecodeError`` for undecodable
    bytes; a port that fails raises ``OSError`` (pyserial's ``SerialException`` is one) or a
    ``CanError`` without such a cause. Unknown kinds count as port failures (the safe side)."""
    seen: set[int] = set()
    x: BaseException | None = e
    while x is not None and id(x) not in seen:
        seen.add(id(x))
        if isinstance(x, (OSError, can.CanInitializationError)):
            return False
        if isinstance(x, (ValueError, IndexError, KeyError)):
            return True
        x = x.__cause__ or x.__context__
    return False


def _forget_undecodable_line(bus: can.BusABC, e: BaseException) -> None:
    """python-can's slcan driver (4.x) keeps a line it cannot decode as text in its line buffer
    (``_read`` decodes before it clears), so every later line fails with it and the bus goes
    quiet. Dropping those bytes is the one place this module touches a python-can internal;
    tests/test_can.py (unparsable slcan lines) fails if python-can changes it."""
    cause = e.__cause__ or e.__context__
    buf = getattr(bus, "_buffer", None)
    if isinstance(cause, UnicodeDecodeError) and isinstance(buf, bytearray):
        buf.clear()


class _BusState:
    __slots__ = ("name", "bus", "queue", "frames", "drops", "socket_drops_before", "invalid", "last_invalid", "unparsable",
                 "last_unparsable", "error_frames", "remote_frames", "bus_errors", "bus_off", "reopens",
                 "state", "last_error", "opened_at", "thread")

    def __init__(self, name: str, bus: can.BusABC | None):
        self.name = name
        self.bus = bus
        self.queue: collections.deque[can.Message] = collections.deque()
        self.frames = 0
        self.drops = 0
        self.socket_drops_before = 0   # kernel drops on sockets of this bus closed since
        self.invalid = 0
        self.last_invalid = ""
        self.unparsable = 0
        self.last_unparsable = ""
        self.error_frames = 0
        self.remote_frames = 0
        self.bus_errors = 0
        self.bus_off = 0
        self.reopens = 0
        self.state = "stopped"
        self.last_error = ""
        self.opened_at = time.monotonic()
        self.thread: threading.Thread | None = None


def frame_batch(bus: str, msgs: Sequence[can.Message]) -> FrameBatch:
    """Received python-can messages (already checked and stamped, see :class:`CanReader`) as
    one batch of columns."""
    return FrameBatch(bus, [round(m.timestamp * 1_000_000) for m in msgs],
                      [m.arbitration_id | EXT_FLAG if m.is_extended_id else m.arbitration_id for m in msgs],
                      [m.data for m in msgs])


class CanReader:
    """Reads buses on one thread each and hands one :class:`FrameBatch` per bus to ``on_frames``.

    The reader owns the buses it is given: :meth:`stop` shuts them down. ``reopen(name)`` returns a
    fresh bus after a failure; without it a failing bus is retried as it is, with backoff.
    ``on_frames`` runs on the reader's consumer thread, never on a receive thread; an exception
    from it is logged and counted.

    Time: a message's own timestamp (kernel or adapter time) is kept when it agrees with
    ``clock_us()`` (:func:`trusted_timestamp`); otherwise the receive thread stamps it with
    ``clock_us()`` on arrival. ``queue_size`` bounds each bus's deque.
    """

    def __init__(self, buses: Mapping[str, can.BusABC | None],
                 on_frames: Callable[[FrameBatch], None], *,
                 clock_us: Callable[[], int] | None = None,
                 reopen: Callable[[str], can.BusABC] | None = None,
                 queue_size: int = 50_000, batch_max: int = 4_000, batch_interval_s: float = 0.05,
                 recv_timeout_s: float = 0.2, backoff_s: tuple[float, float] = (0.5, 30.0),
                 stable_after_s: float = 10.0):
        self._states = {name: _BusState(name, bus) for name, bus in buses.items()}
        self._on_frames = on_frames
        self._clock_us = clock_us or Clock().now_us
        self._wall_ok = False          # wall_agrees(), as last checked
        self._wall_checked_at = -1e9   # time.monotonic() of that check
        self._reopen = reopen
        self._queue_size = queue_size
        self._batch_max = batch_max
        self._batch_interval_s = batch_interval_s
        self._recv_timeout_s = recv_timeout_s
        self._backoff_s = backoff_s
        self._stable_after_s = stable_after_s
        self._filters: dict[str, Filters] = {name: None for name in buses}
        self._stop = threading.Event()
        self._consumer: threading.Thread | None = None
        self.batches = 0
        self.callback_errors = 0
        self.delivered = 0

    @classmethod
    def from_settings(cls, bus_settings: Sequence[Mapping[str, Any]],
                      on_frames: Callable[[FrameBatch], None],
                      can_filters: Filters | Mapping[str, Filters] = None, **kw: Any) -> CanReader:
        """Opens the buses itself; one that fails to open now is retried with backoff."""
        settings = {s["name"]: dict(s) for s in bus_settings}
        reader: CanReader

        def reopen(name: str) -> can.BusABC:
            return open_bus(settings[name], reader._filters.get(name))

        buses: dict[str, can.BusABC | None] = {}
        for name, setting in settings.items():
            try:
                buses[name] = open_bus(setting, _filters_for(name, can_filters))
            except Exception as e:
                log.error("CAN bus %s failed to open (%s); will retry", name, e)
                buses[name] = None
        reader = cls(buses, on_frames, reopen=reopen, **kw)
        reader._filters = {name: _filters_for(name, can_filters) for name in settings}
        return reader

    def set_filters(self, can_filters: Filters | Mapping[str, Filters]) -> None:
        """Applies new acceptance filters (a new config) to the open buses and to later reopens."""
        self._filters = {name: _filters_for(name, can_filters) for name in self._states}
        for st in self._states.values():
            bus = st.bus
            if bus is not None:
                try:
                    bus.set_filters(self._filters[st.name])
                except Exception as e:
                    log.warning("CAN bus %s: setting filters failed: %s", st.name, e)

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        if self._consumer is not None:
            raise RuntimeError("CanReader already started")
        self._stop.clear()
        self._consumer = threading.Thread(target=self._consume, name="can-consumer", daemon=True)
        self._consumer.start()
        for st in self._states.values():
            st.state = "running" if st.bus is not None else "reopening"
            st.thread = threading.Thread(target=self._receive, args=(st,), name=f"can-rx-{st.name}",
                                         daemon=True)
            st.thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stops reading, delivers what is queued, shuts the buses down."""
        self._stop.set()
        for st in self._states.values():
            if st.thread is not None:
                st.thread.join(timeout)
                st.thread = None
        if self._consumer is not None:
            self._consumer.join(timeout)
            self._consumer = None
        for st in self._states.values():
            _shutdown_quietly(st.bus)
            st.bus = None
            st.state = "stopped"

    def __enter__(self) -> CanReader:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def status(self) -> dict[str, dict[str, Any]]:
        """Per bus: frames (queued), errors (error frames + port failures), drops (frames lost
        before the agent had them: the deque full, plus what the kernel dropped on the bus's
        socket, ``socket_drops``, since it was opened), invalid (frames the protocol cannot
        carry), unparsable (messages skipped), state, details."""
        out = {}
        for st in self._states.values():
            mem = socket_meminfo(st.bus)
            out[st.name] = self._status_of(st, mem)
        return out

    @staticmethod
    def _status_of(st: _BusState, mem: tuple[int, int] | None) -> dict[str, Any]:
        kernel = mem[1] if mem else 0
        return {
                "frames": st.frames,
                "errors": st.error_frames + st.bus_errors,
                "drops": st.drops + st.socket_drops_before + kernel,
                "queue_drops": st.drops,
                "socket_drops": None if mem is None and not st.socket_drops_before else st.socket_drops_before + kernel,
                "rcvbuf": mem[0] if mem else None,
                "invalid": st.invalid,
                "unparsable": st.unparsable,
                "state": st.state,
                "error_frames": st.error_frames,
                "bus_errors": st.bus_errors,
                "bus_off": st.bus_off,
                "remote_frames": st.remote_frames,
                "reopens": st.reopens,
                "queued": len(st.queue),
                "last_error": st.last_error,
                "last_invalid": st.last_invalid,
                "last_unparsable": st.last_unparsable,
        }

    # -- receive threads ------------------------------------------------------------------------

    def _receive(self, st: _BusState) -> None:
        backoff = Backoff(*self._backoff_s)
        stop = self._stop
        queue = st.queue
        append = queue.append
        limit = self._queue_size
        clock_us = self._clock_us
        name = st.name
        timeout = self._recv_timeout_s
        while not stop.is_set():
            bus = st.bus
            if bus is None:
                if self._reopen is None:
                    st.state = "failed"
                    return
                try:
                    bus = self._reopen(name)
                except Exception as e:
                    st.bus_errors += 1
                    st.last_error = f"open: {e}"
                    wait = backoff.next()
                    log.warning("CAN bus %s: reopen failed (%s); next try in %.1f s", name, e, wait)
                    stop.wait(wait)
                    continue
                st.bus, st.reopens, st.opened_at, st.state = bus, st.reopens + 1, time.monotonic(), "running"
                log.info("CAN bus %s reopened", name)
            try:
                msg = bus.recv(timeout)
            except Exception as e:
                if _bad_message(e):
                    self._on_unparsable(st, e)
                    _forget_undecodable_line(bus, e)
                    continue
                st.bus_errors += 1
                st.last_error = f"{type(e).__name__}: {e}"
                wait = backoff.next()
                log.error("CAN bus %s failed: %s; reopening in %.1f s", name, st.last_error, wait)
                if self._reopen is not None:
                    mem = socket_meminfo(bus)
                    st.socket_drops_before += mem[1] if mem else 0
                    _shutdown_quietly(bus)
                    st.bus = None
                st.state = "reopening"
                stop.wait(wait)
                if st.bus is not None:
                    st.state = "running"
                continue
            if msg is None:
                continue
            self._accept(st, msg, queue, limit, clock_us)
            if st.state != "running":
                st.state = "running"
            if backoff.failures and time.monotonic() - st.opened_at > self._stable_after_s:
                backoff.reset()

    def accept(self, bus: str, msg: can.Message) -> None:
        """Takes one received message of ``bus`` as its receive thread does (checked, stamped,
        queued for the consumer): for a caller that reads the bus itself (bench/bench_can.py)."""
        st = self._states[bus]
        self._accept(st, msg, st.queue, self._queue_size, self._clock_us)

    def _accept(self, st: _BusState, msg: can.Message, queue, limit: int, clock_us) -> None:
        if msg.is_error_frame or msg.is_remote_frame:
            if msg.is_error_frame:
                self._on_error_frame(st, msg)
            else:
                st.remote_frames += 1
            return
        if msg.arbitration_id > (0x1FFF_FFFF if msg.is_extended_id else 0x7FF) \
                or len(msg.data) > (64 if msg.is_fd else 8):
            self._on_invalid(st, msg)
            return
        mono = time.monotonic()
        if mono >= self._wall_checked_at + 1.0:
            self._wall_checked_at = mono
            self._wall_ok = wall_agrees(clock_us(), time.time_ns() // 1000)
        if not timestamp_kept(msg.timestamp, self._wall_ok):
            msg.timestamp = clock_us() / 1_000_000
        if len(queue) >= limit:
            st.drops += 1
        else:
            queue.append(msg)
            st.frames += 1

    @staticmethod
    def _on_invalid(st: _BusState, msg: can.Message) -> None:
        st.invalid += 1
        why = frame_problem(msg.arbitration_id, msg.is_extended_id, len(msg.data), msg.is_fd) or "invalid"
        st.last_invalid = why
        if st.invalid == 1 or st.invalid % 1000 == 0:
            log.warning("CAN bus %s: frame dropped, %s (%d so far)", st.name, why, st.invalid)

    @staticmethod
    def _on_unparsable(st: _BusState, e: BaseException) -> None:
        st.unparsable += 1
        cause = e.__cause__ or e.__context__ or e
        st.last_unparsable = f"{type(cause).__name__}: {cause}"[:200]
        if st.unparsable == 1 or st.unparsable % 1000 == 0:
            log.warning("CAN bus %s: unparsable message skipped (%s; %d so far)", st.name,
                        st.last_unparsable, st.unparsable)

    @staticmethod
    def _on_error_frame(st: _BusState, msg: can.Message) -> None:
        st.error_frames += 1
        cls = msg.arbitration_id
        if cls & _CAN_ERR_BUSOFF:
            st.bus_off += 1
            st.state = "bus_off"
            log.warning("CAN bus %s: bus off", st.name)
        elif cls & _CAN_ERR_CRTL and len(msg.data) > 1 and msg.data[1] & _CAN_ERR_CRTL_PASSIVE:
            st.state = "error_passive"
        elif cls & _CAN_ERR_RESTARTED:
            st.state = "running"

    # -- consumer -------------------------------------------------------------------------------

    def _threads_done(self) -> bool:
        return all(st.thread is None or not st.thread.is_alive() for st in self._states.values())

    def _consume(self) -> None:
        """Every ``batch_interval_s`` (at once while a deque holds a full batch), each bus's
        queued messages as one batch: fewer, larger batches cost less per frame downstream."""
        while True:
            stopping = self._stop.is_set()
            delivered, more = self.drain()
            if more:
                continue
            if stopping:
                if not delivered and self._threads_done() and not any(st.queue for st in self._states.values()):
                    return
                time.sleep(0.01)  # receive threads are finishing their last recv()
            else:
                self._stop.wait(self._batch_interval_s)

    def drain(self) -> tuple[int, bool]:
        """One pass of the consumer: each bus's queued messages (up to ``batch_max``) as one
        batch to ``on_frames``. Returns (frames delivered, whether a full batch is still queued)."""
        delivered, more = 0, False
        for st in self._states.values():
            queue = st.queue
            if queue:
                popleft = queue.popleft
                msgs = [popleft() for _ in range(min(len(queue), self._batch_max))]
                self._deliver(frame_batch(st.name, msgs))
                delivered += len(msgs)
                more = more or len(queue) >= self._batch_max
        return delivered, more

    def _deliver(self, batch: FrameBatch) -> None:
        self.batches += 1
        self.delivered += len(batch)
        try:
            self._on_frames(batch)
        except Exception:
            self.callback_errors += 1
            log.exception("CAN on_frames callback failed on a batch of %d frames", len(batch))
