"""A hard power cut of the device VM: SIGKILL QEMU while the guest fsyncs a counter, boot again
from the same overlay, and find ext4 recovered with every value the guest had fsynced."""
from __future__ import annotations

import os
import select
import time
import tty

import pytest

from scripts.testbed.devicevm import DeviceVM
from tests.device.conftest import ARCH

pytestmark = [pytest.mark.device, pytest.mark.timeout(1800)]

# Appends n to the file, fsyncs it, and only then reports n on the serial line, waiting until the
# UART has sent it (tcdrain): every number the host has read was on the disk before it was sent.
FSYNC_LOOP = """
import os, sys, termios, tty
line = os.open(sys.argv[1], os.O_RDWR | os.O_NOCTTY)
tty.setraw(line)
fd = os.open("/var/lib/counter", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
n = 0
while True:
    n += 1
    os.write(fd, b"%d\\n" % n)
    os.fsync(fd)
    os.write(line, b"%d\\n" % n)
    termios.tcdrain(line)
"""


def _read_numbers(fd: int, until: int, timeout: float) -> list[int]:
    """Numbers reported on the pty until one >= ``until`` arrives."""
    buf, numbers = b"", []
    deadline = time.monotonic() + timeout
    while not numbers or numbers[-1] < until:
        left = deadline - time.monotonic()
        assert left > 0, f"the guest reported only {numbers[-3:]} in {timeout} s"
        r, _, _ = select.select([fd], [], [], left)
        if r:
            buf += os.read(fd, 4096)
            *lines, buf = buf.split(b"\n")
            numbers += [int(x) for x in lines if x]
    return numbers


def _drain(fd: int) -> list[int]:
    """What is left in the pty after QEMU died (complete lines only)."""
    os.set_blocking(fd, False)
    buf = b""
    try:
        while chunk := os.read(fd, 4096):
            buf += chunk
    except (BlockingIOError, OSError):  # EIO once no slave is open
        pass
    return [int(x) for x in buf.split(b"\n")[:-1] if x]


def test_power_cut_keeps_every_fsynced_value_and_ext4_recovers(devicevm_image, tmp_path):
    master, slave = os.openpty()
    tty.setraw(master)
    try:
        vm = DeviceVM(ARCH, tmp_path / "vm", image=devicevm_image, serials={"report": os.ttyname(slave)})
        vm.boot()
        try:
            vm.put("/root/fsync_loop.py", FSYNC_LOOP.encode())
            dev = vm.serial_device("report")
            vm.run(["systemd-run", "--unit=fsync-loop", "python3", "/root/fsync_loop.py", dev], check=True)
            reported = _read_numbers(master, until=200, timeout=300)
            vm.power_cut()
            reported += _drain(master)
            last_reported = reported[-1]

            vm.boot()  # the same overlay
            rc, dmesg, _ = vm.run("dmesg | grep 'EXT4-fs (vda)'")
            assert "recovery complete" in dmesg, dmesg  # the cut left a journal to replay
            assert vm.state == "running"
            numbers = [int(x) for x in vm.get("/var/lib/counter").decode().split("\n")[:-1]]
        finally:
            vm.close()
    finally:
        os.close(master)
        os.close(slave)
    # a gapless count from 1, ending at what the host last heard, or one further: that write may
    # have reached the disk before the cut took its report away
    assert numbers == list(range(1, len(numbers) + 1))
    assert last_reported <= numbers[-1] <= last_reported + 1, (last_reported, numbers[-3:])
