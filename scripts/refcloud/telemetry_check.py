"""A receiver's check of a telemetry body (PROTOCOL §4): the same rules as JSON Schema
(config/schemas/telemetry.json) and what that schema's ``$comment`` leaves to code (columns of
equal length, frame ids in range for their form, data of at most 64 bytes), in linear time.

JSON Schema over a 1,200-sample body costs ~30 ms (bench/bench_fleet.py); here the schema sees
one element of each column and the columns are checked in plain loops (~0.6 ms). The agent does
not use this: its bodies are valid by construction (agent/outbox/telemetry.py); the cloud's
ingest (scripts/refcloud/ingest.py) does, after ``open_envelope(check_schema=False)``.
"""
from __future__ import annotations

import math

from agent.cloud import schemas

_UINT_MAX = 2**64 - 1
_POS_RANGES = {"lat": (-90, 90), "lon": (-180, 180), "speed": (0, math.inf), "course": (0, 360)}


def _bad(where: str, what: str):
    raise schemas.SchemaError("telemetry", f"{where}: {what}")


def _uints(col, where: str) -> None:
    for x in col:
        if type(x) is not int or x < 0 or x > _UINT_MAX:
            _bad(where, f"{x!r} is not an unsigned integer")


def _numbers(col, where: str, lo: float = -math.inf, hi: float = math.inf) -> None:
    for x in col:
        if type(x) not in (int, float) or not math.isfinite(x) or not lo <= x <= hi:
            _bad(where, f"{x!r} is not a finite number in [{lo}, {hi}]")


def _same_length(group: dict, keys: tuple[str, ...], where: str) -> None:
    lengths = {k: len(group[k]) for k in keys if isinstance(group.get(k), list)}
    if len(set(lengths.values())) > 1:
        _bad(where, f"columns differ in length: {lengths}")


def _skeleton(body: dict) -> dict:
    """``body`` with every column cut to its first element: what JSON Schema checks."""
    def cut(group: dict) -> dict:
        return {k: (v[:1] if isinstance(v, list) else v) for k, v in group.items()}
    out = dict(body)
    for key in ("signals", "frames"):
        if isinstance(body.get(key), list):
            out[key] = [cut(g) if isinstance(g, dict) else g for g in body[key]]
    if isinstance(body.get("positions"), dict):
        out["positions"] = cut(body["positions"])
    return out


def validate_telemetry(body: dict) -> None:
    """Raises ``agent.cloud.schemas.SchemaError`` unless ``body`` is a valid telemetry body;
    equivalent to ``schemas.validate("telemetry", body)`` plus the column rules."""
    schemas.validate("telemetry", _skeleton(body))
    for i, s in enumerate(body["signals"]):
        _same_length(s, ("t", "v"), f"signals[{i}]")
        _uints(s["t"], f"signals[{i}].t")
        _numbers(s["v"], f"signals[{i}].v")
    for i, g in enumerate(body.get("frames", ())):
        where = f"frames[{i}]"
        times = "t" if "t" in g else "dt"   # the schema let exactly one through
        _same_length(g, (times, "id", "ext", "data"), where)
        _uints(g[times], f"{where}.{times}")
        for can_id, ext, data in zip(g["id"], g["ext"], g["data"]):
            if type(ext) is not bool:
                _bad(f"{where}.ext", f"{ext!r} is not a boolean")
            if type(can_id) is not int or can_id < 0 or can_id > (0x1FFFFFFF if ext else 0x7FF):
                _bad(f"{where}.id", f"{can_id!r} is not a valid {'extended' if ext else 'standard'} id")
            if type(data) is not bytes or len(data) > 64:
                _bad(f"{where}.data", "not a byte string of at most 64 bytes")
    pos = body.get("positions")
    if pos is not None:
        _same_length(pos, ("t", "lat", "lon", "speed", "course"), "positions")
        _uints(pos["t"], "positions.t")
        for k, (lo, hi) in _POS_RANGES.items():
            _numbers(pos[k], f"positions.{k}", lo, hi)
