"""Power cuts and broker outages against real processes: a real ``dongle-agent`` daemon reading a
CAN bus (python-can ``udp_multicast``) loaded with the real RAV4 drive replayed by
scripts/vehicle_sim/replay.py, plus a numbered source on the same bus (id 0x6AB, data = a counter), sending
through a real Mosquitto to the reference cloud console.

Power cut: the agent is SIGKILLed at random moments and restarted. After each cut the database
passes ``PRAGMA integrity_check`` and its persisted seq counter is at least every seq the cloud
has seen (so none can be reused). At the end, with everything delivered: every seq arrived
(after dedup exactly once, duplicates byte-identical in content), and every numbered frame
arrived except those sent in the last moments before a cut (the durability window, see
``WINDOW_S``) or while the agent was down or starting.

The 50-cut run is ``make soak`` (marker ``soak``); the default suite cuts 10 times.
"""
from __future__ import annotations

import os
import random
import re
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import can
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from scripts.testbed.shared_data import SHARED_DATA
from scripts.testbed.wait import wait_until

ROOT = Path(__file__).resolve().parent.parent
LOG = SHARED_DATA / "comma2k19_rav4/comma2k19_rav4_seg40_candump.log.gz"
DBC = ROOT / "config" / "dbc" / "toyota_new_mc_pt_generated.dbc"
DEV = "cut-0001"
COUNTER_ID = 0x6AB  # not used by the recording
# Documented durability window (docs/store.md): ingest commits every 0.25 s. Measured from the
# sender's clock, a frame also crosses the kernel socket, the CAN reader thread and its batching
# on a loaded 2-core machine, hence the allowance here.
WINDOW_S = 1.0
STARTUP_MAX_S = 30.0

pytest.importorskip("msgpack")


def _config(version: int) -> dict:
    return {"version": version, "upload": {"interval_s": 1},
            "obd": {"pids": [], "dtc_period_s": 600},
            "can": {"signals": [{"name": "wheel.fl", "message": "WHEEL_SPEEDS", "signal": "WHEEL_SPEED_FL",
                                 "period_s": 0.1},
                                {"name": "steer.angle", "message": "STEER_ANGLE_SENSOR",
                                 "signal": "STEER_ANGLE", "period_s": 0.05}],
                    "raw": {"enabled": True, "ids": []}}}


class Counter:
    """Sends numbered frames on the bus and remembers when each was sent."""

    def __init__(self, group: str, port: int, rate_hz: float):
        self.bus = can.Bus(interface="udp_multicast", channel=group, port=port)
        self.period = 1.0 / rate_hz
        self.sent: list[float] = []  # index = counter, value = monotonic send time
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> "Counter":
        self._thread.start()
        return self

    def _run(self) -> None:
        n, next_t = 0, time.monotonic()
        while not self._stop.is_set():
            self.bus.send(can.Message(arbitration_id=COUNTER_ID, is_extended_id=False,
                                      data=n.to_bytes(8, "big")))
            self.sent.append(time.monotonic())
            n += 1
            next_t += self.period
            delay = next_t - time.monotonic()
            if delay > 0:
                time.sleep(delay)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.bus.shutdown()


def _udp_drops(pid: int) -> int:
    """Datagrams the kernel dropped on the process's UDP sockets (full receive buffer)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            m = re.match(r"socket:\[(\d+)\]", os.readlink(fd))
        except OSError:
            continue
        if m:
            inodes.add(m.group(1))
    drops = 0
    for table in ("udp", "udp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if f[9] in inodes:
                drops += int(f[-1])
    return drops


def _db_check(db: Path) -> int:
    """Opens the database as the cut left it (read-only: nothing is checkpointed or repaired
    by the test itself); returns the persisted uplink seq counter."""
    c = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        assert c.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        row = c.execute("SELECT value FROM meta WHERE key='uplink_seq'").fetchone()
        outbox = c.execute("SELECT max(seq) FROM outbox").fetchone()[0] or 0
        seq = int(row[0]) if row else 0
        assert outbox <= seq
        return seq
    finally:
        c.close()


def _counters(console) -> dict[int, int]:
    """Numbered frames the cloud received: counter -> times received (before dedup)."""
    got: dict[int, int] = {}
    for r in list(console.records):
        if r.get("kind") != "telemetry" or r["dev"] != DEV or r["duplicate"]:
            continue
        for g in r["body"].get("frames", ()):
            for can_id, data in zip(g["id"], g["data"]):
                if can_id == COUNTER_ID:
                    n = int.from_bytes(data, "big")
                    got[n] = got.get(n, 0) + 1
    return got


def _check_seqs(console) -> None:
    recs = [r for r in list(console.records) if r.get("dev") == DEV and "seq" in r]
    assert not [r for r in console.records if r.get("rejected")]
    first: dict[int, dict] = {}
    for r in recs:
        if r["seq"] in first:  # a re-send must be the same envelope content, never new data
            assert r["body"] == first[r["seq"]]["body"] and r["kind"] == first[r["seq"]]["kind"]
        else:
            first[r["seq"]] = r
    seqs = sorted(first)
    assert seqs == list(range(1, seqs[-1] + 1)), "seq gap: data lost"
    assert console.ledger.missing(DEV) == []


@pytest.fixture
def can_bus(tmp_path):
    group = f"239.75.{random.randrange(1, 250)}.{random.randrange(1, 250)}"
    port = random.randrange(20000, 60000)
    return group, port


def _start_replay(tmp_path, group, port, speed="1"):
    return subprocess.Popen([sys.executable, "-m", "scripts.vehicle_sim.replay", str(LOG), "--interface", "udp_multicast",
                             "--channel", group, "--port", str(port), "--loop", "--speed", speed],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "replay.log", "w"))


def _device(fleet, group, port):
    bus = (f'[[can.buses]]\nname = "can0"\ninterface = "udp_multicast"\nchannel = "{group}"\n'
           f'port = {port}\ndbc = "{DBC}"\n')
    return fleet.device(DEV, extra_toml=bus, backoff_max_s=2.0)


STARTUP_S = 1.0


def _power_cuts(fleet, can_bus, tmp_path, cuts: int):
    group, port = can_bus
    replay = _start_replay(tmp_path, group, port)
    counter = Counter(group, port, rate_hz=200).start()
    toml = _device(fleet, group, port)
    db = toml.parent / "data" / "agent.db"
    c = fleet.console
    c.publish(DEV, "config", _config(1))  # retained: every (re)start gets it
    rng = random.Random(int.from_bytes(os.urandom(4), "big"))
    kills: list[float] = []
    drops: list[list[tuple[float, int]]] = []  # per segment: (time, kernel drops on its socket)
    agent = fleet.agent(toml)
    try:
        assert c.wait_for(lambda r: r.get("kind") == "ack" and r["dev"] == DEV, 60), agent.log_text()[-3000:]
        last_seq = 0
        for i in range(cuts):
            timeline: list[tuple[float, int]] = []
            deadline = time.monotonic() + rng.uniform(1.0, 5.0)
            while time.monotonic() < deadline:
                timeline.append((time.monotonic(), _udp_drops(agent.proc.pid)))
                time.sleep(0.1)
            timeline.append((time.monotonic(), _udp_drops(agent.proc.pid)))
            agent.kill()  # SIGKILL: the power is gone
            kills.append(time.monotonic())
            drops.append(timeline)
            seq = _db_check(db)
            seen = [r["seq"] for r in list(c.records) if r.get("dev") == DEV and "seq" in r]
            assert seq >= max(seen, default=0), f"cut {i}: the cloud saw seq {max(seen)} > persisted {seq}"
            assert seq >= last_seq
            last_seq = seq
            agent = fleet.agent(toml)
        # Let the last agent run, then stop the source and wait for everything to arrive.
        time.sleep(3)
        counter.stop()
        replay.terminate()
        sent = len(counter.sent)

        def delivered():
            got = _counters(c)
            return got and max(got) >= sent - 1 - 400 and agent.alive()
        assert wait_until(delivered, 120), agent.log_text()[-3000:]
        time.sleep(3)
        assert agent.terminate() == 0
        _check_seqs(c)
        got = _counters(c)
        st = counter.sent
        # After each cut, losses may start WINDOW_S before the cut and last until the first
        # numbered frame the restarted agent received (it was down, then starting).
        lossy, excused = [], 0
        for i, k in enumerate(kills):
            after = [st[n] for n in got if st[n] > k]
            resumed = min(after) if after else float("inf")
            # Until STARTUP_S after the first frame the restarted agent got, UDP multicast can still
            # lose datagrams while the new process finishes starting (a transport loss while the
            # agent was down, not a durability one: nothing had reached the agent).
            lossy.append((k - WINDOW_S, resumed + STARTUP_S))
            # The kernel dropped datagrams to the agent after it was reading (not just while it
            # was starting): that segment cannot prove anything.
            prev_resumed = lossy[i - 1][1] if i else 0.0
            tl = drops[i]
            at_start = next((d for t, d in tl if t >= prev_resumed), tl[-1][1])
            if tl[-1][1] > at_start:
                excused += 1
                lossy.append((prev_resumed, k))
        missing = [n for n in range(min(got), sent) if n not in got]
        unexplained = [n for n in missing if not any(a <= st[n] <= b for a, b in lossy)]
        last_ok = max(got)
        unexplained = [n for n in unexplained if n < last_ok]
        assert not unexplained, (f"{len(unexplained)} numbered frames lost outside the window, first "
                                 f"{unexplained[:10]} sent {[round(st[n] - max([k for k in kills if k < st[n]], default=0), 2) for n in unexplained[:5]]} s after a cut")
        assert excused <= cuts // 3, f"{excused} segments had UDP drops while reading: inconclusive"
        assert len(got) > sent * 0.3, "too little arrived to prove anything"
        margins = [k - max((st[n] for n in got if st[n] < k), default=k) for k in kills]
        print(f"\npower cuts: {cuts}, numbered frames sent {sent}, received {len(got)}, lost around cuts "
              f"{len(missing)}, segments with UDP drops {excused}, last seq {last_seq}, latest frame kept "
              f"before a cut: {min(margins):.2f}-{max(margins):.2f} s before it")
    finally:
        if counter._thread.is_alive():
            counter.stop()
        replay.terminate()
        replay.wait(10)


@pytest.mark.slow
def test_power_cut_10_times_during_heavy_ingest_loses_nothing_outside_the_window(fleet, can_bus, tmp_path):
    _power_cuts(fleet, can_bus, tmp_path, cuts=10)


@pytest.mark.soak
def test_power_cut_50_times_during_heavy_ingest_loses_nothing_outside_the_window(fleet, can_bus, tmp_path):
    _power_cuts(fleet, can_bus, tmp_path, cuts=50)


# --------------------------------------------------------------------------------------------
# Broker outage
# --------------------------------------------------------------------------------------------

class PersistentCollector:
    """The cloud's ingestion: a persistent MQTT session (nothing the broker accepted is lost
    while it reconnects), handing every envelope to the reference console's checks."""

    def __init__(self, fleet):
        console = fleet.console
        cloud = fleet.run_dir / "cloud"
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id="cloud-ingest",
                                  protocol=paho.MQTTv5)
        self.client.tls_set(ca_certs=console.ca_file, certfile=str(cloud / "console.crt"),
                            keyfile=str(cloud / "console.key"))
        self.client.reconnect_delay_set(0.2, 1)
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        self.client.on_connect = lambda cl, u, f, rc, p: cl.subscribe(f"dongle/v1/{DEV}/up/#", qos=1)
        self.client.on_message = lambda cl, u, m: console.handle(DEV, m.topic.split("/", 3)[3], m.payload)
        self.client.connect_async(console.host, console.port, keepalive=10, clean_start=False,
                                  properties=props)
        self.client.loop_start()

    def stop(self):
        self.client.disconnect()
        self.client.loop_stop()


@pytest.mark.slow
def test_broker_outages_lose_nothing_after_dedup(fleet, can_bus, tmp_path):
    group, port = can_bus
    collector = PersistentCollector(fleet)
    counter = Counter(group, port, rate_hz=300).start()
    toml = _device(fleet, group, port)
    c = fleet.console
    c.publish(DEV, "config", _config(1))
    agent = fleet.agent(toml)
    try:
        assert c.wait_for(lambda r: r.get("kind") == "ack" and r["dev"] == DEV, 60), agent.log_text()[-3000:]
        assert wait_until(lambda: _counters(c), 30, what="counter samples at the cloud"), agent.log_text()[-3000:]
        first = min(_counters(c))
        for _ in range(10):
            time.sleep(random.uniform(1.0, 3.0))
            fleet.broker.stop()          # the broker goes away (its persistence saved) ...
            time.sleep(random.uniform(0.5, 3.0))
            fleet.broker.start()         # ... and comes back on the same port
        time.sleep(2)
        drops = _udp_drops(agent.proc.pid)
        counter.stop()
        sent = len(counter.sent)
        assert wait_until(lambda: max(_counters(c) or {0: 0}) >= sent - 1, 120), agent.log_text()[-3000:]
        time.sleep(2)
        assert agent.terminate() == 0
        _check_seqs(c)
        got = _counters(c)
        first = min(got)
        missing = [n for n in range(first, sent) if n not in got]
        if drops:
            pytest.skip(f"the kernel dropped {drops} datagrams to the agent: inconclusive run")
        assert missing == [], f"{len(missing)} numbered frames lost, first {missing[:10]}"
        assert all(v == 1 for v in got.values())  # exactly once after dedup
        assert fleet.broker.log_text().count("starting on port") >= 11
    finally:
        if counter._thread.is_alive():
            counter.stop()
        collector.stop()
