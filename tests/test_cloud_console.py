"""The reference backend: dedup on (dev, seq) per console, gaps and gaps explained by
evictions, and what a person reads (explanations once, numbers at their signal's resolution)."""
from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

from agent.cloud import keys, protocol
from scripts.refcloud.console import (EXPLAIN_DUPLICATE, EXPLAIN_DUPLICATE_ACK, CloudConsole, Ledger, Screen,
                                      _safe, format_record)


def test_dedup_gaps_and_explained_evictions(tmp_path):
    led = Ledger(tmp_path / "c.db")
    for s in (1, 2, 5, 9):
        assert led.first_time("d-1", s, "telemetry")
    assert not led.first_time("d-1", 5, "telemetry")
    assert led.missing("d-1") == [3, 4, 6, 7, 8]
    led.record_eviction("d-1", 6, 8)
    assert led.missing("d-1") == [3, 4]
    assert led.missing("other") == []
    assert led.next_down_seq("d-1") == 1 and led.next_down_seq("d-1") == 2
    # Persisted across console restarts.
    led2 = Ledger(tmp_path / "c.db")
    assert not led2.first_time("d-1", 9, "telemetry") and led2.next_down_seq("d-1") == 3


def test_each_console_has_its_own_dedup_state_and_one_downlink_seq(tmp_path):
    demo, release = Ledger(tmp_path / "c.db", "demo"), Ledger(tmp_path / "c.db", "release")
    assert demo.first_time("d-1", 7, "event")
    assert release.first_time("d-1", 7, "event")       # the other console has not shown it
    assert not demo.first_time("d-1", 7, "event") and not release.first_time("d-1", 7, "event")
    assert release.missing("d-1") == list(range(1, 7)) and release.devices() == ["d-1"]
    # the downlink seq is the run directory's, whichever console sends
    assert demo.next_down_seq("d-1") == 1 and release.next_down_seq("d-1") == 2


def test_untrusted_text_is_escaped_for_the_terminal():
    assert _safe("ok\x1b[31mred\x07") == "ok\\x1b[31mred\\x07"
    rec = {"dev": "d-1", "kind": "event", "seq": 4, "duplicate": False,
           "body": {"type": "booking\x1b[2J", "ts": 1, "booking_id": "x\ny"}}
    line = format_record(rec)
    assert "\x1b" not in line and "\n" not in line


def _telemetry(name, unit, v, seq=3):
    return {"dev": "d-1", "kind": "telemetry", "seq": seq, "duplicate": False,
            "body": {"t0": 1, "signals": [{"name": name, "unit": unit, "t": [0], "v": [v]}]}}


@pytest.mark.parametrize("name, unit, value, res, shown", [
    ("engine.load", "%", 33.72549019607843, 100 / 255, "engine.load=33.7%"),
    ("can.wheel_speed_fl", "km/h", 50.599999999999994, 0.01, "can.wheel_speed_fl=50.6km/h"),
    ("engine.rpm", "rpm", 1303.75, 0.25, "engine.rpm=1303.75rpm"),
    ("engine.rpm", "rpm", 750.0, 0.25, "engine.rpm=750.00rpm"),
    ("can.steer_angle", "deg", -1.5, 1.5, "can.steer_angle=-1.5deg"),
    ("ecu.voltage", "V", 14.185000000000002, 0.001, "ecu.voltage=14.185V"),
    ("other", "", 1 / 3, None, "other=0.333333"),
])
def test_telemetry_is_shown_at_the_signals_resolution(name, unit, value, res, shown):
    line = format_record(_telemetry(name, unit, value), {name: res} if res else None)
    assert line.endswith(f"telemetry  {shown} (n=1)")


def test_a_trip_start_says_when_and_that_the_odometer_is_unknown():
    rec = {"dev": "d-1", "kind": "event", "seq": 6, "duplicate": False,
           "body": {"type": "trip_start", "ts": 1_750_000_000_000}}
    line = format_record(rec)
    assert "event trip_start at " in line and line.endswith("(odometer unknown)") and "{}" not in line
    rec["body"]["odometer_km"] = 25088.6
    assert format_record(rec).endswith('{"odometer_km": 25088.6}')


def test_a_dtc_event_reads_as_codes_mil_and_freeze_frame():
    rec = {"dev": "d-1", "kind": "event", "seq": 8, "duplicate": False, "body": {
        "type": "dtc", "ts": 1, "mil": True,
        "codes": [{"code": "P0301", "state": "stored", "desc": "Cylinder 1 Misfire Detected"},
                  {"code": "P0301", "state": "permanent", "desc": "Cylinder 1 Misfire Detected"}],
        "freeze": {"code": "P0301", "values": {"RPM": {"value": 1174.5, "unit": "rpm"},
                                               "ENGINE_LOAD": {"value": 22.352941176470587, "unit": "%"}}}}}
    assert format_record(rec).endswith(
        "event dtc: MIL on; P0301 stored, permanent (Cylinder 1 Misfire Detected); "
        "freeze frame (P0301): RPM=1174.5rpm ENGINE_LOAD=22.4%")


def test_duplicates_and_duplicate_acks_are_explained_once_per_console():
    dup = {"dev": "d-1", "kind": "event", "seq": 4, "duplicate": True, "body": {"type": "vehicle", "ts": 1}}
    ack = {"dev": "d-1", "kind": "ack", "seq": 5, "duplicate": False,
           "body": {"ref_kind": "config", "ref_seq": 1, "status": "duplicate"}}
    screen = Screen()
    assert screen.lines(dup)[:-1] == [EXPLAIN_DUPLICATE] and screen.lines(dup)[:-1] == []
    assert screen.lines(dup)[-1].endswith("(duplicate, ignored)")
    assert screen.lines(ack)[:-1] == [EXPLAIN_DUPLICATE_ACK] and screen.lines(ack)[:-1] == []
    assert Screen().lines(ack)[:-1] == [EXPLAIN_DUPLICATE_ACK]   # another console: its own


def test_an_envelope_sent_again_is_a_duplicate_only_to_the_console_that_showed_it(fleet):
    """Real envelopes of a provisioned device, opened by two consoles on one run directory (the
    demo's and the release tool's): each shows the first copy as new."""
    fleet.device("dev-0001")
    ddir, cloud = fleet.run_dir / "devices" / "dev-0001", fleet.run_dir / "cloud"
    signer = keys.load_private_key(ddir / "device_sign.key", Ed25519PrivateKey)
    recipient = keys.load_public_key(cloud / "cloud_enc.pub", X25519PublicKey)
    env = protocol.seal("event", {"type": "vehicle", "ts": 1, "vin_valid": False, "protocol": "x", "ecus": []},
                        dev="dev-0001", seq=1, signer=signer, recipient=recipient)
    shown: dict[str, list[str]] = {"demo": [], "release": []}
    consoles = {n: CloudConsole(fleet.run_dir, name=n, on_line=shown[n].append) for n in shown}
    consoles["demo"].handle("dev-0001", "up/event", env)
    consoles["release"].handle("dev-0001", "up/event", env)
    assert [len(v) for v in shown.values()] == [1, 1]
    assert not any("duplicate" in line for v in shown.values() for line in v)
    consoles["demo"].handle("dev-0001", "up/event", env)      # QoS 1 sent it again
    assert shown["demo"][1:] == [EXPLAIN_DUPLICATE, shown["demo"][0] + " (duplicate, ignored)"]


def test_a_report_snapshot_reads_as_trips_starts_battery_and_codes():
    rec = {"dev": "d-1", "kind": "event", "seq": 9, "duplicate": False, "body": {
        "type": "health", "ts": 1, "kind": "snapshot", "level": "info", "detail": {
            "agent": "0.1.0", "health": {
                "trip": {"in_trip": True, "trips": 1, "current": {}, "last": {}}, "engine_starts": 2,
                "odometer_km": None,
                "battery_12v": {"ts": 1_750_000_000_000, "rest_v": None, "crank_min_v": 10.1, "level": "ok"},
                "maintenance": [{"kind": "oil_change", "level": "unknown"}],
                "dtc": {"codes": [{"code": "P0301", "state": "stored"}], "mil": True, "severity": "warn"}}}}}
    line = format_record(rec)
    assert "event health snapshot: trips 1 (in a trip); engine starts 2; last start " in line
    assert line.endswith(": cranking 10.10 V (ok); odometer unknown; trouble codes P0301 stored (warn); "
                         "oil_change unknown")
