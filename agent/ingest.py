"""Group commit: drivers hand samples and frames here; one writer thread stores them in batches.

Drivers never wait on SQLite: ``put_samples``/``put_frames`` only append to a bounded queue.
The writer commits whatever has arrived at least every ``window_s`` (default 0.25 s), so a
sample is durable at most ``window_s`` plus one commit after it arrived (documented in
docs/protocol.md as the durability window). When the queue is full — the disk stalls or the
drivers outrun it — new items are dropped and counted, never blocking acquisition.
"""
from __future__ import annotations

import logging
import queue
import threading
import time

from agent.model import Frame, Sample
from agent.store import Store

log = logging.getLogger(__name__)


class Ingest:
    def __init__(self, store: Store, *, window_s: float = 0.25, max_queued: int = 2000,
                 heartbeat=lambda: None):
        self.store = store
        self._heartbeat = heartbeat
        self.window_s = window_s
        self._q: queue.Queue[tuple[str, list]] = queue.Queue(maxsize=max_queued)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.stored = {"samples": 0, "frames": 0}
        self.dropped = {"samples": 0, "frames": 0}
        self.errors = 0
        self.last_error: str | None = None
        self.last_commit = time.monotonic()

    def put_samples(self, samples: list[Sample]) -> None:
        self._put("samples", samples)

    def put_frames(self, frames: list[Frame]) -> None:
        self._put("frames", frames)

    def _put(self, kind: str, items: list) -> None:
        if not items:
            return
        try:
            self._q.put_nowait((kind, list(items)))
        except queue.Full:
            self.dropped[kind] += len(items)
            if self.dropped[kind] == len(items) or self.dropped[kind] % 10000 < len(items):
                log.warning("ingest: queue full, %d %s dropped so far", self.dropped[kind], kind)

    def start(self) -> None:
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
            self.flush()

    def flush(self) -> None:
        samples: list[Sample] = []
        frames: list[Frame] = []
        while True:
            try:
                kind, items = self._q.get_nowait()
            except queue.Empty:
                break
            (samples if kind == "samples" else frames).extend(items)
        try:
            if samples or frames:
                with self.store.batch():
                    self.store.add_samples(samples)
                    self.store.add_frames(frames)
            self.stored["samples"] += len(samples)
            self.stored["frames"] += len(frames)
            self.last_commit = time.monotonic()
        except Exception as e:
            # Disk full, read-only filesystem...: keep what we hold for the next try, up to the
            # queue's bound; what does not fit back is counted as dropped.
            self.errors += 1
            self.last_error = f"{type(e).__name__}: {e}"
            log.error("ingest: cannot store %d samples / %d frames: %s", len(samples), len(frames), e)
            for kind, items in (("samples", samples), ("frames", frames)):
                if items:
                    self._put(kind, items)
