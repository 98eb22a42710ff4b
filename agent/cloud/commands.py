"""Commands from the cloud (``down/command``, PROTOCOL §4).

``ping`` → ``done``. ``read_dtc`` reads the codes now and queues a ``dtc`` event → ``done``.
``report`` queues a ``health`` snapshot event → ``done``. ``clear_dtc`` is never carried out on
the cloud's word: it is recorded as pending and acked ``accepted``; a person at the car confirms
it (technician CLI or the dongle's button), and only then are codes cleared and ``dtc_cleared``
sent. ``delete_data`` deletes what the device holds of the named categories → ``done`` with the
counts. Unknown ops never get here: the command schema rejects them (ack ``rejected``).
"""
from __future__ import annotations

import logging
from collections.abc import Callable

from drivers.core.clock import Clock
from agent.cloud.downlink import Outcome
from agent.outbox.store import Store

log = logging.getLogger(__name__)


class Commands:
    def __init__(self, store: Store, *, read_dtc: Callable[[], dict | None],
                 snapshot: Callable[[], dict], delete_data: Callable[[list[str]], dict[str, int]],
                 wake_uplink: Callable[[], None] = lambda: None, clock: Clock | None = None):
        self.store = store
        self._clock = clock or store.clock
        self._read_dtc = read_dtc
        self._snapshot = snapshot
        self._delete_data = delete_data
        self._wake = wake_uplink

    def handle(self, opened) -> Outcome:
        body = opened.body
        op = body["op"]
        result = {"request_id": body["request_id"]} if "request_id" in body else None
        if op == "ping":
            return Outcome("done", result=result)
        if op == "read_dtc":
            event = self._read_dtc()
            if event is None:
                return Outcome("failed", reason="the vehicle did not answer (adapter disconnected or ignition off)")
            self.store.add_event(event)
            return Outcome("done", result={**(result or {}), "codes": len(event["codes"])},
                           after_commit=self._wake)
        if op == "report":
            self.store.add_event({"type": "health", "ts": self._clock.now_ms(), "kind": "snapshot", "level": "info",
                                  "detail": self._snapshot()})
            return Outcome("done", result=result, after_commit=self._wake)
        if op == "clear_dtc":
            self.store.set_meta("pending_clear_dtc", {"ref_seq": opened.seq, "requested_ms": self._clock.now_ms(),
                                                      "by": "cloud"})
            return Outcome("accepted", result=result)
        if op == "delete_data":
            counts = self._delete_data(list(body["categories"]))
            return Outcome("done", result={**(result or {}), "deleted": counts})
        return Outcome("rejected", reason=f"unknown op {op!r}")
