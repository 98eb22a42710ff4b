"""The technician CLI against a real in-process agent: real broker and cloud console, the
ELM327-emulator on a pty as the car, gpiozero's MockFactory as the dongle's LEDs and button, a
python-can virtual bus for capture. Each command's success and its main refusals."""
from __future__ import annotations

import grp
import io
import json
import os
import shutil
import socket
import subprocess
import sysconfig
import sys
import tempfile
import threading
import time
from pathlib import Path

import can
import pytest
from gpiozero import Device
from gpiozero.pins.mock import MockFactory

from agent.cli import common, main as cli
from agent.cloud import schemas
from agent import settings
from agent.compose import Agent, build
from drivers.core.clock import Clock

now_ms = Clock().now_ms
from agent.cloud.cloudconfig import default_config
from scripts.vehicle_sim.elm_emulator import ElmEmulator
from scripts.testbed.wait import wait_until
from tests.support.shown import assert_shown_at_resolution

DEV = "tech-0001"
DAY = 86_400_000
BUTTON = 26


@pytest.fixture(scope="module")
def emu():
    with ElmEmulator("car") as e:
        yield e


@pytest.fixture
def short_dir():
    """Unix socket paths are limited to 108 bytes: a short directory others can traverse."""
    d = tempfile.mkdtemp(prefix="dgl-", dir="/tmp")
    os.chmod(d, 0o755)
    yield Path(d)
    shutil.rmtree(d, ignore_errors=True)


class Bench:
    """One device: agent settings, the CLI's settings file, the running agent, the cloud."""

    def __init__(self, fleet, short_dir: Path, *, obd_port: str | None, can_channel: str | None = None,
                 group: str | None = None, technician_group: str | None = None):
        self.fleet = fleet
        self.socket = short_dir / "agent.sock"
        control = {"socket": str(self.socket), **({"group": group} if group else {}),
                   **({"technician_group": technician_group} if technician_group else {})}
        self.toml = fleet.device(DEV, obd_port=obd_port, control=control)
        extra = ""
        self.buses = [{"name": "can0", "interface": "virtual", "channel": can_channel}] if can_channel else []
        for b in self.buses:
            extra += f'\n[[can.buses]]\nname = "{b["name"]}"\ninterface = "virtual"\nchannel = "{can_channel}"\n'
        # The CLI reads the same file as the agent.
        self.cli_toml = self.toml.with_name("cli.toml")
        self.cli_toml.write_text(self.toml.read_text() + extra)
        self.control = control
        self.agent: Agent | None = None

    def _settings(self):
        return settings.load(self.cli_toml)

    def start(self) -> Agent:
        self.agent = build(self._settings())
        self.agent.start()
        assert self.agent.link.wait_connected(30)
        assert wait_until(lambda: self.socket.exists(), 10)
        return self.agent

    def stop(self) -> None:
        if self.agent is not None:
            self.agent.stop()
            self.agent = None

    def run(self, *argv, stdin: str = "") -> tuple[int, str, str]:
        """``dongle --config cli.toml ARGV`` in this process; returns (exit code, stdout, stderr)."""
        out, err = io.StringIO(), io.StringIO()
        old = sys.stdin, sys.stdout, sys.stderr
        sys.stdin, sys.stdout, sys.stderr = io.StringIO(stdin), out, err
        try:
            rc = cli.main(["--config", str(self.cli_toml), *argv])
        finally:
            sys.stdin, sys.stdout, sys.stderr = old
        return rc, out.getvalue(), err.getvalue()

    def json(self, *argv, stdin: str = ""):
        """``dongle ARGV --json``: exactly one JSON object on stdout, ``{"ok": true, ...}``."""
        rc, out, err = self.run(*argv, "--json", stdin=stdin)
        assert rc == 0, (rc, out, err)
        doc = json.loads(out)  # fails on anything before or after the one document
        assert isinstance(doc, dict) and doc["ok"] is True, doc
        return doc

    def events(self, type_: str) -> list[dict]:
        return [r["body"] for r in self.fleet.console.records
                if r.get("kind") == "event" and r["dev"] == DEV and r["body"]["type"] == type_]

    def wait_event(self, type_: str, pred=lambda b: True, timeout=30.0) -> dict:
        rec = self.fleet.console.wait_for(lambda r: r.get("kind") == "event" and r["dev"] == DEV
                                          and r["body"]["type"] == type_ and pred(r["body"]), timeout)
        assert rec, f"no {type_} event reached the cloud"
        schemas.validate("event", rec["body"])
        return rec["body"]


@pytest.fixture
def mock_pins():
    old = Device.pin_factory
    Device.pin_factory = MockFactory()
    yield Device.pin_factory
    Device.pin_factory.reset()
    Device.pin_factory = old


@pytest.fixture
def bench(fleet, short_dir, emu):
    emu.set_dtcs()
    b = Bench(fleet, short_dir, obd_port=emu.port)
    yield b
    b.stop()


def _obd_connected(agent):
    return wait_until(lambda: agent.obd.status()["connected"], 60)


# --------------------------------------------------------------------------------------------
# status, live, buffer, config, logs
# --------------------------------------------------------------------------------------------

def test_status_live_buffer_with_the_agent_running(bench):
    agent = bench.start()
    assert _obd_connected(agent)
    st = bench.json("status")
    assert st["device_id"] == DEV and st["broker"]["connected"] is True
    assert st["adapter"]["connected"] is True and st["adapter"]["port"] == agent.obd.status()["port"]
    assert st["config_version"] == 0 and st["clock"]["synced"] is True
    assert set(st["buffer"]["depth"]) == {"samples", "frames", "events", "outbox"}
    assert st["disk"]["free_bytes"] > 0
    # the components' own reports for scripts (the device VM tests read these)
    assert isinstance(st["last_uplink_seq"], int) and 0 <= st["last_uplink_seq"] <= agent.store.last_uplink_seq
    assert {"can", "obd", "store", "ingest", "uplink", "power", "gpio", "update"} <= set(st)
    rc, out, _ = bench.run("status")
    assert rc == 0 and "OBD adapter" in out and "connected" in out and DEV in out

    # live: the emulator's RPM and speed as the agent polls them.
    sig = wait_until(lambda: {s["name"]: s for s in bench.json("live", "--once")["signals"]} if any(
        s["name"] == "engine.rpm" for s in bench.json("live", "--once")["signals"]) else None, 30)
    assert sig["engine.rpm"]["unit"] == "rpm" and sig["engine.rpm"]["value"] > 0
    rc, out, _ = bench.run("live", "--once")
    assert rc == 0 and "engine.rpm" in out
    # Shown at python-OBD's resolution: load in steps of 100/255 %, rpm of 0.25 rpm.
    sig = wait_until(lambda: (lambda d: d if {"engine.load", "engine.rpm"} <= set(d) else None)(
        {s["name"]: s for s in bench.json("live", "--once")["signals"]}), 30)
    assert sig["engine.load"]["resolution"] == pytest.approx(100 / 255) and sig["engine.rpm"]["resolution"] == 0.25
    assert_shown_at_resolution(sig.values())
    rows = {line.split()[0]: line.split()[1] for line in bench.run("live", "--once")[1].splitlines()[2:]}
    assert len(rows["engine.load"].partition(".")[2]) == 1 and len(rows["engine.rpm"].partition(".")[2]) == 2

    buf = bench.json("buffer")
    assert set(buf["depth"]) == {"samples", "frames", "events", "outbox"} and buf["evictions"] == 0
    rc, out, _ = bench.run("buffer")
    assert rc == 0 and "outbox" in out and "evictions: 0" in out


def test_piping_live_into_head_ends_without_a_traceback(bench):
    agent = bench.start()
    assert _obd_connected(agent)
    assert wait_until(lambda: bench.json("live", "--once")["signals"], 30)
    dongle = Path(sys.executable).parent / "dongle"
    for extra in ("", "--json"):
        r = subprocess.run(["bash", "-c", f"'{dongle}' --config '{bench.cli_toml}' live --interval 0.05 {extra} "
                                          "| head -n 3; echo \"dongle exit ${PIPESTATUS[0]}\" >&2"],
                           capture_output=True, text=True, timeout=60)
        assert len(r.stdout.splitlines()) == 3, r.stdout
        assert r.stderr == "dongle exit 141\n", r.stderr


def test_no_agent_running_read_only_fallbacks_and_refusals(bench):
    bench.start()
    bench.fleet.console.publish(DEV, "booking", {
        "op": "upsert", "booking_id": "b-9", "service": "inspection", "scheduled_at": now_ms() + DAY,
        "provider": {"name": "Garage", "address": "Str. 1"}})
    assert wait_until(lambda: bench.agent.bookings.get("b-9"), 30)
    vin = wait_until(lambda: (bench.agent.identity.last() or {}).get("vin"), 60)
    bench.stop()
    assert not bench.socket.exists()
    rc, out, err = bench.run("status")
    assert rc == 0 and "NOT RUNNING" in out and vin in out   # the VIN, kept encrypted, opened
    st = bench.json("status")
    assert st["running"] is False and st["device_id"] == DEV and st["vehicle"]["vin"] == vin
    assert [b["booking_id"] for b in bench.json("bookings")["bookings"]] == ["b-9"]
    assert bench.json("dtc")["source"] == "last_reported"
    assert bench.json("config", "show")["config"]["version"] == 0
    assert bench.json("service-log", "--verify")["verification"]["ok"] is True
    assert "depth" in bench.json("buffer")
    for argv in (("live", "--once"), ("booking", "checkin", "b-9"), ("dtc", "clear")):
        rc, out, err = bench.run(*argv)
        assert rc == common.EXIT_NO_AGENT, argv
        assert "no agent running" in err, argv
    rc, out, _ = bench.run("booking", "checkin", "b-9", "--json")
    assert json.loads(out) == {"ok": False, "code": "no_agent", "error": json.loads(out)["error"]}


def test_config_show_and_diff(bench):
    agent = bench.start()
    doc = {"version": 3, "upload": {"interval_s": 2},
           "obd": {"pids": [{"name": "engine.rpm", "pid": "RPM", "period_s": 1}], "dtc_period_s": 60},
           "can": {"signals": [], "raw": {"enabled": False, "ids": []}},
           "health": {"maintenance": {"items": {"oil_change": {"km": 10000, "days": 365}}}}}
    bench.fleet.console.publish(DEV, "config", doc)
    assert wait_until(lambda: agent.config.get("version") == 3)
    assert bench.json("config", "show") == {"ok": True, "config": doc}
    diff = bench.json("config", "diff")
    assert diff["active_version"] == 3 and "default" in diff["against"]
    changed = {c["path"]: (c["old"], c["new"]) for c in diff["changes"]}
    assert changed["upload.interval_s"] == (default_config()["upload"]["interval_s"], 2)
    assert changed["version"] == (0, 3)
    assert changed["health.maintenance.items.oil_change.km"] == (None, 10000)
    doc4 = {**doc, "version": 4, "upload": {"interval_s": 3}}
    bench.fleet.console.publish(DEV, "config", doc4)
    assert wait_until(lambda: agent.config.get("version") == 4)
    diff = bench.json("config", "diff")
    assert "v3" in diff["against"]
    assert {c["path"] for c in diff["changes"]} == {"version", "upload.interval_s"}
    rc, out, _ = bench.run("config", "diff")
    assert rc == 0 and '-    "interval_s": 2' in out and '+    "interval_s": 3' in out


def test_logs_from_a_file_and_without_any(bench, tmp_path):
    log = tmp_path / "agent.log"
    log.write_text("".join(f"line {i}\n" for i in range(300)))
    rc, out, _ = bench.run("logs", "--file", str(log), "-n", "3")
    assert rc == 0 and out.splitlines() == ["line 297", "line 298", "line 299"]
    rc, out, _ = bench.run("logs", "--file", str(log), "-n", "1", "--json")
    assert json.loads(out) == {"ok": True, "source": "file", "path": str(log), "lines": ["line 299"]}
    (tmp_path / "elsewhere").mkdir()
    cfg = tmp_path / "elsewhere" / "nolog.toml"
    cfg.write_text(f'[device]\nid = "x-0001"\ndata_dir = "{tmp_path / "nothing"}"\n')
    rc, out, err = bench.run("--config", str(cfg), "logs")  # the later --config wins
    if not Path("/run/systemd/system").is_dir():  # no journal on this machine
        assert rc == 1 and "no agent log file found" in err


def _commands(parser, prefix=()):
    """Every (sub)command of the parser: (name path, its parser)."""
    import argparse
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, prefix + (name,))
    if prefix:
        yield prefix, parser


def test_every_command_takes_the_global_options_before_and_after_its_name():
    commands = list(_commands(cli.build_parser()))
    assert {c[0] for c, _ in commands} >= {"status", "live", "dtc", "bookings", "booking", "service-log",
                                          "config", "buffer", "capture", "logs", "battery", "export",
                                          "privacy", "wipe", "provision"}
    for name, parser in commands:
        assert {"--config", "--json", "-v"} <= set(parser._option_string_actions), name
    for argv in (["wipe", "--config", "X", "--json"], ["--config", "X", "wipe", "--json"],
                 ["export", "--out", "o", "--config", "X"], ["privacy", "pause", "--config", "X", "--json"],
                 ["--json", "--config", "Y", "status", "--config", "X"]):
        args = cli.build_parser().parse_args(argv)
        assert args.config == "X", argv


def test_wipe_json_prompts_on_stderr_and_prints_one_document(bench):
    """No agent needed: the answer at the terminal is wrong, so nothing is asked of it."""
    rc, out, err = bench.run("wipe", "--json", stdin="not-the-id\n")
    assert rc == 1
    assert json.loads(out) == {"ok": False, "code": "refused",
                               "error": "not confirmed at the terminal; nothing was wiped"}
    assert f"Type the device id ({DEV}) to confirm: " in err and "This erases everything" in err
    # --config after the command, as for every other command
    rc, out, err = bench.run("wipe", "--config", str(bench.cli_toml), "--json", stdin="\n")
    assert rc == 1 and json.loads(out)["code"] == "refused"


def test_errors_are_the_same_json_object_for_every_command(bench, tmp_path):
    """No agent running: the commands that need one answer the same error object."""
    for argv in (("live", "--once"), ("battery",), ("privacy",), ("booking", "checkin", "b-1"),
                 ("dtc", "clear")):
        rc, out, err = bench.run(*argv, "--json")
        assert rc == common.EXIT_NO_AGENT, argv
        doc = json.loads(out)
        assert set(doc) == {"ok", "code", "error"} and doc["ok"] is False and doc["code"] == "no_agent", argv
    rc, out, err = bench.run("--config", str(tmp_path / "none.toml"), "status", "--json")
    assert rc == 1 and json.loads(out)["code"] == "no_settings"


# --------------------------------------------------------------------------------------------
# Who may use the socket
# --------------------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parent.parent


def _system_python() -> str | None:
    """An interpreter user nobody can run (the venv's may live under /root), 3.11+ for tomllib;
    agent.cli and agent.control need nothing outside the standard library."""
    for exe in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if os.access(exe, os.X_OK):
            r = subprocess.run([exe, "-c", "import sys; print(sys.version_info >= (3, 11))"],
                               capture_output=True, text=True)
            if r.stdout.strip() == "True":
                return exe
    return None


needs_root_and_python = pytest.mark.skipif(os.geteuid() != 0 or _system_python() is None,
                                           reason="needs root (to run as another user) and a system Python 3.11+")


def _as_nobody(bench, *argv, extra_groups=(), stdin: str = ""):
    """``dongle ARGV`` as user nobody (optionally with supplementary groups), in a new process."""
    cfg = bench.socket.parent / "cli.toml"
    shutil.copy(bench.cli_toml, cfg)
    os.chmod(cfg, 0o644)
    # The system interpreter (nobody cannot run root's), given this venv's libraries and packages.
    run = (f"import runpy, site, sys; site.addsitedir({sysconfig.get_paths()['purelib']!r}); "
           "sys.argv[0] = 'dongle'; runpy.run_module('agent.cli.main', run_name='__main__')")
    return subprocess.run([_system_python(), "-c", run, "--config", str(cfg), *argv], input=stdin,
                          capture_output=True, text=True, timeout=60, user="nobody", group="nogroup",
                          extra_groups=list(extra_groups), cwd="/",
                          env={"PYTHONDONTWRITEBYTECODE": "1", "PATH": "/usr/bin:/bin"})


@needs_root_and_python
def test_socket_refuses_users_outside_the_group(fleet, short_dir, emu):
    b = Bench(fleet, short_dir, obd_port=None)  # group 'dongle' does not exist here: root and the agent's user only
    try:
        b.start()
        assert oct(b.socket.stat().st_mode & 0o777) == "0o660"
        r = _as_nobody(b, "bookings")
        assert r.returncode == 1
        assert "not permitted" in r.stderr and "dongle" in r.stderr and "usermod" in r.stderr
        # Even past the file permissions (socket made world-writable), the agent checks the peer.
        os.chmod(b.socket, 0o666)
        r = _as_nobody(b, "bookings")
        assert r.returncode == 1 and "not permitted: user nobody is not in the 'dongle' group" in r.stderr
        assert b.agent.technician.server.stats["refused"] == 1
    finally:
        b.stop()


@needs_root_and_python
def test_socket_serves_members_of_the_group(fleet, short_dir, emu):
    group = grp.getgrgid(100).gr_name  # "users" on Debian: stands in for "dongle"
    b = Bench(fleet, short_dir, obd_port=None, group=group)
    try:
        b.start()
        st = b.socket.stat()
        assert st.st_gid == 100 and st.st_mode & 0o777 == 0o660
        r = _as_nobody(b, "bookings", "--json", extra_groups=[100])
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout) == {"ok": True, "bookings": []}
        r = _as_nobody(b, "bookings")  # the same user without the group
        assert r.returncode == 1 and "not permitted" in r.stderr
    finally:
        b.stop()


@needs_root_and_python
def test_the_technician_credential_is_a_supplementary_group_of_the_client(fleet, short_dir, emu):
    emu.set_dtcs(stored=["P0420"])
    users, staff = grp.getgrgid(100).gr_name, grp.getgrgid(50).gr_name   # "users", "staff" on Debian
    b = Bench(fleet, short_dir, obd_port=emu.port, group=users, technician_group=staff)
    try:
        agent = b.start()
        assert _obd_connected(agent)
        r = _as_nobody(b, "dtc", "clear", extra_groups=[100], stdin="yes\n")   # may use the socket, no credential
        assert r.returncode == 1 and f"not in the '{staff}' group" in r.stderr, r.stderr
        r = _as_nobody(b, "dtc", "clear", extra_groups=[100, 50], stdin="yes\n")
        assert r.returncode == 0, r.stderr
        ev = b.wait_event("dtc_cleared")
        assert ev["codes"] == ["P0420"] and ev["by"] == f"technician nobody (terminal + credential {staff})"
    finally:
        b.stop()


# --------------------------------------------------------------------------------------------
# The control socket's bounds: idle, slow and too many clients
# --------------------------------------------------------------------------------------------

def _connect(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(30)
    s.connect(str(path))
    return s


def _answer(s: socket.socket) -> dict:
    line = s.makefile("rb").readline()
    assert line, "closed without an answer"
    return json.loads(line)


def test_idle_clients_are_dropped_and_one_too_many_is_refused(bench):
    agent = bench.start()
    server = agent.technician.server
    idle = [_connect(bench.socket) for _ in range(server.max_connections)]
    try:
        assert wait_until(lambda: server.status()["connections"] == server.max_connections, 10)
        extra = _connect(bench.socket)
        busy = _answer(extra)
        assert busy["ok"] is False and busy["code"] == "busy"
        assert f"{server.max_connections} connections are open already" in busy["error"]
        assert extra.recv(1) == b""
        extra.close()
        # A technician's `dongle status` meanwhile: served once the idle ones are dropped.
        st = bench.json("status")
        assert st["device_id"] == DEV and st["broker"]["connected"] is True
        for s in idle:
            dropped = _answer(s)
            assert dropped["code"] == "timeout" and "no complete request within" in dropped["error"]
            assert s.recv(1) == b""
        assert server.stats["timed_out"] >= server.max_connections and server.stats["busy"] >= 1
        assert wait_until(lambda: server.status()["connections"] == 0, 10)
    finally:
        for s in idle:
            s.close()


def test_a_slow_loris_client_is_dropped_while_status_is_served(bench):
    agent = bench.start()
    server = agent.technician.server
    loris = _connect(bench.socket)
    stop = threading.Event()

    request = b'{"op": "status", "padding": "' + b"x" * 1000
    sent = [0]

    def trickle() -> None:
        for i in range(len(request)):   # one byte every 0.2 s, never the end of the line
            if stop.wait(0.2):
                return
            try:
                loris.send(request[i:i + 1])
            except OSError:   # dropped by the agent
                return
            sent[0] += 1

    t = threading.Thread(target=trickle, daemon=True)
    t.start()
    try:
        assert wait_until(lambda: server.status()["connections"] == 1, 10)
        assert bench.json("status")["device_id"] == DEV   # not held up by the slow one
        dropped = _answer(loris)
        assert dropped["ok"] is False and dropped["code"] == "timeout"
        assert 5 <= sent[0] < len(request), "the client was still sending when it was dropped"
        assert server.stats["timed_out"] == 1 and server.stats["busy"] == 0
    finally:
        stop.set()
        t.join(5)
        loris.close()


# --------------------------------------------------------------------------------------------
# Trouble codes
# --------------------------------------------------------------------------------------------

def test_dtc_clear_without_a_button_needs_the_technician_credential(bench, emu):
    """No button here and root is not in the technician group (dongle-tech does not exist)."""
    emu.set_dtcs(stored=["P0301"])
    agent = bench.start()
    assert _obd_connected(agent) and not agent.indicators.has_button
    rc, out, err = bench.run("dtc", "clear", stdin="yes\n")
    assert rc == 1
    assert "not permitted" in err and "'dongle-tech' group" in err and "usermod -aG dongle-tech root" in err
    # The confirmation flag alone, sent by any client, is no proof either.
    s = _connect(bench.socket)
    s.sendall(json.dumps({"op": "dtc_clear", "confirmed": True, "codes_seen": ["P0301"]}).encode() + b"\n")
    assert _answer(s)["code"] == "not_permitted"
    s.close()
    assert [c["code"] for c in bench.json("dtc")["codes"]] == ["P0301"]
    refused = agent.store.query("SELECT action, by FROM technician_log")
    assert refused == [("dtc_clear_refused", "root")] * 2
    assert bench.events("dtc_cleared") == []


def test_dtc_read_and_clear_after_terminal_confirmation(fleet, short_dir, emu):
    """Root holds the technician credential here (technician_group = "root")."""
    emu.set_dtcs(stored=["P0301", "P0420"])
    bench = Bench(fleet, short_dir, obd_port=emu.port, technician_group="root")
    try:
        _read_and_clear(bench, emu)
    finally:
        bench.stop()


def _read_and_clear(bench, emu):
    agent = bench.start()
    assert _obd_connected(agent)
    res = bench.json("dtc")
    assert res["source"] == "vehicle"
    codes = {c["code"]: c for c in res["codes"]}
    assert set(codes) >= {"P0301", "P0420"}
    assert "misfire" in codes["P0301"]["desc"].lower() and codes["P0301"]["severity"] == "critical"
    rc, out, _ = bench.run("dtc")
    assert rc == 0 and "P0301" in out and "P0420" in out

    # The cloud asks; nothing happens on its word.
    bench.fleet.console.publish(DEV, "command", {"op": "clear_dtc"})
    assert wait_until(lambda: agent.store.get_meta("pending_clear_dtc"))
    assert "P0301" in {c["code"] for c in bench.json("dtc")["codes"]}

    # A person says no: nothing cleared.
    rc, out, err = bench.run("dtc", "clear", stdin="no\n")
    assert rc == 1 and "not confirmed" in err
    assert "P0301" in {c["code"] for c in bench.json("dtc")["codes"]}
    rc, out, err = bench.run("dtc", "clear", stdin="")  # no terminal answer at all
    assert rc == 1 and "nothing was cleared" in err

    rc, out, err = bench.run("dtc", "clear", stdin="yes\n")
    assert rc == 0, err
    assert "Type 'yes' to confirm" in err and "Cleared: P0301, P0420" in out
    assert "Still reported" not in out   # the stock emulator keeps no permanent codes
    ev = bench.wait_event("dtc_cleared")
    assert ev["codes"] == ["P0301", "P0420"]
    assert ev["by"].startswith("technician root (terminal + credential root)") and "requested by the cloud" in ev["by"]
    assert agent.store.get_meta("pending_clear_dtc") is None
    assert bench.json("dtc")["codes"] == []
    who = agent.store.query("SELECT action, by FROM technician_log WHERE action='dtc_clear'")
    assert who == [("dtc_clear", "root")]


def test_dtc_clear_needs_the_button_where_there_is_one(fleet, short_dir, emu, mock_pins):
    emu.set_dtcs(stored=["P0171"])
    b = Bench(fleet, short_dir, obd_port=emu.port)
    try:
        agent = b.start()
        ind = agent.indicators
        assert ind.has_button
        assert _obd_connected(agent)
        # Not pressed in time: refused, nothing cleared.
        rc, out, err = b.run("dtc", "clear", "--button-timeout", "1", stdin="yes\n")
        assert rc == 1 and "button was not pressed" in err
        assert [c["code"] for c in b.json("dtc")["codes"]] == ["P0171"]

        result = {}
        t = threading.Thread(target=lambda: result.setdefault("r", b.run("dtc", "clear", stdin="yes\n")))
        t.start()
        assert wait_until(lambda: ind.status()["leds"].get("attention") == "fast", 30), "no fast blink"
        pin = mock_pins.pin(BUTTON)
        pin.drive_low()
        pin.drive_high()
        t.join(60)
        rc, out, err = result["r"]
        assert rc == 0, err
        assert "Press the button on the dongle" in err
        ev = b.wait_event("dtc_cleared")
        assert ev["codes"] == ["P0171"] and ev["by"] == "technician root (terminal + button)"

        # A long press starts technician mode: presence proven, the terminal is enough.
        emu.set_dtcs(stored=["P0300"])
        assert wait_until(lambda: [c["code"] for c in b.json("dtc")["codes"]] == ["P0300"])
        pin.drive_low()
        assert wait_until(lambda: ind.technician_mode, 10)
        pin.drive_high()
        rc, out, err = b.run("dtc", "clear", stdin="yes\n")
        assert rc == 0, err
        ev = b.wait_event("dtc_cleared", lambda e: e["codes"] == ["P0300"])
        assert ev["by"] == "technician root (terminal + technician mode)"
        assert b.json("status")["technician_mode"] is True
    finally:
        b.stop()


def test_dtc_clear_with_the_technician_credential_needs_no_button(fleet, short_dir, emu, mock_pins):
    emu.set_dtcs(stored=["P0171"])
    b = Bench(fleet, short_dir, obd_port=emu.port, technician_group="root")
    try:
        agent = b.start()
        assert agent.indicators.has_button and _obd_connected(agent)
        rc, out, err = b.run("dtc", "clear", "--button-timeout", "30", stdin="yes\n")
        assert rc == 0, err
        assert "Press the button" not in err
        ev = b.wait_event("dtc_cleared")
        assert ev["codes"] == ["P0171"] and ev["by"] == "technician root (terminal + credential root)"
        assert agent.indicators.status()["leds"].get("attention") != "fast"
    finally:
        b.stop()


def test_dtc_without_an_adapter(fleet, short_dir, emu):
    b = Bench(fleet, short_dir, obd_port="/dev/nonexistent-elm")
    try:
        b.start()
        rc, out, err = b.run("dtc")
        assert rc == 1 and "no adapter" in err and "/dev/nonexistent-elm" in err
        rc, out, err = b.run("dtc", "--json")
        assert json.loads(out)["code"] == "no_adapter"
    finally:
        b.stop()


# --------------------------------------------------------------------------------------------
# Bookings and the service log
# --------------------------------------------------------------------------------------------

def _book(bench, bid, **kw):
    body = {"op": "upsert", "booking_id": bid, "service": "oil change", "scheduled_at": now_ms() + DAY,
            "provider": {"name": "Garage Müller", "address": "Hauptstr. 1", "lat": 52.52, "lon": 13.40},
            "notes": "bring the spare key"}
    body.update(kw)
    bench.fleet.console.publish(DEV, "booking", body)
    assert wait_until(lambda: bench.agent.bookings.get(bid))


def test_booking_checkin_complete_and_service_log(bench):
    bench.start()
    _book(bench, "b-1")
    _book(bench, "b-2")
    rc, out, _ = bench.run("bookings")
    assert rc == 0 and "b-1" in out and "Garage Müller" in out and "scheduled" in out

    # Refusals: unknown booking, completing before check-in.
    rc, out, err = bench.run("booking", "checkin", "nope")
    assert rc == 1 and "unknown booking 'nope'" in err
    rc, out, err = bench.run("booking", "complete", "b-1", "--odometer", "42000", "--item", "oil_change")
    assert rc == 1 and "check it in first" in err
    rc, out, err = bench.run("booking", "complete", "b-1")  # missing arguments
    assert rc == 2

    res = bench.json("booking", "checkin", "b-1")
    assert res["booking"]["status"] == "checked_in"
    ev = bench.wait_event("booking", lambda b: b["booking_id"] == "b-1")
    assert ev["status"] == "checked_in"
    rc, out, err = bench.run("booking", "checkin", "b-1")
    assert rc == 1 and "is checked_in" in err

    res = bench.json("booking", "complete", "b-1", "--odometer", "42000", "--item", "oil_change",
                     "--item", "brake pads front", "--technician", "Anna Schmidt")
    rec = res["record"]
    ev = bench.wait_event("service_record")
    assert ev == rec
    assert ev["prev_hash"] == "00" * 32 and ev["items"] == ["oil_change", "brake pads front"]
    assert ev["technician"] == "Anna Schmidt" and ev["odometer_km"] == 42000
    done = bench.wait_event("booking", lambda b: b["status"] == "completed")
    assert done["booking_id"] == "b-1"
    assert {b["booking_id"]: b["status"] for b in bench.json("bookings")["bookings"]} == {"b-1": "completed", "b-2": "scheduled"}
    rc, out, err = bench.run("booking", "complete", "b-1", "--odometer", "1", "--item", "x")
    assert rc == 1 and "is completed" in err

    bench.json("booking", "checkin", "b-2")
    rc, out, err = bench.run("booking", "complete", "b-2", "--odometer", "-5", "--item", "x")
    assert rc == 1 and "not a plausible reading" in err
    rec2 = bench.json("booking", "complete", "b-2", "--odometer", "43000.5", "--item", "tyres")["record"]
    assert rec2["prev_hash"] == rec["hash"] and rec2["technician"] == "root"

    log = bench.json("service-log", "--verify")
    assert [r["hash"] for r in log["records"]] == [rec["hash"], rec2["hash"]]
    assert log["verification"] == {"ok": True, "records": 2, "problems": [], "head": rec2["hash"]}
    rc, out, _ = bench.run("service-log", "--verify")
    assert rc == 0 and "VERIFIED: all 2 record(s)" in out and "Anna Schmidt" in out
    # Maintenance counts from the record: oil change done at 42,000 km.
    maint = {d["kind"]: d for d in bench.agent.health.snapshot()["maintenance"]}
    assert maint["oil_change"]["last_odometer_km"] == 42000


def test_service_log_tampering_is_reported(bench):
    import sqlite3

    import cbor2
    bench.start()
    for bid in ("b-1", "b-2", "b-3"):
        _book(bench, bid)
        bench.json("booking", "checkin", bid)
        bench.json("booking", "complete", bid, "--odometer", "1000", "--item", "oil_change")
    db_path = bench.agent.store.path
    bench.stop()
    db = sqlite3.connect(db_path)
    db.execute("DROP TRIGGER service_log_no_update")
    blob = db.execute("SELECT record FROM service_log WHERE idx=1").fetchone()[0]
    rec = cbor2.loads(blob)
    rec["odometer_km"] = 500
    db.execute("UPDATE service_log SET record=? WHERE idx=1", (cbor2.dumps(rec, canonical=True),))
    db.commit()
    db.close()
    rc, out, err = bench.run("service-log", "--verify")
    assert rc == 1
    assert "TAMPERED" in out and "record #0 (booking b-1)" in out and "record #2 (booking b-3)" in out
    res = json.loads(bench.run("service-log", "--verify", "--json")[1])
    assert [p["index"] for p in res["verification"]["problems"]] == [0, 1, 2]


# --------------------------------------------------------------------------------------------
# capture
# --------------------------------------------------------------------------------------------

def _sender(channel: str, stop: threading.Event, ids=(0x123, 0x18FF50E5)):
    bus = can.Bus(interface="virtual", channel=channel)
    try:
        i = 0
        while not stop.is_set():
            can_id = ids[i % len(ids)]
            bus.send(can.Message(arbitration_id=can_id, is_extended_id=can_id > 0x7FF,
                                 data=bytes([i & 0xFF, 1, 2, 3])))
            i += 1
            time.sleep(0.005)
    finally:
        bus.shutdown()


def _read_log(path: Path) -> list[can.Message]:
    return list(can.LogReader(str(path)))


def test_capture_through_the_agent_and_directly(fleet, short_dir, tmp_path):
    channel = f"cap-{os.getpid()}-{time.monotonic_ns()}"
    b = Bench(fleet, short_dir, obd_port=None, can_channel=channel)
    stop = threading.Event()
    sender = threading.Thread(target=_sender, args=(channel, stop), daemon=True)
    try:
        b.start()
        sender.start()
        out = tmp_path / "via-agent.log"
        res = b.json("capture", "--seconds", "1.5", "--out", str(out))
        assert res["via"] == "agent" and res["buses"] == ["can0"] and res["frames"] > 20
        msgs = _read_log(out)
        assert len(msgs) == res["frames"]
        assert {m.arbitration_id for m in msgs} == {0x123, 0x18FF50E5}
        assert {m.channel for m in msgs} == {"can0"}
        assert all(m.is_extended_id == (m.arbitration_id > 0x7FF) for m in msgs)
        # The acceptance filters come back afterwards; the agent still runs.
        assert b.agent.can.status()["buses"]["can0"]["state"] == "running"
        b.stop()
        # No agent: the CLI opens the interface itself.
        out2 = tmp_path / "direct.log"
        rc, text, err = b.run("capture", "--seconds", "1", "--out", str(out2))
        assert rc == 0, err
        assert "(candump log, direct)" in text
        assert len(_read_log(out2)) > 20
    finally:
        stop.set()
        sender.join(5)
        b.stop()


def test_capture_refusals(bench, tmp_path):
    bench.start()
    rc, out, err = bench.run("capture", "--seconds", "1", "--out", str(tmp_path / "x.log"))
    assert rc == 1 and "no CAN bus is configured" in err
    bench.stop()
    rc, out, err = bench.run("capture", "--seconds", "1", "--out", str(tmp_path / "x.log"))
    assert rc == 1 and "no adapter" in err
    rc, out, err = bench.run("capture", "--seconds", "0", "--out", str(tmp_path / "x.log"))
    assert rc == 2


PROGRESS = """
import sys
from agent.cli.common import ProgressBar
bar = ProgressBar(True, "export")
for done in (200, 400, 400):       # the last redraw repeats the total, as export's end does
    bar.show(done / 400, f"{done}/400 records")
bar.done()
bar.done()
print("out", flush=True)
"""


def test_the_progress_bar_draws_on_a_terminal_only_and_ends_its_line_once(tmp_path):
    import pty
    # a pipe or a log file: nothing (not one line per redraw)
    piped = subprocess.run([sys.executable, "-c", PROGRESS], capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent,
                           timeout=60)
    assert piped.returncode == 0 and piped.stderr == "" and piped.stdout == "out\n"
    # a terminal: redraws in place, then exactly one line end
    pid, fd = pty.fork()
    if pid == 0:
        os.chdir(Path(__file__).resolve().parent.parent)
        os.execv(sys.executable, [sys.executable, "-c", PROGRESS])
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 4096)
        except OSError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.waitpid(pid, 0)
    tty = b"".join(chunks).decode().replace("\r\n", "\n")
    assert tty.count("\rexport [") == 3 and "400/400 records" in tty
    assert tty.endswith("400/400 records\nout\n"), repr(tty)
