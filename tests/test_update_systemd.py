"""The update units: systemd's own checks (`systemd-analyze verify`, `security --offline`) of the
agent with its update drop-in, the rollback unit, the installer and its path unit, and what
they must say: the agent's sandbox cannot write its code, the installer has no network and
writes only /opt/dongle, install.sh installs every one of them."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.test_systemd import parse_unit, verify

ROOT = Path(__file__).resolve().parent.parent
SYSTEMD = ROOT / "systemd"
AGENT = SYSTEMD / "dongle-agent.service"
DROPIN = SYSTEMD / "dongle-agent.service.d" / "update.conf"
ROLLBACK = SYSTEMD / "dongle-agent-rollback.service"
INSTALLER = SYSTEMD / "dongle-update-install.service"
TRIGGER = SYSTEMD / "dongle-update-install.path"
INSTALL_SH = ROOT / "scripts" / "install.sh"

needs_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                   reason="systemd-analyze not installed")


def _runnable(text: str) -> str:
    """verify checks that executables exist: point ours at /bin/true."""
    for exe in ("/opt/dongle/venv/bin/dongle-agent", "/opt/dongle/current/bin/dongle-update",
                "/opt/dongle/previous/bin/dongle-update"):
        text = text.replace(exe, "/bin/true")
    return text


def _merged() -> str:
    return AGENT.read_text() + "\n" + DROPIN.read_text()


def test_dropin_wires_the_trial_helpers_and_rollback_as_root() -> None:
    d = parse_unit(DROPIN.read_text())
    assert d["Unit.OnFailure"] == ["dongle-agent-rollback.service"]
    # "+": the hooks change /opt/dongle, so they run as root outside the agent's sandbox
    assert d["Service.ExecStartPre"] == ["-+/opt/dongle/current/bin/dongle-update prestart"]
    assert d["Service.ExecStopPost"] == ["-+/opt/dongle/current/bin/dongle-update poststop"]
    assert d["Service.RestartForceExitStatus"] == ["75"]
    from agent.update.trial import RESTART_EXIT_CODE
    assert RESTART_EXIT_CODE == 75
    # the agent unit restarts after failures, so a crash or watchdog kill is a counted start
    agent = parse_unit(AGENT.read_text())
    assert agent["Service.Restart"] == ["on-failure"]
    assert int(agent["Unit.StartLimitBurst"][0]) > 3   # ours (max_starts=3) acts first


def test_the_agent_cannot_write_its_code() -> None:
    """Nothing of the merged unit makes /opt writable for the agent's process (issue 16: the
    drop-in used to say ReadWritePaths=/opt/dongle, so code run in the agent outlived TUF)."""
    m = parse_unit(_merged())
    assert m["Service.User"] == ["dongle"] and m["Service.ProtectSystem"] == ["strict"]
    writable = [p for v in m.get("Service.ReadWritePaths", []) for p in v.split()]
    assert writable == ["/var/lib/dongle"]
    assert not any(k in m for k in ("Service.BindPaths", "Service.ReadWriteDirectories"))
    assert m["Service.CapabilityBoundingSet"] == [""]


def test_installer_is_root_without_network_writing_only_the_install_root() -> None:
    i = parse_unit(INSTALLER.read_text())
    assert "Service.User" not in i           # root: it writes root's /opt/dongle
    assert i["Service.ExecStart"] == [
        "/opt/dongle/current/bin/dongle-update --config /etc/dongle/agent.toml apply"]
    assert i["Service.ReadWritePaths"] == ["/opt/dongle"] and i["Service.ProtectSystem"] == ["strict"]
    assert i["Service.PrivateNetwork"] == ["yes"] and i["Service.RestrictAddressFamilies"] == ["AF_UNIX"]
    assert i["Service.CapabilityBoundingSet"] == ["CAP_DAC_READ_SEARCH"]
    t = parse_unit(TRIGGER.read_text())
    from agent.settings import UpdateSettings
    from agent.update.slots import Layout
    # the path unit watches the file the agent writes by default
    request_file = Layout(Path("/opt/dongle"), work_dir=UpdateSettings().work_dir).request_file
    assert t["Path.PathChanged"] == [str(request_file)]
    assert t["Path.Unit"] == ["dongle-update-install.service"]
    r = parse_unit(ROLLBACK.read_text())
    assert r["Service.ExecStart"][0].startswith("/opt/dongle/previous/bin/dongle-update rollback")
    assert "Service.User" not in r and r["Service.ReadWritePaths"] == ["/opt/dongle"]


def test_install_sh_installs_every_unit_and_drop_in() -> None:
    text = INSTALL_SH.read_text()
    listed = re.search(r"UNITS=\(([^)]*)\)", text).group(1).split()
    shipped = sorted(str(p.relative_to(SYSTEMD)) for p in SYSTEMD.rglob("*") if p.is_file())
    assert sorted(listed) == shipped
    r = subprocess.run(["bash", str(INSTALL_SH), "--dry-run"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    for u in shipped:
        if not Path("/etc/systemd/system", u).exists():
            assert f"/etc/systemd/system/{u}" in r.stdout, u
    if not Path("/etc/systemd/system/multi-user.target.wants/dongle-update-install.path").exists():
        assert "systemctl enable dongle-update-install.path" in r.stdout


@needs_analyze
def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    units = {"dongle-agent.service": _merged(), ROLLBACK.name: ROLLBACK.read_text(),
             INSTALLER.name: INSTALLER.read_text(), TRIGGER.name: TRIGGER.read_text()}
    for name, text in units.items():
        (tmp_path / name).write_text(_runnable(text))
    for name in units:
        assert verify(tmp_path / name) == [], name


@needs_analyze
def test_verify_would_catch_a_typo(tmp_path: Path) -> None:
    bad = tmp_path / "dongle-update-install.service"
    bad.write_text(_runnable(INSTALLER.read_text()).replace("ReadWritePaths=", "ReadWritePath="))
    assert any("ReadWritePath" in p for p in verify(bad))


def exposure(path: Path) -> float | None:
    """`systemd-analyze security --offline` of a unit file: its overall exposure (0-10)."""
    r = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--no-pager", str(path)],
                       capture_output=True, text=True, timeout=120)
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", r.stdout + r.stderr)
    return float(m.group(1)) if m else None


@needs_analyze
def test_the_privileged_units_are_confined(tmp_path: Path) -> None:
    """Root, but boxed in: the scores are in docs/updates.md (from the device VM, where
    systemd-analyze security looks at the loaded units)."""
    scores = {}
    for unit in (INSTALLER, ROLLBACK):
        copy = tmp_path / unit.name
        copy.write_text(_runnable(unit.read_text()))
        scores[unit.name] = exposure(copy)
    if None in scores.values():
        pytest.skip("this systemd-analyze has no offline security check")
    assert all(v <= 3.0 for v in scores.values()), scores
