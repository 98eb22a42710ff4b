"""Store and forward, in-process: clock fix-up, the disk budget, a full or read-only disk, and a
"power cut" at the filesystem level (the DB and WAL files copied mid-write, as a power loss
leaves them). The process-level power cut and the broker outage are in test_store_powercut.py.
"""
from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from agent.cloud import protocol, schemas
from drivers.core.clock import PLAUSIBLE_AFTER_MS, Clock
from agent.outbox import frame_blocks
from agent.outbox.ingest import Ingest
from agent.cloud.keys import key_id
from drivers.core.model import Frame, Sample
from agent.outbox.store import PRIO_EVENT, Store
from agent.outbox.uplink import Sealer, Uplink, upload_policy
from scripts.testbed.wait import wait_until

DEV = "store-0001"


class Keys:
    def __init__(self):
        self.sign = Ed25519PrivateKey.generate()
        self.cloud = X25519PrivateKey.generate()
        self.sealer = Sealer(DEV, self.sign, self.cloud.public_key())

    def open(self, payload: bytes, kind: str = "telemetry"):
        return protocol.open_envelope(payload, expected_dev=DEV, expected_kind=kind,
                                      trusted_signers={key_id(self.sign.public_key()): self.sign.public_key()},
                                      recipient_key=self.cloud, now_ms=None, last_seq=None)


class NoLink:
    connected = False


@pytest.fixture
def keys():
    return Keys()


@pytest.fixture
def unsynced_clock():
    """A Pi without RTC: the wall clock reads 1970 + uptime until "NTP" sets it."""
    state = {"synced": False}
    boot_wall = 12_345 * 10**9  # 1970-01-01T03:25:45

    def wall_ns():
        return time.time_ns() if state["synced"] else boot_wall + time.monotonic_ns()

    return Clock(wall_ns=wall_ns, boot_id="boot-now"), state


# --------------------------------------------------------------------------------------------
# Clock
# --------------------------------------------------------------------------------------------

def test_samples_before_clock_sync_get_true_times_once_synced(tmp_path, keys, unsynced_clock):
    clock, state = unsynced_clock
    st = Store(tmp_path / "a.db", clock=clock)
    ing = Ingest(st, window_s=0.05)
    up = Uplink(st, NoLink(), keys.sealer, interval_s=lambda: 1)
    true_times = []
    for i in range(5):
        true_times.append(time.time_ns() // 10**6)
        ing.put_samples([Sample("rpm", "rpm", clock.now_ms(), 800 + i)])
        ing.put_frames([Frame("can0", clock.now_us(), 0x123, False, bytes([i]))])
        time.sleep(0.02)
    st.add_event({"type": "trip_start", "ts": clock.now_ms()})
    ing.flush()
    rows = st.query("SELECT t_ms FROM samples ORDER BY id")
    assert len(rows) == 5 and all(r[0] < PLAUSIBLE_AFTER_MS for r in rows)  # provisional
    assert up.seal_telemetry() == [] and up.seal_events() == []            # nothing sent as 1970
    assert st.counts()["outbox"] == 0

    state["synced"] = True  # NTP steps the clock
    ing.put_samples([Sample("rpm", "rpm", clock.now_ms(), 900)])
    ing.flush()
    got = [r[0] for r in st.query("SELECT t_ms FROM samples ORDER BY id")]
    assert all(abs(g - t) < 50 for g, t in zip(got, true_times)), (got, true_times)
    stored = [t for bus, block in st.query("SELECT bus, block FROM frames ORDER BY id")
              for t in frame_blocks.decode(bus, block).t_us]
    assert len(stored) == 5 and all(abs(t // 1000 - tt) < 50 for t, tt in zip(stored, true_times))
    seqs = up.seal_events() + up.seal_telemetry()
    assert len(seqs) == 2
    bodies = [keys.open(i.payload, "event" if i.priority == PRIO_EVENT else "telemetry").body
              for i in st.outbox_items(10)]
    event, tele = bodies
    assert abs(event["ts"] - true_times[-1]) < 200
    assert tele["t0"] >= PLAUSIBLE_AFTER_MS and abs(tele["t0"] - true_times[0]) < 50
    assert not st.has_provisional()


def test_rows_from_a_boot_that_never_synced_are_placed_after_the_last_known_time(tmp_path, keys,
                                                                                  unsynced_clock):
    clock, state = unsynced_clock
    st = Store(tmp_path / "a.db", clock=clock)
    last_true = 1_760_000_000_000
    st.set_meta("clock_last_true_ms", last_true)
    st.add_samples([Sample("rpm", "rpm", 5_000 + i, i) for i in range(3)])  # an earlier boot's stamps
    st.note_provisional("boot-before")
    ing = Ingest(st, window_s=0.05)
    ing.start()   # this boot: the old rows are re-timed before any new provisional row is written
    ing.stop()
    times = [r[0] for r in st.query("SELECT t_ms FROM samples ORDER BY id")]
    assert times == [last_true + 5_000 + i for i in range(3)]
    (body,) = [cbor2.loads(r[0]) for r in st.query("SELECT body FROM events")]
    assert body["type"] == "health" and body["kind"] == "clock" and body["detail"]["estimated_rows"] == 3
    schemas.validate("event", body)


# --------------------------------------------------------------------------------------------
# Disk budget
# --------------------------------------------------------------------------------------------

def _fill(st, up, ing, n_batches, frames_per_batch=2000, samples_per_batch=500, t0=1_760_000_000_000):
    for b in range(n_batches):
        t = t0 + b * 10_000
        noise = os.urandom(frames_per_batch * 2)
        ing.put_frames([Frame("can0", (t + i) * 1000, 0x100 + i % 50, False, bytes(6) + noise[2 * i:2 * i + 2])
                        for i in range(frames_per_batch)])
        ing.flush()
        up.seal_telemetry(samples=False)
        ing.put_samples([Sample(f"s{i % 10}", "", t + i, i * 0.37) for i in range(samples_per_batch)])
        ing.flush()
        up.seal_telemetry(frames=False)


def test_disk_budget_is_never_exceeded_and_evicts_frames_first_with_explained_gaps(tmp_path, keys):
    budget = 2 * 1024 * 1024
    st = Store(tmp_path / "a.db", budget_bytes=budget)
    ing = Ingest(st)
    up = Uplink(st, NoLink(), keys.sealer, interval_s=lambda: 1)
    st.add_event({"type": "trip_start", "ts": 1_760_000_000_000})
    up.seal_events()
    acks = [st.enqueue(lambda seq: b"ack-%d" % seq, "up/ack") for _ in range(3)]
    peak = 0
    for _ in range(40):
        _fill(st, up, ing, 1, frames_per_batch=8000)
        peak = max(peak, st.usage_bytes())
        assert st.usage_bytes() <= budget
    assert ing.errors == 0 or ing.problem is None
    assert peak > budget * 0.6  # it really was filled
    up.seal_events()
    items = {i.seq: i for i in st.outbox_items(100000)}
    # Events and acks are never evicted for telemetry.
    assert 1 in items and all(a in items for a in acks)
    evictions = []
    for i in items.values():
        if i.suffix == "up/event":
            body = keys.open(i.payload, "event").body
            if body["type"] == "buffer_evicted":
                schemas.validate("event", body)
                evictions.append(body)
    assert evictions, "nothing was evicted"
    # Raw frames went first: the signal envelopes are all still there while frames were dropped.
    assert all("frames" in e["reason"] for e in evictions)
    kept = {seq for seq, i in items.items()}
    sealed_max = st.last_uplink_seq
    explained = set()
    for e in evictions:
        explained |= {s for s in range(e["from_seq"], e["to_seq"] + 1) if s not in kept}
    missing = {s for s in range(1, sealed_max + 1) if s not in kept}
    assert missing == explained  # every gap is explained, no more
    assert sum(e["count"] for e in evictions) == len(missing)

    # Later, only signal envelopes are left to evict: the oldest go, still explained.
    for b in range(120):
        ing.put_samples([Sample(f"s{i % 10}", "", 1_770_000_000_000 + b * 10_000 + i, x / 7)
                         for i, x in enumerate(os.urandom(4000))])
        ing.flush()
        up.seal_telemetry()
        assert st.usage_bytes() <= budget
    up.seal_events()
    reasons = {keys.open(i.payload, "event").body["reason"] for i in st.outbox_items(100000)
               if i.suffix == "up/event" and keys.open(i.payload, "event").body["type"] == "buffer_evicted"}
    assert any("signals" in r for r in reasons)
    assert all(a in {i.seq for i in st.outbox_items(100000)} for a in acks)
    assert st.query("PRAGMA integrity_check") == [("ok",)]


# --------------------------------------------------------------------------------------------
# Full disk, read-only filesystem (a real tmpfs; root only)
# --------------------------------------------------------------------------------------------

@pytest.fixture
def tiny_fs(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_and_read_only_fs_keep_running_then_recover(tiny_fs, keys):
    st = Store(tiny_fs / "agent.db")  # no budget: the filesystem itself runs out
    woke = []
    ing = Ingest(st, window_s=0.05, max_held_frames=5000, on_event=lambda: woke.append(1))
    filler = tiny_fs / "filler"
    with open(filler, "wb") as f:  # someone else fills the disk
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    n = 0
    for _ in range(40):
        ing.put_samples([Sample("rpm", "rpm", 1_760_000_000_000 + n + i, i) for i in range(200)])
        ing.put_frames([Frame("can0", (1_760_000_000_000 + n + i) * 1000, 1, False, os.urandom(8))
                        for i in range(400)])
        n += 200
        ing.flush()
    assert ing.problem == "disk_full", ing.status()
    assert ing.status()["held"]["samples"] == 8000          # every sample kept in memory
    assert ing.status()["held"]["frames"] == 5000           # frames bounded, oldest dropped
    assert ing.dropped["frames"] == 16000 - 5000
    assert st.add_event({"type": "trip_end", "ts": 1_760_000_000_000, "distance_km": 3.5, "duration_s": 600}) is None
    assert st.status()["memory_events"] == 1 and st.status()["problem"] == "disk_full"

    filler.unlink()  # space returns
    ing.flush()
    assert ing.problem is None and st.counts()["samples"] == 8000 and st.counts()["frames"] == 5000
    up = Uplink(st, NoLink(), keys.sealer, interval_s=lambda: 1)
    up.seal_events()
    bodies = [keys.open(i.payload, "event").body for i in st.outbox_items(100) if i.suffix == "up/event"]
    types = sorted(b["type"] for b in bodies)
    assert types == ["buffer_evicted", "trip_end"]          # the held event, and the explained loss
    lost = [b for b in bodies if b["type"] == "buffer_evicted"][0]
    assert lost["frames"] == 11000 and lost["samples"] == 0

    # Read-only: a tmpfs with open files cannot be remounted read-only, so SQLite is told to
    # refuse writes itself (the same SQLITE_READONLY a read-only filesystem gives).
    st.query("PRAGMA query_only=ON")
    ing.put_samples([Sample("rpm", "rpm", 1_760_000_100_000, 1)])
    ing.flush()
    assert ing.problem == "read_only", ing.status()
    assert st.add_event({"type": "trip_start", "ts": 1_760_000_100_000}) is None
    st.query("PRAGMA query_only=OFF")
    ing.flush()
    assert ing.problem is None and st.counts()["samples"] == 8001
    up.seal_events()
    assert st.status()["memory_events"] == 0
    assert st.query("PRAGMA integrity_check") == [("ok",)]


# --------------------------------------------------------------------------------------------
# Filesystem-level power cut: copy the DB and WAL mid-write and reopen the copy
# --------------------------------------------------------------------------------------------

WRITER = r"""
import sys, time, os
from agent.outbox.store import Store
from drivers.core.model import Sample, Frame
st = Store(sys.argv[1])
n = 0
while True:
    with st.batch():
        st.add_samples([Sample("n", "", 1_760_000_000_000 + n + i, n + i) for i in range(100)])
        st.add_frames([Frame("can0", 1_760_000_000_000_000 + n + i, 7, False, os.urandom(8)) for i in range(100)])
    n += 100
    if n % 1000 == 0:
        st.seal_telemetry(lambda seq, s, f: b"x" * 2000 + bytes(str(seq), "ascii"), max_samples=700, max_frames=700)
    if n % 3000 == 0:
        for item in st.outbox_items(3):
            st.outbox_ack(item.seq)
"""


def test_db_and_wal_copied_mid_write_reopen_consistent(tmp_path):
    db = tmp_path / "live" / "agent.db"
    db.parent.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(db)], cwd=Path(__file__).parent.parent)
    try:
        deadline = time.monotonic() + 30
        while not Path(f"{db}-wal").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        last_seq = 0
        for i in range(12):
            time.sleep(0.15)
            snap = tmp_path / f"cut{i}"
            snap.mkdir()
            # The order a crash can leave: the WAL is read after the main file; copy both raw.
            for suffix in ("", "-wal"):
                try:
                    shutil.copyfile(f"{db}{suffix}", snap / f"agent.db{suffix}")
                except FileNotFoundError:
                    pass
            c = sqlite3.connect(snap / "agent.db")
            assert c.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            seq = int((c.execute("SELECT value FROM meta WHERE key='uplink_seq'").fetchone() or [0])[0])
            outbox = [r[0] for r in c.execute("SELECT seq FROM outbox ORDER BY seq")]
            assert all(s <= seq for s in outbox)                 # no envelope beyond the counter
            ns = [r[0] for r in c.execute("SELECT value FROM samples ORDER BY id")]
            assert ns == list(range(int(ns[0]), int(ns[0]) + len(ns))) if ns else True  # no holes
            assert len(ns) % 100 == 0                            # whole transactions only
            c.close()
            # The copy opens as the agent would, and goes on numbering after the counter.
            st = Store(snap / "agent.db")
            assert st.enqueue(lambda s: b"x", "up/ack") == seq + 1
            st.close()
            last_seq = max(last_seq, seq)
        assert last_seq > 0 and proc.poll() is None
    finally:
        proc.kill()
        proc.wait()


# --------------------------------------------------------------------------------------------
# Upload policy
# --------------------------------------------------------------------------------------------

def test_upload_policy_by_vehicle_state():
    doc = {"version": 1, "upload": {"interval_s": 5, "by_state": {"parked": {"interval_s": 3600},
                                                                   "charging": {"interval_s": 300}},
                                    "drain": "newest_first", "rate_bps": 2000, "daily_budget_bytes": 10**6},
           "obd": {"pids": [], "dtc_period_s": 60}, "can": {"signals": [], "raw": {"enabled": False, "ids": []}}}
    schemas.validate("config", doc)
    assert upload_policy(doc, "on").interval_s == 5
    assert upload_policy(doc, "parked").interval_s == 3600
    assert upload_policy(doc, "settling").interval_s == 3600
    assert upload_policy(doc, "charging").interval_s == 300
    assert upload_policy(doc, None).interval_s == 5
    p = upload_policy(doc, "on")
    assert (p.drain, p.rate_bps, p.daily_budget_bytes) == ("newest_first", 2000, 10**6)
    assert upload_policy({"upload": {"interval_s": 5}}).drain == "oldest_first"


# --------------------------------------------------------------------------------------------
# Sending policy against the real broker: drain order, daily budget, events first
# --------------------------------------------------------------------------------------------

def test_drain_order_daily_budget_and_events_first_against_the_broker(fleet):
    from agent import settings
    from agent.compose import build
    toml = fleet.device(DEV)
    agent = build(settings.load(toml))
    doc = {"upload": {"interval_s": 5, "drain": "newest_first"}}
    up = Uplink(agent.store, agent.link, agent.sealer, config=lambda: doc, batch_max_samples=500)
    agent.link._on_connection = lambda ok: up.on_connection(ok)
    agent.link.start()
    try:
        assert agent.link.wait_connected(30)
        for b in range(6):
            agent.store.add_samples([Sample("v", "", 1_760_000_000_000 + b * 1000 + i, (b * 500 + i) / 3)
                                     for i in range(500)])
            up.seal_telemetry()
        agent.store.add_event({"type": "trip_start", "ts": 1_760_000_009_000})
        up.seal_events()
        size = max(len(i.payload) for i in agent.store.outbox_items(10) if i.suffix == "up/telemetry")
        doc["upload"]["daily_budget_bytes"] = 3 * size + 100  # room for about three envelopes
        c = fleet.console
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and up.held_by != "daily_budget":
            up.publish_pending()
            time.sleep(0.1)
        assert up.held_by == "daily_budget"
        assert c.wait_for(lambda r: r.get("kind") == "event" and r["dev"] == DEV, 30)
        def telemetry_seqs():
            return [r["seq"] for r in c.records if r.get("kind") == "telemetry" and r["dev"] == DEV]
        wait_until(lambda: len(telemetry_seqs()) >= 2, 30)  # what the budget let out, however slow
        c.wait_for(lambda r: False, 1)                       # and nothing more arrives after it
        tele = telemetry_seqs()
        assert tele == [6, 5, 4][:len(tele)] and len(tele) >= 2, (tele, [(r.get("kind"), r.get("seq"), r.get("rejected"), r.get("detail")) for r in c.records], up.status())  # newest first, then held
        arrived = [r["seq"] for r in c.records if r["dev"] == DEV and "seq" in r]
        assert arrived[0] == 7  # the event went ahead of every telemetry envelope
        assert agent.store.daily_bytes() <= doc["upload"]["daily_budget_bytes"]
        doc["upload"].pop("daily_budget_bytes")
        while time.monotonic() < deadline + 30 and agent.store.counts()["outbox"]:
            up.publish_pending()
            time.sleep(0.1)
        assert agent.store.counts()["outbox"] == 0
    finally:
        agent.link.stop()
        agent.store.close()


def test_the_schema_rejects_what_is_wrong_anywhere_in_a_column():
    """What a cloud checks on every telemetry body (the agent builds them valid and does not
    check them again, agent.outbox.telemetry): a fault deep in a column is found."""
    import copy

    from agent.cloud.schemas import SchemaError
    from agent.outbox.telemetry import telemetry_body
    good = telemetry_body([Sample("a", "", 1_760_000_000_000 + i, i / 3) for i in range(5)],
                          [Frame("can0", 1_760_000_000_000_000 + i, 0x100 + i, False, b"\x01") for i in range(5)])
    schemas.validate("telemetry", good)
    mutations = [("signals", "t", -1), ("signals", "t", True), ("signals", "v", float("inf")),
                 ("signals", "v", "x"), ("frames", "id", 0x800), ("frames", "ext", 0),
                 ("frames", "data", b"x" * 65), ("frames", "data", "text"), ("frames", "t", 1.5)]
    for group, col, bad in mutations:
        body = copy.deepcopy(good)
        body[group][0][col][3] = bad  # deep in the column
        with pytest.raises(SchemaError):
            schemas.validate("telemetry", body)
    body = copy.deepcopy(good)
    body["signals"][0]["v"].append(1)
    with pytest.raises(SchemaError):
        schemas.validate("telemetry", body)
