"""Plain data types that flow from the drivers through the pipeline into the store.

Drivers (OBD, CAN, UDS, GNSS) produce these; nothing here does I/O.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Sample:
    """One value of one configured signal.

    ``name`` is the name the active cloud config gives the signal (PROTOCOL §4), ``unit`` a
    short unit text (``"rpm"``, ``"km/h"``, ``"degC"``, ``"%"``, ``"V"``; ``""`` for none),
    ``t_ms`` the sampling time in ms since the Unix epoch.
    """

    name: str
    unit: str
    t_ms: int
    value: float


@dataclass(frozen=True, slots=True)
class Frame:
    """One raw CAN frame as captured (PROTOCOL §4 telemetry ``frames``).

    ``t_us`` is the capture time in µs since the Unix epoch.
    """

    bus: str
    t_us: int
    can_id: int
    extended: bool
    data: bytes
