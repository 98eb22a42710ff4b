"""python-can's ``socketcan`` interface against the real kernel CAN stack on a vcan interface.

Only meaningful inside the CAN VM (``make test-socketcan``); skipped elsewhere (see conftest.py).
What the agent relies on and a virtual python-can bus cannot show: frames round-trip through the
kernel unchanged, acceptance filters run in the kernel (so a busy bus cannot flood the agent's
socket), error frames reach the agent, the kernel's broadcast manager sends periodic frames,
can-utils interoperate, and a bus that goes down surfaces as an exception rather than a hang.
"""
from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import sys
import time
import uuid

import can
import pytest

from .conftest import open_bus

RECV_TIMEOUT = 5.0  # generous: the VM shares a loaded 2-core machine


def recv_all(bus: can.BusABC, idle: float = 0.2) -> list[can.Message]:
    """Everything already queued for ``bus``, until it has been quiet for ``idle`` seconds."""
    out = []
    while (m := bus.recv(idle)) is not None:
        out.append(m)
    return out


def test_roundtrip_standard_and_extended(channel, tx, rx):
    sent = []
    for i in range(200):
        ext = i % 2 == 1
        arb = (0x18DAF100 | (i & 0xFF)) if ext else (0x700 | (i & 0x7F))
        m = can.Message(arbitration_id=arb, is_extended_id=ext, data=bytes([i & 0xFF] * (i % 9)))
        tx.send(m)
        sent.append(m)
        got = rx.recv(RECV_TIMEOUT)  # in step: vcan has no flow control
        assert got is not None, f"frame {i} not received"
        assert (got.arbitration_id, got.is_extended_id, bytes(got.data), got.dlc) == (
            m.arbitration_id, m.is_extended_id, bytes(m.data), len(m.data))
        assert got.channel == channel
        assert not got.is_error_frame and not got.is_remote_frame


def test_kernel_stamps_monotonic_timestamps(tx, rx):
    stamps = []
    for i in range(50):
        tx.send(can.Message(arbitration_id=0x123, is_extended_id=False, data=[i]))
        stamps.append(rx.recv(RECV_TIMEOUT).timestamp)
    assert stamps == sorted(stamps)
    # the kernel stamps wall-clock time (SO_TIMESTAMP), which the agent's clock also uses
    assert abs(stamps[-1] - time.time()) < 3600


def test_remote_frame(tx, rx):
    tx.send(can.Message(arbitration_id=0x7DF, is_extended_id=False, is_remote_frame=True, dlc=8))
    got = rx.recv(RECV_TIMEOUT)
    assert got is not None and got.is_remote_frame and got.dlc == 8 and got.arbitration_id == 0x7DF


def test_sender_does_not_receive_its_own_frames(tx, rx):
    tx.send(can.Message(arbitration_id=0x100, is_extended_id=False, data=b"\x01"))
    assert rx.recv(RECV_TIMEOUT) is not None
    assert tx.recv(0.2) is None


def test_filters_are_installed_in_the_kernel(channel, tx):
    filters = [
        {"can_id": 0x7E8, "can_mask": 0x7F8, "extended": False},       # OBD responses 7E8-7EF
        {"can_id": 0x18DAF100, "can_mask": 0x1FFFFF00, "extended": True},
    ]
    rx = open_bus(channel, can_filters=filters)
    try:
        raw = rx.socket.getsockopt(socket.SOL_CAN_RAW, socket.CAN_RAW_FILTER, 8 * 8)
        pairs = [struct.unpack_from("=II", raw, off) for off in range(0, len(raw), 8)]
        ids = [cid & socket.CAN_EFF_MASK for cid, _ in pairs]
        assert ids == [0x7E8, 0x18DAF100]

        for arb, ext in [(0x100, False), (0x7E9, False), (0x7E8, True), (0x18DAF1AA, True),
                         (0x18DB33F1, True), (0x7F0, False)]:
            tx.send(can.Message(arbitration_id=arb, is_extended_id=ext, data=b"\x00"))
        got = [(m.arbitration_id, m.is_extended_id) for m in recv_all(rx, idle=0.5)]
        assert got == [(0x7E9, False), (0x18DAF1AA, True)]
    finally:
        rx.shutdown()


def test_kernel_filter_protects_a_busy_bus(channel, tx):
    """Non-matching traffic never reaches a filtered socket's receive buffer.

    A flood far larger than a socket buffer overflows an unfiltered socket (frames are lost,
    vcan has no flow control), while the filtered socket still gets the one frame it wants.
    """
    wanted = can.Message(arbitration_id=0x7E8, is_extended_id=False, data=b"\x02\x41\x0c")
    flt = open_bus(channel, can_filters=[{"can_id": 0x7E8, "can_mask": 0x7FF, "extended": False}])
    unfiltered = open_bus(channel)
    flood = 5000
    try:
        noise = can.Message(arbitration_id=0x123, is_extended_id=False, data=bytes(8))
        for _ in range(flood):
            tx.send(noise)
        tx.send(wanted)
        got = recv_all(flt, idle=0.5)
        assert [(m.arbitration_id, bytes(m.data)) for m in got] == [(0x7E8, b"\x02\x41\x0c")]
        # the control: without the kernel filter, the same traffic overflowed the buffer
        seen = recv_all(unfiltered, idle=0.5)
        assert len(seen) < flood + 1, "the flood did not overflow an unfiltered socket"
    finally:
        flt.shutdown()
        unfiltered.shutdown()


def test_error_frames_reach_the_receiver(tx, rx):
    # CAN_ERR_CRTL (0x004) with data[1] = CAN_ERR_CRTL_RX_WARNING (0x04): what a real controller
    # (mcp2515 on the CAN HAT) reports as the bus degrades. python-can subscribes to all
    # error classes (CAN_RAW_ERR_FILTER) by default.
    tx.send(can.Message(arbitration_id=0x004, is_error_frame=True, is_extended_id=False,
                        data=bytes([0, 0x04, 0, 0, 0, 0, 0, 0])))
    got = rx.recv(RECV_TIMEOUT)
    assert got is not None and got.is_error_frame
    assert got.arbitration_id & 0x004 and got.data[1] == 0x04


def test_canfd_frames(channel):
    tx = open_bus(channel, fd=True)
    rx = open_bus(channel, fd=True)
    try:
        tx.send(can.Message(arbitration_id=0x123, is_extended_id=False, is_fd=True,
                            bitrate_switch=True, data=bytes(range(64))))
        got = rx.recv(RECV_TIMEOUT)
        assert got is not None and got.is_fd and got.bitrate_switch
        assert bytes(got.data) == bytes(range(64))
    finally:
        tx.shutdown()
        rx.shutdown()


def test_broadcast_manager_periodic_send(tx, rx):
    # socketcan's send_periodic is the kernel's CAN_BCM: the period is kept by the kernel
    task = tx.send_periodic(can.Message(arbitration_id=0x321, is_extended_id=False, data=b"\xaa"), 0.01)
    try:
        assert isinstance(task, can.interfaces.socketcan.CyclicSendTask)
        got = [rx.recv(RECV_TIMEOUT) for _ in range(5)]
    finally:
        task.stop()
    assert all(m is not None and m.arbitration_id == 0x321 and bytes(m.data) == b"\xaa" for m in got)


needs_can_utils = pytest.mark.skipif(
    not (shutil.which("cansend") and shutil.which("cangen") and shutil.which("candump")),
    reason="can-utils (cansend/cangen/candump) not installed; scripts/canvm/setup.sh installs it")


@needs_can_utils
def test_cansend_to_python_can(channel, rx):
    subprocess.run(["cansend", channel, "7E8#0441" + "0C1AF8"], check=True, timeout=30)
    subprocess.run(["cansend", channel, "18DAF110#1122"], check=True, timeout=30)
    got = [rx.recv(RECV_TIMEOUT) for _ in range(2)]
    assert (got[0].arbitration_id, got[0].is_extended_id, bytes(got[0].data)) == (
        0x7E8, False, bytes.fromhex("04410C1AF8"))
    assert (got[1].arbitration_id, got[1].is_extended_id, bytes(got[1].data)) == (
        0x18DAF110, True, bytes.fromhex("1122"))


@needs_can_utils
def test_cangen_burst_is_received_in_order(channel, rx):
    n = 100
    subprocess.run(["cangen", channel, "-g", "1", "-n", str(n), "-I", "42A", "-L", "2", "-D", "i"],
                   check=True, timeout=60)
    got = recv_all(rx, idle=0.5)
    assert len(got) == n
    assert {m.arbitration_id for m in got} == {0x42A}
    # -D i increments the payload: the sequence shows nothing was lost or reordered
    counters = [m.data[0] for m in got]
    assert counters == [(counters[0] + k) & 0xFF for k in range(n)]


@needs_can_utils
def test_python_can_to_candump(channel, tx):
    # candump has no "ready" signal: keep sending until it has printed one frame and exited
    dump = subprocess.Popen(["candump", "-L", "-n", "1", channel], stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while dump.poll() is None and time.monotonic() < deadline:
            tx.send(can.Message(arbitration_id=0x18DB33F1, is_extended_id=True, data=b"\x02\x01\x0c"))
            time.sleep(0.05)
        out, _ = dump.communicate(timeout=10)
    finally:
        dump.kill()
    # candump -L: "(1700000000.123456) vcan0 18DB33F1#02010C"
    assert out.split()[1:] == [channel, "18DB33F1#02010C"]


@pytest.fixture
def private_vcan(channel) -> str:
    """A vcan of this test's own, so taking it down cannot disturb the others."""
    if not shutil.which("ip"):
        pytest.skip("no `ip` (iproute2)")
    name = "vct" + uuid.uuid4().hex[:8]
    r = subprocess.run(["ip", "link", "add", "dev", name, "type", "vcan"], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot create a vcan interface here: {r.stderr.strip()}")
    subprocess.run(["ip", "link", "set", "up", name], check=True)
    yield name
    subprocess.run(["ip", "link", "del", name], check=False)


def test_interface_going_down_raises_instead_of_hanging(private_vcan):
    tx = open_bus(private_vcan)
    rx = open_bus(private_vcan)
    try:
        tx.send(can.Message(arbitration_id=0x1, is_extended_id=False, data=b"\x01"))
        assert rx.recv(RECV_TIMEOUT) is not None
        subprocess.run(["ip", "link", "set", "down", private_vcan], check=True)
        with pytest.raises(can.CanOperationError):
            tx.send(can.Message(arbitration_id=0x1, is_extended_id=False, data=b"\x02"), timeout=1.0)
        # the receiver learns of it too (ENETDOWN on the next read) rather than waiting forever
        with pytest.raises(can.CanOperationError):
            rx.recv(RECV_TIMEOUT)
        subprocess.run(["ip", "link", "set", "up", private_vcan], check=True)
        tx.send(can.Message(arbitration_id=0x1, is_extended_id=False, data=b"\x03"))
        got = rx.recv(RECV_TIMEOUT)
        assert got is not None and bytes(got.data) == b"\x03"
    finally:
        tx.shutdown()
        rx.shutdown()


def test_can_raw_needs_no_capabilities(channel):
    """The unit runs the agent with an empty CapabilityBoundingSet= as a plain user: CAN_RAW and
    CAN_BCM sockets must work like that (systemd/dongle-agent.service relies on it)."""
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv (util-linux) to drop to an unprivileged user")
    code = f"""
import can, socket
caps = [l for l in open("/proc/self/status") if l.startswith("CapEff:")][0].split()[1]
assert int(caps, 16) == 0, caps
tx = can.Bus(interface="socketcan", channel={channel!r})
rx = can.Bus(interface="socketcan", channel={channel!r})
tx.send(can.Message(arbitration_id=0x7DF, is_extended_id=False, data=b"\\x02\\x01\\x0c"))
m = rx.recv(5.0)
assert m is not None and m.arbitration_id == 0x7DF, m
task = tx.send_periodic(can.Message(arbitration_id=0x321, is_extended_id=False, data=b"\\x01"), 0.01)
assert rx.recv(5.0) is not None
task.stop(); tx.shutdown(); rx.shutdown()
print("ok")
"""
    r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                        "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs",
                        sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr
