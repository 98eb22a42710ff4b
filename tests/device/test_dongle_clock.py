"""A boot with the clock months behind, as a Pi without RTC gets from fake-hwclock: the VM's RTC
(``-rtc base=``) is set 180 days back, later than systemd's build time so systemd leaves it. The
kernel says the clock is unsynchronised (no NTP answer can reach the guest), so the agent stamps
provisionally, seals nothing with the stale time, and checks downlink expiry against the floor it
persisted on the earlier boot: an envelope that expired an hour ago (valid by the stale clock) is
refused. Then the clock is synchronised as systemd-timesyncd does it (tests/device/dongle.py,
``DongleVM.timesync``) and what was taken meanwhile reaches the cloud with true times."""
from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone

import pytest

from agent.cloud import protocol
from scripts.testbed.wait import wait_until
from tests.device.conftest import ARCH
from tests.device.dongle import DongleVM, make_dongle, obd_toml, online

pytestmark = [pytest.mark.device, pytest.mark.timeout(3600)]

DEV = f"clock-{ARCH}"
BEHIND = timedelta(days=180)
CONFIG = {"version": 1, "upload": {"interval_s": 2},
          "obd": {"pids": [{"name": "engine.rpm", "pid": "RPM", "period_s": 1}], "dtc_period_s": 600},
          "can": {"signals": [], "raw": {"enabled": False, "ids": []}}}


@pytest.fixture(scope="module")
def dongle(devicevm_image, installed, tmp_path_factory, elm):
    with make_dongle(devicevm_image, installed, tmp_path_factory, DEV, serials={"elm": elm.port}) as (d, cloud):
        d.provision(toml=obd_toml(d))
        cloud.console.publish(DEV, "config", CONFIG)
        d.start()
        yield d


def _rpm(cloud) -> list[tuple[int, int]]:
    """(seq, sample time in ms) of every engine.rpm sample at the cloud."""
    out = []
    for r in cloud.records(DEV, "telemetry"):
        for s in r["body"].get("signals", ()):
            if s["name"] == "engine.rpm":
                out += [(r["seq"], r["body"]["t0"] + t) for t in s["t"]]
    return out


def test_a_stale_clock_stamps_nothing_with_its_time_and_opens_no_replay_window(dongle: DongleVM):
    cloud, vm = dongle.cloud, dongle.vm
    # first boot, synchronised: the agent runs, takes the retained config (its signed ts raises
    # the floor, which the store persists)
    assert dongle.wait(online(cloud, DEV), 240, "online")
    assert dongle.wait(lambda: _rpm(cloud), 240, "telemetry")
    assert dongle.status()["config_version"] == 1
    floor = dongle.status()["clock"]["floor_ms"]
    assert floor >= int(time.time() * 1000) - 3_600_000
    dongle.sh("systemctl stop dongle-agent", 120)   # its last true time saved
    vm.shutdown()

    # the next boot with the RTC 180 days behind: systemd and the agent start on a stale clock
    stale = datetime.now(timezone.utc) - BEHIND
    vm.qemu_args = ["-rtc", f"base={stale.strftime('%Y-%m-%dT%H:%M:%S')}"]
    boot_true_ms = int(time.time() * 1000)
    dongle.boot(timesync=False)
    guest_now = int(dongle.sh("date +%s")) * 1000
    assert guest_now < boot_true_ms - (BEHIND - timedelta(days=1)).total_seconds() * 1000
    assert dongle.sh("timedatectl show -p NTPSynchronized --value").strip() == "no"
    dongle.wait_active(300)
    dongle.wait(lambda: dongle.status()["obd"]["connected"], 240, "OBD connected")
    st = dongle.status()
    assert st["clock"]["synced"] is False and st["clock"]["kernel_synced"] is False
    assert st["clock"]["floor_ms"] >= floor   # the floor survived the reboot

    # a captured config: sealed two hours ago, expired an hour ago; by the stale clock it is
    # valid for months to come
    true_ms = int(time.time() * 1000)
    seq = cloud.console.ledger.next_down_seq(DEV)
    env = protocol.seal("config", dict(CONFIG, version=2), dev=DEV, seq=seq, signer=cloud.console.sign_key,
                        recipient=cloud.console.registry.get(DEV)[1], ts_ms=true_ms - 7_200_000,
                        exp_ms=true_ms - 3_600_000)
    assert guest_now < true_ms - 7_200_000 < true_ms - 3_600_000   # stale now < ts < exp
    cloud.console.publish_raw(DEV, "down/config", env)
    ack = cloud.console.wait_for(lambda r: r.get("kind") == "ack" and r["dev"] == DEV
                                 and r["body"]["ref_seq"] == seq, 240)
    assert ack, "no ack for the expired config"
    assert ack["body"]["status"] == "rejected" and ack["body"]["reason"].startswith("expired"), ack["body"]
    assert dongle.status()["config_version"] == 1

    # data taken while stale is held, not sent with stale times; synchronising releases it
    dongle.wait(lambda: dongle.status()["ingest"]["stored"]["samples"] > 5, 240, "samples stored while stale")
    sent_before_sync = {s for s, _ in _rpm(cloud)}
    dongle.timesync()
    sync_true_ms = int(time.time() * 1000)
    assert wait_until(lambda: any(s not in sent_before_sync for s, _ in _rpm(cloud)), 240,
                      what="telemetry after the sync")
    assert wait_until(lambda: any(boot_true_ms - 60_000 <= t <= sync_true_ms for s, t in _rpm(cloud)
                                  if s not in sent_before_sync), 240, what="the samples taken while stale")
    after = [t for s, t in _rpm(cloud) if s not in sent_before_sync]
    stale_era = [t for t in after if t < boot_true_ms - 86_400_000]
    assert not stale_era, f"{len(stale_era)} samples stamped with the stale clock"
    taken_while_stale = [t for t in after if t <= sync_true_ms]
    assert min(taken_while_stale) >= boot_true_ms - 60_000
    assert dongle.status()["clock"]["synced"] is True
    print(f"\nclock: {len(taken_while_stale)} samples taken while the clock was {BEHIND.days} days behind reached "
          f"the cloud with true times ({(min(taken_while_stale) - boot_true_ms) / 1000:+.0f} s .. "
          f"{(max(taken_while_stale) - boot_true_ms) / 1000:+.0f} s from the boot); the expired config refused")
