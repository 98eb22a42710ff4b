"""Which vehicle the dongle is plugged into: the ``vehicle`` event (PROTOCOL §4).

The OBD poller reports every (re)identification (VIN, protocol, ECUs); :class:`VehicleIdentity`
sends a ``vehicle`` event when the dongle first sees a vehicle and whenever it changes, and tells
its listeners (the EV reader picks its profile by VIN). The last vehicle seen is identity data:
it is kept encrypted under the owner's data key (a wipe destroys that key first), and so is the
``vehicle`` event while it waits in the store to be sealed (agent/owner/datakey.py
``EventsAtRest``). Logs name a VIN by its manufacturer code (WMI) only.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from agent.owner import datakey as datakey_mod
from agent.owner.datakey import DataKey
from drivers.core.clock import Clock
from drivers.core.text import safe_text
from drivers.core.vin import validate as validate_vin

log = logging.getLogger(__name__)

META_KEY = "vehicle"


class VehicleIdentity:
    def __init__(self, store, datakey: DataKey, *, emit_event: Callable[[dict], None],
                 listeners: Sequence[Callable[[dict], None]] = (), clock: Clock | None = None):
        self._store = store
        self._datakey = datakey
        self._emit = emit_event
        self._listeners = list(listeners)
        self._clock = clock or Clock()

    def last(self) -> dict | None:
        """The last vehicle seen (``vin``, ``protocol``, ``profile``), or None."""
        return datakey_mod.get_secret_meta(self._store, self._datakey, META_KEY)

    def on_vehicle(self, info: dict) -> None:
        """The OBD poller's ``on_vehicle``: ``{"vin", "protocol", "ecus"}``."""
        for listener in self._listeners:
            try:
                listener(info)
            except Exception:
                log.exception("vehicle listener failed")
        vin = info.get("vin")
        valid, reason = validate_vin(vin)
        if vin and not valid:
            log.warning("vehicle: VIN %s… is not valid (%s); reported as such", safe_text(vin[:3], 12), reason)
        profile = self._store.get_meta("ev_profile")
        seen = {"vin": vin, "protocol": info.get("protocol") or "", "profile": profile}
        if self.last() == seen:
            return
        datakey_mod.put_secret_meta(self._store, self._datakey, META_KEY, seen)
        body = {"type": "vehicle", "ts": self._clock.now_ms(), "vin_valid": valid,
                "protocol": seen["protocol"], "ecus": list(info.get("ecus", []))}
        if vin:
            body["vin"] = vin
        if profile:
            body["profile"] = profile
        self._emit(body)
