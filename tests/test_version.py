"""``--version`` on every entry point: ``<prog> <version>`` from the distribution's metadata
(agent/version.py), for the installed console scripts and in an OTA slot staged by the release
tool (whose dist-info carries the release's version)."""
from __future__ import annotations

import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from scripts.refcloud.release import LAUNCHERS, stage_agent

BIN = Path(sys.executable).parent
PROGS = ("dongle-agent", "dongle", "dongle-update")


def test_launchers_cover_every_console_script():
    scripts = {ep.name for ep in metadata.distribution("dongle-agent").entry_points
               if ep.group == "console_scripts"}
    assert scripts == set(PROGS) == set(LAUNCHERS)


@pytest.mark.parametrize("prog", PROGS)
def test_installed_entry_point_prints_its_name_and_version(prog):
    r = subprocess.run([str(BIN / prog), "--version"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"{prog} {metadata.version('dongle-agent')}\n"
    assert r.stderr == ""


@pytest.mark.parametrize("prog", PROGS)
def test_a_staged_slot_reports_the_release_version(prog, tmp_path):
    tree = tmp_path / "slot"
    site = stage_agent(tree, version="7.8.9")
    # what the slot's launcher runs (bin/<prog>), with the slot's site-packages first and the
    # checkout's venv for the dependencies, from / so the checkout is not on sys.path
    module = LAUNCHERS[prog]
    env = dict(os.environ, PYTHONPATH=str(site))
    r = subprocess.run([sys.executable, "-P", "-c",
                        f"import sys; from {module} import main; sys.exit(main())", "--version"],
                       capture_output=True, text=True, timeout=60, cwd="/", env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"{prog} 7.8.9\n", r.stdout
    # the agent's own modules came from the slot, not the checkout
    where = subprocess.run(
        [sys.executable, "-P", "-c", f"import {module}; print({module}.__file__)"],
        capture_output=True, text=True, timeout=60, cwd="/", env=env)
    assert where.stdout.strip().startswith(str(site)), where.stdout
