"""The service record chain (PROTOCOL §5): a local, append-only, hash-chained log of completed services.

Each record is the ``service_record`` event body without its ``hash``::

    {"type": "service_record", "ts": <ms>, "booking_id": ..., "odometer_km": ..., "items": [...],
     "technician": ..., "prev_hash": <hex>}

and ``hash = SHA-256(prev_hash_bytes || CBOR(record))`` where ``prev_hash_bytes`` is the previous
record's hash (32 zero bytes for the first) and CBOR is the deterministic encoding: map keys in
length-first order (for our short text keys identical to RFC 8949 §4.2.1 bytewise order of the
encoded keys), integers and floats in their shortest form (``cbor2.dumps(record,
canonical=True)``). The event sent to the cloud is the record plus ``hash``, so the cloud can
recompute the chain from the events alone.

The table ``service_log`` refuses UPDATE and DELETE (SQLite triggers); :func:`verify` recomputes
every hash, so an edit made behind the agent's back (triggers dropped, file patched) shows as a
broken hash at the edited record and a broken link at every record after it.
"""
from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import cbor2

from drivers.core.clock import Clock

log = logging.getLogger(__name__)

TABLE = "service_log"
ZERO_HASH = bytes(32)
MAX_ITEMS = 50
MAX_TEXT = 200


class ServiceLogError(ValueError):
    """A record that cannot be appended (bad input); ``str()`` is shown to the technician."""


def encode(record: dict) -> bytes:
    """The deterministic CBOR encoding a record is hashed over."""
    return cbor2.dumps(record, canonical=True)


def chain_hash(prev_hash: bytes, record: dict) -> bytes:
    """``SHA-256(prev_hash || CBOR(record))`` (PROTOCOL §5); ``record`` must not hold ``hash``."""
    if "hash" in record:
        raise ValueError("the record to hash must not contain 'hash'")
    return hashlib.sha256(prev_hash + encode(record)).digest()


def _number(km: float) -> int | float:
    km = float(km)
    return int(km) if km.is_integer() else round(km, 1)


def _clean_items(items: Iterable[str]) -> list[str]:
    out = [str(i).strip() for i in items if str(i).strip()]
    if not out:
        raise ServiceLogError("a service record needs at least one item (--item ...)")
    if len(out) > MAX_ITEMS:
        raise ServiceLogError(f"at most {MAX_ITEMS} items per record")
    for i in out:
        if len(i) > MAX_TEXT or not i.isprintable():
            raise ServiceLogError(f"item {i[:40]!r}: at most {MAX_TEXT} printable characters")
    return out


@dataclass
class Verification:
    ok: bool
    records: int
    problems: list[dict] = field(default_factory=list)   # {"index", "booking_id", "problem"}
    head: str = ZERO_HASH.hex()                           # hash of the last record as stored

    def as_dict(self) -> dict:
        return {"ok": self.ok, "records": self.records, "problems": self.problems, "head": self.head}


class ServiceLog:
    """The chain in the agent's store (``agent.store.Store``)."""

    def __init__(self, store, *, clock: Callable[[], int] | None = None):
        self.store = store
        self._clock = clock or Clock().now_ms
        store.create_tables(f"{TABLE} (idx INTEGER PRIMARY KEY, ts INTEGER NOT NULL, "
                            "booking_id TEXT NOT NULL, record BLOB NOT NULL, hash TEXT NOT NULL)")
        with store.batch() as c:
            for op in ("UPDATE", "DELETE"):
                c.execute(f"CREATE TRIGGER IF NOT EXISTS {TABLE}_no_{op.lower()} BEFORE {op} ON {TABLE} "
                          f"BEGIN SELECT RAISE(ABORT, '{TABLE} is append-only'); END")

    def head(self) -> bytes:
        rows = self.store.query(f"SELECT hash FROM {TABLE} ORDER BY idx DESC LIMIT 1")
        return bytes.fromhex(rows[0][0]) if rows else ZERO_HASH

    def append(self, booking_id: str, odometer_km: float, items: Iterable[str], technician: str,
               *, ts: int | None = None) -> dict:
        """Appends a record and returns the ``service_record`` event body (record + ``hash``).

        Call inside ``store.batch()`` together with whatever else the completion writes (the event
        itself, the booking's status), so all of it commits or none does."""
        if not isinstance(odometer_km, (int, float)) or isinstance(odometer_km, bool) \
                or not 0 <= odometer_km < 10_000_000:
            raise ServiceLogError(f"odometer {odometer_km!r} km is not a plausible reading")
        technician = str(technician).strip()
        if not technician or len(technician) > MAX_TEXT or not technician.isprintable():
            raise ServiceLogError("the technician's name must be 1-200 printable characters")
        with self.store.batch() as c:
            row = c.execute(f"SELECT hash FROM {TABLE} ORDER BY idx DESC LIMIT 1").fetchone()
            prev = bytes.fromhex(row[0]) if row else ZERO_HASH
            record = {"type": "service_record", "ts": int(ts if ts is not None else self._clock()),
                      "booking_id": str(booking_id), "odometer_km": _number(odometer_km),
                      "items": _clean_items(items), "technician": technician, "prev_hash": prev.hex()}
            digest = chain_hash(prev, record)
            c.execute(f"INSERT INTO {TABLE}(ts, booking_id, record, hash) VALUES (?,?,?,?)",
                      (record["ts"], record["booking_id"], encode(record), digest.hex()))
        log.info("service log: record for booking %s appended (hash %s…)", booking_id, digest.hex()[:16])
        return {**record, "hash": digest.hex()}

    def records(self) -> list[dict]:
        """Every record as stored, oldest first, each with its stored ``hash``."""
        rows = self.store.query(f"SELECT record, hash FROM {TABLE} ORDER BY idx")
        return [_row_to_record(r, h) for r, h in rows]

    def last_by_item(self) -> dict[str, dict]:
        """``{item (lower case): the latest record listing it}``: the last service of each kind."""
        out: dict[str, dict] = {}
        for rec in self.records():
            for item in rec.get("items", []):
                out[str(item).strip().lower()] = rec
        return out

    def verify(self) -> Verification:
        return verify_rows(self.store.query(f"SELECT record, hash FROM {TABLE} ORDER BY idx"))


def _row_to_record(record: bytes, digest: str) -> dict:
    try:
        rec = cbor2.loads(record)
    except Exception as e:  # a corrupted row still shows, as such
        return {"booking_id": "?", "corrupt": f"{type(e).__name__}: {e}", "hash": digest}
    return {**rec, "hash": digest} if isinstance(rec, dict) else {"corrupt": "not a map", "hash": digest}


def verify_rows(rows: Iterable[tuple[bytes, str]]) -> Verification:
    """Recomputes the chain over ``(record CBOR, stored hash hex)`` rows, oldest first."""
    prev = ZERO_HASH
    problems: list[dict] = []
    n = 0
    head = ZERO_HASH.hex()
    for n, (blob, stored) in enumerate(rows, start=1):
        idx = n - 1
        head = stored
        try:
            record = cbor2.loads(blob)
            if not isinstance(record, dict):
                raise ValueError("not a map")
        except Exception as e:
            problems.append({"index": idx, "booking_id": "?", "problem": f"record unreadable: {e}"})
            prev = hashlib.sha256(prev + bytes(blob)).digest()  # keep going; the link after breaks too
            continue
        bid = str(record.get("booking_id", "?"))
        wrong = []
        if record.get("prev_hash") != prev.hex():
            wrong.append("prev_hash does not match the hash of the record before it")
        if "hash" in record:
            wrong.append("record carries a hash field")
            record = {k: v for k, v in record.items() if k != "hash"}
        digest = chain_hash(prev, record)
        if bytes(blob) != encode(record):
            wrong.append("record is not in deterministic CBOR")
        if digest.hex() != stored:
            wrong.append("hash does not match the record's contents")
        if wrong:
            problems.append({"index": idx, "booking_id": bid, "problem": "; ".join(wrong)})
        prev = digest
    return Verification(ok=not problems, records=n, problems=problems, head=head)

