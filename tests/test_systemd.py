"""systemd integration: sd_notify over a real AF_UNIX datagram socket, the liveness-gated
watchdog, the unit file (checked by systemd's own ``systemd-analyze``) and install.sh --dry-run."""
from __future__ import annotations

import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.device import systemd
from agent.device.systemd import Watchdog

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "systemd" / "dongle-agent.service"
INSTALL = ROOT / "scripts" / "install.sh"
WAIT_S = 10.0


class NotifySocket:
    """The receiving end systemd would hold: a bound AF_UNIX datagram socket."""

    def __init__(self, sock: socket.socket, env_value: str):
        self.sock = sock
        self.env_value = env_value

    def recv(self, timeout: float = WAIT_S) -> str:
        self.sock.settimeout(timeout)
        return self.sock.recv(4096).decode()

    def assert_silent(self, wait: float = 0.3) -> None:
        self.sock.settimeout(wait)
        with pytest.raises(TimeoutError):
            msg = self.sock.recv(4096)
            pytest.fail(f"unexpected notification {msg!r}")


@pytest.fixture(params=["path", "abstract"])
def notify_socket(request, monkeypatch) -> Iterator[NotifySocket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    tmpdir = None
    if request.param == "path":
        tmpdir = tempfile.mkdtemp(prefix="sdn", dir="/tmp")  # short: sun_path is 108 bytes
        addr: str | bytes = os.path.join(tmpdir, "notify")
        env_value = addr
    else:
        name = f"dongle-test-{uuid.uuid4().hex}"
        addr = b"\0" + name.encode()
        env_value = "@" + name
    sock.bind(addr)
    monkeypatch.setenv("NOTIFY_SOCKET", env_value)
    try:
        yield NotifySocket(sock, env_value)
    finally:
        sock.close()
        if tmpdir:
            shutil.rmtree(tmpdir, ignore_errors=True)


# --- sd_notify -------------------------------------------------------------------------------

def test_notify_messages_reach_the_socket(notify_socket):
    assert systemd.notify_ready()
    assert notify_socket.recv() == "READY=1"
    assert systemd.notify_ready("collecting")
    assert notify_socket.recv() == "READY=1\nSTATUS=collecting"
    assert systemd.notify_status("uplink:\nconnected")  # a newline would start a new assignment
    assert notify_socket.recv() == "STATUS=uplink: connected"
    assert systemd.notify_stopping()
    assert notify_socket.recv() == "STOPPING=1"
    assert systemd.watchdog_ping()
    assert notify_socket.recv() == "WATCHDOG=1"
    assert systemd.notify_extend_timeout(2.5)
    assert notify_socket.recv() == "EXTEND_TIMEOUT_USEC=2500000"


def test_no_op_outside_systemd(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.notify_ready() is False
    assert systemd.watchdog_ping() is False


def test_unreachable_socket_is_logged_not_raised(monkeypatch, caplog, tmp_path):
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    assert systemd.notify_status("x") is False
    assert "sd_notify" in caplog.text
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    assert systemd.watchdog_ping() is False


@pytest.mark.parametrize("usec, pid, expected", [
    (None, None, None),
    ("30000000", None, 30.0),
    ("30000000", "self", 30.0),
    ("30000000", "other", None),      # inherited from a parent: not ours
    ("0", None, None),
    ("soon", None, None),
    ("30000000", "x", None),
])
def test_watchdog_interval(monkeypatch, usec, pid, expected):
    for name, value in (("WATCHDOG_USEC", usec), ("WATCHDOG_PID", pid)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            value = {"self": str(os.getpid()), "other": str(os.getpid() + 1)}.get(value, value)
            monkeypatch.setenv(name, value)
    assert systemd.watchdog_interval() == expected


# --- Watchdog --------------------------------------------------------------------------------

class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_watchdog_pings_only_while_every_loop_beats(notify_socket):
    clock = Clock()
    wd = Watchdog(30.0, clock=clock)
    wd.register("obd")
    wd.register("uplink")
    assert wd.tick()  # registration counts as a first beat
    assert notify_socket.recv() == "WATCHDOG=1"

    clock.t += 20
    wd.beat("obd")
    wd.beat("uplink")
    clock.t += 20
    assert wd.tick() and notify_socket.recv() == "WATCHDOG=1"

    wd.beat("obd")   # uplink wedged: 31 s since its last beat
    clock.t += 11
    assert wd.stale() == ["uplink"]
    assert not wd.tick()
    assert notify_socket.recv() == "STATUS=stalled: uplink"   # visible in systemctl status
    notify_socket.assert_silent()
    assert not wd.tick()  # stays silent, status not repeated
    notify_socket.assert_silent()

    wd.beat("uplink")  # recovered before systemd acted
    assert wd.tick()
    assert notify_socket.recv() == "STATUS=all loops alive"
    assert notify_socket.recv() == "WATCHDOG=1"


def test_per_loop_timeout_and_unregister(notify_socket):
    clock = Clock()
    wd = Watchdog(30.0, clock=clock)
    wd.register("obd")
    wd.register("ota", timeout=120.0)   # a loop that legitimately blocks longer
    clock.t += 60
    wd.beat("obd")
    assert wd.stale() == [] and wd.tick()
    assert notify_socket.recv() == "WATCHDOG=1"
    clock.t += 61
    wd.beat("obd")
    assert wd.stale() == ["ota"]
    wd.unregister("ota")                # ended on purpose: no longer checked
    assert wd.stale() == [] and wd.tick()
    assert notify_socket.recv() == "WATCHDOG=1"


def test_beat_from_unknown_loop_does_not_register_it(caplog):
    clock = Clock()
    wd = Watchdog(30.0, clock=clock, ping=lambda: True)
    wd.beat("typo")
    clock.t += 100
    assert wd.stale() == [] and wd.tick()
    assert "unregistered loop 'typo'" in caplog.text


def test_disabled_outside_systemd(monkeypatch):
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    wd = Watchdog()
    assert not wd.enabled
    wd.start()                      # nothing to ping: no thread
    assert "sd-watchdog" not in [t.name for t in threading.enumerate()]
    clock = Clock()
    wd = Watchdog(clock=clock)      # but stalled loops are still reported
    wd.register("obd")
    clock.t += systemd.DEFAULT_TIMEOUT_S + 1
    assert wd.stale() == ["obd"]


def test_interval_comes_from_systemd_environment(monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "4000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    wd = Watchdog()
    assert wd.enabled and wd.interval == 4.0 and wd.period == 2.0


def test_thread_pings_and_stops_when_a_loop_stalls(notify_socket):
    wd = Watchdog(0.4)               # pings every 0.2 s
    wd.register("obd")
    beating = threading.Event()
    beating.set()

    def loop() -> None:
        while beating.is_set():
            wd.beat("obd")
            time.sleep(0.02)

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    wd.start()
    try:
        assert [notify_socket.recv() for _ in range(3)] == ["WATCHDOG=1"] * 3
        beating.clear()
        t.join()
        # within one interval the stall is noticed; after that, no more pings
        deadline = time.monotonic() + WAIT_S
        while (msg := notify_socket.recv()) == "WATCHDOG=1":
            assert time.monotonic() < deadline, "watchdog kept pinging for a stalled loop"
        assert msg == "STATUS=stalled: obd"
        notify_socket.assert_silent(wait=1.0)
    finally:
        wd.stop()
    assert "sd-watchdog" not in [t.name for t in threading.enumerate()]


# --- the unit file ---------------------------------------------------------------------------

def parse_unit(text: str) -> dict[str, list[str]]:
    """``Section.Key -> [values]`` (systemd keys may repeat; comments and blanks skipped)."""
    out: dict[str, list[str]] = {}
    section = ""
    for line in text.splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.setdefault(f"{section}.{key}", []).append(value)
    return out


def test_unit_runs_the_installed_entry_point_under_the_watchdog():
    unit = parse_unit(UNIT.read_text())
    assert unit["Service.Type"] == ["notify"]
    assert unit["Service.NotifyAccess"] == ["main"]
    assert unit["Service.WatchdogSec"] == ["30"]
    assert unit["Service.User"] == ["dongle"]
    exe, *args = unit["Service.ExecStart"][0].split()
    # the path install.sh creates, and the console script setup.py declares
    assert exe == "/opt/dongle/venv/bin/dongle-agent"
    assert 'VENV=$PREFIX/venv' in INSTALL.read_text() and "PREFIX=/opt/dongle" in INSTALL.read_text()
    assert '"dongle-agent=agent.daemon:main"' in (ROOT / "setup.py").read_text()
    assert args == ["--config", "/etc/dongle/agent.toml"]
    # config errors exit 2 (agent.daemon): restarting cannot fix them
    assert unit["Service.RestartPreventExitStatus"] == ["2"]
    assert unit["Service.CapabilityBoundingSet"] == [""]


def _unit_copy(tmp_path: Path, text: str | None = None) -> Path:
    """A copy whose ExecStart names an existing binary (verify checks it is executable)."""
    text = text if text is not None else UNIT.read_text()
    text = text.replace("ExecStart=/opt/dongle/venv/bin/dongle-agent", "ExecStart=/bin/true")
    path = tmp_path / "dongle-agent.service"
    path.write_text(text)
    return path


needs_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze not installed (apt package `systemd`; add it to scripts/setup.sh)")


def verify(path: Path) -> list[str]:
    """systemd's own checks of ``path``: the lines of its complaints about our unit.

    `systemd-analyze verify` exits 0 for unknown keys and unparsable values (it only warns),
    so the warnings that name our file or unit are what count. Warnings about other units of
    this machine are not ours.
    """
    r = subprocess.run(["systemd-analyze", "verify", "--man=no", str(path)],
                       capture_output=True, text=True, timeout=120)
    ours = [ln for ln in (r.stdout + r.stderr).splitlines()
            if str(path) in ln or path.name in ln]
    if r.returncode != 0 and not ours:
        ours = [f"systemd-analyze exited {r.returncode}: {r.stderr.strip()}"]
    return ours


@needs_analyze
def test_unit_passes_systemd_analyze_verify(tmp_path):
    assert verify(_unit_copy(tmp_path)) == []


@needs_analyze
def test_verify_catches_a_broken_unit(tmp_path):
    """The check above can fail: a typo'd key and a bad value are reported."""
    text = UNIT.read_text().replace("WatchdogSec=30", "WatchdogSec=3O").replace(
        "DeviceAllow=char-ttyUSB rw", "DeviceAlow=char-ttyUSB rw")
    problems = verify(_unit_copy(tmp_path, text))
    assert any("WatchdogSec" in p or "3O" in p for p in problems), problems
    assert any("DeviceAlow" in p for p in problems), problems


@needs_analyze
def test_unit_hardening_exposure(tmp_path):
    r = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--no-pager",
                        str(_unit_copy(tmp_path))], capture_output=True, text=True, timeout=120)
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", r.stdout + r.stderr)
    if m is None:
        pytest.skip(f"this systemd-analyze has no offline security check: {r.stderr.strip()[:200]}")
    # 2.1 now ("OK"); what is left is inherent: network and device access, supplementary groups
    assert float(m.group(1)) <= 2.5, r.stdout


# --- install.sh ------------------------------------------------------------------------------

TOUCHED = ["/opt/dongle", "/etc/dongle", "/var/lib/dongle", "/usr/local/bin/dongle",
           "/etc/systemd/system/dongle-agent.service",
           "/etc/systemd/system/multi-user.target.wants/dongle-agent.service"]


def _snapshot() -> dict[str, object]:
    snap: dict[str, object] = {}
    for p in TOUCHED:
        try:
            st = os.lstat(p)
            snap[p] = (stat.S_IFMT(st.st_mode), st.st_mtime_ns, st.st_uid, st.st_gid, st.st_mode)
        except FileNotFoundError:
            snap[p] = None
    for db in ("/etc/passwd", "/etc/group"):
        snap[db] = Path(db).read_bytes()
    return snap


def test_install_dry_run_changes_nothing_and_shows_the_plan():
    before = _snapshot()
    r = subprocess.run(["bash", str(INSTALL), "--dry-run"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert _snapshot() == before
    out = r.stdout
    assert "dry run: nothing will be changed" in out
    fresh = before["/opt/dongle"] is None
    if fresh:  # on a machine where it was never installed, every step is in the plan
        assert "python3 -m venv /opt/dongle/slots/" in out and "/opt/dongle/current" in out
        assert "/etc/dongle/agent.toml" in out and "agent.example.toml" in out
        assert "systemctl enable dongle-agent.service" in out
        assert "install -d -o dongle -g dongle -m 0750 /var/lib/dongle" in out
    if b"\ndongle:" not in b"\n" + before["/etc/passwd"]:  # type: ignore[operator]
        assert "useradd --system --gid dongle" in out
    # never started by the installer: only once provisioned
    assert "systemctl start" not in "\n".join(ln for ln in out.splitlines() if ln.startswith("+"))
    assert re.search(r"/opt/dongle/slots/[^/ ]+/bin/pip install", out) and str(ROOT) in out


def test_install_rejects_unknown_arguments():
    r = subprocess.run(["bash", str(INSTALL), "--dry-run", "--bogus"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode != 0 and "unknown argument: --bogus" in r.stderr


# --- the daemon's log under systemd (JOURNAL_STREAM) ---------------------------------------------

LOG_PROBE = """
import logging, sys
from agent.daemon import configure_logging
configure_logging(logging.INFO)
log = logging.getLogger("probe")
log.info("hello")
log.warning("careful")
try:
    1 / 0
except ZeroDivisionError:
    log.exception("failed")
"""


def _log_lines(tmp_path, journal: str | None) -> list[str]:
    out = tmp_path / "stderr"
    with open(out, "w") as f:
        st = os.fstat(f.fileno())
        env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
        if journal == "this":
            env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        elif journal == "other":
            env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino + 1}"   # inherited, stderr redirected since
        subprocess.run([sys.executable, "-c", LOG_PROBE], stderr=f, env=env, cwd=ROOT, check=True)
    return out.read_text().splitlines()


def test_under_the_journal_lines_carry_priorities_and_no_timestamp(tmp_path):
    lines = _log_lines(tmp_path, "this")
    assert lines[:3] == ["<6>probe: hello", "<4>probe: careful", "<3>probe: failed"]
    # a traceback stays one record's priority, line by line (journald splits on newlines)
    assert lines[3] == "<3>Traceback (most recent call last):" and lines[-1] == "<3>ZeroDivisionError: division by zero"
    assert all(line.startswith("<3>") for line in lines[2:])


@pytest.mark.parametrize("journal", [None, "other"])
def test_elsewhere_lines_are_timestamped(tmp_path, journal):
    lines = _log_lines(tmp_path, journal)
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO probe: hello", lines[0])
    assert not any(line.startswith("<") for line in lines)
