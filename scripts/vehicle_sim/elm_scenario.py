"""The twin inside the ELM327-emulator: a scenario whose answers are computed from the drive.

Runs in the emulator's own process (ELM327-emulator is CC BY-NC-SA: a test/demo peer only;
nothing under agent/ or drivers/ imports this). It uses the emulator's extension points:

- **scenario** ``twin``: an ``ObdMessage`` dictionary brought in with the emulator's ``merge``
  command and selected with ``scenario twin`` (:func:`load`, called by the small module
  :mod:`scripts.vehicle_sim.elm_twin` writes into the emulator's working directory). Every entry
  answers through a ``ResponseFooter`` function, which the emulator calls per request with the
  request text; the function reads the drive model at the current drive time
  (:class:`~scripts.vehicle_sim.drive.DriveClock`) and returns the emulator's answer markup
  (``<header>7E8</header><size>..</size><data>41 0C ..</data>``, framed into ISO-TP by the
  emulator's own ``iso_tp_frames``).
- **ECU task plug-in** ``task_ecu_7XX`` (:class:`Task`, registered in ``emulator.plugins``): the
  emulator runs it before its dictionary for every request to an engine-range ECU. It makes the
  ECU go silent while the car is parked with the ignition off (``NO DATA``, or ``UNABLE TO
  CONNECT`` while the adapter searches for the protocol after ``AT SP 0``, as an ELM327 does:
  python-OBD counts a connect whose first ``01 00`` gets ``NO DATA`` as a car connected), and
  strips the ELM327 response-count hint from multi-PID requests (``010C0D052``) so that the
  emulator's own multi-PID answer serves them.

Served: mode 01 (:data:`MODE01`, supported-PID bitmaps 00-A0 computed from that table, up to six
PIDs per request as the agent sends them), mode 02 frame 00 (freeze frame, with or without the
frame number), modes 03/07/0A (with the CAN count byte), mode 04 (clears,
:class:`~scripts.vehicle_sim.ecu.EcuMemory`), mode 09 PID 02 (the car's VIN) and ``AT RV``.
Entries of the emulator's ``default`` scenario for other OBD PIDs are overridden with
``NO DATA``, so the car claims and answers only what it models.

Control from the harness (one interpreter line each, output is one JSON line):
``TWIN.set_code("P0301")``, ``TWIN.clear()``, ``TWIN.describe()``, ``TWIN.memory()``,
``TWIN.set_clock(epoch, speed, offset)``.
"""
from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from elm.elm import EcuTasks, Tasks
from elm.obd_message import ELM_FOOTER, ObdMessage as STOCK, ST, iso_tp_frames

from scripts.vehicle_sim.drive import Drive, DriveClock, State, load_spec
from scripts.vehicle_sim.ecu import EcuMemory, code_bytes

log = logging.getLogger(__name__)

SCENARIO = "twin"
ECU_RESPONSE = "7E8"
PLUGIN = "task_ecu_7XX"      # X is the emulator's wildcard: every 11-bit 7xx ECU address
PRIORITY = 2                 # ahead of the emulator's 'default' entries (10)

#: the twin of this process (set by :func:`load`)
TWIN: "ElmTwin | None" = None


def _clamp(x: float, lo: int, hi: int) -> int:
    return int(min(max(round(x), lo), hi))


def _u8(x: float) -> bytes:
    return bytes([_clamp(x, 0, 0xFF)])


def _u16(x: float) -> bytes:
    return _clamp(x, 0, 0xFFFF).to_bytes(2, "big")


def _u32(x: float) -> bytes:
    return _clamp(x, 0, 0xFFFFFFFF).to_bytes(4, "big")


def _pct(x: float) -> bytes:
    return _u8(x * 255.0 / 100.0)


def _temp(c: float) -> bytes:
    return _u8(c + 40.0)


def _trim(pct: float) -> bytes:
    return _u8(pct * 128.0 / 100.0 + 128.0)


Encoder = Callable[["ElmTwin", State, float], bytes]

#: mode 01 PID -> (python-OBD name, encoder(twin, state, drive time) -> data bytes), SAE J1979
MODE01: dict[int, tuple[str, Encoder]] = {
    0x01: ("STATUS", lambda tw, s, t: tw.ecu.status_bytes(t)),
    0x03: ("FUEL_STATUS", lambda tw, s, t: bytes((s.fuel_system, 0))),
    0x04: ("ENGINE_LOAD", lambda tw, s, t: _pct(s.load_pct)),
    0x05: ("COOLANT_TEMP", lambda tw, s, t: _temp(s.coolant_c)),
    0x06: ("SHORT_FUEL_TRIM_1", lambda tw, s, t: _trim(s.stft_pct)),
    0x07: ("LONG_FUEL_TRIM_1", lambda tw, s, t: _trim(s.ltft_pct)),
    0x0B: ("INTAKE_PRESSURE", lambda tw, s, t: _u8(s.map_kpa)),
    0x0C: ("RPM", lambda tw, s, t: _u16(s.rpm * 4.0)),
    0x0D: ("SPEED", lambda tw, s, t: _u8(s.speed_kmh)),
    0x0E: ("TIMING_ADVANCE", lambda tw, s, t: _u8((s.timing_advance_deg + 64.0) * 2.0)),
    0x0F: ("INTAKE_TEMP", lambda tw, s, t: _temp(s.intake_c)),
    0x10: ("MAF", lambda tw, s, t: _u16(s.maf_gs * 100.0)),
    0x11: ("THROTTLE_POS", lambda tw, s, t: _pct(s.throttle_pct)),
    0x1C: ("OBD_COMPLIANCE", lambda tw, s, t: b"\x01"),        # OBD-II as defined by CARB
    0x1F: ("RUN_TIME", lambda tw, s, t: _u16(s.run_time_s)),
    0x21: ("DISTANCE_W_MIL", lambda tw, s, t: _u16(tw.with_mil(t)[0])),
    0x2F: ("FUEL_LEVEL", lambda tw, s, t: _pct(s.fuel_pct)),
    0x30: ("WARMUPS_SINCE_DTC_CLEAR", lambda tw, s, t: _u8(tw.ecu.since_clear(t).warmups)),
    0x31: ("DISTANCE_SINCE_DTC_CLEAR", lambda tw, s, t: _u16(tw.ecu.since_clear(t).km)),
    0x33: ("BAROMETRIC_PRESSURE", lambda tw, s, t: _u8(s.baro_kpa)),
    0x42: ("CONTROL_MODULE_VOLTAGE", lambda tw, s, t: _u16(s.voltage * 1000.0)),
    0x46: ("AMBIANT_AIR_TEMP", lambda tw, s, t: _temp(s.ambient_c)),
    0x4D: ("RUN_TIME_MIL", lambda tw, s, t: _u16(tw.with_mil(t)[1])),
    0x4E: ("TIME_SINCE_DTC_CLEARED", lambda tw, s, t: _u16(tw.ecu.since_clear(t).minutes)),
    0x51: ("FUEL_TYPE", lambda tw, s, t: b"\x01"),             # gasoline
    0x5E: ("FUEL_RATE", lambda tw, s, t: _u16(s.fuel_rate_lh * 20.0)),
    0xA6: ("ODOMETER", lambda tw, s, t: _u32(s.odometer_km * 10.0)),
}
BITMAP_PIDS = (0x00, 0x20, 0x40, 0x60, 0x80, 0xA0)

#: mode 02 (freeze frame) PIDs besides 02 (the code that stored it): the values at capture
MODE02 = (0x03, 0x04, 0x05, 0x06, 0x07, 0x0B, 0x0C, 0x0D, 0x0E, 0x0F, 0x10, 0x11, 0x1F)

DTC_MODES = {"03": ("43", "stored"), "07": ("47", "pending"), "0A": ("4A", "permanent")}


def bitmap(pids: set[int], base: int, more: bool) -> bytes:
    """The 4-byte supported-PID bitmap of ``base+1 .. base+0x20`` (bit 0x20: the next bitmap)."""
    value = 0
    for pid in pids:
        if base < pid <= base + 0x20:
            value |= 1 << (0x20 - (pid - base))
    if more:
        value |= 1
    return value.to_bytes(4, "big")


def _frames(data: bytes) -> str:
    return iso_tp_frames([f"{b:02X}" for b in data], ECU_RESPONSE)


class ElmTwin:
    """The car as this emulator process serves it."""

    def __init__(self, drive: Drive, clock: DriveClock, ecu: EcuMemory | None = None):
        self.drive = drive
        self.clock = clock
        self.ecu = ecu or EcuMemory(drive)
        self.vin = drive.car.vin
        self._pinned: float | None = None
        self.searching = True   # the adapter's protocol is "automatic" and not yet found

    def now(self) -> float:
        pinned = self._pinned
        return pinned if pinned is not None else self.clock.now()

    @contextmanager
    def pinned(self) -> Iterator[float]:
        """One drive time for every PID of a multi-PID request: an ECU answers from one
        moment, never half before and half after the ignition went off."""
        if self._pinned is not None:   # nested: the emulator asks itself for each PID
            yield self._pinned
            return
        self._pinned = t = self.clock.now()
        try:
            yield t
        finally:
            self._pinned = None

    def adapter_command(self, cmd: str) -> None:
        """Follows the ELM327's protocol state: ``AT Z``/``AT D``/``AT SP 0`` (automatic) make
        the next request search for the protocol; ``AT SP n``/``AT TP n`` fix it."""
        if _RESET.match(cmd):
            self.searching = True
        elif m := _SET_PROTOCOL.match(cmd):
            self.searching = bool(m.group(1)) or m.group(2) == "0"

    def no_answer(self) -> str:
        """What the adapter prints when the ECU does not answer: while it searches for the
        protocol (the first request after ``AT SP 0``) an ELM327 gives up with ``UNABLE TO
        CONNECT``, once the protocol is known with ``NO DATA``."""
        if self.searching:
            return "<string>SEARCHING...</string>" + ST("") + ST("UNABLE TO CONNECT")
        return ST("NO DATA")

    def ignition(self, t: float | None = None) -> bool:
        return self.drive.at(self.now() if t is None else t).ignition

    def with_mil(self, t: float) -> tuple[float, float]:
        """(km, minutes) driven since the MIL came on; (0, 0) while it is off."""
        since = self.ecu.mil_on_since(t)
        if since is None:
            return 0.0, 0.0
        a, b = self.drive.at(since), self.drive.at(t)
        return b.distance_km - a.distance_km, (b.engine_s - a.engine_s) / 60.0

    # -- answers (the emulator calls these from ResponseFooter) -------------------------------

    def mode01(self, pid: int) -> str:
        t = self.now()
        state = self.drive.at(t)
        if pid in BITMAP_PIDS:
            supported = set(MODE01)
            data = bitmap(supported, pid, any(p > pid + 0x20 for p in supported))
        else:
            data = MODE01[pid][1](self, state, t)
        return _frames(bytes((0x41, pid)) + data)

    def mode02(self, pid: int, cmd: str) -> str:
        frame = cmd[4:6] == "00"
        head = bytes((0x42, pid)) + (b"\x00" if frame else b"")
        t = self.now()
        ff = self.ecu.freeze_frame(t)
        if pid == 0x00:
            pids = {0x02, *MODE02} if ff is not None else {0x02}
            return _frames(head + bitmap(pids, 0x00, False))
        if pid == 0x02:
            return _frames(head + (code_bytes(ff[0]) if ff is not None else b"\x00\x00"))
        if ff is None:
            return ST("NO DATA")
        code, state = ff
        return _frames(head + MODE01[pid][1](self, state, state.t))

    def dtcs(self, mode: str) -> str:
        sid, which = DTC_MODES[mode]
        t = self.now()
        codes = getattr(self.ecu, which)(t)
        data = bytes((int(sid, 16), min(len(codes), 0xFF))) + b"".join(code_bytes(c) for c in codes)
        return _frames(data)

    def clear_answer(self) -> str:
        t = self.now()
        self.ecu.clear(t)
        log.info("twin: mode 04 at drive time %.1f s: codes, freeze frame and readiness cleared", t)
        return _frames(b"\x44")

    def vin_answer(self) -> str:
        return _frames(b"\x49\x02\x01" + self.vin.encode("ascii"))

    def mode09_bitmap(self) -> str:
        return _frames(b"\x49\x00" + bitmap({0x02}, 0x00, False))

    def adapter_voltage(self) -> str:
        return ST(f"{self.drive.at(self.now()).adapter_v:.1f}V")

    # -- control (the harness calls these through the emulator's interpreter) ------------------

    def set_code(self, code: str, pending: bool = False) -> None:
        now = self.now()
        t = self.ecu.set_code(code, now, pending=pending)
        log.info("twin: %s %s at drive time %.1f s (stored from %.1f s)",
                 "pending" if pending else "stored", code, now, t)
        print(json.dumps({"code": code.upper(), "pending": pending, "set_at": now, "t": t}))

    def clear(self) -> None:
        self.ecu.clear(self.now())
        print(json.dumps({"cleared_at": self.ecu.describe(self.now())["cleared_at"]}))

    def set_clock(self, epoch: float, speed: float, offset: float) -> None:
        """Moves the car to another moment of the drive (tests position it after connecting)."""
        self.clock = DriveClock(float(epoch), float(speed), float(offset))
        print(json.dumps({"t": self.now(), "speed": self.clock.speed}))

    def describe(self) -> None:
        t = self.now()
        state = self.drive.at(t)
        print(json.dumps({"t": t, "phase": state.phase, "loop": state.loop, "vin": self.vin,
                          "ecu": self.ecu.describe(t)}))

    def memory(self) -> None:
        """The ECU's memory (:meth:`EcuMemory.to_dict`), to keep across a restart."""
        print(json.dumps({"t": self.now(), "memory": self.ecu.to_dict()}))


# -- the ObdMessage scenario ----------------------------------------------------------------------

def _entry(request: str, descr: str, footer: Callable[..., str]) -> dict[str, Any]:
    return {"Request": request, "Descr": descr, "Priority": PRIORITY,
            "ResponseFooter": footer}


def scenario() -> dict[str, dict[str, Any]]:
    """The ``twin`` scenario: one entry per answer, each computed from :data:`TWIN`."""
    entries: dict[str, dict[str, Any]] = {}
    for i, base in enumerate(BITMAP_PIDS):
        entries[f"PIDS_{'ABCDEF'[i]}"] = _entry(
            f"^01{base:02X}" + ELM_FOOTER, f"Supported PIDs [{base + 1:02X}-{base + 0x20:02X}]",
            lambda self, cmd, pid, uc, b=base: TWIN.mode01(b))
    for pid, (name, _) in MODE01.items():
        entries[name] = _entry(f"^01{pid:02X}" + ELM_FOOTER, f"{name} (twin)",
                               lambda self, cmd, pid_, uc, p=pid: TWIN.mode01(p))
    for pid in (0x00, 0x02, *MODE02):
        name = "DTC_PIDS_A" if pid == 0 else "DTC_FREEZE_DTC" if pid == 2 else f"DTC_{MODE01[pid][0]}"
        entries[name] = _entry(f"^02{pid:02X}(00)?" + ELM_FOOTER, f"freeze frame PID {pid:02X}",
                               lambda self, cmd, pid_, uc, p=pid: TWIN.mode02(p, cmd))
    for mode, (_, which) in DTC_MODES.items():
        entries[f"DTC_MODE_{mode}"] = _entry(f"^{mode}" + ELM_FOOTER, f"{which} trouble codes",
                                             lambda self, cmd, pid, uc, m=mode: TWIN.dtcs(m))
    entries["CLEAR_DIAG_TC"] = _entry("^04" + ELM_FOOTER, "clear trouble codes (mode 04)",
                                      lambda self, cmd, pid, uc: TWIN.clear_answer())
    entries["PIDS_9A"] = _entry("^0900" + ELM_FOOTER, "Supported PIDs, mode 09",
                                lambda self, cmd, pid, uc: TWIN.mode09_bitmap())
    entries["VIN"] = _entry("^0902" + ELM_FOOTER, "Vehicle Identification Number",
                            lambda self, cmd, pid, uc: TWIN.vin_answer())
    entries["AT_R_VOLT"] = _entry("^ATRV$", "AT read volt (the car's battery, pin 16)",
                                  lambda self, cmd, pid, uc: TWIN.adapter_voltage())
    # the stock answers for OBD PIDs the twin does not model: an ECU without them stays silent
    obd_request = re.compile(r"^\^0[1-9A]")
    for key, value in STOCK["default"].items():
        request = value.get("Request") or ""
        if key not in entries and obd_request.match(request):
            entries[key] = {"Request": request, "Descr": f"{key}: not on this car",
                            "Response": ST("NO DATA")}
    return entries


def load(spec_path: str | Path) -> dict[str, dict[str, dict[str, Any]]]:
    """Builds this process's twin from the spec file (:func:`~scripts.vehicle_sim.drive.save_spec`)
    and returns the ``ObdMessage`` dictionary the emulator's ``merge`` command takes."""
    global TWIN
    car, clock, extra = load_spec(spec_path)
    drive = Drive(car)
    TWIN = ElmTwin(drive, clock, EcuMemory.from_dict(drive, extra.get("memory")))
    for code in extra.get("stored", []):
        TWIN.ecu.set_code(code, clock.now())
    for code in extra.get("pending", []):
        TWIN.ecu.set_code(code, clock.now(), pending=True)
    log.info("twin %s (VIN %s) at drive time %.1f s, speed x%g", car.name, TWIN.vin,
             clock.now(), clock.speed)
    return {SCENARIO: scenario()}


def attach(emulator: Any) -> None:
    """Registers :class:`Task` as the emulator's ECU task for the engine ECU range, replacing
    ECU tasks made before (their requests went to another scenario), and pins one drive time
    for each multi-PID request (the emulator answers one by asking itself for each PID)."""
    emulator.plugins[PLUGIN] = sys.modules[__name__]
    emulator.task_shared_ns.clear()
    inner = emulator.multi_pid_answer

    def multi_pid_answer(cmd: str, header: str | None) -> str | None:
        if TWIN is None:
            return inner(cmd, header)
        with TWIN.pinned():
            return inner(cmd, header)

    emulator.multi_pid_answer = multi_pid_answer


_HEX = re.compile(r"^[0-9A-F]+$")
_RESET = re.compile(r"^AT(Z|D|WS)$")
_SET_PROTOCOL = re.compile(r"^AT[ST]P(A?)([0-9A-C])$")
_COUNT_HINT = re.compile(r"^(01(?:[0-9A-F]{2}){2,6})[1-9A-F]$")


class Task(EcuTasks):
    """ECU task: runs before the dictionary for every request to the ECU (the emulator keeps one
    instance per ECU address as that ECU's shared namespace)."""

    def run(self, cmd: str, length: int | None = None, frame: int | None = None):
        twin = TWIN
        if twin is None:
            return Tasks.RETURN.TASK_CONTINUE(cmd)
        if not _HEX.match(cmd or ""):
            twin.adapter_command(cmd or "")
            return Tasks.RETURN.TASK_CONTINUE(cmd)      # AT commands are the adapter's
        if not twin.ignition():
            return Tasks.RETURN.ANSWER(twin.no_answer())  # ignition off: the ECU sleeps
        twin.searching = False                          # an ECU answers: protocol found
        hint = _COUNT_HINT.match(cmd)
        if hint:
            return Tasks.RETURN.TASK_CONTINUE(hint.group(1))
        return Tasks.RETURN.TASK_CONTINUE(cmd)

    def stop(self, cmd: str | None, length: int | None = None, frame: int | None = None):
        return Tasks.RETURN.TASK_CONTINUE(cmd)          # keep the task across idle periods
