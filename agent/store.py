"""The agent's durable outbox: SQLite in WAL mode (sqlite-utils).

Everything the agent collects is written here before anything is sent, and leaves only after
the broker has acknowledged it:

* ``samples``, ``frames`` and ``events`` hold data not yet sealed;
* sealing moves a batch of them into ``outbox`` as one finished envelope **in the same
  transaction** that takes the next uplink ``seq`` from ``meta``. An envelope therefore keeps its
  ``seq`` for ever: after a crash it is re-sent byte for byte, so the cloud's dedup on
  ``(dev, seq)`` sees a duplicate, never the same data under two numbers, and no ``seq`` is
  skipped or reused;
* an ``outbox`` row is deleted only when the broker's PUBACK for it arrives.

``synchronous=FULL``: a committed transaction survives a power cut (WAL is fsynced at commit).
One connection, serialised by a lock, is shared by the agent's threads.
"""
from __future__ import annotations

import json
import logging
import sqlite3
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import cbor2
import sqlite_utils

from agent.clock import now_ms
from agent.model import Frame, Sample

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1


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


class Store:
    def __init__(self, path: str | Path, *, clock: Callable[[], int] = now_ms):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._clock = clock
        self._lock = threading.RLock()
        self._depth = 0  # transaction nesting of the thread holding the lock
        conn = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self.db = sqlite_utils.Database(conn)
        self._conn = conn
        self.db.enable_wal()
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA busy_timeout=5000")
        self._create()

    # -- schema ---------------------------------------------------------------------------
    def _create(self) -> None:
        db = self.db
        db["samples"].create({"id": int, "name": str, "unit": str, "t_ms": int, "value": float},
                             pk="id", if_not_exists=True)
        db["frames"].create({"id": int, "bus": str, "t_us": int, "can_id": int, "ext": int,
                             "data": bytes}, pk="id", if_not_exists=True)
        db["events"].create({"id": int, "ts": int, "body": bytes}, pk="id", if_not_exists=True)
        db["outbox"].create({"seq": int, "suffix": str, "payload": bytes, "priority": int,
                             "created_ms": int}, pk="seq", if_not_exists=True)
        db["meta"].create({"key": str, "value": str}, pk="key", if_not_exists=True)
        db["downlink_seq"].create({"kind": str, "seq": int}, pk="kind", if_not_exists=True)
        db["configs"].create({"version": int, "doc": str, "applied_ms": int}, pk="version",
                             if_not_exists=True)
        if self.get_meta("schema_version") is None:
            self.set_meta("schema_version", SCHEMA_VERSION)

    def _txn(self):
        return _Transaction(self)

    def batch(self):
        """One transaction around several writes: ``with store.batch(): add_samples(); add_frames()``."""
        return _Transaction(self)

    # -- ingest ---------------------------------------------------------------------------
    def add_samples(self, samples: Iterable[Sample]) -> int:
        rows = [(s.name, s.unit, int(s.t_ms), float(s.value)) for s in samples]
        if rows:
            with self._txn() as c:
                c.executemany("INSERT INTO samples(name, unit, t_ms, value) VALUES (?,?,?,?)", rows)
        return len(rows)

    def add_frames(self, frames: Iterable[Frame]) -> int:
        rows = [(f.bus, int(f.t_us), int(f.can_id), int(f.extended), bytes(f.data)) for f in frames]
        if rows:
            with self._txn() as c:
                c.executemany("INSERT INTO frames(bus, t_us, can_id, ext, data) VALUES (?,?,?,?,?)",
                              rows)
        return len(rows)

    def add_event(self, body: dict) -> int:
        with self._txn() as c:
            cur = c.execute("INSERT INTO events(ts, body) VALUES (?, ?)",
                            (int(body.get("ts", self._clock())), cbor2.dumps(body)))
            return cur.lastrowid

    # -- sealing --------------------------------------------------------------------------
    def _next_seq(self, c: sqlite3.Connection) -> int:
        row = c.execute("SELECT value FROM meta WHERE key='uplink_seq'").fetchone()
        seq = (int(row[0]) if row else 0) + 1
        c.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('uplink_seq', ?)", (str(seq),))
        return seq

    def _put_outbox(self, c, seq: int, suffix: str, payload: bytes, priority: int) -> None:
        c.execute("INSERT INTO outbox(seq, suffix, payload, priority, created_ms) VALUES (?,?,?,?,?)",
                  (seq, suffix, payload, priority, self._clock()))

    def enqueue(self, build: Callable[[int], bytes], suffix: str, priority: int = PRIO_CONTROL) -> int:
        """Takes the next uplink seq, builds the envelope for it and queues it, atomically."""
        with self._txn() as c:
            seq = self._next_seq(c)
            self._put_outbox(c, seq, suffix, build(seq), priority)
            return seq

    def seal_events(self, build: Callable[[int, dict], bytes], limit: int = 100) -> list[int]:
        """Seals pending events, one envelope each (an event body is one event, PROTOCOL §4)."""
        seqs = []
        with self._txn() as c:
            rows = c.execute("SELECT id, body FROM events ORDER BY id LIMIT ?", (limit,)).fetchall()
            for event_id, body in rows:
                seq = self._next_seq(c)
                self._put_outbox(c, seq, "up/event", build(seq, cbor2.loads(body)), PRIO_EVENT)
                c.execute("DELETE FROM events WHERE id=?", (event_id,))
                seqs.append(seq)
        return seqs

    def seal_telemetry(self, build: Callable[[int, list[Sample], list[Frame]], bytes], *,
                       max_samples: int, max_frames: int = 0) -> int | None:
        """Seals the oldest pending samples (and frames) into one telemetry envelope.

        ``build`` may raise (e.g. the envelope is too large): the transaction is rolled back and
        nothing changes, so the caller can retry with a smaller batch.
        """
        with self._txn() as c:
            srows = c.execute("SELECT id, name, unit, t_ms, value FROM samples ORDER BY id LIMIT ?",
                              (max_samples,)).fetchall()
            frows = c.execute("SELECT id, bus, t_us, can_id, ext, data FROM frames ORDER BY id LIMIT ?",
                              (max_frames,)).fetchall() if max_frames else []
            if not srows and not frows:
                return None
            samples = [Sample(r[1], r[2], r[3], r[4]) for r in srows]
            frames = [Frame(r[1], r[2], r[3], bool(r[4]), bytes(r[5])) for r in frows]
            seq = self._next_seq(c)
            self._put_outbox(c, seq, "up/telemetry", build(seq, samples, frames), PRIO_TELEMETRY)
            if srows:
                c.execute("DELETE FROM samples WHERE id <= ?", (srows[-1][0],))
            if frows:
                c.execute("DELETE FROM frames WHERE id <= ?", (frows[-1][0],))
            return seq

    # -- sending --------------------------------------------------------------------------
    def outbox_items(self, limit: int, exclude: Iterable[int] = ()) -> list[OutboxItem]:
        exclude = set(exclude)
        with self._lock:
            rows = self._conn.execute(
                "SELECT seq, suffix, payload, priority FROM outbox ORDER BY priority, seq LIMIT ?",
                (limit + len(exclude),)).fetchall()
        return [OutboxItem(r[0], r[1], bytes(r[2]), r[3]) for r in rows if r[0] not in exclude][:limit]

    def outbox_ack(self, seq: int) -> None:
        with self._txn() as c:
            c.execute("DELETE FROM outbox WHERE seq=?", (seq,))

    def query(self, sql: str, params: tuple = ()) -> list[tuple]:
        """A read under the store's lock (the connection is shared by threads)."""
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    # -- state ----------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        with self._lock:
            return {t: self._conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
                    for t in ("samples", "frames", "events", "outbox")}

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
                      (int(doc["version"]), json.dumps(doc), self._clock()))
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
        s._depth += 1
        return s._conn

    def __exit__(self, exc_type, exc, tb) -> None:
        s = self._s
        try:
            s._depth -= 1
            if s._depth == 0:
                if exc_type is None:
                    try:
                        s._conn.execute("COMMIT")
                    except BaseException:
                        if s._conn.in_transaction:  # e.g. disk full at commit
                            s._conn.execute("ROLLBACK")
                        raise
                else:
                    s._conn.execute("ROLLBACK")
        finally:
            s._lock.release()
