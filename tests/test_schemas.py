"""Body schemas (PROTOCOL §4, §6, §7): valid and invalid bodies of every kind."""
from __future__ import annotations

import copy
import json
from importlib import resources

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from agent.cloud import schemas
from agent.cloud.schemas import SchemaError, validate

T = 1_750_000_000_000
DAY = 24 * 3600 * 1000
H = "ab" * 32

TELEMETRY = {
    "t0": T,
    "signals": [{"name": "rpm", "unit": "rpm", "t": [0, 1000], "v": [800, 812.5]},
                {"name": "soc", "unit": "%", "t": [], "v": []}],
    "frames": [{"bus": "can0", "t": [0, 150], "id": [0x7FF, 0x1FFFFFFF], "ext": [False, True],
                "data": [b"\x00" * 8, b"\xff" * 64]}],
    "positions": {"t": [0, 60000], "lat": [37.77, 37.78], "lon": [-122.42, -122.41], "speed": [12.5, 0],
                  "course": [90, 359.9], "prec_m": 1000},
}
CONFIG = {
    "version": 3,
    "upload": {"interval_s": 30, "future_knob": True},
    "obd": {"pids": [{"name": "rpm", "pid": "RPM", "period_s": 1}, {"name": "speed", "pid": "SPEED", "period_s": 0.5}],
            "dtc_period_s": 600},
    "can": {"signals": [{"name": "steer", "message": "STEER_ANGLE_SENSOR", "signal": "STEER_ANGLE", "period_s": 0.1,
                         "x-note": "kept"}],
            "raw": {"enabled": True, "ids": [0x25, 0xAA]}},
    "ev": {"profile": "auto", "period_s": 60},
    "privacy": {"location": {"mode": "coarse", "consent_id": "c-1", "granted_at": T, "until": T + 366 * DAY,
                             "per_drive": True},
                "driving_behaviour": {"mode": "off"},
                "retention_days": {"location": 7, "driving_behaviour": 30}},
    "unknown_section": {"anything": [1, "two", None]},
}
EVENTS = [
    {"type": "dtc", "ts": T, "codes": [{"code": "P0301", "state": "stored", "desc": "Cylinder 1 Misfire"}],
     "mil": True, "freeze": {"rpm": 800}},
    {"type": "dtc", "ts": T, "codes": [], "mil": False},
    {"type": "dtc_cleared", "ts": T, "codes": ["P0301", "U0100"], "by": "technician:jane"},
    {"type": "trip_start", "ts": T},
    {"type": "trip_start", "ts": T, "odometer_km": 12345.6},
    {"type": "trip_end", "ts": T, "odometer_km": 12360, "distance_km": 14.4, "duration_s": 1260, "fuel_l": 1.1},
    {"type": "trip_end", "ts": T, "distance_km": 0, "duration_s": 3},
    {"type": "booking", "ts": T, "booking_id": "b-17", "status": "checked_in"},
    {"type": "service_record", "ts": T, "booking_id": "b-17", "odometer_km": 12360, "items": ["oil", "filter"],
     "technician": "jane", "prev_hash": "0" * 64, "hash": H},
    {"type": "buffer_evicted", "ts": T, "from_seq": 100, "to_seq": 199, "count": 100, "reason": "disk_full"},
    {"type": "health", "ts": T, "kind": "battery_12v", "level": "warn", "detail": {"v": 11.6}},
    {"type": "vehicle", "ts": T, "vin": "JTMBFREV8JJ000000", "vin_valid": True, "protocol": "ISO 15765-4 (CAN 11/500)",
     "ecus": ["7E8", "7E9"]},
    {"type": "vehicle", "ts": T, "vin_valid": False, "protocol": "", "ecus": [], "profile": "kia_ev6"},
    {"type": "privacy", "ts": T, "category": "location", "state": "withdrawn", "deleted": 42, "by": "config"},
    {"type": "device_wiped", "ts": T, "by": "owner_button"},
    {"type": "update", "ts": T, "component": "agent", "from": "1.0.0", "to": "1.1.0", "state": "trial"},
    {"type": "update", "ts": T, "component": "mcu", "from": "3", "to": "4", "state": "rolled_back",
     "reason": "watchdog"},
]
RELEASE = {"component": "agent", "version": "1.2.0", "release_counter": 12,
           "repository": "https://updates.example.com/tuf", "target": "agent-1.2.0.tar.zst",
           "conditions": {"parked": True, "min_supply_v": 12.2}}
VALID = [
    ("telemetry", TELEMETRY),
    ("telemetry", {"t0": 0, "signals": []}),
    ("config", CONFIG),
    ("config", {"version": 0, "upload": {"interval_s": 60}, "obd": {"pids": [], "dtc_period_s": 300},
                "can": {"signals": [], "raw": {"enabled": False, "ids": []}}}),
    ("ack", {"ref_kind": "command", "ref_seq": 12, "status": "done", "result": {"deleted": {"location": 3}}}),
    ("ack", {"ref_kind": "config", "ref_seq": 4, "status": "rejected", "reason": "schema", "config_version": 3}),
    ("ack", {"ref_kind": "release", "ref_seq": 1, "status": "duplicate"}),
    ("ack", {"ref_kind": "config", "ref_seq": 5, "status": "duplicate"}),
    ("booking", {"op": "upsert", "booking_id": "b-17", "service": "annual", "scheduled_at": T,
                 "provider": {"name": "Garage", "address": "1 Main St", "phone": "+1 555", "lat": 1.5, "lon": 2.5},
                 "notes": "bring the spare key"}),
    ("booking", {"op": "cancel", "booking_id": "b-17"}),
    ("command", {"op": "ping"}),
    ("command", {"op": "clear_dtc", "request_id": "r-9"}),
    ("command", {"op": "delete_data", "categories": ["location", "driving_behaviour"], "request_id": "r-1"}),
    ("release", RELEASE),
    ("release", {"component": "mcu", "version": "5", "release_counter": 5, "repository": "https://u.example/r",
                 "target": "mcu-5.bin", "delta_from": "4", "delta_target": "mcu-4-5.delta", "not_before": T,
                 "conditions": {"parked": False, "min_supply_v": 0}}),
] + [("event", e) for e in EVENTS]


@pytest.mark.parametrize("kind,body", VALID, ids=lambda v: v if isinstance(v, str) else v.get("type", v.get("op", "")))
def test_valid_bodies(kind, body):
    before = copy.deepcopy(body)
    validate(kind, body)
    assert body == before  # validation never mutates (no defaults filled in)


def _with(body: dict, path: str, value=..., delete: bool = False) -> dict:
    """A deep copy of ``body`` with the dotted ``path`` set to ``value`` or deleted."""
    out = copy.deepcopy(body)
    *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
    node = out
    for p in parents:
        node = node[p]
    if delete:
        del node[last]
    else:
        node[last] = value
    return out


def _event(type_: str) -> dict:
    return next(e for e in EVENTS if e["type"] == type_)


INVALID = [
    # telemetry
    ("telemetry", _with(TELEMETRY, "t0", delete=True), "t0"),
    ("telemetry", _with(TELEMETRY, "t0", -1), "t0"),
    ("telemetry", _with(TELEMETRY, "signals.0.v", [1.0]), "signals[0]"),
    ("telemetry", _with(TELEMETRY, "signals.0.v", [1.0, "2"]), "signals[0].v[1]"),
    ("telemetry", _with(TELEMETRY, "signals.0.v", [1.0, float("nan")]), "signals[0].v[1]"),
    ("telemetry", _with(TELEMETRY, "signals.0.v", [1.0, float("inf")]), "signals[0].v[1]"),
    ("telemetry", _with(TELEMETRY, "signals.0.name", b"rpm"), "signals[0].name"),
    ("telemetry", _with(TELEMETRY, "signals.0.unit", delete=True), "signals[0]"),
    ("telemetry", _with(TELEMETRY, "frames.0.data", [b"\x00" * 8, b"\x00" * 65]), "frames[0].data[1]"),
    ("telemetry", _with(TELEMETRY, "frames.0.data", [b"\x00", "00"]), "frames[0].data[1]"),
    ("telemetry", _with(TELEMETRY, "frames.0.ext", [False]), "frames[0]"),
    ("telemetry", _with(TELEMETRY, "frames.0.id", [0x800, 1]), "frames[0].id[0]"),
    ("telemetry", _with(TELEMETRY, "frames.0.id", [1, 0x20000000]), "frames[0].id[1]"),
    ("telemetry", _with(TELEMETRY, "frames.0.bus", delete=True), "frames[0]"),
    ("telemetry", _with(TELEMETRY, "positions.prec_m", delete=True), "positions"),
    ("telemetry", _with(TELEMETRY, "positions.lat", [37.7, 91]), "positions.lat[1]"),
    ("telemetry", _with(TELEMETRY, "positions.course", [1.0]), "positions"),
    ("telemetry", {**TELEMETRY, 5: "int key"}, "map key 5"),
    # event
    ("event", {"type": "dtc", "codes": [], "mil": False}, "ts"),
    ("event", {"type": "telepathy", "ts": T}, "type"),
    ("event", _with(_event("dtc"), "codes.0.code", "P301"), "codes[0].code"),
    ("event", _with(_event("dtc"), "codes.0.state", "gone"), "codes[0].state"),
    ("event", _with(_event("dtc"), "mil", delete=True), "mil"),
    ("event", _with(_event("dtc"), "mil", 1), "mil"),
    ("event", _with(_event("dtc_cleared"), "by", delete=True), "by"),
    ("event", _with(_event("trip_end"), "duration_s", delete=True), "duration_s"),
    ("event", _with(_event("trip_end"), "distance_km", -1), "distance_km"),
    ("event", _with(_event("booking"), "status", "cancelled"), "status"),
    ("event", _with(_event("service_record"), "hash", "AB" * 32), "hash"),
    ("event", _with(_event("service_record"), "prev_hash", delete=True), "prev_hash"),
    ("event", _with(_event("buffer_evicted"), "from_seq", 200), "from_seq"),
    ("event", _with(_event("health"), "level", "fatal"), "level"),
    ("event", _with(_event("vehicle"), "ecus", delete=True), "ecus"),
    ("event", _with(_event("privacy"), "by", "cloud"), "by"),
    ("event", _with(_event("privacy"), "deleted", -3), "deleted"),
    ("event", _with(_event("device_wiped"), "by", delete=True), "by"),
    ("event", {"type": "update", "ts": T, "component": "agent", "from": "1", "to": "2", "state": "rejected"},
     "reason"),
    ("event", _with(_event("update"), "component", "kernel"), "component"),
    # ack
    ("ack", {"ref_kind": "command", "ref_seq": 1, "status": "failed"}, "reason"),
    ("ack", {"ref_kind": "config", "ref_seq": 1, "status": "applied", "config_version": "3"}, "config_version"),
    ("ack", {"ref_kind": "telemetry", "ref_seq": 1, "status": "done"}, "ref_kind"),
    ("ack", {"ref_kind": "command", "ref_seq": 1, "status": "ok"}, "status"),
    ("ack", {"ref_kind": "command", "ref_seq": -1, "status": "done"}, "ref_seq"),
    # config
    ("config", _with(CONFIG, "upload", delete=True), "upload"),
    ("config", _with(CONFIG, "version", 1.5), "version"),
    ("config", _with(CONFIG, "upload.interval_s", 0), "upload.interval_s"),
    ("config", _with(CONFIG, "obd.pids.0.period_s", delete=True), "obd.pids[0]"),
    ("config", _with(CONFIG, "can.raw.ids", [0x20000000]), "can.raw.ids[0]"),
    ("config", _with(CONFIG, "can.signals.0.name", "rpm"), "can.signals[0].name"),
    ("config", _with(CONFIG, "privacy.location.until", T + 366 * DAY + 1), "privacy.location.until"),
    ("config", _with(CONFIG, "privacy.location.consent_id", delete=True), "privacy.location"),
    ("config", _with(CONFIG, "privacy.location.mode", "exact"), "privacy.location.mode"),
    ("config", _with(CONFIG, "privacy.driving_behaviour", {"mode": "on", "consent_id": "d", "granted_at": T}),
     "privacy.driving_behaviour"),
    ("config", _with(CONFIG, "privacy.driving_behaviour", {"mode": "on", "consent_id": "d", "granted_at": T,
                                                           "until": T + 400 * DAY}), "privacy.driving_behaviour"),
    ("config", _with(CONFIG, "privacy.retention_days.location", 0), "privacy.retention_days.location"),
    ("config", _with(CONFIG, "ev.profile", ""), "ev.profile"),
    # booking
    ("booking", {"op": "upsert", "booking_id": "b", "service": "s", "scheduled_at": T}, "provider"),
    ("booking", {"op": "move", "booking_id": "b"}, "op"),
    ("booking", {"op": "cancel"}, "booking_id"),
    ("booking", {"op": "upsert", "booking_id": "b", "service": "s", "scheduled_at": T, "provider": {"phone": "1"}},
     "provider"),
    # command
    ("command", {"op": "reboot"}, "op"),
    ("command", {"op": "delete_data", "request_id": "r"}, "categories"),
    ("command", {"op": "delete_data", "categories": [], "request_id": "r"}, "categories"),
    ("command", {"op": "delete_data", "categories": ["location"]}, "request_id"),
    # release
    ("release", _with(RELEASE, "repository", "http://updates.example.com/tuf"), "repository"),
    ("release", _with(RELEASE, "delta_from", "1.1.0"), "delta_target"),
    ("release", _with(RELEASE, "conditions", delete=True), "conditions"),
    ("release", _with(RELEASE, "conditions.parked", "yes"), "conditions.parked"),
    ("release", _with(RELEASE, "release_counter", -1), "release_counter"),
    ("release", _with(RELEASE, "component", "os"), "component"),
]


@pytest.mark.parametrize("kind,body,where", INVALID, ids=[f"{k}-{w}" for k, _, w in INVALID])
def test_invalid_bodies(kind, body, where):
    with pytest.raises(SchemaError) as info:
        validate(kind, body)
    assert info.value.kind == kind
    assert where in info.value.message, info.value.message


@pytest.mark.parametrize("kind", schemas.KINDS)
def test_not_a_map(kind):
    for body in ([], "x", None, b"", 1):
        with pytest.raises(SchemaError):
            validate(kind, body)


def test_unknown_kind():
    with pytest.raises(SchemaError):
        validate("status", {})


@pytest.mark.parametrize("kind", schemas.KINDS)
def test_schema_files_are_portable_json(kind):
    """Shipped in the package, plain JSON, valid 2020-12 schemas, only document-local $refs."""
    text = resources.files("agent.config").joinpath("schemas", f"{kind}.json").read_text(encoding="utf-8")
    doc = json.loads(text)
    assert doc["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    Draft202012Validator.check_schema(doc)
    refs = []

    def walk(node):
        if isinstance(node, dict):
            if "$ref" in node:
                refs.append(node["$ref"])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)
    walk(doc)
    assert all(r.startswith("#/$defs/") for r in refs), refs


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10)
                     | st.binary(max_size=70),
                     lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                     max_leaves=25)
_field_names = st.sampled_from(["t0", "signals", "frames", "positions", "type", "ts", "codes", "version", "op",
                                "ref_kind", "ref_seq", "status", "privacy", "obd", "can", "upload", "t", "v",
                                "data", "id", "ext", "from_seq", "to_seq", "component", "conditions", "name"])


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(schemas.KINDS), st.dictionaries(_field_names, _json, max_size=6))
def test_random_bodies_only_raise_schema_error(kind, body):
    try:
        validate(kind, body)
    except SchemaError:
        pass
