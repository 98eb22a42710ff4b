"""Start-up of the real ``dongle-agent`` daemon: time to its first PUBACK, and import time per layer.

1. ``first PUBACK``: the daemon (from bench_memory.py's runtime-only venv, as deployed) started
   against a local Mosquitto (mutual TLS) with the car of bench_car.py configured (OBD on the
   ELM327-emulator, one CAN bus with the RAV4 DBC; the config already in the store, as on any
   start but the first): the time from ``exec`` to the moment the reference console receives the
   retained ``online`` status, which the broker forwards as it PUBACKs it (the agent's first
   QoS 1 publish). ``--runs`` starts (default 5; the median is reported), each a fresh process
   with warm file caches.
2. ``imports``: what each layer of imports costs in a fresh interpreter of that venv (cumulative,
   one subprocess per step, median of ``--runs``): the interpreter itself, then the layers of
   bench_memory.py.

Pi estimate: this machine's figure x ``PI_FACTOR`` (5; docs/performance.md says where the factor
comes from). Start-up also reads ~30 MB of Python and shared libraries: on a Pi's SD card a cold
start (nothing in the page cache) adds the read time, not estimated here.

    .venv/bin/python bench/bench_startup.py [--runs 5]
"""
from __future__ import annotations

import argparse
import ast
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.bench_car import DEV, car_fleet  # noqa: E402
from bench.bench_memory import DEFAULT_VENV, IMPORT_STEPS, ensure_runtime_venv  # noqa: E402
from scripts.testbed.wait import wait_until  # noqa: E402
from scripts.vehicle_sim.elm_emulator import ElmEmulator  # noqa: E402

PI_FACTOR = 5


def first_puback(py: Path, runs: int) -> list[float]:
    exe = py.parent / "dongle-agent"
    out = []
    with tempfile.TemporaryDirectory(prefix="boot-", dir="/tmp") as d, ElmEmulator("car", workdir=Path(d) / "elm") as emu:
        run = Path(d)
        broker, toml, console = car_fleet(run, emu.port, "239.80.1.1", 47001)
        env = dict(os.environ, PYTHONPATH="")
        try:
            for i in range(runs + 1):   # the first start stores the config: not counted
                n = len(console.records)
                t0 = time.monotonic()
                agent = subprocess.Popen([str(exe), "--config", str(toml)], stdout=subprocess.DEVNULL,
                                         stderr=open(run / f"agent{i}.log", "w"), env=env)

                def online() -> bool:
                    return any(r.get("topic") == "status" and r["dev"] == DEV and r["status"].get("state") == "online"
                               for r in console.records[n:])
                wait_until(online, 60, interval=0.005, what="the agent's online status")
                if i:
                    out.append(time.monotonic() - t0)
                if i == 0:   # the config arrives and is acked before the next start
                    wait_until(lambda: any(r.get("kind") == "ack" for r in console.records), 60)
                agent.terminate()
                agent.wait(30)
        finally:
            console.stop()
            broker.stop()
    return out


def import_times(py: Path, runs: int) -> list[tuple[str, float]]:
    """(layer, cumulative seconds to import it and everything before), medians of ``runs``."""
    def measure(mods: list[str]) -> float:
        code = ("import time\nt = time.perf_counter()\nimport importlib, sys\nsys.path.insert(0, %r)\n"
                "for m in %r: importlib.import_module(m)\nprint(time.perf_counter() - t)") % (str(ROOT), mods)
        times = []
        for _ in range(runs):
            r = subprocess.run([str(py), "-c", code], capture_output=True, text=True, cwd=tempfile.gettempdir())
            if r.returncode:
                raise RuntimeError(f"importing {mods} failed: {r.stderr.strip().splitlines()[-1:]}")
            times.append(ast.literal_eval(r.stdout.strip().splitlines()[-1]))
        return statistics.median(times)

    def interpreter() -> float:
        times = []
        for _ in range(runs):
            t = time.perf_counter()
            subprocess.run([str(py), "-c", "pass"], check=True, cwd=tempfile.gettempdir())
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    rows, mods = [("python interpreter start (python -c pass)", interpreter())], []
    for label, step in IMPORT_STEPS:
        mods += step
        rows.append((label, measure(mods)))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--venv", type=Path, default=DEFAULT_VENV)
    args = p.parse_args(argv)
    py = ensure_runtime_venv(args.venv)
    print(f"machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}, {time.strftime('%Y-%m-%d')}; agent venv {args.venv}")
    starts = first_puback(py, args.runs)
    med = statistics.median(starts)
    print(f"\nstart to first PUBACK (online status at the console), {len(starts)} starts: median {med:.2f} s "
          f"(runs {', '.join(f'{s:.2f}' for s in starts)}); Pi 4 estimate x{PI_FACTOR}: ~{med * PI_FACTOR:.1f} s")
    print(f"\n{'import layer (cumulative)':76s} {'s':>6s} {'adds s':>7s} {'Pi x' + str(PI_FACTOR):>7s}")
    prev = 0.0
    for label, t in import_times(py, args.runs):
        add = t - prev if prev else t
        print(f"{label:76s} {t:6.3f} {add:7.3f} {t * PI_FACTOR:7.2f}")
        prev = t if "interpreter" not in label else 0.0
    return 0


if __name__ == "__main__":
    sys.exit(main())
