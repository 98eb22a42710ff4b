"""Helpers shared by the privacy, wipe and inventory tests: configs with consent, in-process agents."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from agent import settings as settings_mod
from drivers.core.clock import Clock

now_ms = Clock().now_ms

DAY = 24 * 3600 * 1000


def config(version: int, *, location: dict | None = None, behaviour: dict | None = None,
           retention: dict | None = None, interval_s: float = 1.0) -> dict:
    """A valid config body (PROTOCOL §4) with no OBD PIDs and the given privacy section."""
    doc = {"version": version, "upload": {"interval_s": interval_s}, "obd": {"pids": [], "dtc_period_s": 60},
           "can": {"signals": [], "raw": {"enabled": False, "ids": []}}}
    privacy = {}
    if location is not None:
        privacy["location"] = location
    if behaviour is not None:
        privacy["driving_behaviour"] = behaviour
    if retention is not None:
        privacy["retention_days"] = retention
    if privacy:
        doc["privacy"] = privacy
    return doc


def consent(mode: str, *, now: int | None = None, days: float = 30, per_drive: bool | None = None,
            cid: str = "c-1") -> dict:
    now = now_ms() if now is None else now
    c = {"mode": mode, "consent_id": cid, "granted_at": now - 1000, "until": now + int(days * DAY)}
    if per_drive is not None:
        c["per_drive"] = per_drive
    return c


def agent_settings(toml: Path, *, gpsd_port: int, sock_dir: Path, gpio: bool = False) -> settings_mod.Settings:
    """The device's validated settings with the test's gpsd and control socket; GPIO off unless
    asked for (then on the pin factory given to build())."""
    st = settings_mod.load(toml)
    return dataclasses.replace(st, gnss=settings_mod.GnssSettings("127.0.0.1", gpsd_port),
                               control=settings_mod.ControlSettings(socket=sock_dir / "ctl.sock"),
                               gpio=settings_mod.GpioSettings(enabled=gpio))


def make_agent(fleet, dev: str, *, gpsd_port: int, sock_dir: Path, pin_factory=None):
    from agent.compose import build

    sock_dir.mkdir(parents=True, exist_ok=True)
    return build(agent_settings(fleet.device(dev), gpsd_port=gpsd_port, sock_dir=sock_dir,
                                gpio=pin_factory is not None), pin_factory=pin_factory)


def telemetry_records(console, dev: str) -> list[dict]:
    return [r for r in list(console.records) if r.get("dev") == dev and r.get("kind") == "telemetry"]


def events(console, dev: str, type_: str | None = None) -> list[dict]:
    return [r["body"] for r in list(console.records) if r.get("dev") == dev and r.get("kind") == "event"
            and (type_ is None or r["body"].get("type") == type_)]
