"""Short unit texts and plain numbers from python-OBD's pint values, and python-OBD's decoders
run once per distinct answer (:class:`DecodeCache`)."""
from __future__ import annotations

import logging
import math
from typing import Any

from drivers.obd.elm327 import Message, message_like

log = logging.getLogger(__name__)

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


class DecodeCache:
    """``(value, unit text)`` of a python-OBD command's answer data (``41 0C 1A F8``), decoded
    by python-OBD itself the first time a command sees that data and remembered after: python-OBD
    builds a pint quantity per answer and pint's unit text costs as much again, while a live
    PID's answers repeat (one-byte PIDs have 256 answers at most). At most ``per_command``
    answers are kept per command (then that command's table starts afresh). One per reader
    (not thread-safe)."""

    _MISSING = object()

    def __init__(self, per_command: int = 1024):
        self.per_command = per_command
        self._tables: dict[str, dict[bytes, tuple[float, str] | None]] = {}
        self._template = Message([])
        self.hits = self.misses = 0

    def value(self, cmd: Any, data: bytes) -> tuple[float, str] | None:
        table = self._tables.get(cmd.name)
        if table is None:
            table = self._tables[cmd.name] = {}
        found = table.get(data, self._MISSING)
        if found is not self._MISSING:
            self.hits += 1
            return found  # type: ignore[return-value]
        self.misses += 1
        message = message_like(self._template, data)
        message.ecu = cmd.ecu  # python-OBD's ECU filter was applied by the caller
        try:
            response = cmd([message])
            found = None if response.is_null() else value_and_unit(response.value)
        except Exception:  # noqa: BLE001 - a decoder fed odd bytes must not stop the others
            log.debug("decoding %s from %s failed", cmd.name, data.hex(), exc_info=True)
            found = None
        if len(table) >= self.per_command:
            table.clear()
        table[data] = found
        return found
