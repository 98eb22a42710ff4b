"""The SQLite outbox: nothing leaves before it is stored; a seq is never reused or skipped."""
from __future__ import annotations

import sqlite3

import pytest

from agent.outbox.ingest import Ingest
from drivers.core.model import Frame, Sample
from agent.outbox.store import PRIO_EVENT, PRIO_TELEMETRY, Store


def _build(seq, samples, frames):
    return f"{seq}:{len(samples)}:{len(frames)}".encode()


def test_seal_moves_rows_into_outbox_under_one_seq(tmp_path):
    st = Store(tmp_path / "a.db")
    st.add_samples([Sample("rpm", "rpm", 1000 + i, i) for i in range(10)])
    st.add_frames([Frame("can0", 1_000_000 + i, 0x100, False, b"\x01\x02") for i in range(3)])
    assert st.seal_telemetry(_build, max_samples=4, max_frames=10) == 1
    assert st.seal_telemetry(_build, max_samples=4, max_frames=10) == 2
    assert st.seal_telemetry(_build, max_samples=4, max_frames=10) == 3
    assert st.seal_telemetry(_build, max_samples=4, max_frames=10) is None
    items = st.outbox_items(10)
    assert [i.payload for i in items] == [b"1:4:3", b"2:4:0", b"3:2:0"]
    assert st.counts() == {"samples": 0, "frames": 0, "events": 0, "outbox": 3}


def test_failed_build_changes_nothing(tmp_path):
    st = Store(tmp_path / "a.db")
    st.add_samples([Sample("rpm", "rpm", 1000, 1)])

    def boom(*_):
        raise ValueError("too large")

    with pytest.raises(ValueError):
        st.seal_telemetry(boom, max_samples=10)
    assert st.counts()["samples"] == 1 and st.last_uplink_seq == 0
    assert st.seal_telemetry(_build, max_samples=10) == 1


def test_seq_survives_restart_and_is_never_reused(tmp_path):
    st = Store(tmp_path / "a.db")
    st.add_samples([Sample("a", "", 1, 1)])
    st.seal_telemetry(_build, max_samples=10)
    st.enqueue(lambda seq: b"ack", "up/ack")
    st.outbox_ack(1)
    st.outbox_ack(2)
    st.close()
    st = Store(tmp_path / "a.db")
    assert st.last_uplink_seq == 2
    st.add_event({"type": "x", "ts": 5})
    assert st.seal_events(lambda seq, body: repr(body).encode()) == [3]


def test_events_go_out_before_telemetry(tmp_path):
    st = Store(tmp_path / "a.db")
    st.add_samples([Sample("a", "", 1, 1)])
    st.seal_telemetry(_build, max_samples=10)
    st.add_event({"type": "dtc", "ts": 2})
    st.seal_events(lambda seq, body: b"event")
    items = st.outbox_items(10)
    assert [(i.seq, i.priority) for i in items] == [(2, PRIO_EVENT), (1, PRIO_TELEMETRY)]
    assert [i.seq for i in st.outbox_items(10, exclude={2})] == [1]


def test_unacked_outbox_is_resent_after_restart_byte_for_byte(tmp_path):
    st = Store(tmp_path / "a.db")
    st.add_samples([Sample("a", "", 1, 1)])
    st.seal_telemetry(_build, max_samples=10)
    before = st.outbox_items(10)
    st.close()
    after = Store(tmp_path / "a.db").outbox_items(10)
    assert before == after


def test_database_is_wal_and_synchronous_full(tmp_path):
    st = Store(tmp_path / "a.db")
    assert st.query("PRAGMA journal_mode")[0][0] == "wal"
    assert st.query("PRAGMA synchronous")[0][0] == 2  # FULL


def test_ingest_group_commits_and_flushes_on_stop(tmp_path):
    st = Store(tmp_path / "a.db")
    ing = Ingest(st, window_s=0.05)
    ing.start()
    ing.put_samples([Sample("a", "", i, i) for i in range(100)])
    ing.put_frames([Frame("can0", i, 1, False, b"") for i in range(50)])
    ing.stop()
    assert st.counts()["samples"] == 100 and st.counts()["frames"] == 50
    assert ing.stored == {"samples": 100, "frames": 50} and ing.dropped == {"samples": 0, "frames": 0}


def test_ingest_keeps_data_when_the_disk_fails_then_recovers(tmp_path, monkeypatch):
    st = Store(tmp_path / "a.db")
    ing = Ingest(st)
    real = st.add_samples
    calls = {"n": 0}

    def failing(samples):
        calls["n"] += 1
        if calls["n"] == 1:
            raise sqlite3.OperationalError("database or disk is full")
        return real(samples)

    monkeypatch.setattr(st, "add_samples", failing)
    ing.put_samples([Sample("a", "", 1, 1), Sample("a", "", 2, 2)])
    ing.flush()
    assert ing.errors == 1 and st.counts()["samples"] == 0
    ing.flush()
    assert st.counts()["samples"] == 2 and ing.dropped["samples"] == 0


def test_ingest_drops_and_counts_when_full(tmp_path):
    st = Store(tmp_path / "a.db")
    ing = Ingest(st, max_queued=2)
    for i in range(5):
        ing.put_samples([Sample("a", "", i, i)])
    assert ing.dropped["samples"] == 3
    ing.flush()
    assert st.counts()["samples"] == 2


def test_non_finite_values_are_dropped_not_stored(tmp_path):
    st = Store(tmp_path / "a.db")
    st.add_samples([Sample("a", "", 1, float("nan")), Sample("a", "", 2, 1.5),
                    Sample("a", "", 3, float("inf"))])
    assert st.counts()["samples"] == 1 and st.status()["non_finite_dropped"] == 2


def test_an_unsendable_event_is_dropped_and_never_holds_up_the_others(tmp_path):
    from agent.cloud import schemas
    st = Store(tmp_path / "a.db")
    st.add_event({"type": "dtc", "ts": 1, "codes": [{"code": "p0301", "state": "stored", "desc": ""}], "mil": True})
    st.add_event({"type": "health", "ts": 2, "kind": "snapshot", "level": "info", "detail": {}})
    st.add_event({"type": "health", "ts": 3, "kind": "driving", "level": "info", "detail": {}})

    def prepare(body):
        if body["kind" if "kind" in body else "type"] == "driving":
            return None  # e.g. the privacy gate
        schemas.validate("event", body)
        return body

    seqs = st.seal_events(lambda seq, body: repr(body).encode(), prepare=prepare)
    assert seqs == [1] and st.counts()["events"] == 0 and st.events_invalid == 1
    assert b"snapshot" in st.outbox_items(5)[0].payload


def test_opens_a_database_written_by_the_sqlite_utils_schema(tmp_path):
    """Agents up to 0.1 created their tables through sqlite-utils (bracket-quoted names, FLOAT,
    schema 1 without outbox.content); an updated agent must open such a database and keep and
    send what it holds."""
    path = tmp_path / "a.db"
    c = sqlite3.connect(path)
    c.executescript("""
        CREATE TABLE [samples] ([id] INTEGER PRIMARY KEY, [name] TEXT, [unit] TEXT, [t_ms] INTEGER, [value] FLOAT);
        CREATE TABLE [frames] ([id] INTEGER PRIMARY KEY, [bus] TEXT, [t_us] INTEGER, [can_id] INTEGER,
                               [ext] INTEGER, [data] BLOB);
        CREATE TABLE [events] ([id] INTEGER PRIMARY KEY, [ts] INTEGER, [body] BLOB);
        CREATE TABLE [outbox] ([seq] INTEGER PRIMARY KEY, [suffix] TEXT, [payload] BLOB, [priority] INTEGER,
                               [created_ms] INTEGER);
        CREATE TABLE [meta] ([key] TEXT PRIMARY KEY, [value] TEXT);
        CREATE TABLE [downlink_seq] ([kind] TEXT PRIMARY KEY, [seq] INTEGER);
        CREATE TABLE [configs] ([version] INTEGER PRIMARY KEY, [doc] TEXT, [applied_ms] INTEGER);
        INSERT INTO samples(name, unit, t_ms, value) VALUES ('rpm', 'rpm', 1000, 812.5);
        INSERT INTO outbox VALUES (7, 'up/event', x'a1', 1, 1000);
        INSERT INTO meta VALUES ('uplink_seq', '7');
    """)
    c.commit()
    c.close()
    st = Store(path)
    assert [(i.seq, i.payload) for i in st.outbox_items(10)] == [(7, b"\xa1")]
    assert st.seal_telemetry(_build, max_samples=10) == 8
    assert st.query("SELECT content FROM outbox WHERE seq = 8") == [("signals",)]


def test_sealed_frames_are_the_columns_of_the_frames_in_wire_order(tmp_path):
    """The store hands frames over as columns sorted by SQLite; the body is the one built from
    the Frame objects themselves (bus, ext, id, time; ties in arrival order)."""
    from agent.outbox.telemetry import telemetry_body
    rng = __import__("random").Random(7)
    frames = [Frame(rng.choice(["can1", "can0"]), 1_760_000_000_000_000 + rng.randrange(0, 5_000_000),
                    rng.choice([0x7E8, 0x1A0, 0x18DAF110, 0x25]), False, bytes([i % 256, rng.randrange(256)]))
              for i in range(3000)]
    frames = [Frame(f.bus, f.t_us, f.can_id, f.can_id > 0x7FF, f.data) for f in frames]
    frames += [Frame("can0", frames[0].t_us, 0x25, False, b"\x01"), Frame("can0", frames[0].t_us, 0x25, False, b"\x02")]
    st = Store(tmp_path / "a.db")
    st.add_frames(frames)
    bodies = []
    st.seal_telemetry(lambda seq, s, f: bodies.append(telemetry_body(s, f)) or b"x", max_samples=0, max_frames=10_000)
    assert bodies == [telemetry_body([], frames)]
    assert [g["bus"] for g in bodies[0]["frames"]] == ["can0", "can1"]
    assert sum(len(g["t"]) for g in bodies[0]["frames"]) == len(frames)


def test_export_shows_stored_frames_and_dead_letters_as_columns(tmp_path):
    """``dongle export`` reads the store as it is: frame blocks come out as plain columns (times,
    ids, ext flags, payloads), quarantined rows with their reason and content."""
    import sqlite3 as sq

    from agent.owner.datakey import DataKey
    from agent.owner.export import export_records
    st = Store(tmp_path / "a.db")
    frames = [Frame("can0", 1_760_000_000_000_000 + i, 0x18DAF110 if i % 2 else 0x25, bool(i % 2), bytes([i]))
              for i in range(4)]
    st.add_frames(frames)
    st.add_samples([Sample("rpm", "rpm", 1_760_000_000_000, 800)])
    st.query("UPDATE samples SET name = ''")          # a row no envelope can carry
    assert st.seal_telemetry(_build, max_samples=10, max_frames=0) is None
    st.close()
    conn = sq.connect(tmp_path / "a.db")
    _, rows = export_records(conn, DataKey.in_dir(tmp_path), device_id="dev-1")
    recs = list(rows)
    (block,) = [r for r in recs if r["record"] == "frames"]
    assert block["bus"] == "can0" and block["n"] == 4
    assert block["t_us"] == [f.t_us for f in frames] and block["id"] == [f.can_id for f in frames]
    assert block["ext"] == [f.extended for f in frames] and block["data"] == [f.data.hex() for f in frames]
    (dead,) = [r for r in recs if r["record"] == "quarantine"]
    assert dead["source"] == "samples" and dead["row"][1:] == ["", "rpm", 1_760_000_000_000, 800.0]
