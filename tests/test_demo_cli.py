"""The technician's commands against the real demo (scripts/demo.py in a subprocess, as
docs/technician.md walks through it): `dongle logs` finds the demo's log without --file, and
`dongle live` shows numbers at the resolution of each signal."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from scripts.testbed.wait import wait_until

REPO = Path(__file__).resolve().parent.parent
DONGLE = Path(sys.executable).parent / "dongle"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    run = tmp_path_factory.mktemp("demo")
    out = open(run / "demo.out", "w")
    proc = subprocess.Popen([sys.executable, "-m", "scripts.demo", "--run-dir", str(run), "--seconds", "600"],
                            cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    toml = run / "devices" / "demo-0001" / "agent.toml"
    try:
        wait_until(lambda: "dongle-agent for demo-0001 started" in (run / "demo.out").read_text()
                   or proc.poll() is not None, 180, what="the demo's agent to start")
        assert proc.poll() is None, (run / "demo.out").read_text()
        wait_until(lambda: (toml.parent / "agent.sock").exists(), 60, what="the agent's control socket")
        yield toml
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        out.close()


def dongle(toml: Path, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(DONGLE), *argv, "--config", str(toml)], capture_output=True, text=True, timeout=60)


def test_dongle_logs_finds_the_demos_log(demo):
    def started():
        r = dongle(demo, "logs", "-n", "500", "--json")
        if r.returncode != 0:
            return None
        doc = json.loads(r.stdout)
        return doc if any("starting as demo-0001" in line for line in doc["lines"]) else None

    doc = wait_until(started, 60, interval=0.5, what="the agent's start in `dongle logs`")
    assert doc["ok"] is True and doc["source"] == "file" and doc["path"] == str(demo.parent / "agent.log")
    r = dongle(demo, "logs", "-n", "3")
    assert r.returncode == 0 and len(r.stdout.splitlines()) == 3, r.stderr
