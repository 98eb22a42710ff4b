"""The resolution of a signal (the smallest step its source can tell apart), and its values
shown to people at that resolution.

- An OBD PID (python-OBD command name): python-OBD's own decoder applied to one least
  significant bit of the PID's answer: ``RPM`` 0.25 rpm, ``SPEED`` 1 km/h, ``ENGINE_LOAD`` and
  ``FUEL_LEVEL`` 100/255 %, ``MAF`` 0.01 g/s, ``CONTROL_MODULE_VOLTAGE`` 0.001 V; the adapter's
  ``ELM_VOLTAGE`` (AT RV) prints 0.1 V.
- A CAN signal: its DBC scale (``WHEEL_SPEED_FL`` 0.01 km/h, ``STEER_ANGLE`` 1.5 deg).

:func:`resolutions` gives them for the signals of a cloud config (names as the config gives
them); :func:`show` writes a value with as many decimals as its resolution has (0.25 -> 2,
100/255 -> 1, 1.5 -> 1, 1 -> 0), so ``engine.load`` reads ``33.7`` and not ``33.7254902``, and a
float's binary noise (``50.599999999999994``) never shows. For people only: telemetry carries the
values as the vehicle gave them. The reference console (scripts/refcloud/console.py) and the
CLI's ``dongle live`` use these.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: commands whose answer is the adapter's text, not a decoded OBD message
_TEXT_RESOLUTION = {"ELM_VOLTAGE": 0.1}


@lru_cache(maxsize=None)
def pid_resolution(name: str) -> float | None:
    """The step of python-OBD command ``name``'s value, in the unit python-OBD gives it; ``None``
    for unknown or non-numeric commands (status bits, codes, text)."""
    if name in _TEXT_RESOLUTION:
        return _TEXT_RESOLUTION[name]
    from drivers.obd.reader import command_for
    from drivers.obd.units import value_and_unit
    from obd.protocols.protocol import Message

    cmd = command_for(name)
    size = getattr(cmd, "bytes", 0) or 0
    head = bytes(cmd.command[:4]) if cmd is not None else b""
    if cmd is None or size <= 2 or len(head) != 4 or not head.startswith((b"01", b"02")):
        return None

    def decoded(data: bytes) -> float | None:
        message = Message([])
        message.ecu = cmd.ecu
        message.data = bytearray(data)
        try:
            got = value_and_unit(cmd([message]).value)
        except Exception:  # noqa: BLE001 - a decoder that cannot take the probe: no resolution
            return None
        return None if got is None else got[0]

    prefix = bytes((0x41, int(head[2:4], 16)))
    payload = size - 2
    base = decoded(prefix + bytes(payload))
    if base is None:
        return None
    for position in range(payload - 1, -1, -1):   # the last byte's LSB first
        probe = bytearray(payload)
        probe[position] = 1
        value = decoded(prefix + bytes(probe))
        if value is not None and value != base:
            return abs(value - base)
    return None


def dbc_resolution(databases: Iterable[Any], message: str, signal: str) -> float | None:
    """The scale of ``message``.``signal`` in the first of ``databases`` (cantools) that has it."""
    for db in databases:
        try:
            sig = db.get_message_by_name(message).get_signal_by_name(signal)
        except KeyError:
            continue
        scale = abs(float(sig.scale or 0))
        return scale or None
    return None


def load_dbcs(paths: Iterable[str | Path]) -> list[Any]:
    """cantools databases of ``paths`` (a file that cannot be read is logged and left out)."""
    import cantools
    out = []
    for path in paths:
        try:
            out.append(cantools.database.load_file(str(path), strict=False))
        except (OSError, ValueError, cantools.database.UnsupportedDatabaseFormatError) as e:
            log.warning("resolution: cannot read the DBC %s (%s)", path, e)
    return out


def resolutions(config: Mapping[str, Any] | None, databases: Iterable[Any] = ()) -> dict[str, float]:
    """``{signal name: resolution}`` for the OBD PIDs and CAN signals of a cloud config
    (PROTOCOL §4); signals whose resolution is unknown are left out."""
    config = config or {}
    out: dict[str, float] = {}
    for p in (config.get("obd") or {}).get("pids") or []:
        if isinstance(p, Mapping) and isinstance(p.get("name"), str) and isinstance(p.get("pid"), str):
            res = pid_resolution(p["pid"])
            if res:
                out[p["name"]] = res
    dbs = list(databases)
    for s in (config.get("can") or {}).get("signals") or []:
        if isinstance(s, Mapping) and all(isinstance(s.get(k), str) for k in ("name", "message", "signal")):
            res = dbc_resolution(dbs, s["message"], s["signal"])
            if res:
                out[s["name"]] = res
    return out


def decimals(resolution: float) -> int:
    """How many decimals show a value of step ``resolution``: those of the step itself when it
    is a short decimal (0.25 -> 2, 0.005 -> 3, 1.5 -> 1), else those of its first digit
    (100/255 = 0.392... -> 1); never fewer than 0, never more than 6."""
    if not (resolution > 0 and math.isfinite(resolution)):
        return 6
    first = max(0, -math.floor(math.log10(resolution)))
    for d in (first, first + 1):
        if abs(round(resolution, d) - resolution) <= resolution * 1e-9:
            return min(d, 6)
    return min(first, 6)


def show(value: float, resolution: float | None) -> str:
    """``value`` for people: rounded to a whole number of ``resolution`` steps and written with
    its decimals when known, else at 6 significant digits; trailing zeros dropped (``750``
    rather than ``750.00``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if not math.isfinite(value):
        return str(value)
    if resolution:
        text = f"{round(value / resolution) * resolution:.{decimals(resolution)}f}"
        if "." in text:
            text = text.rstrip("0").rstrip(".")
        return "0" if text in ("-0", "") else text
    return f"{value:.6g}"
