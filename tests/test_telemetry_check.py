"""The reference ingest's telemetry check (scripts/refcloud/telemetry_check.py) accepts exactly
what the JSON Schema plus the protocol's column rules accept, for both frame-time forms."""
from __future__ import annotations

import copy

import pytest

from agent.cloud import schemas
from agent.outbox.telemetry import telemetry_body
from drivers.core.model import Frame, Sample
from scripts.refcloud.telemetry_check import validate_telemetry

T0 = 1_750_000_000_000


def _body(frame_t: str) -> dict:
    samples = [Sample("engine.rpm", "rpm", T0 + 200 * i, 800.0 + i) for i in range(5)]
    frames = [Frame("can0", T0 * 1000 + 10_000 * i, 0x1A0 + i % 2, False, bytes([i] * 8)) for i in range(6)]
    frames.append(Frame("can1", T0 * 1000 + 5, 0x18DAF110, True, b"\x02\x10\x03"))
    return telemetry_body(samples, frames, frame_t=frame_t)


@pytest.mark.parametrize("frame_t", ["t", "dt"])
def test_bodies_the_agent_makes_pass_both(frame_t):
    body = _body(frame_t)
    assert all(frame_t in g and ({"t", "dt"} - {frame_t}).isdisjoint(g) for g in body["frames"])
    schemas.validate("telemetry", body)
    validate_telemetry(body)


def _broken():
    def cut_column(b):
        b["signals"][0]["v"].pop()                      # columns of unequal length
    def both_forms(b):
        b["frames"][0]["t"] = list(b["frames"][0]["dt"])  # t and dt together
    def neither_form(b):
        del b["frames"][0]["dt"]
    def negative_step(b):
        b["frames"][0]["dt"][1] = -1
    def standard_id_too_big(b):
        b["frames"][0]["id"][0] = 0x800
    def long_data(b):
        b["frames"][0]["data"][0] = bytes(65)
    def nan_value(b):
        b["signals"][0]["v"][2] = float("nan")
    def bad_latitude(b):
        b["positions"] = {"t": [0], "lat": [91.0], "lon": [0.0], "speed": [0.0], "course": [0.0]}
    return [cut_column, both_forms, neither_form, negative_step, standard_id_too_big, long_data,
            nan_value, bad_latitude]


@pytest.mark.parametrize("breaks", _broken(), ids=lambda f: f.__name__)
def test_a_broken_body_is_refused(breaks):
    body = copy.deepcopy(_body("dt"))
    breaks(body)
    with pytest.raises(schemas.SchemaError):
        validate_telemetry(body)
