"""The owner's data in the running agent: consent, location, ``delete_data`` and ``wipe``.

The composition root (agent/compose.py) builds the data key (:mod:`agent.owner.datakey`), the
consent engine (:mod:`agent.owner.privacy`) and location collection
(:mod:`agent.owner.location`), puts positions into telemetry bodies and the privacy gate last in
front of the uplink, and hands them to :class:`OwnerData`, the component that also serves the
control-socket requests ``privacy`` and ``wipe``.

``dongle wipe`` (a new owner, a returned dongle; agent/cli/owner.py): confirmed at the terminal
(type the device id) and by a short press on the dongle's button. The running agent then sends
``device_wiped`` (waiting up to :data:`WIPED_ACK_S` for the broker's acknowledgement when
online), stops collecting, destroys the data key — first, so every encrypted VIN and position,
wherever flash wear levelling left a copy, is unreadable — and the device's private keys and
certificate, and stops. The CLI then clears the stopped agent's data directory
(:func:`agent.owner.erase.wipe_data_dir`). Without keys the agent cannot start, and without its
TLS key the broker cannot be reached, until ``dongle provision`` runs again.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import cbor2

from agent.owner import location as location_mod
from agent.owner import privacy as privacy_mod
from agent.owner.datakey import DataKey
from agent.owner.erase import shred
from drivers.core.clock import Clock

log = logging.getLogger(__name__)

WIPED_ACK_S = 15.0
BUTTON_TIMEOUT_S = 60.0


class OwnerData:
    """The agent's component for the owner's data (see the module docstring): consent
    (``privacy``), location collection (``location``), ``delete_data`` and the ``wipe`` request.

    ``confirm_by_button(timeout_s)`` waits for a short press on the dongle's button (None: the
    dongle has none, so a wipe is refused); ``outbox_events()`` counts events not yet
    acknowledged by the broker; ``key_files`` are the device's keys a wipe destroys."""

    def __init__(self, privacy: privacy_mod.Privacy, location: location_mod.Location, datakey: DataKey, *,
                 clock: Clock, emit_event: Callable[[dict], None], outbox_events: Callable[[], int],
                 link_connected: Callable[[], bool], wake_uplink: Callable[[], None],
                 confirm_by_button: Callable[[float], bool] | None, key_files: list[Path],
                 request_shutdown: Callable[[], None] | None = None):
        self.privacy = privacy
        self.location = location
        self.datakey = datakey
        self._clock = clock
        self._emit_event = emit_event
        self._outbox_events = outbox_events
        self._link_connected = link_connected
        self._wake_uplink = wake_uplink
        self.confirm_by_button = confirm_by_button
        self._key_files = key_files
        # How the wiped agent ends itself: SIGTERM to the daemon (tests replace it).
        self.request_shutdown: Callable[[], None] = request_shutdown or (lambda: os.kill(os.getpid(), signal.SIGTERM))
        self.wiped = False

    # -- component --------------------------------------------------------------------------
    def start(self) -> None:
        self.privacy.start()
        self.location.start()

    def stop(self) -> None:
        self.location.stop()
        self.privacy.stop()

    def status(self) -> dict:
        return {"privacy": self.privacy.status(), "location": self.location.status(), "wiped": self.wiped}

    def apply_config(self, doc: dict) -> list[str]:
        return self.privacy.apply_config(doc)

    def handlers(self) -> dict:
        """Its control-socket requests (served by agent/technician/control.py)."""
        return {"privacy": self.privacy.control_handler, "wipe": self.wipe_request}

    def delete_data(self, categories: list[str]) -> dict[str, int]:
        return self.privacy.delete_data(categories)

    def location_active(self) -> bool:
        return self.location.location_active()

    # -- wipe (control request "wipe") ------------------------------------------------------
    def wipe_request(self, request: dict, peer=None, reply: Callable[[dict], None] | None = None) -> dict:
        from agent.technician.control import ControlError

        reply = reply or (lambda m: None)
        if not request.get("confirmed"):
            raise ControlError("refused", "wipe: not confirmed at the terminal")
        confirm = self.confirm_by_button
        if confirm is None:
            raise ControlError("refused", "wipe: this dongle has no button to confirm with; nothing was wiped")
        reply({"prompt": f"Press the dongle's button within {BUTTON_TIMEOUT_S:.0f} s to confirm the wipe."})
        if not confirm(BUTTON_TIMEOUT_S):
            raise ControlError("refused", "wipe: the button was not pressed; nothing was wiped")
        by = str(request.get("by") or "owner at the car (terminal and button)")[:200]
        reply({"progress": "confirmed; telling the cloud (device_wiped)"})
        sent = self.send_wiped(by)
        reply({"progress": "destroying the data key and the device's keys"})
        destroyed = self.destroy_keys()
        self.wiped = True
        log.warning("wipe: confirmed by %s; device_wiped %s; keys destroyed; the agent stops", by,
                    "acknowledged" if sent else "not acknowledged (offline)")
        threading.Timer(0.5, self.request_shutdown).start()
        return {"device_wiped_sent": sent, "destroyed": destroyed, "stopping": True}

    def send_wiped(self, by: str, timeout_s: float = WIPED_ACK_S) -> bool:
        """Queues ``device_wiped`` and waits (while connected) for the broker's PUBACK."""
        self._emit_event({"type": "device_wiped", "ts": self._clock.now_ms(), "by": by})
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._outbox_events() == 0:
                return True
            if not self._link_connected() and time.monotonic() > deadline - timeout_s + 3:
                return False
            self._wake_uplink()
            time.sleep(0.1)
        return False

    def destroy_keys(self) -> list[str]:
        """Stops collection, destroys the data key (first), then the device's key files."""
        self.location.on_stopped()
        destroyed = [str(self.datakey.path)] if self.datakey.destroy() else []
        for path in self._key_files:
            if shred(path):
                destroyed.append(str(path))
        return destroyed


class BehaviourRows:
    """The ``driving_behaviour`` category's handler: the harsh-driving ``health`` events
    (agent/health/driving.py) not yet sealed, in the store's ``events`` table and its in-memory
    overflow, and the detector's episode in progress. The detector itself asks
    :meth:`agent.privacy.Privacy.allowed` before it analyses anything."""

    def __init__(self, store, detector):
        self._store = store
        self._detector = detector   # agent/health/driving.py HarshEventDetector

    def _is_behaviour(self, body: dict) -> bool:
        return body.get("type") == "health" and body.get("kind") in privacy_mod.BEHAVIOUR_EVENT_KINDS

    def on_collecting(self, mode: str) -> None:
        pass

    def on_stopped(self) -> None:
        self._detector.reset()

    def _purge(self, older_than: int | None = None) -> int:
        store = self._store
        n = 0
        with store.batch() as c:
            rows = c.execute("SELECT id, ts, body FROM events").fetchall()
            doomed = [rid for rid, ts, body in rows if (older_than is None or ts < older_than)
                      and self._is_behaviour(cbor2.loads(body))]
            c.executemany("DELETE FROM events WHERE id=?", [(rid,) for rid in doomed])
            n += len(doomed)
        memory = getattr(store, "_memory_events", None)   # events waiting for a full disk to clear
        if memory:
            keep = [b for b in memory if not (self._is_behaviour(b) and (older_than is None
                                                                          or b.get("ts", 0) < older_than))]
            n += len(memory) - len(keep)
            memory.clear()
            memory.extend(keep)
        return n

    def purge_unsent(self) -> int:
        return self._purge()

    def purge_all(self) -> int:
        return self._purge()

    def purge_older(self, cutoff_ms: int) -> int:
        return self._purge(cutoff_ms)
