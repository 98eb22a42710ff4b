"""The drive model: one car whose every value is a function of *drive time*.

The real RAV4 minute (:mod:`.recording`) is the middle of a loop that a car really drives::

    key_on → crank → warm_idle → pull_away → recorded → stop → idle → parked → (next loop)

- ``key_on`` (ignition on, engine off): the ECU answers, rpm 0, the battery at rest;
- ``crank``: the starter turns the engine (about 210 rpm), the voltage dips;
- ``warm_idle``: the engine fires and settles from a flare of ~1,400 rpm to 750, in P, then D;
- ``pull_away``: from 0 to the recording's first speed (28.8 km/h) at ``pull_away_ms2``;
- ``recorded``: the recording's own wheel speeds, RPM, pedal, torque and gear, as a CAN
  receiver holds them (the last value at or before the moment). Vehicle speed is the mean of
  the four wheels (as comma's reference speed); the speedometer's SPEED signal reads ~2 % over;
- ``stop``: from the recording's last speed (41.2 km/h) to 0 at ``stop_ms2``; then ``idle``;
- ``parked``: ignition off: the ECU does not answer, the CAN bus sleeps. The next loop is a new
  trip, with a new engine start.

Accelerations of the made-up phases stay below the harsh-driving thresholds of
agent/health/driving.py (3.0 m/s² accelerating, 3.5 m/s² braking); the recording's own
peak is 2.3 m/s².

What the recording lacks is modelled from what it has, deterministically (no randomness, so a
test can compute the expected answer for any moment):

- coolant: warms from the loop's start temperature towards a virtual 110 °C at a rate that grows
  with engine load, held at the thermostat's 90 °C; cools towards ambient while parked
  (time constant 40 min). A cold car (loop 0) starts at ambient; later loops start warm;
- intake air: ambient plus heat soak from the engine, less when moving; engine load from the
  real torque (ETQREAL, 233 Nm max for the 2.5 L 2AR-FE); throttle from torque; manifold
  pressure and mass air flow (2.5 L, rpm, load); fuel rate from MAF at 14.7:1 and 745 g/L
  (the same constants agent/health/trips.py uses); fuel level falls with the fuel used (60 L
  tank, refilled during a park when below ``refuel_below_pct``); odometer and distance since
  codes cleared grow with distance; run time counts from the engine start;
- control module voltage: 14.0-14.4 V running, ~10 V cranking, the resting battery when off
  (12.45 V plus a surface charge of up to 0.4 V that fades over ~10 min after the engine stops).

:class:`DriveClock` maps wall time to drive time with a speed factor; the ELM327-emulator
process and the CAN replay each hold one built from the same numbers (:func:`save_spec`),
so both sides show the same moment of the drive.
"""
from __future__ import annotations

import bisect
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from drivers.core import vin as vin_check
from scripts.vehicle_sim.recording import Recording, load

PHASES = ("key_on", "crank", "warm_idle", "pull_away", "recorded", "stop", "idle", "parked")

TORQUE_MAX_NM = 233.0      # Toyota 2AR-FE (2.5 L), the RAV4 2016-18 petrol engine
DISPLACEMENT_L = 2.5
AIR_DENSITY_KG_M3 = 1.18
AFR = 14.7                 # as agent/health/trips.py
FUEL_DENSITY_G_PER_L = 745.0
IDLE_RPM = 750.0
FLARE_RPM = 1450.0
CRANK_RPM = 210.0
THERMOSTAT_C = 90.0
WARM_TARGET_C = 110.0      # the exponential aims here and is held at the thermostat
WARM_TAU_S = 330.0
COOL_TAU_S = 2400.0
WARM_C = 70.0              # "warm engine" (readiness monitors, warm-up cycles)
REST_V = 12.45
SURFACE_V = 0.4
SURFACE_TAU_S = 600.0
GRID_S = 0.1

# the recording's own VIN is 2T3DFREVXHW665004: WMI 2T3 (Toyota Motor Manufacturing Canada,
# RAV4), VDS DFREV, model year H (2017), plant W (Woodstock). A demo car keeps all of it but
# the serial (positions 12-17, from the car's name) and the check digit (position 9).
VIN_STEM = "2T3DFREV", "HW"
RECORDED_SERIAL = "665004"


def vin_for(name: str) -> str:
    """A valid VIN (check digit right, 49 CFR 565) for the demo car called ``name``; the same
    name always gives the same VIN."""
    serial = int(hashlib.sha256(name.encode()).hexdigest(), 16) % 1_000_000
    if f"{serial:06d}" == RECORDED_SERIAL:
        serial = (serial + 1) % 1_000_000
    draft = f"{VIN_STEM[0]}0{VIN_STEM[1]}{serial:06d}"
    return draft[:8] + vin_check.check_digit(draft) + draft[9:]


@dataclass(frozen=True)
class Car:
    """The demo car: who it is and what the recording does not say."""

    name: str = "demo-0001"
    ambient_c: float = 17.0           # 2018-08-02, 9 a.m. on I-280
    odometer_km: float = 25_088.6     # 15,589.4 miles: the recording shows 15,589 then 15,590
    fuel_pct: float = 64.0
    tank_l: float = 60.0
    refuel_below_pct: float = 12.0
    refuel_to_pct: float = 95.0
    since_clear_km: float = 4_211.0   # PID 31 before any clear
    since_clear_min: float = 9_450.0  # PID 4E (engine-running minutes) before any clear
    warmups_since_clear: int = 212    # PID 30 before any clear
    key_on_s: float = 8.0
    crank_s: float = 1.2
    warm_idle_s: float = 12.0
    end_idle_s: float = 8.0
    parked_s: float = 150.0           # > the agent's trip end_after_s (120 s) at speed 1
    pull_away_ms2: float = 1.5
    stop_ms2: float = 1.8

    @property
    def vin(self) -> str:
        return vin_for(self.name)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Car":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass(frozen=True)
class DriveClock:
    """Drive time = ``offset`` + (wall time - ``epoch``) x ``speed``. Wall time is
    ``time.time()``, the same in every process of the machine, so two processes given the
    same three numbers agree on the moment of the drive."""

    epoch: float
    speed: float = 1.0
    offset: float = 0.0

    @classmethod
    def starting(cls, speed: float = 1.0, offset: float = 0.0) -> "DriveClock":
        """A clock at drive time ``offset`` now."""
        if speed <= 0:
            raise ValueError("speed must be > 0")
        return cls(time.time(), float(speed), float(offset))

    def now(self) -> float:
        return self.at_wall(time.time())

    def at_wall(self, wall: float) -> float:
        return self.offset + (wall - self.epoch) * self.speed

    def wall(self, drive_t: float) -> float:
        """The wall time at which the drive reaches ``drive_t``."""
        return self.epoch + (drive_t - self.offset) / self.speed

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DriveClock":
        return cls(float(d["epoch"]), float(d.get("speed", 1.0)), float(d.get("offset", 0.0)))


def save_spec(path: str | Path, car: Car, clock: DriveClock, **extra: Any) -> Path:
    """Writes what a twin process needs to show the same car at the same moment (atomically)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"car": car.to_dict(), "clock": clock.to_dict(), **extra},
                              indent=1) + "\n")
    tmp.replace(path)
    return path


def load_spec(path: str | Path) -> tuple[Car, DriveClock, dict[str, Any]]:
    doc = json.loads(Path(path).read_text())
    extra = {k: v for k, v in doc.items() if k not in ("car", "clock")}
    return Car.from_dict(doc.get("car") or {}), DriveClock.from_dict(doc["clock"]), extra


@dataclass(frozen=True)
class Phase:
    name: str
    start: float   # seconds into the loop
    end: float

    @property
    def duration(self) -> float:
        return self.end - self.start


@dataclass(frozen=True)
class State:
    """The car at one moment of the drive. Units: km/h, rpm, %, °C, kPa, g/s, L/h, V, km, s."""

    t: float
    loop: int
    u: float                 # seconds into the loop
    phase: str
    ignition: bool           # the ECU answers, the bus is awake
    running: bool            # the engine runs (not while cranking)
    speed_kmh: float         # the four wheels' mean: what the ECU reports (PID 0D)
    speedo_kmh: float        # the speedometer's SPEED signal (0xB4), ~2 % over the wheels
    wheel_kmh: tuple[float, float, float, float]   # FL, FR, RL, RR
    rpm: float
    pedal_pct: float
    torque_nm: float
    gear: str                # "P" or "D"
    coolant_c: float
    intake_c: float
    ambient_c: float
    load_pct: float
    throttle_pct: float
    map_kpa: float
    baro_kpa: float
    maf_gs: float
    fuel_rate_lh: float
    fuel_system: int         # PID 03 bits: 0 off, 1 open loop (cold), 2 closed loop, 4 open (fuel cut)
    timing_advance_deg: float
    stft_pct: float
    ltft_pct: float
    fuel_pct: float
    fuel_l: float
    voltage: float           # control module voltage (PID 42)
    adapter_v: float         # what an ELM327 reads on pin 16 (AT RV)
    run_time_s: float        # since this engine start (PID 1F)
    distance_km: float       # driven since drive time 0
    odometer_km: float
    engine_s: float          # engine-running seconds since drive time 0
    warm_s: float            # ... of them with coolant >= 70 °C
    warmups: int             # warm-up cycles completed since drive time 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class _LoopStart:
    coolant_c: float
    fuel_l: float
    warm_s: float        # cumulative warm running seconds before this loop
    warmups: int
    parked_for_s: float  # how long the battery has rested at key-on (inf for loop 0)


@dataclass(frozen=True)
class LoopTruth:
    """What really happened in one loop, in drive time: the known answers for tests of the
    agent's trip and health logic. A trip as agent/health/trips.py sees it runs from the first
    sample showing use (rpm > 300 or speed > 0.5 km/h: the engine has fired) to the last
    (the engine stops); the engine start (rpm leaving 0, battery12v.StartDetector) is at the
    crank."""

    loop: int
    start_t: float            # key on
    engine_start_t: float     # crank begins
    trip_start_t: float       # the engine runs (warm_idle begins)
    drive_start_t: float      # the car moves
    drive_end_t: float        # the car stands still again
    trip_end_t: float         # engine off, parked (ignition off)
    end_t: float              # the next loop's key on
    distance_km: float
    fuel_l: float
    odometer_start_km: float
    odometer_end_km: float
    coolant_start_c: float
    coolant_end_c: float
    trips: int = 1
    engine_starts: int = 1

    @property
    def duration_s(self) -> float:
        return self.trip_end_t - self.trip_start_t

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "duration_s": round(self.duration_s, 3)}


def _clamp(x: float, lo: float, hi: float) -> float:
    return lo if x < lo else hi if x > hi else x


class Drive:
    """The loop built around one recording, for one car. Thread-safe for reading (the loop
    start cache only grows, under the GIL)."""

    def __init__(self, car: Car | None = None, recording: Recording | None = None):
        self.car = car or Car()
        self.rec = recording or load()
        rec, car = self.rec, self.car
        self.v_start = self._wheel_mean(0.0)
        self.v_end = self._wheel_mean(rec.duration_s)
        # the speedometer's SPEED signal reads about 2 % over the wheels' mean
        self.speedo_start = rec["speed_kmh"].first / max(self.v_start, 1e-6)
        self.speedo_end = rec["speed_kmh"].last / max(self.v_end, 1e-6)
        pull_s = self.v_start / 3.6 / car.pull_away_ms2
        stop_s = self.v_end / 3.6 / car.stop_ms2
        durations = (car.key_on_s, car.crank_s, car.warm_idle_s, pull_s, rec.duration_s, stop_s,
                     car.end_idle_s, car.parked_s)
        self.phases: list[Phase] = []
        u = 0.0
        for name, d in zip(PHASES, durations):
            self.phases.append(Phase(name, u, u + d))
            u += d
        self.loop_s = u
        self.phase = {p.name: p for p in self.phases}
        self._starts = [p.start for p in self.phases]
        self._idle_after_flare = IDLE_RPM + (FLARE_RPM - IDLE_RPM) * math.exp(-car.warm_idle_s / 4.0)
        self._build_grid()
        self._loops: list[_LoopStart] = [_LoopStart(car.ambient_c, car.tank_l * car.fuel_pct / 100.0,
                                                    0.0, 0, math.inf)]

    # -- the loop's own profile (the same every loop) -------------------------------------------

    def _wheel_mean(self, x: float) -> float:
        s = self.rec.series
        return (s["wheel_fl_kmh"].at(x) + s["wheel_fr_kmh"].at(x) + s["wheel_rl_kmh"].at(x)
                + s["wheel_rr_kmh"].at(x)) / 4.0

    def _phase_at(self, u: float) -> Phase:
        return self.phases[max(bisect.bisect_right(self._starts, u) - 1, 0)]

    def _base(self, u: float) -> tuple[Phase, float, tuple[float, float, float, float], float,
                                       float, float, str]:
        """(phase, speed, wheels, rpm, pedal, torque, gear) at ``u`` seconds into the loop."""
        p = self._phase_at(u)
        x = u - p.start
        rec = self.rec
        if p.name == "recorded":
            s = rec.series
            wheels = (s["wheel_fl_kmh"].at(x), s["wheel_fr_kmh"].at(x), s["wheel_rl_kmh"].at(x),
                      s["wheel_rr_kmh"].at(x))
            speed = sum(wheels) / 4.0
            gear = "D" if s["gear"].at(x) in (0, 1) else "P"
            return (p, speed, wheels, s["rpm"].at(x), s["pedal_pct"].at(x), s["torque_nm"].at(x),
                    gear)
        if p.name in ("key_on", "parked"):
            return p, 0.0, (0.0,) * 4, 0.0, 0.0, 0.0, "P"
        if p.name == "crank":
            return p, 0.0, (0.0,) * 4, CRANK_RPM, 0.0, 0.0, "P"
        if p.name == "warm_idle":
            rpm = IDLE_RPM + (FLARE_RPM - IDLE_RPM) * math.exp(-x / 4.0)
            return p, 0.0, (0.0,) * 4, rpm, 0.0, 12.0, "D" if p.end - u <= 2.0 else "P"
        if p.name == "pull_away":
            f = x / p.duration
            speed = self.v_start * f
            rpm = self._idle_after_flare + (rec["rpm"].first - self._idle_after_flare) * f
            pedal = 25.0 + (rec["pedal_pct"].first - 25.0) * f
            torque = 100.0 + (rec["torque_nm"].first - 100.0) * f
            return p, speed, (speed,) * 4, rpm, pedal, torque, "D"
        if p.name == "stop":
            f = x / p.duration
            speed = self.v_end * (1.0 - f)
            rpm = rec["rpm"].last + (IDLE_RPM - rec["rpm"].last) * min(1.0, f / 0.6)
            return p, speed, (speed,) * 4, rpm, 0.0, -2.0, "D"
        # idle: in D, then P after 3 s
        return p, 0.0, (0.0,) * 4, IDLE_RPM, 0.0, 10.0, "D" if x < 3.0 else "P"

    @staticmethod
    def _load(running: bool, torque: float) -> float:
        return _clamp(18.0 + 82.0 * torque / TORQUE_MAX_NM, 5.0, 100.0) if running else 0.0

    @staticmethod
    def _maf(rpm: float, load_pct: float) -> float:
        litres_per_s = DISPLACEMENT_L / 1000.0 * rpm / 120.0
        return litres_per_s * AIR_DENSITY_KG_M3 * 1000.0 * load_pct / 100.0

    @staticmethod
    def _fuel_rate(maf: float) -> float:
        return maf / AFR / FUEL_DENSITY_G_PER_L * 3600.0

    def _build_grid(self) -> None:
        """Cumulative distance, fuel, engine time and heat over the awake part of a loop."""
        end = self.phase["parked"].start
        n = int(math.ceil(end / GRID_S))
        self._grid_u = [min(i * GRID_S, end) for i in range(n + 1)]
        dist, fuel, run, heat = [0.0], [0.0], [0.0], [0.0]
        prev = self._rates(0.0)
        for u0, u1 in zip(self._grid_u, self._grid_u[1:]):
            cur = self._rates(u1)
            dt = u1 - u0
            dist.append(dist[-1] + (prev[0] + cur[0]) / 2.0 * dt / 3600.0)
            fuel.append(fuel[-1] + (prev[1] + cur[1]) / 2.0 * dt / 3600.0)
            run.append(run[-1] + (dt if self._phase_at(u0).name in _RUNNING else 0.0))
            heat.append(heat[-1] + (prev[2] + cur[2]) / 2.0 * dt)
            prev = cur
        self._cum = {"dist": dist, "fuel": fuel, "run": run, "heat": heat}
        self.loop_distance_km = dist[-1]
        self.loop_fuel_l = fuel[-1]
        self.loop_engine_s = run[-1]
        self.loop_heat = heat[-1]

    def _rates(self, u: float) -> tuple[float, float, float]:
        """(speed km/h, fuel L/h, heating rate 1/s) at ``u``."""
        p, speed, _, rpm, _, torque, _ = self._base(u)
        running = p.name in _RUNNING
        load = self._load(running, torque)
        fuel = self._fuel_rate(self._maf(rpm, load)) if running else 0.0
        heat = (0.35 + 1.3 * load / 100.0) / WARM_TAU_S if running else 0.0
        return speed, fuel, heat

    def _cum_at(self, key: str, u: float) -> float:
        grid, values = self._grid_u, self._cum[key]
        if u >= grid[-1]:
            return values[-1]
        i = bisect.bisect_right(grid, u) - 1
        f = (u - grid[i]) / (grid[i + 1] - grid[i])
        return values[i] + (values[i + 1] - values[i]) * f

    # -- what carries from loop to loop ---------------------------------------------------------

    def _coolant(self, start_c: float, heat: float) -> float:
        return min(THERMOSTAT_C, WARM_TARGET_C - (WARM_TARGET_C - start_c) * math.exp(-heat))

    def _warm_from_u(self, start_c: float) -> float | None:
        """The first moment of a loop starting at ``start_c`` when the coolant is warm."""
        if start_c >= WARM_C:
            return self.phase["warm_idle"].start
        need = math.log((WARM_TARGET_C - start_c) / (WARM_TARGET_C - WARM_C))
        heat = self._cum["heat"]
        if heat[-1] < need:
            return None
        i = bisect.bisect_left(heat, need)
        return self._grid_u[i]

    def _warm_in_loop(self, start_c: float, u: float) -> float:
        w = self._warm_from_u(start_c)
        if w is None or u <= w:
            return 0.0
        return self._cum_at("run", u) - self._cum_at("run", w)

    def _loop_start(self, n: int) -> _LoopStart:
        car = self.car
        parked = self.phase["parked"].duration
        while len(self._loops) <= n:
            s = self._loops[-1]
            end_c = self._coolant(s.coolant_c, self.loop_heat)
            start_c = car.ambient_c + (end_c - car.ambient_c) * math.exp(-parked / COOL_TAU_S)
            fuel = s.fuel_l - self.loop_fuel_l
            if fuel < car.tank_l * car.refuel_below_pct / 100.0:
                fuel = car.tank_l * car.refuel_to_pct / 100.0
            warm = s.warm_s + self._warm_in_loop(s.coolant_c, self._grid_u[-1])
            warmup = end_c - s.coolant_c >= 22.0 and end_c >= WARM_C
            self._loops.append(_LoopStart(start_c, fuel, warm, s.warmups + int(warmup), parked))
        return self._loops[n]

    # -- the public model ---------------------------------------------------------------------

    def locate(self, t: float) -> tuple[int, float]:
        """(loop, seconds into it) of drive time ``t``; before 0 the car stands parked before
        loop 0."""
        if t < 0:
            return 0, -1.0
        n = int(t // self.loop_s)
        return n, t - n * self.loop_s

    def at(self, t: float) -> State:
        """The car at drive time ``t``."""
        car = self.car
        n, u = self.locate(t)
        start = self._loop_start(n)
        before = u < 0
        if before:
            p, speed, wheels, rpm, pedal, torque, gear = self._base(self.phase["parked"].start)
            p = self.phase["parked"]
        else:
            p, speed, wheels, rpm, pedal, torque, gear = self._base(u)
        if p.name == "recorded":
            speedo = self.rec["speed_kmh"].at(u - p.start)
        else:
            speedo = speed * (self.speedo_start if p.start < self.phase["recorded"].start
                              else self.speedo_end)
        running = p.name in _RUNNING
        ignition = p.name != "parked"
        park_start = self.phase["parked"].start
        uc = 0.0 if before else min(u, park_start)
        heat = self._cum_at("heat", uc)
        coolant = self._coolant(start.coolant_c, heat)
        if p.name == "parked" and not before:
            end_c = self._coolant(start.coolant_c, self.loop_heat)
            coolant = car.ambient_c + (end_c - car.ambient_c) * math.exp(-(u - park_start) / COOL_TAU_S)
        load = self._load(running, torque)
        maf = self._maf(rpm, load) if running or p.name == "crank" else 0.0
        fuel_rate = self._fuel_rate(maf) if running else 0.0
        if not running:
            fuel_system = 0
        elif torque < 0 and rpm > 1000:
            fuel_system = 4
        else:
            fuel_system = 1 if coolant < 40.0 else 2
        closed = fuel_system == 2
        stft = (2.0 * math.sin(2 * math.pi * t / 6.3) + 1.0 * math.sin(2 * math.pi * t / 1.7)
                if closed else 0.0)
        soak = _clamp((coolant - car.ambient_c) / (THERMOSTAT_C - car.ambient_c), 0.0, 1.0)
        if running:
            intake = car.ambient_c + 3.0 + 14.0 * soak * math.exp(-speed / 45.0)
            throttle = _clamp(12.5 + 70.0 * max(torque, 0.0) / TORQUE_MAX_NM, 0.0, 100.0)
            map_kpa = _clamp(22.0 + 0.79 * load, 20.0, 101.0)
            timing = _clamp(28.0 - 20.0 * load / 100.0 + (rpm - IDLE_RPM) / 250.0, 2.0, 40.0)
        else:
            intake = car.ambient_c + 6.0 * soak
            throttle = 12.0 if ignition else 0.0
            map_kpa = 101.0
            timing = 0.0
        # the battery: resting (with the surface charge a run leaves), dipping while cranking,
        # charged at 14+ V while the engine runs
        if p.name == "parked" and not before:
            rest = REST_V + SURFACE_V * math.exp(-(u - park_start) / SURFACE_TAU_S)
        else:
            rested = start.parked_for_s if not before else math.inf
            rest = REST_V + SURFACE_V * math.exp(-rested / SURFACE_TAU_S)
        if p.name == "key_on":
            voltage = rest - 0.1       # the ECUs, the fuel pump
        elif p.name == "crank":
            voltage = 10.1
        elif running:
            since = u - self.phase["warm_idle"].start
            voltage = 14.05 + 0.3 * math.exp(-since / 20.0) - 0.15 * load / 100.0 \
                + 0.03 * math.sin(2 * math.pi * t / 3.1)
        else:
            voltage = rest
        adapter_v = voltage - 0.05 if ignition else voltage   # the cable to pin 16
        run_time = (u - self.phase["warm_idle"].start) if running else 0.0
        dist = n * self.loop_distance_km + (0.0 if before else self._cum_at("dist", uc))
        fuel_l = start.fuel_l - (0.0 if before else self._cum_at("fuel", uc))
        engine_s = n * self.loop_engine_s + (0.0 if before else self._cum_at("run", uc))
        warm_s = start.warm_s + (0.0 if before else self._warm_in_loop(start.coolant_c, uc))
        warmups = start.warmups
        if p.name == "parked" and not before:
            warmups = self._loop_start(n + 1).warmups
        return State(
            t=t, loop=n, u=u, phase=p.name, ignition=ignition, running=running,
            speed_kmh=speed, speedo_kmh=speedo, wheel_kmh=wheels, rpm=rpm, pedal_pct=pedal, torque_nm=torque,
            gear=gear, coolant_c=coolant, intake_c=intake, ambient_c=car.ambient_c,
            load_pct=load, throttle_pct=throttle, map_kpa=map_kpa, baro_kpa=101.0, maf_gs=maf,
            fuel_rate_lh=fuel_rate, fuel_system=fuel_system, timing_advance_deg=timing,
            stft_pct=stft, ltft_pct=3.1 if ignition else 0.0,
            fuel_pct=100.0 * fuel_l / car.tank_l, fuel_l=fuel_l, voltage=voltage,
            adapter_v=adapter_v, run_time_s=run_time, distance_km=dist,
            odometer_km=car.odometer_km + dist, engine_s=engine_s, warm_s=warm_s,
            warmups=warmups)

    def next_running(self, t: float, settle_s: float = 2.0) -> float:
        """The first drive time at or after ``t`` when the engine has run ``settle_s``."""
        n, u = self.locate(t)
        first = self.phase["warm_idle"].start + settle_s
        last = self.phase["parked"].start
        if 0 <= u and first <= u < last:
            return t
        if u < first:
            return n * self.loop_s + first
        return (n + 1) * self.loop_s + first

    # -- known answers ------------------------------------------------------------------------

    def loop_truth(self, n: int) -> LoopTruth:
        base = n * self.loop_s
        ph = self.phase
        start = self._loop_start(n)
        end_c = self._coolant(start.coolant_c, self.loop_heat)
        odo0 = self.car.odometer_km + n * self.loop_distance_km
        return LoopTruth(
            loop=n, start_t=base, engine_start_t=base + ph["crank"].start,
            trip_start_t=base + ph["warm_idle"].start, drive_start_t=base + ph["pull_away"].start,
            drive_end_t=base + ph["stop"].end, trip_end_t=base + ph["parked"].start,
            end_t=base + self.loop_s, distance_km=self.loop_distance_km, fuel_l=self.loop_fuel_l,
            odometer_start_km=odo0, odometer_end_km=odo0 + self.loop_distance_km,
            coolant_start_c=start.coolant_c, coolant_end_c=end_c)

    def truth(self, t0: float, t1: float) -> dict[str, Any]:
        """Known answers for drive times ``[t0, t1)``: the loops whose trip lies wholly inside
        (``trips``: their count, distance, engine-running time), engine starts (cranks) inside,
        and each loop's :class:`LoopTruth`."""
        first, _ = self.locate(max(t0, 0.0))
        loops = []
        n = first
        while n * self.loop_s < t1:
            loops.append(self.loop_truth(n))
            n += 1
        trips = [lt for lt in loops if lt.trip_start_t >= t0 and lt.trip_end_t <= t1]
        return {
            "t0": t0, "t1": t1, "loop_s": self.loop_s,
            "trips": len(trips),
            "engine_starts": sum(1 for lt in loops if t0 <= lt.engine_start_t < t1),
            "distance_km": sum(lt.distance_km for lt in trips),
            "trip_duration_s": sum(lt.duration_s for lt in trips),
            "loops": [lt.as_dict() for lt in loops]}


_RUNNING = frozenset({"warm_idle", "pull_away", "recorded", "stop", "idle"})


def main(argv: list[str] | None = None) -> int:
    import argparse
    p = argparse.ArgumentParser(prog="python -m scripts.vehicle_sim.drive",
                                description="The twin's drive: phases and known answers per loop")
    p.add_argument("--car", default="demo-0001", help="the demo car's name (its VIN follows)")
    p.add_argument("--parked-s", type=float, default=Car.parked_s)
    p.add_argument("--loops", type=int, default=2, help="loops to print (known answers)")
    p.add_argument("--at", type=float, action="append", default=[],
                   help="also print the car's state at this drive time (repeatable)")
    args = p.parse_args(argv)
    drive = Drive(Car(name=args.car, parked_s=args.parked_s))
    out: dict[str, Any] = {
        "vin": drive.car.vin, "loop_s": round(drive.loop_s, 3),
        "phases": [{"name": ph.name, "start": round(ph.start, 3), "end": round(ph.end, 3)}
                   for ph in drive.phases],
        "truth": drive.truth(0.0, args.loops * drive.loop_s)}
    if args.at:
        out["states"] = [drive.at(t).as_dict() for t in args.at]
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
