"""Downlink: every envelope from the cloud goes through the full §3 receiver check here.

* An envelope that fails before it is authenticated (size, CBOR shape, version, device, kind,
  signer, signature, recipient, HPKE) is logged with its reason and counted; it gets no ack —
  we never answer an unauthenticated sender.
* Every envelope that passes signature and HPKE is answered by exactly one ``ack``:
  ``duplicate`` for the seq already accepted, ``rejected`` with the reason for a replay, an
  expired one or a body that fails its schema, and the handler's outcome otherwise.
* The handler's durable effects, the new highest ``seq`` of the kind and the ack are written in
  one SQLite transaction, so a power cut either applies a message completely (and never again)
  or not at all (and the broker redelivers it). Effects on running components happen after the
  commit (``Outcome.after_commit``).
"""
from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from agent.cloud import protocol
from agent.outbox.store import PRIO_CONTROL, Store

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    status: str                      # applied | accepted | done | duplicate | rejected | failed
    reason: str | None = None
    result: dict | None = None
    config_version: int | None = None
    send_ack: bool = True            # False: the handler acks later itself (config probation)
    after_commit: Callable[[], None] | None = None
    extra: dict = field(default_factory=dict)


Handler = Callable[[protocol.Opened], Outcome]


def ack_body(ref_kind: str, ref_seq: int, status: str, *, reason: str | None = None,
             result: dict | None = None, config_version: int | None = None) -> dict:
    body: dict = {"ref_kind": ref_kind, "ref_seq": ref_seq, "status": status}
    if reason is not None:
        body["reason"] = reason[:500]
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
                 config_version: Callable[[], int] | None = None):
        self.store = store
        self._seal = seal
        self.device_id = device_id
        self._recipient_key = recipient_key
        self._trusted_signers = trusted_signers
        self.handlers = dict(handlers)
        self._on_ack = on_ack
        # While the clock is not synchronised, ``exp`` is still checked against the newest time
        # known to have passed (drivers/core/clock.py: a stale clock opens no replay window).
        self._now_ms = now_ms or store.clock.not_before_ms
        self._config_version = config_version
        self.unauthenticated: Counter[str] = Counter()   # reason -> count (no ack sent)
        self.acks: Counter[str] = Counter()              # ack status -> count

    def send_ack(self, ref_kind: str, ref_seq: int, status: str, **kw) -> int:
        if ref_kind == "config" and kw.get("config_version") is None and self._config_version:
            kw["config_version"] = self._config_version()  # which config the device kept
        body = ack_body(ref_kind, ref_seq, status, **kw)
        seq = self.store.enqueue(lambda seq: self._seal("ack", body, seq), "up/ack", PRIO_CONTROL)
        self.acks[status] += 1
        log.info("downlink: ack %s seq=%d: %s%s", ref_kind, ref_seq, status,
                 f" ({kw['reason']})" if kw.get("reason") else "")
        self._on_ack()
        return seq

    def _trusted_time(self, header: Mapping) -> None:
        """The cloud signed ``ts``: the true time is at least that (the clock's floor)."""
        ts = header.get("ts")
        if isinstance(ts, int) and self.store.clock.raise_floor(ts):
            self.store.note_true_time(ts)

    def handle(self, suffix: str, payload: bytes) -> None:
        """Processes one message from a downlink topic. Never raises."""
        try:
            self._handle(suffix, payload)
        except Exception:
            # A bug in a handler must not take the MQTT thread down; the message is not
            # recorded as accepted, so a redelivery gets another chance.
            log.exception("downlink: failed to process a message on %s", suffix)
            self.unauthenticated["internal_error"] += 1

    def _handle(self, suffix: str, payload: bytes) -> None:
        kind = protocol.TOPIC_KINDS.get(suffix)
        if kind not in protocol.DOWNLINK_KINDS:
            self.unauthenticated["unknown_topic"] += 1
            log.warning("downlink: message on unexpected topic %r ignored", suffix)
            return
        try:
            opened = protocol.open_envelope(
                payload, expected_dev=self.device_id, expected_kind=kind,
                trusted_signers=self._trusted_signers(), recipient_key=self._recipient_key,
                now_ms=self._now_ms(), last_seq=self.store.last_downlink_seq(kind))
        except protocol.Rejected as e:
            if not e.authenticated:
                self.unauthenticated[e.reason] += 1
                log.warning("downlink: %s envelope dropped, no ack: %s", kind, e)
                return
            self._trusted_time(e.header)
            status = "duplicate" if e.reason == protocol.DUPLICATE else "rejected"
            log.warning("downlink: %s seq=%s %s: %s", kind, e.header["seq"], status, e.detail)
            self.send_ack(kind, e.header["seq"], status,
                          reason=None if status == "duplicate" else f"{e.reason}: {e.detail}")
            return

        self._trusted_time(opened.header)
        handler = self.handlers.get(kind)
        seq = opened.seq
        try:
            with self.store.batch():
                if handler is None:
                    outcome = Outcome("rejected", reason=f"{kind} is not supported by this agent")
                else:
                    outcome = handler(opened)
                self.store.set_downlink_seq(kind, seq)
                if outcome.send_ack:
                    self.send_ack(kind, seq, outcome.status, reason=outcome.reason,
                                  result=outcome.result, config_version=outcome.config_version)
        except Exception as e:
            # The handler's writes were rolled back; the message is answered all the same, once.
            log.exception("downlink: %s seq=%d failed", kind, seq)
            with self.store.batch():
                self.store.set_downlink_seq(kind, seq)
                self.send_ack(kind, seq, "failed", reason=f"internal error: {type(e).__name__}")
            return
        if outcome.after_commit:
            outcome.after_commit()
