"""The engine ECU's diagnostic memory: trouble codes, freeze frame, readiness monitors.

Everything is a function of drive time (:class:`scripts.vehicle_sim.drive.Drive`), so the
answers of the emulator and the expectations of a test come from the same moment:

- :meth:`EcuMemory.set_code` stores a code as a real ECU does, when the engine runs: set while
  the engine runs, it is stored at once; set while it is off or cranking, it is stored once the
  engine has run 2 s (the fault shows when the monitor runs). A code already stored stays as it
  is (setting it again changes nothing, as a fault that is still there). The first stored code captures
  the freeze frame: the car's :class:`~scripts.vehicle_sim.drive.State` at that moment.
  Powertrain codes (P0, P2, P3 generic) light the MIL; a stored code with the MIL on is also
  permanent (mode 0A).
- :meth:`EcuMemory.clear` (mode 04): stored and pending codes, freeze frame and MIL go; the
  distance, time and warm-ups since codes cleared start again from 0; every readiness monitor
  is incomplete. Permanent codes stay until every monitor has completed again (SAE J1979:
  only a passed monitor erases a permanent code; the twin's faults do not come back).
- Readiness: before any clear, every supported monitor is complete (a car driven for years).
  After a clear, each completes once the drive since the clear has met its condition
  (:data:`MONITORS`): engine-running seconds, warm-engine seconds (coolant >= 70 °C), distance.
- The memory is kept while the car is off, as an ECU's is: :meth:`EcuMemory.to_dict` and
  :meth:`EcuMemory.from_dict` carry it across restarts of the twin (drive times go on).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from scripts.vehicle_sim.drive import Drive, State

#: python-OBD's monitor name -> (J1979 byte, bit, needs): the condition after a clear. "run"
#: and "warm" are engine-running seconds (warm: coolant >= 70 °C), "km" distance. Heated
#: catalyst, secondary air and A/C are not fitted (not available).
MONITORS: dict[str, tuple[str, int, dict[str, float]]] = {
    "MISFIRE_MONITORING": ("B", 0, {"run": 20.0}),
    "FUEL_SYSTEM_MONITORING": ("B", 1, {"warm": 30.0}),
    "COMPONENT_MONITORING": ("B", 2, {"run": 60.0}),
    "CATALYST_MONITORING": ("C", 0, {"warm": 300.0, "km": 4.0}),
    "EVAPORATIVE_SYSTEM_MONITORING": ("C", 2, {"warm": 500.0}),
    "OXYGEN_SENSOR_MONITORING": ("C", 5, {"warm": 120.0}),
    "OXYGEN_SENSOR_HEATER_MONITORING": ("C", 6, {"run": 90.0}),
    "EGR_VVT_SYSTEM_MONITORING": ("C", 7, {"warm": 180.0}),
}

#: how long the engine runs before a code set while it was off is stored
DETECT_AFTER_S = 2.0

_LETTERS = {"P": 0, "C": 1, "B": 2, "U": 3}


def code_bytes(code: str) -> bytes:
    """``"P0301"`` -> ``b"\\x03\\x01"`` (SAE J2012)."""
    code = code.strip().upper()
    if len(code) != 5 or code[0] not in _LETTERS or code[1] not in "0123":
        raise ValueError(f"not a trouble code: {code!r}")
    value = (_LETTERS[code[0]] << 14) | (int(code[1]) << 12) | int(code[2:], 16)
    return value.to_bytes(2, "big")


def lights_mil(code: str) -> bool:
    """Generic powertrain codes (emission related) light the MIL in the twin."""
    return code[0] == "P" and code[1] in "023"


@dataclass(frozen=True)
class StoredCode:
    code: str
    t: float          # drive time it is stored from
    pending: bool = False


@dataclass(frozen=True)
class Since:
    """The drive since codes were last cleared."""

    km: float
    minutes: float      # engine-running minutes
    warmups: int
    run_s: float
    warm_s: float


class EcuMemory:
    """Thread-safe: the emulator serves one client, the harness sets codes from another."""

    def __init__(self, drive: Drive):
        self.drive = drive
        self._lock = threading.Lock()
        self._codes: list[StoredCode] = []
        self._cleared_at: float | None = None
        self._permanent: list[str] = []      # survive a clear until the monitors complete
        self._freeze: tuple[str, float] | None = None

    # -- changes ------------------------------------------------------------------------------

    def set_code(self, code: str, now: float, *, pending: bool = False) -> float:
        """Stores ``code`` (``"P0301"``) as of drive time ``now``; returns the drive time from
        which the ECU reports it (later than ``now`` when the engine is not running)."""
        code_bytes(code)  # raises ValueError for a bad code
        code = code.strip().upper()
        t = self.drive.next_running(now, DETECT_AFTER_S)
        with self._lock:
            for c in self._codes:
                if c.code == code and c.pending == pending and c.t <= now:
                    return c.t       # stored already: it stays as it was stored
            self._codes = [c for c in self._codes if not (c.code == code and c.pending == pending)]
            self._codes.append(StoredCode(code, t, pending))
            if not pending and (self._freeze is None or self._freeze[1] > t):
                self._freeze = (code, t)
        return t

    def clear(self, now: float) -> None:
        """Mode 04 at drive time ``now``."""
        with self._lock:
            kept = [c.code for c in self._codes if not c.pending and c.t <= now and lights_mil(c.code)]
            self._permanent = list(dict.fromkeys(self._permanent + kept))
            self._codes = []
            self._freeze = None
            self._cleared_at = now

    # -- kept while the car is off ----------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The memory as JSON data (drive times), for :meth:`from_dict`."""
        with self._lock:
            return {"codes": [{"code": c.code, "t": c.t, "pending": c.pending} for c in self._codes],
                    "cleared_at": self._cleared_at, "permanent": list(self._permanent),
                    "freeze": list(self._freeze) if self._freeze else None}

    @classmethod
    def from_dict(cls, drive: Drive, d: dict[str, Any] | None) -> "EcuMemory":
        """The memory :meth:`to_dict` gave (an empty one for ``None``)."""
        ecu = cls(drive)
        d = d or {}
        ecu._codes = [StoredCode(str(c["code"]), float(c["t"]), bool(c.get("pending")))
                      for c in d.get("codes") or []]
        cleared = d.get("cleared_at")
        ecu._cleared_at = float(cleared) if cleared is not None else None
        ecu._permanent = [str(c) for c in d.get("permanent") or []]
        freeze = d.get("freeze")
        ecu._freeze = (str(freeze[0]), float(freeze[1])) if freeze else None
        return ecu

    # -- answers --------------------------------------------------------------------------------

    def stored(self, now: float) -> list[str]:
        with self._lock:
            return [c.code for c in self._codes if not c.pending and c.t <= now]

    def pending(self, now: float) -> list[str]:
        with self._lock:
            return [c.code for c in self._codes if c.pending and c.t <= now]

    def permanent(self, now: float) -> list[str]:
        stored = [c for c in self.stored(now) if lights_mil(c)]
        with self._lock:
            leftover = list(self._permanent)
        if leftover and self.all_complete(now):
            with self._lock:
                self._permanent = []
            leftover = []
        return list(dict.fromkeys(leftover + stored))

    def mil(self, now: float) -> bool:
        return any(lights_mil(c) for c in self.stored(now))

    def mil_on_since(self, now: float) -> float | None:
        """The drive time the MIL came on (it is on at ``now``), or ``None``."""
        with self._lock:
            times = [c.t for c in self._codes if not c.pending and c.t <= now and lights_mil(c.code)]
        return min(times) if times else None

    def freeze_frame(self, now: float) -> tuple[str, State] | None:
        """The code that stored the freeze frame and the car at that moment; ``None`` if none."""
        with self._lock:
            freeze = self._freeze
        if freeze is None or freeze[1] > now:
            return None
        return freeze[0], self.drive.at(freeze[1])

    def since_clear(self, now: float) -> Since:
        car = self.drive.car
        state = self.drive.at(now)
        with self._lock:
            cleared = self._cleared_at
        if cleared is None:
            return Since(car.since_clear_km + state.distance_km,
                         car.since_clear_min + state.engine_s / 60.0,
                         min(255, car.warmups_since_clear + state.warmups),
                         float("inf"), float("inf"))
        base = self.drive.at(cleared)
        return Since(state.distance_km - base.distance_km, (state.engine_s - base.engine_s) / 60.0,
                     state.warmups - base.warmups, state.engine_s - base.engine_s,
                     state.warm_s - base.warm_s)

    def monitors(self, now: float) -> dict[str, bool]:
        """``{monitor: complete}`` for the monitors the engine has."""
        since = self.since_clear(now)
        have = {"run": since.run_s, "warm": since.warm_s, "km": since.km}
        return {name: all(have[k] >= v for k, v in needs.items())
                for name, (_, _, needs) in MONITORS.items()}

    def all_complete(self, now: float) -> bool:
        return all(self.monitors(now).values())

    def status_bytes(self, now: float) -> bytes:
        """PID 01 01: MIL and count, then the monitor bytes (spark ignition)."""
        count = min(len(self.stored(now)), 0x7F)
        a = (0x80 if self.mil(now) else 0) | count
        done = self.monitors(now)
        b = c = d = 0
        for name, (byte, bit, _) in MONITORS.items():
            if byte == "B":
                b |= 1 << bit
                if not done[name]:
                    b |= 1 << (bit + 4)
            else:
                c |= 1 << bit
                if not done[name]:
                    d |= 1 << bit
        return bytes((a, b, c, d))

    def describe(self, now: float) -> dict[str, Any]:
        freeze = self.freeze_frame(now)
        since = self.since_clear(now)
        with self._lock:
            cleared = self._cleared_at
            scheduled = [{"code": c.code, "t": c.t, "pending": c.pending} for c in self._codes]
        return {"stored": self.stored(now), "pending": self.pending(now),
                "permanent": self.permanent(now), "mil": self.mil(now),
                "scheduled": scheduled, "cleared_at": cleared,
                "freeze": None if freeze is None else {"code": freeze[0], "t": freeze[1].t},
                "monitors": self.monitors(now),
                "since_clear": {"km": since.km, "minutes": since.minutes,
                                "warmups": since.warmups}}
