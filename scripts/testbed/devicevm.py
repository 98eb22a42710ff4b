"""The device VM: Debian 12 with systemd as PID 1 under QEMU (TCG), for the tests of the installed dongle.

The image is built by ``scripts/devicevm/build.sh`` from Debian packages on this host and cached
under /var/tmp/dongle-devicevm (see scripts/devicevm/README.md); :func:`build_image` runs it
(nothing to do once built). Every :class:`DeviceVM` boots from its own copy-on-write overlay
(``WORKDIR/root.qcow2``, the base image as backing file), so the base stays clean and a VM can be
power-cut and booted again from the same disk::

    with DeviceVM(arch="amd64", workdir=tmp_path, forwards={1883: broker_port},
                  serials={"elm": elm_pty_path}, disks=[Disk(wheels_img, "wheels")]) as vm:
        rc, out, err = vm.run("systemctl is-active dongle")
        vm.put("/etc/dongle/agent.toml", b"...")
        vm.power_cut()          # SIGKILL: the guest's page cache is lost, the disk keeps what it flushed
        vm.boot()               # the same overlay: ext4 recovers

What the guest sees:

- **network**: ``eth0`` 10.0.2.15/24 on QEMU's user-mode network with ``restrict=on``: it can
  reach nothing but ``forwards``. ``forwards={guest_port: host_port}`` makes
  ``GUEST_FWD_ADDR:guest_port`` (10.0.2.100) reach ``127.0.0.1:host_port`` on the host
  (``guestfwd``, one ``socat`` per connection, so reconnects work; a connection to a host port
  nobody listens on is accepted and closed at once rather than refused). No bridge, no tap.
- **serial lines**: ``serials={name: host_tty}``, each a PCI 16550 UART (``pci-serial``, the same
  on both architectures): a real tty in the guest, ``vm.serial_device(name)`` says which
  (``/dev/ttyS1`` on amd64, ``/dev/ttyS0`` on arm64 for the first line). ``host_tty`` is the path
  of a tty on the host, typically a pty slave whose master a simulator holds (the
  ELM327-emulator, ``scripts.elm_pty``, the MCU simulator): QEMU opens it, and the guest's baud
  rate and line settings reach it. If the master closes, the line stays dead until the next boot.
- **disks**: ``disks=[Disk(path, name)]`` appear as ``/dev/disk/by-id/virtio-NAME``, read-only
  unless ``Disk(readonly=False)``; :func:`make_ext4_image` packs a directory (a wheelhouse) into
  one without a loop mount.
- **control**: ``run``/``put``/``get`` go through qemu-guest-agent on a virtio-serial port (as
  root, outside any unit; the guest needs no network or keys for it). ``vm.qmp(...)`` talks to QEMU.

QEMU is started in its own process group and dies with the thread that started it
(PR_SET_PDEATHSIG), so a killed test run leaves no VM behind.
"""
from __future__ import annotations

import base64
import ctypes
import errno
import fcntl
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from scripts.testbed.wait import wait_until

ROOT = Path(__file__).resolve().parent.parent.parent
BUILD_SH = ROOT / "scripts" / "devicevm" / "build.sh"
GUEST_FWD_ADDR = "10.0.2.100"
"""Where ``forwards`` listen, as the guest sees it."""


@dataclass(frozen=True)
class _Arch:
    qemu: str
    machine: tuple[str, ...]
    console: str


ARCHES = {
    "amd64": _Arch("qemu-system-x86_64", ("-M", "pc", "-cpu", "max"), "ttyS0"),
    "arm64": _Arch("qemu-system-aarch64", ("-M", "virt", "-cpu", "cortex-a72"), "ttyAMA0"),
}
_ALIASES = {"x86_64": "amd64", "aarch64": "arm64"}

# Fixed PCI slots: virtio-blk disks are named vda, vdb, ... in slot order, and the serial lines
# are found in the guest by slot.
_SLOT_ROOT, _SLOT_DISKS, _SLOT_NET, _SLOT_VSERIAL, _SLOT_SERIALS = 0x05, 0x06, 0x0B, 0x0C, 0x10
_MAX_DISKS, _MAX_SERIALS = _SLOT_NET - _SLOT_DISKS, 8
_GUEST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class DeviceVMError(RuntimeError):
    """The VM could not be built, booted or reached; the message says where its logs are."""


class GuestAgentError(DeviceVMError):
    """qemu-guest-agent refused a command (e.g. a file that does not exist in the guest)."""


class GuestTimeout(DeviceVMError):
    """A command run in the guest did not finish within its timeout (it was killed)."""


def normalize_arch(arch: str) -> str:
    arch = _ALIASES.get(arch, arch)
    if arch not in ARCHES:
        raise ValueError(f"unknown architecture {arch!r} (amd64 or arm64)")
    return arch


def build_image(arch: str = "amd64") -> Path:
    """The image directory (``rootfs.img``, ``vmlinuz``, ``initrd.img``) for ``arch``, built if needed.

    Needs root. Building takes about 2 minutes for amd64 and 8 for arm64 the first time (progress
    on stderr); afterwards it only checks the cache key (well under a second)."""
    arch = normalize_arch(arch)
    res = subprocess.run([str(BUILD_SH), "--arch", arch], stdout=subprocess.PIPE, text=True)
    lines = res.stdout.strip().splitlines()
    if res.returncode != 0 or not lines:
        raise DeviceVMError(f"{BUILD_SH} --arch {arch} failed (exit {res.returncode}); see above")
    image = Path(lines[-1])
    if not (image / ".complete").exists():
        raise DeviceVMError(f"{BUILD_SH} printed {image}, which is not a complete image")
    return image


def make_ext4_image(src: Path, out: Path, label: str = "data", size_mb: int | None = None) -> Path:
    """Pack the directory ``src`` into a new ext4 image ``out`` (mke2fs -d: no loop mount, no root
    needed), sized to fit with room for ext4's own metadata unless ``size_mb`` is given."""
    if size_mb is None:
        used = sum(p.stat().st_size for p in Path(src).rglob("*") if p.is_file())
        size_mb = used * 5 // 4 // 2**20 + 16
    out = Path(out)
    out.unlink(missing_ok=True)
    res = subprocess.run(["mke2fs", "-q", "-t", "ext4", "-L", label, "-d", str(src), str(out),
                          f"{size_mb}M"], capture_output=True, text=True)
    if res.returncode != 0:
        raise DeviceVMError(f"mke2fs -d {src} failed: {res.stderr.strip()}")
    return out


@dataclass(frozen=True)
class Disk:
    """An extra disk: ``/dev/disk/by-id/virtio-NAME`` in the guest (NAME at most 20 characters)."""
    path: Path
    name: str
    readonly: bool = True
    format: str = "raw"

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,20}", self.name):
            raise ValueError(f"disk name {self.name!r}: 1-20 of [A-Za-z0-9_.-] (a virtio-blk serial)")


class _GuestAgent:
    """A qemu-guest-agent client (JSON lines over the virtio-serial port's host socket)."""

    def __init__(self, path: Path) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.connect(str(path))
        self._buf = b""
        self._lock = threading.Lock()
        self._synced = False

    def close(self) -> None:
        self._sock.close()

    def _send(self, msg: dict, prefix: bytes = b"") -> None:
        self._sock.sendall(prefix + json.dumps(msg).encode() + b"\n")

    def _recv(self, deadline: float) -> dict:
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout
            self._sock.settimeout(left)
            chunk = self._sock.recv(65536)
            if not chunk:
                raise DeviceVMError("the guest agent's socket closed (QEMU gone?)")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line.lstrip(b"\xff"))  # 0xff: guest-sync-delimited's marker

    def sync(self, deadline: float, alive=lambda: True) -> None:
        """Wait until the agent answers, throwing away answers meant for earlier attempts (while
        the guest boots, attempts queue up and are all answered once the agent starts)."""
        while True:
            if not alive():
                raise DeviceVMError("QEMU exited")
            sid = random.randrange(1, 2**31)
            # 0xff first: resets the agent's parser if a request was cut off
            self._send({"execute": "guest-sync-delimited", "arguments": {"id": sid}}, b"\xff")
            attempt_end = min(deadline, time.monotonic() + 2.0)
            try:
                while self._recv(attempt_end).get("return") != sid:
                    pass
                self._synced = True
                return
            except socket.timeout:
                if time.monotonic() >= deadline:
                    raise

    def call(self, command: str, timeout: float = 30.0, **arguments) -> object:
        with self._lock:
            deadline = time.monotonic() + timeout
            if not self._synced:
                self.sync(deadline)
            msg = {"execute": command}
            if arguments:
                msg["arguments"] = arguments
            self._send(msg)
            try:
                reply = self._recv(deadline)
            except socket.timeout:
                self._synced = False
                raise DeviceVMError(f"the guest agent did not answer {command} in {timeout} s") from None
        if "error" in reply:
            raise GuestAgentError(f"{command}: {reply['error'].get('desc', reply['error'])}")
        return reply.get("return")

    def send_only(self, command: str, **arguments) -> None:
        """For guest-shutdown, which never answers."""
        with self._lock:
            self._send({"execute": command, "arguments": arguments})


class _Qmp:
    """A minimal QMP client (QEMU's own control socket)."""

    def __init__(self, path: Path, timeout: float = 10.0) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        s.connect(str(path))
        self._file = s.makefile("rwb")
        self._s = s
        json.loads(self._file.readline())  # greeting
        self.command("qmp_capabilities")

    def command(self, execute: str, **arguments) -> object:
        self._file.write(json.dumps({"execute": execute, "arguments": arguments}).encode() + b"\n")
        self._file.flush()
        while True:
            reply = json.loads(self._file.readline())
            if "event" in reply:
                continue
            if "error" in reply:
                raise DeviceVMError(f"QMP {execute}: {reply['error'].get('desc')}")
            return reply.get("return")

    def close(self) -> None:
        self._file.close()
        self._s.close()


def _die_with_parent() -> None:
    """preexec_fn: QEMU gets SIGKILL when the thread that started it ends."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _q(path: os.PathLike | str) -> str:
    """A path as the value of a QEMU option (a comma is written twice)."""
    return str(path).replace(",", ",,")


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return "(none)"
    return "\n".join(_ANSI.sub("", text).splitlines()[-lines:])


class DeviceVM:
    """One device VM; see the module docstring. Not thread-safe except ``run``/``put``/``get``."""

    def __init__(self, arch: str = "amd64", workdir: Path | str = ".", *,
                 forwards: Mapping[int, int] | None = None,
                 serials: Mapping[str, str | os.PathLike] | None = None,
                 disks: Sequence[Disk] = (), memory_mb: int = 1024, cpus: int = 2,
                 image: Path | None = None, kernel_args: Sequence[str] = (),
                 qemu_args: Sequence[str] = ()) -> None:
        self.arch = normalize_arch(arch)
        self.workdir = Path(workdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.forwards = {int(g): int(h) for g, h in (forwards or {}).items()}
        self.serials = dict(serials or {})
        self.disks = list(disks)
        if len(self.disks) > _MAX_DISKS:
            raise ValueError(f"at most {_MAX_DISKS} extra disks")
        if len(self.serials) > _MAX_SERIALS:
            raise ValueError(f"at most {_MAX_SERIALS} serial lines")
        for name in self.serials:
            if not re.fullmatch(r"[A-Za-z0-9_-]{1,32}", name):
                raise ValueError(f"serial line name {name!r}: 1-32 of [A-Za-z0-9_-]")
        self.memory_mb, self.cpus = memory_mb, cpus
        self.image = Path(image) if image else None
        self.kernel_args, self.qemu_args = list(kernel_args), list(qemu_args)
        self.overlay = self.workdir / "root.qcow2"
        self.console_log = self.workdir / "console.log"
        self.qemu_log = self.workdir / "qemu.log"
        sockdir = self.workdir
        if len(str(sockdir / "qga.sock")) > 100:  # AF_UNIX paths are limited to 108 bytes
            sockdir = Path(tempfile.mkdtemp(prefix="devicevm-"))
        self._qga_path, self._qmp_path = sockdir / "qga.sock", sockdir / "qmp.sock"
        self._proc: subprocess.Popen | None = None
        self._agent: _GuestAgent | None = None
        self._image_lock = None
        self._serial_devices: dict[str, str] | None = None
        self.boots = 0
        self.state: str | None = None
        """``systemctl is-system-running`` after the last boot: running or degraded."""
        self.boot_seconds: float | None = None

    # ---- life cycle ----------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def boot(self, timeout: float = 300.0) -> float:
        """Start QEMU and wait until ``systemctl is-system-running --wait`` says running or
        degraded (``self.state``). Returns the seconds it took. The console is appended to
        ``self.console_log`` (one ``==== boot N`` line before each boot)."""
        if self.running:
            raise DeviceVMError("already running")
        t0 = time.monotonic()
        deadline = t0 + timeout
        if self.image is None:
            self.image = build_image(self.arch)
        if self._image_lock is None:
            # a shared lock for as long as this VM may boot: build.sh never deletes an image
            # some overlay still stands on
            self._image_lock = open(self.image / ".complete", "rb")
            fcntl.flock(self._image_lock, fcntl.LOCK_SH)
        if not self.overlay.exists():
            self._make_overlay()
        argv = self.qemu_argv()
        self.boots += 1
        self._serial_devices = None
        with open(self.console_log, "a") as f:
            f.write(f"\n==== boot {self.boots} ({time.strftime('%H:%M:%S')}) ====\n")
        for p in (self._qga_path, self._qmp_path):
            p.unlink(missing_ok=True)
        with open(self.qemu_log, "a") as log:
            log.write(f"\n==== boot {self.boots}: {' '.join(argv)}\n")
            log.flush()
            self._proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True,
                                          preexec_fn=_die_with_parent)
        try:
            wait_until(lambda: self._qga_path.exists() or not self.running, timeout=30,
                       what="QEMU to create the guest agent's socket")
            if not self.running:
                raise DeviceVMError("QEMU exited at once")
            self._agent = _GuestAgent(self._qga_path)
            try:
                self._agent.sync(deadline, alive=lambda: self.running)
            except socket.timeout:
                raise DeviceVMError(f"the guest agent did not answer within {timeout} s") from None
            left = max(5.0, deadline - time.monotonic())
            rc, out, err = self.run("systemctl is-system-running --wait", timeout=left)
            self.state = out.strip()
            if self.state not in ("running", "degraded"):
                raise DeviceVMError(f"systemctl is-system-running: {self.state!r} {err.strip()}")
        except Exception as e:
            alive = self.running
            self._kill()
            raise DeviceVMError(
                f"{self.arch} device VM did not boot ({e}; QEMU {'was running' if alive else 'had exited'}).\n"
                f"QEMU log {self.qemu_log}:\n{_tail(self.qemu_log, 10)}\n"
                f"console {self.console_log}:\n{_tail(self.console_log)}") from e
        self.boot_seconds = time.monotonic() - t0
        return self.boot_seconds

    def power_cut(self) -> None:
        """Pull the plug: SIGKILL QEMU (and its guestfwd helpers). The disk (cache=none) keeps
        exactly what the guest had flushed; everything in the guest's page cache is gone."""
        if self._proc is None:
            raise DeviceVMError("not running")
        self._kill()

    def shutdown(self, timeout: float = 90.0) -> None:
        """A clean power-off from inside (``shutdown -P now`` through the guest agent). If the
        guest has not powered off within ``timeout`` it is killed and DeviceVMError raised."""
        if self._proc is None:
            return
        if self.running and self._agent is not None:
            try:
                self._agent.send_only("guest-shutdown", mode="powerdown")
            except OSError:
                pass
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._kill()
            raise DeviceVMError(f"the guest did not power off within {timeout} s; killed "
                                f"(console: {self.console_log})") from None
        self._kill()  # closes the sockets, reaps the guestfwd helpers

    def reboot(self, timeout: float = 300.0) -> float:
        """A clean reboot: shutdown, then boot (QEMU runs with -no-reboot, so a reboot from
        inside the guest ends QEMU too: ``wait_exit`` and then ``boot`` again)."""
        self.shutdown()
        return self.boot(timeout)

    def wait_exit(self, timeout: float) -> int:
        """Wait for QEMU to end on its own (the guest powered off or rebooted); its exit code."""
        if self._proc is None:
            raise DeviceVMError("not running")
        try:
            rc = self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise DeviceVMError(f"QEMU still running after {timeout} s") from None
        self._kill()
        return rc

    def _kill(self) -> None:
        if self._agent is not None:
            self._agent.close()
            self._agent = None
        if self._proc is not None:
            try:
                os.killpg(self._proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self._proc.wait()
            self._proc = None

    def close(self) -> None:
        """Kill QEMU if it runs and let go of the base image (the overlay stays in workdir)."""
        self._kill()
        if self._image_lock is not None:
            self._image_lock.close()
            self._image_lock = None

    def __enter__(self) -> DeviceVM:
        self.boot()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None and self.running:
                self.shutdown()
        finally:
            self.close()  # after a failure: killed at once, the logs as they were

    # ---- inside the guest --------------------------------------------------------------------

    def _need_agent(self) -> _GuestAgent:
        if self._agent is None or not self.running:
            raise DeviceVMError("the device VM is not running")
        return self._agent

    def run(self, cmd: str | Sequence[str], timeout: float = 60.0, *, input: bytes | None = None,
            env: Mapping[str, str] | None = None, check: bool = False) -> tuple[int, str, str]:
        """Run ``cmd`` in the guest as root (a string goes to ``/bin/sh -c``), wait for it and
        return (exit code, stdout, stderr). It is killed after ``timeout`` s (GuestTimeout).
        ``env`` replaces the environment (qemu-guest-agent's: PATH and little else).
        ``check=True`` raises DeviceVMError on a non-zero exit code."""
        agent = self._need_agent()
        argv = ["/bin/sh", "-c", cmd] if isinstance(cmd, str) else [str(a) for a in cmd]
        # coreutils timeout in the guest: the agent itself has no way to kill what it started
        argv = ["-k", "5", f"{timeout:g}s", *argv]
        args: dict = {"path": "/usr/bin/timeout", "arg": argv, "capture-output": True}
        if input is not None:
            args["input-data"] = base64.b64encode(input).decode()
        if env is not None:  # the whole environment of the command (PATH unless given)
            args["env"] = [f"{k}={v}" for k, v in {"PATH": _GUEST_PATH, **env}.items()]
        t0 = time.monotonic()
        pid = agent.call("guest-exec", **args)["pid"]
        wait = 0.002
        while True:
            st = agent.call("guest-exec-status", pid=pid)
            if st["exited"]:
                break
            if time.monotonic() - t0 > timeout + 30:
                raise DeviceVMError(f"the guest agent lost track of {cmd!r}")
            time.sleep(wait)
            wait = min(wait * 2, 0.05)
        rc = st.get("exitcode", -st.get("signal", 0) or -1)
        out = base64.b64decode(st.get("out-data", "")).decode(errors="replace")
        err = base64.b64decode(st.get("err-data", "")).decode(errors="replace")
        if rc in (124, 137) and time.monotonic() - t0 >= timeout:
            raise GuestTimeout(f"{cmd!r} did not finish within {timeout:g} s in the guest "
                               f"(killed); output so far: {out[-2000:]!r} {err[-2000:]!r}")
        if check and rc != 0:
            raise DeviceVMError(f"{cmd!r} failed in the guest (exit {rc}): {err.strip() or out.strip()}")
        return rc, out, err

    def put(self, path: str, data: bytes, mode: int | None = None) -> None:
        """Write ``data`` to ``path`` in the guest (replacing it; the directory must exist)."""
        agent = self._need_agent()
        h = agent.call("guest-file-open", path=path, mode="wb")
        try:
            view = memoryview(data)
            for off in range(0, max(len(data), 1), 1 << 20):
                chunk = bytes(view[off:off + (1 << 20)])
                agent.call("guest-file-write", handle=h, **{"buf-b64": base64.b64encode(chunk).decode()})
        finally:
            agent.call("guest-file-close", handle=h)
        if mode is not None:
            self.run(["chmod", f"{mode:o}", path], check=True)

    def get(self, path: str) -> bytes:
        """The contents of ``path`` in the guest."""
        agent = self._need_agent()
        h = agent.call("guest-file-open", path=path, mode="rb")
        parts = []
        try:
            while True:
                r = agent.call("guest-file-read", handle=h, count=1 << 20)
                parts.append(base64.b64decode(r.get("buf-b64", "")))
                if r.get("eof") or not r.get("count"):
                    break
        finally:
            agent.call("guest-file-close", handle=h)
        return b"".join(parts)

    def serial_device(self, name: str) -> str:
        """The guest's tty for serial line ``name`` (e.g. ``/dev/ttyS1``)."""
        if name not in self.serials:
            raise KeyError(name)
        if self._serial_devices is None:
            names = list(self.serials)
            script = "; ".join(f"ls /sys/bus/pci/devices/0000:00:{_SLOT_SERIALS + i:02x}.0/tty/"
                               for i in range(len(names)))
            rc, out, err = self.run(script, check=True)
            self._serial_devices = dict(zip(names, (f"/dev/{t}" for t in out.split())))
        return self._serial_devices[name]

    def qmp(self, execute: str, **arguments) -> object:
        """One QMP command to QEMU itself (e.g. ``query-status``, ``stop``, ``cont``)."""
        if not self.running:
            raise DeviceVMError("the device VM is not running")
        q = _Qmp(self._qmp_path)
        try:
            return q.command(execute, **arguments)
        finally:
            q.close()

    # ---- QEMU --------------------------------------------------------------------------------

    def _make_overlay(self) -> None:
        base = self.image / "rootfs.img"
        res = subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(base),
                              str(self.overlay)], capture_output=True, text=True)
        if res.returncode != 0:
            raise DeviceVMError(f"qemu-img create {self.overlay} failed: {res.stderr.strip()}")

    def _check_o_direct(self) -> None:
        probe = self.workdir / ".o_direct_probe"
        try:
            os.close(os.open(probe, os.O_CREAT | os.O_WRONLY | os.O_DIRECT, 0o600))
        except OSError as e:
            if e.errno == errno.EINVAL:
                raise DeviceVMError(f"{self.workdir} is on a filesystem without O_DIRECT (tmpfs?): "
                                    "the disk's cache=none needs it; use a workdir on disk") from None
            raise
        finally:
            probe.unlink(missing_ok=True)

    def qemu_argv(self) -> list[str]:
        """The QEMU command line of this VM (also written to ``qemu_log`` at each boot)."""
        a = ARCHES[self.arch]
        self._check_o_direct()
        if self.forwards and shutil.which("socat") is None:
            raise DeviceVMError("forwards need socat on the host (scripts/devicevm/build.sh installs it)")
        append = " ".join([f"root=/dev/vda ro fsck.repair=yes console={a.console}", "net.ifnames=0",
                           "panic=-1", "systemd.log_color=0", *self.kernel_args])
        argv = [a.qemu, *a.machine, "-accel", "tcg,thread=multi", "-smp", str(self.cpus),
                "-m", str(self.memory_mb), "-nodefaults", "-no-user-config", "-display", "none",
                "-no-reboot",
                "-kernel", _q(self.image / "vmlinuz"), "-initrd", _q(self.image / "initrd.img"),
                "-append", append,
                "-chardev", f"file,id=console,path={_q(self.console_log)},append=on",
                "-serial", "chardev:console",
                "-drive", f"file={_q(self.overlay)},format=qcow2,if=none,id=root,cache=none,discard=unmap",
                "-device", f"virtio-blk-pci,drive=root,addr={_SLOT_ROOT:#x}"]
        for i, d in enumerate(self.disks):
            # a disk the guest writes gets the root's power-cut semantics (and needs O_DIRECT)
            mode = "readonly=on" if d.readonly else "cache=none"
            argv += ["-drive", f"file={_q(Path(d.path).resolve())},format={d.format},if=none,id=disk{i},{mode}",
                     "-device", f"virtio-blk-pci,drive=disk{i},serial={d.name},addr={_SLOT_DISKS + i:#x}"]
        net = "user,id=net0,restrict=on"
        for g, h in sorted(self.forwards.items()):
            net += f",guestfwd=tcp:{GUEST_FWD_ADDR}:{g}-cmd:socat - TCP:127.0.0.1:{h}"
        argv += ["-netdev", net, "-device", f"virtio-net-pci,netdev=net0,romfile=,addr={_SLOT_NET:#x}",
                 "-device", f"virtio-serial-pci,addr={_SLOT_VSERIAL:#x}",
                 "-chardev", f"socket,id=qga,path={_q(self._qga_path)},server=on,wait=off",
                 "-device", "virtserialport,chardev=qga,name=org.qemu.guest_agent.0",
                 "-chardev", f"socket,id=qmp,path={_q(self._qmp_path)},server=on,wait=off",
                 "-mon", "chardev=qmp,mode=control"]
        for i, (name, host) in enumerate(self.serials.items()):
            if not Path(host).is_char_device():
                raise DeviceVMError(f"serial line {name}: {host} is not a tty on the host")
            argv += ["-chardev", f"serial,id=serial-{name},path={_q(host)}",
                     "-device", f"pci-serial,chardev=serial-{name},addr={_SLOT_SERIALS + i:#x}"]
        return argv + self.qemu_args
