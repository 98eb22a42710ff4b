"""The agent's durable outbox: SQLite in WAL mode (the stdlib ``sqlite3``). Design notes: docs/store.md.

Everything the agent collects is written here before anything is sent, and leaves only after
the broker has acknowledged it:

* ``samples``, ``frames`` and ``events`` hold data not yet sealed; raw frames as one block of
  columns per bus and group commit (agent.outbox.frame_blocks), not a row per frame;
* sealing moves a batch of them into ``outbox`` as one finished envelope **in the same
  transaction** that takes the next uplink ``seq`` from ``meta``. An envelope therefore keeps its
  ``seq`` for ever: after a crash it is re-sent byte for byte, so the cloud's dedup on
  ``(dev, seq)`` sees a duplicate, never the same data under two numbers, and no ``seq`` is
  skipped or reused;
* an ``outbox`` row is deleted only when the broker's PUBACK for it arrives.

``synchronous=FULL``: a committed transaction survives a power cut (WAL is fsynced at commit).
One connection, serialised by a lock, is shared by the agent's threads.

Disk budget (``budget_bytes``): the database file is capped by SQLite itself
(``max_page_count``) and the WAL is kept small (checkpoint and truncation limits), so the two
files never exceed the budget. Above a high-water mark, :meth:`Store.enforce_budget` drops the
oldest telemetry — raw-frame envelopes first, then the rest — and records every drop as a
``buffer_evicted`` event naming the seq range, so the cloud can tell an explained gap from loss.
Events, acks and every other table are never evicted for telemetry.

A full disk or a read-only filesystem never loses an event that fits the in-memory bound: it
waits in memory (``status()["memory_events"]``) and is written once the disk accepts it.

Event bodies are stored as CBOR; with an ``event_codec`` (agent/owner/datakey.py
``EventsAtRest``), the bodies it chooses (those carrying identity data, e.g. the VIN) are
stored in the form it makes (encrypted) and opened again only to be sealed or exported.

Dead letters: a stored row that cannot be sealed (a frame block or a sample the protocol cannot
carry: written by an older agent, or damaged) is moved to ``quarantine`` with the reason, a
``health`` event (kind ``quarantine``) says so, and sealing goes on with everything else. Such a
row is never sent and never retried; it stays on the device for a technician (``dongle export``).
"""
from __future__ import annotations

import collections
import datetime
import json
import math
import logging
import os
import sqlite3
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import cbor2

from drivers.core.clock import PLAUSIBLE_AFTER_MS, PLAUSIBLE_AFTER_US, Clock
from agent.outbox import frame_blocks
from agent.outbox.telemetry import FrameColumns
from drivers.core.model import Frame, FrameBatch, Sample

log = logging.getLogger(__name__)

#: 3: raw frames stored as blocks (agent.outbox.frame_blocks); the quarantine table.
SCHEMA_VERSION = 3
#: Dead letters kept at most (the oldest go beyond; each is one row that could not be sealed).
QUARANTINE_MAX = 1000
#: A sample row as the protocol can carry it (SQLite stores NaN as NULL, and keeps any type).
_SAMPLE_OK = ("typeof(name) = 'text' AND length(name) > 0 AND typeof(unit) = 'text' "
              "AND typeof(t_ms) = 'integer' AND t_ms >= 0 AND typeof(value) IN ('real', 'integer') "
              "AND value BETWEEN -1.7976931348623157e308 AND 1.7976931348623157e308")


@dataclass(frozen=True)
class OutboxItem:
    seq: int
    suffix: str
    payload: bytes
    priority: int


# Outbox priorities: lower is sent first (events and acks ahead of bulk telemetry).
PRIO_CONTROL = 0
PRIO_EVENT = 1
PRIO_TELEMETRY = 5

# What a telemetry envelope carries, for eviction order (raw frames go first).
CONTENT_FRAMES = "frames"
CONTENT_MIXED = "mixed"
CONTENT_SIGNALS = "signals"
_EVICT_ORDER = (CONTENT_FRAMES, CONTENT_MIXED, CONTENT_SIGNALS)

#: Events kept in memory while the disk refuses writes (oldest dropped beyond, and counted).
MEMORY_EVENTS_MAX = 1000
#: Budget shares: the WAL may use this fraction; eviction starts at HIGH and stops at LOW of
#: the database's share.
WAL_SHARE = 0.10
HIGH_WATER = 0.90
LOW_WATER = 0.75
_MIN_WAL_RESERVE = 256 * 1024

#: SQLite's page cache (default 2 MiB). The store's work is appends and deletes at the two ends
#: of each table and one sorted read per sealed batch: 512 KiB serves them as well and keeps
#: 1.5 MB off the agent's RSS (bench/bench_memory.py).
CACHE_KIB = 512

STORAGE_ERRORS = (sqlite3.OperationalError, sqlite3.DatabaseError, OSError)


class EventCodec(Protocol):
    """How event bodies are kept at rest: ``seal(body)`` gives the map stored (it keeps ``type``
    and ``ts`` readable), ``open(stored)`` the body again (raising if it cannot)."""

    def seal(self, body: dict) -> dict: ...
    def open(self, stored: dict) -> dict: ...


def storage_problem(e: BaseException) -> str:
    """``disk_full``, ``read_only`` or ``io_error`` for a storage exception."""
    text = str(e).lower()
    if "full" in text or getattr(e, "errno", None) == 28:
        return "disk_full"
    if "readonly" in text or "read-only" in text or getattr(e, "errno", None) == 30:
        return "read_only"
    return "io_error"


class Store:
    def __init__(self, path: str | Path, *, clock: Clock | None = None,
                 budget_bytes: int | None = None, event_codec: EventCodec | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.clock = clock or Clock()
        self._lock = threading.RLock()
        self._depth = 0  # transaction nesting of the thread holding the lock
        self._owner: int | None = None  # that thread, while _depth > 0
        self._event_codec = event_codec
        self.non_finite = 0      # sample values dropped as NaN/inf (add_samples)
        self.events_invalid = 0  # events dropped as unsendable (seal_events)
        self.quarantined = 0     # rows set aside as unsealable (see the module docstring)
        self.unstorable = 0      # rows dropped as not even storable (add_samples)
        conn = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._conn = conn
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA busy_timeout=5000")
        conn.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
        self.page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        self.budget_bytes = budget_bytes
        self._max_pages: int | None = None
        self._memory_events: collections.deque[dict] = collections.deque()
        self.memory_events_dropped = 0
        self.problem: str | None = None  # last storage problem, None once writes succeed again
        self.evicted = {"envelopes": 0, "samples": 0, "frames": 0, "events": 0}
        self._create()
        if budget_bytes:
            self.set_budget(budget_bytes)

    # -- schema ---------------------------------------------------------------------------
    def _create(self) -> None:
        self.create_tables(
            "samples (id INTEGER PRIMARY KEY, name TEXT, unit TEXT, t_ms INTEGER, value REAL)",
            # t_us: the block's earliest frame time; n: its frames
            "frames (id INTEGER PRIMARY KEY, bus TEXT, n INTEGER, t_us INTEGER, block BLOB)",
            "quarantine (id INTEGER PRIMARY KEY, ts INTEGER, source TEXT, reason TEXT, row BLOB)",
            "events (id INTEGER PRIMARY KEY, ts INTEGER, body BLOB)",
            "outbox (seq INTEGER PRIMARY KEY, suffix TEXT, payload BLOB, priority INTEGER, "
            "created_ms INTEGER, content TEXT)",
            "meta (key TEXT PRIMARY KEY, value TEXT)",
            "downlink_seq (kind TEXT PRIMARY KEY, seq INTEGER)",
            "configs (version INTEGER PRIMARY KEY, doc TEXT, applied_ms INTEGER)")
        if "content" not in {r[1] for r in self.query("PRAGMA table_info(outbox)")}:  # schema 1
            with self._txn() as c:
                c.execute("ALTER TABLE outbox ADD COLUMN content TEXT")
        if "can_id" in {r[1] for r in self.query("PRAGMA table_info(frames)")}:  # schema <= 2
            self._migrate_frame_rows()
        if self.get_meta("schema_version") != SCHEMA_VERSION:
            self.set_meta("schema_version", SCHEMA_VERSION)

    def create_tables(self, *tables: str, indexes: Iterable[str] = ()) -> None:
        """Creates each table (``"name (column definitions)"``) and index (``"name ON table
        (columns)"``) unless it exists, in one transaction. Every module that keeps state in the
        agent's database declares its tables this way."""
        with self._txn() as c:
            for t in tables:
                c.execute(f"CREATE TABLE IF NOT EXISTS {t}")
            for i in indexes:
                c.execute(f"CREATE INDEX IF NOT EXISTS {i}")

    def _migrate_frame_rows(self) -> None:
        """Schema 2 kept a row per frame: they become blocks (one per bus and 8,192 frames), in
        one transaction, in their order; a row the protocol cannot carry goes to quarantine."""
        with self._txn() as c:
            c.execute("ALTER TABLE frames RENAME TO frames_v2")
            c.execute("CREATE TABLE frames (id INTEGER PRIMARY KEY, bus TEXT, n INTEGER, t_us INTEGER, block BLOB)")
            batches: dict[str, FrameBatch] = {}
            bad = 0
            for rid, bus, t_us, can_id, ext, data in c.execute(
                    "SELECT id, bus, t_us, can_id, ext, data FROM frames_v2 ORDER BY id").fetchall():
                frame = Frame(bus, t_us, can_id, bool(ext), data)
                try:
                    (batch,) = FrameBatch.of([frame])
                    frame_blocks.decode(bus, frame_blocks.encode(batch.t_us, batch.keys, batch.data))
                except (TypeError, ValueError, OverflowError) as e:
                    self._quarantine(c, "frames", f"{e}", cbor2.dumps([rid, bus, t_us, can_id, ext, data]))
                    bad += 1
                    continue
                b = batches.setdefault(str(bus), FrameBatch(str(bus), [], [], []))
                b.t_us += batch.t_us
                b.keys += batch.keys
                b.data += batch.data
            for b in batches.values():
                self._insert_blocks(c, b)
            c.execute("DROP TABLE frames_v2")
            if bad:
                self._quarantine_event(c, "frames", bad, "stored by an earlier agent, cannot be sent")
        log.info("store: frame rows of schema 2 converted to blocks")

    def _txn(self):
        return _Transaction(self)

    def batch(self):
        """One transaction around several writes: ``with store.batch(): add_samples(); add_frames()``."""
        return _Transaction(self)

    @property
    def in_transaction(self) -> bool:
        """Whether the calling thread is inside one of this store's transactions (work that
        SQLite refuses there, such as a WAL checkpoint, must wait for the commit)."""
        return self._depth > 0 and self._owner == threading.get_ident()

    # -- disk budget ----------------------------------------------------------------------
    def set_budget(self, budget_bytes: int) -> None:
        """Caps the database and its WAL at ``budget_bytes`` together (see module doc)."""
        wal_reserve = max(_MIN_WAL_RESERVE, int(budget_bytes * WAL_SHARE))
        if budget_bytes < 4 * wal_reserve:
            raise ValueError(f"disk budget {budget_bytes} bytes is too small")
        self.budget_bytes = budget_bytes
        ps = self.page_size
        self._max_pages = (budget_bytes - wal_reserve) // ps
        with self._lock:
            c = self._conn
            c.execute(f"PRAGMA max_page_count={self._max_pages}")
            # A checkpoint after every wal_reserve/4 of WAL; the WAL file truncated back to half
            # the reserve afterwards. One transaction is bounded by the ingest queue and the
            # 128 KiB envelope, far below the reserve.
            c.execute(f"PRAGMA wal_autocheckpoint={max(16, wal_reserve // 4 // ps)}")
            c.execute(f"PRAGMA journal_size_limit={wal_reserve // 2}")

    def usage_bytes(self) -> int:
        """Bytes on disk now: the database file plus its WAL."""
        total = 0
        for suffix in ("", "-wal"):
            try:
                total += os.stat(f"{self.path}{suffix}").st_size
            except OSError:
                pass
        return total

    def live_bytes(self) -> int:
        """Bytes of the database in use (pages not on the free list)."""
        with self._lock:
            pages = self._conn.execute("PRAGMA page_count").fetchone()[0]
            free = self._conn.execute("PRAGMA freelist_count").fetchone()[0]
        return (pages - free) * self.page_size

    def over_high_water(self) -> bool:
        if not self._max_pages:
            return False
        return self.live_bytes() > HIGH_WATER * self._max_pages * self.page_size

    def enforce_budget(self, reason: str = "disk_budget") -> list[dict]:
        """Evicts the oldest telemetry until the database is under its low-water mark.

        Returns the ``buffer_evicted`` event bodies queued (one per kind of content dropped).
        Order: sealed raw-frame envelopes, sealed mixed envelopes, sealed signal envelopes (oldest
        ``seq`` first), then unsealed frames and samples (each batch takes a seq of its own, so the
        drop shows as an explained gap like any other).
        """
        if not self._max_pages:
            return []
        target = LOW_WATER * self._max_pages * self.page_size
        events: list[dict] = []
        with self._lock:
            if self.live_bytes() <= HIGH_WATER * self._max_pages * self.page_size:
                return []
            for content in _EVICT_ORDER:
                while self.live_bytes() > target:
                    ev = self._evict_sealed(content, reason, target)
                    if ev is None:
                        break
                    events.append(ev)
            for table in ("frames", "samples"):
                while self.live_bytes() > target:
                    ev = self._evict_unsealed(table, reason)
                    if ev is None:
                        break
                    events.append(ev)
        for ev in events:
            log.warning("store: evicted seq %d..%d (%d envelopes, %s) for the disk budget",
                        ev["from_seq"], ev["to_seq"], ev["count"], ev["reason"])
        return events

    def _evict_sealed(self, content: str, reason: str, target: float) -> dict | None:
        c = self._conn
        # Take roughly what must go, in one transaction (at least one envelope).
        excess = self.live_bytes() - target
        rows = c.execute("SELECT seq, length(payload) FROM outbox WHERE priority=? AND content=? "
                         "ORDER BY seq LIMIT 2000", (PRIO_TELEMETRY, content)).fetchall()
        if not rows:
            return None
        take, size = [], 0
        for seq, n in rows:
            take.append(seq)
            size += n
            if size >= excess:
                break
        with self._txn() as c:
            c.execute("DELETE FROM outbox WHERE priority=? AND content=? AND seq<=?",
                      (PRIO_TELEMETRY, content, take[-1]))
            body = {"type": "buffer_evicted", "ts": self.clock.now_ms(), "from_seq": take[0],
                    "to_seq": take[-1], "count": len(take), "reason": f"{reason}: {content} telemetry"}
            self._insert_event(c, body)
        self.evicted["envelopes"] += len(take)
        return body

    def _evict_unsealed(self, table: str, reason: str) -> dict | None:
        # 20,000 samples or 100 frame blocks (up to 819,200 frames) at a time
        size = "n" if table == "frames" else "1"
        rows = self._conn.execute(f"SELECT id, {size} FROM {table} ORDER BY id LIMIT ?",
                                  (100 if table == "frames" else 20000,)).fetchall()
        if not rows:
            return None
        dropped = sum(r[1] for r in rows)
        with self._txn() as c:
            seq = self._next_seq(c)  # burnt: the gap it leaves is the explanation's anchor
            c.execute(f"DELETE FROM {table} WHERE id<=?", (rows[-1][0],))
            body = {"type": "buffer_evicted", "ts": self.clock.now_ms(), "from_seq": seq, "to_seq": seq,
                    "count": 1, "reason": f"{reason}: unsealed {table}", table: dropped}
            self._insert_event(c, body)
        self.evicted[table] += dropped
        return body

    def record_loss(self, *, samples: int = 0, frames: int = 0, reason: str) -> dict | None:
        """Data dropped before it reached the disk (e.g. the in-memory bound during a full
        disk): burns one seq and queues a ``buffer_evicted`` event for it, atomically."""
        if not samples and not frames:
            return None
        with self._txn() as c:
            seq = self._next_seq(c)
            body = {"type": "buffer_evicted", "ts": self.clock.now_ms(), "from_seq": seq, "to_seq": seq,
                    "count": 1, "reason": reason, "samples": samples, "frames": frames}
            self._insert_event(c, body)
        return body

    # -- ingest ---------------------------------------------------------------------------
    def add_samples(self, samples: Iterable[Sample]) -> int:
        """Stores samples. A value that is not a finite number (NaN, ±inf from a float DBC
        signal; anything ``float()`` refuses) is not a measurement the protocol can carry: it is
        counted (``non_finite``, in ``status()``) and dropped here, never stored (SQLite would
        turn NaN into NULL). Names, units and times are checked when sealing (dead letters)."""
        isfinite = math.isfinite
        samples = samples if isinstance(samples, list) else list(samples)
        try:
            rows = [(x.name, x.unit, x.t_ms, float(x.value)) for x in samples]
            ok = all(map(isfinite, [r[3] for r in rows]))
        except (TypeError, ValueError, OverflowError):
            ok = False
        if not ok:
            rows = []
            for x in samples:
                try:
                    v = float(x.value)
                except (TypeError, ValueError, OverflowError):
                    continue
                if isfinite(v):
                    rows.append((x.name, x.unit, x.t_ms, v))
            bad = len(samples) - len(rows)
            self.non_finite += bad
            log.warning("store: %d sample value(s) that are not finite numbers dropped (%d so far)",
                        bad, self.non_finite)
        if rows:
            with self._txn() as c:
                return self._insert_each(c, "INSERT INTO samples(name, unit, t_ms, value) VALUES (?,?,?,?)", rows)
        return 0

    def _insert_each(self, c: sqlite3.Connection, sql: str, rows: list[tuple]) -> int:
        """``executemany``; if one row cannot even be bound (a type or an integer SQLite has no
        column for), the rows one by one, that one dropped and counted (``unstorable``)."""
        c.execute("SAVEPOINT rows")
        try:
            c.executemany(sql, rows)
            return len(rows)
        except (sqlite3.InterfaceError, sqlite3.ProgrammingError, OverflowError, TypeError, ValueError):
            c.execute("ROLLBACK TO rows")
        finally:
            c.execute("RELEASE rows")
        n = 0
        for row in rows:
            try:
                c.execute(sql, row)
                n += 1
            except (sqlite3.InterfaceError, sqlite3.ProgrammingError, OverflowError, TypeError, ValueError) as e:
                self.unstorable += 1
                log.error("store: a row cannot be stored (%s: %s); dropped (%d so far)", type(e).__name__, e,
                          self.unstorable)
        return n

    def add_frames(self, frames: FrameBatch | Iterable[FrameBatch] | Iterable[Frame]) -> int:
        """Stores raw frames: batches (one block per bus, split at ``BLOCK_MAX``) or Frame objects.
        Frames reach the store checked (drivers.can); a block that still does not encode (a
        payload over 255 bytes) raises, as any storage error does, and nothing is written."""
        if isinstance(frames, FrameBatch):
            batches = [frames]
        else:
            items = list(frames)
            batches = items if items and isinstance(items[0], FrameBatch) else FrameBatch.of(items)
        if len(batches) > 1:
            batches = FrameBatch.join(batches)   # one block per bus and commit
        batches = [b for b in batches if len(b)]
        if not batches:
            return 0
        with self._txn() as c:
            for b in batches:
                self._insert_blocks(c, b)
        return sum(map(len, batches))

    @staticmethod
    def _insert_blocks(c: sqlite3.Connection, batch: FrameBatch) -> None:
        c.executemany("INSERT INTO frames(bus, n, t_us, block) VALUES (?,?,?,?)",
                      [(batch.bus, n, t, blob) for n, t, blob in frame_blocks.blocks(batch)])

    # -- dead letters ---------------------------------------------------------------------
    def _quarantine(self, c: sqlite3.Connection, source: str, reason: str, row: bytes) -> None:
        c.execute("INSERT INTO quarantine(ts, source, reason, row) VALUES (?,?,?,?)",
                  (self.clock.now_ms(), source, reason[:300], row))
        c.execute("DELETE FROM quarantine WHERE id <= (SELECT max(id) FROM quarantine) - ?", (QUARANTINE_MAX,))
        self.quarantined += 1

    def _quarantine_event(self, c: sqlite3.Connection, source: str, count: int, reason: str) -> None:
        log.error("store: %d %s row(s) cannot be sealed (%s): set aside in quarantine", count, source, reason)
        self._insert_event(c, {"type": "health", "ts": self.clock.now_ms(), "kind": "quarantine",
                               "level": "warn", "detail": {"table": source, "rows": count,
                                                            "reason": reason[:300]}})

    def _quarantine_bad_samples(self, c: sqlite3.Connection, upto: int) -> int:
        """Moves sample rows up to id ``upto`` that the protocol cannot carry to quarantine."""
        bad = c.execute(f"SELECT id, name, unit, t_ms, value FROM samples WHERE id <= ? AND NOT ({_SAMPLE_OK})",
                        (upto,)).fetchall()
        for row in bad:
            self._quarantine(c, "samples", "not a sample the protocol can carry", cbor2.dumps(
                [x if isinstance(x, (int, str, bytes)) or x is None else float(x) for x in row]))
            c.execute("DELETE FROM samples WHERE id = ?", (row[0],))
        if bad:
            self._quarantine_event(c, "samples", len(bad), "name, unit, time or value the protocol cannot carry")
        return len(bad)

    def quarantine_oldest(self, *, samples: int = 0, frames: int = 0, reason: str) -> int:
        """Moves the oldest ``samples`` sample rows and ``frames`` frames (whole blocks) to
        quarantine, with the event: for a batch that fails to seal for a reason no check names
        (the uplink narrows a failing batch down to one row first). Returns rows moved."""
        moved = 0
        with self._txn() as c:
            for row in c.execute("SELECT id, name, unit, t_ms, value FROM samples ORDER BY id LIMIT ?",
                                 (samples,)).fetchall():
                self._quarantine(c, "samples", reason, cbor2.dumps(list(row)))
                c.execute("DELETE FROM samples WHERE id = ?", (row[0],))
                moved += 1
            left = frames
            for rid, bus, n, t_us, block in c.execute(
                    "SELECT id, bus, n, t_us, block FROM frames ORDER BY id").fetchall():
                if left <= 0:
                    break
                self._quarantine(c, "frames", reason, cbor2.dumps([rid, bus, n, t_us, bytes(block)]))
                c.execute("DELETE FROM frames WHERE id = ?", (rid,))
                left -= n
                moved += 1
            if moved:
                self._quarantine_event(c, "samples" if samples and not frames else
                                       "frames" if frames and not samples else "samples+frames", moved, reason)
        return moved

    def _insert_event(self, c: sqlite3.Connection, body: dict) -> int:
        ts = int(body.get("ts", self.clock.now_ms()))
        if ts < PLAUSIBLE_AFTER_MS:
            self._note_provisional(c)
        stored = self._event_codec.seal(body) if self._event_codec is not None else body
        return c.execute("INSERT INTO events(ts, body) VALUES (?, ?)", (ts, cbor2.dumps(stored))).lastrowid

    def add_event(self, body: dict) -> int | None:
        """Stores an event durably. If the disk refuses (full, read-only), the event waits in
        memory (bounded) and is written by the next successful :meth:`flush_memory_events`;
        returns None then."""
        try:
            self.flush_memory_events()
            with self._txn() as c:
                event_id = self._insert_event(c, body)
            self.problem = None
            return event_id
        except STORAGE_ERRORS as e:
            self._note_problem(e)
            if len(self._memory_events) >= MEMORY_EVENTS_MAX:
                self._memory_events.popleft()
                self.memory_events_dropped += 1
            self._memory_events.append(body)
            log.error("store: cannot write an event (%s); holding %d in memory", e,
                      len(self._memory_events))
            return None

    def flush_memory_events(self) -> int:
        """Writes the events held in memory; raises (keeping them) if the disk still refuses."""
        if not self._memory_events:
            return 0
        with self._lock:
            held = list(self._memory_events)
            with self._txn() as c:
                for body in held:
                    self._insert_event(c, body)
            self._memory_events.clear()
            dropped, self.memory_events_dropped = self.memory_events_dropped, 0
        if dropped:
            self.record_loss(reason=f"memory bound: {dropped} events dropped while storage failed")
        log.info("store: %d events held in memory are on disk now", len(held))
        return len(held)

    def _note_problem(self, e: BaseException) -> None:
        problem = storage_problem(e)
        if problem != self.problem:
            log.error("store: storage problem %s: %s", problem, e)
        self.problem = problem

    # -- time fix-up ----------------------------------------------------------------------
    def _note_provisional(self, c: sqlite3.Connection, boot_id: str | None = None) -> None:
        boot = boot_id or self.clock.boot_id
        row = c.execute("SELECT value FROM meta WHERE key='clock_provisional_boot'").fetchone()
        if row is None:
            c.execute("INSERT INTO meta(key, value) VALUES ('clock_provisional_boot', ?)",
                      (json.dumps(boot),))

    def note_provisional(self, boot_id: str | None = None) -> None:
        """Marks that rows stamped with provisional (pre-sync) times of this boot are stored."""
        with self._txn() as c:
            self._note_provisional(c, boot_id)

    def has_provisional(self) -> bool:
        return self.get_meta("clock_provisional_boot") is not None

    def fix_times(self, clock: Clock | None = None) -> int:
        """Gives rows stamped before the clock was synchronised their true time.

        Rows of the current boot get ``+ offset`` once the clock knows it (exact). Rows left by an
        earlier boot that never synchronised cannot be known exactly: they are placed after the
        last true time this device saw (meta ``clock_last_true_ms``), a lower bound, and a
        ``health`` event (kind ``clock``) says how many were estimated. Returns rows changed.
        """
        clock = clock or self.clock
        boot = self.get_meta("clock_provisional_boot")
        if boot is None:
            return 0
        if boot == clock.boot_id:
            offset = clock.offset_ms()
            if offset is None:
                return 0
            estimated = False
        else:
            offset = int(self.get_meta("clock_last_true_ms", PLAUSIBLE_AFTER_MS))
            estimated = True
        with self._txn() as c:
            n = c.execute("UPDATE samples SET t_ms = t_ms + ? WHERE t_ms < ?",
                          (offset, PLAUSIBLE_AFTER_MS)).rowcount
            n += self._retime_blocks(c, offset * 1000)
            for event_id, body in c.execute("SELECT id, body FROM events WHERE ts < ?",
                                            (PLAUSIBLE_AFTER_MS,)).fetchall():
                doc = cbor2.loads(body)
                doc["ts"] = int(doc.get("ts", 0)) + offset
                c.execute("UPDATE events SET ts=?, body=? WHERE id=?", (doc["ts"], cbor2.dumps(doc), event_id))
                n += 1
            c.execute("DELETE FROM meta WHERE key='clock_provisional_boot'")
            if estimated and n:
                ts = clock.now_ms() if clock.is_synced() else offset
                c.execute("INSERT INTO events(ts, body) VALUES (?, ?)", (ts, cbor2.dumps(
                    {"type": "health", "ts": ts, "kind": "clock", "level": "warn",
                     "detail": {"estimated_rows": n, "reason": "stamped before the clock was set, "
                                "in a boot that ended before it was; placed after the last known time"}})))
        for body in self._memory_events:
            if int(body.get("ts", 0)) < PLAUSIBLE_AFTER_MS:
                body["ts"] = int(body.get("ts", 0)) + offset
        log.info("store: %d rows stamped before clock sync re-timed (%s)", n,
                 "estimated" if estimated else "exact")
        return n

    def _retime_blocks(self, c: sqlite3.Connection, shift_us: int) -> int:
        """Adds ``shift_us`` to the provisional frame times in stored blocks; returns frames moved.
        A block that does not decode is left for sealing to set aside."""
        moved = 0
        for rid, bus, block in c.execute("SELECT id, bus, block FROM frames WHERE t_us < ?",
                                         (PLAUSIBLE_AFTER_US,)).fetchall():
            try:
                b = frame_blocks.decode(bus, block)
            except frame_blocks.BlockError:
                continue
            moved += sum(1 for t in b.t_us if t < PLAUSIBLE_AFTER_US)
            b.t_us = [t + shift_us if t < PLAUSIBLE_AFTER_US else t for t in b.t_us]
            c.execute("UPDATE frames SET t_us = ?, block = ? WHERE id = ?",
                      (min(b.t_us), frame_blocks.encode(b.t_us, b.keys, b.data), rid))
        return moved

    # -- sealing --------------------------------------------------------------------------
    def _next_seq(self, c: sqlite3.Connection) -> int:
        row = c.execute("SELECT value FROM meta WHERE key='uplink_seq'").fetchone()
        seq = (int(row[0]) if row else 0) + 1
        c.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('uplink_seq', ?)", (str(seq),))
        return seq

    def _put_outbox(self, c, seq: int, suffix: str, payload: bytes, priority: int,
                    content: str | None = None) -> None:
        c.execute("INSERT INTO outbox(seq, suffix, payload, priority, created_ms, content) "
                  "VALUES (?,?,?,?,?,?)", (seq, suffix, payload, priority, self.clock.now_ms(), content))

    def enqueue(self, build: Callable[[int], bytes], suffix: str, priority: int = PRIO_CONTROL) -> int:
        """Takes the next uplink seq, builds the envelope for it and queues it, atomically."""
        with self._txn() as c:
            seq = self._next_seq(c)
            self._put_outbox(c, seq, suffix, build(seq), priority)
            return seq

    def seal_events(self, build: Callable[[int, dict], bytes], limit: int = 100, *,
                    prepare: Callable[[dict], dict | None] | None = None) -> list[int]:
        """Seals pending events, one envelope each (an event body is one event, PROTOCOL §4).

        ``prepare(body)`` runs first, before a seq is taken: it may return None (the event must
        not leave, e.g. the privacy gate) or raise (the body is invalid). Either way the event is
        deleted without using a seq, and an invalid one is logged and counted in
        ``events_invalid`` — one bad event never holds up the others."""
        try:
            self.flush_memory_events()
        except STORAGE_ERRORS as e:
            self._note_problem(e)
        seqs = []
        with self._txn() as c:
            rows = c.execute("SELECT id, body FROM events ORDER BY id LIMIT ?", (limit,)).fetchall()
            for event_id, raw in rows:
                stored = cbor2.loads(raw)
                try:
                    body = self._event_codec.open(stored) if self._event_codec is not None else stored
                    if prepare is not None:
                        body = prepare(body)
                except Exception as e:
                    self.events_invalid += 1
                    log.error("store: event %r dropped, it cannot be sent: %s", stored.get("type"), e)
                    body = None
                if body is None:
                    c.execute("DELETE FROM events WHERE id=?", (event_id,))
                    continue
                seq = self._next_seq(c)
                self._put_outbox(c, seq, "up/event", build(seq, body), PRIO_EVENT)
                c.execute("DELETE FROM events WHERE id=?", (event_id,))
                seqs.append(seq)
        return seqs

    def seal_telemetry(self, build: Callable[[int, list[Sample], FrameColumns], bytes], *,
                       max_samples: int, max_frames: int = 0) -> int | None:
        """Seals the oldest pending samples (and frames) into one telemetry envelope.

        Frames reach ``build`` as :class:`~agent.outbox.telemetry.FrameColumns`: the blocks'
        columns per bus, in arrival order (no object per frame: a full batch is tens of
        thousands). Exactly ``max_frames`` are taken when that many are pending (the last block
        is split, its rest stays). Rows the protocol cannot carry are set aside first (module
        doc, dead letters). ``build`` may raise (e.g. the envelope is too large): the
        transaction is rolled back and nothing changes, so the caller can retry with a smaller
        batch.
        """
        with self._txn() as c:
            samples: list[Sample] = []
            last_s = None
            if max_samples:
                last_s = self._last_row_id(c, "samples", max_samples)
                if last_s is not None and self._quarantine_bad_samples(c, last_s):
                    last_s = self._last_row_id(c, "samples", max_samples)
                if last_s is not None:
                    samples = [Sample(*r) for r in c.execute(
                        "SELECT name, unit, t_ms, value FROM samples WHERE id <= ? ORDER BY id", (last_s,))]
            frames = FrameColumns()
            taken: list[int] = []          # blocks sealed whole
            rest: tuple[int, FrameBatch] | None = None  # (block id, frames left in it)
            if max_frames:
                bad = 0
                for rid, n in c.execute("SELECT id, n FROM frames ORDER BY id LIMIT ?", (max_frames,)).fetchall():
                    room = max_frames - len(frames)
                    if room <= 0:
                        break
                    bus, block = c.execute("SELECT bus, block FROM frames WHERE id = ?", (rid,)).fetchone()
                    try:
                        batch = frame_blocks.decode(bus, block)
                    except frame_blocks.BlockError as e:
                        self._quarantine(c, "frames", str(e), cbor2.dumps([rid, bus, n, bytes(block)]))
                        c.execute("DELETE FROM frames WHERE id = ?", (rid,))
                        bad += 1
                        continue
                    if len(batch) <= room:
                        frames.add(batch)
                        taken.append(rid)
                    else:
                        frames.add(FrameBatch(bus, batch.t_us[:room], batch.keys[:room], batch.data[:room]))
                        rest = rid, FrameBatch(bus, batch.t_us[room:], batch.keys[room:], batch.data[room:])
                if bad:
                    self._quarantine_event(c, "frames", bad, "stored frame blocks that cannot be sent")
            if not samples and not len(frames):
                return None
            seq = self._next_seq(c)
            content = CONTENT_MIXED if samples and len(frames) else CONTENT_FRAMES if len(frames) else CONTENT_SIGNALS
            self._put_outbox(c, seq, "up/telemetry", build(seq, samples, frames), PRIO_TELEMETRY,
                             content)
            if samples:
                c.execute("DELETE FROM samples WHERE id <= ?", (last_s,))
            c.executemany("DELETE FROM frames WHERE id = ?", [(rid,) for rid in taken])
            if rest is not None:
                rid, left = rest
                c.execute("UPDATE frames SET n = ?, t_us = ?, block = ? WHERE id = ?",
                          (len(left), min(left.t_us), frame_blocks.encode(left.t_us, left.keys, left.data), rid))
            return seq

    @staticmethod
    def _last_row_id(c: sqlite3.Connection, table: str, n: int) -> int | None:
        """The id of the ``n``-th oldest row of ``table`` (of the last one when there are fewer)."""
        row = c.execute(f"SELECT id FROM {table} ORDER BY id LIMIT 1 OFFSET ?", (n - 1,)).fetchone()
        if row is None:
            row = c.execute(f"SELECT max(id) FROM {table}").fetchone()
        return row[0]

    def pending_count(self, table: str, limit: int) -> int:
        """Unsealed samples or frames, counted up to ``limit`` (cheap)."""
        if table not in ("samples", "frames"):
            raise ValueError(f"not a telemetry table: {table!r}")
        with self._lock:
            if table == "frames":
                return min(limit, self._conn.execute("SELECT coalesce(sum(n), 0) FROM frames").fetchone()[0])
            return self._conn.execute("SELECT count(*) FROM (SELECT 1 FROM samples LIMIT ?)",
                                      (limit,)).fetchone()[0]

    def pending_at_least(self, table: str, n: int) -> bool:
        """Whether ``table`` (samples or frames) holds at least ``n`` unsealed rows (cheap)."""
        return self.pending_count(table, n) >= n

    # -- sending --------------------------------------------------------------------------
    def outbox_items(self, limit: int, exclude: Iterable[int] = (), *, newest_first: bool = False,
                     max_priority: int | None = None) -> list[OutboxItem]:
        """Envelopes to send: by priority, then oldest (or newest) seq first."""
        exclude = set(exclude)
        order = "priority, seq DESC" if newest_first else "priority, seq"
        where = "" if max_priority is None else f"WHERE priority <= {int(max_priority)}"
        with self._lock:
            rows = self._conn.execute(
                f"SELECT seq, suffix, payload, priority FROM outbox {where} ORDER BY {order} LIMIT ?",
                (limit + len(exclude),)).fetchall()
        return [OutboxItem(r[0], r[1], bytes(r[2]), r[3]) for r in rows if r[0] not in exclude][:limit]

    def outbox_ack(self, seq: int) -> None:
        """Deletes an acknowledged envelope and adds its size to today's byte counter (UTC)."""
        with self._txn() as c:
            row = c.execute("SELECT length(payload) FROM outbox WHERE seq=?", (seq,)).fetchone()
            c.execute("DELETE FROM outbox WHERE seq=?", (seq,))
            if row:
                day = _utc_day(self.clock.now_ms())
                cur = c.execute("SELECT value FROM meta WHERE key='uplink_daily'").fetchone()
                daily = json.loads(cur[0]) if cur else {}
                if daily.get("day") != day:
                    daily = {"day": day, "bytes": 0, "envelopes": 0}
                daily["bytes"] += row[0]
                daily["envelopes"] += 1
                c.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('uplink_daily', ?)",
                          (json.dumps(daily),))

    def daily_bytes(self) -> int:
        """Envelope bytes acknowledged today (UTC day of the agent's clock)."""
        daily = self.get_meta("uplink_daily", {})
        return int(daily.get("bytes", 0)) if daily.get("day") == _utc_day(self.clock.now_ms()) else 0

    def query(self, sql: str, params: tuple = ()) -> list[tuple]:
        """A read under the store's lock (the connection is shared by threads)."""
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    # -- state ----------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        """Rows waiting per table (frames: frames, not blocks)."""
        with self._lock:
            out = {t: self._conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
                   for t in ("samples", "events", "outbox")}
            out["frames"] = self._conn.execute("SELECT coalesce(sum(n), 0) FROM frames").fetchone()[0]
        return {t: out[t] for t in ("samples", "frames", "events", "outbox")}

    def status(self) -> dict:
        return {"usage_bytes": self.usage_bytes(), "budget_bytes": self.budget_bytes,
                "problem": self.problem, "memory_events": len(self._memory_events),
                "evicted": dict(self.evicted), "daily_bytes": self.daily_bytes(),
                "non_finite_dropped": self.non_finite, "events_invalid": self.events_invalid,
                "quarantined": self.quarantined, "unstorable": self.unstorable}

    def oldest_pending_ms(self) -> int | None:
        with self._lock:
            row = self._conn.execute(
                "SELECT min(t) FROM (SELECT min(t_ms) AS t FROM samples "
                "UNION ALL SELECT min(ts) FROM events UNION ALL SELECT min(created_ms) FROM outbox)"
            ).fetchone()
        return row[0]

    @property
    def last_uplink_seq(self) -> int:
        return int(self.get_meta("uplink_seq", 0))

    def get_meta(self, key: str, default=None):
        with self._lock:
            row = self._conn.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return json.loads(row[0]) if row else default

    def set_meta(self, key: str, value) -> None:
        with self._txn() as c:
            c.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, json.dumps(value)))

    def last_downlink_seq(self, kind: str) -> int | None:
        with self._lock:
            row = self._conn.execute("SELECT seq FROM downlink_seq WHERE kind=?", (kind,)).fetchone()
        return row[0] if row else None

    def set_downlink_seq(self, kind: str, seq: int) -> None:
        with self._txn() as c:
            c.execute("INSERT OR REPLACE INTO downlink_seq(kind, seq) VALUES (?, ?)", (kind, seq))

    def save_config(self, doc: dict) -> None:
        """Stores ``doc`` and makes it the active cloud config (also used to roll back)."""
        with self._txn() as c:
            c.execute("INSERT OR REPLACE INTO configs(version, doc, applied_ms) VALUES (?,?,?)",
                      (int(doc["version"]), json.dumps(doc), self.clock.now_ms()))
            c.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('active_config', ?)",
                      (json.dumps(int(doc["version"])),))

    def active_config(self) -> dict | None:
        version = self.get_meta("active_config")
        if version is None:
            return None
        with self._lock:
            row = self._conn.execute("SELECT doc FROM configs WHERE version=?", (version,)).fetchone()
        return json.loads(row[0]) if row else None

    def close(self) -> None:
        with self._lock:
            self._conn.close()


def _utc_day(ms: int) -> str:
    return datetime.datetime.fromtimestamp(ms / 1000, datetime.UTC).strftime("%Y-%m-%d")


class _Transaction:
    """``BEGIN IMMEDIATE`` … ``COMMIT`` under the store's lock; rolls back on any exception.

    Nested use (``batch()`` around ``add_samples``) joins the outer transaction.
    """

    def __init__(self, store: Store):
        self._s = store

    def __enter__(self) -> sqlite3.Connection:
        s = self._s
        s._lock.acquire()
        if s._depth == 0:
            try:
                s._conn.execute("BEGIN IMMEDIATE")
            except BaseException:
                s._lock.release()
                raise
            s._owner = threading.get_ident()
        s._depth += 1
        return s._conn

    def __exit__(self, exc_type, exc, tb) -> None:
        s = self._s
        try:
            s._depth -= 1
            if s._depth == 0:
                s._owner = None
                if exc_type is None:
                    try:
                        s._conn.execute("COMMIT")
                    except BaseException:
                        if s._conn.in_transaction:  # e.g. disk full at commit
                            s._conn.execute("ROLLBACK")
                        raise
                else:
                    if s._conn.in_transaction:
                        s._conn.execute("ROLLBACK")
        finally:
            s._lock.release()
