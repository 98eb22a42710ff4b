"""The demo: a simulated car, a local broker, the agent and a console showing what the cloud gets.

    ./scripts/demo.sh            (sets everything up, then runs this)

Starts, in order: a development CA and cloud keys (first run only), a real Mosquitto with TLS and
per-device ACLs on a free loopback port, the ELM327-emulator on a pseudo-terminal (scenario
``car``), the real ``dongle-agent`` daemon for device ``demo-0001`` (provisioned like a real
dongle), and the reference cloud console in the foreground. Ctrl-C stops everything it started.
State is kept in ``run/demo`` so a second run continues the device's ``seq``.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from scripts import devenv
from scripts.cloud_console import CloudConsole, format_record
from scripts.elm_emulator import ElmEmulator

ROOT = Path(__file__).resolve().parent.parent
DEVICE = "demo-0001"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", default=str(ROOT / "run" / "demo"))
    parser.add_argument("--seconds", type=float, default=0, help="stop after this long (0 = until Ctrl-C)")
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir)

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())

    started: list = []  # (name, stop callable), stopped in reverse order
    try:
        ca = devenv.make_cloud(run_dir)
        broker = devenv.start_broker(run_dir, ca)
        started.append(("broker", broker.stop))
        print(f"demo: broker on {broker.host}:{broker.port} (TLS, client certificates, per-device ACL)")

        emulator = ElmEmulator(scenario="car", workdir=run_dir / "elm")
        port = emulator.start()
        started.append(("ELM327 emulator", emulator.stop))
        print(f"demo: ELM327-emulator (scenario car) on {port}")

        toml = devenv.make_device(run_dir, ca, DEVICE, broker_port=broker.port, obd_port=port)
        console = CloudConsole(run_dir, on_record=lambda r: print(format_record(r), flush=True))
        console.start()
        started.append(("console", console.stop))

        log_path = run_dir / "agent.log"
        agent_cmd = [str(Path(sys.executable).parent / "dongle-agent"), "--config", str(toml)]
        log_file = open(log_path, "a")
        agent = subprocess.Popen(agent_cmd, stdout=log_file, stderr=subprocess.STDOUT)

        def stop_agent() -> None:
            agent.send_signal(signal.SIGTERM)
            try:
                agent.wait(20)
            except subprocess.TimeoutExpired:
                agent.kill()
            log_file.close()

        started.append(("agent", stop_agent))
        print(f"demo: dongle-agent for {DEVICE} started (log: {log_path})")
        print("demo: what the cloud receives, verified and decrypted (Ctrl-C to stop):", flush=True)

        deadline = time.monotonic() + args.seconds if args.seconds else None
        while not stop.wait(0.5):
            if agent.poll() is not None:
                print(f"demo: the agent exited with status {agent.returncode}; see {log_path}")
                return 1
            if deadline and time.monotonic() > deadline:
                break
        return 0
    finally:
        for name, fn in reversed(started):
            try:
                fn()
            except Exception as e:  # keep stopping the rest
                print(f"demo: stopping {name} failed: {e}", file=sys.stderr)
        print("demo: stopped")


if __name__ == "__main__":
    sys.exit(main())
