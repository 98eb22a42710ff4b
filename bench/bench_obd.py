"""OBD-II: the poller's sample rate and its CPU, each beside bare python-OBD in the same run.

Both parts use the ELM327-emulator ('car' scenario) on a pty. Six PIDs: RPM, SPEED,
COOLANT_TEMP, ENGINE_LOAD, THROTTLE_POS, INTAKE_TEMP.

1. Rate (``--seconds`` per round, ``--rounds``): the emulator behind
   ``scripts/vehicle_sim/pty_relay.PtyRelay``, which holds every OBD request ``--delay-ms``
   (default 50) before passing it on — the ECU round trip of a real car, which the emulator does
   not have.
   - ``agent``: ``agent.vehicle.obd.ObdPoller`` with every PID due at once (``period_s``
     0.001), so each cycle is one multi-PID mode 01 request; samples counted at its sink. Per
     round: the multi-PID mode at the end and the fraction of the round spent in the per-PID
     fall-back (``status()["multi_fallback_s"]``; issue 20 item 4).
   - ``python-obd``: ``obd.OBD(port)`` with its defaults (``fast=True``: response-count hint and
     repeat-by-CR), querying the six commands in turn; non-null values counted.
   Target: agent samples/s >= 3x python-obd samples/s.
2. CPU (``--cpu-seconds`` per run, ``--cpu-rounds`` alternating runs, medians): issue 17's
   realistic car, six PIDs at 5 Hz, against the emulator directly (python-OBD cannot ask 30
   PIDs a second one by one behind 50 ms). The CPU time of the poller's own thread
   (``pthread_getcpuclockid``: the emulator, the relay and this script's other threads do not
   count) beside the CPU time of a thread running bare python-OBD: ``obd.OBD(port)`` defaults,
   the six commands queried in turn every 0.2 s. A Pi 4 core is taken as 5x slower
   (docs/performance.md).

    .venv/bin/python bench/bench_obd.py [--seconds 10] [--rounds 1] [--delay-ms 50]
        [--cpu-seconds 20] [--cpu-rounds 3] [--no-rate] [--no-cpu] [--markdown]
"""
from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import obd  # noqa: E402

from agent.vehicle.obd import ObdPoller  # noqa: E402
from scripts.testbed.wait import wait_until  # noqa: E402
from scripts.vehicle_sim.elm_emulator import ElmEmulator  # noqa: E402
from scripts.vehicle_sim.pty_relay import PtyRelay  # noqa: E402

PIDS = ["RPM", "SPEED", "COOLANT_TEMP", "ENGINE_LOAD", "THROTTLE_POS", "INTAKE_TEMP"]
TARGET_RATIO = 3.0
MIX_PERIOD_S = 0.2  # issue 17: 6 PIDs at 5 Hz
PI_FACTOR = 5.0


def cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def thread_cpu_s(thread: threading.Thread) -> float:
    assert thread.ident is not None
    return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))


class Counter:
    def __init__(self) -> None:
        self.count = 0
        self._lock = threading.Lock()

    def __call__(self, batch) -> None:
        with self._lock:
            self.count += len(batch)


def settle_port() -> None:
    time.sleep(1.0)  # let the adapter finish the ATZ of the previous close


# -- rate --------------------------------------------------------------------------------------

def run_agent(port: str, seconds: float) -> dict:
    sink = Counter()
    config = [{"name": f"bench.{p.lower()}", "pid": p, "period_s": 0.001} for p in PIDS]
    poller = ObdPoller(port, config, sink, protocol="6", dtc_period_s=None, batch_size=6,
                       batch_age_s=0.0)
    poller.start()
    try:
        wait_until(lambda: sink.count > 0, timeout=60, what="agent: the first samples")
        time.sleep(0.5)  # past the first requests (multi-PID and hint probing)
        start_count, fallback0 = sink.count, poller.status()["multi_fallback_s"]
        start, start_cpu = time.monotonic(), cpu_s()
        time.sleep(seconds)
        samples = sink.count - start_count
        wall, cpu = time.monotonic() - start, cpu_s() - start_cpu
        status = poller.status()
    finally:
        poller.stop(30)
    return {"samples": samples, "wall": wall, "cpu": cpu, "mode": status["multi_pid_mode"],
            "fallback": (status["multi_fallback_s"] - fallback0) / wall,
            "connects": status["connects"], "count_hint": status["count_hint"]}


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


def rate(args: argparse.Namespace) -> tuple[list[dict], dict]:
    rounds: list[dict] = []
    with ElmEmulator("car") as emu, PtyRelay(emu.pty, args.delay_ms / 1000) as relay:
        for _ in range(args.rounds):
            rounds.append(run_agent(relay.port, args.seconds))
            settle_port()
        bare = run_python_obd(relay.port, args.seconds)
    return rounds, bare


# -- CPU at the realistic mix --------------------------------------------------------------------

def cpu_agent(port: str, seconds: float) -> dict:
    sink = Counter()
    config = [{"name": f"bench.{p.lower()}", "pid": p, "period_s": MIX_PERIOD_S} for p in PIDS]
    poller = ObdPoller(port, config, sink, protocol="6", dtc_period_s=None)
    poller.start()
    try:
        wait_until(lambda: sink.count >= 2 * len(PIDS), timeout=60, what="agent: samples")
        thread = poller._thread  # noqa: SLF001 - the bench measures this thread's CPU
        assert thread is not None
        count0, cpu0, t0 = sink.count, thread_cpu_s(thread), time.monotonic()
        time.sleep(seconds)
        count1, cpu1, t1 = sink.count, thread_cpu_s(thread), time.monotonic()
        requests = poller.status()["requests"]
    finally:
        poller.stop(30)
    return {"cpu": (cpu1 - cpu0) / (t1 - t0), "rate": (count1 - count0) / (t1 - t0),
            "requests": requests}


def cpu_python_obd(port: str, seconds: float) -> dict:
    conn = obd.OBD(port, protocol="6")
    if conn.status() != obd.OBDStatus.CAR_CONNECTED:
        raise RuntimeError(f"python-obd: not connected ({conn.status()})")
    commands = [obd.commands[p] for p in PIDS]
    count = [0]
    stop = threading.Event()

    def loop() -> None:
        due = time.monotonic()
        while not stop.is_set():
            wait = due - time.monotonic()
            if wait > 0:
                stop.wait(wait)
                continue
            due += MIX_PERIOD_S
            for c in commands:
                if not conn.query(c).is_null():
                    count[0] += 1

    thread = threading.Thread(target=loop, name="bare-python-obd")
    thread.start()
    try:
        wait_until(lambda: count[0] >= 2 * len(PIDS), timeout=60, what="python-obd: samples")
        count0, cpu0, t0 = count[0], thread_cpu_s(thread), time.monotonic()
        time.sleep(seconds)
        count1, cpu1, t1 = count[0], thread_cpu_s(thread), time.monotonic()
    finally:
        stop.set()
        thread.join(30)
        conn.close()
    return {"cpu": (cpu1 - cpu0) / (t1 - t0), "rate": (count1 - count0) / (t1 - t0)}


def cpu(args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    agent_runs: list[dict] = []
    bare_runs: list[dict] = []
    with ElmEmulator("car") as emu:
        for _ in range(args.cpu_rounds):
            agent_runs.append(cpu_agent(emu.port, args.cpu_seconds))
            settle_port()
            bare_runs.append(cpu_python_obd(emu.port, args.cpu_seconds))
            settle_port()
    return agent_runs, bare_runs


# -- report ------------------------------------------------------------------------------------

def markdown(header: list[str], rows: list[tuple]) -> None:
    print("\n| " + " | ".join(header) + " |")
    print("|---|" + "---:|" * (len(header) - 1))
    for row in rows:
        print("| " + " | ".join(str(cell) for cell in row) + " |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--delay-ms", type=float, default=50.0)
    parser.add_argument("--cpu-seconds", type=float, default=20.0)
    parser.add_argument("--cpu-rounds", type=int, default=3)
    parser.add_argument("--no-rate", action="store_true")
    parser.add_argument("--no-cpu", action="store_true")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s %(levelname)s %(message)s")
    logging.getLogger("obd").setLevel(logging.ERROR)

    print(f"machine: {platform.machine()} {platform.processor() or ''} {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}, python-OBD {obd.__version__}")
    ok = True
    if not args.no_rate:
        print(f"\nrate: ELM327-emulator 'car' behind a relay adding {args.delay_ms:.0f} ms per "
              f"OBD request; {len(PIDS)} PIDs: {', '.join(PIDS)}; {args.seconds:.0f} s per run")
        rounds, bare = rate(args)
        bare_rate = bare["samples"] / bare["wall"]
        rows = []
        for i, r in enumerate(rounds, 1):
            r_rate = r["samples"] / r["wall"]
            rows.append((f"agent #{i}", r["samples"], r["wall"], r_rate,
                         r["cpu"] / max(r["samples"], 1) * 1e3,
                         f"{r['mode']}, {r['fallback']:.0%} in fall-back"))
        rows.append(("python-obd", bare["samples"], bare["wall"], bare_rate,
                     bare["cpu"] / max(bare["samples"], 1) * 1e3, "one PID per query"))
        for name, samples, wall, r_rate, cpu_ms, note in rows:
            print(f"{name:>11}: {samples:6d} samples in {wall:5.1f} s = {r_rate:7.1f} samples/s "
                  f"({cpu_ms:.2f} CPU ms per sample, this process; {note})")
        agent_rate = statistics.median(r["samples"] / r["wall"] for r in rounds)
        fallback = sum(r["fallback"] * r["wall"] for r in rounds) / sum(r["wall"] for r in rounds)
        ratio = agent_rate / max(bare_rate, 1e-9)
        met = ratio >= TARGET_RATIO
        ok = ok and met
        print(f"time in multi-PID fall-back: {fallback:.1%} of {len(rounds)} round(s); "
              f"response-count hint: {rounds[-1]['count_hint']}")
        print(f"ratio agent / python-obd: {ratio:.2f}x (target >= {TARGET_RATIO:.0f}x: "
              f"{'met' if met else 'NOT met'})")
        if args.markdown:
            markdown(["run", "samples", "wall s", "samples/s", "CPU ms per sample", "multi-PID"],
                     [(n, f"{c:,}", f"{w:.1f}", f"{r:.1f}", f"{m:.2f}", note)
                      for n, c, w, r, m, note in rows])
    if not args.no_cpu:
        print(f"\nCPU: {len(PIDS)} PIDs every {MIX_PERIOD_S:g} s against the ELM327-emulator "
              f"(no relay), {args.cpu_rounds} x {args.cpu_seconds:.0f} s alternating; "
              "CPU of the polling thread only")
        agent_runs, bare_runs = cpu(args)
        cpu_rows = []
        for name, runs in (("agent ObdPoller", agent_runs), ("bare python-OBD", bare_runs)):
            pct = statistics.median(r["cpu"] for r in runs) * 100
            per = statistics.median(r["cpu"] / max(r["rate"], 1e-9) for r in runs) * 1e6
            rates = statistics.median(r["rate"] for r in runs)
            cpu_rows.append((name, pct, per, rates))
            print(f"{name:>16}: {pct:5.2f} % of one core here (~{pct * PI_FACTOR:.1f} % of a "
                  f"Pi 4 core), {per:6.0f} µs CPU per sample, {rates:.1f} samples/s; runs: "
                  + ", ".join(f"{r['cpu'] * 100:.2f} %" for r in runs))
        a = statistics.median(r["cpu"] for r in agent_runs)
        b = statistics.median(r["cpu"] for r in bare_runs)
        print(f"agent / bare python-OBD CPU: {a / max(b, 1e-12):.2f}x")
        if args.markdown:
            markdown(["thread", "% of one core (median)", "≈ % of a Pi 4 core",
                      "µs CPU per sample", "samples/s"],
                     [(name, f"{pct:.2f}", f"{pct * PI_FACTOR:.1f}", f"{per:.0f}", f"{r:.1f}")
                      for name, pct, per, r in cpu_rows])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
