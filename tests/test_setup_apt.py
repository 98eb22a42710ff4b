"""Set-up's apt step (scripts/apt-install.sh, run by scripts/setup.sh) when another process
holds the package manager, as unattended-upgrades does on a fresh Debian or Pi OS: it says who
holds which lock, waits, and goes on once the lock is free; or gives up after
SETUP_APT_LOCK_TIMEOUT with a message naming the holder.

The lock is held here as apt and dpkg hold it (an fcntl write lock on the real lock file), by a
child process that lets go when told; the package is ``make``, installed already, so apt-get
takes the locks and changes nothing.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "apt-install.sh"

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("apt-get") is None
    or subprocess.run(["dpkg", "-s", "make"], capture_output=True).returncode != 0,
    reason="needs root, apt-get and make installed (the package the test asks for)")

HOLD = textwrap.dedent("""
    import fcntl, os, sys
    fd = os.open(sys.argv[1], os.O_RDWR)
    fcntl.lockf(fd, fcntl.LOCK_EX)      # waits for a real apt run of another user, if any
    print("held", flush=True)
    sys.stdin.read()                    # until the test closes our stdin
""")


class Holder:
    """A process holding ``lock`` until :meth:`release`."""

    def __init__(self, lock: str):
        self.proc = subprocess.Popen([sys.executable, "-c", HOLD, lock], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "held"
        self.name = Path(f"/proc/{self.proc.pid}/comm").read_text().strip()

    def release(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(10)


def start_apt_step(**env: str) -> subprocess.Popen:
    return subprocess.Popen([str(SCRIPT), "make"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, **env})


def read_until(proc: subprocess.Popen, text: str, lines: list[str], timeout: float = 60.0) -> str:
    """The first output line containing ``text`` (reading on; every line into ``lines``)."""
    deadline = time.monotonic() + timeout
    for line in proc.stdout:
        lines.append(line.rstrip("\n"))
        if text in line:
            return line
        assert time.monotonic() < deadline, lines
    raise AssertionError(f"the apt step ended without {text!r}: {lines}")


@pytest.mark.parametrize("lock", ["/var/lib/dpkg/lock-frontend", "/var/lib/apt/lists/lock"])
def test_the_apt_step_waits_for_the_lock_and_goes_on(lock):
    holder = Holder(lock)
    lines: list[str] = []
    try:
        proc = start_apt_step(SETUP_APT_LOCK_TIMEOUT="120")
        waiting = read_until(proc, "waiting for the package manager", lines)
        assert f"{holder.name} (pid {holder.proc.pid}) holds {lock}" in waiting
        assert proc.poll() is None                      # still waiting while the lock is held
    finally:
        holder.release()
    read_until(proc, "the package manager is free", lines)
    lines += proc.stdout.read().splitlines()
    assert proc.wait(120) == 0, lines
    assert not any("Could not get lock" in line or "failed" in line for line in lines), lines


def test_the_apt_step_gives_up_after_its_timeout_naming_the_holder():
    holder = Holder("/var/lib/dpkg/lock-frontend")
    try:
        proc = start_apt_step(SETUP_APT_LOCK_TIMEOUT="2")
        out, _ = proc.communicate(timeout=60)
    finally:
        holder.release()
    assert proc.returncode == 1, out
    assert f"gave up after 2 s waiting for {holder.name} (pid {holder.proc.pid}), which holds " \
           "/var/lib/dpkg/lock-frontend" in out
    assert "SETUP_APT_LOCK_TIMEOUT" in out
