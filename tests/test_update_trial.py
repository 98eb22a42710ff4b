"""Trial and rollback of a new agent version. systemd is not PID 1 here, so the state machine
is driven the way the units drive it: ``dongle-update prestart`` before each start (in a
subprocess, as ExecStartPre= runs it), ``poststop`` with systemd's $SERVICE_RESULT/$EXIT_CODE/
$EXIT_STATUS after each run, the in-agent TrialMonitor, and the OnFailure= rollback command."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from agent.cloud import schemas
from agent.update import bundle, slots, state, trial
from agent.update.cli import main as update_cli
from agent.update.slots import Layout
from agent.update.updater import UpdateSettings, Updater
from tests.support.updates import layout_for, make_tree, opened

pytestmark = pytest.mark.timeout(60)


def _install(layout: Layout, tmp: Path, version: str, counter: int) -> None:
    tar = bundle.build_tar(make_tree(tmp / "trees", version, filler=100),
                           {"component": "agent", "version": version, "release_counter": counter})
    slots.install(layout, version, tar, compile_bytecode=False)


@pytest.fixture
def layout(tmp_path: Path) -> Layout:
    """1.0.0 good and current; 1.1.0 (counter 2) just activated on trial."""
    lay = layout_for(tmp_path)
    _install(lay, tmp_path, "1.0.0", 1)
    slots.activate(lay, "1.0.0")
    with state.locked(lay) as st:
        state.raise_counter(st, "agent", 1, "1.0.0")
    _install(lay, tmp_path, "1.1.0", 2)
    trial.begin(lay, "1.1.0", "1.0.0", 2, max_starts=3)
    slots.activate(lay, "1.1.0")
    return lay


def prestart(layout: Layout) -> str:
    """ExecStartPre=, for real: a separate process."""
    r = subprocess.run([sys.executable, "-m", "agent.update.cli", "--root", str(layout.root),
                        "prestart"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def poststop(layout: Layout, result: str, code: str, status: str) -> None:
    trial.on_poststop(layout, {"SERVICE_RESULT": result, "EXIT_CODE": code, "EXIT_STATUS": status})


def rolled_back_report(layout: Layout) -> dict:
    [queued] = state.load(layout)["reports"]
    report = queued["body"]
    schemas.validate("event", report)
    assert report["state"] == "rolled_back" and report["component"] == "agent"
    assert report["from"] == "1.0.0" and report["to"] == "1.1.0"
    return report


def assert_back_on_old(layout: Layout) -> None:
    assert layout.current_version() == "1.0.0"
    st = state.load(layout)
    assert st["trial"] is None
    assert st["agent"]["release_counter"] == 1 and st["agent"]["blocked_counter"] == 2


def test_crash_on_start_rolls_back(layout: Layout) -> None:
    for _ in range(3):
        assert prestart(layout) == "trial"
        assert layout.current_version() == "1.1.0"
        poststop(layout, "exit-code", "exited", "1")   # the new agent crashed
    assert prestart(layout) == "rolled_back"          # the 4th start already runs 1.0.0
    assert_back_on_old(layout)
    assert rolled_back_report(layout)["reason"] == "crash_loop: exited 1"


def test_hang_rolls_back(layout: Layout) -> None:
    for _ in range(3):
        assert prestart(layout) == "trial"
        poststop(layout, "watchdog", "killed", "ABRT")  # WatchdogSec= fired
    assert prestart(layout) == "rolled_back"
    assert_back_on_old(layout)
    assert rolled_back_report(layout)["reason"] == "hang: watchdog timeout"


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _updater(layout: Layout, tmp: Path, health, clock) -> tuple[Updater, list[dict], list[int]]:
    events: list[dict] = []
    restarts: list[int] = []
    up = Updater(UpdateSettings(root=layout.root, work_dir=layout.work, tuf_root=tmp / "none.json",
                                metadata_dir=tmp / "meta", python=layout.python, stable_s=300,
                                trial_s=900),
                 emit_event=events.append, health=health, clock_synced=lambda: True,
                 monotonic=clock, restart=lambda: restarts.append(1))
    return up, events, restarts


def apply(layout: Layout, tmp: Path) -> str:
    """dongle-update-install.service, for real: a separate process (settings from a file)."""
    toml = tmp / "installer.toml"
    toml.write_text(f'[device]\nid = "test-0001"\ndata_dir = "{tmp / "data"}"\n\n[update]\nenabled = true\n'
                    f'root = "{layout.root}"\nwork_dir = "{layout.work}"\n'
                    f'tuf_root = "{tmp / "none.json"}"\npython = "{layout.python}"\n')
    r = subprocess.run([sys.executable, "-m", "agent.update.cli", "--config", str(toml), "apply"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_no_broker_rolls_back(layout: Layout, tmp_path: Path) -> None:
    """The in-agent monitor decides; the agent asks the installer, which rolls back; the
    agent, no longer on the slot ``current`` names, restarts."""
    clock = FakeClock()
    assert prestart(layout) == "trial"
    up, events, restarts = _updater(layout, tmp_path,
                                    lambda: {"store": True, "broker": False, "vehicle": None}, clock)
    for _ in range(8):
        clock.t += 100
        assert up.step() == []
    clock.t += 100
    assert up.step() == ["agent:rollback", "agent:waiting (installer: rollback)"]
    assert layout.current_version() == "1.1.0"        # the agent cannot do it itself
    assert '"result": "done"' in apply(layout, tmp_path)
    assert_back_on_old(layout)
    assert rolled_back_report(layout)["reason"].startswith("no_broker")
    assert up.step() == ["agent:restart"] and restarts == [1]
    assert [e["state"] for e in events] == ["rolled_back"]


def test_good_only_after_every_check_held_for_the_stable_time(layout: Layout, tmp_path: Path) -> None:
    clock = FakeClock()
    health = {"store": True, "broker": True, "vehicle": None}
    assert prestart(layout) == "trial"
    up, events, restarts = _updater(layout, tmp_path, lambda: health, clock)
    assert up.step() == []
    clock.t += 200
    health["vehicle"] = False                # car on, vehicle link broken: stability restarts
    assert up.step() == []
    clock.t += 200
    health["vehicle"] = True
    assert up.step() == []
    clock.t += 299
    assert up.step() == []
    clock.t += 1
    assert up.step() == ["agent:good", "agent:waiting (installer: good)"]
    assert state.load(layout)["trial"] is not None
    assert '"result": "done"' in apply(layout, tmp_path)
    st = state.load(layout)
    assert st["trial"] is None and st["agent"]["release_counter"] == 2
    assert st["agent"]["version"] == "1.1.0" and layout.current_version() == "1.1.0"
    assert up.step() == [] and restarts == []            # the slot it runs is still current
    assert [(e["state"], e["to"]) for e in events] == [("good", "1.1.0")]
    assert prestart(layout) == "normal"       # later starts are not counted
    assert apply(layout, tmp_path) == "nothing to do"     # each request is carried out once


def test_restart_requests_and_clean_stops_are_not_failures(layout: Layout) -> None:
    assert prestart(layout) == "trial"
    poststop(layout, "exit-code", "exited", str(trial.RESTART_EXIT_CODE))
    poststop(layout, "success", "exited", "0")
    assert state.load(layout)["trial"]["failures"] == []


def test_onfailure_unit_rolls_back(layout: Layout, capsys) -> None:
    """dongle-agent-rollback.service runs `dongle-update rollback` (from the previous slot)."""
    assert update_cli(["--root", str(layout.root), "rollback",
                       "--reason", "start_limit: unit failed"]) == 0
    assert_back_on_old(layout)
    assert rolled_back_report(layout)["reason"] == "start_limit: unit failed"
    # Outside a trial a failing unit is not a reason to change versions.
    assert update_cli(["--root", str(layout.root), "rollback"]) == 1
    assert layout.current_version() == "1.0.0"
    assert "nothing to roll back" in capsys.readouterr().out


def test_stale_trial_record_is_discarded(tmp_path: Path) -> None:
    """A power cut after the trial was recorded but before `current` flipped."""
    lay = layout_for(tmp_path)
    _install(lay, tmp_path, "1.0.0", 1)
    slots.activate(lay, "1.0.0")
    _install(lay, tmp_path, "1.1.0", 2)
    trial.begin(lay, "1.1.0", "1.0.0", 2)
    assert prestart(lay) == "normal"
    assert state.load(lay)["trial"] is None and lay.current_version() == "1.0.0"


def test_rolled_back_release_is_reported_and_not_retried(layout: Layout, tmp_path: Path) -> None:
    for _ in range(4):
        prestart(layout)
        poststop(layout, "signal", "killed", "SEGV")
    assert layout.current_version() == "1.0.0"
    events: list[dict] = []
    up = Updater(UpdateSettings(root=layout.root, work_dir=layout.work,
                                tuf_root=tmp_path / "none.json",
                                metadata_dir=tmp_path / "meta", python=layout.python),
                 emit_event=events.append, clock_synced=lambda: True)
    assert up.flush_reports() == 1                       # what the agent does at start
    assert events[0]["state"] == "rolled_back" and events[0]["reason"] == "crash_loop: killed SEGV"
    assert up.flush_reports() == 0
    body = {"component": "agent", "version": "1.1.0", "release_counter": 2,
            "repository": "https://localhost:1", "target": "agent/1.1.0/bundle.tar.zst",
            "conditions": {"parked": True, "min_supply_v": 11.8}}
    out = up.handle_release(opened(body))
    assert out.status == "rejected" and out.reason.startswith("blocked_counter")
    body.update(version="1.1.1", release_counter=3, target="agent/1.1.1/bundle.tar.zst")
    assert up.handle_release(opened(body, 2)).status == "accepted"
    assert up.status()["pending"] == {"agent": {"version": "1.1.1", "release_counter": 3}}
