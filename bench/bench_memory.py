"""Agent memory under sustained raw CAN load: RSS of a real ``dongle-agent`` process, as deployed.

The agent runs from a **runtime-only virtualenv** (``--venv``, default ``.venv-runtime`` at the
repository root, created on first use from ``requirements.txt`` plus the package itself, no test
dependencies): in the development venv python-can and pint find asammdf, numpy and
pandas installed and import them, which a device never has.

A local fleet (CA, Mosquitto, reference console) and one agent reading a python-can
``udp_multicast`` bus with raw capture of every id (``--decode``: and bench_can's 20 DBC signals
decoded from it, the RAV4 DBC loaded); this process sends the real RAV4 drive's
frames round and round onto the bus at ``--rate`` frames/s for ``--duration`` seconds. The
agent's RSS (``/proc/PID/status``: VmRSS, and its anonymous and file-backed parts) is sampled
every 5 s. Reported: RSS before load, steady RSS (median after the first minute), peak, and
growth (least-squares slope over the second half, MB/min). Targets: steady RSS <= 60 MB, no growth.

``--imports`` prints instead what each layer of imports adds to a fresh interpreter of that venv
(cumulative, one subprocess per step).

    .venv/bin/python bench/bench_memory.py [--duration 600] [--rate 10000]   (make bench-memory)
    .venv/bin/python bench/bench_memory.py --imports
"""
from __future__ import annotations

import argparse
import ast
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import can

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.bench_can import CONFIG as DECODE_CONFIG, DBC  # noqa: E402
from scripts.testbed import devenv  # noqa: E402
from scripts.refcloud.console import CloudConsole  # noqa: E402
from scripts.testbed.shared_data import SHARED_DATA

LOG_GZ = SHARED_DATA / "comma2k19_rav4/comma2k19_rav4_seg40_candump.log.gz"
DEV = "mem-0001"
TARGET_MB = 60.0
DEFAULT_VENV = ROOT / ".venv-runtime"
#: Not a runtime dependency: python-can's ``udp_multicast`` bus, which stands in for SocketCAN
#: here, needs it (about 0.3 MB of RSS).
BENCH_EXTRAS = ["msgpack>=1.0"]

#: Import layers, cumulative: what each adds to the agent's resident memory.
IMPORT_STEPS = [
    ("cbor2, zstandard", ["cbor2", "zstandard"]),
    ("cryptography (HPKE, Ed25519)", ["cryptography.hazmat.primitives.hpke",
                                      "cryptography.hazmat.primitives.asymmetric.ed25519"]),
    ("paho-mqtt (+ ssl)", ["paho.mqtt.client"]),
    ("jsonschema (+ referencing, rpds)", ["jsonschema"]),
    ("agent.compose (the agent's own modules, every component)", ["agent.compose"]),
    ("CAN: agent.can_pipeline (python-can; cantools only once a bus names a DBC)", ["agent.vehicle.can_pipeline"]),
    ("OBD: agent.vehicle.obd (python-OBD, pint, pyserial)", ["agent.vehicle.obd"]),
]


def ensure_runtime_venv(venv: Path) -> Path:
    """Creates ``venv`` with only the runtime requirements and the package; returns its python."""
    py = venv / "bin" / "python"
    marker = venv / ".requirements"
    want = (ROOT / "requirements.txt").read_text() + "\n".join(BENCH_EXTRAS)
    if py.exists() and marker.exists() and marker.read_text() == want:
        return py
    print(f"creating the runtime venv {venv} (requirements.txt + the package + msgpack for the bench bus)")
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    pip = [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    for extra in (["-r", str(ROOT / "requirements.txt")], ["--no-deps", "-e", str(ROOT)], BENCH_EXTRAS):
        r = subprocess.run(pip + extra, capture_output=True, text=True)
        if r.returncode:
            sys.exit(f"pip install {' '.join(extra)} failed:\n{r.stderr}")
    marker.write_text(want)
    return py


def proc_mem(pid: int | str = "self") -> dict[str, float]:
    """VmRSS, RssAnon, RssFile, VmHWM of a process, in MB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key = line.split(":")[0]
        if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            out[key] = int(line.split()[1]) / 1024
    return out


def import_costs(py: Path) -> list[tuple[str, float, float, float]]:
    """(layer, MB added, total RSS MB, of which anonymous MB), cumulative, fresh process per step."""
    def measure(mods: list[str]) -> dict[str, float]:
        code = ("import importlib, sys\nsys.path.insert(0, %r)\nfor m in %r: importlib.import_module(m)\n"
                "print({l.split(':')[0]: int(l.split()[1]) / 1024 for l in open('/proc/self/status') "
                "if l.startswith(('VmRSS', 'RssAnon', 'RssFile'))})") % (str(ROOT), mods)
        r = subprocess.run([str(py), "-c", code], capture_output=True, text=True, cwd=tempfile.gettempdir())
        if r.returncode:
            raise RuntimeError(f"importing {mods} failed: {r.stderr.strip().splitlines()[-1:]}")
        return ast.literal_eval(r.stdout.strip().splitlines()[-1])
    rows, mods = [], []
    prev = measure([])
    rows.append(("python interpreter", prev["VmRSS"], prev["VmRSS"], prev["RssAnon"]))
    for label, step in IMPORT_STEPS:
        mods += step
        cur = measure(mods)
        rows.append((label, cur["VmRSS"] - prev["VmRSS"], cur["VmRSS"], cur["RssAnon"]))
        prev = cur
    return rows


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


def slope_mb_per_min(points: list[tuple[float, float]]) -> float:
    if len(points) < 2:
        return 0.0
    xs, ys = [t / 60 for t, _ in points], [m for _, m in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / (sum((x - mx) ** 2 for x in xs) or 1)


def run_load(py: Path, duration: float, rate: float, env_extra: dict[str, str], decode: bool = False) -> dict:
    group = f"239.76.{random.randrange(1, 250)}.{random.randrange(1, 250)}"
    port = random.randrange(20000, 60000)
    exe = py.parent / "dongle-agent"
    with tempfile.TemporaryDirectory() as d:
        run = Path(d)
        ca = devenv.make_cloud(run)
        broker = devenv.start_broker(run, ca)
        bus = f'[[can.buses]]\nname = "can0"\ninterface = "udp_multicast"\nchannel = "{group}"\nport = {port}\n'
        if decode:
            bus += f'dbc = "{DBC}"\n'
        toml = devenv.make_device(run, ca, DEV, broker_port=broker.port, extra_toml=bus)
        console = CloudConsole(run)
        console.start()
        console.connected.wait(15)
        console.publish(DEV, "config", {"version": 1, "upload": {"interval_s": 5},
                                        "obd": {"pids": [], "dtc_period_s": 600},
                                        "can": DECODE_CONFIG if decode else
                                        {"signals": [], "raw": {"enabled": True, "ids": []}}})
        log = open(run / "agent.log", "w")
        env = dict(os.environ, PYTHONPATH="", **env_extra)
        agent = subprocess.Popen([str(exe), "--config", str(toml)], stdout=log, stderr=subprocess.STDOUT, env=env)
        stop, sent, died = threading.Event(), [], None
        samples: list[tuple[float, dict[str, float]]] = []
        try:
            time.sleep(5)
            idle = proc_mem(agent.pid)
            feeder = threading.Thread(target=feed, args=(group, port, rate, stop, sent), daemon=True)
            feeder.start()
            t0 = time.monotonic()
            while time.monotonic() - t0 < duration and agent.poll() is None:
                samples.append((time.monotonic() - t0, proc_mem(agent.pid)))
                time.sleep(5)
            stop.set()
            feeder.join(30)
            died = agent.poll()
            cpu = _cpu_s(agent.pid) if died is None else 0.0
        finally:
            agent.terminate()
            agent.wait(60)
            console.stop()
            broker.stop()
            log.close()
        tail = (run / "agent.log").read_text().splitlines()[-15:]
        telemetry = [r for r in console.records if r.get("kind") == "telemetry" and not r["duplicate"]]
        frames = sum(len(g["id"]) for r in telemetry for g in r["body"].get("frames", ()))
        wire = sum(r.get("size", 0) for r in telemetry)
    rss = [(t, m["VmRSS"]) for t, m in samples]
    steady = [m for t, m in rss if t >= 60] or [m for _, m in rss]
    return {"idle": idle, "samples": samples, "steady": statistics.median(steady),
            "steady_anon": statistics.median([m["RssAnon"] for t, m in samples if t >= 60] or [0]),
            "peak": max(m for _, m in rss), "slope": slope_mb_per_min(rss[len(rss) // 2:]),
            "sent": sent[0] if sent else 0, "delivered": frames, "wire": wire, "cpu_s": cpu,
            "exit": died, "log_tail": tail}


def _cpu_s(pid: int) -> float:
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=600)
    p.add_argument("--rate", type=float, default=10_000)
    p.add_argument("--venv", type=Path, default=DEFAULT_VENV,
                   help="runtime-only venv the agent runs from (created if missing)")
    p.add_argument("--imports", action="store_true", help="only print the import cost of each layer")
    p.add_argument("--decode", action="store_true",
                   help="also decode bench_can's 20 DBC signals (the RAV4 DBC on the bus) besides raw capture")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment for the agent, e.g. MALLOC_ARENA_MAX=2 (repeatable)")
    args = p.parse_args(argv)
    py = ensure_runtime_venv(args.venv)
    print(f"machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPUs, "
          f"{time.strftime('%Y-%m-%d')}; agent venv {args.venv}")
    if args.imports:
        print(f"\n{'import layer (cumulative)':72s} {'adds MB':>8s} {'RSS MB':>7s} {'anon MB':>8s}")
        for label, add, total, anon in import_costs(py):
            print(f"{label:72s} {add:8.1f} {total:7.1f} {anon:8.1f}")
        return 0
    r = run_load(py, args.duration, args.rate, dict(e.split("=", 1) for e in args.env), args.decode)
    med, slope = r["steady"], r["slope"]
    if r["delivered"] < 0.5 * r["sent"]:
        print("WARNING: the agent delivered under half of the frames sent; its log ends with:\n  "
              + "\n  ".join(r["log_tail"]))
    what = "raw capture + 20 DBC signals decoded" if args.decode else "raw capture, no DBC"
    print(f"agent RSS ({what}) over {args.duration:.0f} s at {args.rate:,.0f} frames/s offered{' with ' + ' '.join(args.env) if args.env else ''} "
          f"({r['sent']:,} sent, {r['delivered']:,} delivered to the cloud as raw frames"
          f"{'' if r['exit'] is None else '; the agent exited with ' + str(r['exit'])})")
    print(f"  before load (all imports)   {r['idle']['VmRSS']:6.1f} MB  (anon {r['idle']['RssAnon']:.1f})")
    print(f"  steady (median after 60 s)  {med:6.1f} MB  (anon {r['steady_anon']:.1f})   target <= "
          f"{TARGET_MB:.0f}  {'met' if med <= TARGET_MB else 'NOT met'}")
    print(f"  peak                        {r['peak']:6.1f} MB")
    print(f"  growth, second half         {slope:+6.2f} MB/min  target: none")
    print(f"  agent CPU                   {r['cpu_s']:6.1f} s = {r['cpu_s'] / max(1, r['sent']) * 1e6:.1f} µs per "
          f"frame offered")
    step = max(1, len(r["samples"]) // 12)
    print("  samples (s: MB): " + " ".join(f"{t:.0f}:{m['VmRSS']:.1f}" for t, m in r["samples"][::step]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
