"""What the dongle's LEDs show and what its button means (the GPIO pins are drivers/gpio.py's).

LEDs: ``power`` (the agent runs), ``cloud`` (broker link: on = connected, blinking = trying),
``vehicle`` (on = adapter talks to the car, blinking = looking for it, off = no adapter
configured), ``attention`` (blinking = something for a person: a pending booking, a trouble
code, a clear request from the cloud; fast = waiting for a button press to confirm; on =
technician mode), ``location`` (on = the owner's location is being collected right now, as
PROTOCOL §6 consent allows; off otherwise — it never shows less than the truth).

The button: a short press confirms what the terminal asked for (e.g. ``dongle dtc clear``); a
press held ``long_press_s`` starts technician mode for ``technician_mode_s`` (presence at the car
is then proven, so a confirmation at the terminal is enough). Three short presses are the
owner's privacy gesture (agent/owner/privacy.py), wired in agent/compose.py.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from drivers.gpio import LEDS, DongleIO

log = logging.getLogger(__name__)


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


class Indicators:
    """The agent component: drives the LEDs from the agent's state, serves the button.

    ``vehicle()`` → ``"connected"``/``"searching"``/``"none"``; ``attention()`` → the reasons a
    person is wanted; ``cloud_connected()`` and ``location_active()`` as named."""

    def __init__(self, io: DongleIO | None, *, vehicle: Callable[[], str], gpio_report: dict | None = None,
                 attention: Callable[[], list[str]], cloud_connected: Callable[[], bool],
                 location_active: Callable[[], bool], technician_mode_s: float = 900.0,
                 interval_s: float = 0.5):
        self.io = io
        # drivers.gpio.GpioOpened.report(): the pin backend, what gpiozero fell back from, why none
        self._gpio_report = dict(gpio_report or {"backend": io.backend if io else None,
                                                 "fallbacks": [], "error": None})
        self._vehicle = vehicle
        self._attention = attention
        self._cloud_connected = cloud_connected
        self._location_active = location_active
        self.technician_mode_s = technician_mode_s
        self._technician_until = 0.0
        self._confirming = 0
        self._lock = threading.Lock()
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_modes: dict[str, str] = {}
        self._running = False
        if io is not None:
            io.when_held = self.start_technician_mode

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
        """Blinks ``attention`` fast and waits for a short press; False without a button."""
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
        try:
            attention = self._attention()
        except Exception as e:  # the store closing under us at shutdown
            log.debug("GPIO: state: %s", e)
            attention = []
        return {"running": self._running, "cloud_connected": self._cloud_connected(),
                "vehicle": self._vehicle(), "location": bool(self._location_active()),
                "confirming": self._confirming > 0, "technician_mode": self.technician_mode,
                "attention": attention}

    def update(self) -> None:
        if self.io is None:
            return
        modes = led_modes(self.state())
        for name, mode in modes.items():
            self.io.set(name, mode)
        self.last_modes = modes

    # -- component ----------------------------------------------------------------------------
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
                "backend": self.io.backend if self.io else None,
                "backend_fallbacks": self._gpio_report.get("fallbacks", []),
                "backend_error": self._gpio_report.get("error"),
                "technician_mode": self.technician_mode, "leds": dict(self.last_modes),
                "presses": self.io.presses if self.io else 0}

    def apply_config(self, doc: dict) -> list[str]:
        return []
