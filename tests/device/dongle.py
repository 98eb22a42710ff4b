"""A dongle installed in the device VM exactly as on a Pi, and the cloud it talks to.

- :func:`installed_overlay`: boots the bare image once, mounts a disk with this checkout and a
  wheelhouse built on the host from ``requirements.lock`` (scripts/refcloud/wheelhouse.py), runs
  ``scripts/install.sh --wheelhouse`` in the guest and powers off cleanly. The result is a qcow2
  overlay; every :class:`DongleVM` boots from its own overlay on top of it, so one install
  serves a whole test session (about 2-3 minutes on amd64).
- :class:`Cloud`: on the host, the development CA, the broker (its certificate also names the
  guest's forward address), the cloud keys and the reference console, which verifies every
  envelope and deduplicates on (dev, seq): the tests count from there. With
  ``repository=True`` also the update repository: TUF metadata and targets
  (scripts/refcloud/release.py, ``cloud.repo``) served over HTTPS by
  scripts/testbed/tuf_server.py (``cloud.tuf``, its certificate from the same CA).
- :class:`DongleVM`: the VM with the broker reachable at ``mqtts://10.0.2.100:8883`` (guestfwd),
  the repository (if any) at :data:`GUEST_REPOSITORY` and, optionally, the ELM327-emulator's pty
  as the guest's serial port. ``provision()`` does docs/install.md steps 5 and 6 in the guest
  (``dongle provision`` as the dongle user, with ``--tuf-root`` when the cloud has a
  repository, the CSR signed by the CA on the host, ``agent.toml`` edited from the installed
  example), ``start()`` is ``systemctl start dongle-agent``.

The guest's kernel clock starts unsynchronised, as a Pi's does, and the guest cannot reach an
NTP server (guestfwd carries TCP only): :meth:`DongleVM.timesync` does what systemd-timesyncd
does on its first answer (step the clock to the host's time, then adjtimex with ``maxerror`` 0
and ``STA_PLL``), after which ``timedatectl show -p NTPSynchronized`` says yes.
:meth:`DongleVM.boot` does it after each boot unless told not to (tests/device/test_dongle_clock.py).

Module fixtures share one booted VM where the tests do not disturb each other; the session
fixture ``installed`` (tests/device/conftest.py imports it from here) does the install once.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from scripts.refcloud import wheelhouse as wheelhouse_mod
from scripts.testbed import devenv
from scripts.testbed.devicevm import GUEST_FWD_ADDR, DeviceVM, DeviceVMError, Disk, make_ext4_image
from scripts.testbed.wait import wait_until

ROOT = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("DEVICEVM_DIR", "/var/tmp/dongle-devicevm"))
BROKER_GUEST_PORT = 8883
REPO_GUEST_PORT = 8443
#: The update repository as the guest sees it (``release.repository`` in a ``down/release``).
GUEST_REPOSITORY = f"https://{GUEST_FWD_ADDR}:{REPO_GUEST_PORT}"
WHEEL_ARCH = {"amd64": "x86_64", "arm64": "aarch64"}

VENV = "/opt/dongle/venv"   # the active slot's virtualenv (install.sh; agent.update.slots)

# What systemd-timesyncd does when its first NTP answer arrives (timesyncd-manager.c,
# manager_adjust_clock): step CLOCK_REALTIME, then tell the kernel the clock is disciplined.
TIMESYNC = r"""
import ctypes, os, sys, time
from drivers.core.clock import _Timex   # the installed agent's struct timex (linux/timex.h)
ADJ_ESTERROR, ADJ_MAXERROR, ADJ_STATUS, STA_PLL = 0x0008, 0x0004, 0x0010, 0x0001
host_ns = int(sys.argv[1])
time.clock_settime_ns(time.CLOCK_REALTIME, host_ns)
tx = _Timex(modes=ADJ_STATUS | ADJ_MAXERROR | ADJ_ESTERROR, status=STA_PLL, maxerror=0, esterror=0)
libc = ctypes.CDLL(None, use_errno=True)
if libc.adjtimex(ctypes.byref(tx)) < 0:
    sys.exit("adjtimex: " + os.strerror(ctypes.get_errno()))
os.makedirs("/run/systemd/timesync", exist_ok=True)
open("/run/systemd/timesync/synchronized", "w").close()   # what systemd-time-wait-sync waits for
"""


# --------------------------------------------------------------------------------------------
# The install (once per session)
# --------------------------------------------------------------------------------------------

def wheelhouse(arch: str) -> Path:
    """The locked wheels for the guest's architecture, hash-checked: kept in the device VM's
    cache directory between runs (pip reuses what is there and fetches what is missing)."""
    dest = CACHE / f"wheelhouse-{WHEEL_ARCH[arch]}"
    wheelhouse_mod.download(WHEEL_ARCH[arch], dest)
    return dest


def checkout_files() -> list[str]:
    """This checkout's files as git sees them, uncommitted changes included (what install.sh
    would find in a clone with the same working tree)."""
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                         capture_output=True, check=True).stdout.decode()
    return [p for p in out.split("\0") if p and (ROOT / p).is_file()]


def install_disk(arch: str, out_dir: Path) -> Path:
    """An ext4 image holding ``src/`` (this checkout) and ``wheels/`` (the wheelhouse)."""
    stage = out_dir / "stage"
    for rel in checkout_files():
        dst = stage / "src" / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, dst)
    shutil.copytree(wheelhouse(arch), stage / "wheels")
    img = make_ext4_image(stage, out_dir / "dongle-install.img", label="dongle")
    shutil.rmtree(stage)
    return img


def installed_overlay(arch: str, image: Path, workdir: Path) -> tuple[Path, dict]:
    """Boots the bare image, installs the dongle with scripts/install.sh from the disk, powers
    off. Returns the overlay (backed by the image) and what it took (seconds, install.sh's output)."""
    t0 = time.monotonic()
    disk = install_disk(arch, workdir)
    vm = DeviceVM(arch, workdir / "vm", image=image, disks=[Disk(disk, "dongle")])
    info: dict = {"disk_s": time.monotonic() - t0}
    try:
        info["boot_s"] = vm.boot()
        vm.run("mkdir -p /mnt/dongle && mount -o ro /dev/disk/by-id/virtio-dongle /mnt/dongle", check=True)
        t1 = time.monotonic()
        rc, out, err = vm.run("bash /mnt/dongle/src/scripts/install.sh --wheelhouse /mnt/dongle/wheels",
                              timeout=1500)
        info["install_s"] = time.monotonic() - t1
        info["output"] = out + err
        (workdir / "install.log").write_text(out + err)
        if rc != 0:
            raise DeviceVMError(f"install.sh failed in the guest (exit {rc}):\n{(out + err)[-4000:]}")
        vm.run("umount /mnt/dongle", check=True)
        vm.shutdown()
    finally:
        vm.close()
    disk.unlink()
    return vm.overlay, info


# --------------------------------------------------------------------------------------------
# The cloud (host side)
# --------------------------------------------------------------------------------------------

class Cloud:
    """CA, broker, cloud keys and the reference console in ``run_dir`` (scripts/testbed/devenv
    layout); the broker's certificate names the address the guest dials. ``repository``: also
    a TUF repository (``run_dir/tuf``, keys in ``run_dir/tuf-keys``: scripts/testbed/updates.py's
    layout) and its HTTPS server, whose certificate names the guest's address too."""

    def __init__(self, run_dir: Path, *, repository: bool = False):
        from scripts.refcloud.console import CloudConsole
        self.run_dir = run_dir
        self.ca = devenv.make_cloud(run_dir)
        self.broker = devenv.start_broker(run_dir, self.ca, server_ips=("127.0.0.1", "::1", GUEST_FWD_ADDR))
        self.console = CloudConsole(run_dir)
        self.console.start()
        assert self.console.connected.wait(15), "the console could not connect to the broker"
        self.repo = self.tuf = None
        if repository:
            from scripts.testbed import updates
            from scripts.testbed.tuf_server import TufServer
            self.repo = updates.repository(run_dir)
            self.tuf = TufServer(self.repo.repo, self.ca, ips=(GUEST_FWD_ADDR,)).start()

    @property
    def forwards(self) -> dict[int, int]:
        """Guest port on GUEST_FWD_ADDR -> host port: the broker, and the repository if any."""
        fw = {BROKER_GUEST_PORT: self.broker.port}
        if self.tuf is not None:
            fw[REPO_GUEST_PORT] = self.tuf.port
        return fw

    def records(self, dev: str, kind: str | None = None) -> list[dict]:
        return [r for r in list(self.console.records)
                if r.get("dev") == dev and (kind is None or r.get("kind") == kind)]

    def close(self) -> None:
        if self.tuf is not None:
            self.tuf.stop()
        self.console.stop()
        self.broker.stop()


# --------------------------------------------------------------------------------------------
# The installed dongle in a VM
# --------------------------------------------------------------------------------------------

def edit_toml(text: str, values: Mapping[str, object]) -> str:
    """``agent.toml`` as a technician edits it: ``{"section.key": value}`` replaces the key's
    line in its section, uncommenting it if the example has it commented out (``# key = ...``;
    the example has every key)."""
    for dotted, value in values.items():
        section, key = dotted.split(".")
        lit = json.dumps(value) if not isinstance(value, bool) else str(value).lower()
        pattern = re.compile(rf"(^\[{re.escape(section)}\]\n(?:(?!^\[).*\n)*?)(?:# )?{re.escape(key)} = [^\n#]*?(\s*(#.*)?)$",
                             re.M)
        text, n = pattern.subn(lambda m: f"{m.group(1)}{key} = {lit}{m.group(2)}", text, count=1)
        if n != 1:
            raise KeyError(f"{dotted} not in the example agent.toml")
    return text


class DongleVM:
    """One installed dongle: a DeviceVM on an overlay of the installed image."""

    def __init__(self, arch: str, image: Path, installed: Path, workdir: Path, cloud: Cloud,
                 device_id: str, *, serials: Mapping[str, str] | None = None,
                 disks=(), kernel_args=(), qemu_args=()):
        self.cloud, self.device_id = cloud, device_id
        workdir.mkdir(parents=True, exist_ok=True)
        overlay = workdir / "root.qcow2"
        if not overlay.exists():
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(installed),
                            str(overlay)], check=True)
        self.vm = DeviceVM(arch, workdir, image=image, serials=serials,
                           forwards=cloud.forwards, disks=disks,
                           kernel_args=kernel_args, qemu_args=qemu_args)

    # -- life cycle --------------------------------------------------------------------------
    def boot(self, *, timesync: bool = True) -> float:
        seconds = self.vm.boot()
        if timesync:
            self.timesync()
        return seconds

    def timesync(self) -> None:
        """The guest's clock set and marked synchronised, as systemd-timesyncd would (the module
        docstring says why it cannot be timesyncd itself)."""
        self.vm.put("/run/timesync_sim.py", TIMESYNC.encode())
        self.vm.run([f"{VENV}/bin/python", "/run/timesync_sim.py", str(time.time_ns())], check=True)
        rc, out, _ = self.vm.run("timedatectl show -p NTPSynchronized --value")
        assert out.strip() == "yes", f"timedatectl says NTPSynchronized={out.strip()!r} after the simulation"

    def close(self) -> None:
        try:
            if self.vm.running:
                self.vm.shutdown()
        except DeviceVMError:
            pass
        self.vm.close()

    # -- in the guest ------------------------------------------------------------------------
    def run(self, cmd, timeout: float = 60.0, **kw) -> tuple[int, str, str]:
        return self.vm.run(cmd, timeout, **kw)

    def sh(self, cmd: str, timeout: float = 60.0) -> str:
        """Runs ``cmd``; its stdout, or DeviceVMError with stderr if it fails."""
        return self.vm.run(cmd, timeout, check=True)[1]

    def as_dongle(self, cmd: str, timeout: float = 120.0) -> tuple[int, str, str]:
        """As the dongle user with its groups (``sudo -u dongle`` on a Pi; runuser here)."""
        return self.vm.run(["runuser", "-u", "dongle", "--", "sh", "-c", cmd], timeout)

    def provision(self, *, toml: Mapping[str, object] | None = None, extra_toml: str = "") -> str:
        """docs/install.md steps 5-6: keys made in the guest, the CSR signed by the cloud's CA,
        agent.toml edited from the installed example; with the cloud's repository, its root
        metadata pinned (``--tuf-root``). Returns the agent.toml written."""
        cloud_dir = self.cloud.run_dir / "cloud"
        for name in ("cloud_sign.pub", "cloud_enc.pub"):
            self.vm.put(f"/tmp/{name}", (cloud_dir / name).read_bytes(), mode=0o644)
        tuf_root = ""
        if self.cloud.repo is not None:
            self.vm.put("/tmp/tuf_root.json", self.cloud.repo.root_path.read_bytes(), mode=0o644)
            tuf_root = " --tuf-root /tmp/tuf_root.json"
        rc, out, err = self.as_dongle(f"dongle provision --device-id {self.device_id} --cloud-sign-pub "
                                      "/tmp/cloud_sign.pub --cloud-enc-pub /tmp/cloud_enc.pub"
                                      f"{tuf_root} --out /etc/dongle/keys")
        assert rc == 0, out + err
        ddir = self.cloud.run_dir / "devices" / self.device_id
        ddir.mkdir(parents=True, exist_ok=True)
        (ddir / "registration.json").write_bytes(self.vm.get("/etc/dongle/keys/registration.json"))
        (ddir / "tls.csr").write_bytes(self.vm.get("/etc/dongle/keys/tls.csr"))
        self.cloud.ca.sign_csr(ddir / "tls.csr", ddir / "tls.crt")
        self.vm.put("/etc/dongle/keys/tls.crt", (ddir / "tls.crt").read_bytes())
        self.vm.put("/etc/dongle/keys/ca.pem", self.cloud.ca.ca_cert_path.read_bytes())
        self.sh("cd /etc/dongle/keys && chown dongle:dongle tls.crt ca.pem && chmod 0644 tls.crt ca.pem"
                " && rm -f /tmp/cloud_sign.pub /tmp/cloud_enc.pub /tmp/tuf_root.json")
        values = {"device.id": self.device_id, "mqtt.url": f"mqtts://{GUEST_FWD_ADDR}:{BROKER_GUEST_PORT}",
                  "mqtt.backoff_max_s": 5.0, "obd.enabled": False, "update.enabled": False,
                  "power.enabled": False}
        values.update(toml or {})
        text = edit_toml(self.vm.get("/etc/dongle/agent.toml").decode(), values) + extra_toml
        self.write_config(text)
        return text

    def write_config(self, text: str) -> None:
        self.vm.put("/etc/dongle/agent.toml", text.encode())
        self.sh("chown root:dongle /etc/dongle/agent.toml && chmod 0640 /etc/dongle/agent.toml")

    def start(self, timeout: float = 180.0) -> None:
        """``systemctl start``: returns once the agent sent READY=1 (Type=notify)."""
        self.vm.run("systemctl start dongle-agent", timeout, check=True)

    def unit(self, *props: str) -> dict[str, str]:
        out = self.sh("systemctl show dongle-agent " + " ".join(f"-p {p}" for p in props))
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def main_pid(self) -> int:
        return int(self.unit("MainPID")["MainPID"])

    def status(self) -> dict:
        """``dongle status --json`` as root in the guest (the technician CLI over the socket)."""
        rc, out, err = self.vm.run("dongle status --json", 60)
        assert rc == 0, out + err
        return json.loads(out)

    def journal(self, *args: str, units: tuple[str, ...] = ("dongle-agent",)) -> list[dict]:
        """The units' journal entries (``journalctl -u UNIT... -o json``; the agent's by default)."""
        us = " ".join(f"-u {u}" for u in units)
        out = self.sh(f"journalctl {us} -o json --no-pager " + " ".join(args), 120)
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def log(self, *args: str, units: tuple[str, ...] = ("dongle-agent",)) -> str:
        """The same entries' messages, one a line (what ``journalctl -o cat`` shows)."""
        return "\n".join(m if isinstance(m := e.get("MESSAGE", ""), str) else bytes(m).decode(errors="replace")
                         for e in self.journal(*args, units=units))

    def diagnose(self, lines: int = 80) -> str:
        """The end of the journal of the agent and of the units around it (the installer, the
        rollback), and the agent's status, for a failing test's message."""
        if not self.vm.running:
            return "(the VM is not running)"
        out = self.vm.run(f"journalctl -u dongle-agent -u dongle-update-install -u dongle-agent-rollback "
                          f"-n {lines} --no-pager; systemctl status dongle-agent "
                          "--no-pager -n 0; dongle status --json; /opt/dongle/current/bin/dongle-update status", 120)
        return out[1][-12000:] + out[2][-2000:]

    def wait(self, pred, timeout: float, what: str, *, interval: float = 0.02):
        """``wait_until``, with the agent's journal and status in the message when it times out."""
        try:
            return wait_until(pred, timeout, interval=interval, what=what)
        except AssertionError as e:
            raise AssertionError(f"{e}\n--- in the guest:\n{self.diagnose()}") from None

    def wait_active(self, timeout: float = 240.0, *, after_pid: int | None = None) -> int:
        """Waits until the unit is active (running) with a main PID other than ``after_pid``."""
        def up():
            p = self.unit("ActiveState", "SubState", "MainPID")
            return p["ActiveState"] == "active" and p["SubState"] == "running" and \
                int(p["MainPID"]) not in (0, after_pid) and int(p["MainPID"])
        return self.wait(up, timeout, "dongle-agent.service active")


def obd_toml(d: DongleVM, line: str = "elm") -> dict:
    """[obd] on the guest's serial line to the host's ELM327-emulator. The baud rate is given:
    python-OBD's probing waits 0.1 s per rate for an answer, too short under emulation."""
    return {"obd.enabled": True, "obd.port": d.vm.serial_device(line), "obd.baudrate": 38400}


def online(cloud: Cloud, dev: str, version: str | None = None, since: int = 0):
    """A predicate: the console has a ``status`` record of ``dev`` saying online (as agent
    ``version``), among its records from index ``since`` on (``len(cloud.console.records)``
    taken before: one sent since then)."""
    return lambda: any(r.get("topic") == "status" and r["dev"] == dev and r["status"].get("state") == "online"
                       and (version is None or r["status"].get("agent") == version)
                       for r in list(cloud.console.records)[since:])


def updates_toml(**overrides: object) -> dict:
    """[update] for a dongle whose cloud has the repository: on, the repository's HTTPS trusted
    through the dev CA that provision() installs, no download cap; ``overrides`` as
    ``{"stable_s": 20.0}`` (keys of [update])."""
    values = {"enabled": True, "ca_file": "/etc/dongle/keys/ca.pem", "max_rate_kib_s": 0, **overrides}
    return {f"update.{k}": v for k, v in values.items()}


# --------------------------------------------------------------------------------------------
# Fixtures (imported by tests/device/conftest.py)
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def installed(devicevm_image, tmp_path_factory) -> Path:
    """The image with the dongle installed by scripts/install.sh (once per session).

    ``DEVICEVM_INSTALLED=FILE``, for working on the tests only: the overlay is kept in FILE and
    reused by later sessions while FILE exists (the code under test is then the one installed
    when it was made; delete FILE to install again)."""
    from tests.device.conftest import ARCH
    keep = os.environ.get("DEVICEVM_INSTALLED")
    if keep and Path(keep).is_file():
        print(f"\ndevice VM: reusing the install in {keep} (DEVICEVM_INSTALLED)", file=sys.stderr)
        return Path(keep)
    overlay, info = installed_overlay(ARCH, devicevm_image, tmp_path_factory.mktemp(f"installed-{ARCH}"))
    if keep:
        Path(keep).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(overlay, keep)
        overlay = Path(keep)
    print(f"\ndevice VM: install.sh took {info['install_s']:.0f} s (boot {info['boot_s']:.0f} s, "
          f"disk {info['disk_s']:.0f} s); installed image {overlay}", file=sys.stderr)
    return overlay


@contextmanager
def make_dongle(devicevm_image, installed, tmp_path_factory, device_id: str, *,
                repository: bool = False, **kw) -> Iterator[tuple[DongleVM, Cloud]]:
    """A cloud (with the update repository if ``repository``) and a booted, not yet provisioned
    dongle for one test module."""
    from tests.device.conftest import ARCH
    base = tmp_path_factory.mktemp(device_id)
    cloud = Cloud(base / "cloud", repository=repository)
    d = DongleVM(ARCH, devicevm_image, installed, base / "vm", cloud, device_id, **kw)
    try:
        d.boot()
        yield d, cloud
    finally:
        d.close()
        cloud.close()


# --------------------------------------------------------------------------------------------
# CAN in the guest
# --------------------------------------------------------------------------------------------

VCAN_NETDEV = "[NetDev]\nName=vcan0\nKind=vcan\n"
VCAN_NETWORK = "[Match]\nName=vcan0\n\n[Link]\nRequiredForOnline=no\n"
#: The DBC the agent ships (installed with its package data, agent.config).
GUEST_DBC = f"{VENV}/lib/python3.11/site-packages/agent/config/dbc/toyota_new_mc_pt_generated.dbc"

# Numbered CAN frames on vcan0 at RATE per second (a raw AF_CAN socket, no python-can): id 0x6AB,
# data = run number (2 bytes) + frame number (6 bytes). On SIGTERM it writes how many it sent.
COUNTER = r"""
import signal, socket, struct, sys, time
iface, run, rate, out = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
s = socket.socket(socket.AF_CAN, socket.SOCK_RAW, socket.CAN_RAW)
s.setsockopt(socket.SOL_CAN_RAW, socket.CAN_RAW_FILTER, b"")   # send only: receive nothing
s.bind((iface,))
n, period, stop = 0, 1.0 / rate, []
signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
t = time.monotonic()
while not stop:
    try:
        s.send(struct.pack("=IB3x8s", 0x6AB, 8, run.to_bytes(2, "big") + n.to_bytes(6, "big")))
    except OSError:      # ENOBUFS: the interface queue is full; try this frame again
        time.sleep(0.001)
        continue
    n += 1
    t += period
    d = t - time.monotonic()
    if d > 0:
        time.sleep(d)
open(out, "w").write(str(n))
"""
COUNTER_ID = 0x6AB


def add_vcan(d: DongleVM) -> None:
    """vcan0 at every boot, by systemd-networkd (as can0 is on a Pi, docs/install.md step 2)."""
    d.vm.put("/etc/systemd/network/80-vcan0.netdev", VCAN_NETDEV.encode())
    d.vm.put("/etc/systemd/network/80-vcan0.network", VCAN_NETWORK.encode())
    d.sh("chmod 0644 /etc/systemd/network/80-vcan0.* && systemctl restart systemd-networkd")
    wait_until(lambda: "UP" in d.run("ip link show vcan0")[1], 60, what="vcan0 up")


def start_counter(d: DongleVM, run: int, rate: float, unit: str = "can-counter") -> None:
    d.vm.put("/run/can_counter.py", COUNTER.encode())
    d.sh(f"systemd-run --unit={unit} python3 /run/can_counter.py vcan0 {run} {rate} /run/{unit}.sent")


def stop_counter(d: DongleVM, unit: str = "can-counter") -> int:
    """Stops the numbered frames; how many were sent."""
    d.sh(f"systemctl stop {unit}")
    return int(d.vm.get(f"/run/{unit}.sent").decode())


def kernel_matches(d: DongleVM, can_id: int) -> dict[str, int]:
    """Frames the kernel's CAN core handed to each raw socket's receive filter for ``can_id`` on
    vcan0 (/proc/net/can/rcvlist_*, one line per filter: device, can_id, mask, function,
    userdata = the socket, matches, ident; net/can/proc.c): what each socket was given before its
    receive queue could drop anything."""
    out: dict[str, int] = {}
    text = d.sh("cat /proc/net/can/rcvlist_sff /proc/net/can/rcvlist_fil /proc/net/can/rcvlist_all")
    for line in text.splitlines():
        f = line.split()
        if len(f) == 7 and f[0] == "vcan0" and f[6] == "raw":
            try:
                cid, mask, matches = int(f[1], 16), int(f[2], 16), int(f[5])
            except ValueError:
                continue
            if (can_id & mask & 0x1FFFFFFF) == (cid & mask & 0x1FFFFFFF):
                out[f[4]] = out.get(f[4], 0) + matches
    return out


def counted(cloud: Cloud, dev: str) -> dict[tuple[int, int], list[int]]:
    """(run, frame number) -> the frame's time (µs) as the cloud received it, once per (dev, seq)."""
    got: dict[tuple[int, int], list[int]] = {}
    for r in cloud.records(dev, "telemetry"):
        if r["duplicate"]:
            continue
        body = r["body"]
        for g in body.get("frames", ()):
            times = g.get("t")
            if times is None:   # rev 1.1 "dt": running sum
                times, acc = [], 0
                for step in g["dt"]:
                    acc += step
                    times.append(acc)
            for can_id, data, t in zip(g["id"], g["data"], times):
                if can_id == COUNTER_ID:
                    key = (int.from_bytes(data[:2], "big"), int.from_bytes(data[2:], "big"))
                    got.setdefault(key, []).append(body["t0"] * 1000 + t)
    return got
