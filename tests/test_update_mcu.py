"""MCU firmware through the same TUF path: the Updater downloads and verifies the image from
the HTTPS repository, firmware_bridge.McuLink flashes it into the MCU simulator (two slots,
commit only after the handshake with the new firmware) over a real pty."""
from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.cloud import schemas
from agent.update import state
from agent.update.updater import UpdateSettings, Updater
from firmware_bridge.link import McuLink
from firmware_bridge.messages import MsgType
from scripts.testbed.devca import DevCA
from firmware_bridge.sim import McuSimulator, make_image
from scripts.refcloud.release import MCU_HW, ReleaseRepo
from scripts.testbed.tuf_server import TufServer
from tests.support.updates import opened

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def world(tmp_path: Path):
    fw_key = Ed25519PrivateKey.generate()      # the MCU firmware key (the MCU holds its public half)
    repo = ReleaseRepo.init(tmp_path / "repo", tmp_path / "keys")
    repo.add_mcu_release("2.0.0", 5, make_image("2.0.0", 6000, seed=2), fw_key)
    repo.add_mcu_release("2.0.1", 6, make_image("2.0.1", 6000, healthy=False, seed=3), fw_key)
    repo.add_mcu_release("2.0.2", 7, make_image("2.0.2", 6000, seed=4), fw_key,
                         hardware_ids=["other-mcu"])
    repo.publish()
    ca = DevCA(tmp_path / "pki")
    sim = McuSimulator(fw_key.public_key(), version="1.0.0", reboot_s=0.05).start()
    link = McuLink(sim.port, on_event=lambda e: None, timeout_s=0.3, retries=5, chunk_size=192)
    link.open()
    with TufServer(repo.repo, ca) as srv:
        events: list[dict] = []

        def emit(body: dict) -> None:
            schemas.validate("event", body)
            events.append(body)

        up = Updater(UpdateSettings(root=tmp_path / "opt", work_dir=tmp_path / "work",
                                    tuf_root=repo.root_path,
                                    metadata_dir=tmp_path / "meta", ca_file=ca.ca_cert_path,
                                    max_rate_kib_s=0, mcu_trial_s=2),
                     emit_event=emit, parked=lambda: True, supply_v=lambda: 12.5,
                     mcu=lambda: link, clock_synced=lambda: True)
        yield up, sim, srv, events
    link.close()
    sim.stop()


def _release(srv: TufServer, version: str, counter: int) -> dict:
    return {"component": "mcu", "version": version, "release_counter": counter,
            "repository": srv.url, "target": f"mcu/{version}/firmware.bin",
            "conditions": {"parked": True, "min_supply_v": 11.5}}


def test_mcu_update_through_tuf(world) -> None:
    up, sim, srv, events = world
    assert up.handle_release(opened(_release(srv, "2.0.0", 5))).status == "accepted"
    assert up.step() == ["mcu:good"]
    assert sim.version == "2.0.0" and sim.active_slot == 1
    assert sim.fw_state.label == "committed"
    assert [e["state"] for e in events if "bytes_done" not in e] == \
        ["downloading", "installed", "good"]
    st = state.load_work(up.layout)
    assert st["mcu"]["release_counter"] == 5 and st["mcu"]["version"] == "2.0.0"
    out = up.handle_release(opened(_release(srv, "2.0.0", 5), 2))
    assert out.status == "rejected" and out.reason.startswith("stale_counter")


def test_mcu_image_that_never_confirms_rolls_back(world) -> None:
    up, sim, srv, events = world
    up.handle_release(opened(_release(srv, "2.0.1", 6)))
    assert up.step() == ["mcu:rolled_back"]
    assert sim.version == "1.0.0"
    [rb] = [e for e in events if e["state"] == "rolled_back"]
    assert rb["component"] == "mcu" and "rolled back" in rb["reason"]
    assert state.load_work(up.layout)["mcu"]["blocked_counter"] == 6
    out = up.handle_release(opened(_release(srv, "2.0.1", 6), 2))
    assert out.status == "rejected" and out.reason.startswith("blocked_counter")


def test_mcu_image_for_another_board_is_rejected(world) -> None:
    up, sim, srv, events = world
    up.handle_release(opened(_release(srv, "2.0.2", 7)))
    assert up.step() == ["mcu:rejected (wrong_hardware)"]
    assert sim.version == "1.0.0" and not sim.received(MsgType.FW_BEGIN)  # nothing was sent
    assert MCU_HW in [e for e in events if e["state"] == "rejected"][0]["reason"]
