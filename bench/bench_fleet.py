"""What a fleet costs the cloud side (issue 19): the fleet simulator (scripts/refcloud/fleet.py)
against Mosquitto and RabbitMQ, consumed by the reference ingest (scripts/refcloud/ingest.py).

Parts (``--only a,b``; all by default):

- ``costs``: CPU per envelope at the ingest, part by part (envelope CBOR, Ed25519 verify, HPKE
  open, zstd, body CBOR, schema, SQLite write), at the default config (300 s of four PIDs:
  1,200 samples) and the live one (5 s: 20 samples); baseline: the same envelope through
  ``open_envelope`` with JSON Schema (the console's path).
- ``throughput``: envelopes/s end to end (broker → consumer → database) with 1 and 2
  consumers (Mosquitto, MQTT 5 shared subscription) and with 1 on RabbitMQ: the fleet fills
  the consumers' persistent sessions while they are away, then they drain it; consumer and
  broker CPU per envelope.
- ``broker``: broker CPU per 1,000 connected devices, real time, at the default and the live
  config (one consumer taking the uplink).
- ``storm``: 1,000 devices online, the broker restarted: time until all are back.
- ``bytes``: TCP bytes per device-day (``--mode day``: two 45-minute drives, asleep when parked
  with a 90 s check-in every 6 h) at the default config, and per driving hour at both configs.

Every run also counts loss and duplicates by ``(dev, seq)``: what the devices had acknowledged
by the broker against what the database holds.

    .venv/bin/python bench/bench_fleet.py [--devices 1000] [--workers 4] [--only ...] [--json FILE]

The fleet (keys, certificates) is made once under the system temp directory and reused.
Time: ``costs`` and ``broker``/``storm`` run in real time; ``throughput`` and ``bytes`` run the
devices' clock faster (printed with each figure).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import sqlite3
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import paho.mqtt.client as paho  # noqa: E402
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey  # noqa: E402

from agent.cloud import keys, protocol  # noqa: E402
from agent.cloud.mqtt import status_payload  # noqa: E402
from agent.outbox.telemetry import telemetry_body  # noqa: E402
from scripts.refcloud.telemetry_check import validate_telemetry  # noqa: E402
from agent.outbox.uplink import Sealer  # noqa: E402
from scripts.refcloud import fleet, ingest  # noqa: E402
from scripts.refcloud.console import Registry  # noqa: E402
from scripts.testbed import rabbitmq  # noqa: E402
from scripts.testbed.devca import DevCA  # noqa: E402
from scripts.testbed.mosquitto import LocalBroker  # noqa: E402
from scripts.testbed.wait import wait_until  # noqa: E402

FLEET_DIR = Path(tempfile.gettempdir()) / f"dongle-fleet-{os.geteuid()}"
TICK = os.sysconf("SC_CLK_TCK")
PY = sys.executable
ROOT = Path(__file__).resolve().parents[1]


def cpu_s(pid: int | None) -> float:
    """User + system CPU seconds of a process so far (0 if it is gone)."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK


def rss_mb(pid: int | None) -> float:
    """Resident memory of a process, MB (0 if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (OSError, TypeError):
        pass
    return 0.0


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


# --------------------------------------------------------------------------------------------
# Processes: fleet workers, consumers, brokers
# --------------------------------------------------------------------------------------------

class Workers:
    """The fleet as ``workers`` processes of ``devices / workers`` devices each."""

    def __init__(self, work: Path, endpoints: list[tuple[str, int]], devices: int, workers: int,
                 *, config: str, mode: str = "driving", scale: float = 1.0, duration: float,
                 protocol_version: str = "5", drain_s: float = 60.0, first: int = 0):
        self.work = work
        work.mkdir(parents=True, exist_ok=True)
        self.procs: list[tuple[subprocess.Popen, Path, Path]] = []
        per = -(-devices // workers)
        broker = ",".join(f"{h}:{p}" for h, p in endpoints)
        for w in range(workers):
            lo = first + w * per
            count = min(per, first + devices - lo)
            if count <= 0:
                break
            status, report = work / f"fleet-{w}.status.json", work / f"fleet-{w}.report.json"
            for f in (status, report):
                f.unlink(missing_ok=True)
            proc = subprocess.Popen(
                [PY, "-m", "scripts.refcloud.fleet", "run", "--run-dir", str(FLEET_DIR), "--broker", broker,
                 "--first", str(lo), "--count", str(count), "--config", config, "--mode", mode,
                 "--time-scale", str(scale), "--duration", str(duration), "--drain-s", str(drain_s),
                 "--protocol", protocol_version, "--status", str(status), "--report", str(report),
                 "--seed", str(w + 1)],
                cwd=ROOT, stdout=open(work / f"fleet-{w}.log", "ab"), stderr=subprocess.STDOUT)
            self.procs.append((proc, status, report))

    def status(self) -> dict:
        total: dict[str, Any] = {"states": {}}
        for _, status, _ in self.procs:
            st = read_json(status)
            for k, v in st.items():
                if k == "states":
                    for s, n in v.items():
                        total["states"][s] = total["states"].get(s, 0) + n
                elif isinstance(v, (int, float)) and k not in ("t", "elapsed_s", "sim_ms"):
                    total[k] = total.get(k, 0) + v
        return total

    def online(self) -> int:
        return self.status()["states"].get("online", 0)

    def cpu(self) -> float:
        return sum(cpu_s(p.pid) for p, _, _ in self.procs)

    def stop(self) -> None:
        for p, _, _ in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)

    def wait(self, timeout: float = 300) -> list[dict]:
        deadline = time.monotonic() + timeout
        for p, _, _ in self.procs:
            try:
                p.wait(max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        return [read_json(r) for _, _, r in self.procs]


def acked_pairs(reports: list[dict]) -> set[tuple[str, int]]:
    return {(dev, s) for r in reports for dev, ranges in r.get("acked_seqs", {}).items()
            for a, b in ranges for s in range(a, b + 1)}


def total(reports: list[dict], key: str) -> int:
    return sum(r.get(key, 0) for r in reports)


class Consumers:
    def __init__(self, work: Path, endpoint: tuple[str, int], n: int, *, db: Path,
                 protocol_version: str = "5", tag: str = "ingest"):
        """``tag`` names the consumers and their shared-subscription group: a consumer that
        left keeps its persistent session, and Mosquitto keeps queueing its share for it."""
        self.work, self.endpoint, self.n, self.db = work, endpoint, n, db
        self.protocol_version, self.tag = protocol_version, tag
        self.procs: list[tuple[subprocess.Popen, Path]] = []

    def start(self) -> None:
        self.procs = []
        for i in range(self.n):
            status = self.work / f"{self.tag}-{i}.status.json"
            status.unlink(missing_ok=True)
            proc = subprocess.Popen(
                [PY, "-m", "scripts.refcloud.ingest", "--run-dir", str(FLEET_DIR),
                 "--broker", f"{self.endpoint[0]}:{self.endpoint[1]}", "--db", str(self.db),
                 "--client-id", f"{self.tag}-{i}", "--group", self.tag, "--protocol", self.protocol_version,
                 "--status", str(status)],
                cwd=ROOT, stdout=open(self.work / f"{self.tag}-{i}.log", "ab"), stderr=subprocess.STDOUT)
            self.procs.append((proc, status))
        wait_until(lambda: all(read_json(s).get("connected") for _, s in self.procs), timeout=60,
                   what="consumers connected")

    def stats(self) -> list[dict]:
        return [read_json(s) for _, s in self.procs]

    def sum(self, key: str) -> float:
        return sum(s.get(key, 0) for s in self.stats())

    def cpu(self) -> float:
        return sum(cpu_s(p.pid) for p, _ in self.procs)

    def stop(self) -> None:
        for p, _ in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p, _ in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()


def stored_pairs(db: Path) -> tuple[set[tuple[str, int]], int]:
    with sqlite3.connect(db) as con:
        rows = con.execute("SELECT dev, seq FROM envelopes").fetchall()
    return set(rows), len(rows)


def mosquitto(work: Path) -> LocalBroker:
    b = LocalBroker(work / "mosquitto", DevCA(FLEET_DIR / "ca"), cloud_users=("cloud-console",),
                    options={"max_queued_messages": 0, "max_inflight_messages": 256})
    b.start()
    return b


def rabbit(work: Path, devices: int) -> rabbitmq.RabbitBroker:
    b = rabbitmq.RabbitBroker(work / "rabbitmq", DevCA(FLEET_DIR / "ca"), cloud_users=("cloud-console",),
                              devices=fleet.device_ids(devices))
    b.start()
    return b


def fresh_broker(work: Path, name: str, kind: str, devices: int) -> tuple[Path, Any, str]:
    """A new work directory ``work/name``, a started broker of ``kind`` and its MQTT version."""
    work = work / name
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    b = mosquitto(work) if kind == "mosquitto" else rabbit(work, devices)
    return work, b, "5" if kind == "mosquitto" else "3.1.1"


def caught_up(cons: "Consumers", n: float, timeout: float = 120) -> float:
    """Waits until the consumers have taken ``n`` envelopes; returns their duplicate count."""
    wait_until(lambda: cons.sum("stored") + cons.sum("duplicates") >= n, timeout=timeout,
               interval=0.2, what=f"consumers caught up ({n:.0f})")
    return cons.sum("duplicates")


def broker_pid(b: object) -> int | None:
    return b.pid  # type: ignore[attr-defined]


def loss_line(reports: list[dict], db: Path, dup_deliveries: float) -> dict:
    acked = acked_pairs(reports)
    stored, rows = stored_pairs(db)
    return {"acked": len(acked), "stored": len(stored), "lost": len(acked - stored),
            "rows": rows, "duplicate_writes": rows - len(stored), "duplicate_deliveries": int(dup_deliveries),
            "unacked_at_end": sum(len(v) for r in reports for v in r.get("unacked", {}).values())}


# --------------------------------------------------------------------------------------------
# costs: CPU per envelope at the ingest, part by part
# --------------------------------------------------------------------------------------------

def part_costs(n_default: int = 150, n_live: int = 1500) -> dict:
    rng = random.Random(5)
    dev = "sim-000000"
    sign = keys.load_private_key(FLEET_DIR / "devices" / dev / "device_sign.key", Ed25519PrivateKey)
    cloud_enc = keys.load_private_key(FLEET_DIR / "cloud" / "cloud_enc.key", X25519PrivateKey)
    sealer = Sealer(dev, sign, cloud_enc.public_key())
    receiver = ingest.Receiver(Registry(FLEET_DIR / "devices"), cloud_enc)
    signers, _ = receiver.registry.get(dev)
    out = {}
    t0 = 1_767_225_600_000
    for name, seconds, n in (("default", 300, n_default), ("live", 5, n_live)):
        vehicle = fleet.Vehicle(rng)
        envs = []
        seal_cpu = time.process_time()
        for i in range(n):
            body = telemetry_body(vehicle.samples(t0 + i * seconds * 1000, t0 + (i + 1) * seconds * 1000), [])
            envs.append(sealer.seal("telemetry", body, 1_000_000 + i))
        seal_cpu = (time.process_time() - seal_cpu) / n
        parts = {k: 0.0 for k in ("envelope CBOR + header", "Ed25519 verify", "HPKE open", "zstd",
                                  "body CBOR", "schema (column by column)", "SQLite write (batches of 64)")}
        bodies = []
        for env in envs:
            c = time.process_time
            a = c(); protected, ct, sig, header = protocol._parse(env, protocol.MAX_ENVELOPE)
            b = c(); signers[header["kid_s"]].verify(sig, protocol.signature_input(protected, ct))
            d = c(); plain = protocol.SUITE.decrypt(ct, cloud_enc, info=protected)
            e = c(); raw = protocol._zstd_decompress(plain, protocol.MAX_PLAINTEXT)
            f = c(); body = protocol._loads_exact(raw, protocol._BODY_DEPTH)
            g = c(); validate_telemetry(body)
            h = c()
            parts["envelope CBOR + header"] += b - a
            parts["Ed25519 verify"] += d - b
            parts["HPKE open"] += e - d
            parts["zstd"] += f - e
            parts["body CBOR"] += g - f
            parts["schema (column by column)"] += h - g
            bodies.append((header, body))
        with tempfile.TemporaryDirectory() as tmp:
            sink = ingest.SqliteSink(Path(tmp) / "s.db")
            rows = [ingest.Row(dev, hd["seq"], "telemetry", hd["ts"], 0, bd) for hd, bd in bodies]
            a = time.process_time()
            for i in range(0, len(rows), 64):
                sink.write(rows[i:i + 64], [])
            parts["SQLite write (batches of 64)"] = time.process_time() - a
            sink.close()
        parts = {k: v / n * 1e6 for k, v in parts.items()}   # µs per envelope
        # Baseline: the console's path, open_envelope with JSON Schema.
        m = max(5, n // 10)
        a = time.process_time()
        for env in envs[:m]:
            protocol.open_envelope(env, expected_dev=dev, expected_kind="telemetry", trusted_signers=signers,
                                   recipient_key=cloud_enc, now_ms=None, last_seq=None)
        baseline = (time.process_time() - a) / m * 1e6
        a = time.process_time()
        for env in envs:
            receiver.open(dev, "up/telemetry", env)
        opened = (time.process_time() - a) / n * 1e6
        out[name] = {"envelopes": n, "bytes": statistics.mean(len(e) for e in envs),
                     "samples": len(bodies[0][1]["signals"][0]["t"]) * 4,
                     "parts_us": parts, "receiver_us": opened,
                     "total_us": opened + parts["SQLite write (batches of 64)"],
                     "baseline_jsonschema_us": baseline, "device_seal_us": seal_cpu * 1e6}
    return out


# --------------------------------------------------------------------------------------------
# throughput: drain a backlog with 1 and 2 consumers
# --------------------------------------------------------------------------------------------

def throughput(work: Path, kind: str, consumers: int, devices: int, workers: int,
               fill_s: float = 25.0, scale: float = 10.0) -> dict:
    work, b, v = fresh_broker(work, f"tput-{kind}-{consumers}", kind, devices)
    try:
        db = work / "ingest.db"
        cons = Consumers(work, (b.host, b.port), consumers, db=db, protocol_version=v)
        cons.start()   # their persistent sessions now exist; the backlog waits in them
        cons.stop()
        fl = Workers(work, [(b.host, b.port)], devices, workers, config="live", scale=scale,
                     duration=fill_s, protocol_version=v)
        t_fill = time.monotonic()
        reports = fl.wait(fill_s + 180)
        fill_wall = time.monotonic() - t_fill
        backlog = total(reports, "acked")
        fleet_cpu = sum(r.get("cpu_s", 0) for r in reports)
        broker0 = cpu_s(broker_pid(b))
        t0 = time.monotonic()
        cons.start()
        caught_up(cons, backlog, timeout=900)
        wall = time.monotonic() - t0
        ccpu, csink = cons.sum("cpu_s"), cons.sum("sink_wall_s")
        bcpu = cpu_s(broker_pid(b)) - broker0
        dups = cons.sum("duplicates")
        cons.stop()
        loss = loss_line(reports, db, dups)
        return {"broker": kind, "consumers": consumers, "devices": devices, "backlog": backlog,
                "fill": {"wall_s": fill_wall, "envelopes_per_s": backlog / fill_wall,
                         "fleet_cpu_s": fleet_cpu, "time_scale": scale},
                "drain_wall_s": wall, "envelopes_per_s": backlog / wall,
                "consumer_cpu_us_per_envelope": ccpu / backlog * 1e6,
                "consumer_sink_wall_s": csink, "consumer_cpu_s": ccpu,
                "broker_cpu_us_per_envelope": bcpu / backlog * 1e6, **loss}
    finally:
        b.stop()


# --------------------------------------------------------------------------------------------
# broker CPU per 1,000 devices, and the reconnect storm
# --------------------------------------------------------------------------------------------

def broker_cpu(work: Path, kind: str, devices: int, workers: int, window_s: float = 60.0) -> dict:
    work, b, v = fresh_broker(work, f"cpu-{kind}", kind, devices)
    out: dict[str, Any] = {"broker": kind, "devices": devices}
    out["broker_rss_mb_empty"] = rss_mb(broker_pid(b))
    try:
        for config in ("default", "live"):
            db = work / f"ingest-{config}.db"
            cons = Consumers(work, (b.host, b.port), 1, db=db, protocol_version=v, tag=f"ingest-{config}")
            cons.start()
            fl = Workers(work / config, [(b.host, b.port)], devices, workers, config=config,
                         duration=window_s + 120, protocol_version=v)
            t_connect = time.monotonic()
            wait_until(lambda: fl.online() >= devices, timeout=180, interval=0.5, what="all online")
            connect_s = time.monotonic() - t_connect
            time.sleep(3)   # the first envelopes (trip_start) out of the way
            st0, b0, c0, f0, t0 = fl.status(), cpu_s(broker_pid(b)), cons.cpu(), fl.cpu(), time.monotonic()
            s0 = cons.sum("stored") + cons.sum("duplicates")
            time.sleep(window_s)
            st1, b1, c1, f1, t1 = fl.status(), cpu_s(broker_pid(b)), cons.cpu(), fl.cpu(), time.monotonic()
            s1 = cons.sum("stored") + cons.sum("duplicates")
            rss1 = rss_mb(broker_pid(b))
            fl.stop()
            reports = fl.wait()
            dups = caught_up(cons, total(reports, "acked"))
            cons.stop()
            env = st1.get("acked", 0) - st0.get("acked", 0)
            dt = t1 - t0
            out[config] = {"window_s": dt, "envelopes_per_s": env / dt, "connect_all_s": connect_s,
                           "broker_rss_mb_connected": rss1,
                           "broker_cpu_pct": (b1 - b0) / dt * 100,
                           "broker_cpu_pct_per_1000": (b1 - b0) / dt * 100 * 1000 / devices,
                           "consumer_cpu_pct": (c1 - c0) / dt * 100,
                           "consumer_stored_per_s": (s1 - s0) / dt,
                           "consumer_cpu_us_per_envelope": (c1 - c0) / max(1, s1 - s0) * 1e6,
                           "fleet_cpu_pct": (f1 - f0) / dt * 100,
                           **loss_line(reports, db, dups)}
    finally:
        b.stop()
    return out


def storm(work: Path, kind: str, devices: int, workers: int) -> dict:
    work, b, v = fresh_broker(work, f"storm-{kind}", kind, devices)
    try:
        db = work / "ingest.db"
        cons = Consumers(work, (b.host, b.port), 1, db=db, protocol_version=v)
        cons.start()
        fl = Workers(work, [(b.host, b.port)], devices, workers, config="default", duration=600,
                     protocol_version=v)
        wait_until(lambda: fl.online() >= devices, timeout=180, interval=0.5, what="all online")
        time.sleep(5)
        lost0, f0 = fl.status().get("lost", 0), fl.cpu()
        t_down = time.monotonic()
        b.restart()
        t_up = time.monotonic()
        b0 = cpu_s(broker_pid(b))   # the new process: its start-up so far
        wait_until(lambda: fl.status().get("lost", 0) >= lost0 + devices, timeout=120, interval=0.1,
                   what="every device noticing the restart")
        wait_until(lambda: fl.online() >= devices, timeout=600, interval=0.1, what="all back")
        t_all = time.monotonic()   # within ~1 s (the workers' status files): the reports are exact
        b1, f1 = cpu_s(broker_pid(b)), fl.cpu()
        fl.stop()
        reports = fl.wait()
        dups = caught_up(cons, total(reports, "acked"))
        cons.stop()
        backs = sorted(back - t_up for r in reports for _, back in r.get("reconnects", []) if back >= t_down)
        return {"broker": kind, "devices": devices, "restart_s": t_up - t_down,
                "all_back_after_up_s_status": t_all - t_up, "reconnected": len(backs),
                "back_p50_s": backs[len(backs) // 2] if backs else None,
                "back_p90_s": backs[int(len(backs) * 0.9)] if backs else None,
                "back_max_s": backs[-1] if backs else None,
                "broker_cpu_s_start": b0, "broker_cpu_s_up_to_all_back": b1 - b0,
                "fleet_cpu_s_down_to_all_back": f1 - f0,
                **loss_line(reports, db, dups)}
    finally:
        b.stop()


# --------------------------------------------------------------------------------------------
# bytes per device-day
# --------------------------------------------------------------------------------------------

def ping_bytes(b: LocalBroker) -> dict:
    """TCP bytes (both ways) and segments of a device's session set-up (TLS handshake with the
    client certificate, CONNECT/CONNACK, SUBSCRIBE/SUBACK, the retained status and its PUBACK)
    and of one MQTT keepalive exchange, measured on an idle connection with a 1 s keepalive."""
    cloud = FLEET_DIR / "devices" / "sim-000000"
    c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="sim-000000", protocol=paho.MQTTv5)
    ctx = ssl.create_default_context(cafile=str(FLEET_DIR / "ca" / "ca.pem"))
    ctx.load_cert_chain(str(cloud / "tls.crt"), str(cloud / "tls.key"))
    c.tls_set_context(ctx)
    c.connect(b.host, b.port, keepalive=1)
    c.loop_start()
    time.sleep(0.5)
    c.subscribe("dongle/v1/sim-000000/down/#", qos=1)
    c.publish("dongle/v1/sim-000000/status", status_payload("online", "fleet-sim", 0), qos=1, retain=True)
    time.sleep(0.4)   # less than the keepalive: no PINGREQ yet
    a = fleet.tcp_bytes(c.socket())
    time.sleep(10.2)
    z = fleet.tcp_bytes(c.socket())
    c.disconnect()
    c.loop_stop()
    pings = 10
    return {"setup_bytes": a[0] + a[1], "setup_segments": a[2] + a[3],
            "ping_bytes": (z[0] - a[0] + z[1] - a[1]) / pings, "ping_segments": (z[2] - a[2] + z[3] - a[3]) / pings}


def bytes_per_day(work: Path, day_devices: int = 50, hour_devices: int = 20) -> dict:
    work = work / "bytes"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    b = mosquitto(work)
    out: dict[str, Any] = {}
    try:
        out["keepalive"] = ping_bytes(b)
        db = work / "ingest.db"
        cons = Consumers(work, (b.host, b.port), 1, db=db)
        cons.start()
        runs = [("day-default", "default", "day", 720.0, 122.0, day_devices),
                ("drive-default", "default", "driving", 60.0, 61.0, hour_devices),
                ("drive-live", "live", "driving", 10.0, 37.0, hour_devices)]
        for name, config, mode, scale, wall, n in runs:
            fl = Workers(work / name, [(b.host, b.port)], n, 1, config=config, mode=mode,
                         scale=scale, duration=wall, first=1000)
            reports = fl.wait(wall + 120)
            r = reports[0]
            sim_h = r["sim_generating_s"] / 3600
            tcp = r["tcp"]
            per = 24 / sim_h if mode == "day" else 1 / sim_h   # per device-day / per driving hour
            out[name] = {"devices": n, "time_scale": scale, "sim_hours": sim_h,
                         "tcp_bytes": (tcp[0] + tcp[1]) / n * per, "tcp_sent": tcp[0] / n * per,
                         "tcp_received": tcp[1] / n * per, "segments": (tcp[2] + tcp[3]) / n * per,
                         "payload_bytes": r["payload_bytes"] / n * per, "connects": r["connects"] / n * per,
                         "envelopes": sum(r["sealed"].values()) / n * per, "samples": r["samples"] / n * per}
            setup = out["keepalive"]
            if mode == "driving":   # per driving hour, the session set-up of the short run taken out
                out[name]["tcp_bytes_without_setup"] = (tcp[0] + tcp[1] - r["connects"] * setup["setup_bytes"]) / n * per
        caught_up(cons, cons.sum("received"), timeout=60)
        cons.stop()
    finally:
        b.stop()
    return out


# --------------------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--only", default="costs,throughput,broker,storm,bytes")
    ap.add_argument("--brokers", default="mosquitto,rabbitmq")
    ap.add_argument("--window", type=float, default=60.0, help="broker: seconds measured per config")
    ap.add_argument("--json", type=Path, help="also write every figure to this file")
    args = ap.parse_args()
    parts = set(args.only.split(","))
    kinds = args.brokers.split(",")
    if "rabbitmq" in kinds and rabbitmq.missing_reason():
        print(f"RabbitMQ skipped: {rabbitmq.missing_reason()}")
        kinds.remove("rabbitmq")
    t = time.monotonic()
    fleet.provision_fleet(FLEET_DIR, max(args.devices, 1000 + 50))
    print(f"# bench_fleet {time.strftime('%Y-%m-%d')} on {platform.machine()}, {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}; fleet of {args.devices} in {FLEET_DIR} "
          f"(ready in {time.monotonic() - t:.1f} s)", flush=True)
    results: dict[str, Any] = {}
    work = Path(tempfile.mkdtemp(prefix="bench-fleet-"))

    def show(name: str, value: Any) -> None:
        results[name] = value
        print(f"## {name}\n{json.dumps(value, indent=1)}", flush=True)
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))

    try:
        if "costs" in parts:
            show("costs", part_costs())
        if "throughput" in parts:
            for kind, n in [(k, n) for k in kinds for n in ((1, 2) if k == "mosquitto" else (1,))]:
                show(f"throughput {kind} x{n}", throughput(work, kind, n, args.devices, args.workers))
        if "broker" in parts:
            for kind in kinds:
                show(f"broker {kind}", broker_cpu(work, kind, args.devices, args.workers, args.window))
        if "storm" in parts:
            for kind in kinds:
                show(f"storm {kind}", storm(work, kind, args.devices, args.workers))
        if "bytes" in parts:
            show("bytes", bytes_per_day(work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
