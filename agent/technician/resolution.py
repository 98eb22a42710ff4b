"""How finely each signal is measured, so that numbers shown to people carry no more digits.

A signal's *resolution* is the step between two adjacent raw values, in the signal's unit:

- a CAN signal: its DBC scale (cantools ``Signal.scale``; none for a float signal);
- an OBD-II PID: python-OBD's decoder (drivers/obd/units.resolution: ``ENGINE_LOAD`` is
  100/255 %, ``RPM`` 0.25 rpm, ``SPEED`` 1 km/h);
- an EV battery signal: its profile field's ``factor / divisor``.

The samples themselves do not carry it; :func:`signal_resolutions` derives the map, signal name
→ step, from the active cloud config (the names it gives the signals) and the DBCs of the local
settings. :func:`shown` rounds a value to as many decimals as its step needs (:func:`decimals`:
100/255 → 1, 1.5 → 1, 0.25 → 2, 0.01 → 2, 1 → 0); without a known step, to 9 significant digits
(float noise such as ``50.599999999999994`` goes either way).
"""
from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from typing import Any

log = logging.getLogger(__name__)

#: Significant digits kept when a signal's resolution is unknown.
UNKNOWN_DIGITS = 9


def decimals(step: float | None) -> int | None:
    """Decimals for values ``step`` apart (``None`` when the step is unknown): enough to tell
    two adjacent values apart (0.39 → 1), and to write the step itself where a few more do it
    (1.5 → 1, 0.25 → 2, 0.005 → 3; 100/255 never ends: 1)."""
    if step is None or not step > 0 or not math.isfinite(step):
        return None
    apart = max(0, math.ceil(-math.log10(step) - 1e-9))
    for places in range(apart, apart + 3):
        if abs(round(step, places) - step) <= step * 1e-6:
            return places
    return apart


def shown(value: float, step: float | None) -> float:
    """``value`` rounded to its resolution (see the module docstring)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        return value
    places = decimals(step)
    if places is None:
        return float(f"{value:.{UNKNOWN_DIGITS}g}")
    out = round(float(value), places)
    return out + 0.0   # no "-0.0"


def text(value: float, step: float | None) -> str:
    """``value`` for a table: its decimals fixed by the resolution (``33.7``, ``2441.2``)."""
    places = decimals(step)
    if places is None or not isinstance(value, (int, float)) or isinstance(value, bool):
        return f"{value:.6g}" if isinstance(value, float) else str(value)
    return f"{shown(value, step):.{places}f}"


def can_signal_step(signal: Any) -> float | None:
    """A cantools signal's resolution: its scale (``None`` for a float signal)."""
    if getattr(signal, "is_float", False):
        return None
    scale = getattr(signal, "scale", None)
    return abs(float(scale)) if isinstance(scale, (int, float)) and scale else None


def pid_step(pid: object) -> float | None:
    """The resolution of python-OBD command ``pid`` (e.g. ``"RPM"``), ``None`` if unknown."""
    from drivers.obd.reader import command_for
    from drivers.obd.units import resolution
    cmd = command_for(pid) if isinstance(pid, str) else None
    return resolution(cmd) if cmd is not None else None


def obd_steps(pids: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    """The config's ``obd.pids`` (``{"name", "pid"}``) → ``{name: step}``."""
    out = {}
    for p in pids:
        step = pid_step(p.get("pid")) if isinstance(p, Mapping) else None
        if step is not None and isinstance(p.get("name"), str):
            out[p["name"]] = step
    return out


def can_steps(signals: Iterable[Mapping[str, Any]], dbcs: Iterable[Any]) -> dict[str, float]:
    """The config's ``can.signals`` (``{"name", "message", "signal"}``) → ``{name: step}``, from
    the first of ``dbcs`` (cantools databases) that has the signal."""
    dbcs = list(dbcs)
    out = {}
    for item in signals:
        if not isinstance(item, Mapping) or not isinstance(item.get("name"), str):
            continue
        for db in dbcs:
            try:
                sig = db.get_message_by_name(item.get("message")).get_signal_by_name(item.get("signal"))
            except (KeyError, TypeError, AttributeError):
                continue
            step = can_signal_step(sig)
            if step is not None:
                out[item["name"]] = step
            break
    return out


def ev_steps(profile: Any) -> dict[str, float]:
    """An EV profile's fields → ``{signal name: factor / divisor}``."""
    out = {}
    for request in getattr(profile, "requests", ()):
        for f in request.fields:
            factor, divisor = getattr(f, "factor", None), getattr(f, "divisor", None)
            if isinstance(factor, (int, float)) and isinstance(divisor, (int, float)) and factor and divisor:
                out[f.name] = abs(factor / divisor)
    return out


def signal_resolutions(config: Mapping[str, Any], dbc_paths: Iterable[str], *, ev_profile: Any = None) -> dict[str, float]:
    """``{signal name: resolution}`` for the signals the active cloud ``config`` collects, with
    the local settings' DBC files (each loaded here once; an unreadable one is skipped)."""
    from drivers.can import DbcError, load_dbc
    out = obd_steps((config.get("obd") or {}).get("pids") or ())
    signals = (config.get("can") or {}).get("signals") or ()
    if signals:
        dbcs = []
        for path in dict.fromkeys(p for p in dbc_paths if p):
            try:
                dbcs.append(load_dbc(path))
            except DbcError as e:
                log.warning("resolution: %s", e)
        out.update(can_steps(signals, dbcs))
    if ev_profile is not None:
        out.update(ev_steps(ev_profile))
    return out
