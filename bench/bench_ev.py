"""EV battery snapshot time: every request of a profile, over both transports.

The simulated car (scripts/vehicle_sim/ev_ecu_sim.py) answers after ``--latency-ms`` (default 50 ms, a
slow real ECU); the python-can path (can-isotp + udsoncan) and the ELM327 path (drivers/
elm_isotp.py through scripts/vehicle_sim/elm_pty.py on a pty) each read the whole profile ``--rounds``
times. Printed: median and worst snapshot time per profile and path, and the time per request.
No target is asserted; a snapshot every 60 s (the default ``ev.period_s``) leaves ample room.

    .venv/bin/python bench/bench_ev.py [--latency-ms 50] [--rounds 5] [--markdown]
"""
from __future__ import annotations

import argparse
import logging
import platform
import statistics
import sys
import time
import uuid
from pathlib import Path

import can

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from agent.vehicle.ev_profile import load_profiles  # noqa: E402
from drivers.elm_isotp import ElmIsoTp  # noqa: E402
from drivers.uds import UdsClient  # noqa: E402
from scripts.vehicle_sim.elm_pty import ElmPty  # noqa: E402
from scripts.vehicle_sim.ev_ecu_sim import EcuSimulator, Scenario  # noqa: E402

PROFILES = ("hyundai_egmp", "nissan_leaf", "vw_meb")


def snapshot(transport, profile) -> tuple[float, int]:
    start = time.perf_counter()
    ok = sum(1 for req in profile.requests if transport.read(req).ok)
    return time.perf_counter() - start, ok


def run(name: str, latency_s: float, rounds: int) -> dict[str, tuple[float, float, int, int]]:
    profile = load_profiles()[name]
    channel = f"bench-{uuid.uuid4().hex[:8]}"
    sim_bus = can.Bus(interface="virtual", channel=channel)
    sim = EcuSimulator(sim_bus, profile, Scenario(), latency_s=latency_s).start()
    out = {}
    try:
        with UdsClient(can.Bus(interface="virtual", channel=channel), owns_bus=True) as client:
            times = [snapshot(client, profile) for _ in range(rounds)]
            out["python-can"] = (statistics.median(t for t, _ in times), max(t for t, _ in times),
                                 len(profile.requests), min(ok for _, ok in times))
        with ElmPty({"interface": "virtual", "channel": channel}) as front, \
                ElmIsoTp.open_serial(front.path, p2_s=1.0) as elm:
            snapshot(elm, profile)  # adapter set-up (ATZ ...) not counted
            times = [snapshot(elm, profile) for _ in range(rounds)]
            out["ELM327"] = (statistics.median(t for t, _ in times), max(t for t, _ in times),
                             len(profile.requests), min(ok for _, ok in times))
    finally:
        sim.stop()
        sim_bus.shutdown()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latency-ms", type=float, default=50.0)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    print(f"machine: {platform.processor() or platform.machine()}, Python {platform.python_version()}, "
          f"python-can {can.__version__}; simulated ECU latency {args.latency_ms:.0f} ms, {args.rounds} rounds")
    rows = []
    for name in PROFILES:
        for path, (med, worst, n, ok) in run(name, args.latency_ms / 1000.0, args.rounds).items():
            rows.append((name, path, n, ok, med, worst))
            print(f"{name:<16} {path:<10} {n:>2} requests ({ok} answered): median {med * 1000:7.0f} ms, "
                  f"worst {worst * 1000:7.0f} ms, {med / n * 1000:5.0f} ms per request")
    if args.markdown:
        print("\n| profile | path | requests | snapshot median ms | worst ms | ms per request |")
        print("|---|---|---:|---:|---:|---:|")
        for name, path, n, ok, med, worst in rows:
            print(f"| {name} | {path} | {n} | {med * 1000:.0f} | {worst * 1000:.0f} | {med / n * 1000:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
