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
* Size: a telemetry envelope carries as many rows as fit the 128 KiB uplink limit (the batch
  is sized from the bytes per row of the envelopes sealed before), compressed with
  :data:`TELEMETRY_ZSTD` — bigger batches and a stronger zstd setting are what bring raw CAN
  frames from ~5.6 to ~4.4 bytes each (docs/performance.md).
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import zstandard

from agent.device import malloc
from agent.cloud import protocol, schemas
from drivers.core.clock import Clock
from agent.outbox.store import PRIO_TELEMETRY, Store
from agent.outbox.telemetry import FRAME_T, telemetry_body

log = logging.getLogger(__name__)

#: Upload interval when a config has none, as in config/default_config.json: telemetry waits up
#: to 5 minutes (events go at once), so its ~300 B of envelope are shared by ~1,200 samples
#: (1.2 B per sample at the default PIDs, against ~21 B when sealed every 5 s; docs/performance.md).
DEFAULT_INTERVAL_S = 300.0
#: zstd setting of telemetry bodies: the optimal parser with 3-byte matches (what zstd level 19
#: uses on large inputs) over a 256 KiB window. On the real RAV4 drive it gives the bytes of level
#: 19 (4.4 vs 5.5 per raw frame at level 3) at a fraction of its CPU and a small compression
#: context (bench/bench_store.py). A 64 K-entry match finder and a target length of 8 cost +0.1 %
#: bytes against 256 K entries and 32 (the setting until 2026-12) at ~25 % less CPU, the largest
#: single cost of ingest (docs/performance.md). Any receiver decodes it (no dictionary).
TELEMETRY_ZSTD = zstandard.ZstdCompressionParameters(
    window_log=18, chain_log=16, hash_log=16, search_log=1, min_match=3, target_length=8,
    strategy=zstandard.STRATEGY_BTULTRA2)
#: A telemetry batch aims at this fraction of the uplink limit (the rest absorbs the estimate's
#: error; an envelope that still comes out too large is re-sealed smaller).
FILL = 0.9
#: Frames sealed in one call from which the freed heap is handed back (agent.malloc.trim).
TRIM_AFTER_FRAMES = 5_000
#: Rows set aside in a row by narrowing a failing batch (the failure named no row, see
#: Uplink.seal_telemetry) before the failure is taken as the agent's own and the data is kept.
BLIND_QUARANTINE_MAX = 10
#: Fixed bytes of an envelope whatever it carries (header, HPKE key and tag, signature).
ENVELOPE_OVERHEAD = 260
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
    """Seals uplink bodies for one device: signed with its key, encrypted to the cloud.

    Telemetry bodies are valid by construction (agent.outbox.telemetry) and are not validated
    again: the JSON Schema walk would cost more than building, compressing and encrypting them.
    Every other kind is validated before it is sealed."""

    def __init__(self, device_id: str, sign_key, cloud_enc_pub, *, clock: Callable[[], int] | None = None,
                 telemetry_zstd: protocol.ZstdLevel = TELEMETRY_ZSTD):
        self.device_id = device_id
        self._sign_key = sign_key
        self._cloud_enc_pub = cloud_enc_pub
        self._clock = clock or Clock().now_ms
        self.telemetry_zstd = telemetry_zstd

    def seal(self, kind: str, body: dict, seq: int) -> bytes:
        telemetry = kind == "telemetry"
        return protocol.seal(kind, body, dev=self.device_id, seq=seq, signer=self._sign_key,
                             recipient=self._cloud_enc_pub, ts_ms=self._clock(),
                             max_size=protocol.MAX_UPLINK, check_schema=not telemetry,
                             zstd_level=self.telemetry_zstd if telemetry else protocol.DEFAULT_ZSTD_LEVEL)


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
                 batch_max_samples: int = 20_000, batch_max_frames: int = 40_000, max_inflight: int = 8,
                 offline_seal_age_s: float = 3600.0, frame_t: str = "t",
                 heartbeat: Callable[[], None] | None = None,
                 body_filters: Sequence[Callable[[dict], dict | None]] = (),
                 event_filters: Sequence[Callable[[dict], dict | None]] = ()):
        if frame_t not in FRAME_T:
            raise ValueError(f"frame_t must be 't' or 'dt', not {frame_t!r}")
        self.store = store
        #: Frame times sent as ``t`` or rev 1.1 ``dt`` (agent.outbox.telemetry; said in ``status``).
        self.frame_t = frame_t
        # In order, every telemetry body before it is sealed (GNSS positions added, then the
        # privacy gate of PROTOCOL §6, last): called inside the sealing transaction, so rows
        # they take leave the store atomically with the envelope.
        self.body_filters = list(body_filters)
        # Last look at every event before it is sealed; None drops it (the privacy gate).
        self.event_filters = list(event_filters)
        self.link = link
        self.sealer = sealer
        self._interval_s = interval_s
        self._config = config
        self._vehicle_state = vehicle_state
        # Caps; the batch actually sealed is what fits the uplink limit (_fit), below the cap.
        self.batch_max_samples = batch_max_samples
        self.batch_max_frames = batch_max_frames
        # Compressed bytes per row, learnt from every telemetry envelope sealed (start: guesses
        # on the safe side, so the first envelope is rarely re-sealed).
        self._bytes_per = {"samples": 4.0, "frames": 6.0}
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
        self._blind_quarantines = 0  # rows set aside in a row by narrowing, none sealed since
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
            # Each step on its own: a failure in one (the store, the link, one bad row) is
            # reported and retried next cycle, and never keeps the others from running.
            failed = not self._step("sealing events", self.seal_events)
            policy = self.policy()
            now = time.monotonic()
            # A shorter interval (the car woke up) applies at once, not after the old one.
            next_telemetry = min(next_telemetry, self._last_seal + policy.interval_s)
            if now >= next_telemetry:
                next_telemetry = now + policy.interval_s
                seal = self.seal_telemetry if self.link.connected else self.seal_offline
                failed |= not self._step("sealing telemetry", seal)
            failed |= not self._step("publishing", lambda: self.publish_pending(policy))
            if failed:
                self._stop.wait(1.0)

    def _step(self, what: str, fn: Callable[[], object]) -> bool:
        try:
            fn()
            return True
        except Exception as e:  # the store or the link failed: report, keep the data, retry
            self.errors += 1
            self.last_error = f"{what}: {type(e).__name__}: {e}"
            log.exception("uplink: %s failed; retrying", what)
            return False

    def _clock_ready(self) -> bool:
        """Sealing needs true timestamps: the clock synchronised and provisional rows re-timed."""
        clock = self.store.clock
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
        return self.store.seal_events(lambda seq, body: self.sealer.seal("event", body, seq),
                                      prepare=self._prepare_event)

    def _prepare_event(self, body: dict) -> dict | None:
        """The event filters (e.g. the privacy gate: None = must not leave), then the schema."""
        for f in self.event_filters:
            body = f(body)
            if body is None:
                return None
        schemas.validate("event", body)
        return body

    def seal_offline(self) -> list[int]:
        """Offline: seal only full batches (one kind each), or everything once it is old."""
        seqs: list[int] = []
        if time.monotonic() - self._last_seal >= self.offline_seal_age_s:
            return self.seal_telemetry()
        while self.store.pending_at_least("frames", self._fit("frames")):
            seqs += self.seal_telemetry(samples=False, full_only=True)
        while self.store.pending_at_least("samples", self._fit("samples")):
            seqs += self.seal_telemetry(frames=False, full_only=True)
        return seqs

    def _fit(self, table: str, room: float = FILL * protocol.MAX_UPLINK - ENVELOPE_OVERHEAD) -> int:
        """How many rows of ``table`` fill an envelope, from the bytes per row seen so far."""
        cap = self.batch_max_samples if table == "samples" else self.batch_max_frames
        return max(1, min(cap, int(room / self._bytes_per[table])))

    def _batch(self, samples: bool, frames: bool) -> tuple[int, int]:
        """(max samples, max frames) for the next envelope: pending samples first, frames in
        the room they leave."""
        room = FILL * protocol.MAX_UPLINK - ENVELOPE_OVERHEAD
        max_s = self._fit("samples", room) if samples else 0
        if not frames:
            return max_s, 0
        n_s = self.store.pending_count("samples", max_s) if max_s else 0
        left = room - n_s * self._bytes_per["samples"]
        return max_s, (self._fit("frames", left) if left > 0.1 * room or not n_s else 0)

    def _learn(self, n_samples: int, n_frames: int, size: int) -> None:
        """Updates the bytes-per-row estimates from one sealed envelope of ``size`` bytes."""
        body = max(1.0, size - ENVELOPE_OVERHEAD)
        if n_samples + n_frames < 200:  # small online envelopes say little about large ones
            return
        guess = n_samples * self._bytes_per["samples"] + n_frames * self._bytes_per["frames"]
        scale = body / guess
        for table, n in (("samples", n_samples), ("frames", n_frames)):
            if n:
                seen = self._bytes_per[table] * scale
                self._bytes_per[table] = 0.5 * self._bytes_per[table] + 0.5 * seen

    def seal_telemetry(self, *, samples: bool = True, frames: bool = True,
                       full_only: bool = False) -> list[int]:
        """Seals pending samples and frames, in batches that fit the 128 KiB uplink limit.

        ``full_only``: one batch only (the caller checked it is full). A batch that fails to
        seal for another reason than its size is halved until the failing row is alone, and that
        row is set aside (``Store.quarantine_oldest``): one bad row never holds up the rest.
        """
        if not self._clock_ready():
            return []
        seqs: list[int] = []
        sealed: list[tuple[int, int, int]] = []

        def build(seq: int, ss: list, ff) -> bytes:
            body = self._finish_body(telemetry_body(ss, ff, frame_t=self.frame_t))
            env = self.sealer.seal("telemetry", body, seq)
            sealed.append((len(ss), len(ff), len(env)))
            return env

        narrow: tuple[int, int] | None = None   # a failing batch being narrowed down
        while True:
            max_s, max_f = narrow or self._batch(samples, frames)
            try:
                seq = self.store.seal_telemetry(build, max_samples=max_s, max_frames=max_f)
            except protocol.EnvelopeTooLarge as e:
                if max_s <= 1 and max_f <= 1:
                    raise
                # The estimate was low: correct it, so the next batch is smaller, until it fits.
                factor = min(0.9, FILL * e.limit / e.size)
                for table in self._bytes_per:
                    self._bytes_per[table] /= factor
                log.info("uplink: batch of %d samples / %d frames over the uplink limit (%d bytes); "
                         "sealing fewer", max_s, max_f, e.size)
                continue
            except Exception as e:
                if max_s + max_f <= 1:
                    if self._blind_quarantines >= BLIND_QUARANTINE_MAX:
                        raise   # every row fails: a fault of the agent, not of the data; keep it all
                    self._blind_quarantines += 1
                    log.error("uplink: one %s cannot be sealed: %s: %s", "sample" if max_s else "frame",
                              type(e).__name__, e)
                    self.store.quarantine_oldest(samples=max_s, frames=max_f,
                                                 reason=f"sealing failed: {type(e).__name__}: {e}")
                    narrow = None
                    continue
                log.warning("uplink: a batch of %d samples / %d frames failed to seal (%s: %s); narrowing",
                            max_s, max_f, type(e).__name__, e)
                narrow = (max_s // 2, 0) if max_s > 1 else (max_s, 0) if max_s and max_f else (0, max_f // 2)
                continue
            if seq is None:
                break
            narrow = None
            self._blind_quarantines = 0
            self._learn(*sealed[-1])
            seqs.append(seq)
            self._last_seal = time.monotonic()
            if full_only:
                break
        if seqs and self.store.over_high_water() and self.store.enforce_budget():
            self.seal_events()
        if sum(n for _, n, _ in sealed) >= TRIM_AFTER_FRAMES:
            malloc.trim()  # a raw-frame batch leaves megabytes of freed heap behind
        return seqs

    def _finish_body(self, body: dict) -> dict:
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

    def apply_config(self, doc: dict) -> list[str]:
        return []

    def status(self) -> dict:
        with self._inflight_lock:
            inflight = len(self._inflight)
        policy = self.policy()
        return {"sent": self.sent, "acked": self.acked, "inflight": inflight, "errors": self.errors,
                "last_error": self.last_error, "sent_bytes": self.sent_bytes,
                "daily_bytes": self.store.daily_bytes(), "state": self.state(),
                "interval_s": policy.interval_s, "held_by": self.held_by}
