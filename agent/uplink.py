"""Moves data from the store to the broker: seal batches into the outbox, publish, delete on PUBACK.

One thread. Events are sealed as soon as they are queued (``wake()``) and go out ahead of
telemetry (outbox priority); telemetry is sealed every ``upload.interval_s`` of the active
config. At most ``max_inflight`` envelopes await their PUBACK at once. After every (re)connect,
whatever is still in the outbox is published again: the cloud dedups on ``(dev, seq)``, so a
duplicate costs a few bytes while a lost PUBACK would otherwise stall an envelope.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from agent import protocol
from agent.clock import now_ms
from agent.store import Store
from agent.telemetry import telemetry_body

log = logging.getLogger(__name__)


class Sealer:
    """Seals uplink bodies for one device: signed with its key, encrypted to the cloud."""

    def __init__(self, device_id: str, sign_key, cloud_enc_pub, *, clock: Callable[[], int] = now_ms):
        self.device_id = device_id
        self._sign_key = sign_key
        self._cloud_enc_pub = cloud_enc_pub
        self._clock = clock

    def seal(self, kind: str, body: dict, seq: int) -> bytes:
        return protocol.seal(kind, body, dev=self.device_id, seq=seq, signer=self._sign_key,
                             recipient=self._cloud_enc_pub, ts_ms=self._clock(),
                             max_size=protocol.MAX_UPLINK)


class Uplink:
    def __init__(self, store: Store, link, sealer: Sealer, *, interval_s: Callable[[], float],
                 batch_max_samples: int = 4000, batch_max_frames: int = 20000, max_inflight: int = 8,
                 heartbeat: Callable[[], None] | None = None):
        self.store = store
        # Contributors to each telemetry body (e.g. GNSS positions): called inside the sealing
        # transaction, so rows they take leave the store atomically with the envelope.
        self.body_extras: list[Callable[[], dict]] = []
        # Last look at every body before it is sealed (e.g. the privacy gate of PROTOCOL §6).
        self.body_filters: list[Callable[[dict], dict]] = []
        self.link = link
        self.sealer = sealer
        self._interval_s = interval_s
        self.batch_max_samples = batch_max_samples
        self.batch_max_frames = batch_max_frames
        self.max_inflight = max_inflight
        self._heartbeat = heartbeat or (lambda: None)
        self._inflight: set[int] = set()
        self._inflight_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.sent = 0
        self.acked = 0
        self.errors = 0
        self.last_error: str | None = None

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="uplink", daemon=True)
        self._thread.start()

    def stop(self, flush_timeout_s: float = 5.0) -> None:
        """Seals what is pending and gives the link up to ``flush_timeout_s`` to deliver it."""
        self._stop.set()
        self._wake.set()
        if self._thread:
            self._thread.join(timeout=10)
        try:
            self.seal_pending()
        except Exception:
            log.exception("uplink: sealing at stop failed; the data stays in the store")
        deadline = time.monotonic() + flush_timeout_s
        while time.monotonic() < deadline and self.store.counts()["outbox"] and self.link.connected:
            self.publish_pending()
            time.sleep(0.05)

    def wake(self) -> None:
        """Something urgent was queued (an event, an ack): seal and send now."""
        self._wake.set()

    def on_connection(self, up: bool) -> None:
        with self._inflight_lock:
            self._inflight.clear()
        if up:
            self._wake.set()

    # -- work -----------------------------------------------------------------------------
    def _run(self) -> None:
        next_telemetry = time.monotonic() + self._interval_s()
        while not self._stop.is_set():
            self._heartbeat()
            timeout = max(0.0, min(1.0, next_telemetry - time.monotonic()))
            self._wake.wait(timeout)
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                self.seal_events()
                if time.monotonic() >= next_telemetry:
                    next_telemetry = time.monotonic() + max(0.1, self._interval_s())
                    self.seal_telemetry()
                self.publish_pending()
            except Exception as e:  # the store or the link failed: report, keep the data, retry
                self.errors += 1
                self.last_error = f"{type(e).__name__}: {e}"
                log.exception("uplink: cycle failed; retrying")
                self._stop.wait(1.0)

    def seal_pending(self) -> None:
        self.seal_events()
        self.seal_telemetry()

    def seal_events(self) -> list[int]:
        return self.store.seal_events(lambda seq, body: self.sealer.seal("event", body, seq))

    def seal_telemetry(self) -> list[int]:
        """Seals all pending samples and frames, in batches that fit the 128 KiB uplink limit."""
        seqs = []
        max_s, max_f = self.batch_max_samples, self.batch_max_frames
        while True:
            try:
                seq = self.store.seal_telemetry(
                    lambda seq, samples, frames: self.sealer.seal(
                        "telemetry", self._finish_body(telemetry_body(samples, frames)), seq),
                    max_samples=max_s, max_frames=max_f)
            except protocol.EnvelopeTooLarge:
                if max_s <= 1 and max_f <= 1:
                    raise
                max_s, max_f = max(1, max_s // 2), max(1, max_f // 2)
                log.info("uplink: batch over the uplink limit, trying %d samples / %d frames", max_s, max_f)
                continue
            if seq is None:
                return seqs
            seqs.append(seq)

    def _finish_body(self, body: dict) -> dict:
        for extra in self.body_extras:
            body.update(extra())
        for f in self.body_filters:
            body = f(body)
        return body

    def publish_pending(self) -> int:
        if not self.link.connected:
            return 0
        with self._inflight_lock:
            room = self.max_inflight - len(self._inflight)
            exclude = set(self._inflight)
        if room <= 0:
            return 0
        n = 0
        for item in self.store.outbox_items(room, exclude=exclude):
            with self._inflight_lock:
                self._inflight.add(item.seq)
            if not self.link.publish(item.suffix, item.payload, on_ack=lambda s=item.seq: self._acked(s)):
                with self._inflight_lock:
                    self._inflight.discard(item.seq)
                break
            n += 1
            self.sent += 1
        return n

    def _acked(self, seq: int) -> None:
        # Called on the MQTT network thread: keep it short.
        try:
            self.store.outbox_ack(seq)
        except Exception:
            log.exception("uplink: could not delete acked seq %d; it will be sent again", seq)
        with self._inflight_lock:
            self._inflight.discard(seq)
        self.acked += 1
        self._wake.set()

    def status(self) -> dict:
        with self._inflight_lock:
            inflight = len(self._inflight)
        return {"sent": self.sent, "acked": self.acked, "inflight": inflight, "errors": self.errors,
                "last_error": self.last_error}
