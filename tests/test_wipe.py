"""``dongle export`` and ``dongle wipe`` on a device that collected real positions (gpsfake) and saw a
VIN, with a real broker and the reference console; the wipe runs through the real control socket
and the real button driver (drivers/gpio.py on gpiozero's MockFactory)."""
from __future__ import annotations

import argparse
import json
import struct
import threading
import time
from pathlib import Path

import pytest
from gpiozero.pins.mock import MockFactory

from agent.cli import owner as owner_cli
from agent.compose import build
from agent.cloud.keys import KeyFileError
from agent.settings import SettingsError
from agent.owner.location import TABLE
from drivers.core.model import Sample
from scripts.refcloud.console import Registry
from scripts.testbed.gps import needs_gpsd, reference_rows
from tests.support.privacy import agent_settings, config, consent, events, make_agent
from scripts.testbed.wait import wait_until

pytestmark = needs_gpsd

DEV = "wipe-0001"
VIN = "JTMBFREV0JJ012345"   # a RAV4-shaped VIN for the test


def _cli_toml(toml: Path, sock: Path) -> Path:
    """The device's agent.toml as the CLI reads it, with the control socket the test agent uses."""
    out = toml.parent / "cli.toml"
    text = toml.read_text().replace('socket = "agent.sock"', f'socket = "{sock}"')
    assert f'socket = "{sock}"' in text
    out.write_text(text)
    return out


def _needles() -> list[bytes]:
    """Byte patterns a copy of a position or the VIN would leave: coordinates as text with at least
    4 decimals (rounded and as written) and as little/big-endian doubles, and the VIN."""
    out = [VIN.encode()]
    for r in reference_rows():
        for v in (float(r["lat_deg"]), float(r["lon_deg"])):
            out += [f"{v:.4f}".encode(), r["lat_deg"][:8].encode(), struct.pack("<d", v), struct.pack(">d", v)]
    return out


def _scan(directory: Path) -> list[str]:
    hits = []
    needles = _needles()
    for p in directory.rglob("*"):
        if p.is_file():
            data = p.read_bytes()
            hits += [f"{p.name}: {n!r}" for n in needles if n in data]
    return hits


def test_the_scan_finds_what_it_looks_for(tmp_path):
    lat = float(reference_rows()[3]["lat_deg"])
    (tmp_path / "a").write_bytes(b"x" + struct.pack("<d", lat) + b"y")
    (tmp_path / "b").write_text(f"vin={VIN}")
    assert len(_scan(tmp_path)) == 2


def test_export_and_wipe(fleet, gps, tmp_path):
    c = fleet.console
    sock_dir = tmp_path / "ctl"
    agent = make_agent(fleet, DEV, gpsd_port=gps.port, sock_dir=sock_dir)
    toml = agent.settings.path
    data_dir = agent.settings.data_dir
    stopped = threading.Event()
    agent.owner_data.request_shutdown = lambda: (agent.stop(), stopped.set())
    io = owner_data_button(agent)
    agent.start()
    try:
        assert c.wait_for(lambda r: r.get("dev") == DEV and r.get("topic") == "status"
                          and r["status"].get("state") == "online", 60)
        agent.identity.on_vehicle({"vin": VIN, "protocol": "ISO 15765-4 (CAN 11/500)", "ecus": ["7E8"]})
        agent.ingest.put_samples([Sample("engine.rpm", "rpm", int(time.time() * 1000), 800.0)])
        c.publish(DEV, "config", config(1, location=consent("precise"), interval_s=30))
        assert wait_until(lambda: agent.location.pending() >= 3, 60), agent.status()["owner_data"]

        # -- export: everything held, as JSON Lines -----------------------------------------
        out = tmp_path / "export.jsonl"
        args = argparse.Namespace(config=str(_cli_toml(toml, sock_dir / "ctl.sock")), out=str(out), json=True)
        assert owner_cli.cmd_export(args) == 0
        recs = [json.loads(line) for line in out.read_text().splitlines()]
        assert recs[0]["record"] == "export" and recs[0]["device_id"] == DEV
        kinds = {r["record"] for r in recs}
        assert {TABLE, "meta", "configs"} <= kinds
        pos = [r for r in recs if r["record"] == TABLE]
        assert pos and all(-123 < p["lon"] < -122 and 37 < p["lat"] < 38 for p in pos), pos[:2]
        assert any(r["record"] == "meta" and r["key"] == "vehicle" and r["value"].get("vin") == VIN for r in recs)
        assert oct(out.stat().st_mode & 0o777) == "0o600"

        # -- wipe: terminal, button, device_wiped, keys, data --------------------------------
        sign_key = (toml.parent / "device_sign.key").read_bytes()
        pressed = threading.Thread(target=_press_when_asked, args=(io,), daemon=True)
        pressed.start()
        wargs = argparse.Namespace(config=args.config, json=True, by="new owner handover")
        refused = owner_cli.wipe_cli(wargs, ask=lambda prompt: "not-the-id")
        assert refused == 1 and (toml.parent / "device_sign.key").exists(), "a wrong answer must wipe nothing"
        assert owner_cli.wipe_cli(wargs, ask=lambda prompt: DEV) == 0
        assert stopped.wait(30)
    finally:
        if not stopped.is_set():
            agent.stop()
        io.close()

    wiped = events(c, DEV, "device_wiped")
    assert wiped and wiped[0]["by"] == "new owner handover"
    # Not one byte of a position or of the VIN anywhere in the data directory.
    assert _scan(data_dir) == []
    assert not (data_dir / "data.key").exists()
    for name in ("device_sign.key", "device_enc.key", "tls.key", "tls.crt", "registration.json"):
        assert not (toml.parent / name).exists(), name
    # The wiped device cannot start (no keys), so it cannot reach the broker (no TLS key).
    with pytest.raises((SettingsError, KeyFileError)):
        build(agent_settings(toml, gpsd_port=gps.port, sock_dir=sock_dir))
    # The console no longer knows it: its registration is gone; an envelope signed with a copy
    # of the old key is refused.
    assert Registry(fleet.run_dir / "devices").get(DEV) is None
    if hasattr(Registry, "drop"):
        assert c.registry.get(DEV) is None, "the console still trusts the wiped device's key"

    # Provisioned again: a new identity, accepted, and the seq counter continues (no reuse).
    last_seq = max(r["seq"] for r in c.records if r.get("dev") == DEV and "seq" in r)
    c.registry.forget(DEV)
    agent2 = make_agent(fleet, DEV, gpsd_port=gps.port, sock_dir=sock_dir)
    assert (toml.parent / "device_sign.key").read_bytes() != sign_key
    agent2.start()
    try:
        assert agent2.privacy.mode("location") == "off", "consents were wiped"
        agent2.emit_event({"type": "health", "ts": int(time.time() * 1000), "kind": "snapshot", "level": "info",
                           "detail": {}})
        rec = c.wait_for(lambda r: r.get("dev") == DEV and r.get("seq", 0) > last_seq, 60)
        assert rec and not rec["duplicate"] and "rejected" not in rec
    finally:
        agent2.stop()


def owner_data_button(agent):
    from drivers.gpio import DongleIO

    io = DongleIO({"button": 26}, pin_factory=MockFactory())
    agent.owner_data.confirm_by_button = io.wait_for_press
    return io


def _press_when_asked(io, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if io._waiters:     # the agent waits for a press
            io.button.pin.drive_low()
            io.button.pin.drive_high()
            return
        time.sleep(0.05)


def test_vehicle_pseudonym_is_stable_keyed_and_gone_with_the_key(tmp_path):
    from agent.owner.datakey import DataKey
    key = DataKey.in_dir(tmp_path)
    a = key.pseudonym(VIN)
    assert a == key.pseudonym(VIN) and VIN not in a and a != key.pseudonym(VIN[:-1] + "X")
    assert DataKey.in_dir(tmp_path).pseudonym(VIN) == a        # the same key: the same stand-in
    assert DataKey.in_dir(tmp_path / "other").pseudonym(VIN) != a  # another device's key: unlinkable
