"""OBD-II live data rate: multi-PID polling vs python-OBD's one-PID-per-query loop.

Both runs use the same link in the same process run: the ELM327-emulator ('car' scenario) on a
pty, behind ``scripts.pty_relay.PtyRelay``, which holds every OBD request ``--delay-ms``
(default 50) before passing it on — the ECU round trip of a real car, which the emulator does
not have. Six PIDs (RPM, SPEED, COOLANT_TEMP, ENGINE_LOAD, THROTTLE_POS, INTAKE_TEMP):

1. ``agent``: ``agent.vehicle.obd.ObdPoller`` with every PID due at once (``period_s`` 0.001), so each
   cycle is one multi-PID mode 01 request; samples counted at its sink.
2. ``python-obd``: ``obd.OBD(port)`` with its defaults (``fast=True``: response-count hint and
   repeat-by-CR), querying the six commands in turn; non-null values counted.

Target: agent samples/s >= 3x python-obd samples/s.

    .venv/bin/python bench/bench_obd.py [--seconds 10] [--delay-ms 50] [--markdown]
"""
from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import obd  # noqa: E402

from agent.vehicle.obd import ObdPoller  # noqa: E402
from scripts.vehicle_sim.elm_emulator import ElmEmulator  # noqa: E402
from scripts.vehicle_sim.pty_relay import PtyRelay  # noqa: E402

PIDS = ["RPM", "SPEED", "COOLANT_TEMP", "ENGINE_LOAD", "THROTTLE_POS", "INTAKE_TEMP"]
TARGET_RATIO = 3.0


def cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def run_agent(port: str, seconds: float) -> dict:
    count = 0
    lock = threading.Lock()
    first = threading.Event()

    def sink(batch) -> None:
        nonlocal count
        with lock:
            count += len(batch)
        first.set()

    config = [{"name": f"bench.{p.lower()}", "pid": p, "period_s": 0.001} for p in PIDS]
    poller = ObdPoller(port, config, sink, protocol="6", dtc_period_s=None, batch_size=6,
                       batch_age_s=0.0)
    poller.start()
    try:
        if not first.wait(60):
            raise RuntimeError(f"agent: no samples ({poller.status()['last_error']})")
        time.sleep(0.5)  # past the first requests (multi-PID and hint probing)
        with lock:
            start_count = count
        start, start_cpu = time.monotonic(), cpu_s()
        time.sleep(seconds)
        with lock:
            samples = count - start_count
        wall, cpu = time.monotonic() - start, cpu_s() - start_cpu
        status = poller.status()
    finally:
        poller.stop(30)
    return {"samples": samples, "wall": wall, "cpu": cpu, "multi_pid": status["multi_pid"],
            "count_hint": status["count_hint"]}


def run_python_obd(port: str, seconds: float) -> dict:
    conn = obd.OBD(port, protocol="6")
    try:
        if conn.status() != obd.OBDStatus.CAR_CONNECTED:
            raise RuntimeError(f"python-obd: not connected ({conn.status()})")
        commands = [obd.commands[p] for p in PIDS]
        for c in commands:  # learn frame counts, as a long-running loop would have
            conn.query(c)
        samples = 0
        start, start_cpu = time.monotonic(), cpu_s()
        while time.monotonic() - start < seconds:
            for c in commands:
                if not conn.query(c).is_null():
                    samples += 1
        wall, cpu = time.monotonic() - start, cpu_s() - start_cpu
    finally:
        conn.close()
    return {"samples": samples, "wall": wall, "cpu": cpu}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--delay-ms", type=float, default=50.0)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s %(levelname)s %(message)s")
    logging.getLogger("obd").setLevel(logging.ERROR)

    print(f"machine: {platform.machine()} {platform.processor() or ''} {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}, python-OBD {obd.__version__}")
    print(f"link: ELM327-emulator 'car' behind a relay adding {args.delay_ms:.0f} ms per OBD "
          f"request; {len(PIDS)} PIDs: {', '.join(PIDS)}; {args.seconds:.0f} s per run")
    results = {}
    with ElmEmulator("car") as emu, PtyRelay(emu.pty, args.delay_ms / 1000) as relay:
        results["agent"] = run_agent(relay.port, args.seconds)
        time.sleep(1.0)  # let the adapter finish the ATZ of the close
        results["python-obd"] = run_python_obd(relay.port, args.seconds)
    rows = []
    for name, r in results.items():
        rate = r["samples"] / r["wall"]
        rows.append((name, r["samples"], r["wall"], rate, r["cpu"] / max(r["samples"], 1) * 1e3))
        r["rate"] = rate
    ratio = results["agent"]["rate"] / max(results["python-obd"]["rate"], 1e-9)
    for name, samples, wall, rate, cpu_ms in rows:
        print(f"{name:>11}: {samples:6d} samples in {wall:5.1f} s = {rate:7.1f} samples/s "
              f"({cpu_ms:.2f} CPU ms per sample, this process)")
    a = results["agent"]
    print(f"agent multi-PID: {a['multi_pid']}, response-count hint: {a['count_hint']}")
    verdict = "met" if ratio >= TARGET_RATIO else "NOT met"
    print(f"ratio agent / python-obd: {ratio:.2f}x (target >= {TARGET_RATIO:.0f}x: {verdict})")
    if args.markdown:
        print("\n| run | samples | wall s | samples/s | CPU ms per sample |")
        print("|---|---:|---:|---:|---:|")
        for name, samples, wall, rate, cpu_ms in rows:
            print(f"| {name} | {samples:,} | {wall:.1f} | {rate:.1f} | {cpu_ms:.2f} |")
    return 0 if ratio >= TARGET_RATIO else 1


if __name__ == "__main__":
    sys.exit(main())
