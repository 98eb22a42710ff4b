"""The demo: a simulated car, a local broker, the agent and a console showing what the cloud gets.

    ./scripts/demo.sh [--dtc P0301] [--seconds N]   (sets everything up, then runs this)

Starts, in order: a development CA and cloud keys (first run only), a real Mosquitto with TLS and
per-device ACLs on a free loopback port, the update repository (TUF, over HTTPS), the car, the
real ``dongle-agent`` daemon for device ``demo-0001`` (provisioned like a real dongle, with the
repository's root pinned), and the reference cloud console in the foreground. Ctrl-C stops
everything it started. State is kept in ``run/demo`` so a second run continues the device's
``seq`` (and the car its odometer).

The car is the vehicle twin (scripts/vehicle_sim/twin.py): one RAV4 whose OBD answers (the
ELM327-emulator on a pseudo-terminal) and CAN frames (python-can's udp_multicast bus) come from
the same real drive on one drive clock. A loop of that drive is key on, crank, warm idle, the
recorded minute, stop, idle, then 150 s parked with the ignition off (the ECU and the bus
silent), so the agent sees an engine start and a trip every 4 minutes 11 s. ``--dtc CODE`` gives
the car a trouble code, stored as an ECU stores it once the engine runs, with its freeze frame.
Without the RAV4 recording (../shared/data) the car is the emulator's stock ``car`` scenario
and there is no CAN bus.

The agent runs the way systemd runs it on a device (scripts/testbed/updates.py): from the
``current`` slot of ``run/demo/opt`` (laid out from this checkout at the first run), restarted
when it exits 75 and rolled back when a new version crash-loops. In another terminal:

    python scripts/refcloud/console.py release 0.2.0            # → update events …, good
    python scripts/refcloud/console.py release 0.2.1 --broken   # → rolled_back, 0.2.0 runs on
"""
from __future__ import annotations

import argparse
import grp
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from scripts.testbed import updates as demo_update, devenv
from scripts.refcloud.console import CloudConsole

ROOT = Path(__file__).resolve().parent.parent
DEVICE = "demo-0001"
EV_PROFILE = "hyundai_egmp"
DBC = ROOT / "config" / "dbc" / "toyota_new_mc_pt_generated.dbc"
RECORDING = "comma2k19_rav4/comma2k19_rav4_seg40_candump.log.gz"

# What the demo's cloud asks the dongle to collect: OBD PIDs (engine, speed, the ECU's supply
# voltage for the 12 V battery rule, air flow for trip fuel, fuel level), real CAN signals of the
# RAV4 and raw capture of its wheel-speed frames; trouble codes every 15 s. Sent as a signed config.
DEMO_CONFIG = {
    "version": 1,
    "upload": {"interval_s": 5},
    "obd": {"pids": [{"name": "engine.rpm", "pid": "RPM", "period_s": 1},
                     {"name": "vehicle.speed", "pid": "SPEED", "period_s": 1},
                     {"name": "engine.coolant_temp", "pid": "COOLANT_TEMP", "period_s": 1},
                     {"name": "engine.load", "pid": "ENGINE_LOAD", "period_s": 1},
                     {"name": "engine.maf", "pid": "MAF", "period_s": 1},
                     {"name": "ecu.voltage", "pid": "CONTROL_MODULE_VOLTAGE", "period_s": 1},
                     {"name": "fuel.level", "pid": "FUEL_LEVEL", "period_s": 10}],
            "dtc_period_s": 15},
    "can": {"signals": [
        {"name": "can.wheel_speed_fl", "message": "WHEEL_SPEEDS", "signal": "WHEEL_SPEED_FL", "period_s": 1},
        {"name": "can.wheel_speed_rr", "message": "WHEEL_SPEEDS", "signal": "WHEEL_SPEED_RR", "period_s": 1},
        {"name": "can.steer_angle", "message": "STEER_ANGLE_SENSOR", "signal": "STEER_ANGLE", "period_s": 1},
        {"name": "can.gas_pedal", "message": "GAS_PEDAL", "signal": "GAS_PEDAL", "period_s": 1}],
        "raw": {"enabled": True, "ids": [0xAA]}},
}


def _find_recording() -> Path | None:
    from scripts.testbed.shared_data import SHARED_DATA
    return SHARED_DATA / RECORDING if (SHARED_DATA / RECORDING).exists() else None


def _installed(run_dir: Path) -> bool:
    """Whether the demo's agent is laid out as a slot already (by an earlier run)."""
    return (demo_update.install_root(run_dir) / "current").exists()


def _start_car(run_dir: Path, dtcs: list[str], started: list) -> tuple[str, str]:
    """Starts the car; returns its ELM327 port and the ``[[can.buses]]`` part of agent.toml."""
    recording = _find_recording()
    if recording is None:
        from scripts.vehicle_sim.elm_emulator import ElmEmulator
        print("demo: the RAV4 recording (../shared/data) is not here: the car is the "
              "ELM327-emulator's stock 'car' scenario (its values cycle), without a CAN bus")
        emulator = ElmEmulator(scenario="car", workdir=run_dir / "elm")
        port = emulator.start()
        started.append(("ELM327 emulator", emulator.stop))
        if dtcs:
            emulator.set_dtcs(stored=dtcs)
        return port, ""
    from scripts.vehicle_sim.drive import Car
    from scripts.vehicle_sim.twin import VehicleTwin
    group = f"239.74.{random.randrange(1, 250)}.{random.randrange(1, 250)}"
    mport = random.randrange(20000, 60000)
    twin = VehicleTwin(run_dir, Car(name=DEVICE), stored=tuple(dtcs), lead_in_s=LEAD_IN_S,
                       can={"interface": "udp_multicast", "channel": group, "port": mport})
    port = twin.start()
    started.append(("the car", twin.stop))
    now, loop_s = twin.now(), twin.drive.loop_s
    odometer = twin.drive.at(now["t"]).odometer_km
    when = (f"parked, key on in {now['key_on_in']:.0f} s" if now["phase"] == "parked"
            else f"at {now['phase'].replace('_', ' ')}")
    print(f"demo: the car: a {MODEL}, VIN {twin.car.vin}, odometer {odometer:,.1f} km, {when}; it "
          f"drives the real recorded RAV4 minute ({recording.name}) and parks, every "
          f"{loop_s // 60:.0f} min {loop_s % 60:.0f} s")
    print(f"demo: the car's OBD port: ELM327-emulator on {port}; its CAN bus can0: udp_multicast "
          f"{group}:{mport}; the same drive on both (scripts/vehicle_sim)")
    ecu = twin.emulator.describe()["ecu"]
    codes = [c["code"] for c in ecu["scheduled"] if not c["pending"]]
    if codes:
        print(f"demo: the car's ECU has trouble code{'s' if len(codes) > 1 else ''} {', '.join(codes)}, "
              f"stored once the engine runs (with a freeze frame of that moment) and kept until "
              f"cleared: `{cli(run_dir)} dtc`, `... dtc clear`")
    else:
        print("demo: the car has no trouble codes (--dtc P0301 gives it one)")
    can_toml = (f'[[can.buses]]\nname = "can0"\ninterface = "udp_multicast"\n'
                f'channel = "{group}"\nport = {mport}\ndbc = "{DBC}"\n')
    return port, can_toml


MODEL = "2017 Toyota RAV4"


def cli(run_dir: Path) -> str:
    """The technician CLI's command line for the demo's device (as a person types it here)."""
    toml = (run_dir / "devices" / DEVICE / "agent.toml").resolve()
    try:
        toml = toml.relative_to(Path.cwd())
    except ValueError:
        pass
    return f".venv/bin/dongle --config {toml}"
LEAD_IN_S = 20.0   # the car stands parked this long first: the agent sees the key turned


def _active_version(toml: Path) -> int:
    """The device's active config version (a second demo run must send a newer one)."""
    import sqlite3
    db = toml.parent / "data" / "agent.db"
    if not db.exists():
        return 0
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        row = con.execute("SELECT value FROM meta WHERE key='active_config'").fetchone()
        return int(json.loads(row[0])) if row else 0
    except sqlite3.Error:
        return 0
    finally:
        con.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", default=str(ROOT / "run" / "demo"))
    parser.add_argument("--seconds", type=float, default=0, help="stop after this long (0 = until Ctrl-C)")
    parser.add_argument("--dtc", action="append", default=[], metavar="CODE",
                        help="the car's ECU stores this trouble code once the engine runs, with a freeze "
                             "frame, e.g. P0301 (repeatable); kept across runs until cleared")
    parser.add_argument("--ev", choices=("can", "elm327"),
                        help="the car is also an EV (a simulated Hyundai E-GMP battery, UDS over ISO-TP), "
                             "read over a CAN bus or through a second ELM327")
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir)

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())

    started: list = []  # (name, stop callable), stopped in reverse order
    try:
        first_run = not (run_dir / "cloud" / "cloud_sign.key").exists()
        ca = devenv.make_cloud(run_dir)
        if first_run:
            print(f"demo: first run: a development CA and the cloud's keys created in {run_dir}")
        broker = devenv.start_broker(run_dir, ca)
        started.append(("broker", broker.stop))
        print(f"demo: broker on {broker.host}:{broker.port} (TLS, client certificates, per-device ACL)")

        tuf = demo_update.serve(run_dir, ca)
        started.append(("update repository", lambda: (tuf.stop(), (run_dir / "tuf.json").unlink(missing_ok=True))))
        print(f"demo: update repository (TUF) on {tuf.url}")
        installed = _installed(run_dir)
        layout = demo_update.factory_install(run_dir)
        if not installed:
            print(f"demo: agent {layout.current_version()} installed as a slot in {layout.root}")

        port, can_toml = _start_car(run_dir, args.dtc, started)

        ev_toml = ""
        if args.ev:
            egroup = f"239.76.{random.randrange(1, 250)}.{random.randrange(1, 250)}"
            eport = random.randrange(20000, 60000)
            ev_sim = subprocess.Popen(
                [sys.executable, "-m", "scripts.vehicle_sim.ev_ecu_sim", "--profile", EV_PROFILE, "--interface",
                 "udp_multicast", "--channel", egroup, "--port", str(eport), "--elm"],
                cwd=ROOT, stdout=subprocess.PIPE, stderr=open(run_dir / "ev_sim.log", "a"), text=True)
            started.append(("EV simulator", lambda: (ev_sim.terminate(), ev_sim.wait(10))))
            ev_pty = ev_sim.stdout.readline().strip()
            if args.ev == "can":
                ev_toml = (f'[[can.buses]]\nname = "ev"\ninterface = "udp_multicast"\n'
                           f'channel = "{egroup}"\nport = {eport}\n\n[ev]\ntransport = "can"\nbus = "ev"\n')
            else:
                ev_toml = f'[ev]\ntransport = "elm327"\nport = "{ev_pty}"\n'
            print(f"demo: simulated EV battery ({EV_PROFILE}) read over {args.ev}")

        # The demo has no button: whoever runs it holds the technician credential (their own
        # group), so `dongle dtc clear` works as at a workshop (docs/technician.md §4).
        control = {"socket": "agent.sock", "technician_group": grp.getgrgid(os.getgid()).gr_name}
        toml = devenv.make_device(run_dir, ca, DEVICE, broker_port=broker.port, obd_port=port, control=control,
                                  extra_toml=can_toml + ev_toml,
                                  tuf_root=demo_update.repository(run_dir).root_path,
                                  update=demo_update.update_settings(layout.root))
        problem = demo_update.settings_problem(layout, toml)
        if problem:
            # The installed slot predates a change of the local settings in this checkout.
            print(f"demo: the installed agent {layout.current_version()} cannot read agent.toml "
                  f"({problem}); re-installing this checkout")
            layout = demo_update.factory_install(run_dir, fresh=True)
            print(f"demo: agent {layout.current_version()} installed as a slot in {layout.root}")
        console = CloudConsole(run_dir, on_line=lambda line: print(line, flush=True), name="demo",
                               dbc_paths=[DBC] if can_toml else ())
        console.start()
        started.append(("console", console.stop))

        # Beside agent.toml, where `dongle logs --config …/agent.toml` looks for it (no journal here).
        log_path = toml.parent / "agent.log"
        agent = demo_update.AgentService(layout.root, toml, log_path, restart_s=1.0).start()
        started.append(("agent", agent.stop))
        print(f"demo: dongle-agent for {DEVICE} started from {layout.current} (log: {log_path})")
        print("demo: what the cloud receives, verified and decrypted (Ctrl-C to stop):", flush=True)
        if console.connected.wait(15):
            config = dict(DEMO_CONFIG, version=max(DEMO_CONFIG["version"], _active_version(toml) + 1))
            if args.ev:
                config["ev"] = {"profile": EV_PROFILE, "period_s": 5}
            seq, _ = console.publish(DEVICE, "config", config)
            print(f"demo: cloud published config v{config['version']} (seq {seq}): OBD PIDs, CAN signals, raw 0xAA",
                  flush=True)

        deadline = time.monotonic() + args.seconds if args.seconds else None
        while not stop.wait(0.5):
            if agent.stopped.is_set():
                last = agent.runs[-1] if agent.runs else None
                print(f"demo: the agent stopped ({last}); see {log_path}")
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
