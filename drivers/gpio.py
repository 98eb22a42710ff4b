"""The dongle's LEDs and button (gpiozero).

LEDs: ``power`` (the agent runs), ``cloud`` (broker link: on = connected, blinking = trying),
``vehicle`` (on = adapter talks to the car, blinking = looking for it, off = no adapter
configured), ``attention`` (blinking = something for a person: a pending booking, a trouble
code, a clear request from the cloud; fast = waiting for a button press to confirm; on =
technician mode), ``location`` (on = the owner's location is being collected right now, as
PROTOCOL §6 consent allows; off otherwise — it never shows less than the truth). One button: a short press confirms what the terminal asked for (e.g.
``dongle dtc clear``); a press held ``long_press_s`` starts technician mode for
``technician_mode_s`` (presence at the car is then proven, so a confirmation at the terminal is
enough).

Pins come from the local settings' ``[gpio]`` section (BCM numbers or gpiozero pin names; a key
left out means "not fitted"): ``led_power``, ``led_cloud``, ``led_vehicle``, ``led_attention``,
``led_location``,
``button``, ``long_press_s``, ``technician_mode_s``, ``enabled``. On a machine without GPIO the
agent runs with them disabled and says so once. Tests pass gpiozero's ``MockFactory`` as
``pin_factory``.
"""
from __future__ import annotations

import logging
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

LEDS = ("power", "cloud", "vehicle", "attention", "location")
DEFAULT_PINS = {"led_power": 5, "led_cloud": 6, "led_vehicle": 13, "led_attention": 19,
                "led_location": 20, "button": 26}
MODES = ("off", "on", "blink", "fast")


class DongleIO:
    """The LEDs and the button on one pin factory (gpiozero's default when None)."""

    def __init__(self, pins: dict[str, Any], *, pin_factory=None, long_press_s: float = 3.0,
                 on_press: Callable[[], None] | None = None,
                 on_long_press: Callable[[], None] | None = None):
        from gpiozero import LED, Button

        self.leds: dict[str, Any] = {}
        self.modes: dict[str, str] = {}
        self.button = None
        self._on_press = on_press
        self._on_long_press = on_long_press
        self._held = False
        self._waiters: list[threading.Event] = []
        self._lock = threading.Lock()
        self.presses = 0
        self.long_presses = 0
        try:
            for name in LEDS:
                pin = pins.get(f"led_{name}")
                if pin is not None:
                    self.leds[name] = LED(pin, pin_factory=pin_factory)
                    self.modes[name] = "off"
            if pins.get("button") is not None:
                self.button = Button(pins["button"], pull_up=True, hold_time=long_press_s,
                                     pin_factory=pin_factory)
                self.button.when_held = self._held_cb
                self.button.when_released = self._released_cb
        except BaseException:
            self.close()
            raise

    # -- LEDs -----------------------------------------------------------------------------
    def set(self, name: str, mode: str) -> None:
        led = self.leds.get(name)
        if led is None or self.modes.get(name) == mode:
            return
        self.modes[name] = mode
        if mode == "on":
            led.on()
        elif mode == "blink":
            led.blink(on_time=0.5, off_time=0.5)
        elif mode == "fast":
            led.blink(on_time=0.1, off_time=0.1)
        else:
            led.off()

    # -- button ---------------------------------------------------------------------------
    def _held_cb(self) -> None:
        self._held = True
        self.long_presses += 1
        log.info("button: long press")
        if self._on_long_press:
            self._on_long_press()

    def _released_cb(self) -> None:
        if self._held:
            self._held = False
            return
        self.presses += 1
        log.info("button: press")
        with self._lock:
            waiters, self._waiters = self._waiters, []
        for w in waiters:
            w.set()
        if self._on_press:
            self._on_press()

    def wait_for_press(self, timeout_s: float, cancel: threading.Event | None = None) -> bool:
        """True when a short press comes within ``timeout_s`` (only presses after the call count)."""
        if self.button is None:
            return False
        ev = threading.Event()
        with self._lock:
            self._waiters.append(ev)
        deadline = time.monotonic() + timeout_s
        try:
            while not ev.is_set():
                left = deadline - time.monotonic()
                if left <= 0 or (cancel is not None and cancel.is_set()):
                    return False
                ev.wait(min(left, 0.2))
            return True
        finally:
            with self._lock:
                if ev in self._waiters:
                    self._waiters.remove(ev)

    def close(self) -> None:
        for led in self.leds.values():
            try:
                led.close()
            except Exception:
                pass
        if self.button is not None:
            self.button.close()


def led_modes(state: dict) -> dict[str, str]:
    """The LEDs' modes from the agent's state: ``{"running", "cloud_connected",
    "vehicle": "connected"|"searching"|"none", "confirming", "technician_mode", "attention": [reasons],
    "location": bool}``."""
    return {
        "power": "on" if state.get("running") else "off",
        "cloud": "on" if state.get("cloud_connected") else ("blink" if state.get("running") else "off"),
        "vehicle": {"connected": "on", "searching": "blink"}.get(state.get("vehicle", "none"), "off"),
        "attention": ("fast" if state.get("confirming") else "on" if state.get("technician_mode")
                      else "blink" if state.get("attention") else "off"),
        "location": "on" if state.get("location") else "off",
    }


def open_io(settings: dict, *, pin_factory=None, **kw) -> DongleIO | None:
    """DongleIO per the ``[gpio]`` settings; None (said once, in the log) without GPIO."""
    if settings.get("enabled", True) is False:
        log.info("GPIO: disabled in the local settings; LEDs and button off")
        return None
    pins = {k: settings.get(k, v) for k, v in DEFAULT_PINS.items()}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # gpiozero warns for every pin library it cannot load
            return DongleIO(pins, pin_factory=pin_factory,
                            long_press_s=float(settings.get("long_press_s", 3.0)), **kw)
    except Exception as e:  # gpiozero.exc.BadPinFactory on a machine without GPIO, busy pins, ...
        log.warning("GPIO: not available on this machine (%s); the agent runs with LEDs and button disabled", e)
        return None


class Indicators:
    """The agent component: drives the LEDs from the agent's state, serves the button."""

    def __init__(self, agent, settings: dict, *, pin_factory=None, interval_s: float = 0.5):
        self.agent = agent
        self.technician_mode_s = float(settings.get("technician_mode_s", 900))
        self._technician_until = 0.0
        self._confirming = 0
        self._lock = threading.Lock()
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.io = open_io(settings, pin_factory=pin_factory, on_long_press=self.start_technician_mode)
        self.last_modes: dict[str, str] = {}
        self._running = False

    @property
    def has_button(self) -> bool:
        return self.io is not None and self.io.button is not None

    @property
    def technician_mode(self) -> bool:
        return time.monotonic() < self._technician_until

    def start_technician_mode(self) -> None:
        self._technician_until = time.monotonic() + self.technician_mode_s
        log.info("technician mode for %.0f min (long press on the dongle's button)", self.technician_mode_s / 60)
        self.update()

    def confirm_by_button(self, timeout_s: float, cancel: threading.Event | None = None) -> bool:
        """Blinks ``attention`` fast and waits for a short press."""
        if not self.has_button:
            return False
        with self._lock:
            self._confirming += 1
        self.update()
        try:
            return self.io.wait_for_press(timeout_s, cancel)
        finally:
            with self._lock:
                self._confirming -= 1
            self.update()

    def state(self) -> dict:
        a = self.agent
        obd = a.obd.status() if a.obd else None
        can = a.can.status() if a.can else None
        if obd and obd.get("connected"):
            vehicle = "connected"
        elif can and any(b.get("state") == "running" and b.get("frames") for b in can["buses"].values()):
            vehicle = "connected"
        elif obd is not None or can is not None:
            vehicle = "searching"
        else:
            vehicle = "none"
        attention = []
        try:
            if any(b["status"] in ("scheduled", "checked_in") for b in a.bookings.list()):
                attention.append("booking")
            if a.store.get_meta("pending_clear_dtc"):
                attention.append("clear_dtc_request")
            health = getattr(a, "health", None)
            if health is not None and health.dtc_state()["severity"] in ("warn", "critical"):
                attention.append("trouble_code")
        except Exception as e:  # the store closing under us at shutdown
            log.debug("GPIO: state: %s", e)
        owner = getattr(a, "owner_data", None)
        location = bool(owner is not None and owner.location_active())
        return {"running": self._running, "cloud_connected": a.link.connected, "vehicle": vehicle,
                "location": location,
                "confirming": self._confirming > 0, "technician_mode": self.technician_mode,
                "attention": attention}

    def update(self) -> None:
        if self.io is None:
            return
        modes = led_modes(self.state())
        for name, mode in modes.items():
            self.io.set(name, mode)
        self.last_modes = modes

    def start(self) -> None:
        self._running = True
        if self.io is None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="gpio", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.update()
            except Exception:
                log.exception("GPIO: updating the LEDs failed")

    def stop(self) -> None:
        self._running = False
        self._stop.set()
        if self._thread:
            self._thread.join(5)
            self._thread = None
        if self.io is not None:
            for name in LEDS:
                self.io.set(name, "off")
            self.io.close()
            self.io = None

    def status(self) -> dict:
        return {"available": self.io is not None, "button": self.has_button,
                "technician_mode": self.technician_mode, "leds": dict(self.last_modes),
                "presses": self.io.presses if self.io else 0}


def attach(agent, *, pin_factory=None) -> Indicators:
    """Adds the LEDs and button to ``agent`` (settings ``[gpio]``)."""
    ind = Indicators(agent, agent.settings.data.get("gpio") or {}, pin_factory=pin_factory)
    agent.add_component("gpio", ind)
    agent.indicators = ind
    return ind
