"""Maintenance due, by distance and by time since the last service record of each kind.

The kinds and their intervals come from the cloud config's ``health.maintenance``::

    "maintenance": {"items": {"oil_change": {"km": 15000, "days": 365},
                              "brake_fluid": {"days": 730}},
                    "ahead_km": 1000, "ahead_days": 30}

A service record (PROTOCOL §5) counts for a kind when one of its ``items`` is the kind's name
(case-insensitive, e.g. ``dongle booking complete ... --item oil_change``). For each kind:
``due_in_km`` = last record's odometer + ``km`` - current odometer, ``due_in_days`` likewise
from its time. Level: ``critical`` when overdue (either is <= 0), ``warn`` when within
``ahead_km`` / ``ahead_days``, else ``ok``; ``unknown`` when the kind has never been recorded (no
base to count from) — no event for those.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)

DAY_MS = 86_400_000
DEFAULT_ITEMS = {"oil_change": {"km": 15000, "days": 365}}


@dataclass(frozen=True)
class Due:
    kind: str
    level: str                 # ok | warn | critical | unknown
    due_in_km: float | None
    due_in_days: float | None
    last_odometer_km: float | None
    last_ts: int | None
    last_hash: str | None      # the service record it counts from

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}


def settings(section: dict | None) -> tuple[dict[str, dict], float, float]:
    section = section or {}
    items = section.get("items")
    if not isinstance(items, dict):
        items = DEFAULT_ITEMS
    return items, float(section.get("ahead_km", 1000)), float(section.get("ahead_days", 30))


def due(section: dict | None, last_by_item: dict[str, dict], odometer_km: float | None,
        now_ms: int) -> list[Due]:
    """Each configured kind's state. ``last_by_item``: ``{item (lower case): service record}``."""
    items, ahead_km, ahead_days = settings(section)
    out = []
    for kind, interval in sorted(items.items()):
        rec = last_by_item.get(kind.lower())
        if rec is None or not isinstance(interval, dict):
            out.append(Due(kind, "unknown", None, None, None, None, None))
            continue
        km_left = days_left = None
        if isinstance(interval.get("km"), (int, float)) and odometer_km is not None:
            km_left = round(float(rec["odometer_km"]) + interval["km"] - odometer_km, 1)
        if isinstance(interval.get("days"), (int, float)):
            days_left = round((int(rec["ts"]) + interval["days"] * DAY_MS - now_ms) / DAY_MS, 1)
        level = "ok"
        if (km_left is not None and km_left <= ahead_km) or (days_left is not None and days_left <= ahead_days):
            level = "warn"
        if (km_left is not None and km_left <= 0) or (days_left is not None and days_left <= 0):
            level = "critical"
        out.append(Due(kind, level, km_left, days_left, rec.get("odometer_km"), rec.get("ts"), rec.get("hash")))
    return out


def event_body(d: Due, ts: int) -> dict:
    """The ``health`` event for a kind that is due (``maintenance_due``)."""
    return {"type": "health", "ts": ts, "kind": "maintenance_due", "level": d.level,
            "detail": {"item": d.kind, **{k: v for k, v in d.as_dict().items() if k not in ("kind", "level")}}}
