"""The ELM327-emulator on a pty, answering as the twin car (:mod:`.elm_scenario`).

:class:`TwinEmulator` is :class:`scripts.vehicle_sim.elm_emulator.ElmEmulator` (the same process, pty,
link and interpreter handling) with its scenario replaced through the emulator's own extension
points, before the port is handed out:

1. the car and the drive clock go into ``twin.json`` in the emulator's working directory
   (:func:`scripts.vehicle_sim.drive.save_spec`), with a three-line module ``vehicle_twin.py``
   that builds the ``ObdMessage`` scenario from it;
2. the interpreter's ``merge vehicle_twin`` imports it (the emulator reads the recording then:
   a second or two), ``scenario twin`` selects it;
3. ``attach(emulator)`` registers the ECU task plug-in.

Codes are set and cleared at run time through the interpreter (:meth:`set_code`, :meth:`clear`);
:meth:`describe` reports the ECU's memory (for tests and the demo's console).

    with TwinEmulator(Car(name="demo-0001"), DriveClock.starting(speed=10)) as emu:
        reader = ObdReader(emu.port)
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from scripts.vehicle_sim.elm_emulator import ElmEmulator, EmulatorError
from scripts.vehicle_sim.drive import Car, DriveClock, save_spec

ROOT = Path(__file__).resolve().parents[2]
SPEC = "twin.json"
SHIM = "vehicle_twin"

_SHIM_SOURCE = '''\
"""Written by scripts/vehicle_sim/elm_twin.py: the twin scenario for the emulator's merge command."""
import sys
sys.path.insert(0, {root!r})
from scripts.vehicle_sim.elm_scenario import load
ObdMessage = load({spec!r})
'''

_MODULE = "import scripts.vehicle_sim.elm_scenario as _twin"


class TwinEmulator(ElmEmulator):
    """An ELM327-emulator whose car is the twin: ``car`` at the moment ``clock`` says.
    ``stored`` / ``pending``: codes the car has from the start (stored once the engine runs);
    ``memory``: the ECU's memory from an earlier emulator of this car (:meth:`memory`)."""

    def __init__(self, car: Car | None = None, clock: DriveClock | None = None,
                 workdir: str | os.PathLike[str] | None = None, *,
                 link: str | os.PathLike[str] | None = None, stored: tuple[str, ...] = (),
                 pending: tuple[str, ...] = (), memory: dict[str, Any] | None = None,
                 start_timeout_s: float = 60.0):
        super().__init__("car", workdir, link=link, start_timeout_s=start_timeout_s)
        self.car = car or Car()
        self.clock = clock or DriveClock.starting()
        self._codes = {"stored": list(stored), "pending": list(pending)}
        if memory:
            self._codes["memory"] = memory

    @property
    def vin(self) -> str:
        return self.car.vin

    def _configure(self) -> None:
        workdir = self.workdir
        assert workdir is not None
        spec = save_spec(workdir / SPEC, self.car, self.clock, **self._codes)
        (workdir / f"{SHIM}.py").write_text(_SHIM_SOURCE.format(root=str(ROOT), spec=str(spec)))
        out = self.command(f"merge {SHIM}", timeout_s=self.start_timeout_s)
        if "successfully" not in out:
            raise EmulatorError(f"the emulator did not merge the twin scenario: {out.strip()}")
        out = self.command("scenario twin")
        if "'twin'" not in out:
            raise EmulatorError(f"the emulator did not switch to the twin scenario: {out.strip()}")
        self.python(f"{_MODULE}; _twin.attach(emulator)")
        self.scenario = "twin"

    def _call(self, expression: str) -> dict[str, Any]:
        out = self.python(f"{_MODULE}; _twin.TWIN.{expression}")
        lines = [ln for ln in out.splitlines() if ln.startswith("{")]
        if not lines:
            raise EmulatorError(f"no answer from the twin to {expression!r}: {out.strip()}")
        return json.loads(lines[-1])

    def set_code(self, code: str, *, pending: bool = False) -> dict[str, Any]:
        """Sets a trouble code now; returns ``{"code", "set_at", "t"}`` (drive times; ``t`` is
        when the ECU stores it: now if the engine runs, else once it has run 2 s)."""
        return self._call(f"set_code({code!r}, pending={bool(pending)!r})")

    def clear(self) -> dict[str, Any]:
        """What a mode 04 request does, from the harness side."""
        return self._call("clear()")

    def describe(self) -> dict[str, Any]:
        """The drive time, phase, loop and the ECU's memory (codes, freeze frame, monitors)."""
        return self._call("describe()")

    def memory(self) -> dict[str, Any]:
        """The ECU's memory as :class:`scripts.vehicle_sim.ecu.EcuMemory.to_dict` gives it (the
        ``memory`` argument of a later emulator for the same car)."""
        return self._call("memory()")["memory"]

    def set_clock(self, clock: DriveClock) -> dict[str, Any]:
        """Moves the car to another moment of the drive, e.g. once a test has connected (the
        drive jumps; codes set before keep their drive times)."""
        self.clock = clock
        return self._call(f"set_clock({clock.epoch!r}, {clock.speed!r}, {clock.offset!r})")

    def set_dtcs(self, stored: list[str] | tuple[str, ...] = (),
                 pending: list[str] | tuple[str, ...] = (),
                 permanent: list[str] | tuple[str, ...] = ()) -> None:
        """:meth:`ElmEmulator.set_dtcs` for the twin: sets ``stored`` and ``pending`` codes
        (permanent codes follow from stored ones with the MIL on)."""
        if permanent:
            raise ValueError("the twin derives permanent codes from stored ones")
        for code in stored:
            self.set_code(code)
        for code in pending:
            self.set_code(code, pending=True)
