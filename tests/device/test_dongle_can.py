"""SocketCAN under systemd: the installed agent reads vcan0 in the device VM with kernel
acceptance filters (python-can ``can_filters`` from the config), so frames of ids nobody
configured never reach Python, and every configured frame sent reaches the cloud.

Counted three ways: what the senders sent; what the kernel's CAN core handed to the agent's
socket (/proc/net/can/rcvlist_*, per filter; a full socket queue would drop after that); what the
agent read (``dongle status``: frames, drops) and what the cloud received (the reference console,
once per (dev, seq)). RATE_HZ is the rate this test holds the VM to; bench/bench_devicevm_can.py
measures higher ones (docs/performance.md)."""
from __future__ import annotations

import json
import time

import pytest

from scripts.testbed.wait import wait_until
from tests.device.conftest import ARCH
from tests.device.dongle import (COUNTER_ID, GUEST_DBC, DongleVM, add_vcan, counted, kernel_matches, make_dongle,
                                 online, start_counter, stop_counter)

pytestmark = [pytest.mark.device, pytest.mark.timeout(3600)]

DEV = f"can-{ARCH}"
#: numbered frames of the one configured raw id. The agent in the TCG guest on this 2-core host
#: reads about 1,500 frames/s at most: at 2,000/s its socket dropped 26 % (counted in status,
#: socket_drops); docs/performance.md, "Device VM".
RATE_HZ = 500
NOISE_HZ = 1000            # frames of ids nobody configured (cangen)
SECONDS = 20
CONFIG = {"version": 1, "upload": {"interval_s": 1},
          "obd": {"pids": [], "dtc_period_s": 600},
          "can": {"signals": [{"name": "wheel.fl", "message": "WHEEL_SPEEDS", "signal": "WHEEL_SPEED_FL",
                               "period_s": 0.1}],
                  "raw": {"enabled": True, "ids": [COUNTER_ID]}}}


@pytest.fixture(scope="module")
def dongle(devicevm_image, installed, tmp_path_factory):
    with make_dongle(devicevm_image, installed, tmp_path_factory, DEV) as (d, cloud):
        add_vcan(d)
        bus = f'\n[[can.buses]]\nname = "vcan0"\ninterface = "socketcan"\nchannel = "vcan0"\ndbc = "{GUEST_DBC}"\n'
        d.provision(extra_toml=bus)
        cloud.console.publish(DEV, "config", CONFIG)
        d.start()
        assert wait_until(online(cloud, DEV), 240, what="online")
        # the config is in force once the filters follow it (python-can can_filters on the socket)
        assert wait_until(lambda: d.status()["config_version"] == 1, 240, what="config v1 applied")
        yield d


def _agent_socket_filters(d: DongleVM) -> dict[str, list[tuple[int, int]]]:
    """Each raw socket's filters on vcan0: userdata -> [(can_id, mask)]."""
    out: dict[str, list[tuple[int, int]]] = {}
    text = d.sh("cat /proc/net/can/rcvlist_sff /proc/net/can/rcvlist_fil /proc/net/can/rcvlist_all")
    for line in text.splitlines():
        f = line.split()
        if len(f) == 7 and f[0] == "vcan0" and f[6] == "raw":
            out.setdefault(f[4], []).append((int(f[1], 16), int(f[2], 16)))
    return out


def test_the_kernel_filters_unconfigured_ids_and_no_configured_frame_is_lost(dongle: DongleVM):
    cloud = dongle.cloud
    filters = _agent_socket_filters(dongle)
    (sock, flist), = filters.items()   # the agent's is the only receiving raw socket on vcan0
    ids = sorted(cid & 0x1FFFFFFF for cid, _ in flist)
    assert COUNTER_ID in ids and 0xAA in ids   # the raw id and WHEEL_SPEEDS' message
    assert 0x123 not in ids and all(mask & 0x7FF == 0x7FF for _, mask in flist), flist   # no catch-all
    before = dongle.status()["can"]["buses"]["vcan0"]
    dongle.sh(f"systemd-run --unit=can-noise cangen vcan0 -I 123 -L 8 -D i -g {1000 / NOISE_HZ:g}")
    start_counter(dongle, 1, RATE_HZ)
    try:
        assert wait_until(lambda: any(k[0] == 1 for k in counted(cloud, DEV)), 240, interval=1.0, what="frames at the cloud")
        time.sleep(SECONDS)   # the load runs for a while; what counts is what is counted below
    finally:
        sent = stop_counter(dongle)
        dongle.sh("systemctl stop can-noise")
    tx = json.loads(dongle.sh("ip -s -j link show vcan0"))[0]["stats64"]["tx"]["packets"]
    try:
        wait_until(lambda: (1, sent - 1) in counted(cloud, DEV), 240, interval=1.0,
                   what="the last numbered frame at the cloud")
    except AssertionError:
        pass   # said below, with where the frames went
    got = counted(cloud, DEV)
    kernel = kernel_matches(dongle, COUNTER_ID)[sock]
    st = dongle.status()["can"]["buses"]["vcan0"]
    read = st["frames"] - before["frames"]
    missing = sorted(set(range(sent)) - {n for (r, n) in got if r == 1})
    assert not missing, (
        f"{len(missing)} of {sent} numbered frames never reached the cloud (first {missing[:3]}, last "
        f"{missing[-3:]}); the kernel matched {kernel} for the agent's socket, the agent read {read}, "
        f"dropped {st['drops'] - before['drops']} (socket {st.get('socket_drops')}, queue {st.get('queue_drops')}); "
        f"buffer {dongle.status()['buffer']}")
    assert all(len(v) == 1 for v in got.values())
    assert kernel == sent                   # the kernel handed every one to the agent's socket ...
    assert read == sent, (read, sent)       # ... the agent read exactly those: no 0x123 frame reached Python
    assert st["drops"] == before["drops"]
    achieved = sent / max(1e-9, (max(max(v) for v in got.values()) - min(min(v) for v in got.values())) / 1e6)
    print(f"\n{ARCH} vcan0: {sent} numbered frames at {achieved:.0f}/s (asked {RATE_HZ}) plus id 0x123 noise "
          f"(vcan0 tx {tx} frames in all): kernel matched {kernel} for the agent, agent read {read}, "
          f"dropped {st['drops'] - before['drops']}, cloud {len(got)}")
