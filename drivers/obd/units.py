"""Short unit texts and plain numbers from python-OBD's pint values."""
from __future__ import annotations

import math
from typing import Any

_UNIT_TEXT = {
    "revolutions_per_minute": "rpm",
    "kilometer_per_hour": "km/h",
    "degree_Celsius": "degC",
    "degree_Fahrenheit": "degF",
    "percent": "%",
    "volt": "V",
    "millivolt": "mV",
    "kilopascal": "kPa",
    "pascal": "Pa",
    "gps": "g/s",
    "gram / second": "g/s",
    "second": "s",
    "minute": "min",
    "kilometer": "km",
    "lph": "L/h",
    "liter / hour": "L/h",
    "liters_per_hour": "L/h",
    "degree": "deg",
    "dimensionless": "",
    "ratio": "",
    "ppm": "ppm",
    "milliampere": "mA",
}


def unit_text(unit: Any) -> str:
    """Short unit text for a pint unit of python-OBD (``"rpm"``, ``"km/h"``, ``"degC"``, ...);
    pint's own short form for units not in the table, ``""`` for none."""
    if unit is None:
        return ""
    name = str(unit)
    if name in _UNIT_TEXT:
        return _UNIT_TEXT[name]
    try:
        return format(unit, "~")
    except (TypeError, ValueError):
        return name


def value_and_unit(value: Any) -> tuple[float, str] | None:
    """``(float, unit text)`` for a numeric python-OBD value; ``None`` for anything else
    (status objects, strings, lists, NaN)."""
    if isinstance(value, bool):
        return (1.0 if value else 0.0), ""
    if isinstance(value, (int, float)):
        magnitude, unit = value, None
    else:
        magnitude = getattr(value, "magnitude", None)
        unit = getattr(value, "units", None)
        if isinstance(magnitude, bool) or not isinstance(magnitude, (int, float)):
            return None
    number = float(magnitude)
    if not math.isfinite(number):
        return None
    return number, unit_text(unit)


#: The step between two adjacent raw values of python-OBD's decoders, in the unit each returns
#: (decoders.py: ``percent`` is A * 100 / 255 %, ``temp`` A - 40 °C, ...). UAS decoders carry
#: their own scale (UnitsAndScaling.UAS_IDS). A test holds this table to python-OBD's decoders.
_DECODER_STEPS = {
    "percent": 100 / 255, "absolute_load": 100 / 255, "percent_centered": 100 / 128,
    "temp": 1.0, "pressure": 1.0, "fuel_pressure": 3.0, "max_maf": 10.0, "count": 1.0,
    "sensor_voltage": 1 / 200, "sensor_voltage_big": 8 / 65535, "current_centered": 1 / 256,
    "evap_pressure": 0.25, "abs_evap_pressure": 1 / 200, "evap_pressure_alt": 1.0,
    "timing_advance": 0.5, "inject_timing": 1 / 128, "fuel_rate": 0.05,
    "elm_voltage": 0.1,   # the adapter answers e.g. "12.3V"
}


def resolution(command: Any) -> float | None:
    """The resolution of a python-OBD command's values (the step between two adjacent raw
    values, in the unit of its value), or ``None`` for a decoder without one (status bits,
    strings)."""
    import functools

    decode = getattr(command, "decode", None)
    if isinstance(decode, functools.partial) and decode.func.__name__ == "decode_uas":
        from obd.UnitsAndScaling import UAS_IDS
        uas = UAS_IDS.get(decode.keywords.get("id_"))
        return float(uas.scale) if uas is not None else None
    return _DECODER_STEPS.get(getattr(decode, "__name__", None))
