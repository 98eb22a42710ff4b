"""Both sides of the demo car from one place: OBD (ELM327-emulator) and CAN, one drive clock.

:class:`VehicleTwin` writes ``twin.json`` (the car and the clock) in its run directory, starts
:class:`~scripts.vehicle_sim.elm_twin.TwinEmulator` on a pty and, when a CAN bus is given, the
CAN side (:mod:`scripts.vehicle_sim.can_twin`) as a subprocess reading the same file. Both
compute the drive time from the same numbers, so at any moment the OBD answers and the CAN
frames are of the same moment of the drive.

Restarts: on :meth:`VehicleTwin.stop` the file records where the drive should go on (the next
loop's key-on), and the next start for the same car continues from there: the odometer, the
fuel level and the coolant never jump back, and the ECU keeps its memory (trouble codes, freeze
frame, readiness since a clear), as an ECU does while the car is off; ``stored`` codes are set
on top (one stored already stays as it was). ``fresh=True`` starts the drive and the ECU over. ``lead_in_s``: the car starts
that long before that key-on, parked with the ignition off (shorter than the park), so that
whoever connects to it sees the key turned and the engine cranked.

    twin = VehicleTwin(run_dir, can={"interface": "udp_multicast", "channel": group, "port": p})
    port = twin.start()          # the ELM327's pty (or the link)
    ...
    twin.stop()

CLI: ``python -m scripts.vehicle_sim.twin --run-dir DIR [--speed N] [--dtc P0301]
[--can-interface udp_multicast --can-channel 239.74.1.2 --can-port 40000]`` prints the pty
and runs until SIGINT/SIGTERM.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from scripts.vehicle_sim.drive import Car, Drive, DriveClock, load_spec, save_spec
from scripts.vehicle_sim.elm_twin import ROOT, TwinEmulator

log = logging.getLogger(__name__)

SPEC = "twin.json"


class VehicleTwin:
    def __init__(self, run_dir: str | os.PathLike[str], car: Car | None = None, *,
                 speed: float = 1.0, offset: float | None = None,
                 can: dict[str, Any] | None = None, only: tuple[str, ...] = ("can0",),
                 stored: tuple[str, ...] = (), link: str | os.PathLike[str] | None = None,
                 fresh: bool = False, lead_in_s: float = 0.0):
        self.run_dir = Path(run_dir)
        self.car = car or Car()
        self.speed = speed
        self.offset = offset
        self.can = dict(can) if can else None
        self.only = only
        self.stored = tuple(stored)
        self.link = link
        self.fresh = fresh
        if not 0 <= lead_in_s < self.car.parked_s:
            raise ValueError(f"lead_in_s must be in [0, parked_s = {self.car.parked_s}), got {lead_in_s}")
        self.lead_in_s = float(lead_in_s)
        self.clock: DriveClock | None = None
        self.emulator: TwinEmulator | None = None
        self._can_proc: subprocess.Popen[bytes] | None = None
        self._drive: Drive | None = None
        self._memory: dict[str, Any] | None = None

    @property
    def spec_path(self) -> Path:
        return self.run_dir / SPEC

    @property
    def port(self) -> str:
        if self.emulator is None:
            raise RuntimeError("twin not started")
        return self.emulator.port

    @property
    def drive(self) -> Drive:
        """The drive model in this process (for reports and known answers)."""
        if self._drive is None:
            self._drive = Drive(self.car)
        return self._drive

    def _resume(self) -> tuple[float, dict[str, Any] | None]:
        """(drive time to go on from, the ECU's memory) from the last run of this car."""
        if self.fresh or not self.spec_path.exists():
            return self.offset or 0.0, None
        try:
            car, clock, extra = load_spec(self.spec_path)
        except (OSError, ValueError, KeyError) as e:
            log.warning("twin: %s unreadable (%s); the drive starts over", self.spec_path, e)
            return self.offset or 0.0, None
        if car.name != self.car.name:
            return self.offset or 0.0, None
        memory = extra.get("memory") if isinstance(extra.get("memory"), dict) else None
        if self.offset is not None:
            return self.offset, memory
        resume = extra.get("resume_at")
        if isinstance(resume, (int, float)):
            return float(resume), memory
        # not stopped cleanly: go on at the loop after the one it was in
        return self._next_loop(clock.now()), memory

    def _next_loop(self, t: float) -> float:
        loop_s = self.drive.loop_s
        return max(0.0, math.ceil(t / loop_s) * loop_s)

    def start(self) -> str:
        """Starts the ELM327 side (and the CAN side); returns the ELM327's port."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        resume, memory = self._resume()
        self.clock = DriveClock.starting(self.speed, resume - self.lead_in_s)
        self._memory = memory
        save_spec(self.spec_path, self.car, self.clock, **({"memory": memory} if memory else {}))
        try:
            self.emulator = TwinEmulator(self.car, self.clock, self.run_dir / "elm", link=self.link,
                                         stored=self.stored, memory=memory)
            port = self.emulator.start()
            if self.can:
                self._start_can()
        except BaseException:
            self.stop()
            raise
        log.info("twin %s (VIN %s): ELM327 on %s, drive time %.1f s, speed x%g", self.car.name,
                 self.car.vin, port, self.clock.now(), self.speed)
        return port

    def _start_can(self) -> None:
        args = [sys.executable, "-m", "scripts.vehicle_sim.can_twin", "--spec", str(self.spec_path),
                "--interface", str(self.can["interface"]), "--channel", str(self.can["channel"])]
        if self.can.get("port"):
            args += ["--port", str(self.can["port"])]
        for channel in self.only:
            args += ["--only", channel]
        with open(self.run_dir / "can_twin.log", "ab") as err:
            self._can_proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err)

    def stop(self) -> None:
        """Stops both sides and records where the drive goes on next time."""
        if self._can_proc is not None:
            self._can_proc.terminate()
            try:
                self._can_proc.wait(10)
            except subprocess.TimeoutExpired:
                self._can_proc.kill()
                self._can_proc.wait()
            self._can_proc = None
        memory = self._memory
        if self.emulator is not None:
            try:
                memory = self.emulator.memory()
            except Exception as e:  # noqa: BLE001 - an emulator that died keeps what it had
                log.warning("twin: the ECU's memory could not be read (%s); the last one is kept", e)
            self.emulator.stop()
            self.emulator = None
        if self.clock is not None:
            save_spec(self.spec_path, self.car, self.clock,
                      resume_at=self._next_loop(self.clock.now()),
                      **({"memory": memory} if memory else {}))
            self.clock = None

    def __enter__(self) -> "VehicleTwin":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def can_running(self) -> bool:
        return self._can_proc is not None and self._can_proc.poll() is None

    def now(self) -> dict[str, Any]:
        """The drive time, phase and loop now (this process's model), and ``key_on_in``: the
        drive seconds until the next key-on while parked (else 0)."""
        if self.clock is None:
            raise RuntimeError("twin not started")
        t = self.clock.now()
        state = self.drive.at(t)
        key_on_in = 0.0
        if state.phase == "parked":
            key_on_in = (-t if t < 0 else (state.loop + 1) * self.drive.loop_s - t)
        return {"t": state.t, "loop": state.loop, "phase": state.phase, "key_on_in": key_on_in}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m scripts.vehicle_sim.twin",
                                description="The demo car: ELM327 on a pty and CAN, one drive clock")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--car", default=Car.name, help="the car's name (its VIN follows from it)")
    p.add_argument("--speed", type=float, default=1.0, help="drive seconds per wall second")
    p.add_argument("--fresh", action="store_true", help="start the drive over")
    p.add_argument("--dtc", action="append", default=[], metavar="CODE",
                   help="a stored trouble code (repeatable); stored once the engine runs")
    p.add_argument("--link", help="keep this symlink pointing at the pty")
    p.add_argument("--can-interface")
    p.add_argument("--can-channel")
    p.add_argument("--can-port", type=int)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    can = None
    if args.can_interface:
        can = {"interface": args.can_interface, "channel": args.can_channel, "port": args.can_port}
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    twin = VehicleTwin(args.run_dir, Car(name=args.car), speed=args.speed, can=can,
                       stored=tuple(args.dtc), link=args.link, fresh=args.fresh)
    try:
        print(twin.start(), flush=True)
        print(json.dumps({"vin": twin.car.vin, **twin.now()}), flush=True)
        while not stop.wait(0.5):
            if twin.emulator is None or not twin.emulator.running:
                log.error("the emulator exited on its own")
                return 1
            if can and not twin.can_running:
                log.error("the CAN side exited on its own (see %s)", twin.run_dir / "can_twin.log")
                return 1
    finally:
        twin.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
