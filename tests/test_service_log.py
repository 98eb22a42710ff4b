"""The service record chain (PROTOCOL §5): hashes recomputed independently, append-only, tampering found."""
from __future__ import annotations

import hashlib
import sqlite3

import cbor2
import pytest

from agent.cloud import schemas
from agent.technician.service_log import ServiceLog, ServiceLogError, verify_rows
from agent.outbox.store import Store


@pytest.fixture
def log_(tmp_path):
    store = Store(tmp_path / "agent.db")
    yield ServiceLog(store, clock=iter(range(1_750_000_000_000, 1_760_000_000_000, 1000)).__next__)
    store.close()


def _independent_hash(prev_hex: str, event: dict) -> str:
    """PROTOCOL §5 from the event alone, as a backend would: SHA-256(prev || CBOR(event - hash))."""
    record = {k: v for k, v in event.items() if k != "hash"}
    return hashlib.sha256(bytes.fromhex(prev_hex) + cbor2.dumps(record, canonical=True)).hexdigest()


def test_chain_from_the_events_alone(log_):
    events = [log_.append("b-1", 42_000, ["oil_change", "filter"], "anna"),
              log_.append("b-2", 57_500.5, ["brake_fluid"], "ben"),
              log_.append("b-3", 60_001, ["tyres"], "anna")]
    prev = "00" * 32
    for ev in events:
        schemas.validate("event", ev)
        assert ev["type"] == "service_record" and ev["prev_hash"] == prev
        assert ev["hash"] == _independent_hash(prev, ev)
        prev = ev["hash"]
    assert log_.head().hex() == prev
    assert log_.verify().ok and log_.verify().records == 3
    assert [r["hash"] for r in log_.records()] == [e["hash"] for e in events]
    assert log_.last_by_item()["oil_change"]["booking_id"] == "b-1"


def test_bad_input_is_refused_and_not_appended(log_):
    for args in (("b", -1, ["x"], "t"), ("b", 1, [], "t"), ("b", 1, ["x"], ""), ("b", "12", ["x"], "t"),
                 ("b", 1, ["ok", "bad\x1b[31m"], "t")):
        with pytest.raises(ServiceLogError):
            log_.append(*args)
    assert log_.records() == []


def test_table_is_append_only(log_):
    log_.append("b-1", 1000, ["oil_change"], "anna")
    for sql in ("UPDATE service_log SET booking_id='x'", "DELETE FROM service_log"):
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            with log_.store.batch() as c:
                c.execute(sql)
    assert log_.verify().ok


def test_tampering_with_an_old_record_breaks_every_hash_after_it(log_, tmp_path):
    for i in range(5):
        log_.append(f"b-{i}", 10_000 * (i + 1), ["oil_change"], "anna")
    # Someone with the file edits record 1's odometer behind the agent's back.
    db = sqlite3.connect(tmp_path / "agent.db")
    db.execute("DROP TRIGGER service_log_no_update")
    blob = db.execute("SELECT record FROM service_log WHERE idx=2").fetchone()[0]
    rec = cbor2.loads(blob)
    rec["odometer_km"] = 15_000
    db.execute("UPDATE service_log SET record=? WHERE idx=2", (cbor2.dumps(rec, canonical=True),))
    db.commit()
    rows = db.execute("SELECT record, hash FROM service_log ORDER BY idx").fetchall()
    db.close()
    v = verify_rows(rows)
    assert not v.ok
    assert [p["index"] for p in v.problems] == [1, 2, 3, 4]
    assert [p["problem"] for p in v.problems if p["index"] == 1] == ["hash does not match the record's contents"]
    assert all("prev_hash" in p["problem"] for p in v.problems if p["index"] > 1)


def test_rewriting_the_stored_hash_too_is_still_found(log_, tmp_path):
    for i in range(3):
        log_.append(f"b-{i}", 1000 * (i + 1), ["oil_change"], "anna")
    db = sqlite3.connect(tmp_path / "agent.db")
    db.execute("DROP TRIGGER service_log_no_update")
    first = db.execute("SELECT record FROM service_log WHERE idx=1").fetchone()[0]
    rec = cbor2.loads(first)
    rec["technician"] = "mallory"
    new = hashlib.sha256(bytes(32) + cbor2.dumps(rec, canonical=True)).hexdigest()
    db.execute("UPDATE service_log SET record=?, hash=? WHERE idx=1", (cbor2.dumps(rec, canonical=True), new))
    db.commit()
    rows = db.execute("SELECT record, hash FROM service_log ORDER BY idx").fetchall()
    db.close()
    v = verify_rows(rows)
    # Record 0 now verifies on its own, but record 1 still links to the original hash, and
    # from there on every recomputed hash differs from the stored one.
    assert [p["index"] for p in v.problems] == [1, 2]
    assert v.problems[0]["problem"].startswith("prev_hash does not match")


def test_deleted_record_breaks_the_chain(log_, tmp_path):
    for i in range(3):
        log_.append(f"b-{i}", 1000 * (i + 1), ["x"], "anna")
    rows = log_.store.query("SELECT record, hash FROM service_log ORDER BY idx")
    v = verify_rows([rows[0], rows[2]])
    assert [p["index"] for p in v.problems] == [1]
