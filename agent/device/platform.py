"""Wires the device-platform features into the agent: power management (MCU, vehicle state,
sleep) and the EV traction battery reader with its state-of-health monitor.

Both are optional, each by its own local settings section:

* ``[power]`` (agent/device/power.py, docs/power.md): present and ``enabled = true`` → the
  :class:`~agent.power.PowerManager` decides on / parked / charging / sleeping, holds every
  vehicle request while the car goes to sleep and drives the MCU.
* ``[ev]``: ``transport = "can"`` with ``bus = <a [[can.buses]] name>`` (UDS over can-isotp
  on that bus), or ``transport = "elm327"`` with ``port`` (a second ELM327 adapter: the OBD
  poller owns the first). What to read and how often is the cloud config's ``ev`` section.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

from agent.device.vehicle_state import BusActivity

log = logging.getLogger(__name__)


def attach(agent) -> None:
    s = agent.settings.data
    agent.power = None
    agent.bus_activity = None
    power = dict(s.get("power") or {})
    if power.pop("enabled", False):
        _attach_power(agent, power)
    ev = s.get("ev") or {}
    agent.ev = None
    agent.battery = None
    if ev.get("transport", "off") != "off":
        _attach_ev(agent, ev)


def vehicle_awake(agent) -> bool:
    """Whether anything may talk to the vehicle now (always, without power management)."""
    return agent.power.vehicle_awake() if agent.power is not None else True


def _attach_power(agent, section: dict) -> None:
    from agent.device.power import PowerHooks, PowerManager, PowerSettings

    settings = PowerSettings.from_mapping(section)
    if agent.can is not None:
        agent.bus_activity = BusActivity()
        agent.can.frame_listeners.append(agent.bus_activity.note_frames)

    def stop_requests() -> None:
        if agent.obd is not None:
            agent.obd.hold()

    def resume_requests() -> None:
        if agent.obd is not None:
            agent.obd.release()

    def flush(timeout_s: float) -> bool:
        agent.ingest.flush()
        agent.uplink.seal_pending()
        agent.uplink.wake()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if agent.store.counts()["outbox"] == 0:
                return True
            time.sleep(0.2)
        return False

    def supply_voltage() -> float | None:
        reader = getattr(agent.obd, "adapter_voltage", None)
        return reader() if reader else None

    def on_state(state) -> None:
        # PROTOCOL §6 per_drive: location restarts paused at every ignition on.
        privacy = getattr(agent, "privacy", None)
        if privacy is not None and str(state) in ("on", "parked", "sleeping"):
            privacy.on_ignition(str(state) == "on")

    hooks = PowerHooks(
        stop_vehicle_requests=stop_requests, resume_vehicle_requests=resume_requests,
        flush=flush, emit_event=agent.emit_event,
        can_activity=agent.bus_activity.quiet_for if agent.bus_activity else (lambda: None),
        supply_voltage=supply_voltage,
        alive=lambda: not agent.watchdog.stale(), beat=lambda: agent.watchdog.beat("power"),
        on_state=on_state)
    agent.power = PowerManager.from_settings(settings, hooks=hooks)
    # Requests start held; the power manager's first decision releases them.
    stop_requests()
    agent.watchdog.register("power")
    agent.add_component("power", agent.power)


def _attach_ev(agent, section: dict) -> None:
    from agent.vehicle.ev import EvReader
    from agent.health.traction_battery import TractionBatteryHealth

    transport = section["transport"]
    if transport == "can":
        buses = {b["name"]: b for b in agent.settings.data["can"]["buses"]}
        setting = buses[section["bus"]]

        def factory():
            from drivers.uds import UdsClient
            return UdsClient.from_setting(setting)
    else:
        port = section["port"]

        def factory():
            from drivers.elm_isotp import ElmIsoTp
            return ElmIsoTp.open_serial(port)

    agent.battery = TractionBatteryHealth(agent.store, agent.emit_event)

    def on_profile(name: str | None) -> None:
        agent.store.set_meta("ev_profile", name)

    def on_snapshot(snap) -> None:
        # The SOH history is kept per vehicle, but never under the VIN itself (identity data):
        # under a pseudonym keyed by the owner's data key, which a wipe destroys.
        owner = getattr(agent, "owner_data", None)
        if owner is not None and snap.vehicle and not snap.vehicle.startswith("profile:"):
            snap = dataclasses.replace(snap, vehicle=owner.datakey.pseudonym(snap.vehicle))
        agent.battery.observe_snapshot(snap)

    agent.ev = EvReader(factory, agent.ingest.put_samples, lambda: vehicle_awake(agent),
                        on_snapshot=on_snapshot, on_profile=on_profile)
    agent.config_listeners.append(agent.battery.apply_config)
    agent.vehicle_listeners.append(lambda info: agent.ev.set_vehicle(info.get("vin")))
    agent.ev.apply_config(agent.config)
    agent.battery.apply_config(agent.config)
    agent.add_component("ev", agent.ev)


def battery_request(agent, request: dict, peer=None, reply=None) -> dict:
    """The control socket's ``battery`` request (``dongle battery``)."""
    return battery_report(agent)


def battery_report(agent) -> dict[str, Any]:
    if agent.battery is None:
        return {"available": False, "reason": "no EV transport configured ([ev] in agent.toml)"}
    latest = agent.ev.last_values() if agent.ev is not None else None
    return agent.battery.report(latest=latest)
