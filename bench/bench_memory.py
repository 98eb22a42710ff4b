"""Agent memory under sustained raw CAN load: RSS of a real ``dongle-agent`` process.

A local fleet (CA, Mosquitto, reference console) and one agent reading a python-can
``udp_multicast`` bus with raw capture of every id; this process sends the real RAV4 drive's
frames round and round onto the bus at ``--rate`` frames/s for ``--duration`` seconds. The
agent's RSS (``/proc/PID/status`` VmRSS) is sampled every 5 s. Reported: steady RSS (median
after the first minute), peak, and growth (least-squares slope over the second half, MB/min).
Targets: steady RSS <= 60 MB, no growth.

    /work/main/.venv/bin/python bench/bench_memory.py [--duration 600] [--rate 10000]   (make bench-memory)
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import can

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from scripts import devenv  # noqa: E402
from scripts.cloud_console import CloudConsole  # noqa: E402

LOG_GZ = Path("/work/shared/data/comma2k19_rav4/comma2k19_rav4_seg40_candump.log.gz")
DEV = "mem-0001"
TARGET_MB = 60.0


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def feed(group: str, port: int, rate: float, stop: threading.Event, sent: list[int]) -> None:
    with can.LogReader(str(LOG_GZ)) as r:
        msgs = [can.Message(arbitration_id=m.arbitration_id, is_extended_id=m.is_extended_id, data=m.data)
                for m in r if not m.is_error_frame]
    bus = can.Bus(interface="udp_multicast", channel=group, port=port)
    i, t0, chunk = 0, time.monotonic(), max(1, int(rate / 200))
    try:
        while not stop.is_set():
            for _ in range(chunk):
                bus.send(msgs[i % len(msgs)])
                i += 1
            ahead = i / rate - (time.monotonic() - t0)
            if ahead > 0:
                time.sleep(ahead)
    finally:
        sent.append(i)
        bus.shutdown()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=600)
    p.add_argument("--rate", type=float, default=10_000)
    args = p.parse_args(argv)
    group = f"239.76.{random.randrange(1, 250)}.{random.randrange(1, 250)}"
    port = random.randrange(20000, 60000)
    with tempfile.TemporaryDirectory() as d:
        run = Path(d)
        ca = devenv.make_cloud(run)
        broker = devenv.start_broker(run, ca)
        bus = f'[[can.buses]]\nname = "can0"\ninterface = "udp_multicast"\nchannel = "{group}"\nport = {port}\n'
        toml = devenv.make_device(run, ca, DEV, broker_port=broker.port, extra_toml=bus)
        console = CloudConsole(run)
        console.start()
        console.connected.wait(15)
        console.publish(DEV, "config", {"version": 1, "upload": {"interval_s": 5},
                                        "obd": {"pids": [], "dtc_period_s": 600},
                                        "can": {"signals": [], "raw": {"enabled": True, "ids": []}}})
        import subprocess
        exe = Path(sys.executable).parent / "dongle-agent"
        log = open(run / "agent.log", "w")
        agent = subprocess.Popen([str(exe), "--config", str(toml)], stdout=log, stderr=subprocess.STDOUT)
        stop, sent = threading.Event(), []
        try:
            time.sleep(5)
            feeder = threading.Thread(target=feed, args=(group, port, args.rate, stop, sent), daemon=True)
            feeder.start()
            samples: list[tuple[float, float]] = []
            t0 = time.monotonic()
            while time.monotonic() - t0 < args.duration and agent.poll() is None:
                samples.append((time.monotonic() - t0, rss_mb(agent.pid)))
                time.sleep(5)
            stop.set()
            feeder.join(30)
        finally:
            agent.terminate()
            agent.wait(60)
            console.stop()
            broker.stop()
        telemetry = [r for r in console.records if r.get("kind") == "telemetry" and not r["duplicate"]]
        frames = sum(len(g["id"]) for r in telemetry for g in r["body"].get("frames", ()))
    steady = [m for t, m in samples if t >= 60] or [m for _, m in samples]
    half = samples[len(samples) // 2:]
    slope = 0.0
    if len(half) >= 2:
        xs, ys = [t / 60 for t, _ in half], [m for _, m in half]
        mx, my = statistics.fmean(xs), statistics.fmean(ys)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / (sum((x - mx) ** 2 for x in xs) or 1)
    med = statistics.median(steady)
    print(f"agent RSS over {args.duration:.0f} s at {args.rate:,.0f} frames/s offered "
          f"({sent[0] if sent else 0:,} sent, {frames:,} delivered to the cloud as raw frames)")
    print(f"  steady (median after 60 s)  {med:6.1f} MB   target <= {TARGET_MB:.0f}  {'met' if med <= TARGET_MB else 'NOT met'}")
    print(f"  peak                        {max(m for _, m in samples):6.1f} MB")
    print(f"  growth, second half         {slope:+6.2f} MB/min  target: none")
    print("  samples (s, MB): " + " ".join(f"{t:.0f}:{m:.1f}" for t, m in samples[::max(1, len(samples) // 12)]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
