"""Power management: let the car sleep, never flatten its battery, sleep the dongle in between.

:class:`PowerManager` runs one thread ("power") that every ``tick_s`` (or at once on an MCU
event) reads the evidence — ignition from the MCU (events, and polled as a backstop: events are
not acknowledged), seconds of CAN silence, the 12 V trend — decides the vehicle state
(:mod:`agent.vehicle_state`) and acts:

- the car is awake only while ``on`` or ``charging``: then ``resume_vehicle_requests``; on
  any other state :attr:`PowerHooks.stop_vehicle_requests` at once, so no OBD/UDS request
  keeps the car's ECUs awake or goes out while it sleeps (:meth:`vehicle_awake` tells other
  components the same);
- ignition off: after ``grace_s`` and once the bus is silent ("parked"; or after
  ``max_settle_s`` if the bus never falls silent and nothing charges), flush, ask the MCU to cut
  the Pi's power with a wake timer of ``sleep_check_in_s``, and shut the OS down cleanly;
- woken by that timer: check in (the uplink connects and sends what is pending) for
  ``check_in_s``, then sleep again, without a single request to the car;
- 12 V below ``low_voltage_v`` sustained for ``low_voltage_s`` while the ignition is not on: a
  ``health``/``battery_12v``/``critical`` event, then sleep with ``low_voltage_check_in_s``
  (0: wake on ignition or button only);
- kicks the MCU watchdog every ``kick_s`` while :attr:`PowerHooks.alive` says the agent's main
  loops make progress, and re-applies the watchdog timeout and the supply report after every
  MCU reset (``McuBooted``).

Without an MCU (none configured, port missing, link lost) there is no sleep control and no
ignition line: the state comes from CAN silence and the 12 V trend (see ``probe_*`` and
docs/power.md), requests still stop while the car is parked, and a low battery halts the OS
(``halt_without_mcu``). This is logged once per outage.

Times come from ``clock`` (monotonic seconds, injectable: the tests run on the MCU simulator's
clock); event timestamps from ``wall_ms``.
"""
from __future__ import annotations

import logging
import math
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from agent.settings import PowerSettings
from drivers.core.clock import Clock
from agent.device.vehicle_state import (
    AWAKE_STATES, Evidence, Thresholds, VehicleState, VoltageTrend, decide)
from firmware_bridge.port import (
    IgnitionChanged, McuBooted, McuError, McuPort, McuRejected, SupplyVoltage, make_port)

log = logging.getLogger(__name__)



def thresholds(settings: PowerSettings) -> Thresholds:
    return Thresholds(settings.bus_quiet_s, settings.charge_v, settings.charge_detect_s)


def systemctl_poweroff() -> None:
    """The default shutdown hook: a clean OS power-off through systemd/logind. The agent's
    user needs the polkit right ``org.freedesktop.login1.power-off`` (docs/power.md)."""
    try:
        r = subprocess.run(["systemctl", "poweroff"], capture_output=True, text=True,
                           timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        log.error("systemctl poweroff failed: %s", e)
        return
    if r.returncode:
        log.error("systemctl poweroff exited %d: %s", r.returncode, r.stderr.strip())


def _nothing(*_: Any) -> None:
    return None


def _always() -> bool:
    return True


@dataclass
class PowerHooks:
    """What the agent gives the power manager. Every hook may raise: that is logged, never fatal.

    - ``stop_vehicle_requests()`` / ``resume_vehicle_requests()``: stop / restart all OBD and UDS
      polling and any CAN transmission. Called on changes only; the agent starts with requests
      stopped and lets the first decision resume them.
    - ``flush(timeout_s) -> bool``: seal and send what the link allows, flush the store; True
      when everything went out.
    - ``emit_event(body)``: a PROTOCOL §4 event body to store and send.
    - ``shutdown()``: clean OS shutdown (default ``systemctl poweroff``).
    - ``can_activity() -> float | None``: seconds since the last broadcast CAN frame on any bus
      (:meth:`agent.vehicle_state.BusActivity.quiet_for`); None without CAN.
    - ``supply_voltage() -> float | None``: the 12 V reading used while there is no MCU link
      (the ELM327's ``ATRV``, read without any bus traffic); None if unknown.
    - ``alive() -> bool``: the agent's main loops make progress (e.g.
      ``lambda: not sd_watchdog.stale()``); the MCU watchdog is kicked only while True.
    - ``beat()``: called once per loop of the power thread (e.g. ``sd_watchdog.beat("power")``).
    - ``on_state(state)``: the vehicle state changed (e.g. per-drive consent restarts paused at
      every ignition on).
    """

    stop_vehicle_requests: Callable[[], None] = _nothing
    resume_vehicle_requests: Callable[[], None] = _nothing
    flush: Callable[[float], bool] = lambda timeout_s: True
    emit_event: Callable[[dict], None] = _nothing
    shutdown: Callable[[], None] = systemctl_poweroff
    can_activity: Callable[[], float | None] = _nothing
    supply_voltage: Callable[[], float | None] = _nothing
    alive: Callable[[], bool] = _always
    beat: Callable[[], None] = _nothing
    on_state: Callable[[VehicleState], None] = lambda state: None


_LINK_ERRORS = (McuError, OSError, ValueError)


class PowerManager:
    """See the module docstring. ``mcu`` is a (not yet opened) :class:`firmware_bridge.port.McuPort` or None; the
    manager opens, reopens and closes it. Build the link with
    ``on_event=lambda e: manager.on_mcu_event(e)``, or use :meth:`from_settings`, which does."""

    def __init__(self, mcu: McuPort | None, *, hooks: PowerHooks,
                 settings: PowerSettings | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 wall_ms: Callable[[], int] | None = None) -> None:
        self.settings = settings or PowerSettings()
        self.settings.check()
        self.hooks = hooks
        self._mcu = mcu
        self._clock = clock
        self._wall_ms = wall_ms or Clock().now_ms
        self._th = thresholds(self.settings)
        self._lock = threading.Lock()        # fields written by the MCU event thread
        self._step_lock = threading.Lock()   # one decision at a time
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._logged: set[str] = set()
        # evidence
        self._volts = VoltageTrend(max(1800.0, 2 * self.settings.low_voltage_s))
        self._ignition: bool | None = None
        self._ign_gen = 0
        self._ignition_polled_at = -math.inf
        self._supply_polled_at = -math.inf
        self._bus_quiet: float | None = None
        # MCU link
        self._link_up = False
        self._outage_logged = False
        self._next_open_at = -math.inf
        self._rearm = False
        self._initialised = False
        self._wake_reason: str | None = None
        self._mcu_version: str | None = None
        self._last_kick = -math.inf
        self._kicks = 0
        # decisions
        self._state: VehicleState | None = None
        self._state_since = 0.0
        self._started_at: float | None = None
        self._ignition_off_at: float | None = None
        self._requests_on: bool | None = None
        self._check_in = False
        self._low_cut = False
        self._warned = False
        self._probe_until: float | None = None
        self._last_probe_end = -math.inf
        self._sleep_retry_at = -math.inf
        self._sleep_announced = False
        self.last_sleep: dict[str, Any] | None = None

    @classmethod
    def from_settings(cls, settings: PowerSettings, *, hooks: PowerHooks,
                      **kw: Any) -> PowerManager:
        pm = cls(None, hooks=hooks, settings=settings, **kw)
        # A serial device (McuLink), "sim" (the simulator, in-process), or "" (no MCU).
        pm._mcu = make_port(settings.mcu_port, on_event=pm.on_mcu_event, timeout_s=settings.mcu_timeout_s)
        return pm

    # --- public -------------------------------------------------------------------------------

    @property
    def mcu(self) -> McuPort | None:
        """The link, for other users of the MCU (e.g. a firmware update); None without one."""
        return self._mcu if self._link_up else None

    @property
    def state(self) -> VehicleState | None:
        """None until the first decision."""
        return self._state

    def vehicle_awake(self) -> bool:
        """May anything talk to the vehicle now? False while it settles, is parked or asleep,
        and after a low-battery cut: never wake a sleeping car."""
        return self._state in AWAKE_STATES and not self._low_cut

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="power", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stops the thread and closes the MCU link. Unless the dongle is going to sleep, the
        MCU watchdog is left at ``stop_watchdog_s`` so a stopped agent is not power-cycled
        at once, yet a hung system is still recovered."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        mcu = self._mcu
        if mcu is None:
            return
        with self._step_lock:
            if self._link_up and self._state is not VehicleState.SLEEPING \
                    and self.settings.watchdog_s:
                try:
                    mcu.set_watchdog(self.settings.stop_watchdog_s)
                except McuError as e:
                    log.warning("could not relax the MCU watchdog on stop: %s", e)
            self._link_up = False
            mcu.close()

    def kick_watchdog(self) -> bool:
        """Kick the MCU watchdog now (the power thread also does, every ``kick_s``, while
        ``alive()``). False without a working link."""
        mcu = self._mcu
        if mcu is None or not self._link_up:
            return False
        try:
            mcu.kick_watchdog()
        except McuError as e:
            log.debug("MCU watchdog kick failed: %s", e)
            return False
        self._last_kick = self._clock()
        self._kicks += 1
        return True

    def on_mcu_event(self, event: object) -> None:
        """The McuLink ``on_event`` callback (runs on the link's dispatcher thread)."""
        now = self._clock()
        if isinstance(event, IgnitionChanged):
            with self._lock:
                self._ignition = event.on
                self._ign_gen += 1
                self._ignition_polled_at = now
            log.info("MCU: ignition %s", "on" if event.on else "off")
        elif isinstance(event, SupplyVoltage):
            self._volts.add(now, event.volts)
        elif isinstance(event, McuBooted):
            log.info("MCU reset (slot %d, %s, firmware %s): re-applying watchdog and supply "
                     "report", event.slot, event.fw_state.label, event.version)
            with self._lock:
                self._rearm = True
                self._mcu_version = event.version
        self._wake.set()

    def apply_config(self, doc: dict) -> list[str]:
        return []

    def status(self) -> dict[str, Any]:
        """For ``dongle status`` (see :func:`format_status`)."""
        now = self._clock()
        s = self.settings
        mcu = None
        if self._mcu is not None:
            mcu = {"port": s.mcu_port or None,
                   "connected": self._link_up, "firmware": self._mcu_version,
                   "wake_reason": self._wake_reason,
                   "watchdog_s": s.watchdog_s if self._link_up else None,
                   "kicks": self._kicks}
        volts = self._volts.latest
        trend = self._volts.slope_v_per_h()
        return {
            "state": str(self._state) if self._state else None,
            "since_s": round(now - self._state_since, 1) if self._state else None,
            "vehicle_awake": self.vehicle_awake(),
            "requests": None if self._requests_on is None else
                        ("running" if self._requests_on else "stopped"),
            "ignition": self._ignition if self._link_up else None,
            "bus_quiet_s": None if self._bus_quiet is None else round(self._bus_quiet, 1),
            "supply_v": None if volts is None else round(volts, 2),
            "supply_trend_v_per_h": None if trend is None else round(trend, 2),
            "mcu": mcu,
            "check_in": self._check_in,
            "low_voltage_cut": self._low_cut,
            "probing": self._probe_until is not None,
            "next": self._next_action(now),
            "last_sleep": self.last_sleep,
        }

    # --- the loop -----------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.step()
            except Exception:  # the power loop must survive anything
                log.exception("power step failed")
            self._hook("beat")
            self._wake.wait(self.settings.tick_s)
            self._wake.clear()

    def step(self) -> VehicleState | None:
        """One decision: read the evidence, update the state, act. The thread calls this every
        ``tick_s``; tests call it directly."""
        with self._step_lock:
            now = self._clock()
            if self._state is VehicleState.SLEEPING:
                return self._state
            if self._started_at is None:
                self._started_at = now
            self._upkeep_link(now)
            self._poll(now)
            self._kick(now)
            self._enter(self._decide(now), now)
            self._act(now)
            return self._state

    # --- MCU link -----------------------------------------------------------------------------

    def _upkeep_link(self, now: float) -> None:
        mcu = self._mcu
        if mcu is None:
            self._once("no-mcu", logging.WARNING,
                       "no MCU: no sleep control and no ignition line; the vehicle state comes "
                       "from CAN silence and the 12 V trend")
            return
        if not self._link_up:
            if now < self._next_open_at:
                return
            self._next_open_at = now + self.settings.mcu_retry_s
            try:
                mcu.open()
                self._init_mcu(now)
            except _LINK_ERRORS as e:
                self._link_down(e)
                return
            return
        with self._lock:
            rearm, self._rearm = self._rearm, False
        if rearm:
            try:
                self._configure_mcu(now)
            except _LINK_ERRORS as e:
                self._link_down(e)

    def _init_mcu(self, now: float) -> None:
        mcu = self._mcu
        assert mcu is not None
        wake = mcu.wake_reason()
        version = mcu.firmware_version()
        self._configure_mcu(now)
        ign = mcu.ignition()
        volts = mcu.supply_voltage()
        with self._lock:
            self._wake_reason, self._mcu_version = wake, version
            self._ignition, self._ignition_polled_at = ign, now
            self._rearm = False
        self._volts.add(now, volts)
        self._supply_polled_at = now
        if self._outage_logged:
            log.warning("MCU link on %s is back", self.settings.mcu_port or "its port")
        self._outage_logged = False
        self._link_up = True
        log.info("MCU firmware %s, woke by %s, ignition %s, supply %.2f V", version, wake,
                 "on" if ign else "off", volts)
        if not self._initialised:
            self._initialised = True
            if wake == "timer" and not ign:
                self._check_in = True
                log.info("timer wake: checking in for %.0f s, then sleeping again",
                         self.settings.check_in_s)

    def _configure_mcu(self, now: float) -> None:
        mcu = self._mcu
        assert mcu is not None
        mcu.set_watchdog(self.settings.watchdog_s)  # also a kick
        self._last_kick = now
        mcu.set_supply_report(self.settings.supply_report_s)

    def _link_down(self, error: Exception) -> None:
        if not self._outage_logged:
            log.warning("MCU link unavailable (%s): carrying on without it (no sleep control); "
                        "retrying every %.0f s", error, self.settings.mcu_retry_s)
            self._outage_logged = True
        self._link_up = False
        with self._lock:
            self._ignition = None
        if self._mcu is not None:
            try:
                self._mcu.close()
            except Exception as e:  # noqa: BLE001 - closing a dead port may fail oddly
                log.debug("closing the MCU link: %s", e)

    # --- evidence -----------------------------------------------------------------------------

    def _poll(self, now: float) -> None:
        s = self.settings
        if self._link_up:
            mcu = self._mcu
            assert mcu is not None
            try:
                if self._ignition is None or now - self._ignition_polled_at >= s.ignition_poll_s:
                    with self._lock:
                        gen = self._ign_gen
                    on = mcu.ignition()
                    with self._lock:
                        if gen == self._ign_gen:  # no event arrived meanwhile: it is newer
                            if on != self._ignition and self._ignition is not None:
                                log.info("MCU: ignition %s (polled; the event was lost)",
                                         "on" if on else "off")
                            self._ignition = on
                            self._ignition_polled_at = now
                if now - self._supply_polled_at >= s.supply_poll_s:
                    self._volts.add(now, mcu.supply_voltage())
                    self._supply_polled_at = now
            except _LINK_ERRORS as e:
                self._link_down(e)
        if not self._link_up and now - self._supply_polled_at >= s.supply_poll_s:
            v = self._hook("supply_voltage")
            self._supply_polled_at = now
            if v is not None:
                self._volts.add(now, v)
        quiet = self._hook("can_activity")
        try:
            self._bus_quiet = None if quiet is None else max(0.0, float(quiet))
        except (TypeError, ValueError):
            self._once("bad-can-activity", logging.ERROR,
                       f"can_activity() returned {quiet!r}, not seconds; treated as no CAN")
            self._bus_quiet = None

    def _kick(self, now: float) -> None:
        s = self.settings
        if not self._link_up or not s.watchdog_s or now - self._last_kick < s.kick_s:
            return
        if not self._hook("alive", default=False):
            self._once("not-alive", logging.ERROR,
                       "agent loops stalled: no longer kicking the MCU watchdog")
            return
        self._logged.discard("not-alive")
        self.kick_watchdog()

    def _decide(self, now: float) -> VehicleState:
        s = self.settings
        ignition = self._ignition if self._link_up else None
        charging_for = self._volts.at_or_above_for(s.charge_v)
        if ignition is None and self._bus_quiet is not None:
            self._update_probe(now, charging_for)
            if self._probe_until is not None:
                ignition = False  # "would the car go quiet if we stopped asking?"
        else:
            self._probe_until = None
        if ignition is False:
            # only readings since the ignition went off count: not the alternator's
            off = self._ignition_off_at
            charging_for = 0.0 if off is None else min(charging_for, now - off)
        state = decide(Evidence(ignition, self._bus_quiet, charging_for), self._th)
        if self._probe_until is not None and state is VehicleState.PARKED:
            log.info("probe: the bus fell silent with our requests stopped: parked")
            self._probe_until = None
            self._last_probe_end = now
        return state

    def _update_probe(self, now: float, charging_for: float) -> None:
        """No ignition line: our own polling may be what keeps the car awake. While "on"
        without any sign of charging, pause requests now and then to see if the bus sleeps."""
        s = self.settings
        if self._probe_until is not None:
            if now >= self._probe_until:
                log.info("probe: the bus stayed awake without our requests: the car is on")
                self._probe_until = None
                self._last_probe_end = now
            return
        if self._state is not VehicleState.ON or charging_for > 0 or self._low_cut:
            return
        if now - self._state_since < s.probe_after_s \
                or now - self._last_probe_end < s.probe_interval_s:
            return
        if self._volts.latest is not None and self._volts.below_for(s.charge_v) < s.probe_after_s:
            return
        log.info("no ignition line and no charging voltage for %.0f s: pausing vehicle requests "
                 "for up to %.0f s to see whether the car goes to sleep",
                 s.probe_after_s, s.probe_s)
        self._probe_until = now + s.probe_s

    # --- actions ------------------------------------------------------------------------------

    def _enter(self, state: VehicleState, now: float) -> None:
        prev = self._state
        if state is not prev:
            log.info("vehicle %s -> %s (ignition %s, bus quiet %s s, 12 V %s)",
                     prev or "(start)", state, self._ignition if self._link_up else "unknown",
                     "n/a" if self._bus_quiet is None else f"{self._bus_quiet:.0f}",
                     self._volts.latest)
            self._state = state
            self._state_since = now
            try:
                self.hooks.on_state(state)
            except Exception:  # noqa: BLE001 - a hook never stops the power manager
                log.exception("power: on_state hook failed")
        if state is VehicleState.ON:
            self._ignition_off_at = None
            self._warned = False
            self._sleep_announced = False
        elif self._ignition_off_at is None:
            self._ignition_off_at = now
        self._set_requests(self.vehicle_awake())

    def _set_requests(self, on: bool) -> None:
        if on == self._requests_on:
            return
        self._requests_on = on
        log.info("vehicle requests %s", "resumed" if on else "stopped")
        self._hook("resume_vehicle_requests" if on else "stop_vehicle_requests")

    def _act(self, now: float) -> None:
        s = self.settings
        ignition_on = self._link_up and self._ignition is True
        if self._low_cut and (ignition_on or self._volts.at_or_above_for(s.charge_v) > 0):
            log.info("12 V recovered (ignition on or charging): low-battery cut lifted")
            self._low_cut = False
            self._set_requests(self.vehicle_awake())
        if not ignition_on and not self._low_cut:
            low_for = self._volts.below_for(s.low_voltage_v)
            if low_for >= s.low_voltage_s:
                self._low_cut = True
                self._set_requests(False)
                action = "sleep" if self._link_up else (
                    "halt" if s.halt_without_mcu else "stay_awake")
                self._emit_battery("critical", s.low_voltage_v, action)
            elif not self._warned and self._volts.below_for(s.warn_voltage_v) >= s.low_voltage_s:
                self._warned = True
                self._emit_battery("warn", s.warn_voltage_v, "none")
        if self._low_cut:
            if self._link_up:
                if now >= self._sleep_retry_at:
                    self._sleep("low_voltage", s.low_voltage_check_in_s, now)
            elif s.halt_without_mcu:
                self._halt(now)
            return
        if not self._link_up:
            if self._state is VehicleState.PARKED:
                self._once("no-sleep", logging.INFO,
                           "parked without an MCU: vehicle requests stay stopped; the dongle "
                           "cannot power itself down")
            return
        if now < self._sleep_retry_at:
            return
        state = self._state
        if self._check_in:
            if state in (VehicleState.ON, VehicleState.CHARGING):
                self._check_in = False
                log.info("check-in ends: the vehicle is %s", state)
            elif self._started_at is not None and now - self._started_at >= s.check_in_s:
                self._sleep("check_in", s.sleep_check_in_s, now)
            return
        off = self._ignition_off_at
        if off is None or state not in (VehicleState.PARKED, VehicleState.SETTLING):
            return
        elapsed = now - off
        if elapsed < s.grace_s:
            return
        if state is VehicleState.PARKED:
            self._sleep("ignition_off", s.sleep_check_in_s, now)
        elif elapsed >= s.max_settle_s:
            self._sleep("settle_timeout", s.sleep_check_in_s, now)

    def _emit_battery(self, level: str, threshold: float, action: str) -> None:
        s = self.settings
        below = self._volts.below_for(threshold)
        volts = self._volts.latest
        body = {"type": "health", "ts": self._wall_ms(), "kind": "battery_12v", "level": level,
                "detail": {"supply_v": round(volts, 2) if volts is not None else None,
                           "threshold_v": threshold, "below_for_s": round(below, 1),
                           "vehicle_state": str(self._state), "action": action,
                           "source": "mcu" if self._link_up else "elm327"}}
        if level == "critical":
            body["detail"]["check_in_s"] = s.low_voltage_check_in_s if self._link_up else 0
        (log.error if level == "critical" else log.warning)(
            "12 V battery at %s V, below %.2f V for %.0f s: %s (%s)", body["detail"]["supply_v"],
            threshold, below, level, action)
        self._hook("emit_event", body)

    def _halt(self, now: float) -> None:
        """Low battery and no MCU to cut the power: halt the OS (a halted Pi draws far less);
        the dongle comes back only when it is unplugged and plugged in again."""
        if not self._hook("flush", self.settings.flush_timeout_s, default=False):
            log.warning("flush before halting was incomplete")
        self._sleeping(now, "low_voltage", None)
        log.error("no MCU to cut the power: halting the OS to stop draining the 12 V battery")
        self._hook("shutdown")

    def _sleep(self, reason: str, wake_after_s: int, now: float) -> None:
        s = self.settings
        mcu = self._mcu
        assert mcu is not None
        self._set_requests(False)
        if not self._sleep_announced:
            self._sleep_announced = True
            volts = self._volts.latest
            self._hook("emit_event", {
                "type": "health", "ts": self._wall_ms(), "kind": "dongle_power", "level": "info",
                "detail": {"action": "sleep", "reason": reason, "wake_after_s": wake_after_s,
                           "supply_v": round(volts, 2) if volts is not None else None,
                           "vehicle_state": str(self._state)}})
        if not self._hook("flush", s.flush_timeout_s, default=False):
            log.warning("not everything was sent before sleeping; the rest goes at the next wake")
        try:
            mcu.sleep(wake_after_s, power_off_delay_s=s.power_off_delay_s)
        except McuRejected as e:
            log.error("MCU refused to sleep (%s); trying again in 10 s", e)
            self._sleep_retry_at = now + 10
            return
        except _LINK_ERRORS as e:
            self._link_down(e)
            return
        self._sleeping(now, reason, wake_after_s)
        log.info("sleeping (%s): the MCU cuts power in %d s and wakes the dongle %s", reason,
                 s.power_off_delay_s,
                 f"after {wake_after_s} s or on ignition" if wake_after_s else "on ignition only")
        self._hook("shutdown")

    def _sleeping(self, now: float, reason: str, wake_after_s: int | None) -> None:
        self._state = VehicleState.SLEEPING
        self._state_since = now
        self.last_sleep = {"reason": reason, "wake_after_s": wake_after_s,
                           "ts": self._wall_ms()}

    def _next_action(self, now: float) -> str | None:
        s = self.settings
        if self._state is VehicleState.SLEEPING:
            return "shutting down"
        if self._probe_until is not None:
            return f"probing bus sleep for {max(0.0, self._probe_until - now):.0f} s"
        if not self._link_up:
            return None
        if self._check_in and self._started_at is not None:
            left = max(0.0, self._started_at + s.check_in_s - now)
            return f"sleep after check-in in {left:.0f} s"
        off = self._ignition_off_at
        if off is None or self._state not in (VehicleState.PARKED, VehicleState.SETTLING):
            return None
        if self._state is VehicleState.PARKED:
            return f"sleep in {max(0.0, off + s.grace_s - now):.0f} s"
        return (f"sleep when the bus is silent, at the latest in "
                f"{max(0.0, off + max(s.grace_s, s.max_settle_s) - now):.0f} s")

    # --- helpers ------------------------------------------------------------------------------

    def _hook(self, name: str, *args: Any, default: Any = None) -> Any:
        try:
            return getattr(self.hooks, name)(*args)
        except Exception:  # a hook's failure must not stop power management
            log.exception("power hook %s failed", name)
            return default

    def _once(self, key: str, level: int, message: str) -> None:
        if key not in self._logged:
            self._logged.add(key)
            log.log(level, message)


def format_status(st: Mapping[str, Any]) -> str:
    """The ``power`` lines of ``dongle status``."""
    lines = [f"vehicle: {st.get('state') or 'undecided'}"
             + (f" for {st['since_s']:.0f} s" if st.get("since_s") is not None else "")
             + (" (awake)" if st.get("vehicle_awake") else "")]
    lines.append(f"requests to the vehicle: {st.get('requests') or 'not started'}")
    ign = st.get("ignition")
    lines.append("ignition: " + ("unknown" if ign is None else ("on" if ign else "off")))
    bus = st.get("bus_quiet_s")
    lines.append("CAN: " + ("no CAN" if bus is None else f"quiet for {bus:.0f} s"))
    v, trend = st.get("supply_v"), st.get("supply_trend_v_per_h")
    lines.append("12 V: " + ("unknown" if v is None else f"{v:.2f} V")
                 + ("" if trend is None else f" ({trend:+.2f} V/h)"))
    mcu = st.get("mcu")
    if mcu is None:
        lines.append("MCU: none (no sleep control)")
    else:
        lines.append(f"MCU: {'connected' if mcu.get('connected') else 'NOT connected'} on "
                     f"{mcu.get('port')}, firmware {mcu.get('firmware') or '?'}, woke by "
                     f"{mcu.get('wake_reason') or '?'}, watchdog {mcu.get('watchdog_s')} s")
    flags = [name for name, key in (("checking in", "check_in"),
                                    ("LOW 12 V CUT", "low_voltage_cut"), ("probing", "probing"))
             if st.get(key)]
    if flags:
        lines.append("mode: " + ", ".join(flags))
    if st.get("next"):
        lines.append(f"next: {st['next']}")
    if st.get("last_sleep"):
        ls = st["last_sleep"]
        lines.append(f"last sleep: {ls.get('reason')}, wake after {ls.get('wake_after_s')} s")
    return "\n".join(lines)
