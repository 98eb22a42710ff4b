"""Downlink: every envelope from the cloud goes through the full §3 receiver check here.

* An envelope that fails before it is authenticated (size, CBOR shape, version, device, kind,
  signer, signature, recipient, HPKE) is logged with its reason and counted; it gets no ack —
  we never answer an unauthenticated sender.
* Every envelope that passes signature and HPKE is answered by exactly one ``ack``:
  ``duplicate`` for the seq already accepted, ``rejected`` with the reason for a replay, an
  expired one or a body that fails its schema, and the handler's outcome otherwise. A reason is
  at most :data:`MAX_REASON` characters with control characters escaped
  (:func:`drivers.core.text.safe_text`), in the ack and in the log alike.

Threads. paho's network thread only queues a message (:meth:`Downlink.submit`, bounded by
:data:`QUEUE_MAX`; beyond it the message is dropped, logged and counted in ``status()``
``overflow``). The downlink worker thread takes them in arrival order and, for each, in **one**
SQLite transaction: opens and checks the envelope against the stored highest ``seq`` of its
kind, runs the handler (durable writes only: it must be quick and wait for no other thread),
stores the new ``seq`` and queues the ack. Effects on running components — a config applied to
the collectors, a DTC read, the WAL flush after a deletion — run after the commit
(``Outcome.after_commit``), outside the store's lock.

Exactly once. The MQTT link acknowledges a QoS 1 message to the broker (PUBACK) only when the
worker has committed it (agent/cloud/mqtt.py, paho's manual acks), and only in the session that
delivered it. So:

* the agent dies with a message queued, or while its transaction is open: nothing was committed
  and no PUBACK was sent; the broker delivers the message again when the device reconnects (a
  persistent session, PROTOCOL §2) and it is processed then, once;
* the agent dies between the commit and the PUBACK: the redelivery finds its ``seq`` stored and
  is answered ``duplicate``, with no second effect;
* the agent dies after the commit, before the ``after_commit`` effects ran: those are rebuilt
  from the committed state at the next start (the components are built from the stored config,
  an owed config ack or WAL flush is recorded durably and done then; agent/cloud/config_apply.py,
  agent/owner/privacy.py);
* a message dropped at the queue bound, or while the agent stops, is not PUBACKed either and
  comes back in the next session. The link announces a Receive Maximum of :data:`QUEUE_MAX` (MQTT
  5), so a conforming broker never has more QoS 1 messages unacknowledged than the queue holds:
  only QoS 0 messages, which have no redelivery, can overflow it.

A store that cannot commit (disk full, locked by another writer) leaves the message unprocessed
and un-PUBACKed; the worker tries again :data:`STORAGE_ATTEMPTS` times with a growing pause and
then leaves it to the broker's redelivery.
"""
from __future__ import annotations

import logging
import queue
import sqlite3
import threading
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from agent.cloud import protocol
from agent.outbox.store import PRIO_CONTROL, Store
from drivers.core.text import safe_text

log = logging.getLogger(__name__)

#: Messages waiting for the worker; also the MQTT 5 Receive Maximum the link announces.
QUEUE_MAX = 64
#: Longest ack reason (escaped).
MAX_REASON = 500
#: Tries to commit a message while the store refuses, before leaving it to the broker.
STORAGE_ATTEMPTS = 5
STORAGE_PAUSE_S = 0.5
#: What "the store could not commit" looks like (locked, full, I/O): tried again, never acked
#: ``failed``. Other errors of a handler are its bugs: acked ``failed``.
STORE_REFUSED = (sqlite3.OperationalError, OSError)


@dataclass
class Outcome:
    """A handler's decision. Handlers run inside the worker's transaction: their writes commit
    with the ``seq`` and the ack. ``after_commit`` runs once that transaction has committed, on
    the worker thread, outside the store's lock: effects on running components go there."""

    status: str                      # applied | accepted | done | duplicate | rejected | failed
    reason: str | None = None
    result: dict | None = None
    config_version: int | None = None
    send_ack: bool = True            # False: the handler acks later itself (config, probation)
    after_commit: Callable[[], None] | None = None
    extra: dict = field(default_factory=dict)


Handler = Callable[[protocol.Opened], Outcome]


def ack_body(ref_kind: str, ref_seq: int, status: str, *, reason: str | None = None,
             result: dict | None = None, config_version: int | None = None) -> dict:
    body: dict = {"ref_kind": ref_kind, "ref_seq": ref_seq, "status": status}
    if reason is not None:
        body["reason"] = safe_text(reason, MAX_REASON - 1)
    if config_version is not None:
        body["config_version"] = config_version
    if result is not None:
        body["result"] = result
    return body


class Downlink:
    def __init__(self, store: Store, seal: Callable[[str, dict, int], bytes], *, device_id: str,
                 recipient_key, trusted_signers: Callable[[], Mapping],
                 handlers: Mapping[str, Handler], on_ack: Callable[[], None] = lambda: None,
                 now_ms: Callable[[], int | None] | None = None,
                 config_version: Callable[[], int] | None = None, queue_max: int = QUEUE_MAX):
        self.store = store
        self._seal = seal
        self.device_id = device_id
        self._recipient_key = recipient_key
        self._trusted_signers = trusted_signers
        self.handlers = dict(handlers)
        self._on_ack = on_ack
        self._now_ms = now_ms or store.clock.synced_now_ms
        self._config_version = config_version
        self.unauthenticated: Counter[str] = Counter()   # reason -> count (no ack sent)
        self.acks: Counter[str] = Counter()              # ack status -> count
        self._queue: queue.Queue[tuple[str, bytes, Callable[[], None]]] = queue.Queue(queue_max)
        self.overflow = 0          # messages dropped at the queue bound (QoS 1 ones come back)
        self.storage_failures = 0  # attempts the store could not commit
        self.deferred = 0          # messages left to the broker's redelivery after those
        self.processed = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the network thread's side ----------------------------------------------------------
    def submit(self, suffix: str, payload: bytes, ack: Callable[[], None]) -> bool:
        """Queues one message from a downlink topic for the worker; ``ack()`` is called once it
        is committed (the link's PUBACK). Never blocks: False when the queue is full."""
        try:
            self._queue.put_nowait((suffix, payload, ack))
        except queue.Full:
            self.overflow += 1
            if self.overflow == 1 or self.overflow % 100 == 0:
                log.error("downlink: queue full (%d); message on %s dropped (%d so far; QoS 1 "
                          "messages are redelivered by the broker in the next session)",
                          self._queue.maxsize, safe_text(suffix, 64), self.overflow)
            return False
        log.debug("downlink: queued %s (%d bytes)", safe_text(suffix, 64), len(payload))
        return True

    # -- the worker ---------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="downlink", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 15.0) -> None:
        """Ends the worker after the message in hand; queued ones are left un-acknowledged (the
        broker redelivers them in the next session)."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
            if thread.is_alive():
                log.error("downlink: worker did not stop within %.0f s", timeout)

    def apply_config(self, doc: dict) -> list[str]:
        return []

    def status(self) -> dict:
        return {"queued": self._queue.qsize(), "overflow": self.overflow, "processed": self.processed,
                "storage_failures": self.storage_failures, "deferred": self.deferred,
                "unauthenticated": dict(self.unauthenticated), "acks": dict(self.acks),
                "running": self._thread is not None and self._thread.is_alive()}

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                suffix, payload, ack = self._queue.get(timeout=0.5)
            except queue.Empty:
                continue
            for attempt in range(STORAGE_ATTEMPTS):
                if self.handle(suffix, payload):
                    ack()
                    break
                if self._stop.wait(STORAGE_PAUSE_S * 2 ** attempt):
                    return
            else:
                self.deferred += 1
                log.error("downlink: message on %s not processed after %d attempts; the broker "
                          "redelivers it in the next session", safe_text(suffix, 64), STORAGE_ATTEMPTS)

    # -- processing one message -------------------------------------------------------------
    def send_ack(self, ref_kind: str, ref_seq: int, status: str, **kw) -> int:
        """Queues an ack (inside the caller's transaction, if one is open)."""
        if ref_kind == "config" and kw.get("config_version") is None and self._config_version:
            kw["config_version"] = self._config_version()  # which config the device kept
        body = ack_body(ref_kind, ref_seq, status, **kw)
        seq = self.store.enqueue(lambda seq: self._seal("ack", body, seq), "up/ack", PRIO_CONTROL)
        self.acks[status] += 1
        log.info("downlink: ack %s seq=%d: %s%s", ref_kind, ref_seq, status,
                 f" ({body['reason']})" if "reason" in body else "")
        self._on_ack()
        return seq

    def handle(self, suffix: str, payload: bytes) -> bool:
        """Processes one message from a downlink topic, synchronously (the worker calls it).
        Returns True once the message is settled (committed, or dropped for good: not
        authenticated, an unknown topic); False when the store could not commit — nothing
        changed, try again. Never raises."""
        try:
            self._handle(suffix, payload)
        except STORE_REFUSED as e:
            self.storage_failures += 1
            log.error("downlink: message on %s not committed, the store refused: %s",
                      safe_text(suffix, 64), e)
            return False
        except Exception:
            # A bug outside a handler must not stop the worker; the message is not recorded as
            # accepted, so a redelivery gets another chance.
            log.exception("downlink: failed to process a message on %s", safe_text(suffix, 64))
            self.unauthenticated["internal_error"] += 1
        self.processed += 1
        return True

    def _handle(self, suffix: str, payload: bytes) -> None:
        kind = protocol.TOPIC_KINDS.get(suffix)
        if kind not in protocol.DOWNLINK_KINDS:
            self.unauthenticated["unknown_topic"] += 1
            log.warning("downlink: message on unexpected topic %s ignored", safe_text(suffix, 64))
            return
        opened = None
        outcome: Outcome | None = None
        try:
            with self.store.batch():
                try:
                    opened = protocol.open_envelope(
                        payload, expected_dev=self.device_id, expected_kind=kind,
                        trusted_signers=self._trusted_signers(), recipient_key=self._recipient_key,
                        now_ms=self._now_ms(), last_seq=self.store.last_downlink_seq(kind))
                except protocol.Rejected as e:
                    self._refuse(kind, e)
                    return
                handler = self.handlers.get(kind)
                if handler is None:
                    outcome = Outcome("rejected", reason=f"{kind} is not supported by this agent")
                else:
                    outcome = handler(opened)
                self.store.set_downlink_seq(kind, opened.seq)
                if outcome.send_ack:
                    self.send_ack(kind, opened.seq, outcome.status, reason=outcome.reason,
                                  result=outcome.result, config_version=outcome.config_version)
        except STORE_REFUSED:
            raise     # nothing committed: the worker tries again
        except Exception as e:
            if opened is None:
                raise
            # The handler's writes were rolled back; the message is answered all the same, once.
            log.exception("downlink: %s seq=%d failed", kind, opened.seq)
            with self.store.batch():
                self.store.set_downlink_seq(kind, opened.seq)
                self.send_ack(kind, opened.seq, "failed", reason=f"internal error: {type(e).__name__}")
            return
        if outcome is not None and outcome.after_commit:
            try:
                outcome.after_commit()
            except Exception:
                log.exception("downlink: %s seq=%d: effect after the commit failed", kind, opened.seq)

    def _refuse(self, kind: str, e: protocol.Rejected) -> None:
        """An envelope refused by the §3 checks: no ack unless it was authenticated."""
        if not e.authenticated:
            self.unauthenticated[e.reason] += 1
            log.warning("downlink: %s envelope dropped, no ack: %s", kind, safe_text(e, MAX_REASON))
            return
        status = "duplicate" if e.reason == protocol.DUPLICATE else "rejected"
        log.warning("downlink: %s seq=%s %s: %s", kind, e.header["seq"], status, safe_text(e.detail, MAX_REASON))
        self.send_ack(kind, e.header["seq"], status,
                      reason=None if status == "duplicate" else f"{e.reason}: {e.detail}")
