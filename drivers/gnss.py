"""GNSS through gpsd, the standard daemon on Raspberry Pi OS, with the ``gpsdclient`` package.

:class:`GnssReader` owns one thread that connects to gpsd, asks for JSON reports (``?WATCH``)
and hands every usable fix (TPV with mode 2 or 3) to ``on_fix`` as a :class:`Fix`. It never
decides whether a fix may be kept: that is the caller's privacy gate. It is started only while
location may be collected, so nothing is read from gpsd otherwise (``stop()`` closes the socket).

States (``status()["state"]``, ``on_state`` on every change, each logged once):

- ``gpsd_unreachable``: no gpsd (not installed, not running, restarted): reconnected with
  :class:`agent.backoff.Backoff`; a restart of gpsd is counted in ``reconnects``;
- ``no_receiver``: gpsd runs but has no device (receiver unplugged or never there);
- ``no_fix``: a receiver, but no position (mode 0/1), or the last fix is older than ``stale_s``;
- ``fix``: positions are coming.

Time: while the agent's clock (the :class:`drivers.core.clock.Clock` given as ``clock``) is not
synchronised, a fix whose receiver time is plausible (after ``plausible_after_ms``, 2025 by
default: a receiver that lost its almanac or hit a GPS week rollover reports years like 2005)
goes to ``on_time``, by default that clock's :meth:`~drivers.core.clock.Clock.sync`, so the agent
stamps with the receiver's time until NTP or the MCU set the system clock.
:attr:`GnssReader.time_offset_ms` is the last offset learnt (receiver time minus the system wall
clock), for status and logs.
"""
from __future__ import annotations

import logging
import math
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone

from gpsdclient import GPSDClient

from drivers.core.backoff import Backoff
from drivers.core.clock import PLAUSIBLE_AFTER_MS, Clock

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 2947
STATES = ("stopped", "gpsd_unreachable", "no_receiver", "no_fix", "fix")

@dataclass(frozen=True, slots=True)
class Fix:
    """One position. ``t_ms`` is the agent's clock at arrival (the time base of every sample),
    ``gnss_ms`` the receiver's time of the fix, ``prec_m`` the receiver's horizontal error
    estimate (gpsd ``eph``, else the larger of ``epx``/``epy``; None if it gives none)."""

    t_ms: int
    gnss_ms: int | None
    lat: float
    lon: float
    speed: float | None
    course: float | None
    prec_m: float | None
    mode: int


def parse_time_ms(text: object) -> int | None:
    """gpsd's ISO 8601 UTC time (``2018-08-02T16:14:50.000Z``) as ms since the epoch."""
    if not isinstance(text, str):
        return None
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return int(round(dt.timestamp() * 1000))


def _num(v: object) -> float | None:
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
        return float(v)
    return None


def fix_from_tpv(tpv: dict, t_ms: int) -> Fix | None:
    """A :class:`Fix` from a gpsd TPV report, or None when it holds no position."""
    mode = tpv.get("mode")
    lat, lon = _num(tpv.get("lat")), _num(tpv.get("lon"))
    if not isinstance(mode, int) or mode < 2 or lat is None or lon is None:
        return None
    if not (-90 <= lat <= 90 and -180 <= lon <= 180):
        return None
    prec = _num(tpv.get("eph"))
    if prec is None:
        errs = [e for e in (_num(tpv.get("epx")), _num(tpv.get("epy"))) if e is not None]
        prec = max(errs) if errs else None
    speed = _num(tpv.get("speed"))
    course = _num(tpv.get("track"))
    return Fix(t_ms=t_ms, gnss_ms=parse_time_ms(tpv.get("time")), lat=lat, lon=lon,
               speed=max(0.0, speed) if speed is not None else None,
               course=course % 360.0 if course is not None else None, prec_m=prec, mode=mode)


class GnssReader:
    def __init__(self, on_fix: Callable[[Fix], None], *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
                 on_state: Callable[[str], None] | None = None, clock: Clock | None = None,
                 on_time: Callable[[int], None] | None = None,
                 clock_synced: Callable[[], bool] | None = None,
                 plausible_after_ms: int = PLAUSIBLE_AFTER_MS, stale_s: float = 5.0,
                 backoff: Backoff | None = None):
        self.host, self.port = host, int(port)
        self._on_fix = on_fix
        self._on_state = on_state or (lambda s: None)
        clock = clock or Clock()
        self._now_ms = clock.now_ms
        self._on_time = on_time or clock.sync
        self._clock_synced = clock_synced or clock.is_synced
        self.time_offset_ms: int | None = None  # receiver minus system wall time, last time set
        self._plausible_after_ms = plausible_after_ms
        self.stale_s = stale_s
        self._backoff = backoff or Backoff(1.0, 30.0)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._client: GPSDClient | None = None
        self._lock = threading.Lock()
        self._devices: set[str] = set()
        self._state = "stopped"
        self._last_fix_mono: float | None = None
        self.fixes = 0
        self.reconnects = 0
        self.errors = 0
        self.last_error: str | None = None
        self.last_fix: Fix | None = None

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="gnss", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 1.5) -> None:
        """Stops reading: the gpsd socket is shut down at once, the thread joined."""
        self._stop.set()
        self._close()
        if self._thread and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        self._thread = None
        self._set_state("stopped")

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def state(self) -> str:
        self.poll()
        return self._state

    def poll(self) -> str:
        """Re-checks staleness (a receiver that went quiet is ``no_fix``); returns the state."""
        if self._state == "fix" and self._last_fix_mono is not None \
                and time.monotonic() - self._last_fix_mono > self.stale_s:
            self._set_state("no_fix")
        return self._state

    def status(self) -> dict:
        self.poll()
        last = self.last_fix
        return {"state": self._state, "gpsd": f"{self.host}:{self.port}", "fixes": self.fixes,
                "reconnects": self.reconnects, "errors": self.errors, "last_error": self.last_error,
                "devices": sorted(self._devices), "last_fix_ms": last.t_ms if last else None}

    # -- work -----------------------------------------------------------------------------
    def _close(self) -> None:
        with self._lock:
            client = self._client
        sock = getattr(client, "sock", None)
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _set_state(self, state: str) -> None:
        if state == self._state:
            return
        old, self._state = self._state, state
        level = logging.INFO if state in ("fix", "stopped") else logging.WARNING
        log.log(level, "gnss: %s -> %s (gpsd %s:%d)", old, state, self.host, self.port)
        try:
            self._on_state(state)
        except Exception:
            log.exception("gnss: state callback failed")

    def _run(self) -> None:
        connected_once = False
        while not self._stop.is_set():
            client = GPSDClient(self.host, self.port, timeout=None)
            with self._lock:
                self._client = client
            try:
                self._devices.clear()
                for report in client.dict_stream(convert_datetime=False,
                                                 filter=["TPV", "DEVICES", "DEVICE", "VERSION"]):
                    if self._stop.is_set():
                        break
                    if report.get("class") == "VERSION":
                        if connected_once:
                            self.reconnects += 1
                        connected_once = True
                        self._backoff.reset()
                    self._handle(report)
                else:
                    if not self._stop.is_set():
                        raise ConnectionError("gpsd closed the connection")
            except (OSError, ValueError) as e:  # refused, reset, closed, or not gpsd at all
                if self._stop.is_set():
                    break
                self.errors += 1
                self.last_error = f"{type(e).__name__}: {e}"
                self._set_state("gpsd_unreachable")
                log.debug("gnss: %s", self.last_error)
            finally:
                client.close()
                with self._lock:
                    self._client = None
            self._stop.wait(self._backoff.next())

    def _handle(self, report: dict) -> None:
        cls = report.get("class")
        if cls == "DEVICES":
            self._devices = {d.get("path", "?") for d in report.get("devices", []) if isinstance(d, dict)}
            if not self._devices:
                self._set_state("no_receiver")
            elif self._state in ("stopped", "gpsd_unreachable", "no_receiver"):
                self._set_state("no_fix")
        elif cls == "DEVICE":
            path = report.get("path", "?")
            if report.get("activated") in (0, None, ""):
                self._devices.discard(path)
                if not self._devices:
                    self._set_state("no_receiver")
            else:
                self._devices.add(path)
                if self._state in ("stopped", "gpsd_unreachable", "no_receiver"):
                    self._set_state("no_fix")
        elif cls == "TPV":
            self._learn_time(report)
            fix = fix_from_tpv(report, self._now_ms())
            if fix is None:
                if self._state == "fix" or self._state in ("stopped", "gpsd_unreachable", "no_receiver"):
                    self._set_state("no_fix")
                return
            self.fixes += 1
            self.last_fix = fix
            self._last_fix_mono = time.monotonic()
            self._set_state("fix")
            try:
                self._on_fix(fix)
            except Exception:
                log.exception("gnss: fix handler failed")

    def _learn_time(self, tpv: dict) -> None:
        if not isinstance(tpv.get("mode"), int) or tpv["mode"] < 2:
            return
        gnss_ms = parse_time_ms(tpv.get("time"))
        if gnss_ms is None or gnss_ms < self._plausible_after_ms or self._clock_synced():
            return
        first = self.time_offset_ms is None
        self.time_offset_ms = gnss_ms - time.time_ns() // 1_000_000
        try:
            self._on_time(gnss_ms)
        except Exception:
            log.exception("gnss: setting the time from the receiver failed")
            return
        if first:
            log.info("gnss: the clock was not synchronised; the receiver's time sets it (%s)", tpv.get("time"))
