"""Group commit: drivers hand samples and frames here; one writer thread stores them in batches.

Drivers never wait on SQLite: ``put_samples``/``put_frames`` only append to a bounded queue.
The writer commits whatever has arrived every ``window_s`` (default 0.25 s) in one transaction
(``synchronous=FULL``, WAL): a sample is durable at most ``window_s`` plus one commit after it
reached ``put_samples`` (docs/store.md, "Durability window"). When the queue is full — the
disk stalls or the drivers outrun it — new items are dropped and counted, never blocking
acquisition; the count is recorded as a ``buffer_evicted`` event once the disk takes writes.

Storage failures (full disk, read-only filesystem): what could not be written stays in memory,
up to ``max_held_samples`` / ``max_held_frames`` (raw frames are dropped first, then the oldest
samples), and is written as soon as the disk accepts it; a full database first evicts old
telemetry under the disk budget and retries.

Time: samples stamped before the clock was synchronised (agent.clock) are re-timed here once the
offset is known — in memory before they are written, in the store for rows already written.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence

from drivers.core.clock import PLAUSIBLE_AFTER_MS, PLAUSIBLE_AFTER_US
from drivers.core.model import Frame, FrameBatch, Sample
from agent.outbox.store import STORAGE_ERRORS, Store, storage_problem

log = logging.getLogger(__name__)

LAST_TRUE_EVERY_S = 30.0


class Ingest:
    def __init__(self, store: Store, *, window_s: float = 0.25, max_queued: int = 2000,
                 max_held_samples: int = 200_000, max_held_frames: int = 100_000,
                 heartbeat=lambda: None, on_event: Callable[[], None] | None = None,
                 sample_listeners: Sequence[Callable[[list[Sample]], None]] = ()):
        self.store = store
        # fn(list[Sample]) on every batch, on the driver's thread: must only queue (health rules).
        self.sample_listeners = list(sample_listeners)
        self._heartbeat = heartbeat
        self._on_event = on_event or (lambda: None)  # an eviction event was queued: wake uplink
        self.window_s = window_s
        self.max_held_samples = max_held_samples
        self.max_held_frames = max_held_frames
        self._q: queue.Queue[tuple[str, list]] = queue.Queue(maxsize=max_queued)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._flush_lock = threading.Lock()
        self._held_samples: list[Sample] = []
        self._held_frames: list[FrameBatch] = []
        self._unrecorded = {"samples": 0, "frames": 0}  # dropped, not yet told to the cloud
        self._last_true_saved = 0.0
        self.stored = {"samples": 0, "frames": 0}
        self.dropped = {"samples": 0, "frames": 0}
        self.errors = 0
        self.last_error: str | None = None
        self.problem: str | None = None
        self.last_commit = time.monotonic()

    def put_samples(self, samples: list[Sample]) -> None:
        self._put("samples", samples)
        for listener in self.sample_listeners:
            try:
                listener(samples)
            except Exception:
                log.exception("ingest: sample listener failed")

    def put_frames(self, frames: FrameBatch | list[Frame]) -> None:
        """Raw frames: a reader's batch as it is (the ingest takes it over), or Frame objects."""
        if isinstance(frames, FrameBatch):
            self._put("frames", [frames], len(frames))
        else:
            self._put("frames", FrameBatch.of(frames), len(frames))

    def _put(self, kind: str, items: list, n: int | None = None) -> None:
        if not items:
            return
        try:
            self._q.put_nowait((kind, list(items) if n is None else items))
        except queue.Full:
            self._drop(kind, len(items) if n is None else n, "queue full")

    def _drop(self, kind: str, n: int, why: str) -> None:
        before = self.dropped[kind]
        self.dropped[kind] += n
        self._unrecorded[kind] += n
        if before == 0 or before // 10000 != self.dropped[kind] // 10000:
            log.warning("ingest: %s, %d %s dropped so far", why, self.dropped[kind], kind)

    def start(self) -> None:
        try:
            self.store.fix_times()  # rows an earlier boot stamped before its clock was set
        except STORAGE_ERRORS as e:
            log.error("ingest: cannot re-time stored rows yet: %s", e)
        self._thread = threading.Thread(target=self._run, name="ingest", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stops after writing everything queued."""
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=30)
        self.flush()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._stop.wait(self.window_s)
            self._heartbeat()
            try:
                self.flush()
            except Exception:  # never let the writer die
                log.exception("ingest: flush failed")

    # -- one group commit -----------------------------------------------------------------
    def flush(self) -> None:
        with self._flush_lock:
            self._flush()

    def _drain(self) -> None:
        while True:
            try:
                kind, items = self._q.get_nowait()
            except queue.Empty:
                return
            (self._held_samples if kind == "samples" else self._held_frames).extend(items)

    def _retime(self, clock) -> bool:
        """Shifts held provisional stamps by the clock's offset; True if any remain provisional."""
        samples, batches = self._held_samples, self._held_frames
        prov_s = any(s.t_ms < PLAUSIBLE_AFTER_MS for s in samples)
        prov_f = [b for b in batches if b.t_us and min(b.t_us) < PLAUSIBLE_AFTER_US]
        if not (prov_s or prov_f):
            return False
        offset = clock.offset_ms()
        if offset is None:
            return True
        if prov_s:
            self._held_samples = [Sample(s.name, s.unit, s.t_ms + offset, s.value)
                                  if s.t_ms < PLAUSIBLE_AFTER_MS else s for s in samples]
        shift = offset * 1000
        for b in prov_f:
            b.t_us = [t + shift if t < PLAUSIBLE_AFTER_US else t for t in b.t_us]
        return False

    def _flush(self) -> None:
        self._drain()
        clock = self.store.clock
        provisional = self._retime(clock)
        samples, frames = self._held_samples, self._held_frames
        st = self.store
        try:
            self._write(samples, frames, provisional, clock)
        except STORAGE_ERRORS as e:
            if storage_problem(e) == "disk_full" and st.enforce_budget():
                self._on_event()
                try:
                    self._write(samples, frames, provisional, clock)
                except STORAGE_ERRORS as e2:
                    return self._failed(e2)
            else:
                return self._failed(e)
        self._held_samples, self._held_frames = [], []
        self.stored["samples"] += len(samples)
        self.stored["frames"] += sum(map(len, frames))
        self.last_commit = time.monotonic()
        if self.problem:
            log.info("ingest: storage works again (%s is over)", self.problem)
            self.problem = None
        try:
            self._after_commit(clock)
        except STORAGE_ERRORS as e:
            self._note(e)

    def _write(self, samples: list[Sample], frames: list[FrameBatch], provisional: bool, clock) -> None:
        st = self.store
        if not (samples or frames):
            return
        with st.batch():
            st.add_samples(samples)
            st.add_frames(frames)
            if provisional:
                st.note_provisional(clock.boot_id)
            elif time.monotonic() - self._last_true_saved > LAST_TRUE_EVERY_S and clock.is_synced():
                # The last true time seen: the floor for re-timing rows a later boot leaves
                # provisional if it loses power before its clock is set.
                st.set_meta("clock_last_true_ms", clock.now_ms())
                self._last_true_saved = time.monotonic()

    def _after_commit(self, clock) -> None:
        st = self.store
        woke = False
        if clock.is_synced() and st.has_provisional():
            if st.fix_times(clock):
                woke = True
        if self._unrecorded["samples"] or self._unrecorded["frames"]:
            lost, self._unrecorded = self._unrecorded, {"samples": 0, "frames": 0}
            st.record_loss(samples=lost["samples"], frames=lost["frames"],
                           reason="ingest: dropped before storage (queue or memory bound)")
            woke = True
        if st.over_high_water() and st.enforce_budget():
            woke = True
        if woke:
            self._on_event()

    def _note(self, e: BaseException) -> None:
        self.errors += 1
        self.last_error = f"{type(e).__name__}: {e}"
        problem = storage_problem(e)
        if problem != self.problem:
            log.error("ingest: cannot store (%s): %s; holding data in memory", problem, e)
        self.problem = problem

    def _failed(self, e: BaseException) -> None:
        """Keeps what could not be written, within the memory bounds: frames go first."""
        self._note(e)
        held = self._held_frames
        over_f = sum(map(len, held)) - self.max_held_frames
        if over_f > 0:
            self._held_frames = _drop_oldest(held, over_f)
            self._drop("frames", over_f, "storage failing, memory bound")
        over_s = len(self._held_samples) - self.max_held_samples
        if over_s > 0:
            del self._held_samples[:over_s]
            self._drop("samples", over_s, "storage failing, memory bound")

    def apply_config(self, doc: dict) -> list[str]:
        return []

    def status(self) -> dict:
        return {"stored": dict(self.stored), "dropped": dict(self.dropped), "errors": self.errors,
                "last_error": self.last_error, "problem": self.problem,
                "held": {"samples": len(self._held_samples), "frames": sum(map(len, self._held_frames))},
                "queued": self._q.qsize()}


def _drop_oldest(batches: list[FrameBatch], n: int) -> list[FrameBatch]:
    """``batches`` without their ``n`` oldest frames (batches are held in arrival order)."""
    out = []
    for b in batches:
        if n >= len(b):
            n -= len(b)
            continue
        if n:
            b = FrameBatch(b.bus, b.t_us[n:], b.keys[n:], b.data[n:])
            n = 0
        out.append(b)
    return out
