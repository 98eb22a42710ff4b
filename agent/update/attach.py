"""Wires the updater (:mod:`agent.update.updater`) into the agent from the local ``[update]``
settings (config/agent.example.toml documents every key; docs/updates.md the machinery).

Updates are optional: without the section, with ``enabled = false``, or when the section cannot
be used (no pinned TUF root, an install root the agent cannot write), there is no updater and a
``down/release`` is answered ``rejected`` "updates not configured" (the reason names what is
missing when there is something to name).

What the updater is given:

* ``health`` — store open and writing (``store.problem`` is None), broker connected, and the
  vehicle link (the OBD poller connected) when power management says the car is ``on``. Without
  power management the car's state is unknown, so the vehicle link is not a condition of "good"
  (otherwise an update installed in a parked car would always roll back).
* ``parked`` — from power management: parked, settling, charging and sleeping are parked, on is
  not, no decision yet (or ``unknown``) is unknown. Without power management: parked exactly
  when there is no vehicle link (no OBD poller, or it is not connected to the car).
* ``supply_v`` — power management's latest 12 V reading, else None. A release with a
  ``min_supply_v`` then *waits* (agent.update.updater: an unknown voltage never satisfies a
  minimum): a dongle without an MCU cannot show it is safe, so releases for such dongles must
  say ``min_supply_v: 0``.
* ``restart`` — a clean stop, then the daemon exits with status 75 (``Agent.request_exit``);
  systemd restarts it (``RestartForceExitStatus=75``) from the ``current`` slot.
* ``mcu`` — power management's MCU link when it is up, else None (MCU releases then wait).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from agent.cloud.downlink import Outcome
from agent.update import slots
from agent.update.trial import RESTART_EXIT_CODE
from agent.update.updater import UpdateSettings, Updater

log = logging.getLogger(__name__)

NOT_CONFIGURED = "updates not configured"
PARKED_STATES = frozenset({"parked", "settling", "charging", "sleeping"})


class UpdateConfigError(Exception):
    """The ``[update]`` section names something the updater cannot use."""


def _path(base: Path, value: str) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else base / p


def update_settings(settings: Any) -> UpdateSettings | None:
    """The :class:`UpdateSettings` of the agent's local settings, None when updates are off.
    Relative paths are relative to the settings file, like every other path there."""
    s = settings.data
    sec = dict(s.get("update") or {})
    if not sec.get("enabled"):
        return None
    base = Path(settings.path).resolve().parent
    tuf_root = (_path(base, sec["tuf_root"]) if sec.get("tuf_root")
                else Path(s["keys"]["sign_key"]).parent / "tuf_root.json")
    if not tuf_root.is_file():
        raise UpdateConfigError(f"no pinned TUF root at {tuf_root} "
                                "(dongle provision --tuf-root, or update.tuf_root)")
    rate = float(sec.get("max_rate_kib_s", 256))
    return UpdateSettings(
        root=_path(base, sec.get("root", "/opt/dongle")),
        tuf_root=tuf_root,
        metadata_dir=(_path(base, sec["metadata_dir"]) if sec.get("metadata_dir")
                      else Path(settings.data_dir) / "tuf"),
        ca_file=_path(base, sec["ca_file"]) if sec.get("ca_file") else None,
        hardware_id=sec.get("hardware_id", "dongle-pi-v1"),
        mcu_hardware_id=sec.get("mcu_hardware_id", "dongle-mcu-v1"),
        python=sec.get("python", "/usr/bin/python3"),
        rate_bps=rate * 1024 if rate > 0 else None,
        max_bundle_bytes=int(float(sec.get("max_bundle_mb", 256)) * 2**20),
        stable_s=float(sec.get("stable_s", 300)),
        trial_s=float(sec.get("trial_s", 900)),
        max_starts=int(sec.get("max_starts", 3)),
        retry_s=float(sec.get("retry_s", 60)),
        poll_s=float(sec.get("poll_s", 5)),
        compile_bytecode=bool(sec.get("compile_bytecode", True)),
        mcu_trial_s=int(sec.get("mcu_trial_s", 60)),
    )


# --- what the updater asks of the agent ------------------------------------------------------

def _power(agent: Any) -> Any:
    return getattr(agent, "power", None)


def _obd_connected(agent: Any) -> bool:
    obd = getattr(agent, "obd", None)
    return obd is not None and bool(obd.status().get("connected"))


def health(agent: Any) -> dict[str, bool | None]:
    """``{"store", "broker", "vehicle"}`` for the trial monitor; ``vehicle`` None = not required."""
    vehicle = None
    if _power(agent) is not None and agent.vehicle_state() == "on" \
            and getattr(agent, "obd", None) is not None:
        vehicle = _obd_connected(agent)
    return {"store": agent.store.problem is None, "broker": bool(agent.link.connected),
            "vehicle": vehicle}


def parked(agent: Any) -> bool | None:
    power = _power(agent)
    if power is None:
        return not _obd_connected(agent)
    state = power.state
    if state is None or str(state) == "unknown":
        return None
    return str(state) in PARKED_STATES


def supply_v(agent: Any) -> float | None:
    power = _power(agent)
    if power is None:
        return None
    v = power.status().get("supply_v")
    return None if v is None else float(v)


def mcu_link(agent: Any) -> Any:
    return getattr(_power(agent), "mcu", None)


def restart(agent: Any) -> None:
    """Clean stop, then exit 75: systemd starts the agent again from the ``current`` slot."""
    log.info("update: restarting the agent (exit status %d)", RESTART_EXIT_CODE)
    agent.request_exit(RESTART_EXIT_CODE)


def _not_configured(reason: str = NOT_CONFIGURED):
    def handle(opened: Any) -> Outcome:
        log.warning("update: release seq=%s rejected: %s", opened.seq, reason)
        return Outcome("rejected", reason=reason)
    return handle


def attach(agent: Any) -> Updater | None:
    """Builds the updater (or not) and registers it: ``agent.updater``, the ``release``
    downlink handler and the ``update`` component (status under ``update``)."""
    agent.updater = None
    try:
        us = update_settings(agent.settings)
        if us is None:
            agent.downlink.handlers["release"] = _not_configured()
            return None
        slots.prepare(us.layout())   # the install root must be writable: say so now, not later
        updater = Updater(us, emit_event=agent.emit_event,
                          parked=lambda: parked(agent), supply_v=lambda: supply_v(agent),
                          health=lambda: health(agent), restart=lambda: restart(agent),
                          mcu=lambda: mcu_link(agent), agent_version=agent.version)
    except (UpdateConfigError, OSError) as e:
        log.error("update: updates disabled: %s", e)
        agent.downlink.handlers["release"] = _not_configured(f"{NOT_CONFIGURED}: {e}"[:300])
        return None
    agent.updater = updater
    agent.downlink.handlers["release"] = updater.handle_release
    agent.add_component("update", updater)
    log.info("update: %s in %s (current %s)", "updates enabled", us.root,
             updater.layout.current_version() or "not a slot")
    return updater
