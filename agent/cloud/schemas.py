"""Body schemas (PROTOCOL §4, §6, §7): JSON Schema files plus the checks JSON Schema can't express.

The schemas are plain draft 2020-12 JSON in ``config/schemas/{kind}.json`` so a backend in
another language can use the same files. What they cannot say is checked here in code:

- bodies are plain data: maps with text keys, arrays, text, integers, finite floats, booleans,
  null — and byte strings only as telemetry ``frames[].data`` items, each at most 64 bytes;
- telemetry columns of one series have equal lengths (``t``/``v``; a frame group's
  ``t``/``id``/``ext``/``data``; ``positions`` ``t``/``lat``/``lon``/``speed``/``course``), and a
  standard (not ``ext``) CAN id is at most 0x7FF;
- ``buffer_evicted`` has ``from_seq <= to_seq``;
- config: signal names are unique across ``obd.pids`` and ``can.signals`` (telemetry carries
  only the name); each privacy consent's ``until`` is at most 366 days after ``granted_at``.
"""
from __future__ import annotations

import functools
import json
import logging
import math
from collections.abc import Iterable, Mapping
from importlib import resources
from typing import Any

import jsonschema
from jsonschema import Draft202012Validator

from drivers.core.text import safe_text

log = logging.getLogger(__name__)

KINDS = ("telemetry", "event", "ack", "config", "booking", "command", "release")
MAX_FRAME_DATA = 64
MAX_CONSENT_MS = 366 * 24 * 3600 * 1000


#: Longest schema error message (escaped); it becomes an ack's reason after ``schema: ``.
MAX_MESSAGE = 300


class SchemaError(ValueError):
    """A body does not match its kind's schema. ``message`` names the offending path; it quotes
    text from the body, so it is escaped (:func:`drivers.core.text.safe_text`) and capped."""

    def __init__(self, kind: str, message: str):
        self.kind = kind
        self.message = safe_text(message, MAX_MESSAGE)
        super().__init__(f"{kind}: {self.message}")


def load_schema(kind: str) -> dict[str, Any]:
    """The JSON Schema document for ``kind`` as shipped in the ``config`` package."""
    if kind not in KINDS:
        raise KeyError(kind)
    text = resources.files("agent.config").joinpath("schemas", f"{kind}.json").read_text(encoding="utf-8")
    return json.loads(text)


@functools.cache
def _validator(kind: str) -> Draft202012Validator:
    schema = load_schema(kind)
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def _path(parts: Iterable[Any]) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(body)"


def _frames_data_path(path: tuple[Any, ...]) -> bool:
    return len(path) == 4 and path[0] == "frames" and path[2] == "data"


def _check_plain(kind: str, value: Any, path: tuple[Any, ...]) -> None:
    if value is None or isinstance(value, (bool, str, int)):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise SchemaError(kind, f"{_path(path)}: {value} is not a finite number")
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise SchemaError(kind, f"{_path(path)}: map key {k!r} is not text")
            _check_plain(kind, v, path + (k,))
        return
    if isinstance(value, list):
        for i, v in enumerate(value):
            _check_plain(kind, v, path + (i,))
        return
    if isinstance(value, bytes) and kind == "telemetry" and _frames_data_path(path):
        if len(value) > MAX_FRAME_DATA:
            raise SchemaError(kind, f"{_path(path)}: {len(value)} bytes, at most {MAX_FRAME_DATA}")
        return
    if isinstance(value, bytes):
        raise SchemaError(kind, f"{_path(path)}: byte strings are only allowed in frames[].data")
    raise SchemaError(kind, f"{_path(path)}: {type(value).__name__} is not plain CBOR data")


def _equal_lengths(kind: str, where: str, obj: Mapping[str, Any], columns: Iterable[str]) -> None:
    lengths = {c: len(obj[c]) for c in columns if isinstance(obj.get(c), list)}
    if len(set(lengths.values())) > 1:
        detail = ", ".join(f"{c}={n}" for c, n in lengths.items())
        raise SchemaError(kind, f"{where}: columns differ in length ({detail})")


def _check_telemetry(body: Mapping[str, Any]) -> None:
    for i, sig in enumerate(body["signals"]):
        _equal_lengths("telemetry", f"signals[{i}]", sig, ("t", "v"))
    for i, grp in enumerate(body.get("frames", ())):
        where = f"frames[{i}]"
        _equal_lengths("telemetry", where, grp, ("t", "dt", "id", "ext", "data"))
        for j, data in enumerate(grp["data"]):
            if not isinstance(data, bytes):
                raise SchemaError("telemetry", f"{where}.data[{j}]: not a byte string")
        for j, (can_id, ext) in enumerate(zip(grp["id"], grp["ext"])):
            if not ext and can_id > 0x7FF:
                raise SchemaError("telemetry", f"{where}.id[{j}]: {int(can_id):#x} is not a standard 11-bit id")
    if "positions" in body:
        _equal_lengths("telemetry", "positions", body["positions"], ("t", "lat", "lon", "speed", "course"))


def _check_event(body: Mapping[str, Any]) -> None:
    if body["type"] == "buffer_evicted" and body["from_seq"] > body["to_seq"]:
        raise SchemaError("event", f"from_seq: {body['from_seq']} is above to_seq {body['to_seq']}")


def _check_config(body: Mapping[str, Any]) -> None:
    seen: dict[str, str] = {}
    sources = [("obd.pids", body["obd"]["pids"]), ("can.signals", body["can"]["signals"])]
    for where, items in sources:
        for i, item in enumerate(items):
            here = f"{where}[{i}].name"
            if item["name"] in seen:
                raise SchemaError("config", f"{here}: {item['name']!r} is already used by {seen[item['name']]}")
            seen[item["name"]] = here
    privacy = body.get("privacy") or {}
    for category in ("location", "driving_behaviour"):
        consent = privacy.get(category)
        if not isinstance(consent, Mapping) or "until" not in consent or "granted_at" not in consent:
            continue
        if consent["until"] - consent["granted_at"] > MAX_CONSENT_MS:
            raise SchemaError("config", f"privacy.{category}.until: more than 366 days after granted_at")


_SEMANTIC = {"telemetry": _check_telemetry, "event": _check_event, "config": _check_config}


def _message(error: jsonschema.ValidationError) -> str:
    """jsonschema's message, except for the size bounds, whose message would quote the whole
    (oversized) value: those say how long it is and what the bound is."""
    if error.validator == "maxLength" and isinstance(error.instance, str):
        what = "a key of " if "propertyNames" in error.schema_path else ""
        return f"{what}{len(error.instance)} characters, at most {error.validator_value}"
    if error.validator == "maxItems" and isinstance(error.instance, list):
        return f"{len(error.instance)} items, at most {error.validator_value}"
    if error.validator == "maxProperties" and isinstance(error.instance, dict):
        return f"{len(error.instance)} keys, at most {error.validator_value}"
    return error.message


def validate(kind: str, body: Any) -> None:
    """Raises :class:`SchemaError` unless ``body`` is a valid body of ``kind``."""
    if kind not in KINDS:
        raise SchemaError(kind, "unknown kind")
    if not isinstance(body, dict):
        raise SchemaError(kind, f"(body): a map is required, got {type(body).__name__}")
    _check_plain(kind, body, ())
    error = jsonschema.exceptions.best_match(_validator(kind).iter_errors(body))
    if error is not None:
        raise SchemaError(kind, f"{_path(error.absolute_path)}: {_message(error)}")
    check = _SEMANTIC.get(kind)
    if check is not None:
        check(body)
