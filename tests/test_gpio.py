"""LEDs and button on gpiozero's MockFactory: what the LEDs show (agent/device/indicators.py),
press vs long press, no GPIO (drivers/gpio.py)."""
from __future__ import annotations

import logging
import threading
import time

import pytest
from gpiozero import Device
from gpiozero.pins.mock import MockFactory

from agent.device.indicators import led_modes
from agent.settings import GpioSettings
from drivers.gpio import DongleIO, open_io
from scripts.testbed.wait import wait_until

PINS = {"led_power": 5, "led_cloud": 6, "led_vehicle": 13, "led_attention": 19, "button": 26}


@pytest.fixture
def factory():
    f = MockFactory()
    yield f
    f.reset()


def press(factory, pin=26, hold_s=0.0):
    p = factory.pin(pin)
    p.drive_low()   # pull-up button: pressed pulls the line low
    if hold_s:
        time.sleep(hold_s)
    p.drive_high()


def test_led_modes_from_state():
    assert led_modes({}) == {"power": "off", "cloud": "off", "vehicle": "off", "attention": "off",
                             "location": "off"}
    m = led_modes({"running": True, "cloud_connected": False, "vehicle": "searching", "attention": ["booking"]})
    assert m == {"power": "on", "cloud": "blink", "vehicle": "blink", "attention": "blink", "location": "off"}
    m = led_modes({"running": True, "cloud_connected": True, "vehicle": "connected", "attention": [],
                   "technician_mode": True, "location": True})
    assert m == {"power": "on", "cloud": "on", "vehicle": "on", "attention": "on", "location": "on"}
    assert led_modes({"running": True, "confirming": True, "technician_mode": True})["attention"] == "fast"


def test_leds_drive_their_pins(factory):
    io = DongleIO(PINS, pin_factory=factory)
    try:
        io.set("power", "on")
        io.set("cloud", "off")
        assert factory.pin(5).state is True and factory.pin(6).state is False
        io.set("attention", "fast")
        seen = set()
        assert wait_until(lambda: seen.add(factory.pin(19).state) or seen == {True, False}), "attention does not blink"
        io.set("attention", "off")
        assert factory.pin(19).state is False
    finally:
        io.close()


def test_short_press_confirms_long_press_does_not(factory):
    longs = []
    io = DongleIO(PINS, pin_factory=factory, long_press_s=0.3)
    io.when_held = lambda: longs.append(1)
    try:
        # A press before anyone waits does not confirm a later request.
        press(factory)
        result = {}
        t = threading.Thread(target=lambda: result.setdefault("ok", io.wait_for_press(10)))
        t.start()
        time.sleep(0.2)
        press(factory, hold_s=0.6)  # long press: technician mode, not a confirmation
        assert wait_until(lambda: longs == [1])
        assert t.is_alive()
        press(factory)
        t.join(10)
        assert result == {"ok": True}
        assert io.presses == 2 and io.long_presses == 1
        assert io.wait_for_press(0.2) is False  # times out with no press
    finally:
        io.close()


def test_missing_pins_mean_not_fitted(factory):
    io = DongleIO({"led_power": 5}, pin_factory=factory)
    try:
        io.set("cloud", "on")  # no such LED: ignored
        assert io.button is None and io.wait_for_press(0.1) is False
    finally:
        io.close()


def test_no_gpio_on_this_machine_disables_with_one_message(caplog, monkeypatch):
    monkeypatch.setattr(Device, "pin_factory", None)
    monkeypatch.delenv("GPIOZERO_PIN_FACTORY", raising=False)
    monkeypatch.setenv("GPIOZERO_PIN_FACTORY", "no-such-factory")
    with caplog.at_level(logging.INFO, logger="drivers.gpio"):
        opened = open_io(GpioSettings().pins)
    assert opened.io is None and opened.backend is None and "no-such-factory" in opened.error
    msgs = [r.getMessage() for r in caplog.records if r.name == "drivers.gpio"]
    assert len(msgs) == 1 and "no pin backend works" in msgs[0] and "no-such-factory" in msgs[0]


def test_every_fallback_of_gpiozero_is_named_not_silent(caplog, monkeypatch):
    """gpiozero's default order on this PC (no lgpio, RPi.GPIO or pigpio, not a Pi): each factory
    it skipped is in the log line and the report, with gpiozero's own reason."""
    monkeypatch.setattr(Device, "pin_factory", None)
    monkeypatch.delenv("GPIOZERO_PIN_FACTORY", raising=False)
    with caplog.at_level(logging.INFO, logger="drivers.gpio"):
        opened = open_io(GpioSettings().pins)
    assert opened.io is None
    assert [f.split(":")[0] for f in opened.fallbacks] == ["Falling back from lgpio", "Falling back from rpigpio",
                                                           "Falling back from pigpio", "Falling back from native"]
    (msg,) = [r.getMessage() for r in caplog.records if r.name == "drivers.gpio"]
    assert "No module named 'lgpio'" in msg and opened.report()["error"].startswith("BadPinFactory")


def test_backend_is_named(factory, caplog):
    with caplog.at_level(logging.INFO, logger="drivers.gpio"):
        opened = open_io(PINS, pin_factory=factory)
    try:
        assert opened.io.backend == opened.backend == "MockFactory" and opened.fallbacks == []
        assert [r.getMessage() for r in caplog.records if r.name == "drivers.gpio"] == ["GPIO: pin backend MockFactory"]
    finally:
        opened.io.close()
