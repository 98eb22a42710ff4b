"""The dongle's LEDs and button on gpiozero: pins only, no policy.

:class:`DongleIO` drives five LEDs (``power``, ``cloud``, ``vehicle``, ``attention``,
``location``), each ``off``, ``on``, ``blink`` or ``fast``, and reads one button: a short press
calls ``when_pressed`` and wakes :meth:`DongleIO.wait_for_press`; a press held ``long_press_s``
calls ``when_held`` (gpiozero's own naming). What the LEDs show and what the button means is the
agent's business (agent/device/indicators.py).

Pins are BCM numbers or gpiozero pin names by role (``led_power``, ..., ``button``; a role left
out is "not fitted"). The pin backend is gpiozero's: ``pin_factory`` (tests pass gpiozero's
``MockFactory``), else ``GPIOZERO_PIN_FACTORY`` or gpiozero's default order (lgpio on current
Raspberry Pi OS, then rpigpio, pigpio, native). gpiozero falls back silently (a
``PinFactoryFallback`` warning each): :func:`open_io` says which backend it got and why each one
before it was skipped, or, where none works, why not (:class:`GpioOpened`).
"""
from __future__ import annotations

import logging
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

LEDS = ("power", "cloud", "vehicle", "attention", "location")
MODES = ("off", "on", "blink", "fast")


class DongleIO:
    """The LEDs and the button on one pin factory (gpiozero's default when None)."""

    def __init__(self, pins: dict[str, Any], *, pin_factory=None, long_press_s: float = 3.0):
        from gpiozero import LED, Button

        self.leds: dict[str, Any] = {}
        self.modes: dict[str, str] = {}
        self.button = None
        #: called on a short press / a long press (set by whoever owns the meaning)
        self.when_pressed: Callable[[], None] | None = None
        self.when_held: Callable[[], None] | None = None
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

    @property
    def backend(self) -> str | None:
        """The gpiozero pin factory in use (e.g. ``LGPIOFactory``, ``MockFactory``)."""
        for device in (*self.leds.values(), self.button):
            if device is not None:
                return type(device.pin_factory).__name__
        return None

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
        if self.when_held:
            self.when_held()

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
        if self.when_pressed:
            self.when_pressed()

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


@dataclass
class GpioOpened:
    """What :func:`open_io` found: the pins (None where no backend works), the backend in use,
    the backends gpiozero skipped on the way with the reason, and the error if none worked."""
    io: DongleIO | None
    backend: str | None = None
    fallbacks: list[str] = field(default_factory=list)
    error: str | None = None

    def report(self) -> dict:
        return {"backend": self.backend, "fallbacks": list(self.fallbacks), "error": self.error}


def open_io(pins: dict[str, Any], *, pin_factory=None, long_press_s: float = 3.0) -> GpioOpened:
    """DongleIO on ``pins``, with the backend it runs on; said in the log once: the backend at
    INFO (WARNING when gpiozero had to fall back from a better one), or why there is none."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            io = DongleIO(pins, pin_factory=pin_factory, long_press_s=long_press_s)
            error = None
        except Exception as e:  # gpiozero.exc.BadPinFactory on a machine without GPIO, busy pins, ...
            io, error = None, f"{type(e).__name__}: {e}"
    fallbacks = [str(w.message) for w in caught if type(w.message).__name__ == "PinFactoryFallback"]
    opened = GpioOpened(io, io.backend if io else None, fallbacks, error)
    tried = f" (gpiozero: {'; '.join(fallbacks)})" if fallbacks else ""
    if io is None:
        log.warning("GPIO: no pin backend works on this machine: %s%s; the agent runs with LEDs and "
                    "button disabled", error, tried)
    elif fallbacks:
        log.warning("GPIO: pin backend %s, after falling back%s", opened.backend, tried)
    else:
        log.info("GPIO: pin backend %s", opened.backend)
    return opened
