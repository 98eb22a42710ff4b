"""The update units: systemd's own checks (`systemd-analyze verify`) of the rollback unit and
of dongle-agent.service with the update drop-in merged in, and what they must say."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.test_systemd import parse_unit, verify

ROOT = Path(__file__).resolve().parent.parent
AGENT = ROOT / "systemd" / "dongle-agent.service"
DROPIN = ROOT / "systemd" / "dongle-agent.service.d" / "update.conf"
ROLLBACK = ROOT / "systemd" / "dongle-agent-rollback.service"

needs_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                   reason="systemd-analyze not installed")


def _runnable(text: str) -> str:
    """verify checks that executables exist: point ours at /bin/true."""
    for exe in ("/opt/dongle/venv/bin/dongle-agent", "/opt/dongle/current/bin/dongle-update",
                "/opt/dongle/previous/bin/dongle-update"):
        text = text.replace(exe, "/bin/true")
    return text


def test_dropin_wires_the_trial_helpers_and_rollback() -> None:
    d = parse_unit(DROPIN.read_text())
    assert d["Unit.OnFailure"] == ["dongle-agent-rollback.service"]
    assert d["Service.ExecStartPre"] == ["-/opt/dongle/current/bin/dongle-update prestart"]
    assert d["Service.ExecStopPost"] == ["-/opt/dongle/current/bin/dongle-update poststop"]
    assert d["Service.RestartForceExitStatus"] == ["75"]
    assert d["Service.ReadWritePaths"] == ["/opt/dongle"]
    from agent.update.trial import RESTART_EXIT_CODE
    assert RESTART_EXIT_CODE == 75
    # the agent unit restarts after failures, so a crash or watchdog kill is a counted start
    agent = parse_unit(AGENT.read_text())
    assert agent["Service.Restart"] == ["on-failure"]
    assert int(agent["Unit.StartLimitBurst"][0]) > 3   # ours (max_starts=3) acts first
    r = parse_unit(ROLLBACK.read_text())
    assert r["Service.ExecStart"][0].startswith("/opt/dongle/previous/bin/dongle-update rollback")
    assert r["Service.User"] == ["dongle"]


@needs_analyze
def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    merged = tmp_path / "dongle-agent.service"
    merged.write_text(_runnable(AGENT.read_text() + "\n" + DROPIN.read_text()))
    rollback = tmp_path / "dongle-agent-rollback.service"
    rollback.write_text(_runnable(ROLLBACK.read_text()))
    assert verify(rollback) == []
    assert verify(merged) == []


@needs_analyze
def test_verify_would_catch_a_typo(tmp_path: Path) -> None:
    bad = tmp_path / "dongle-agent-rollback.service"
    bad.write_text(_runnable(ROLLBACK.read_text()).replace("ReadWritePaths=", "ReadWritePath="))
    assert any("ReadWritePath" in p for p in verify(bad))
