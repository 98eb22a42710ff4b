"""Commands from the cloud (``down/command``, PROTOCOL §4).

``ping`` → ``done``. ``report`` queues a ``health`` snapshot event → ``done``. ``clear_dtc`` is
never carried out on the cloud's word: it is recorded as pending and acked ``accepted``; a person
at the car confirms it (technician CLI or the dongle's button), and only then are codes cleared
and ``dtc_cleared`` sent. ``delete_data`` deletes what the device holds of the named categories →
``done`` with the counts (the WAL flush that makes the deletion final runs after the commit).
Unknown ops and unknown data categories never get here: the command schema rejects them (ack
``rejected``).

``read_dtc`` is slow (the OBD poller asks the car; up to :data:`READ_TIMEOUT_S`), so it never runs
inside the downlink's transaction: with a vehicle connected it is acked ``accepted`` at once and
recorded (meta :data:`META_READS`, committed with the ack); this component's own thread then asks
the poller and answers with an event — the ``dtc`` event read for it, carrying the command's
``ref_seq`` and ``request_id``, or, when the car did not answer, a ``health`` event of kind
``dtc_read`` (level ``warn``, ``detail``: ``ref_seq``, ``request_id``, ``reason``). The answer is
queued in the same transaction that removes the request, so each accepted read is answered
exactly once, also across a restart. Without a vehicle link the command is acked ``failed`` at
once; at most :data:`MAX_PENDING_READS` reads wait at a time (beyond: ``rejected``).
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from drivers.core.clock import Clock
from agent.cloud.downlink import Outcome
from agent.outbox.store import Store

log = logging.getLogger(__name__)

META_READS = "pending_read_dtc"
MAX_PENDING_READS = 8
READ_TIMEOUT_S = 10.0
NO_VEHICLE = "the vehicle did not answer (adapter disconnected or ignition off)"


class Commands:
    """The ``down/command`` handler, and the component that answers accepted ``read_dtc``s.

    ``read_dtc(timeout_s)`` is the OBD poller's ``read_dtcs_now`` (None without OBD);
    ``vehicle_connected()`` whether the poller has a vehicle now; ``flush_deleted()`` makes a
    ``delete_data`` deletion final (agent/owner/privacy.py ``flush_owed``)."""

    def __init__(self, store: Store, *, read_dtc: Callable[[float], dict | None] | None,
                 vehicle_connected: Callable[[], bool], snapshot: Callable[[], dict],
                 delete_data: Callable[[list[str]], dict[str, int]], flush_deleted: Callable[[], object],
                 wake_uplink: Callable[[], None] = lambda: None, clock: Clock | None = None,
                 read_timeout_s: float = READ_TIMEOUT_S):
        self.store = store
        self._clock = clock or store.clock
        self._read_dtc = read_dtc
        self._vehicle_connected = vehicle_connected
        self._snapshot = snapshot
        self._delete_data = delete_data
        self._flush_deleted = flush_deleted
        self._wake = wake_uplink
        self.read_timeout_s = read_timeout_s
        self._reads_due = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.reads = {"answered": 0, "failed": 0}

    # -- the handler (inside the downlink's transaction) -------------------------------------
    def handle(self, opened) -> Outcome:
        body = opened.body
        op = body["op"]
        result = {"request_id": body["request_id"]} if "request_id" in body else None
        if op == "ping":
            return Outcome("done", result=result)
        if op == "read_dtc":
            return self._accept_read(opened.seq, body.get("request_id"), result)
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
            return Outcome("done", result={**(result or {}), "deleted": counts}, after_commit=self._after_delete)
        return Outcome("rejected", reason=f"unknown op {op!r}")

    def _accept_read(self, seq: int, request_id: str | None, result: dict | None) -> Outcome:
        if self._read_dtc is None or not self._vehicle_connected():
            return Outcome("failed", reason=NO_VEHICLE)
        pending = list(self.store.get_meta(META_READS) or [])
        if len(pending) >= MAX_PENDING_READS:
            return Outcome("rejected", reason=f"{len(pending)} DTC reads are already waiting for the vehicle; "
                                              "ask again once they are answered")
        request = {"ref_seq": seq}
        if request_id is not None:
            request["request_id"] = request_id
        self.store.set_meta(META_READS, pending + [request])
        return Outcome("accepted", result=result, after_commit=self._reads_due.set)

    def _after_delete(self) -> None:
        self._flush_deleted()
        self._wake()

    # -- the component: answers accepted reads ------------------------------------------------
    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        if self.store.get_meta(META_READS):
            self._reads_due.set()   # accepted before a restart, not answered yet
        self._thread = threading.Thread(target=self._run, name="dtc-reads", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = READ_TIMEOUT_S + 5) -> None:
        self._stop.set()
        self._reads_due.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout)

    def apply_config(self, doc: dict) -> list[str]:
        return []

    def status(self) -> dict:
        return {"pending_reads": len(self.store.get_meta(META_READS) or []), **self.reads}

    def _run(self) -> None:
        while not self._stop.is_set():
            self._reads_due.wait(1.0)
            self._reads_due.clear()
            if self._stop.is_set():
                return
            try:
                self.answer_reads()
            except Exception:
                log.exception("commands: answering DTC reads failed; tried again")
                self._stop.wait(1.0)
                self._reads_due.set()

    def answer_reads(self) -> int:
        """Reads the codes once for every accepted read waiting, and answers each. Returns how
        many were answered."""
        waiting = self.store.get_meta(META_READS) or []
        if not waiting:
            return 0
        body = self._read_dtc(self.read_timeout_s) if self._read_dtc is not None else None
        taken = {r["ref_seq"] for r in waiting}
        with self.store.batch():
            current = self.store.get_meta(META_READS) or []
            answered = [r for r in current if r["ref_seq"] in taken]
            for request in answered:
                self.store.add_event(self._answer(body, request))
            self.store.set_meta(META_READS, [r for r in current if r["ref_seq"] not in taken])
        self.reads["answered" if body is not None else "failed"] += len(answered)
        log.info("commands: read_dtc %s answered: %s", [r["ref_seq"] for r in answered],
                 f"{len(body['codes'])} codes" if body is not None else "no answer from the vehicle")
        self._wake()
        return len(answered)

    def _answer(self, body: dict | None, request: dict) -> dict:
        if body is not None:
            return {**body, **request}
        return {"type": "health", "ts": self._clock.now_ms(), "kind": "dtc_read", "level": "warn",
                "detail": {**request, "reason": f"{NO_VEHICLE}, within {self.read_timeout_s:g} s"}}
