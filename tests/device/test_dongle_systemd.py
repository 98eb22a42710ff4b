"""The installed dongle under a real systemd (PID 1 of the device VM), installed by
scripts/install.sh: Type=notify readiness, first telemetry at the cloud, ``dongle status`` and
``dongle logs``, the journal's priorities, the sandbox, the watchdog, exit status 2 and the
start limit. One VM for the module; the tests that kill the agent come last and leave it running.
The cloud side is the reference console on the host (tests/device/dongle.py)."""
from __future__ import annotations

import re
import json
import time

import pytest

from scripts.testbed.wait import wait_until
from tests.device.conftest import ARCH
from tests.device.dongle import DongleVM, make_dongle, obd_toml, online

pytestmark = [pytest.mark.device, pytest.mark.timeout(3600)]

DEV = f"sysd-{ARCH}"
CONFIG = {"version": 1, "upload": {"interval_s": 2},
          "obd": {"pids": [{"name": "engine.rpm", "pid": "RPM", "period_s": 1}], "dtc_period_s": 600},
          "can": {"signals": [], "raw": {"enabled": False, "ids": []}}}
#: systemd-analyze security's overall exposure (0 = locked down, 10 = none) must stay at or
#: below this; docs/install.md gives the figure measured.
MAX_EXPOSURE = 2.5
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d")


@pytest.fixture(scope="module")
def dongle(devicevm_image, installed, tmp_path_factory, elm):
    with make_dongle(devicevm_image, installed, tmp_path_factory, DEV, serials={"elm": elm.port}) as (d, cloud):
        d.provision(toml=obd_toml(d))
        cloud.console.publish(DEV, "config", CONFIG)   # retained: the agent gets it when it connects
        t0 = time.monotonic()
        d.start()
        d.start_seconds = time.monotonic() - t0
        yield d


def _telemetry_with(cloud, name: str) -> list[dict]:
    return [r for r in cloud.records(DEV, "telemetry") if any(s["name"] == name for s in r["body"].get("signals", ()))]


def test_systemd_counts_the_agent_started_only_once_it_said_ready(dongle: DongleVM):
    p = dongle.unit("Type", "ActiveState", "SubState", "StatusText", "NRestarts", "WatchdogUSec")
    assert (p["Type"], p["ActiveState"], p["SubState"], p["NRestarts"]) == ("notify", "active", "running", "0")
    assert p["StatusText"] == f"device {DEV}, config v1" or p["StatusText"].startswith(f"device {DEV}, config v")
    assert p["WatchdogUSec"] == "30s"
    # READY=1 comes at the end of Agent.start(): systemd's "Started" line follows the agent's own
    # "starting" line (with Type=simple it would precede it: logged at the fork)
    entries = dongle.journal()
    starting = next(i for i, e in enumerate(entries) if "starting as " + DEV in e.get("MESSAGE", ""))
    started = next(i for i, e in enumerate(entries) if str(e.get("MESSAGE", "")).startswith("Started "))
    assert starting < started, [e.get("MESSAGE") for e in entries[:20]]
    print(f"\n{ARCH}: systemctl start dongle-agent returned after {dongle.start_seconds:.1f} s")


def test_first_telemetry_reaches_the_cloud_and_dongle_status_reports(dongle: DongleVM):
    cloud = dongle.cloud
    assert dongle.wait(online(cloud, DEV), 180, "the device online at the broker")
    assert dongle.wait(lambda: _telemetry_with(cloud, "engine.rpm"), 240, "OBD telemetry at the cloud")
    assert not [r for r in cloud.console.records if r.get("rejected")]
    st = dongle.status()
    assert st["device_id"] == DEV and st["broker"]["connected"] is True
    assert st["obd"]["connected"] is True
    assert st["clock"]["synced"] is True and st["clock"]["source"] == "kernel NTP status"


def test_the_gpio_backend_is_named_in_status_and_journal(dongle: DongleVM):
    """Not a Pi: no /dev/gpiochip, so no backend works; which ones were tried is said. On arm64
    the lock installs lgpio (gpiozero's backend on Pi OS) and it imports: it fails on the chip."""
    gpio = dongle.status()["gpio"]
    assert gpio["available"] is False and gpio["backend"] is None
    assert gpio["backend_error"].startswith("BadPinFactory")
    lgpio = gpio["backend_fallbacks"][0]
    assert lgpio.startswith("Falling back from lgpio")
    rc, out, err = dongle.run("/opt/dongle/venv/bin/python -c 'import lgpio; print(lgpio.__file__)'")
    if ARCH == "arm64":
        assert rc == 0 and "/opt/dongle/venv/" in out, err
        assert "No module named" not in lgpio, lgpio
    else:   # the lock pins lgpio on aarch64 only
        assert rc != 0 and "No module named 'lgpio'" in lgpio
    line = next(e for e in dongle.journal() if str(e.get("MESSAGE", "")).startswith("drivers.gpio: GPIO: "))
    assert line["PRIORITY"] == "4" and lgpio in line["MESSAGE"]
    print(f"\n{ARCH} GPIO: {line['MESSAGE']}")


def test_the_journal_has_the_agents_priorities_and_no_second_timestamp(dongle: DongleVM):
    pid = str(dongle.main_pid())
    own = [e for e in dongle.journal() if e.get("_PID") == pid]
    assert own, "no journal entries from the agent's process"
    messages = [e["MESSAGE"] for e in own if isinstance(e.get("MESSAGE"), str)]
    assert not [m for m in messages if TIMESTAMP.match(m) or m.startswith("<")], messages[:5]
    prio = {e["MESSAGE"]: e["PRIORITY"] for e in own if isinstance(e.get("MESSAGE"), str)}
    starting = next(m for m in prio if "starting as " + DEV in m)
    assert prio[starting] == "6"
    # journalctl's own priority filter finds the warnings
    warn = dongle.journal("-p", "warning", f"_PID={pid}")
    assert warn and {e["PRIORITY"] for e in warn} <= {"0", "1", "2", "3", "4"}


def test_dongle_logs_reads_the_journal(dongle: DongleVM):
    rc, out, err = dongle.run("dongle logs -n 400")
    assert rc == 0, err
    assert f"starting as {DEV}" in out and "dongle-agent" in out
    rc, out, err = dongle.run("dongle logs -n 5 --json")
    assert rc == 0, err
    doc = json.loads(out)   # the CLI's one --json shape: one document (``-f`` streams lines)
    assert doc["ok"] is True and doc["source"] == "journal" and len(doc["lines"]) == 5, doc


def test_the_agent_runs_sandboxed(dongle: DongleVM):
    pid = dongle.main_pid()
    status = dict(line.split(":\t", 1) for line in dongle.sh(f"cat /proc/{pid}/status").splitlines() if ":\t" in line)
    assert status["CapEff"].strip() == status["CapPrm"].strip() == status["CapBnd"].strip() == "0000000000000000"
    assert status["NoNewPrivs"].strip() == "1" and status["Seccomp"].strip() == "2"
    assert dongle.sh(f"ps -o user= -p {pid}").strip() == "dongle"
    # read-only outside its state: the agent's user cannot write the configuration or /usr
    # in the agent's mount namespace, even root cannot write the code, the system or the config
    rc, out, err = dongle.run(f"nsenter -t {pid} -m sh -c 'touch /opt/dongle/x /usr/x /etc/dongle/x' 2>&1")
    assert rc != 0 and out.count("Read-only file system") == 3, out
    rc, out, err = dongle.run("systemd-analyze security dongle-agent.service --no-pager")
    m = re.search(r"Overall exposure level for dongle-agent.service: (\d+\.\d+) (\w+)", out)
    assert m, out[-2000:]
    print(f"\nsystemd-analyze security: {m.group(1)} {m.group(2)}")
    assert float(m.group(1)) <= MAX_EXPOSURE, out


def test_a_configuration_error_exits_2_and_is_not_restarted(dongle: DongleVM):
    good = dongle.vm.get("/etc/dongle/agent.toml").decode()
    try:
        dongle.write_config(good.replace("[device]", "[device]\nno_such_key = 1", 1))
        dongle.run("systemctl restart dongle-agent", 120)
        # with RestartPreventExitStatus=2 the unit goes straight to failed, never to auto-restart
        wait_until(lambda: dongle.unit("ActiveState")["ActiveState"] == "failed", 120,
                   what="the unit failed")
        p = dongle.unit("SubState", "Result", "ExecMainStatus")
        assert (p["SubState"], p["Result"], p["ExecMainStatus"]) == ("failed", "exit-code", "2")
        assert any("no_such_key" in str(e.get("MESSAGE")) for e in dongle.journal("-n", "20"))
    finally:
        dongle.write_config(good)
        dongle.sh("systemctl reset-failed dongle-agent")
        dongle.start()


@pytest.mark.device_long
def test_the_watchdog_kills_and_restarts_a_stopped_agent(dongle: DongleVM):
    cloud = dongle.cloud
    before = dongle.main_pid()
    restarts = int(dongle.unit("NRestarts")["NRestarts"])
    seq_before = max(r["seq"] for r in cloud.records(DEV) if "seq" in r)
    dongle.sh(f"kill -STOP {before}")
    t0 = time.monotonic()
    new = dongle.wait_active(240, after_pid=before)
    took = time.monotonic() - t0
    p = dongle.unit("NRestarts")
    assert int(p["NRestarts"]) == restarts + 1
    assert any("Watchdog timeout" in str(e.get("MESSAGE")) for e in dongle.journal("-n", "200"))
    # the new process goes on uploading, with new sequence numbers
    assert wait_until(lambda: any(r["seq"] > seq_before for r in _telemetry_with(cloud, "engine.rpm")), 240,
                      what="telemetry from the restarted agent")
    print(f"\nwatchdog: SIGSTOP of pid {before} -> pid {new} active after {took:.0f} s (WatchdogSec=30, RestartSec=10)")


@pytest.mark.device_long
def test_a_crash_loop_stops_at_the_start_limit(dongle: DongleVM):
    """StartLimitBurst=10 in StartLimitIntervalSec=600 of the unit, as installed; only the pause
    between restarts is shortened (a drop-in: RestartSec=1) so the loop takes minutes, not more."""
    dropin = "/run/systemd/system/dongle-agent.service.d/zz-test-restartsec.conf"
    dongle.sh(f"mkdir -p {dropin.rsplit('/', 1)[0]} && printf '[Service]\\nRestartSec=1\\n' > {dropin}"
              " && systemctl daemon-reload && systemctl reset-failed dongle-agent")
    try:
        p = dongle.unit("StartLimitBurst", "StartLimitIntervalUSec")
        assert (p["StartLimitBurst"], p["StartLimitIntervalUSec"]) == ("10", "10min")
        kills, pid = 0, 0
        while dongle.unit("ActiveState")["ActiveState"] != "failed":
            assert kills <= 12, "still restarting after 12 crashes"
            try:
                pid = dongle.wait_active(240, after_pid=pid)
            except Exception:
                if dongle.unit("ActiveState")["ActiveState"] == "failed":
                    break
                raise
            dongle.run(f"kill -SEGV {pid}")
            kills += 1
            wait_until(lambda: dongle.unit("MainPID")["MainPID"] != str(pid), 60, what="the crash noticed")
        assert dongle.unit("Result")["Result"] == "start-limit-hit"
        assert kills == 10, kills
    finally:
        dongle.sh(f"rm -f {dropin} && systemctl daemon-reload && systemctl reset-failed dongle-agent")
        dongle.start()
