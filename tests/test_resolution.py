"""Signal resolutions: python-OBD's decoders as they are (fails loudly when the library
changes one), the DBC scale, and the rounding of numbers shown to people."""
from __future__ import annotations

from types import SimpleNamespace

import obd
import pytest

from agent.technician import resolution
from drivers.can import load_dbc
from drivers.obd.units import _DECODER_STEPS, resolution as obd_resolution, value_and_unit
from pathlib import Path

DBC = Path(__file__).resolve().parent.parent / "config" / "dbc" / "toyota_new_mc_pt_generated.dbc"
#: Where a decoder reads the least significant bit of its value (else the last data byte).
LSB = {"max_maf": 0, "percent": 0, "percent_centered": 0, "sensor_voltage": 0, "timing_advance": 0,
       "pressure": 0, "fuel_pressure": 0, "current_centered": 3, "sensor_voltage_big": 3}


def _decode(cmd, data: bytes) -> float:
    header = bytes([0x41, cmd.pid])
    got = value_and_unit(cmd.decode([SimpleNamespace(data=bytearray(header + data))]))
    assert got is not None, cmd.name
    return got[0]


def _mode1_commands():
    for cmd in obd.commands.modes[1]:
        if cmd is not None and obd_resolution(cmd) is not None:
            yield cmd


@pytest.mark.parametrize("cmd", list(_mode1_commands()), ids=lambda c: c.name)
def test_the_step_is_what_one_raw_count_changes_in_python_obds_decoder(cmd):
    n = cmd.bytes - 2
    name = getattr(cmd.decode, "__name__", "uas")
    i = LSB.get(name, n - 1)
    low = bytearray(n)
    low[i] = 0x10
    high = bytearray(low)
    high[i] = 0x11
    assert _decode(cmd, bytes(high)) - _decode(cmd, bytes(low)) == pytest.approx(obd_resolution(cmd), rel=1e-9)


def test_every_decoder_in_the_table_exists_in_python_obd():
    from obd import decoders
    assert all(callable(getattr(decoders, name, None)) for name in _DECODER_STEPS), \
        sorted(n for n in _DECODER_STEPS if not hasattr(decoders, n))
    covered = {getattr(c.decode, "__name__", None) for c in _mode1_commands()}
    assert covered >= set(_DECODER_STEPS) - {"elm_voltage", "count"}


def test_known_steps_and_how_values_are_shown():
    assert obd_resolution(obd.commands.ENGINE_LOAD) == pytest.approx(100 / 255)
    assert obd_resolution(obd.commands.RPM) == 0.25 and obd_resolution(obd.commands.SPEED) == 1
    assert obd_resolution(obd.commands.STATUS) is None
    assert resolution.shown(33.725490196078436, 100 / 255) == 33.7
    assert resolution.text(33.725490196078436, 100 / 255) == "33.7"
    assert resolution.shown(50.599999999999994, 0.01) == 50.6 and resolution.text(50.6, 0.01) == "50.60"
    assert resolution.shown(50.599999999999994, None) == 50.6   # unknown: float noise only
    assert resolution.text(812.0, 0.25) == "812.00" and resolution.text(90.0, 1.0) == "90"
    assert [resolution.decimals(s) for s in (100 / 255, 1.5, 0.25, 0.01, 1 / 200, 1 / 128, 1, 10, 3)] == \
        [1, 1, 2, 2, 3, 3, 0, 0, 0]
    assert resolution.text(4.5, 1.5) == "4.5"
    assert resolution.shown(-0.001, 0.01) == 0.0 and str(resolution.shown(-0.001, 0.01)) == "0.0"


def test_can_steps_come_from_the_dbc_scale():
    db = load_dbc(DBC)
    steps = resolution.can_steps([{"name": "w", "message": "WHEEL_SPEEDS", "signal": "WHEEL_SPEED_FL"},
                                  {"name": "s", "message": "STEER_ANGLE_SENSOR", "signal": "STEER_ANGLE"},
                                  {"name": "x", "message": "NOPE", "signal": "NOPE"}], [db])
    assert steps == {"w": 0.01, "s": 1.5}
