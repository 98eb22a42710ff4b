"""Local settings of one device: the TOML file given to ``dongle-agent --config FILE``.

One way to read them, for the daemon and the CLI alike (:func:`load`):

1. ``config/settings.schema.json`` validates the file: types, ranges, enums, unknown and missing
   keys (a plain JSON Schema; keys marked ``"x-file": true`` must name a readable file);
2. each section becomes a frozen dataclass below, whose field defaults are the only defaults;
3. the checks that span keys (:func:`_check`).

Any problem raises :class:`SettingsError` with one message, ``FILE: key 'a.b': what is wrong``;
the daemon prints it and exits with status 2 before starting anything, the CLI prints it and
exits 2 too. Relative paths are resolved against the directory of the TOML file. The CLI loads
with ``check_files=False``: a technician may not read the device's keys, and need not.

A test (tests/test_settings.py) holds the schema and the dataclasses to the same keys.
"""
from __future__ import annotations

import json
import math
import os
import tomllib
from dataclasses import dataclass, field, fields, replace
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema

from agent.cloud import topics

DEFAULT_PATH = "/etc/dongle/agent.toml"
U16 = 0xFFFF
U32 = 0xFFFFFFFF


class SettingsError(Exception):
    """A problem with the settings file; ``str()`` is the one message shown to the person."""


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DeviceSettings:
    id: str
    data_dir: Path


@dataclass(frozen=True)
class KeySettings:
    sign_key: Path
    enc_key: Path
    cloud_enc_pub: Path
    cloud_sign_pubs: tuple[Path, ...]


@dataclass(frozen=True)
class MqttSettings:
    url: str
    ca_file: Path
    cert_file: Path
    key_file: Path
    protocol: str = "5"
    topic_prefix: str = topics.PREFIX_TEMPLATE
    keepalive_s: int = 30
    session_expiry_s: int = 7 * 24 * 3600
    backoff_min_s: float = 1.0
    backoff_max_s: float = 300.0
    config_rollback_s: float = 120.0

    @property
    def host_port(self) -> tuple[str, int]:
        u = urlsplit(self.url)
        return u.hostname or "", u.port or 8883


@dataclass(frozen=True)
class ObdSettings:
    enabled: bool = True
    port: str = "/dev/ttyUSB0"
    baudrate: int = 0           # 0 = let python-OBD probe
    timeout_s: float = 2.0


@dataclass(frozen=True)
class CanSettings:
    #: python-can bus configurations (``name``, ``interface``, ``channel``, ``bitrate``,
    #: ``port``, ``dbc``), as drivers/can.py opens them.
    buses: tuple[dict[str, Any], ...] = ()


@dataclass(frozen=True)
class UplinkSettings:
    batch_max_samples: int = 20_000
    max_inflight: int = 8
    #: Raw frame times as PROTOCOL §4 ``t`` (offsets) or rev 1.1 ``dt`` (steps); said in ``status``.
    frame_t: str = "t"


@dataclass(frozen=True)
class StoreSettings:
    budget_mb: float = 512

    @property
    def budget_bytes(self) -> int:
        return int(self.budget_mb * 2**20)


@dataclass(frozen=True)
class LogSettings:
    level: str = "INFO"


@dataclass(frozen=True)
class ClockSettings:
    """``[clock]``: what makes the system clock count as synchronised (drivers/core/clock.py)."""
    synced_by: str = "kernel"   # kernel: an NTP client says so (adjtimex); wall: any time after the floor


@dataclass(frozen=True)
class EvSettings:
    transport: str = "off"      # off | can | elm327
    bus: str | None = None      # transport = "can": a can.buses name
    port: str | None = None     # transport = "elm327": the adapter's serial port
    #: local EV profile files beside the shipped ones (agent/vehicle/ev_profile.py)
    profiles: tuple[Path, ...] = ()


@dataclass(frozen=True)
class ControlSettings:
    socket: Path = Path("/run/dongle/agent.sock")
    group: str = "dongle"
    #: The technician credential: members may clear trouble codes without the button (handlers.py).
    technician_group: str = "dongle-tech"


@dataclass(frozen=True)
class GpioSettings:
    enabled: bool = True
    led_power: int = 5
    led_cloud: int = 6
    led_vehicle: int = 13
    led_attention: int = 19
    led_location: int = 20
    button: int = 26
    long_press_s: float = 3.0
    technician_mode_s: float = 900.0

    @property
    def pins(self) -> dict[str, int]:
        """BCM pin numbers by role (drivers/gpio.py)."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name.startswith("led_") or f.name == "button"}


@dataclass(frozen=True)
class GnssSettings:
    host: str = "127.0.0.1"
    port: int = 2947


@dataclass(frozen=True)
class PowerSettings:
    """``[power]`` (docs/power.md lists every key); present with ``enabled = true`` or absent."""

    mcu_port: str = ""                 # "" = no MCU; e.g. "/dev/serial0"
    mcu_timeout_s: float = 0.5         # per attempt; McuLink retries 3 times
    mcu_retry_s: float = 60.0          # reopen a missing/lost MCU link this often
    watchdog_s: int = 120              # MCU watchdog timeout the agent sets (0 = off)
    kick_s: float = 20.0               # kick period (< watchdog_s / 2)
    stop_watchdog_s: int = 3600        # watchdog left armed on a clean agent stop (not sleep)
    supply_report_s: int = 10          # EVT_SUPPLY period asked of the MCU (0 = off)
    ignition_poll_s: float = 5.0       # GET_IGNITION backstop for lost events
    supply_poll_s: float = 5.0         # 12 V read (MCU GET_SUPPLY, else the supply hook)
    tick_s: float = 1.0                # decision loop period
    grace_s: float = 60.0              # after ignition off, before any sleep
    flush_timeout_s: float = 30.0      # flush() budget before sleeping
    bus_quiet_s: float = 30.0          # no broadcast CAN frame this long = the bus sleeps
    max_settle_s: float = 900.0        # ignition off but the bus never sleeps: sleep anyway
    charge_v: float = 13.2             # 12 V held at or above this ...
    charge_detect_s: float = 60.0      # ... this long = something charges it
    warn_voltage_v: float = 12.2       # parked, sustained: health battery_12v warn (once)
    low_voltage_v: float = 11.8        # parked, sustained: health battery_12v critical + sleep
    low_voltage_s: float = 60.0        # "sustained"
    sleep_check_in_s: int = 6 * 3600   # wake timer of a normal sleep (0 = none)
    low_voltage_check_in_s: int = 0    # wake timer after a low-battery cut (0 = none)
    check_in_s: float = 90.0           # awake time after a timer wake
    power_off_delay_s: int = 20        # MCU cuts power this long after SLEEP (OS halt time)
    probe_after_s: float = 120.0       # no MCU: "on" without charging this long -> probe
    probe_s: float = 90.0              # no MCU: requests paused this long to see if the bus sleeps
    probe_interval_s: float = 900.0    # no MCU: at most one probe per this
    halt_without_mcu: bool = True      # no MCU + low battery: halt the OS (unplug to restart)

    def problems(self) -> list[str]:
        """What is wrong across keys (each key's own range is the schema's), ``power.key: why``."""
        out = [f"power.{f.name}: must not be negative" for f in fields(self)
               if isinstance(getattr(self, f.name), (int, float))
               and not isinstance(getattr(self, f.name), bool) and getattr(self, f.name) < 0]
        out += [f"power.{n}: at most {U16}" for n in ("watchdog_s", "stop_watchdog_s",
                                                       "supply_report_s", "power_off_delay_s")
                if getattr(self, n) > U16]
        out += [f"power.{n}: at most {U32}" for n in ("sleep_check_in_s", "low_voltage_check_in_s")
                if getattr(self, n) > U32]
        if self.watchdog_s and not 0 < self.kick_s <= self.watchdog_s / 2:
            out.append("power.kick_s: must be above 0 and at most half of watchdog_s")
        if self.tick_s <= 0:
            out.append("power.tick_s: must be above 0")
        if not self.low_voltage_v < self.warn_voltage_v < self.charge_v:
            out.append("power: need low_voltage_v < warn_voltage_v < charge_v")
        from firmware_bridge.port import check_spec
        try:
            check_spec(self.mcu_port)
        except ValueError as e:
            out.append(f"power.mcu_port: {e}")
        return out

    def check(self) -> None:
        """Raises ValueError with the first of :meth:`problems`."""
        problems = self.problems()
        if problems:
            raise ValueError(problems[0])


@dataclass(frozen=True)
class UpdateSettings:
    """``[update]`` (docs/updates.md); present with ``enabled = true`` or absent."""

    root: Path = Path("/opt/dongle")                 # install layout (agent.update.slots)
    tuf_root: Path = Path("/etc/dongle/keys/tuf_root.json")   # pinned at provisioning
    metadata_dir: Path = Path("/var/lib/dongle/tuf")
    work_dir: Path = Path("/var/lib/dongle/update")  # the agent's: staging, requests (not /opt)
    ca_file: Path | None = None                      # None: the system's CA bundle
    hardware_id: str = "dongle-pi-v1"
    mcu_hardware_id: str = "dongle-mcu-v1"
    python: str = "/usr/bin/python3"
    max_rate_kib_s: float = 256                      # cellular-friendly cap; 0 = unlimited
    max_bundle_mb: float = 256
    stable_s: float = 300
    trial_s: float = 900
    max_starts: int = 3
    retry_s: float = 60
    poll_s: float = 5
    compile_bytecode: bool = True
    mcu_trial_s: int = 60                            # MCU must confirm the new image within

    @property
    def rate_bps(self) -> float | None:
        return self.max_rate_kib_s * 1024 if self.max_rate_kib_s > 0 else None

    @property
    def max_bundle_bytes(self) -> int:
        return int(self.max_bundle_mb * 2**20)

    def layout(self):
        from agent.update.slots import Layout
        return Layout(Path(self.root), self.python, Path(self.work_dir))


@dataclass(frozen=True)
class Settings:
    path: Path
    device: DeviceSettings
    keys: KeySettings | None = None   # None only when loaded without them (the CLI)
    mqtt: MqttSettings | None = None
    obd: ObdSettings = field(default_factory=ObdSettings)
    can: CanSettings = field(default_factory=CanSettings)
    uplink: UplinkSettings = field(default_factory=UplinkSettings)
    store: StoreSettings = field(default_factory=StoreSettings)
    log: LogSettings = field(default_factory=LogSettings)
    ev: EvSettings = field(default_factory=EvSettings)
    control: ControlSettings = field(default_factory=ControlSettings)
    gpio: GpioSettings = field(default_factory=GpioSettings)
    gnss: GnssSettings = field(default_factory=GnssSettings)
    clock: ClockSettings = field(default_factory=ClockSettings)
    power: PowerSettings | None = None    # None: power management off
    update: UpdateSettings | None = None  # None: updates off ("updates not configured")
    #: What the file said, section by section, defaults not filled in (for error messages and
    #: the CLI's view of the file).
    raw: dict = field(default_factory=dict, repr=False)

    @property
    def device_id(self) -> str:
        return self.device.id

    @property
    def data_dir(self) -> Path:
        return self.device.data_dir

    @property
    def db_path(self) -> Path:
        return self.data_dir / "agent.db"

    @property
    def topic_prefix(self) -> str:
        template = self.mqtt.topic_prefix if self.mqtt else topics.PREFIX_TEMPLATE
        return topics.prefix(self.device_id, template)

    def resolve(self, value: str | os.PathLike) -> Path:
        """A path from this file: relative ones are relative to the file's directory."""
        return _resolve(self.path.resolve().parent, value)

    def key_naming(self, path: str | os.PathLike) -> str | None:
        """The key of this file that names the file ``path`` (``'can.buses[0].dbc'``), if any."""
        target = Path(path).resolve()
        for key_path, value in _file_keys(schema(), self.raw):
            if self.resolve(value).resolve() == target:
                return _key_path(key_path)
        return None

    def file_error(self, key: str, why: str) -> SettingsError:
        """The one settings error: ``FILE: key 'a.b': why``."""
        return SettingsError(f"{self.path}: key '{key}': {why}")


#: Section name -> its dataclass (the order the schema lists them).
SECTIONS: dict[str, type] = {
    "device": DeviceSettings, "keys": KeySettings, "mqtt": MqttSettings, "obd": ObdSettings,
    "can": CanSettings, "uplink": UplinkSettings, "store": StoreSettings, "log": LogSettings,
    "power": PowerSettings, "ev": EvSettings, "update": UpdateSettings,
    "control": ControlSettings, "gpio": GpioSettings, "gnss": GnssSettings, "clock": ClockSettings,
}
#: Keys of a section that switch it on and are not fields of its dataclass.
SWITCHES = {"power": "enabled", "update": "enabled"}


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------

def schema() -> dict:
    return json.loads(resources.files("agent.config").joinpath("settings.schema.json").read_text())


def _key_path(path) -> str:
    return ".".join(str(p) if not isinstance(p, int) else f"[{p}]" for p in path).replace(".[", "[")


def _file_keys(sch: dict, data: Any, path: tuple = ()):
    """Yields (key path, value) for every value whose schema says ``x-file``."""
    if sch.get("x-file") and isinstance(data, str):
        yield path, data
    if isinstance(data, dict):
        for k, sub in sch.get("properties", {}).items():
            if k in data:
                yield from _file_keys(sub, data[k], path + (k,))
    if isinstance(data, list) and "items" in sch:
        for i, item in enumerate(data):
            yield from _file_keys(sch["items"], item, path + (i,))


def _resolve(base: Path, value: str | os.PathLike) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else (base / p)


def _schema_error(path: Path, e: jsonschema.ValidationError) -> SettingsError:
    where = _key_path(e.absolute_path)
    if e.validator == "additionalProperties":
        extra = sorted(set(e.instance) - set(e.schema.get("properties", {})))
        return SettingsError(f"{path}: unknown key '{'.'.join(filter(None, [where, extra[0]]))}'")
    if e.validator == "required":
        missing = [k for k in e.validator_value if k not in e.instance][0]
        return SettingsError(f"{path}: missing key '{'.'.join(filter(None, [where, missing]))}'")
    return SettingsError(f"{path}: key '{where}': {e.message}")


def _typed(cls: type, values: dict, base: Path) -> Any:
    """``cls(**values)`` with paths resolved, lists as tuples and numbers as the field's type."""
    out = {}
    hints = {f.name: str(f.type) for f in fields(cls)}
    for name, value in values.items():
        hint = hints[name]
        if "Path" in hint and isinstance(value, str):
            value = _resolve(base, value)
        elif "tuple[Path" in hint and isinstance(value, list):
            value = tuple(_resolve(base, v) for v in value)
        elif "tuple" in hint and isinstance(value, list):
            value = tuple(dict(v) if isinstance(v, dict) else v for v in value)
        elif hint == "float" and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        elif hint == "int" and isinstance(value, float) and value.is_integer():
            value = int(value)
        out[name] = value
    return cls(**out)


def load(path: str | os.PathLike = DEFAULT_PATH, *, check_files: bool = True) -> Settings:
    """Reads, validates and types the settings file (see the module docstring).

    ``check_files=False`` (the CLI): the key and certificate sections are not required and
    files named in them are not opened; everything else is checked as for the daemon."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise SettingsError(f"{path}: settings file not found (give it with --config FILE)") from None
    except OSError as e:
        raise SettingsError(f"{path}: cannot read the settings file: {e.strerror or e}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise SettingsError(f"{path}: not valid TOML: {e}") from None

    sch = schema()
    if not check_files:
        sch = dict(sch, required=[r for r in sch.get("required", []) if r not in ("keys", "mqtt")])
    errors = sorted(jsonschema.Draft202012Validator(sch).iter_errors(data),
                    key=lambda e: (len(e.absolute_path), list(map(str, e.absolute_path))))
    if errors:
        raise _schema_error(path, errors[0])

    base = path.resolve().parent
    if check_files:
        for key_path, value in _file_keys(sch, data):
            resolved = _resolve(base, value)
            if not resolved.is_file():
                raise SettingsError(f"{path}: key '{_key_path(key_path)}': file not found: {resolved}")
            if not os.access(resolved, os.R_OK):
                raise SettingsError(f"{path}: key '{_key_path(key_path)}': file not readable: {resolved}")

    sections: dict[str, Any] = {}
    for name, cls in SECTIONS.items():
        values = dict(data.get(name) or {})
        switch = SWITCHES.get(name)
        if switch is not None:
            if not values.pop(switch, False):
                continue
        if name in ("keys", "mqtt") and name not in data:
            continue
        if name == "can":   # a bus's DBC, like every path of this file, is relative to its directory
            values["buses"] = [dict(b, dbc=str(_resolve(base, b["dbc"]))) if b.get("dbc") else b
                               for b in values.get("buses", [])]
        sections[name] = _typed(cls, values, base)
    update = data.get("update") or {}
    if "update" in sections:
        u = sections["update"]
        keys = sections.get("keys")
        defaults = {}
        if not update.get("tuf_root") and keys is not None:
            defaults["tuf_root"] = keys.sign_key.parent / "tuf_root.json"
        if not update.get("metadata_dir"):
            defaults["metadata_dir"] = sections["device"].data_dir / "tuf"
        if not update.get("work_dir"):
            defaults["work_dir"] = sections["device"].data_dir / "update"
        if defaults:
            sections["update"] = replace(u, **defaults)
    settings = Settings(path=path, raw=data, **sections)
    _check(settings)
    return settings


def _check(s: Settings) -> None:
    """The checks that span keys; the first problem raises."""
    def fail(key: str, why: str) -> None:
        raise s.file_error(key, why)

    m = s.mqtt
    if m is not None:
        try:
            port = urlsplit(m.url).port
        except ValueError:
            port = None
        if port == 0 or (port is None and ":" in m.url.removeprefix("mqtts://")):
            fail("mqtt.url", "port must be 1-65535")
        if m.backoff_max_s < m.backoff_min_s:
            fail("mqtt.backoff_max_s", "must be >= mqtt.backoff_min_s")
    names = [b["name"] for b in s.can.buses]
    if len(names) != len(set(names)):
        fail("can.buses", f"bus names must be unique, got {names}")
    if s.ev.transport == "can" and s.ev.bus not in names:
        fail("ev.bus", f"{s.ev.bus!r} is not one of can.buses {names}")
    if s.ev.transport == "elm327" and s.obd.enabled and s.ev.port == s.obd.port:
        fail("ev.port", f"the OBD poller already owns {s.ev.port}")
    if s.power is not None:
        for problem in s.power.problems():
            key, _, why = problem.partition(": ")
            fail(key, why)
    for name in SECTIONS:
        sec = getattr(s, name)
        for f in fields(sec) if sec is not None else ():
            v = getattr(sec, f.name)
            if isinstance(v, float) and not math.isfinite(v):   # TOML has inf and nan
                fail(f"{name}.{f.name}", "must be a finite number")
