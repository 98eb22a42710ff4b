"""CAN buses in, :class:`~agent.model.Frame` batches out.

python-can's interfaces are the hardware abstraction (socketcan, slcan, and the ``virtual`` /
``udp_multicast`` twins); this module only opens them from the local settings and reads them.

Receive path: one thread per bus calls ``bus.recv()``, converts the message to a ``Frame`` and
appends it to a bounded deque — nothing else, so no slow consumer can stall reception (python-can
#401); a full deque drops the frame and counts it. A consumer thread drains the deque in batches
and calls ``on_frames``. An exception from a bus (unplugged adapter, socket gone) is logged,
counted and answered by reopening the bus with backoff; it never ends the reader (python-can #907
is a Notifier thread dying on one driver error, which is why this is not a ``can.Notifier``).
Error frames and remote frames are counted, never passed on.
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import can

from drivers.core.backoff import Backoff
from drivers.core.clock import Clock
from drivers.core.model import Frame

if TYPE_CHECKING:
    from cantools.database.can import Database

log = logging.getLogger(__name__)

#: Settings keys that are ours, not python-can's.
_OWN_KEYS = frozenset({"name", "dbc"})
#: A message timestamp (kernel or adapter time) is kept when it is within this of the agent's
#: clock; otherwise (seconds since boot, as in recordings, zero, or a wall clock the agent does
#: not trust yet: a Pi boots at a stale saved time) the frame is stamped with the clock itself.
_TRUST_WINDOW_US = 60_000_000

# SocketCAN error-frame classes (linux/can/error.h), carried in the error frame's id.
_CAN_ERR_CRTL = 0x004
_CAN_ERR_BUSOFF = 0x040
_CAN_ERR_RESTARTED = 0x100
_CAN_ERR_CRTL_PASSIVE = 0x10 | 0x20  # RX_PASSIVE | TX_PASSIVE in data[1]

Filters = list[dict[str, Any]] | None


def load_dbc(path: str | Path) -> Database:
    """A DBC loaded the way real-world files need it (``strict=False``: overlapping signals).

    cantools is imported here, not with this module: an agent whose buses name no DBC (raw
    capture only) does without it (~2 MB of RSS)."""
    import cantools
    from cantools.database.can import Database
    db = cantools.database.load_file(str(path), database_format="dbc", strict=False)
    if not isinstance(db, Database):
        raise ValueError(f"{path}: not a CAN database")
    return db


def bus_kwargs(setting: Mapping[str, Any], can_filters: Filters = None) -> dict[str, Any]:
    """``can.Bus`` keyword arguments for one bus setting (our own keys removed)."""
    kwargs = {k: v for k, v in setting.items() if k not in _OWN_KEYS and v is not None}
    if can_filters is not None:
        kwargs["can_filters"] = can_filters
    return kwargs


def open_bus(setting: Mapping[str, Any], can_filters: Filters = None) -> can.BusABC:
    return can.Bus(**bus_kwargs(setting, can_filters))


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


def frame_from_message(bus: str, msg: can.Message, clock_us: Callable[[], int]) -> Frame:
    """A received python-can message as our Frame, stamped in µs since the epoch.

    The message's own timestamp (kernel or adapter time) is kept when it agrees with
    ``clock_us()`` (within a minute); otherwise (seconds since boot, zero, or a system time the
    clock does not trust, which makes ``clock_us()`` provisional) the frame is stamped with
    ``clock_us()`` on arrival.
    """
    now = clock_us()
    t_us = int(msg.timestamp * 1_000_000)
    if abs(t_us - now) > _TRUST_WINDOW_US:
        t_us = now
    return Frame(bus, t_us, msg.arbitration_id, msg.is_extended_id, bytes(msg.data))


def _shutdown_quietly(bus: can.BusABC | None) -> None:
    if bus is None:
        return
    try:
        bus.shutdown()
    except Exception as e:  # a dead adapter may fail to close; nothing more to do about it
        log.debug("shutting down %s: %s", bus, e)


class _BusState:
    __slots__ = ("name", "bus", "frames", "drops", "error_frames", "remote_frames", "bus_errors",
                 "bus_off", "reopens", "state", "last_error", "opened_at", "thread")

    def __init__(self, name: str, bus: can.BusABC | None):
        self.name = name
        self.bus = bus
        self.frames = 0
        self.drops = 0
        self.error_frames = 0
        self.remote_frames = 0
        self.bus_errors = 0
        self.bus_off = 0
        self.reopens = 0
        self.state = "stopped"
        self.last_error = ""
        self.opened_at = time.monotonic()
        self.thread: threading.Thread | None = None


class CanReader:
    """Reads buses on one thread each and hands ``Frame`` batches to ``on_frames``.

    The reader owns the buses it is given: :meth:`stop` shuts them down. ``reopen(name)`` returns a
    fresh bus after a failure; without it a failing bus is retried as it is, with backoff.
    ``on_frames`` runs on the reader's consumer thread, never on a receive thread; an exception
    from it is logged and counted.
    """

    def __init__(self, buses: Mapping[str, can.BusABC | None],
                 on_frames: Callable[[list[Frame]], None], *,
                 clock_us: Callable[[], int] | None = None,
                 reopen: Callable[[str], can.BusABC] | None = None,
                 queue_size: int = 50_000, batch_max: int = 2_000, batch_interval_s: float = 0.05,
                 recv_timeout_s: float = 0.2, backoff_s: tuple[float, float] = (0.5, 30.0),
                 stable_after_s: float = 10.0):
        self._states = {name: _BusState(name, bus) for name, bus in buses.items()}
        self._on_frames = on_frames
        self._clock_us = clock_us or Clock().now_us
        self._reopen = reopen
        self._queue: collections.deque[Frame] = collections.deque()
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
                      on_frames: Callable[[list[Frame]], None],
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
        """Per bus: frames (queued), errors (error frames + bus exceptions), drops, state, details."""
        return {
            st.name: {
                "frames": st.frames,
                "errors": st.error_frames + st.bus_errors,
                "drops": st.drops,
                "state": st.state,
                "error_frames": st.error_frames,
                "bus_errors": st.bus_errors,
                "bus_off": st.bus_off,
                "remote_frames": st.remote_frames,
                "reopens": st.reopens,
                "last_error": st.last_error,
            }
            for st in self._states.values()
        }

    # -- receive threads ------------------------------------------------------------------------

    def _receive(self, st: _BusState) -> None:
        backoff = Backoff(*self._backoff_s)
        stop = self._stop
        queue = self._queue
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
                st.bus_errors += 1
                st.last_error = f"{type(e).__name__}: {e}"
                wait = backoff.next()
                log.error("CAN bus %s failed: %s; reopening in %.1f s", name, st.last_error, wait)
                if self._reopen is not None:
                    _shutdown_quietly(bus)
                    st.bus = None
                st.state = "reopening"
                stop.wait(wait)
                if st.bus is not None:
                    st.state = "running"
                continue
            if msg is None:
                continue
            if msg.is_error_frame:
                self._on_error_frame(st, msg)
                continue
            if msg.is_remote_frame:
                st.remote_frames += 1
                continue
            if len(queue) >= limit:
                st.drops += 1
            else:
                append(frame_from_message(name, msg, clock_us))
                st.frames += 1
            if st.state != "running":
                st.state = "running"
            if backoff.failures and time.monotonic() - st.opened_at > self._stable_after_s:
                backoff.reset()

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

    def _consume(self) -> None:
        queue = self._queue
        popleft = queue.popleft
        while True:
            stopping = self._stop.is_set()
            if not queue:
                if stopping and all(st.thread is None or not st.thread.is_alive()
                                    for st in self._states.values()):
                    return
                if stopping:
                    time.sleep(0.01)  # receive threads are finishing their last recv()
                else:
                    self._stop.wait(self._batch_interval_s)
                continue
            batch: list[Frame] = []
            add = batch.append
            try:
                for _ in range(self._batch_max):
                    add(popleft())
            except IndexError:
                pass
            self.batches += 1
            self.delivered += len(batch)
            try:
                self._on_frames(batch)
            except Exception:
                self.callback_errors += 1
                log.exception("CAN on_frames callback failed on a batch of %d frames", len(batch))
