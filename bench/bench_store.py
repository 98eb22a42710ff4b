"""Store and forward: wire bytes and backlog drain (issue 4). Prints each figure beside its target.

1. ``frames``: wire bytes per raw CAN frame for the real RAV4 drive (comma2k19, 135,468 frames),
   sealed exactly as the agent seals them (store → ``Uplink.seal_telemetry`` → envelopes of at
   most 128 KiB), against, in the same run: raw 16-byte binary frames (SocketCAN ``can_frame``),
   one JSON object per frame, and zstd of the candump text. Also what zstd level 19 would give
   (``agent.protocol`` compresses at level 3; see docs/store.md).
2. ``samples``: wire bytes per signal sample at the default config (four OBD PIDs at 1 s, upload
   every 5 s), one hour of values taken from the same drive (rpm, speed, a steady coolant
   temperature, load from the gas pedal in OBD's 1/255 steps) with OBD-like polling jitter;
   sealed online (every 5 s) and as an offline backlog (full 4000-sample batches).
3. ``day``: bytes per vehicle-day extrapolated from that hour.
4. ``drain``: 24 simulated hours offline at the default config, sealed into the outbox, then
   drained by a real agent to a real Mosquitto (mutual TLS on loopback): drain speed as a
   multiple of real time (target >= 100x).

    /work/main/.venv/bin/python bench/bench_store.py [--only frames,samples,day,drain] [--markdown]
"""
from __future__ import annotations

import argparse
import gzip
import json
import logging
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import can
import zstandard

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey  # noqa: E402

from agent import protocol  # noqa: E402
from agent.can_decode import CanDecoder  # noqa: E402
from agent.model import Frame, Sample  # noqa: E402
from agent.store import Store  # noqa: E402
from agent.telemetry import telemetry_body  # noqa: E402
from agent.uplink import Sealer, Uplink  # noqa: E402
from drivers.can import load_dbc  # noqa: E402

log = logging.getLogger("bench_store")

LOG_GZ = Path("/work/shared/data/comma2k19_rav4/comma2k19_rav4_seg40_candump.log.gz")
DBC = ROOT / "config" / "dbc" / "toyota_new_mc_pt_generated.dbc"
EPOCH_S = 1_764_000_000.0
MQTT_OVERHEAD = 2 + 2 + len("dongle/v1/bench-0001/up/telemetry") + 2  # fixed header, topic, packet id
TARGETS = {"frame": 3.0, "sample": 2.0, "drain": 100.0}


class NoLink:
    connected = False


def _sealer() -> Sealer:
    return Sealer("bench-0001", Ed25519PrivateKey.generate(), X25519PrivateKey.generate().public_key())


def load_frames() -> list[Frame]:
    frames = []
    with can.LogReader(str(LOG_GZ)) as reader:
        t0 = None
        for m in reader:
            if m.is_error_frame:
                continue
            t0 = m.timestamp if t0 is None else t0
            frames.append(Frame(str(m.channel), int((EPOCH_S + m.timestamp - t0) * 1e6), m.arbitration_id,
                                m.is_extended_id, bytes(m.data)))
    return frames


def seal_all(tmp: Path, samples: list[Sample], frames: list[Frame], *, batch_samples: int = 4000,
             batch_frames: int = 20000, per_envelope: int | None = None) -> list[bytes]:
    """Seals through the real store and uplink; ``per_envelope``: samples per online envelope."""
    st = Store(tmp / f"bench-{time.monotonic_ns()}.db")
    st._conn.execute("PRAGMA synchronous=OFF")  # the bench measures bytes, not the disk
    up = Uplink(st, NoLink(), _sealer(), interval_s=lambda: 5, batch_max_samples=per_envelope or batch_samples,
                batch_max_frames=batch_frames)
    out: list[bytes] = []
    step = per_envelope or 50_000
    for i in range(0, max(len(samples), len(frames)), step):
        st.add_samples(samples[i:i + step])
        st.add_frames(frames[i:i + step])
        up.seal_telemetry()
    out = [bytes(r[0]) for r in st.query("SELECT payload FROM outbox ORDER BY seq")]
    st.close()
    return out


def bench_frames(tmp: Path) -> dict:
    frames = load_frames()
    n = len(frames)
    t = time.process_time()
    envs = seal_all(tmp, [], frames)
    cpu = time.process_time() - t
    ours = sum(map(len, envs))
    # Level 19 for comparison: same bodies, envelope overhead taken from our envelopes.
    cctx19 = zstandard.ZstdCompressor(level=19)
    import cbor2
    body_bytes3 = body_bytes19 = 0
    for i in range(0, n, 20000):
        plain = cbor2.dumps(telemetry_body([], frames[i:i + 20000]), canonical=True)
        body_bytes3 += len(zstandard.ZstdCompressor(level=3).compress(plain))
        body_bytes19 += len(cctx19.compress(plain))
    overhead = ours - body_bytes3
    text = gzip.open(LOG_GZ, "rb").read()
    json_bytes = sum(len(json.dumps({"t": f.t_us, "bus": f.bus, "id": f.can_id, "ext": f.extended,
                                     "data": f.data.hex()}, separators=(",", ":"))) + 1 for f in frames)
    return {"frames": n, "envelopes": len(envs), "ours": ours / n, "ours_mqtt": (ours + MQTT_OVERHEAD * len(envs)) / n,
            "ours_l19": (body_bytes19 + overhead) / n, "raw16": 16.0, "json": json_bytes / n,
            "candump_zstd3": len(zstandard.ZstdCompressor(level=3).compress(text)) / n,
            "candump_zstd19": len(cctx19.compress(text)) / n, "candump_text": len(text) / n,
            "seal_cpu_us_per_frame": cpu / n * 1e6}


def drive_samples(hours: float = 1.0, seed: int = 4) -> list[Sample]:
    """The default config's four OBD PIDs at 1 s, values from the real drive, looped."""
    dbc = load_dbc(DBC)
    cfg = {"signals": [{"name": "rpm", "message": "ENGINE_RPM", "signal": "RPM", "period_s": 1},
                       {"name": "speed", "message": "SPEED", "signal": "SPEED", "period_s": 1},
                       {"name": "gas", "message": "GAS_PEDAL", "signal": "GAS_PEDAL", "period_s": 1}],
           "raw": {"enabled": False, "ids": []}}
    dec = CanDecoder(dbc, cfg)
    per_s: dict[int, dict[str, float]] = {}
    out: list[Sample] = []
    with can.LogReader(str(LOG_GZ)) as reader:
        t0 = None
        for m in reader:
            t0 = m.timestamp if t0 is None else t0
            f = Frame("can0", int((EPOCH_S + m.timestamp - t0) * 1e6), m.arbitration_id, m.is_extended_id,
                      bytes(m.data))
            dec.feed_into(f, out)
    for s in out:
        per_s.setdefault(int(s.t_ms // 1000), {})[s.name] = s.value
    seconds = sorted(per_s)
    rng = random.Random(seed)
    samples: list[Sample] = []
    last = {"rpm": 800.0, "speed": 0.0, "gas": 0.0}
    coolant = 88
    for k in range(int(hours * 3600)):
        vals = per_s[seconds[k % len(seconds)]]
        last.update(vals)
        base = int(EPOCH_S * 1000) + k * 1000
        if k % 600 == 0:
            coolant = min(95, max(85, coolant + rng.choice((-1, 0, 1))))
        t = base + rng.randint(5, 60)  # OBD request/response jitter
        rpm = round(last["rpm"] * 4) / 4                        # PID 0C: 1/4 rpm
        load = round(min(1.0, last["gas"] * 2.5) * 255) * 100 / 255  # PID 04: A*100/255
        samples += [Sample("engine.rpm", "rpm", t, rpm), Sample("vehicle.speed", "km/h", t + 40, round(last["speed"])),
                    Sample("engine.coolant_temp", "degC", t + 80, coolant), Sample("engine.load", "%", t + 120, load)]
    return samples


def bench_samples(tmp: Path) -> dict:
    samples = drive_samples(1.0)
    n = len(samples)
    online = seal_all(tmp, samples, [], per_envelope=20)      # 5 s of 4 PIDs at 1 Hz
    backlog = seal_all(tmp, samples, [], batch_samples=4000)
    on, off = sum(map(len, online)), sum(map(len, backlog))
    return {"samples": n, "online_envelopes": len(online), "online": on / n,
            "online_mqtt": (on + MQTT_OVERHEAD * len(online)) / n, "backlog_envelopes": len(backlog),
            "backlog": off / n, "hour_online_bytes": on + MQTT_OVERHEAD * len(online),
            "hour_backlog_bytes": off + MQTT_OVERHEAD * len(backlog)}


def bench_drain(tmp: Path, hours: float = 24.0) -> dict:
    from agent import settings as settings_mod
    from agent.app import Agent
    from scripts import devenv
    from scripts.cloud_console import CloudConsole
    run = tmp / "fleet"
    ca = devenv.make_cloud(run)
    broker = devenv.start_broker(run, ca)
    toml = devenv.make_device(run, ca, "bench-0001", broker_port=broker.port)
    console = CloudConsole(run)
    console.start()
    try:
        agent = Agent(settings_mod.load(toml))
        samples = drive_samples(hours)
        t = time.monotonic()
        st = agent.store
        for i in range(0, len(samples), 4000):  # offline: full batches sealed as they fill
            st.add_samples(samples[i:i + 4000])
            agent.uplink.seal_offline()
        seal_s = time.monotonic() - t
        backlog = st.counts()["outbox"]
        backlog_bytes = st.query("SELECT sum(length(payload)) FROM outbox")[0][0]
        t = time.monotonic()
        agent.start()
        while st.counts()["outbox"] > 0 and time.monotonic() - t < 600:
            time.sleep(0.02)
        drain_s = time.monotonic() - t
        left = st.counts()["outbox"]
        agent.stop()

        def arrived() -> int:
            return sum(1 for r in list(console.records) if r.get("kind") == "telemetry" and not r["duplicate"])
        deadline = time.monotonic() + 60
        while arrived() < backlog and time.monotonic() < deadline:  # the console decodes slower
            time.sleep(0.1)
        arrived = arrived()
        return {"hours": hours, "samples": len(samples), "envelopes": backlog, "bytes": backlog_bytes,
                "seal_s": seal_s, "drain_s": drain_s, "left": left, "arrived": arrived,
                "x_realtime": hours * 3600 / drain_s}
    finally:
        console.stop()
        broker.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default="frames,samples,day,drain")
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    which = set(args.only.split(","))
    print(f"machine: {platform.machine()} {platform.processor() or ''} Python {platform.python_version()}, "
          f"{time.strftime('%Y-%m-%d')}")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if "frames" in which:
            r = bench_frames(tmp)
            print(f"\n[frames] real RAV4 drive, {r['frames']:,} frames, {r['envelopes']} envelopes")
            print(f"  ours (sealed envelopes)       {r['ours']:6.2f} B/frame   target <= {TARGETS['frame']}"
                  f"  {'met' if r['ours'] <= TARGETS['frame'] else 'NOT met'}")
            print(f"  ours + MQTT PUBLISH framing   {r['ours_mqtt']:6.2f} B/frame")
            print(f"  ours if zstd level 19         {r['ours_l19']:6.2f} B/frame")
            print(f"  raw binary (can_frame)        {r['raw16']:6.2f} B/frame")
            print(f"  JSON per frame                {r['json']:6.2f} B/frame")
            print(f"  candump text                  {r['candump_text']:6.2f} B/frame")
            print(f"  zstd -3 of candump text       {r['candump_zstd3']:6.2f} B/frame")
            print(f"  zstd -19 of candump text      {r['candump_zstd19']:6.2f} B/frame")
            print(f"  sealing CPU                   {r['seal_cpu_us_per_frame']:6.2f} µs/frame")
        if which & {"samples", "day"}:
            r = bench_samples(tmp)
            if "samples" in which:
                print(f"\n[samples] default config (4 OBD PIDs at 1 s), one hour, {r['samples']:,} samples")
                print(f"  online, sealed every 5 s      {r['online']:6.2f} B/sample ({r['online_envelopes']} envelopes)"
                      f"   target <= {TARGETS['sample']}  {'met' if r['online'] <= TARGETS['sample'] else 'NOT met'}")
                print(f"  online + MQTT framing         {r['online_mqtt']:6.2f} B/sample")
                print(f"  backlog, 4000-sample batches  {r['backlog']:6.2f} B/sample ({r['backlog_envelopes']} envelopes)"
                      f"   target <= {TARGETS['sample']}  {'met' if r['backlog'] <= TARGETS['sample'] else 'NOT met'}")
            if "day" in which:
                print("\n[day] bytes per vehicle-day at the default config (from the measured hour)")
                for label, per_h in (("online (every 5 s)", r["hour_online_bytes"]),
                                     ("backlog batches", r["hour_backlog_bytes"])):
                    print(f"  {label:22s} 1 h driving: {per_h / 1e3:8.1f} kB   24 h driving: {24 * per_h / 1e6:7.2f} MB"
                          f"   typical day (1.5 h driving): {1.5 * per_h / 1e3:8.1f} kB")
        if "drain" in which:
            r = bench_drain(tmp)
            print(f"\n[drain] {r['hours']:.0f} h offline at the default config: {r['samples']:,} samples in "
                  f"{r['envelopes']} envelopes, {r['bytes'] / 1e6:.2f} MB")
            print(f"  sealing while offline         {r['seal_s']:6.2f} s")
            print(f"  drain to Mosquitto (PUBACKed) {r['drain_s']:6.2f} s  = {r['x_realtime']:,.0f}x real time"
                  f"   target >= {TARGETS['drain']:.0f}x  {'met' if r['x_realtime'] >= TARGETS['drain'] else 'NOT met'}"
                  f"  (left {r['left']}, arrived at the console {r['arrived']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
