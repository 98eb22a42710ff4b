"""The device VM's capabilities, each shown once in a real guest (one boot for this module):
systemd as PID 1, SocketCAN on vcan, a host TCP port through guestfwd and nothing else, serial
lines to host pseudo-terminals (pyserial opens them and sets the baud rate), a wheelhouse disk,
and file transfer. ``make test-device`` (amd64) / ``make test-device-arm64``."""
from __future__ import annotations

import hashlib
import json
import os
import socketserver
import subprocess
import sys
import termios
import threading
import tty
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from scripts.testbed.devicevm import (GUEST_FWD_ADDR, DeviceVM, DeviceVMError, Disk, GuestAgentError,
                                     GuestTimeout, make_ext4_image)
from tests.device.conftest import ARCH

pytestmark = [pytest.mark.device, pytest.mark.timeout(1800)]

FWD_PORT = 1883  # the port the guest dials on GUEST_FWD_ADDR
PYSERIAL_WHEEL = "pyserial-3.5-py2.py3-none-any.whl"


class _Greeter(socketserver.ThreadingTCPServer):
    """A host TCP server on loopback: answers each connection's first line with b"hello " + it."""
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        self.peers: list[str] = []
        super().__init__(("127.0.0.1", 0), self._Handler)

    class _Handler(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            line = self.rfile.readline()
            self.server.peers.append(self.client_address[0])
            self.wfile.write(b"hello " + line)


@pytest.fixture(scope="module")
def greeter() -> Iterator[_Greeter]:
    srv = _Greeter()
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope="module")
def elm_pty() -> Iterator[tuple[int, int, str]]:
    """A host pseudo-terminal as the ELM327-emulator makes one: the test keeps the master (and a
    slave fd, to read the line settings), the VM gets the slave's path."""
    master, slave = os.openpty()
    tty.setraw(master)
    yield master, slave, os.ttyname(slave)
    os.close(master)
    os.close(slave)


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory) -> Path:
    """A wheelhouse directory on the host: pyserial's wheel (install.sh will get the agent's)."""
    wheels = tmp_path_factory.mktemp("wheels")
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check",
                    "--no-deps", "--only-binary=:all:", "-d", str(wheels), "pyserial==3.5"], check=True)
    return wheels


@pytest.fixture(scope="module")
def wheelhouse_disk(wheelhouse, tmp_path_factory) -> Path:
    """The wheelhouse packed into an ext4 image, for the VM as a read-only disk."""
    return make_ext4_image(wheelhouse, tmp_path_factory.mktemp("disks") / "wheels.img", label="wheels")


@pytest.fixture(scope="module")
def vm(devicevm_image, tmp_path_factory, greeter, elm_pty, wheelhouse_disk) -> Iterator[DeviceVM]:
    machine = DeviceVM(ARCH, tmp_path_factory.mktemp(f"vm-{ARCH}"), image=devicevm_image,
                       forwards={FWD_PORT: greeter.server_address[1]},
                       serials={"elm": elm_pty[2]},
                       disks=[Disk(wheelhouse_disk, "wheels")])
    with machine:
        yield machine


@pytest.fixture(scope="module")
def guest_pyserial(vm) -> dict[str, str]:
    """The environment for the guest's python3 to import pyserial straight from its wheel on the
    wheelhouse disk (a pure wheel is importable from sys.path). Quick; a venv with pip install
    from the same disk, as install.sh does, takes about 100 s under TCG."""
    vm.run("mkdir -p /mnt/wheels && mount -o ro /dev/disk/by-id/virtio-wheels /mnt/wheels", check=True)
    return {"PYTHONPATH": f"/mnt/wheels/{PYSERIAL_WHEEL}"}


def test_systemd_is_pid_1_and_the_system_is_running(vm):
    assert vm.state == "running"
    rc, out, _ = vm.run("cat /proc/1/comm; readlink /proc/1/exe; uname -m; systemctl --failed --plain --no-legend")
    comm, exe, machine, *failed = out.splitlines()
    assert (comm, exe) == ("systemd", "/usr/lib/systemd/systemd")
    assert machine == {"amd64": "x86_64", "arm64": "aarch64"}[ARCH]
    assert failed == []
    rc, out, _ = vm.run("systemctl is-active qemu-guest-agent systemd-journald systemd-networkd dbus")
    assert out.split() == ["active"] * 4


def test_vcan_frames_from_cangen_reach_candump(vm):
    vm.run("modprobe vcan && ip link add dev vcan0 type vcan && ip link set up vcan0", check=True)
    rc, out, _ = vm.run("ip -details link show vcan0")
    assert "vcan" in out and "UP" in out
    # a sender that runs until stopped, so candump sees frames whenever it starts: no race
    vm.run("systemd-run --unit=cangen cangen vcan0 -g 2 -I 5A1 -L 8 -D i", check=True)
    try:
        rc, out, err = vm.run("candump -L -n 20 vcan0", timeout=120)
    finally:
        vm.run("systemctl stop cangen")
    assert rc == 0, err
    frames = [line.split()[2] for line in out.splitlines()]
    assert len(frames) == 20
    assert all(f.startswith("5A1#") and len(f) == 4 + 16 for f in frames)
    # -D i: the first payload byte counts up by one each frame; candump saw a gapless run
    counts = [int(f[4:6], 16) for f in frames]
    assert all((b - a) % 256 == 1 for a, b in zip(counts, counts[1:])), counts


GUEST_NET_PROBE = """
import socket, sys, json
def dial(host, port):
    try:
        with socket.create_connection((host, port), timeout=20) as s:
            s.sendall(b"from the guest\\n")
            return s.makefile("rb").readline().decode()
    except OSError as e:
        return type(e).__name__
host_port = int(sys.argv[1])
print(json.dumps({
    "forward": [dial("%s", %d) for _ in range(3)],
    "gateway_same_port": dial("10.0.2.2", host_port),
    "forward_other_port": dial("%s", %d),
    "outside": dial("192.0.2.1", 80),
}))
""" % (GUEST_FWD_ADDR, FWD_PORT, GUEST_FWD_ADDR, FWD_PORT + 1)


def test_guestfwd_reaches_the_host_loopback_port_and_nothing_else(vm, greeter):
    vm.put("/root/net_probe.py", GUEST_NET_PROBE.encode())
    before = len(greeter.peers)
    rc, out, err = vm.run(["python3", "/root/net_probe.py", str(greeter.server_address[1])], timeout=120)
    assert rc == 0, err
    got = json.loads(out)
    # three separate connections through the forward (one socat each), all from host loopback
    assert got["forward"] == ["hello from the guest\n"] * 3
    assert greeter.peers[before:] == ["127.0.0.1"] * 3
    # without restrict=on, 10.0.2.2 would be the host's loopback: the same server, refused here
    assert got["gateway_same_port"] == "ConnectionRefusedError"
    assert got["forward_other_port"] == "ConnectionRefusedError"
    assert got["outside"] == "ConnectionRefusedError"
    assert len(greeter.peers) == before + 3


GUEST_SERIAL = """
import sys, serial
s = serial.Serial(sys.argv[1], 9600, timeout=60)
s.baudrate = 38400            # a tcsetattr on the guest's UART, after open
s.write(b"ATZ\\r")
s.flush()
print(s.read_until(b">").decode(), s.baudrate)
"""


def _read_until(fd: int, end: bytes, limit: int = 4096) -> bytes:
    buf = b""
    while not buf.endswith(end):
        chunk = os.read(fd, limit)  # blocking: the test's timeout bounds it
        assert chunk, "pty closed"
        buf += chunk
    return buf


def test_pty_serial_line_carries_bytes_both_ways_and_pyserial_sets_the_baud_rate(vm, elm_pty, guest_pyserial):
    master, slave, _ = elm_pty
    dev = vm.serial_device("elm")
    assert dev.startswith("/dev/ttyS")
    vm.put("/root/serial_probe.py", GUEST_SERIAL.encode())
    with ThreadPoolExecutor(1) as pool:
        guest = pool.submit(vm.run, ["python3", "/root/serial_probe.py", dev], 120, env=guest_pyserial)
        assert _read_until(master, b"\r") == b"ATZ\r"
        # QEMU passed the guest's line settings on to the host tty
        assert termios.tcgetattr(slave)[4] == termios.B38400
        os.write(master, b"ELM327 v1.5\r\r>")
        rc, out, err = guest.result()
    assert rc == 0, err
    assert out.split() == ["ELM327", "v1.5", ">", "38400"]


def test_wheelhouse_disk_is_mounted_read_only_and_its_wheel_imports(vm, wheelhouse, guest_pyserial):
    host_wheel = wheelhouse / PYSERIAL_WHEEL
    rc, out, err = vm.run(f"findmnt -no OPTIONS /mnt/wheels; sha256sum /mnt/wheels/{PYSERIAL_WHEEL};"
                          " python3 -c 'import serial; print(serial.__version__, serial.__file__)'",
                          env=guest_pyserial)
    assert rc == 0, err
    opts, digest, imported = out.splitlines()
    assert opts.split(",")[0] == "ro"
    assert digest.split()[0] == hashlib.sha256(host_wheel.read_bytes()).hexdigest()
    assert imported.split() == ["3.5", f"/mnt/wheels/{PYSERIAL_WHEEL}/serial/__init__.py"]


def test_put_and_get_round_trip_binary_data(vm):
    data = os.urandom(3 * 2**20 + 17)  # more than one transfer chunk
    vm.put("/root/blob", data, mode=0o600)
    assert vm.get("/root/blob") == data
    rc, out, _ = vm.run("stat -c %a /root/blob; sha256sum /root/blob")
    assert out.split()[:2] == ["600", hashlib.sha256(data).hexdigest()]
    with pytest.raises(GuestAgentError, match="No such file"):
        vm.get("/root/does-not-exist")


def test_run_reports_exit_codes_stderr_and_input(vm):
    assert vm.run("echo out; echo err >&2; exit 3") == (3, "out\n", "err\n")
    assert vm.run(["tr", "a-z", "A-Z"], input=b"stdin reaches the guest") == (0, "STDIN REACHES THE GUEST", "")


def test_run_kills_a_command_that_outlives_its_timeout(vm):
    with pytest.raises(GuestTimeout):
        vm.run("sleep 600", timeout=2)
    rc, out, _ = vm.run("pgrep -x sleep || echo none")
    assert out.strip() == "none"


def test_a_vm_that_cannot_boot_says_why_and_where_its_logs_are(devicevm_image, tmp_path):
    vm = DeviceVM(ARCH, tmp_path, image=devicevm_image, qemu_args=["-no-such-option"])
    with pytest.raises(DeviceVMError, match="QEMU had exited") as e:
        vm.boot()
    assert str(vm.qemu_log) in str(e.value) and "-no-such-option" in str(e.value)
    assert not vm.running
    vm.close()
