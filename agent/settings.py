"""Local settings of one device: the TOML file given to ``dongle-agent --config FILE``.

Validated once at start against ``config/settings.schema.json`` (a plain JSON Schema; keys
marked ``"x-file": true`` must name a readable file). Any problem raises :class:`SettingsError`
naming the file and the key; the daemon prints it and exits with status 2 before starting
anything. Relative paths are resolved against the directory of the TOML file.
"""
from __future__ import annotations

import copy
import json
import os
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema

DEFAULTS: dict[str, dict[str, Any]] = {
    "mqtt": {
        "protocol": "5",
        "topic_prefix": "dongle/v1/{device_id}/",
        "keepalive_s": 30,
        "session_expiry_s": 7 * 24 * 3600,
        "backoff_min_s": 1.0,
        "backoff_max_s": 300.0,
        "config_rollback_s": 120.0,
    },
    "obd": {"enabled": True, "port": "/dev/ttyUSB0", "baudrate": 0, "timeout_s": 2.0},
    "can": {"buses": []},
    "uplink": {"batch_max_samples": 20000, "max_inflight": 8},
    "store": {"budget_mb": 512},
    "log": {"level": "INFO"},
    # Over-the-air updates (agent/update/attach.py, docs/updates.md); off unless enabled = true.
    # Not set here (files must exist when named): tuf_root (default: tuf_root.json next to
    # keys.sign_key, written by dongle provision --tuf-root) and ca_file (default: the system's
    # CA bundle). metadata_dir "" = <data_dir>/tuf.
    "update": {"enabled": False, "root": "/opt/dongle", "metadata_dir": "",
               "hardware_id": "dongle-pi-v1", "mcu_hardware_id": "dongle-mcu-v1",
               "python": "/usr/bin/python3", "max_rate_kib_s": 256, "max_bundle_mb": 256,
               "stable_s": 300.0, "trial_s": 900.0, "max_starts": 3, "retry_s": 60.0,
               "poll_s": 5.0, "compile_bytecode": True, "mcu_trial_s": 60},
}


class SettingsError(Exception):
    """A problem with the settings file; ``str()`` is the one message shown to the person."""


def _schema() -> dict:
    return json.loads(resources.files("agent.config").joinpath("settings.schema.json").read_text())


def _key_path(path) -> str:
    return ".".join(str(p) if not isinstance(p, int) else f"[{p}]" for p in path).replace(".[", "[")


def _file_keys(schema: dict, data: Any, path: tuple = ()):
    """Yields (key path, value) for every value whose schema says ``x-file``."""
    if schema.get("x-file") and isinstance(data, str):
        yield path, data
    if isinstance(data, dict):
        for k, sub in schema.get("properties", {}).items():
            if k in data:
                yield from _file_keys(sub, data[k], path + (k,))
    if isinstance(data, list) and "items" in schema:
        for i, item in enumerate(data):
            yield from _file_keys(schema["items"], item, path + (i,))


def _resolve(base: Path, value: str) -> str:
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else (base / p))


@dataclass(frozen=True)
class Settings:
    path: Path
    data: dict

    @property
    def device_id(self) -> str:
        return self.data["device"]["id"]

    @property
    def data_dir(self) -> Path:
        return Path(self.data["device"]["data_dir"])

    def section(self, name: str) -> dict:
        return self.data[name]

    @property
    def mqtt_host_port(self) -> tuple[str, int]:
        u = urlsplit(self.data["mqtt"]["url"])
        return u.hostname or "", u.port or 8883

    @property
    def topic_prefix(self) -> str:
        return self.data["mqtt"]["topic_prefix"].format(device_id=self.device_id)


def load(path: str | os.PathLike) -> Settings:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise SettingsError(f"{path}: cannot read the settings file: {e.strerror or e}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise SettingsError(f"{path}: not valid TOML: {e}") from None

    schema = _schema()
    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(data),
                    key=lambda e: (len(e.absolute_path), list(map(str, e.absolute_path))))
    if errors:
        e = errors[0]
        where = _key_path(e.absolute_path)
        if e.validator == "additionalProperties":
            extra = sorted(set(e.instance) - set(e.schema.get("properties", {})))
            key = ".".join(filter(None, [where, extra[0]]))
            raise SettingsError(f"{path}: unknown key '{key}'")
        if e.validator == "required":
            missing = [k for k in e.validator_value if k not in e.instance][0]
            key = ".".join(filter(None, [where, missing]))
            raise SettingsError(f"{path}: missing key '{key}'")
        raise SettingsError(f"{path}: key '{where}': {e.message}")

    merged = copy.deepcopy(DEFAULTS)
    for section, values in data.items():
        merged.setdefault(section, {}).update(values)

    base = path.resolve().parent
    merged["device"]["data_dir"] = _resolve(base, merged["device"]["data_dir"])
    for key_path, value in list(_file_keys(schema, merged)):
        resolved = _resolve(base, value)
        target = merged
        for k in key_path[:-1]:
            target = target[k]
        target[key_path[-1]] = resolved
        if not os.path.isfile(resolved):
            raise SettingsError(f"{path}: key '{_key_path(key_path)}': file not found: {resolved}")
        if not os.access(resolved, os.R_OK):
            raise SettingsError(f"{path}: key '{_key_path(key_path)}': file not readable: {resolved}")

    m = merged["mqtt"]
    try:
        port = urlsplit(m["url"]).port
    except ValueError:
        port = None
    if port == 0 or (port is None and ":" in m["url"].removeprefix("mqtts://")):
        raise SettingsError(f"{path}: key 'mqtt.url': port must be 1-65535")
    if m["backoff_max_s"] < m["backoff_min_s"]:
        raise SettingsError(f"{path}: key 'mqtt.backoff_max_s': must be >= mqtt.backoff_min_s")
    names = [b["name"] for b in merged["can"]["buses"]]
    if len(names) != len(set(names)):
        raise SettingsError(f"{path}: key 'can.buses': bus names must be unique, got {names}")
    ev = merged.get("ev") or {}
    if ev.get("transport") == "can" and ev.get("bus") not in names:
        raise SettingsError(f"{path}: key 'ev.bus': {ev.get('bus')!r} is not one of can.buses {names}")
    if ev.get("transport") == "elm327" and merged["obd"]["enabled"] and ev.get("port") == merged["obd"]["port"]:
        raise SettingsError(f"{path}: key 'ev.port': the OBD poller already owns {ev['port']}")
    return Settings(path=path, data=merged)
