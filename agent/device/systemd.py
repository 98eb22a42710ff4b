"""systemd integration without a dependency: sd_notify(3) and a liveness-gated watchdog.

The unit (systemd/dongle-agent.service) is ``Type=notify`` with ``WatchdogSec=``: systemd waits
for ``READY=1`` before it counts the agent as started, and kills and restarts it when
``WATCHDOG=1`` stops arriving. The protocol is one datagram of newline-separated ``KEY=value``
assignments to the AF_UNIX socket named by ``$NOTIFY_SOCKET`` (a leading ``@`` means the Linux
abstract namespace). Outside systemd ``$NOTIFY_SOCKET`` is unset and every call here is a no-op
returning False, so the agent runs the same way in a shell, in tests and on the device.

A watchdog that pings from a timer proves only that the timer runs. :class:`Watchdog` pings only
while every registered main loop has called :meth:`Watchdog.beat` recently, so a wedged OBD
poller or uplink gets the whole process restarted by systemd::

    wd = Watchdog()                  # interval from $WATCHDOG_USEC; disabled outside systemd
    wd.register("obd"); wd.register("uplink")
    wd.start()
    notify_ready()
    ...                              # each loop iteration: wd.beat("obd")
    notify_stopping(); wd.stop()
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 30.0  # liveness timeout used when systemd gives no watchdog interval


def _address(value: str) -> str | bytes | None:
    if value.startswith("@"):
        return b"\0" + value[1:].encode()  # abstract namespace
    if value.startswith("/"):
        return value
    return None  # e.g. "vsock:..." (systemd >= 254 in VMs): not used on the device


def notify(message: str) -> bool:
    """Sends one sd_notify message (``"KEY=value\\n..."``). True if it was sent.

    Never raises: a failure is logged and the agent carries on (systemd will notice a missing
    READY=1 or WATCHDOG=1 by itself).
    """
    target = os.environ.get("NOTIFY_SOCKET")
    if not target:
        return False
    addr = _address(target)
    if addr is None:
        log.warning("unsupported NOTIFY_SOCKET %r; not notifying systemd", target)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto(message.encode(), addr)
    except OSError as e:
        log.warning("sd_notify to %s failed: %s", target, e)
        return False
    return True


def _one_line(text: str) -> str:
    return " ".join(text.split())  # a newline would start a new assignment


def notify_ready(status: str | None = None) -> bool:
    """Startup finished: systemd marks the unit active (and starts units ordered after it)."""
    return notify("READY=1" + (f"\nSTATUS={_one_line(status)}" if status else ""))


def notify_status(text: str) -> bool:
    """Free-form one-line status, shown by ``systemctl status dongle-agent``."""
    return notify(f"STATUS={_one_line(text)}")


def notify_stopping() -> bool:
    """Clean shutdown has begun (so a slow flush is not mistaken for a hang)."""
    return notify("STOPPING=1")


def notify_extend_timeout(seconds: float) -> bool:
    """Asks for more start/stop time, e.g. while a large outbox is migrated at boot."""
    return notify(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}")


def watchdog_ping() -> bool:
    return notify("WATCHDOG=1")


def watchdog_interval() -> float | None:
    """systemd's watchdog timeout for this process in seconds, or None when there is none.

    Same rules as sd_watchdog_enabled(3): ``$WATCHDOG_USEC`` must be a positive integer and
    ``$WATCHDOG_PID``, when set, must be our pid (otherwise the variables were inherited).
    """
    usec = os.environ.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = os.environ.get("WATCHDOG_PID")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            log.warning("ignoring malformed WATCHDOG_PID=%r", pid)
            return None
    try:
        value = int(usec)
    except ValueError:
        log.warning("ignoring malformed WATCHDOG_USEC=%r", usec)
        return None
    return value / 1_000_000 if value > 0 else None


class Watchdog:
    """Pings systemd's watchdog only while every registered loop shows progress.

    ``interval`` defaults to :func:`watchdog_interval`; when that is None the watchdog is
    disabled (:meth:`start` returns at once) but :meth:`stale` still reports
    loops that stopped beating, using ``DEFAULT_TIMEOUT_S``. A loop is stale when it has not
    beaten for its timeout (by default the interval). ``clock`` and ``ping`` are injectable.
    """

    def __init__(self, interval: float | None = None, *,
                 clock: Callable[[], float] = time.monotonic,
                 ping: Callable[[], bool] = watchdog_ping):
        self.interval = interval if interval is not None else watchdog_interval()
        self._clock = clock
        self._ping = ping
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}
        self._timeout: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._was_stale: tuple[str, ...] = ()

    @property
    def enabled(self) -> bool:
        return self.interval is not None

    def register(self, name: str, timeout: float | None = None) -> None:
        """Adds a loop that must beat at least every ``timeout`` seconds (default: the interval).

        Registration counts as a first beat, so a loop has one timeout to get going.
        """
        with self._lock:
            self._last[name] = self._clock()
            self._timeout[name] = timeout if timeout is not None else (self.interval or DEFAULT_TIMEOUT_S)

    def unregister(self, name: str) -> None:
        """A loop that ends on purpose (not a failure) stops being checked."""
        with self._lock:
            self._last.pop(name, None)
            self._timeout.pop(name, None)

    def beat(self, name: str) -> None:
        """Called by loop ``name`` on each iteration. Thread-safe and cheap."""
        with self._lock:
            if name not in self._last:
                log.warning("watchdog beat from unregistered loop %r ignored", name)
                return
            self._last[name] = self._clock()

    def stale(self) -> list[str]:
        """Registered loops that have not beaten within their timeout, sorted."""
        now = self._clock()
        with self._lock:
            return sorted(n for n, t in self._last.items() if now - t > self._timeout[n])

    def tick(self) -> bool:
        """One check: pings systemd if no loop is stale. Returns True if it pinged."""
        stale = tuple(self.stale())
        if stale != self._was_stale:
            if stale:
                log.error("watchdog: loop(s) %s stalled; no longer pinging systemd", ", ".join(stale))
                notify_status(f"stalled: {', '.join(stale)}")
            else:
                log.warning("watchdog: all loops alive again; pinging systemd")
                notify_status("all loops alive")
            self._was_stale = stale
        if stale:
            return False
        return bool(self._ping())

    @property
    def period(self) -> float:
        """How often the thread checks: half the interval, as sd_watchdog_enabled advises."""
        return (self.interval or DEFAULT_TIMEOUT_S) / 2

    def start(self) -> None:
        """Checks and pings from a daemon thread until :meth:`stop`. No-op when disabled."""
        if not self.enabled or self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._thread_main, name="sd-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _thread_main(self) -> None:
        while True:
            try:
                self.tick()
            except Exception:  # the pinger must not die silently; systemd would restart us
                log.exception("watchdog tick failed")
            if self._stop.wait(self.period):
                return
