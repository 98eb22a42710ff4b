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
