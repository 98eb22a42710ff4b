"""Agent memory per configuration, under load: RSS of a real ``dongle-agent`` process, as deployed.

The agent runs from a **runtime-only virtualenv** (``--venv``, default ``.venv-runtime`` at the
repository root, created on first use from ``requirements.txt`` plus the package itself, no test
dependencies): in the development venv python-can and pint find asammdf, numpy and
pandas installed and import them, which a device never has.

A local fleet (CA, Mosquitto, reference console) and one agent reading a python-can
``udp_multicast`` bus; this process sends the real RAV4 drive's frames round and round onto the
bus for ``--duration`` seconds. Configurations (``--config``, cumulative as the demo's are; ``all``
runs each in turn):

* ``raw``: raw capture of every id, no DBC, at ``--rate`` frames/s (default 10,000);
* ``dbc+obd``: the car of bench_car.py: the RAV4 DBC with bench_can's 20 signals at 0.1 s, no raw
  capture, at 2,000 frames/s, plus six OBD PIDs at 5 Hz from the ELM327-emulator;
* ``+ev``: and the EV battery (``[ev] transport = "can"``, the simulated E-GMP BMS of
  scripts/vehicle_sim/ev_ecu_sim.py on a second bus, a snapshot every 5 s);
* ``+gnss``: and location (gpsd fed by gpsfake with the drive's NMEA, looping; consent given).

The agent's RSS (``/proc/PID/status``: VmRSS, and its anonymous and file-backed parts) is sampled
every 5 s. Reported: RSS before load, steady RSS (median after the first minute), peak, and
growth (least-squares slope over the second half, MB/min). Targets: steady RSS <= 60 MB, no growth.
Frames are accounted for: sent, received by the agent, dropped before it had them (its reader's
queue, and the kernel's socket buffer: ``drops``/``socket_drops`` in ``dongle status``), and
delivered to the cloud as raw frames.

``--imports`` prints instead what each layer of imports adds to a fresh interpreter of that venv
(cumulative, one subprocess per step).

    .venv/bin/python bench/bench_memory.py [--config all] [--duration 600] [--rate 10000]   (make bench-memory)
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


FEEDER = """
import sys, time, can
from can.interfaces.udp_multicast.bus import GeneralPurposeUdpMulticastBus
from can.interfaces.udp_multicast.utils import pack_message
log, group, port, rate, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
packed = []
with can.LogReader(log) as r:   # packed once (the drive's first 30,000 frames, ~13 s of it): what
    for m in r:                 # udp_multicast's send() puts on the wire
        packed.append(pack_message(can.Message(arbitration_id=m.arbitration_id, is_extended_id=m.is_extended_id,
                                               data=m.data)))
        if len(packed) == 30_000:
            break
sock = GeneralPurposeUdpMulticastBus(group, port, hop_limit=1)
open(out, "w").write("0")
send = sock.send
i, t0, chunk = 0, time.monotonic(), max(1, int(rate / 200))
try:
    while True:
        for _ in range(chunk):
            send(packed[i % len(packed)])
            i += 1
        ahead = i / rate - (time.monotonic() - t0)
        if ahead > 0:
            time.sleep(ahead)
        if i % (chunk * 200) == 0:
            open(out, "w").write(str(i))
except KeyboardInterrupt:
    pass
finally:
    open(out, "w").write(str(i))
    sock.shutdown()
"""


BARE = """
import os, sys, threading, time
import can
group, port, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
bus = can.Bus(interface="udp_multicast", channel=group, port=port)
import socket
sock = socket.socket(fileno=os.dup(bus.fileno()))   # the receive buffer the agent asks for
sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
n = 0
def report():
    while True:
        time.sleep(0.5)
        with open(out + ".tmp", "w") as f:
            f.write(str(n))
        os.replace(out + ".tmp", out)
threading.Thread(target=report, daemon=True).start()
while True:
    if bus.recv(0.5) is not None:
        n += 1
"""


class BareReceiver:
    """The baseline beside the agent: a bare python-can receiver of the same bus in its own
    process (``recv()`` in a loop, counting), with the same receive buffer as the agent's."""

    def __init__(self, group: str, port: int, workdir: Path, py: Path):
        self.count = workdir / "bare"
        self.proc = subprocess.Popen([str(py), "-c", BARE, group, str(port), str(self.count)],
                                     cwd=tempfile.gettempdir(), stderr=open(workdir / "bare.log", "w"),
                                     env={**os.environ, "PYTHONPATH": ""})

    def received(self) -> int:
        try:
            return int(self.count.read_text())
        except (OSError, ValueError):
            return 0

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def rx_queue_bytes(pid: int) -> int | None:
    """Bytes waiting in the receive queue of the process's UDP sockets (/proc/net/udp rx_queue)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            link = os.readlink(fd)
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    total = None
    for line in Path(f"/proc/{pid}/net/udp").read_text().splitlines()[1:]:
        f = line.split()
        if f[9] in inodes:
            total = (total or 0) + int(f[4].split(":")[1], 16)
    return total


class Feeder:
    """Sends the RAV4 drive's frames round and round onto the bus at ``rate`` frames/s, from its
    own process (the bench's own threads would otherwise slow it down)."""

    def __init__(self, group: str, port: int, rate: float, workdir: Path):
        self.count = workdir / "fed"
        self.proc = subprocess.Popen([sys.executable, "-c", FEEDER, str(LOG_GZ), group, str(port), str(rate),
                                      str(self.count)], cwd=ROOT, stderr=open(workdir / "feeder.log", "w"))
        from scripts.testbed.wait import wait_until
        wait_until(self.count.exists, 120, what="the feeder packing its frames")

    def stop(self) -> int:
        import signal as signal_mod
        self.proc.send_signal(signal_mod.SIGINT)
        self.proc.wait(30)
        return int(self.count.read_text()) if self.count.exists() else 0


def slope_mb_per_min(points: list[tuple[float, float]]) -> float:
    if len(points) < 2:
        return 0.0
    xs, ys = [t / 60 for t, _ in points], [m for _, m in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / (sum((x - mx) ** 2 for x in xs) or 1)


CONFIGS = ("raw", "dbc+obd", "dbc+obd+ev", "dbc+obd+ev+gnss")
DAY_MS = 86_400_000


def _cloud_config(name: str) -> dict:
    from bench.bench_obd import PIDS
    if name == "raw":
        return {"version": 1, "upload": {"interval_s": 5}, "obd": {"pids": [], "dtc_period_s": 600},
                "can": {"signals": [], "raw": {"enabled": True, "ids": []}}}
    doc = {"version": 1, "upload": {"interval_s": 30},
           "obd": {"pids": [{"name": f"obd.{p.lower()}", "pid": p, "period_s": 0.2} for p in PIDS],
                   "dtc_period_s": 600},
           "can": {"signals": DECODE_CONFIG["signals"], "raw": {"enabled": False, "ids": []}}}
    if "ev" in name:
        doc["ev"] = {"profile": "hyundai_egmp", "period_s": 5}
    if "gnss" in name:
        now = int(time.time() * 1000)
        doc["privacy"] = {"location": {"mode": "precise", "consent_id": "bench", "granted_at": now - DAY_MS,
                                       "until": now + DAY_MS}}
    return doc


def _status(py: Path, toml: Path) -> dict:
    import json
    r = subprocess.run([str(py.parent / "dongle"), "--config", str(toml), "status", "--json"],
                       capture_output=True, text=True, timeout=60, env=dict(os.environ, PYTHONPATH=""))
    try:
        return json.loads(r.stdout)
    except ValueError:
        return {}


def run_load(py: Path, duration: float, rate: float, env_extra: dict[str, str], config: str = "raw") -> dict:
    import contextlib
    from scripts.vehicle_sim.elm_emulator import ElmEmulator
    group = f"239.76.{random.randrange(1, 250)}.{random.randrange(1, 250)}"
    port = random.randrange(20000, 60000)
    exe = py.parent / "dongle-agent"
    if config != "raw":
        rate = 2000.0
    with tempfile.TemporaryDirectory(prefix="mem-", dir="/tmp") as d, contextlib.ExitStack() as stack:
        run = Path(d)
        ca = devenv.make_cloud(run)
        broker = devenv.start_broker(run, ca)
        stack.callback(broker.stop)
        bus = f'[[can.buses]]\nname = "can0"\ninterface = "udp_multicast"\nchannel = "{group}"\nport = {port}\n'
        obd_port = None
        if config != "raw":
            bus += f'dbc = "{DBC}"\n'
            obd_port = stack.enter_context(ElmEmulator("car", workdir=run / "elm")).port
        if "ev" in config:
            egroup, eport = f"239.76.{random.randrange(1, 250)}.{random.randrange(1, 250)}", random.randrange(20000, 60000)
            bus += (f'\n[[can.buses]]\nname = "ev"\ninterface = "udp_multicast"\nchannel = "{egroup}"\n'
                    f'port = {eport}\n\n[ev]\ntransport = "can"\nbus = "ev"\n')
            ecu = subprocess.Popen([sys.executable, "-m", "scripts.vehicle_sim.ev_ecu_sim", "--profile", "hyundai_egmp",
                                    "--interface", "udp_multicast", "--channel", egroup, "--port", str(eport)],
                                   cwd=ROOT, stdout=subprocess.DEVNULL, stderr=open(run / "ecu.log", "w"))
            stack.callback(lambda: (ecu.terminate(), ecu.wait(10)))
        if "gnss" in config:
            from scripts.testbed.gps import GpsFake
            gps = GpsFake(run / "gps").start(once=False, cycle=1.0)
            stack.callback(gps.stop)
            gps.wait_listening()
            bus += f'\n[gnss]\nhost = "127.0.0.1"\nport = {gps.port}\n'
        toml = devenv.make_device(run, ca, DEV, broker_port=broker.port, obd_port=obd_port, extra_toml=bus)
        console = CloudConsole(run)
        console.start()
        stack.callback(console.stop)
        console.connected.wait(15)
        console.publish(DEV, "config", _cloud_config(config))
        log = open(run / "agent.log", "w")
        env = {**os.environ, "PYTHONPATH": "", **env_extra}
        agent = subprocess.Popen([str(exe), "--config", str(toml)], stdout=log, stderr=subprocess.STDOUT, env=env)
        sent, died = 0, None
        samples: list[tuple[float, dict[str, float]]] = []
        queue: list[int] = []   # the agent's socket receive queue, sampled every 20 ms
        bare = BareReceiver(group, port, run, py) if config == "raw" else None
        if bare is not None:
            stack.callback(bare.stop)
        try:
            time.sleep(10)
            idle = proc_mem(agent.pid)
            bare0 = bare.received() if bare else 0
            feeder = Feeder(group, port, rate, run)
            t0 = next_mem = time.monotonic()
            while time.monotonic() - t0 < duration and agent.poll() is None:
                if time.monotonic() >= next_mem:
                    samples.append((time.monotonic() - t0, proc_mem(agent.pid)))
                    next_mem += 5
                q = rx_queue_bytes(agent.pid)
                if q is not None:
                    queue.append(q)
                time.sleep(0.02)
            sent = feeder.stop()
            time.sleep(1)
            bare_got = bare.received() - bare0 if bare else 0
            died = agent.poll()
            cpu = _cpu_s(agent.pid) if died is None else 0.0
            time.sleep(2)   # what is still queued reaches the agent
            status = _status(py, toml) if died is None else {}
            if config == "raw" and died is None:   # everything the agent received reaches the cloud
                got = ((status.get("buses") or {}).get("can0") or {}).get("frames", 0)

                def delivered() -> int:
                    return sum(len(g["id"]) for r in list(console.records) if r.get("kind") == "telemetry"
                               and not r["duplicate"] for g in r["body"].get("frames", ()))
                deadline = time.monotonic() + 120
                while delivered() < got and time.monotonic() < deadline:
                    time.sleep(1)
        finally:
            agent.terminate()
            agent.wait(60)
            log.close()
        tail = (run / "agent.log").read_text().splitlines()[-15:]
        telemetry = [r for r in console.records if r.get("kind") == "telemetry" and not r["duplicate"]]
        frames = sum(len(g["id"]) for r in telemetry for g in r["body"].get("frames", ()))
        signals = {s["name"] for r in telemetry for s in r["body"]["signals"]}
        positions = sum(len(r["body"].get("positions", {}).get("t", ())) for r in telemetry)
    rss = [(t, m["VmRSS"]) for t, m in samples]
    steady = [m for t, m in rss if t >= 60] or [m for _, m in rss]
    return {"config": config, "rate": rate, "idle": idle, "samples": samples, "steady": statistics.median(steady),
            "steady_anon": statistics.median([m["RssAnon"] for t, m in samples if t >= 60] or [0]),
            "peak": max(m for _, m in rss), "slope": slope_mb_per_min(rss[len(rss) // 2:]),
            "sent": sent, "delivered": frames, "cpu_s": cpu, "exit": died, "log_tail": tail,
            "bus": (status.get("buses") or {}).get("can0") or {}, "signals": len(signals), "positions": positions,
            "ev": any(n.startswith("ev.") or n.startswith("battery") for n in signals),
            "bare": bare_got, "queue": queue}


def _cpu_s(pid: int) -> float:
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="raw", choices=CONFIGS + ("all",),
                   help="which configuration (module docstring); all: each in turn")
    p.add_argument("--duration", type=float, default=600)
    p.add_argument("--rate", type=float, default=10_000, help="frames/s offered with --config raw")
    p.add_argument("--venv", type=Path, default=DEFAULT_VENV,
                   help="runtime-only venv the agent runs from (created if missing)")
    p.add_argument("--imports", action="store_true", help="only print the import cost of each layer")
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
    results = [run_load(py, args.duration, args.rate, dict(e.split("=", 1) for e in args.env), c)
               for c in (CONFIGS if args.config == "all" else (args.config,))]
    for r in results:
        med, slope = r["steady"], r["slope"]
        b = r["bus"]
        print(f"\n[{r['config']}] {args.duration:.0f} s at {r['rate']:,.0f} frames/s offered"
              f"{' with ' + ' '.join(args.env) if args.env else ''}"
              f"{'' if r['exit'] is None else '; the agent EXITED with ' + str(r['exit'])}")
        if r["exit"] is not None:
            print("  its log ends with:\n    " + "\n    ".join(r["log_tail"]))
        print(f"  before load (all imports)   {r['idle']['VmRSS']:6.1f} MB  (anon {r['idle']['RssAnon']:.1f})")
        print(f"  steady (median after 60 s)  {med:6.1f} MB  (anon {r['steady_anon']:.1f})   goal <= "
              f"{TARGET_MB:.0f}  {'met' if med <= TARGET_MB else 'NOT met'}")
        print(f"  peak                        {r['peak']:6.1f} MB")
        print(f"  growth, second half         {slope:+6.2f} MB/min  goal: none")
        print(f"  agent CPU                   {r['cpu_s']:6.1f} s = {r['cpu_s'] / max(1, r['sent']) * 1e6:.1f} µs per "
              f"frame offered")
        got = b.get("frames", 0)
        print(f"  frames: sent {r['sent']:,}; received by the agent {got:,} ({got / max(1, r['sent']):.1%}); "
              f"dropped before it had them {b.get('drops', 0):,} (kernel socket buffer {b.get('socket_drops')}, "
              f"reader queue {b.get('queue_drops', 0)}; receive buffer {b.get('rcvbuf')} B); invalid {b.get('invalid', 0)}, "
              f"unparsable {b.get('unparsable', 0)}; unaccounted {r['sent'] - got - b.get('drops', 0):,}")
        if r["config"] == "raw":
            print(f"  delivered to the cloud as raw frames: {r['delivered']:,} ({r['delivered'] / max(1, r['sent']):.1%} of sent)")
            print(f"  baseline, a bare python-can receiver of the same bus in the same run: {r['bare']:,} "
                  f"({r['bare'] / max(1, r['sent']):.1%} of sent)")
            q, cap = r["queue"], b.get("rcvbuf") or 0
            if q and cap:
                full = sum(1 for x in q if x >= 0.9 * cap) / len(q)
                print(f"  the agent's socket queue (sampled every 20 ms): median {statistics.median(q) / 1024:.0f} KiB, "
                      f"max {max(q) / 1024:.0f} KiB of {cap / 1024:.0f}, at least 90 % full {full:.1%} of the time")
        else:
            print(f"  signals at the cloud: {r['signals']}{' incl. EV battery' if r['ev'] else ''}; "
                  f"positions {r['positions']}")
        step = max(1, len(r["samples"]) // 12)
        print("  samples (s: MB): " + " ".join(f"{t:.0f}:{m['VmRSS']:.1f}" for t, m in r["samples"][::step]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
