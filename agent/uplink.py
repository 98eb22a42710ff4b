"""Moves data from the store to the broker: seal batches into the outbox, publish, delete on PUBACK.

One thread; acquisition never waits for it (drivers only touch the ingest queue). Design and
configuration: docs/store.md.

* Events are sealed as soon as they are queued (``wake()``) and go out ahead of telemetry
  (outbox priority), whatever the rate cap or the daily budget.
* Telemetry is sealed every upload interval while online: ``upload.interval_s`` of the active
  config, or ``upload.by_state[<state>].interval_s`` for the vehicle's state (driving, parked,
  charging) when the config has it. Offline, only full batches are sealed (plus whatever is older
  than ``offline_seal_age_s``), so a long backlog sits in few, large, well-compressed envelopes.
* Publishing: at most ``max_inflight`` envelopes await their PUBACK; telemetry in the order of
  ``upload.drain`` (``oldest_first`` by default, or ``newest_first``), no faster than
  ``upload.rate_bps`` bytes/s, and not beyond ``upload.daily_budget_bytes`` per UTC day.
* After every (re)connect, whatever is still in the outbox is published again: the cloud dedups
  on ``(dev, seq)``, so a duplicate costs a few bytes while a lost PUBACK would otherwise stall an
  envelope.
* Nothing is sealed while the clock is not synchronised (stamps are still provisional); rows
  are re-timed first (agent.clock).
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from agent import protocol
from agent.clock import get_clock, now_ms
from agent.store import PRIO_TELEMETRY, Store
from agent.telemetry import telemetry_body, validate_telemetry

log = logging.getLogger(__name__)

DEFAULT_INTERVAL_S = 5.0
#: Vehicle states (agent.vehicle_state) → the ``upload.by_state`` key that applies.
STATE_KEYS = {"on": "driving", "driving": "driving", "parked": "parked", "settling": "parked",
              "sleeping": "parked", "charging": "charging"}


@dataclass(frozen=True)
class UploadPolicy:
    interval_s: float = DEFAULT_INTERVAL_S
    drain: str = "oldest_first"
    rate_bps: float | None = None
    daily_budget_bytes: int | None = None


def upload_policy(doc: dict | None, state: str | None = None) -> UploadPolicy:
    """The ``upload`` section of a cloud config, for the vehicle ``state`` (pure)."""
    up = (doc or {}).get("upload") or {}
    interval = float(up.get("interval_s", DEFAULT_INTERVAL_S))
    per_state = (up.get("by_state") or {}).get(STATE_KEYS.get(str(state or ""), ""), {})
    interval = float(per_state.get("interval_s", interval))
    rate = per_state.get("rate_bps", up.get("rate_bps"))
    budget = up.get("daily_budget_bytes")
    return UploadPolicy(interval_s=max(0.1, interval),
                        drain="newest_first" if up.get("drain") == "newest_first" else "oldest_first",
                        rate_bps=float(rate) if rate else None,
                        daily_budget_bytes=int(budget) if budget else None)


class Sealer:
    """Seals uplink bodies for one device: signed with its key, encrypted to the cloud."""

    def __init__(self, device_id: str, sign_key, cloud_enc_pub, *, clock: Callable[[], int] = now_ms):
        self.device_id = device_id
        self._sign_key = sign_key
        self._cloud_enc_pub = cloud_enc_pub
        self._clock = clock

    def seal(self, kind: str, body: dict, seq: int) -> bytes:
        # Telemetry bodies are large: validated column by column (same rules, linear time).
        fast = kind == "telemetry"
        if fast:
            validate_telemetry(body)
        return protocol.seal(kind, body, dev=self.device_id, seq=seq, signer=self._sign_key,
                             recipient=self._cloud_enc_pub, ts_ms=self._clock(),
                             max_size=protocol.MAX_UPLINK, check_schema=not fast)


class _TokenBucket:
    def __init__(self) -> None:
        self.tokens = 0.0
        self.last = time.monotonic()

    def refill(self, rate: float | None, burst: float) -> float:
        now = time.monotonic()
        if rate is None:
            self.tokens = burst
        else:
            self.tokens = min(burst, self.tokens + (now - self.last) * rate)
        self.last = now
        return self.tokens


class Uplink:
    def __init__(self, store: Store, link, sealer: Sealer, *,
                 interval_s: Callable[[], float] | None = None,
                 config: Callable[[], dict] | None = None,
                 vehicle_state: Callable[[], str] | None = None,
                 batch_max_samples: int = 4000, batch_max_frames: int = 20000, max_inflight: int = 8,
                 offline_seal_age_s: float = 600.0,
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
        self._config = config
        self._vehicle_state = vehicle_state
        self.batch_max_samples = batch_max_samples
        self.batch_max_frames = batch_max_frames
        self.max_inflight = max_inflight
        self.offline_seal_age_s = offline_seal_age_s
        self._heartbeat = heartbeat or (lambda: None)
        self._inflight: dict[int, int] = {}  # seq -> payload bytes
        self._inflight_lock = threading.Lock()
        self._bucket = _TokenBucket()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_seal = time.monotonic()
        self.sent = 0
        self.acked = 0
        self.sent_bytes = 0
        self.errors = 0
        self.held_by: str | None = None  # why telemetry is not being sent right now
        self.last_error: str | None = None

    # -- policy ---------------------------------------------------------------------------
    def state(self) -> str | None:
        if self._vehicle_state is None:
            return None
        try:
            return str(self._vehicle_state())
        except Exception:
            log.exception("uplink: vehicle_state failed")
            return None

    def policy(self) -> UploadPolicy:
        if self._config is not None:
            return upload_policy(self._config(), self.state())
        base = UploadPolicy()
        if self._interval_s is not None:
            return UploadPolicy(interval_s=max(0.1, float(self._interval_s())))
        return base

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
        next_telemetry = time.monotonic() + self.policy().interval_s
        while not self._stop.is_set():
            self._heartbeat()
            timeout = max(0.0, min(1.0, next_telemetry - time.monotonic()))
            self._wake.wait(timeout)
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                self.seal_events()
                policy = self.policy()
                now = time.monotonic()
                # A shorter interval (the car woke up) applies at once, not after the old one.
                next_telemetry = min(next_telemetry, self._last_seal + policy.interval_s)
                if now >= next_telemetry:
                    next_telemetry = now + policy.interval_s
                    if self.link.connected:
                        self.seal_telemetry()
                    else:
                        self.seal_offline()
                self.publish_pending(policy)
            except Exception as e:  # the store or the link failed: report, keep the data, retry
                self.errors += 1
                self.last_error = f"{type(e).__name__}: {e}"
                log.exception("uplink: cycle failed; retrying")
                self._stop.wait(1.0)

    def _clock_ready(self) -> bool:
        """Sealing needs true timestamps: the clock synchronised and provisional rows re-timed."""
        clock = get_clock()
        if not clock.is_synced():
            return False
        if self.store.has_provisional():
            self.store.fix_times(clock)
        return True

    def seal_pending(self) -> None:
        self.seal_events()
        self.seal_telemetry()

    def seal_events(self) -> list[int]:
        if not self._clock_ready():
            return []
        return self.store.seal_events(lambda seq, body: self.sealer.seal("event", body, seq))

    def seal_offline(self) -> list[int]:
        """Offline: seal only full batches (one kind each), or everything once it is old."""
        seqs: list[int] = []
        if time.monotonic() - self._last_seal >= self.offline_seal_age_s:
            return self.seal_telemetry()
        while self.store.pending_at_least("frames", self.batch_max_frames):
            seqs += self.seal_telemetry(samples=False, full_only=True)
        while self.store.pending_at_least("samples", self.batch_max_samples):
            seqs += self.seal_telemetry(frames=False, full_only=True)
        return seqs

    def seal_telemetry(self, *, samples: bool = True, frames: bool = True,
                       full_only: bool = False) -> list[int]:
        """Seals pending samples and frames, in batches that fit the 128 KiB uplink limit.

        ``full_only``: one batch only (the caller checked it is full).
        """
        if not self._clock_ready():
            return []
        seqs: list[int] = []
        max_s = self.batch_max_samples if samples else 0
        max_f = self.batch_max_frames if frames else 0
        while True:
            try:
                seq = self.store.seal_telemetry(
                    lambda seq, ss, ff: self.sealer.seal(
                        "telemetry", self._finish_body(telemetry_body(ss, ff)), seq),
                    max_samples=max_s, max_frames=max_f)
            except protocol.EnvelopeTooLarge:
                if max_s <= 1 and max_f <= 1:
                    raise
                max_s, max_f = max_s // 2 if max_s > 1 else max_s, max_f // 2 if max_f > 1 else max_f
                log.info("uplink: batch over the uplink limit, trying %d samples / %d frames", max_s, max_f)
                continue
            if seq is None:
                break
            seqs.append(seq)
            self._last_seal = time.monotonic()
            if full_only:
                break
        if seqs and self.store.over_high_water() and self.store.enforce_budget():
            self.seal_events()
        return seqs

    def _finish_body(self, body: dict) -> dict:
        for extra in self.body_extras:
            body.update(extra())
        for f in self.body_filters:
            body = f(body)
        return body

    def publish_pending(self, policy: UploadPolicy | None = None) -> int:
        if not self.link.connected:
            return 0
        policy = policy or self.policy()
        with self._inflight_lock:
            room = self.max_inflight - len(self._inflight)
            exclude = set(self._inflight)
            inflight_bytes = sum(self._inflight.values())
        if room <= 0:
            return 0
        tokens = self._bucket.refill(policy.rate_bps, max(policy.rate_bps or 0, protocol.MAX_UPLINK))
        n = 0
        self.held_by = None
        for item in self.store.outbox_items(room, exclude=exclude,
                                            newest_first=policy.drain == "newest_first"):
            size = len(item.payload)
            if item.priority >= PRIO_TELEMETRY:
                if (policy.daily_budget_bytes is not None
                        and self.store.daily_bytes() + inflight_bytes + size > policy.daily_budget_bytes):
                    self.held_by = "daily_budget"
                    break
                if policy.rate_bps is not None and tokens < size:
                    self.held_by = "rate_cap"
                    break
            with self._inflight_lock:
                self._inflight[item.seq] = size
            if not self.link.publish(item.suffix, item.payload, on_ack=lambda s=item.seq: self._acked(s)):
                with self._inflight_lock:
                    self._inflight.pop(item.seq, None)
                break
            tokens = self._bucket.tokens = self._bucket.tokens - size
            inflight_bytes += size
            n += 1
            self.sent += 1
            self.sent_bytes += size
        return n

    def _acked(self, seq: int) -> None:
        # Called on the MQTT network thread: keep it short.
        try:
            self.store.outbox_ack(seq)
        except Exception:
            log.exception("uplink: could not delete acked seq %d; it will be sent again", seq)
        with self._inflight_lock:
            self._inflight.pop(seq, None)
        self.acked += 1
        self._wake.set()

    def status(self) -> dict:
        with self._inflight_lock:
            inflight = len(self._inflight)
        policy = self.policy()
        return {"sent": self.sent, "acked": self.acked, "inflight": inflight, "errors": self.errors,
                "last_error": self.last_error, "sent_bytes": self.sent_bytes,
                "daily_bytes": self.store.daily_bytes(), "state": self.state(),
                "interval_s": policy.interval_s, "held_by": self.held_by}
