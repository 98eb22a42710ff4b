"""Over-the-air updates of the installed dongle under a real systemd (issue 16 item 2), in the
device VM (tests/device/dongle.py: installed by scripts/install.sh, provisioned as
docs/install.md says, the cloud on the host through guestfwd).

One VM for the module, the tests in order, each starting from where the last left the device.
The cloud side has the update repository (``make_dongle(repository=True)``): releases of this
checkout with the locked dependencies for the guest (the wheelhouse install.sh used), built on
the host by scripts/refcloud/release.py as a fleet operator builds them (a full bundle, then
deltas), announced by the reference console through the broker. Everything between is the
dongle's: the agent (user dongle, its unit's sandbox) downloads and verifies,
dongle-update-install.service (root, no network) verifies again and installs, systemd and the
hooks run the trial (docs/updates.md).

The short form (``make test-device-short``): what install.sh installed, a good release (trial,
good), what the agent's user cannot write, the units' exposure, a crash-looping release rolled
back. Marked ``device_long`` (minutes each, ``make test-device``): a hanging release (the
watchdog), one that cannot reach the broker (the trial's deadline), power cuts during a download
and during an install. On arm64 the long ones are skipped.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from tests.device.conftest import ARCH
from tests.device.dongle import (GUEST_REPOSITORY, WHEEL_ARCH, DongleVM, make_dongle, online,
                                 updates_toml, wheelhouse)

pytestmark = [pytest.mark.device, pytest.mark.timeout(3600)]
LONG = [pytest.mark.device_long,
        pytest.mark.skipif(ARCH == "arm64", reason="arm64: one update and one rollback only")]

DEV = f"upd-{ARCH}"
FACTORY = "0.1.0"           # setup.py's version: what install.sh installed as the first slot
GOOD = "0.1.1"
UNITS = ("dongle-agent.service", "dongle-update-install.service", "dongle-agent-rollback.service")
#: Short trial times (the defaults are 300 s healthy for good, 900 s for a rollback).
UPDATE = {"stable_s": 20.0, "trial_s": 150.0, "poll_s": 2.0, "retry_s": 5.0}


# --- releases --------------------------------------------------------------------------------------

CRASH = '''

def main(argv=None):  # deliberately broken release (tests/device): crashes on start
    raise RuntimeError("deliberately broken release: the agent crashes on start")
'''
HANG = '''

_notify_ready = notify_ready


def notify_ready(status=None):  # deliberately broken release (tests/device): hangs once ready
    import os, signal, threading
    ok = _notify_ready(status)
    threading.Timer(3.0, os.kill, (os.getpid(), signal.SIGSTOP)).start()
    return ok
'''
NO_BROKER = '''

_init = MqttLink.__init__


def _init_elsewhere(self, *args, **kw):  # deliberately broken release (tests/device)
    _init(self, *args, **kw)
    self.port = 1        # nobody listens there: the broker is never reached


MqttLink.__init__ = _init_elsewhere
'''
PATCHES = {"crash": ("agent/daemon.py", CRASH), "hang": ("agent/device/systemd.py", HANG),
           "no-broker": ("agent/cloud/mqtt.py", NO_BROKER)}


class Releases:
    """Agent releases of this checkout with the locked dependencies for the guest, built into
    the cloud's repository (release.py's ReleaseRepo) as ``release.py agent --stage --deps``
    does; ``broken`` appends one of :data:`PATCHES` to the staged agent."""

    def __init__(self, cloud, tmp: Path):
        from scripts.refcloud.release import stage_deps
        self.cloud, self.tmp = cloud, tmp
        self.deps = tmp / "deps"
        stage_deps(self.deps, arch=WHEEL_ARCH[ARCH], wheels=wheelhouse(ARCH))
        self.counter = 0

    def build(self, version: str, *, broken: str | None = None, delta_from: str | None = None) -> dict:
        """Adds ``version`` (a bundle, and a delta from ``delta_from``), publishes the metadata;
        returns the ``down/release`` body (no conditions: the VM has no MCU, nothing parks)."""
        from scripts.refcloud.release import PYVER, release_body, stage_agent
        tree = self.tmp / f"tree-{version}"
        shutil.rmtree(tree, ignore_errors=True)
        shutil.copytree(self.deps, tree)
        site = stage_agent(tree, version=version)
        assert site == tree / "lib" / PYVER / "site-packages"
        if broken:
            rel, code = PATCHES[broken]
            with open(site / rel, "a") as f:
                f.write(code)
        self.counter += 1
        repo = self.cloud.repo
        out = repo.add_agent_release(version, self.counter, tree, level=3,
                                     delta_from=[delta_from] if delta_from else [])
        repo.publish()
        shutil.rmtree(tree)
        return release_body("agent", version, self.counter, GUEST_REPOSITORY, out["target"],
                            delta_from=delta_from, delta_target=out.get(f"delta:{delta_from}"),
                            parked=False, min_supply_v=0)


@pytest.fixture(scope="module")
def dongle(devicevm_image, installed, tmp_path_factory):
    with make_dongle(devicevm_image, installed, tmp_path_factory, DEV, repository=True) as (d, cloud):
        d.provision(toml=updates_toml(**UPDATE))
        d.start()
        d.wait(online(cloud, DEV, FACTORY), 240, "the factory version online", interval=0.5)
        yield d


@pytest.fixture(scope="module")
def releases(dongle, tmp_path_factory) -> Releases:
    return Releases(dongle.cloud, tmp_path_factory.mktemp("releases"))


# --- what the console sees -------------------------------------------------------------------------

def _first(d: DongleVM, pred, since: int = 0) -> dict | None:
    return next((r for r in list(d.cloud.console.records)[since:] if r.get("dev") == d.device_id and pred(r)),
                None)


def publish(d: DongleVM, body: dict) -> dict:
    """Publishes the release (signed, sealed, retained); returns the body of its ack."""
    seq, _ = d.cloud.console.publish(d.device_id, "release", body)
    rec = d.wait(lambda: _first(d, lambda r: r.get("kind") == "ack" and r["body"].get("ref_kind") == "release"
                                and r["body"].get("ref_seq") == seq),
                 120, f"the ack of release {body['version']} (seq {seq})", interval=0.2)
    return rec["body"]


END = ("good", "rolled_back", "rejected")


def update_event(d: DongleVM, version: str, state: str, timeout: float) -> dict:
    """The first ``update`` event of ``version`` in ``state``; fails at once if the update ended
    otherwise (another of :data:`END`)."""
    def seen():
        rec = _first(d, lambda r: r.get("kind") == "event" and r["body"].get("type") == "update"
                     and r["body"].get("to") == version and r["body"].get("state") in (state, *END))
        if rec is not None and rec["body"]["state"] != state:
            raise AssertionError(f"waiting for {version} {state}, the update ended {rec['body']}\n"
                                 f"--- in the guest:\n{d.diagnose()}")
        return rec
    return d.wait(seen, timeout, f"update event {version} {state}", interval=0.5)["body"]


def states(d: DongleVM, version: str) -> list[str]:
    """The update events' states for ``version`` in the order the console got them (the progress
    events of a download, with ``bytes_done``, left out)."""
    return [r["body"]["state"] for r in list(d.cloud.console.records) if r.get("dev") == d.device_id
            and r.get("kind") == "event" and r["body"].get("type") == "update"
            and r["body"].get("to") == version and "bytes_done" not in r["body"]]


def guest_json(d: DongleVM, path: str) -> dict:
    return json.loads(d.vm.get(path))


def current(d: DongleVM) -> str:
    return d.sh("readlink /opt/dongle/current").strip().removeprefix("slots/")


def assert_complete_slot(d: DongleVM, version: str) -> None:
    """``version``'s slot is whole: its manifest says so (bundles) and its interpreter runs the
    agent's entry point."""
    slot = f"/opt/dongle/slots/{version}"
    if version != FACTORY:
        assert guest_json(d, f"{slot}/MANIFEST.json")["version"] == version
    rc, out, err = d.run(f"{slot}/bin/dongle-agent --version", timeout=300)
    assert rc == 0 and out.split() == ["dongle-agent", version], (out, err)


def back_online(d: DongleVM, version: str, since: int, timeout: float = 300) -> None:
    d.wait(online(d.cloud, d.device_id, version, since), timeout, f"{version} online again", interval=0.5)


# --- the short form --------------------------------------------------------------------------------

def test_install_sh_installed_a_root_owned_slot_and_every_unit(dongle: DongleVM) -> None:
    assert current(dongle) == FACTORY
    out = dongle.sh("stat -c '%U:%G %a %n' /opt/dongle /opt/dongle/slots /opt/dongle/update "
                    "/var/lib/dongle/update; readlink /opt/dongle/venv")
    *owners, venv = out.splitlines()
    assert owners == ["root:root 755 /opt/dongle", "root:root 755 /opt/dongle/slots",
                      "root:root 755 /opt/dongle/update", "dongle:dongle 750 /var/lib/dongle/update"]
    assert venv == "current"
    rc, out, _ = dongle.run("systemctl is-enabled dongle-agent.service dongle-update-install.path; "
                            "systemctl is-active dongle-agent.service dongle-update-install.path; "
                            "systemctl cat dongle-agent.service | grep -c '^ExecStartPre=-+'")
    assert out.split() == ["enabled", "enabled", "active", "active", "1"], out
    assert_complete_slot(dongle, FACTORY)


def test_a_good_release_goes_trial_then_good(dongle: DongleVM, releases: Releases) -> None:
    mark = len(dongle.cloud.console.records)
    ack = publish(dongle, releases.build(GOOD))
    assert ack["status"] == "accepted", ack
    update_event(dongle, GOOD, "installed", 900)
    good = update_event(dongle, GOOD, "good", 600)
    assert good["from"] == FACTORY
    got = states(dongle, GOOD)
    assert got.index("downloading") < got.index("installed") < got.index("trial") < got.index("good"), got
    assert "rolled_back" not in got and "rejected" not in got
    back_online(dongle, GOOD, mark, 120)
    assert current(dongle) == GOOD
    assert dongle.sh("readlink /opt/dongle/previous").strip() == f"slots/{FACTORY}"
    assert_complete_slot(dongle, GOOD)
    st = guest_json(dongle, "/opt/dongle/update/state.json")
    assert st["agent"]["version"] == GOOD and st["trial"] is None
    # the installer did it, as a unit of its own, from the staged files
    log = dongle.log(units=("dongle-update-install",))
    assert re.search(rf"{re.escape(GOOD)} installed \(full\) and current", log), log


CHECK_WRITES = r'''
import errno, json, os, sys
denied, allowed = [], []
def attempt(what, fn):
    try:
        fn()
    except OSError as e:
        denied.append((what, errno.errorcode.get(e.errno, e.errno)))
    else:
        allowed.append(what)
targets = 0
for top, dirs, files in os.walk("/opt/dongle"):
    for name in dirs + files:
        p = os.path.join(top, name)
        targets += 1
        if os.path.islink(p):
            attempt(f"replace {p}", lambda: os.replace("/var/lib/dongle/update/.probe-link", p))
        elif os.path.isdir(p):
            attempt(f"create in {p}", lambda: os.close(os.open(os.path.join(p, ".probe"), os.O_CREAT | os.O_WRONLY, 0o644)))
            attempt(f"chmod {p}", lambda: os.chmod(p, 0o777))
        else:
            attempt(f"write {p}", lambda: os.close(os.open(p, os.O_WRONLY | os.O_APPEND)))
            attempt(f"truncate {p}", lambda: os.truncate(p, 0))
            attempt(f"unlink {p}", lambda: os.unlink(p))
            attempt(f"chmod {p}", lambda: os.chmod(p, 0o777))
# and what it must be able to do: its own update directory
os.symlink("/tmp", "/var/lib/dongle/update/.probe")
os.unlink("/var/lib/dongle/update/.probe")
print(json.dumps({"uid": os.getuid(), "targets": targets, "allowed": allowed,
                  "denied": sorted({e for _, e in denied})}))
'''


def test_the_agent_s_user_cannot_modify_any_file_of_any_slot(dongle: DongleVM) -> None:
    """As the dongle user, twice: in the running agent's own mount namespace (the unit's
    sandbox: ProtectSystem=strict and all) and outside it (the files' ownership alone), over
    every file, directory and link under /opt/dongle (two slots and the install state now)."""
    vm = dongle.vm
    vm.put("/var/lib/dongle/check_writes.py", CHECK_WRITES.encode(), mode=0o644)
    dongle.sh("runuser -u dongle -- ln -sfn /tmp /var/lib/dongle/update/.probe-link")
    pid = dongle.main_pid()
    assert pid != 0
    drop = "setpriv --reuid=dongle --regid=dongle --init-groups --inh-caps=-all --bounding-set=-all --no-new-privs"
    results = {}
    for where, prefix in (("sandbox", f"nsenter -t {pid} -m -- {drop}"), ("outside", drop)):
        rc, out, err = dongle.run(f"{prefix} /usr/bin/python3 /var/lib/dongle/check_writes.py", timeout=600)
        assert rc == 0, (where, out, err)
        results[where] = json.loads(out)
    dongle.run("rm -f /var/lib/dongle/update/.probe-link /var/lib/dongle/check_writes.py")
    for where, r in results.items():
        assert r["uid"] != 0 and r["targets"] > 1000, (where, r["targets"])
        assert r["allowed"] == [], (where, r["allowed"][:20])
    assert "EROFS" in results["sandbox"]["denied"]          # the unit's read-only /opt
    assert {"EACCES", "EPERM"} & set(results["outside"]["denied"]), results["outside"]["denied"]


def test_systemd_analyze_security_of_the_units(dongle: DongleVM, capsys) -> None:
    """The exposure scores systemd gives the loaded units (recorded in docs/updates.md)."""
    scores = {}
    for unit in UNITS:
        rc, out, err = dongle.run(f"systemd-analyze security --no-pager {unit}", timeout=300)
        m = re.search(r"Overall exposure level for \S+: (\d+\.\d+) (\S+)", out + err)
        assert m, out + err
        scores[unit] = (float(m.group(1)), m.group(2))
    with capsys.disabled():
        print(f"\nsystemd-analyze security ({ARCH} device VM): "
              + ", ".join(f"{u} {s} {w}" for u, (s, w) in scores.items()))
    assert scores["dongle-update-install.service"][0] <= 2.0, scores
    assert scores["dongle-agent-rollback.service"][0] <= 2.0, scores
    assert scores["dongle-agent.service"][0] <= 3.0, scores


def test_a_crash_looping_release_is_rolled_back_by_systemd(dongle: DongleVM, releases: Releases) -> None:
    version = "0.1.2-crash"
    body = releases.build(version, broken="crash", delta_from=GOOD)
    mark = len(dongle.cloud.console.records)
    assert publish(dongle, body)["status"] == "accepted"
    back = update_event(dongle, version, "rolled_back", 1500)
    assert back["reason"] == "crash_loop: exited 1" and back["from"] == GOOD, back
    assert "trial" in states(dongle, version) and "good" not in states(dongle, version)
    assert current(dongle) == GOOD
    back_online(dongle, GOOD, mark)
    log = dongle.log("-n", "3000")
    assert log.count("RuntimeError: deliberately broken release: the agent crashes on start") >= 3, log[-4000:]
    st = guest_json(dongle, "/opt/dongle/update/state.json")
    assert st["agent"]["blocked_counter"] == body["release_counter"] and st["trial"] is None
    again = publish(dongle, body)
    assert again["status"] == "rejected" and again["reason"].startswith("blocked_counter"), again


# --- the long form ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,reason", [
    pytest.param("hang", "hang: watchdog timeout", marks=LONG, id="hang-watchdog"),
    pytest.param("no-broker", "no_broker: ", marks=LONG, id="no-broker"),
])
def test_a_broken_release_is_rolled_back_without_a_person(dongle: DongleVM, releases: Releases,
                                                           kind, reason) -> None:
    version = f"0.1.3-{kind}"
    body = releases.build(version, broken=kind, delta_from=GOOD)
    mark = len(dongle.cloud.console.records)
    assert publish(dongle, body)["status"] == "accepted"
    back = update_event(dongle, version, "rolled_back", 2400)
    assert back["reason"].startswith(reason), back
    assert current(dongle) == GOOD
    back_online(dongle, GOOD, mark)
    if kind == "hang":
        assert "Watchdog timeout" in dongle.log("-n", "3000"), "no watchdog timeout in the journal"


def _part_bytes(d: DongleVM) -> int:
    rc, out, _ = d.run("stat -c %s /var/lib/dongle/update/staging/*.part 2>/dev/null || echo 0")
    return max([int(x) for x in out.split()] or [0])


@pytest.mark.parametrize("x", [pytest.param(0, marks=LONG)])
def test_a_power_cut_during_a_download_resumes_and_a_complete_slot_boots(
        dongle: DongleVM, releases: Releases, x) -> None:
    version = "0.1.5"
    body = releases.build(version)                       # a full bundle (no delta): ~15 MB
    srv = dongle.cloud.tuf
    srv.reset_counters()
    srv.slow_drip(256 * 1024, chunk=16 * 1024)
    try:
        assert publish(dongle, body)["status"] == "accepted"
        dongle.wait(lambda: _part_bytes(dongle) > 4_000_000, 600, "4 MB of the bundle on the disk")
        dongle.vm.power_cut()
    finally:
        srv.slow_drip(None)
    dongle.boot()
    assert current(dongle) == GOOD
    assert_complete_slot(dongle, GOOD)
    update_event(dongle, version, "good", 1800)
    ranged = [r for r in srv.requests if r[0].startswith("/targets/") and r[3]]
    assert ranged and ranged[0][1] == 206, srv.requests          # resumed after the boot
    assert current(dongle) == version
    assert_complete_slot(dongle, version)


@pytest.mark.parametrize("x", [pytest.param(0, marks=LONG)])
def test_a_power_cut_during_an_install_leaves_a_complete_slot_and_the_install_is_redone(
        dongle: DongleVM, releases: Releases, x) -> None:
    before = current(dongle)
    version = "0.1.6"
    assert publish(dongle, releases.build(version, delta_from=before))["status"] == "accepted"
    dongle.wait(lambda: dongle.run("ls -d /opt/dongle/slots/*.partial 2>/dev/null")[0] == 0,
                1200, "the installer to be unpacking the slot", interval=0.05)
    dongle.vm.power_cut()
    dongle.boot()
    was = current(dongle)
    assert was in (before, version)
    assert_complete_slot(dongle, was)
    update_event(dongle, version, "good", 1800)
    assert current(dongle) == version
    assert_complete_slot(dongle, version)
    out = dongle.sh("ls /opt/dongle/slots")
    assert not [s for s in out.split() if s.endswith(".partial")], out
